"""gpt-oss sharded over 2 and 4 local processes (mlx.launch, ring backend over the loopback).

Every multi-process test is bounded by a timeout that kills the launcher and all its ranks."""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from distributed_worker import launch, scripted_two_rank_checkpoint
from tiny_checkpoint import hub_config, random_weights, write_hub_checkpoint

import mlx_gptoss
from mlx_gptoss.distributed.layout import check_ranks, intermediate, split
from mlx_gptoss.config import GptOssConfig
from mlx_gptoss.errors import GptOssError

WORKER = str(Path(__file__).with_name("distributed_worker.py"))
GPTOSS = os.path.join(os.path.dirname(sys.executable), "gptoss-mac")


def proportional_cfg() -> dict:
    """gpt-oss-120b's proportions scaled down: 64 query / 8 KV heads, alternating sliding and full
    attention, MXFP4 experts (4 of 8 per token), an intermediate size of 5 MXFP4 blocks (uneven shares)."""
    return hub_config(num_hidden_layers=4, num_attention_heads=64, num_key_value_heads=8, head_dim=8,
                      hidden_size=128, intermediate_size=160, num_local_experts=8, num_experts_per_tok=4,
                      vocab_size=512, sliding_window=8)


@pytest.fixture(scope="module")
def prop_ckpt(tmp_path_factory):
    cfg = proportional_cfg()
    return write_hub_checkpoint(tmp_path_factory.mktemp("prop") / "ckpt", cfg, random_weights(cfg, seed=3), shards=2)


# --- the split itself (one process) ---------------------------------------------------------------------

def test_intermediate_split_keeps_whole_blocks_larger_shares_first():
    cfg = GptOssConfig.from_dict(proportional_cfg())
    assert split(5, 2) == [(0, 3), (3, 5)] and split(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert [intermediate(cfg, r, 4) for r in range(4)] == [(0, 64), (64, 96), (96, 128), (128, 160)]
    assert [intermediate(cfg, r, 2) for r in range(2)] == [(0, 96), (96, 160)]


def test_rank_counts_that_do_not_divide_the_heads_are_refused():
    cfg = GptOssConfig.from_dict(proportional_cfg())
    for n in (3, 16):
        with pytest.raises(GptOssError, match=f"over {n} ranks.*use 1, 2, 4 ranks"):
            check_ranks(cfg, n)


@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
def test_each_rank_reads_exactly_its_slice_of_the_loaded_tensors(tmp_path, experts):
    """Every rank's tensors, read by offset, are the matching slices of the whole model's (bf16 experts are
    quantized after slicing: the cuts fall on MXFP4 block boundaries, so the blocks are the same)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_gptoss.distributed.layout import heads
    from mlx_gptoss.distributed.reader import ReadStats
    from mlx_gptoss.distributed.shard import sharded_weights
    from mlx_gptoss.memory import local_checkpoint

    cfg = proportional_cfg()
    folder = write_hub_checkpoint(tmp_path / experts, cfg, random_weights(cfg, seed=5), experts=experts)
    whole = dict(tree_flatten(mlx_gptoss.load(folder, allow_download=False, memory="8GB", ctx=4096).model.parameters()))
    ck = local_checkpoint(folder, check_size=True)
    c = GptOssConfig.from_dict(cfg)
    D = c.head_dim
    for n in (2, 4):
        for r in range(n):
            stats = ReadStats()
            mine = dict(sharded_weights(ck.tensors, c, r, n, mx.float32, stats))
            (q0, q1), (k0, k1) = heads(c, r, n)
            a, b = intermediate(c, r, n)
            for name, w in whole.items():
                got = mine[name]
                if name.endswith("q_proj.weight"):
                    want = w[q0 * D:q1 * D]
                elif name.endswith(("k_proj.bias", "v_proj.weight")):
                    want = w[k0 * D:k1 * D]
                elif name.endswith("o_proj.weight"):
                    want = w[:, q0 * D:q1 * D]
                elif name.endswith("sinks"):
                    want = w[q0:q1]
                elif name.endswith(("o_proj.bias", "down_proj_bias")):
                    want = w if r == 0 else mx.zeros_like(w)
                elif ".gate_up_proj" in name:
                    want = w[:, 2 * a:2 * b]
                elif name.endswith("down_proj"):
                    want = w[:, :, a // 8:b // 8]
                elif name.endswith("down_proj_scales"):
                    want = w[:, :, a // 32:b // 32]
                elif ".self_attn." in name and not name.endswith(("q_proj.bias", "k_proj.weight", "v_proj.bias")):
                    raise AssertionError(f"unchecked attention tensor {name}")
                elif name.endswith("q_proj.bias"):
                    want = w[q0 * D:q1 * D]
                elif name.endswith(("k_proj.weight", "v_proj.bias")):
                    want = w[k0 * D:k1 * D]
                else:
                    want = w
                assert got.shape == want.shape and mx.array_equal(got, want).item(), (name, r, n)
            assert stats.kept < sum(t.nbytes for t in ck.tensors.values())


def test_group_auto_alone_loads_the_whole_model(prop_ckpt):
    gpt = mlx_gptoss.load(prop_ckpt, allow_download=False, group="auto", memory="8GB", ctx=4096)
    assert gpt.group is None and gpt.model.model.layers[0].self_attn.n_heads == 64


def test_bad_group_value_is_one_clear_error(prop_ckpt):
    with pytest.raises(GptOssError, match="group='two'"):
        mlx_gptoss.load(prop_ckpt, allow_download=False, group="two")


# --- parity, memory, reads (2 and 4 processes) ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_sharded_model_matches_the_single_process_model(prop_ckpt, tmp_path, n):
    r = launch(n, [WORKER, "parity", str(prop_ckpt), str(tmp_path)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(n)]
    for res in ranks:
        # logits within 1e-4 of max |logit|: a full prefill, and decoding through the caches past the window
        assert res["prefill_rel"] < 1e-4 and res["decode_rel"] < 1e-4, res
        assert res["gen_sharded"] == res["gen_whole"]  # greedy generation token for token
        # each rank holds its slices and the replicated part, nothing else: 1/N of the sharded part (the
        # intermediate splits unevenly: 5 blocks over N ranks) plus zeros for the biases rank 0 adds
        assert res["param_replicated"] == res["whole_replicated"]
        share = res["whole_sharded"] / n
        assert 0.7 * share < res["param_sharded"] < 1.35 * share, res
        assert res["param_sharded"] + res["param_replicated"] == res["plan_weights"]  # the plan knew
        assert res["plan_kv_per_token"] * n == res["whole_plan_kv_per_token"]  # KV heads split too
        # peak memory of the sharded load: its own parameters plus at most one tensor in flight
        assert res["peak_load"] < res["plan_weights"] + 0.25 * res["whole_sharded"] / n + 300_000, res
        # every byte kept is this rank's (read by offset); the files hold N times the sharded part
        assert res["kept"] == res["kept_expected"] and res["read"] < res["file_bytes"]
    assert sum(r["param_sharded"] for r in ranks) > ranks[0]["whole_sharded"]  # zeros for rank-0 biases


@pytest.mark.slow
def test_followers_replay_the_runner_of_rank_0(prop_ckpt, tmp_path):
    r = launch(2, [WORKER, "mirror", str(prop_ckpt), str(tmp_path)], timeout=600)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    res = json.loads((tmp_path / "mirror.json").read_text())
    assert res["worst"] < 1e-4, res
    assert "Node with rank" not in r.stderr  # both ranks exited 0: rank 0 sent QUIT at exit


# --- the CLI under mlx.launch ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_rank_final(tmp_path_factory):
    return scripted_two_rank_checkpoint(tmp_path_factory.mktemp("scripted2") / "final", "final")


def chat_env(tmp_path) -> dict:
    return {"COLUMNS": "200", "XDG_STATE_HOME": str(tmp_path / "state")}


@pytest.mark.slow
def test_piped_chat_under_mlx_launch_gives_the_scripted_answer(two_rank_final, tmp_path):
    # mlx.launch never passes end-of-input on to the ranks: a piped session ends with /exit
    r = launch(2, [GPTOSS, "chat", "--model", str(two_rank_final), "--temperature", "0"], timeout=600,
               input="Say hi\nWhat is MXFP4?\n/exit\n", env=chat_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == "Just the answer.\nJust the answer.\n"  # rank 0 alone writes the answers
    assert "Traceback" not in r.stderr
    msgs = json.loads((tmp_path / "state" / "gptoss-mac" / "autosave.json").read_text())["session"]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]


@pytest.mark.slow
def test_bench_under_mlx_launch_reports_communication_and_the_per_rank_roofline(prop_ckpt):
    r = launch(2, [GPTOSS, "bench", "-m", str(prop_ckpt), "-p", "16", "-n", "4", "-r", "1", "--json",
                   "--bandwidth-bytes", "1000000", "--ctx", "4096", "--memory", "8GB"], timeout=600)
    assert "Node with rank" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    res = json.loads(r.stdout)  # rank 0 alone prints
    d = res["distributed"]
    cfg = proportional_cfg()
    assert d["ranks"] == 2 and d["all_sums_per_token"] == 2 * cfg["num_hidden_layers"]
    assert d["payload_bytes_per_token"] == 2 * cfg["num_hidden_layers"] * cfg["hidden_size"] * 4  # float32
    assert d["sent_bytes_per_token_per_rank"] == d["payload_bytes_per_token"]  # 2 (N-1)/N = 1 for N = 2
    assert 0 < d["seconds_per_token"] < 5
    # the roofline counts this rank's share: half the attention, the KV heads, the experts read per token
    whole = mlx_gptoss.load(prop_ckpt, allow_download=False, memory="8GB", ctx=4096)
    from mlx_gptoss.bench import decode_bytes

    full = decode_bytes(whole.model, 4 // 2)
    mine = res["roofline"][0]["bytes_by_part"]
    assert mine["attention"] < 0.6 * full["attention"] and mine["kv"] * 2 == full["kv"]
    assert mine["unembedding"] == full["unembedding"]


@pytest.mark.slow
def test_serve_under_mlx_launch_answers_from_rank_0_with_both_ranks_computing(two_rank_final, tmp_path):
    import httpx

    from distributed_worker import free_ports

    port = free_ports(1)
    answers = {}

    def ask_then_stop(proc, stderr):
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and "serving" not in stderr.read_text():
            assert proc.poll() is None, stderr.read_text()[-3000:]
            time.sleep(0.3)
        pids = rank_pids(proc.pid)
        assert len(pids) == 2, stderr.read_text()[-3000:]
        def ask(i):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
                "model": "final", "temperature": 0, "messages": [{"role": "user", "content": "Say hi"}]})
            answers[i] = r.json()["choices"][0]["message"]["content"]
        ask(0)
        # the same conversation again (reusing the mirrored cache snapshots), twice at once: the scheduler
        # interleaves the two requests' mirrored forward passes
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(ask, (1, 2)))
        os.kill(pids[0], 15)  # stop the server the way mlx.launch or a service manager would

    r = launch(2, [GPTOSS, "serve", "--model", str(two_rank_final), "--port", str(port)], timeout=600,
               env=chat_env(tmp_path), on_start=ask_then_stop)
    assert answers == {0: "Just the answer.", 1: "Just the answer.", 2: "Just the answer."}, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    # only rank 0 served: one "serving" line, one port
    assert r.stderr.count("serving ") == 1


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """MLX_RANK -> pid of the ranks mlx.launch started (their process group is the launcher's)."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if os.getpgid(int(p)) != launcher_pid or int(p) == launcher_pid:
                continue
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except (OSError, ProcessLookupError):
            continue
        rank = [e for e in env if e.startswith(b"MLX_RANK=")]
        if rank and b"gptoss-mac" in cmd and b"python" in cmd.split(b"\0")[0]:
            out[int(rank[0].split(b"=")[1])] = int(p)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_mid_run_ends_the_others_with_a_clear_error(tmp_path, victim):
    folder = scripted_two_rank_checkpoint(tmp_path / "loop", "loop")  # generates until stopped
    killed = {}

    def kill_when_generating(proc, stderr):
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and "memory plan" not in stderr.read_text():
            time.sleep(0.2)
        pids = rank_pids(proc.pid)
        assert len(pids) == 2, f"the ranks did not start: {stderr.read_text()}"
        time.sleep(2)  # generating now: the prompt was already waiting, and the reply never ends
        os.kill(pids[victim], 9)
        killed["at"], killed["pids"] = time.monotonic(), pids

    r = launch(2, [GPTOSS, "chat", "--model", str(folder), "--temperature", "0", "--max-tokens", "100000"],
               timeout=600, input="Say hi\n", env=chat_env(tmp_path), on_start=kill_when_generating)
    elapsed = time.monotonic() - killed["at"]
    assert elapsed < 20, f"the surviving rank took {elapsed:.0f} s to stop"
    survivor = 1 - victim
    assert f"Node with rank {survivor} exited" in r.stderr, r.stderr[-3000:]
    # the survivor says why it stops: told by mlx.launch (SIGTERM), or it saw the lost connection first
    told = f"gptoss-mac rank {survivor}: stopped by mlx.launch: another rank exited with an error or was killed"
    saw = ("gptoss-mac rank 1: stopping: another rank of the mlx.launch group is gone" if survivor == 1 else
           "error: RuntimeError:  connection to a peer was lost")
    assert told in r.stderr or saw in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for pid in killed["pids"].values():  # nothing left behind
        assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes()
