"""The shipped Metal kernels, run by the MSL emulator (tests/msl_emu) in place of mx.fast.metal_kernel, against
MLX's own CPU mxfp4 ops (mx.gather_qmm via the builtin backend); plus the backend choice and the Mac self-test
logic, and the whole tiny model with its MoE forced onto the metal backend."""

from __future__ import annotations

import json
import warnings

import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss import kernels, metal_selftest
from msl_emu import emulator as emu

COMPILERS = emu.available_compilers()
DTYPES = [mx.float32, mx.bfloat16, mx.float16]
# max |kernel - float32 reference| / max |reference|: float32 accumulation, one rounding to the output type
TOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}
ORDERS = [("forward", 0), ("reverse", 0), ("random", 3)]
# Repeated ids in a row, one token using one expert four times.
IDS = [[0, 2, 2, 4], [1, 1, 1, 1], [3, 0, 4, 2]]


@pytest.fixture
def emulated(monkeypatch):
    """mx.fast.metal_kernel replaced by the emulator (the kernels wrapper looks it up at build time)."""
    monkeypatch.setattr(mx.fast, "metal_kernel", emu.metal_kernel)
    return emu


def mxfp4(E, rows, cols, seed):
    """Random MXFP4 weights in MLX packing: every E2M1 code, E8M0 scales 2^-9..2^-2."""
    rng = np.random.default_rng(seed)
    w = mx.array(rng.integers(0, 2**32, (E, rows, cols // 8), dtype=np.uint64).astype(np.uint32))
    s = mx.array(rng.integers(118, 126, (E, rows, cols // 32)).astype(np.uint8))
    b = mx.array(rng.standard_normal((E, rows)).astype(np.float32))
    return w, s, b


def rel_err(got, want):
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def f32(a):
    return a.astype(mx.float32)


# H = 544 and I = 96 are multiples of the 32-value MXFP4 block but not of the kernels' 512-input step;
# I = 90 outputs and H = 100 rows leave the last simdgroup's tile partly empty.
@pytest.mark.parametrize("cxx", COMPILERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gate_up_swiglu_matches_gather_qmm(emulated, dtype, cxx):
    E, H, I = 5, 544, 90
    w, s, b = mxfp4(E, 2 * I, H, seed=1)
    x = mx.array(np.random.default_rng(2).standard_normal((len(IDS), H)).astype(np.float32)).astype(dtype)
    ids = mx.array(IDS, dtype=mx.uint32)
    want = kernels.moe_gate_up_swiglu(f32(x), w, s, b.astype(dtype).astype(mx.float32), ids, backend="builtin")
    with emu.compiler(cxx):
        got = kernels.moe_gate_up_swiglu(x, w, s, b.astype(dtype), ids, backend="metal")
    assert got.dtype == dtype and got.shape == (3, 4, I)
    assert rel_err(got, want) <= TOL[dtype]
    assert np.abs(np.array(f32(want))).max() > 1  # the clamp at +-7 and the SwiGLU are exercised
    assert (np.array(f32(want)) < 0).any()


@pytest.mark.parametrize("cxx", COMPILERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_down_weighted_sum_matches_gather_qmm(emulated, dtype, cxx):
    E, H, I = 5, 100, 96
    w, s, b = mxfp4(E, H, I, seed=3)
    rng = np.random.default_rng(4)
    h = mx.array(rng.standard_normal((len(IDS), 4, I)).astype(np.float32)).astype(dtype)
    weights = mx.softmax(mx.array(rng.standard_normal((len(IDS), 4)).astype(np.float32)), axis=-1).astype(dtype)
    ids = mx.array(IDS, dtype=mx.int32)  # the wrapper accepts int32 or uint32 ids
    want = kernels.moe_down(f32(h), w, s, f32(b.astype(dtype)), ids, f32(weights), backend="builtin")
    with emu.compiler(cxx):
        got = kernels.moe_down(h, w, s, b.astype(dtype), ids, weights, backend="metal")
    assert got.dtype == dtype and got.shape == (3, H)
    assert rel_err(got, want) <= TOL[dtype]


def test_every_thread_order_gives_identical_bits(emulated):
    """No result may depend on scheduling: the sum over experts has a fixed order, no atomics."""
    E, H, I = 4, 288, 64
    wg, sg, bg = mxfp4(E, 2 * I, H, seed=5)
    wd, sd, bd = mxfp4(E, H, I, seed=6)
    x = mx.array(np.random.default_rng(7).standard_normal((2, H)).astype(np.float32))
    ids = mx.array([[3, 1, 1, 0], [2, 2, 0, 1]], dtype=mx.uint32)
    weights = mx.softmax(mx.array([[0.1, 0.5, -1.0, 2.0], [0.0, 0.3, 0.2, -0.4]]), axis=-1)
    results = []
    for order in ORDERS:
        with emu.thread_order(*order):
            h = kernels.moe_gate_up_swiglu(x, wg, sg, bg, ids, backend="metal")
            y = kernels.moe_down(h, wd, sd, bd, ids, weights, backend="metal")
        results.append((np.array(h), np.array(y)))
    for h, y in results[1:]:
        np.testing.assert_array_equal(h, results[0][0])
        np.testing.assert_array_equal(y, results[0][1])
    want_h = kernels.moe_gate_up_swiglu(x, wg, sg, bg, ids, backend="builtin")
    assert rel_err(mx.array(results[0][0]), want_h) <= TOL[mx.float32]
    want_y = kernels.moe_down(mx.array(results[0][0]), wd, sd, bd, ids, weights, backend="builtin")
    assert rel_err(mx.array(results[0][1]), want_y) <= TOL[mx.float32]


def test_single_token_and_empty_batch(emulated):
    E, H, I = 3, 64, 32
    wg, sg, bg = mxfp4(E, 2 * I, H, seed=8)
    wd, sd, bd = mxfp4(E, H, I, seed=9)
    x = mx.array(np.random.default_rng(10).standard_normal((1, H)).astype(np.float32))
    ids = mx.array([[2, 0]], dtype=mx.uint32)  # 2 ids: the kernel gets them in constant memory
    weights = mx.array([[0.75, 0.25]])
    h = kernels.moe_gate_up_swiglu(x, wg, sg, bg, ids, backend="metal")
    assert rel_err(h, kernels.moe_gate_up_swiglu(x, wg, sg, bg, ids, backend="builtin")) <= TOL[mx.float32]
    y = kernels.moe_down(h, wd, sd, bd, ids, weights, backend="metal")
    assert rel_err(y, kernels.moe_down(h, wd, sd, bd, ids, weights, backend="builtin")) <= TOL[mx.float32]
    empty = kernels.moe_gate_up_swiglu(x[:0], wg, sg, bg, ids[:0], backend="metal")
    assert empty.shape == (0, 2, I)


def test_metal_backend_rejects_bad_input_in_one_sentence(emulated):
    w, s, b = mxfp4(2, 8, 64, seed=11)
    ids = mx.zeros((1, 2), dtype=mx.uint32)
    with pytest.raises(ValueError, match="expected mxfp4 weights"):
        kernels.moe_gate_up_swiglu(mx.zeros((1, 96)), w, s, b, ids, backend="metal")
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        kernels.moe_gate_up_swiglu(mx.zeros((1, 64), dtype=mx.int32), w, s, b, ids, backend="metal")
    with pytest.raises(ValueError, match="backend must be"):
        kernels.moe_gate_up_swiglu(mx.zeros((1, 64)), w, s, b, ids, backend="cuda")


def test_model_on_metal_backend_matches_builtin(emulated, tiny_ckpt, monkeypatch):
    """The whole tiny model, MoE forced onto the (emulated) Metal kernels: prefill and cached decode."""
    launches = []

    def counting_metal_kernel(**kwargs):
        run = emu.metal_kernel(**kwargs)
        return lambda **call: launches.append(kwargs["name"]) or run(**call)

    monkeypatch.setattr(mx.fast, "metal_kernel", counting_metal_kernel)
    kernels._built.clear()
    gpt = mlx_gptoss.load(tiny_ckpt, dtype=mx.float32)
    tokens = mx.array([[5, 17, 300, 2, 99, 411]], dtype=mx.int32)

    def logits(backend):
        gpt.model.set_moe_backend(backend)
        full = gpt.model(tokens)
        cache = gpt.model.make_cache()
        gpt.model(tokens[:, :-1], cache=cache)
        step = gpt.model(tokens[:, -1:], cache=cache)  # one decode token: T = 1
        return np.array(full), np.array(step)

    builtin_full, builtin_step = logits("builtin")
    assert launches == []
    metal_full, metal_step = logits("metal")
    layers = len(gpt.model.model.layers)
    assert launches.count("gptoss_moe_gate_up_swiglu") == launches.count("gptoss_moe_down") == 3 * layers
    np.testing.assert_allclose(metal_full, builtin_full, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(metal_step, builtin_step, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(metal_step[:, -1], metal_full[:, -1], rtol=1e-4, atol=1e-4)
    gpt.model.set_moe_backend("auto")
    kernels._built.clear()


# ---- backend choice and the Mac self-test (its logic, with the emulator standing in for the GPU) -------------

def test_no_metal_gpu_means_builtin_and_no_self_test(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "on_metal_gpu", lambda: False)
    metal_selftest.clear()
    assert kernels.backend_for(1, mx.bfloat16) == "builtin"
    assert all(not r["passed"] and "no Metal GPU" in r["detail"] for r in metal_selftest.kernel_status())
    assert not metal_selftest.cache_file().exists()


@pytest.fixture
def fake_mac(emulated, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "on_metal_gpu", lambda: True)
    metal_selftest.clear()
    yield tmp_path
    metal_selftest.clear()


def test_auto_uses_metal_only_for_decode_after_a_passing_self_test(fake_mac):
    assert kernels.backend_for(1, mx.float32) == "metal"
    assert kernels.backend_for(kernels.DECODE_MAX_TOKENS + 1, mx.float32) == "builtin"  # prefill: gather_qmm
    assert kernels.backend_for(1, mx.float32, backend="builtin") == "builtin"
    status = metal_selftest.kernel_status([mx.float32])
    assert [(r["kernel"], r["passed"], r["cached"]) for r in status] == [
        ("moe_gate_up_swiglu", True, False), ("moe_down", True, False)]
    saved = json.loads(metal_selftest.cache_file().read_text())
    (setup,) = saved
    assert kernels.source_hash() in setup and mx.__version__ in setup
    assert saved[setup]["moe_down/float32"]["passed"] is True
    metal_selftest.clear()  # a new process: the results come from the cache file, nothing is rerun
    assert all(r["cached"] for r in metal_selftest.kernel_status([mx.float32]))
    doctor_view = kernels.self_test()  # what `gptoss-mac doctor` calls
    assert doctor_view["moe_down (bfloat16)"][0] is True


def test_failed_self_test_warns_once_and_falls_back(fake_mac, monkeypatch):
    def broken_compiler(**kwargs):
        def launch(**_):
            raise RuntimeError("[metal::Device] Unable to build metal library from source\nerror: use of undeclared")
        return launch

    monkeypatch.setattr(mx.fast, "metal_kernel", broken_compiler)
    x = mx.ones((1, 64))
    w, s, b = mxfp4(2, 8, 64, seed=12)
    ids = mx.zeros((1, 2), dtype=mx.uint32)
    with pytest.warns(RuntimeWarning, match="failed its self-test.*Unable to build metal library"):
        out = kernels.moe_gate_up_swiglu(x, w, s, b, ids)  # auto: self-test fails -> builtin
    want = kernels.moe_gate_up_swiglu(x, w, s, b, ids, backend="builtin")
    np.testing.assert_array_equal(np.array(out), np.array(want))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call neither warns nor retests
        kernels.moe_gate_up_swiglu(x, w, s, b, ids)
    assert kernels.backend_for(1, mx.float32) == "builtin"
    record = json.loads(metal_selftest.cache_file().read_text())
    assert next(iter(record.values()))["moe_gate_up_swiglu/float32"]["passed"] is False


def test_self_test_catches_a_wrong_kernel(fake_mac, monkeypatch):
    """A kernel that compiles but computes the wrong thing (gate and up swapped) must fail its self-test."""
    original = kernels.kernel_source

    def swapped(file):
        text = original(file)
        return text.replace("gate = acc[2 * r];", "gate = acc[2 * r + 1];") if file == kernels.GATE_UP.file else text

    monkeypatch.setattr(kernels, "kernel_source", swapped)
    kernels._built.clear()
    record = metal_selftest.run(kernels.GATE_UP, mx.float32)
    kernels._built.clear()
    assert record["passed"] is False and "mismatch" in record["detail"]
