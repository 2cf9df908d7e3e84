"""`gptoss-mac bench` on the tiny checkpoint: valid JSON with every field, CSV, and one clear error per bad option.
Timings are not asserted (the machine is shared); their consistency is."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from mlx_gptoss import bench
from mlx_gptoss.cli.app import app
from mlx_gptoss.errors import GptOssError

SMALL = ["-p", "16,24", "-n", "6", "-d", "0,10", "-r", "2", "--bandwidth-bytes", str(1 << 24)]


def invoke(*args):
    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    if r.exception is not None and not isinstance(r.exception, (SystemExit, GptOssError)):
        raise r.exception
    return r


@pytest.fixture(scope="module")
def result(tiny_ckpt):
    r = invoke("bench", "--model", str(tiny_ckpt), *SMALL, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_json_has_every_field(result, tiny_ckpt, tiny_cfg):
    assert set(result) == {"machine", "model", "load_seconds", "peak_memory_load_bytes", "peak_memory_bytes",
                           "bandwidth", "results", "comparison", "notes", "roofline", "offload", "distributed", "settings"}
    assert result["distributed"] is None  # one process (see test_distributed.py for mlx.launch)
    m = result["machine"]
    assert set(m) == {"chip", "cores", "memory_bytes", "os", "python", "mlx_version", "mlx_backend", "blas"}
    assert m["mlx_version"] == mx.__version__ and m["mlx_backend"] in ("cpu", "metal")
    assert m["memory_bytes"] > 2**30 and m["chip"] and m["os"]
    mod = result["model"]
    assert mod["path"] == str(tiny_ckpt) and mod["layers"] == tiny_cfg["num_hidden_layers"]
    assert mod["dtype"] in ("float32", "bfloat16") and mod["kernels_requested"] == "auto"
    assert mod["kernels"].startswith(("builtin", "metal"))
    if not mx.metal.is_available():
        assert mod["kernels"] == "builtin"
    assert result["load_seconds"] > 0 and result["peak_memory_bytes"] >= mod["weight_bytes"] > 0
    bw = result["bandwidth"]
    assert bw["best_read"] == max(bw["numpy_read"], bw["mlx_read"]) > 0 and bw["numpy_copy"] > 0

    tests = [r["test"] for r in result["results"]]
    assert tests == ["pp16", "pp24", "pp16 @ d10", "pp24 @ d10", "tg6", "tg6 @ d10"]
    for r in result["results"]:
        assert r["repetitions"] == 2 and len(r["samples"]) == 2
        n = r["n_prompt"] or r["n_gen"]
        assert math.isclose(r["tokens_per_s"], sum(r["samples"]) / 2)
        assert r["std"] >= 0 and r["seconds"] > 0
        assert all(s > 0 for s in r["samples"])
        assert n / max(r["samples"]) <= r["seconds"] * 1.0001  # mean time >= the fastest run's
    assert result["settings"]["repetitions"] == 2 and result["settings"]["prompt"] == "random tokens"


def test_roofline_counts_the_bytes_a_token_reads(result, tiny_cfg):
    """Decode reads k of E experts, all attention and unembedding weights, and the KV cache."""
    roof = {r["test"]: r for r in result["roofline"]}
    assert set(roof) == {"tg6", "tg6 @ d10"}
    H, I, E, k, V = (tiny_cfg[n] for n in ("hidden_size", "intermediate_size", "num_local_experts",
                                           "num_experts_per_tok", "vocab_size"))
    act = 4 if result["model"]["dtype"] == "float32" else 2
    parts = roof["tg6"]["bytes_by_part"]
    expert = 2 * I * H * 17 // 32 + 2 * I * act + H * I * 17 // 32 + H * act  # mxfp4 + scales + biases
    assert parts["experts"] == tiny_cfg["num_hidden_layers"] * k * expert
    assert parts["unembedding"] == V * H * act
    kv_token = 2 * tiny_cfg["num_key_value_heads"] * tiny_cfg["head_dim"] * act
    deeper = roof["tg6 @ d10"]["bytes_by_part"]["kv"] - parts["kv"]
    n_full = sum(t == "full_attention" for t in tiny_cfg["layer_types"])
    assert deeper == n_full * 10 * kv_token + (len(tiny_cfg["layer_types"]) - n_full) * kv_token * (
        min(13, tiny_cfg["sliding_window"]) - min(3, tiny_cfg["sliding_window"]))
    for r in roof.values():
        tps = next(x["tokens_per_s"] for x in result["results"] if x["test"] == r["test"])
        assert math.isclose(r["achieved_gbps"], r["bytes_per_token"] * tps / 1e9)
        assert math.isclose(r["percent_of_bandwidth"], 100 * r["achieved_gbps"] / result["bandwidth"]["best_read"])


def test_csv_and_table(tiny_ckpt):
    r = invoke("bench", "--model", str(tiny_ckpt), "-p", "8", "-n", "0", "-r", "1",
               "--bandwidth-bytes", str(1 << 22), "--csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [x["test"] for x in rows] == ["pp8"] and float(rows[0]["tokens_per_s"]) > 0
    assert rows[0]["mlx_version"] == mx.__version__
    r = invoke("bench", "--model", str(tiny_ckpt), "-p", "0", "-n", "4", "-r", "1", "--kernels", "builtin",
               "--bandwidth-bytes", str(1 << 22))
    assert r.exit_code == 0, r.output
    assert "tg4" in r.output and "t/s" in r.output and "roofline tg4" in r.output and "MLX " in r.output


@pytest.mark.parametrize("args,message", [
    (["-p", "512,abc"], "--n-prompt '512,abc': expected whole numbers"),
    (["-n", "-5"], "--n-gen -5: must be at least 0"),
    (["-d", "x"], "--depth 'x'"),
    (["-r", "0"], "'--repetitions' / '-r': must be a whole number of at least 1, like 5; got 0"),
    (["--kernels", "fast"], "--kernels 'fast': use one of auto, metal, builtin"),
    (["--kernels", "builtin,fast"], "--kernels 'builtin,fast': use one of auto, metal, builtin"),
    (["--kernels", ","], "--kernels ',': use one of"),
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["--json", "--csv"], "--json and --csv: choose one"),
    (["--memory", "lots"], "'--memory': not a size: write it like 16GB, 24GiB or 64G; got 'lots'"),
    (["--dtype", "int8"], "'--dtype': must be bfloat16, float16 or float32; got 'int8'"),
])
def test_bad_options(tiny_ckpt, args, message):
    r = invoke("bench", "--model", str(tiny_ckpt), *args)
    # an option's own value is click's usage error (main() prints it as one line, exit 2); a combination of
    # options is a GptOssError (one line, exit 1)
    said = str(r.exception) if isinstance(r.exception, GptOssError) else " ".join(r.output.split())
    assert r.exit_code == (1 if isinstance(r.exception, GptOssError) else 2) and message in said, (r.exception, r.output)


def test_context_beyond_the_plan_and_no_traceback(tiny_ckpt):
    if not mx.metal.is_available():
        r = invoke("bench", "--model", str(tiny_ckpt), "--kernels", "metal")
        assert r.exit_code == 2 and "--kernels metal: this machine has no Metal GPU" in r.output
    with pytest.raises(GptOssError, match="more than the planned context of 64"):
        bench.run(str(tiny_ckpt), n_prompt="60", n_gen="0", depth="8", repetitions=1, memory="8GB",
                  bandwidth_bytes=1 << 20, ctx=64)
    p = subprocess.run([sys.executable, "-m", "mlx_gptoss.cli.app", "bench", "--model", str(tiny_ckpt), "-r", "x"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "repetitions" in p.stderr


def test_several_kernels_in_one_invocation(tiny_ckpt):
    """--kernels metal,builtin: both run and the ratio is printed; without Metal, one line says metal did not run."""
    r = invoke("bench", "--model", str(tiny_ckpt), "-p", "8", "-n", "3", "-r", "1", "--kernels", "metal,builtin,builtin",
               "--bandwidth-bytes", str(1 << 22), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    if mx.metal.is_available():
        assert [x["kernels"] for x in out["results"]] == ["metal", "metal", "builtin", "builtin"]
        assert [c["test"] for c in out["comparison"]] == ["pp8", "tg3"]
    else:
        assert [x["kernels"] for x in out["results"]] == ["builtin", "builtin"]  # listed once, run once
        assert out["notes"] == [bench.METAL_UNAVAILABLE] and out["comparison"] == []
        table = invoke("bench", "--model", str(tiny_ckpt), "-p", "0", "-n", "2", "-r", "1", "--kernels",
                       "metal,builtin", "--bandwidth-bytes", str(1 << 22))
        assert table.exit_code == 0 and "metal: not run, this machine has no Metal GPU" in table.output


def test_comparison_is_metal_over_builtin_per_test():
    def res(test, kernels, tps):
        return bench.TestResult(test, 8, 0, 0, 1, tps, 0.0, [tps], 1.0, kernels=kernels)

    got = bench.compare([res("pp8", "metal", 30.0), res("tg4", "metal", 12.0), res("pp8", "builtin", 20.0),
                         res("tg4", "builtin", 16.0), res("tg9", "builtin", 5.0)])
    assert got == [{"test": "pp8", "metal_tokens_per_s": 30.0, "builtin_tokens_per_s": 20.0, "ratio": 1.5},
                   {"test": "tg4", "metal_tokens_per_s": 12.0, "builtin_tokens_per_s": 16.0, "ratio": 0.75}]
