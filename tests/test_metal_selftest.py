"""The Mac self-test's logic on Linux: the MSL emulator stands in for the GPU (correctness), a fake clock for
the timing (the emulator's speed means nothing), and real subprocesses for the crash. What only a Mac can
exercise: the Metal compiler, the real timings, and a real GPU fault."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_gptoss import kernel_gate, kernels, metal_selftest, selftest_record
from fake_mac import fake_clock, simulated_mac
from msl_emu import emulator as emu

SMALL = {"hidden": 64, "intermediate": 32, "experts": 8, "experts_per_token": 4, "tokens": (1, 4), "seed": 1,
         "rounds": 1}


@pytest.fixture
def fake_mac(monkeypatch, tmp_path):
    """A simulated Mac (tests/fake_mac.py) whose GPU is the emulator, a kernel 1.5x faster than MLX's ops by
    the self-test's clock, the small case in one layer, run in this process (the child process is tested in
    test_fake_mac.py)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with simulated_mac(kernels="emulator", case=SMALL):
        monkeypatch.setattr(metal_selftest, "ISOLATE", False)
        yield tmp_path


def stored():
    data = json.loads(selftest_record.cache_file().read_text())
    (setup,) = data
    return setup, data[setup]


def test_no_metal_gpu_means_builtin_and_no_self_test(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "on_metal_gpu", lambda: False)
    metal_selftest.clear()
    assert kernels.backend_for(1, mx.bfloat16) == "builtin"
    assert all(not r["enabled"] and "no Metal GPU" in r["detail"] for r in metal_selftest.kernel_status())
    assert not selftest_record.cache_file().exists()


def test_kernels_never_import_the_self_test():
    """Data flows one way: self-test -> kernel_gate -> kernels."""
    import ast
    import inspect

    for module in (kernels, kernel_gate):
        tree = ast.parse(inspect.getsource(module))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        assert "metal_selftest" not in imported and "selftest_record" not in imported, module.__name__
    assert kernel_gate._judge == metal_selftest.approves  # registered by importing the package


def test_correct_and_faster_turns_auto_on_and_is_remembered(fake_mac):
    assert kernels.backend_for(1, mx.float32) == "metal"
    assert kernels.backend_for(kernels.DECODE_MAX_TOKENS, mx.float32) == "metal"
    assert kernels.backend_for(kernels.DECODE_MAX_TOKENS + 1, mx.float32) == "builtin"  # prefill: gather_qmm
    assert kernels.backend_for(1, mx.float32, backend="builtin") == "builtin"
    status = metal_selftest.kernel_status([mx.float32])
    assert [(r["kernel"], r["passed"], r["enabled"], r["cached"]) for r in status] == [
        ("moe_gate_up_swiglu", True, True, False), ("moe_down", True, True, False)]
    assert status[0]["timings"] == {"T=1": {"metal_s": 1.0, "builtin_s": 1.5}, "T=4": {"metal_s": 1.0, "builtin_s": 1.5}}
    assert "(1.50x at T=1, 1.50x at T=4): used by auto" in status[1]["detail"]
    setup, records = stored()
    assert metal_selftest.code_hash() in setup and f"mlx {mx.__version__}" in setup
    assert records["moe_down/float32"]["enabled"] is True and "state" not in records["moe_down/float32"]
    runs = len(metal_selftest.measure.seen)
    metal_selftest.clear()  # a new process: the results come from the cache file, nothing is rerun
    assert all(r["cached"] and r["enabled"] for r in metal_selftest.kernel_status([mx.float32]))
    assert len(metal_selftest.measure.seen) == runs


def test_correct_but_slower_keeps_builtin_without_a_warning(fake_mac, monkeypatch):
    monkeypatch.setattr(metal_selftest, "measure", fake_clock(1.0, 1.02))  # 2% faster: inside the margin
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.backend_for(1, mx.float32) == "builtin"
    (gate_up, down) = metal_selftest.kernel_status([mx.float32])
    assert gate_up["passed"] and not gate_up["enabled"]
    assert f"not faster than MLX's built-in ops by {selftest_record.MIN_SPEEDUP:.2f}x (1.02x at T=1" in gate_up["detail"]


def test_decide_needs_correct_and_faster_at_every_size():
    fast, slow = {"metal_s": 1.0, "builtin_s": 2.0}, {"metal_s": 1.0, "builtin_s": 0.9}
    assert selftest_record.decide(True, {"T=1": fast, "T=4": fast})[0] == [1, 4]
    assert selftest_record.decide(True, {"T=1": fast, "T=4": slow})[0] == [1]
    assert selftest_record.decide(True, {"T=1": slow, "T=4": slow})[0] == []
    assert selftest_record.decide(False, {"T=1": fast})[0] == []
    assert selftest_record.decide(True, {})[0] == []
    edge = {"metal_s": 1.0, "builtin_s": selftest_record.MIN_SPEEDUP}
    assert selftest_record.decide(True, {"T=1": edge})[0] == [1]
    assert [selftest_record.covering_count([1, 4], t) for t in (1, 2, 3, 4, 5)] == [1, 4, 4, 4, None]


def test_faster_only_at_one_token_means_the_kernel_only_for_single_tokens(fake_mac, monkeypatch):
    """T = 1 and T = 2..4 run different kernel variants: each follows its own timing."""
    def clock(calls):  # T = 1 first, then T = 4, per kernel
        clock.n += 1
        return {"metal": 1.0, "builtin": 1.5 if clock.n % 2 else 0.9}

    clock.n = 0
    monkeypatch.setattr(metal_selftest, "measure", clock)
    metal_selftest.prepare(mx.float32)
    assert [kernels.backend_for(t, mx.float32) for t in (1, 2, 3, 4)] == ["metal", "builtin", "builtin", "builtin"]
    (gate_up, _) = metal_selftest.kernel_status([mx.float32])
    assert gate_up["enabled"] and "only at T=1 (1.50x at T=1, 0.90x at T=4)" in gate_up["detail"]


def test_failed_compile_warns_once_falls_back_and_is_stored(fake_mac, monkeypatch):
    def broken_compiler(**kwargs):
        def launch(**_):
            raise RuntimeError("[metal::Device] Unable to build metal library from source\nerror: use of undeclared")
        return launch

    monkeypatch.setattr(mx.fast, "metal_kernel", broken_compiler)
    kernels._built.clear()
    x = mx.ones((1, 64))
    w = mx.zeros((2, 8, 8), dtype=mx.uint32)
    s, b = mx.full((2, 8, 2), 127, dtype=mx.uint8), mx.zeros((2, 8))
    ids = mx.zeros((1, 2), dtype=mx.uint32)
    with pytest.warns(RuntimeWarning, match="failed its self-test.*Unable to build metal library"):
        out = kernels.moe_gate_up_swiglu(x, w, s, b, ids)  # auto: self-test fails -> builtin
    np.testing.assert_array_equal(np.array(out), np.array(kernels.moe_gate_up_swiglu(x, w, s, b, ids, backend="builtin")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call neither warns nor retests
        kernels.moe_gate_up_swiglu(x, w, s, b, ids)
    assert kernels.backend_for(1, mx.float32) == "builtin"
    _, records = stored()
    assert records["moe_gate_up_swiglu/float32"]["passed"] is False
    kernels._built.clear()


def test_a_wrong_kernel_fails(fake_mac, monkeypatch):
    """A kernel that compiles but computes the wrong thing (gate and up swapped) must fail its self-test."""
    original = kernels.kernel_source

    def swapped(file):
        text = original(file)
        return text.replace("gate = acc[m][2 * r];", "gate = acc[m][2 * r + 1];") if file == kernels.GATE_UP.file else text

    monkeypatch.setattr(kernels, "kernel_source", swapped)
    kernels._built.clear()
    record = metal_selftest.run(kernels.GATE_UP, mx.float32)
    kernels._built.clear()
    assert record["passed"] is False and record["enabled"] is False and "T=1: mismatch" in record["detail"]


def test_transient_failure_is_not_stored(fake_mac, monkeypatch):
    calls = []

    def out_of_memory(*args):
        calls.append(1)
        raise RuntimeError("[metal::malloc] Attempting to allocate 1073741824 bytes which is greater than the maximum "
                           "allowed buffer size: Insufficient Memory")

    monkeypatch.setattr(kernels, "_metal_down", out_of_memory)
    with pytest.warns(RuntimeWarning, match="Insufficient Memory"):
        assert metal_selftest.result(kernels.DOWN, mx.float32)["enabled"] is False
    metal_selftest.result(kernels.DOWN, mx.float32)  # the same process does not retry
    assert len(calls) == 1
    _, records = stored()
    assert "moe_down/float32" not in records  # neither the failure nor the pending record remains
    metal_selftest.clear()  # the next process tests again
    with pytest.warns(RuntimeWarning):
        metal_selftest.result(kernels.DOWN, mx.float32)
    assert len(calls) == 2


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=60)
    return p.pid


def test_pending_record_of_a_dead_process_is_a_failure(fake_mac, monkeypatch):
    key, name = metal_selftest.setup_key(), "moe_down/float32"
    selftest_record.write(key, name, {"state": "pending", "pid": dead_pid(), "started": time.time() - 5})
    monkeypatch.setattr(metal_selftest, "run", lambda *a: pytest.fail("a crashed test must not run again"))
    with pytest.warns(RuntimeWarning, match="did not finish"):
        record = metal_selftest.result(kernels.DOWN, mx.float32)
    assert record["passed"] is False and record["crashed"] is True
    assert stored()[1][name]["crashed"] is True


def test_pending_record_of_a_live_process_means_builtin_for_now(fake_mac, monkeypatch):
    key, name = metal_selftest.setup_key(), "moe_down/float32"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        selftest_record.write(key, name, {"state": "pending", "pid": sleeper.pid, "started": time.time()})
        monkeypatch.setattr(metal_selftest, "run", lambda *a: pytest.fail("another process is testing it"))
        monkeypatch.setattr(metal_selftest, "TIMEOUT_S", 0.5)  # waited this long for its record
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            record = metal_selftest.result(kernels.DOWN, mx.float32)
        assert record["enabled"] is False and f"process {sleeper.pid}" in record["detail"]
        assert stored()[1][name]["state"] == "pending"  # left for its owner to finish
    finally:
        sleeper.kill()
        sleeper.wait(timeout=60)


CRASHING_CHILD = textwrap.dedent("""
    import os, sys
    import mlx.core as mx
    from mlx_gptoss import kernels, metal_selftest
    kernels.on_metal_gpu = lambda: True
    metal_selftest.CASE = dict(hidden=64, intermediate=32, experts=8, experts_per_token=4, tokens=(1,), seed=1)
    metal_selftest.ISOLATE = False  # the test runs in this process, which a GPU fault kills
    kernels._metal_down = lambda *a: os.abort()  # what a GPU fault does on MLX < 0.32: the process dies
    metal_selftest.result(kernels.DOWN, mx.float32)
    sys.exit("not reached")
""")


def test_a_crash_during_the_self_test_is_recorded_as_a_failure(fake_mac):
    env = dict(os.environ, XDG_CACHE_HOME=str(fake_mac))
    p = subprocess.run([sys.executable, "-c", CRASHING_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode < 0 or p.returncode == 134, p.stderr  # killed by SIGABRT
    _, records = stored()
    assert records["moe_down/float32"]["state"] == "pending"
    with pytest.warns(RuntimeWarning, match="did not finish"):
        assert kernels.backend_for(1, mx.float32) == "builtin"  # the next start: recorded, not retried
    assert stored()[1]["moe_down/float32"]["crashed"] is True


def test_cache_key_names_device_os_mlx_and_code(monkeypatch, tmp_path):
    base = metal_selftest.compute_setup_key()
    monkeypatch.setattr(mx, "__version__", "0.99.0")
    assert metal_selftest.compute_setup_key() != base and "mlx 0.99.0" in metal_selftest.compute_setup_key()
    monkeypatch.undo()
    monkeypatch.setattr(metal_selftest.platform, "platform", lambda: "Another-OS-1.0")
    assert "Another-OS-1.0" in metal_selftest.compute_setup_key()
    monkeypatch.undo()
    original = kernels.kernel_source
    monkeypatch.setattr(kernels, "kernel_source", lambda f: original(f) + ("\n" if f == "mxfp4.h" else ""))
    assert metal_selftest.compute_setup_key() != base  # a kernel source
    monkeypatch.undo()
    monkeypatch.setitem(kernels.DOWN.tiles, "ROWS", 16)
    assert metal_selftest.compute_setup_key() != base  # a tile
    monkeypatch.undo()
    edited = tmp_path / "metal_selftest.py"
    edited.write_text(open(metal_selftest.__file__).read().replace("WARMUP, REPS = 2, 15", "WARMUP, REPS = 2, 9"))
    monkeypatch.setattr(metal_selftest, "__file__", str(edited))
    assert metal_selftest.compute_setup_key() != base  # the test definition
    monkeypatch.undo()
    assert metal_selftest.compute_setup_key() == base


def test_setup_key_is_computed_once_per_process(monkeypatch):
    metal_selftest.clear()
    calls = []
    real = metal_selftest.compute_setup_key
    monkeypatch.setattr(metal_selftest, "compute_setup_key", lambda: calls.append(1) or real())
    assert metal_selftest.setup_key() == metal_selftest.setup_key() == real()
    assert len(calls) == 1
    metal_selftest.clear()


def test_case_is_what_decode_runs():
    """gpt-oss's shapes and k (both models: hidden 2880, expert intermediate 2880, 4 experts per token), at
    T = 1 and the largest T auto gives the kernels, in every activation dtype."""
    assert metal_selftest.CASE["hidden"] == metal_selftest.CASE["intermediate"] == 2880
    assert metal_selftest.CASE["experts_per_token"] == 4
    assert metal_selftest.CASE["tokens"] == (1, kernels.DECODE_MAX_TOKENS)
    assert set(metal_selftest.DTYPES) == set(kernels.ACTIVATION_DTYPES)


@pytest.mark.slow
def test_full_size_case_passes_in_the_emulator(monkeypatch, tmp_path):
    """The self-test's real case (H = I = 2880) at T = 1 in float32 through the emulated kernels."""
    monkeypatch.setattr(mx.fast, "metal_kernel", emu.metal_kernel)
    monkeypatch.setattr(metal_selftest, "measure", fake_clock(1.0, 2.0))
    for spec in kernels.SPECS:
        record = metal_selftest.run(spec, mx.float32, dict(metal_selftest.CASE, tokens=(1,)))
        assert record["passed"] and record["enabled"] and record["error"] < 1e-5, record


def test_benchmark_script_tables_every_kernel_dtype_and_size(fake_mac):
    """benchmarks/metal_kernels.py (a Mac's side-by-side table), with the emulator and the fake clock."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "metal_kernels.py"
    spec = importlib.util.spec_from_file_location("metal_kernels_bench", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = [line for line in script.table().splitlines() if line.startswith("| moe_")]
    assert len(rows) == 2 * 3 * 2  # kernels x dtypes x T
    assert rows[0].startswith("| moe_gate_up_swiglu | float32 | 1 | yes (") and rows[0].endswith("| 1000.000 | 1500.000 | 1.50x | yes |")  # ms


def test_claim_stores_pending_once_and_ignores_a_damaged_record(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    selftest_record.write("setup", "k/float32", {"garbage": 1})  # neither a result nor pending: test again
    assert selftest_record.claim("setup", "k/float32") is None
    second = selftest_record.claim("setup", "k/float32")  # what a second process starting now sees
    assert second["state"] == "pending" and second["pid"] == os.getpid()
    selftest_record.cache_file().write_text("{not json")  # a corrupt file is a missing one
    assert selftest_record.claim("setup", "k/float32") is None
