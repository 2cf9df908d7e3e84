"""The per-rank memory plan (`gptoss-mac plan --ranks N`) on the real 120b/20b tensor shapes (headers only)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from test_memory_plan import mac, write_sparse_checkpoint

from mlx_gptoss.distributed.layout import rank_view
from mlx_gptoss.distributed.plan import plan_ranks
from mlx_gptoss.memory import make_plan, read_checkpoint


@pytest.fixture(scope="module")
def ckpt120(tmp_path_factory):
    return write_sparse_checkpoint(tmp_path_factory.mktemp("p") / "gpt-oss-120b", 36, 128, 15)


def test_each_rank_holds_half_the_sharded_part_and_all_the_replicated_part(ckpt120):
    ck = read_checkpoint(ckpt120)
    whole = make_plan(ck, budget=mac(512), metal=True)
    for n in (2, 4, 8):
        shares = [make_plan(rank_view(ck, r, n), budget=mac(512), metal=True) for r in range(n)]
        for part in ("embedding", "unembedding", "other"):
            assert all(s.weights[part] == whole.weights[part] for s in shares)
        # attention: the heads split evenly, plus the output bias kept whole (rank 0) or as zeros
        assert all(abs(s.weights["attention"] - whole.weights["attention"] / n) < 36 * 2880 * 2 + 1 for s in shares)
        # experts: 90 MXFP4 blocks of intermediate size split into n shares of whole blocks
        experts = [s.weights["experts"] for s in shares]
        assert abs(sum(experts) - whole.weights["experts"]) <= n * 36 * 128 * 2880 * 2  # zero down biases
        assert max(experts) <= whole.weights["experts"] * (90 // n + 1) / 90 + 36 * 128 * 2880 * 2
        assert all(s.kv_per_token * n == whole.kv_per_token for s in shares)  # KV heads split too


def test_a_model_too_big_for_one_mac_names_how_many_macs_fit(ckpt120):
    p = make_plan(read_checkpoint(ckpt120), budget=mac(64), metal=True)
    assert p.status == "does not fit"
    assert "Or split it over 2 such Macs with mlx.launch" in p.message and "plan --ranks 2" in p.message
    assert make_plan(rank_view(read_checkpoint(ckpt120), 0, 2), budget=mac(64), metal=True).status == "fits"
    p = make_plan(read_checkpoint(ckpt120), budget=mac(32), metal=True)  # 2 do not do; 4 Macs of 32 GB do
    assert "Or split it over 4 such Macs" in p.message


def test_plan_ranks_command(ckpt120):
    from mlx_gptoss.cli.app import app

    r = CliRunner().invoke(app, ["plan", "--model", str(ckpt120), "--ranks", "2", "--memory", "48GB", "--dtype",
                                 "bfloat16", "--ctx", "32768"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "each of 2 Macs" in r.output and "fits" in r.output
    p = plan_ranks(ckpt120, 2, memory="48GB", dtype="bfloat16", context=32768)
    assert 30e9 < p.weight_bytes < 36e9  # about half of 65 GB plus the replicated 2.3 GB


def test_plan_ranks_refuses_a_count_the_heads_do_not_divide(ckpt120):
    from mlx_gptoss.cli.app import main  # noqa: F401  (the app's error handling is main's)
    from mlx_gptoss.errors import GptOssError

    with pytest.raises(GptOssError, match="cannot split this model over 3 ranks.*use 1, 2, 4, 8 ranks"):
        plan_ranks(ckpt120, 3)
