"""The shipped Metal kernels, run by the MSL emulator (tests/msl_emu) in place of mx.fast.metal_kernel, against
MLX's own CPU mxfp4 ops: the decode of every E2M1 code and E8M0 scale byte bit for bit against mx.dequantize,
the fused kernels against mx.gather_qmm on ragged shapes in every dtype and thread order, one kernel variant
for every T, the wrapper's input checks, and the whole tiny model with its MoE forced onto the kernels.
The self-test's logic is in test_metal_selftest.py."""

from __future__ import annotations

import re
import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss import kernels
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
    with pytest.raises(ValueError, match=r"x must have 2 dimensions, got float32\(1, 1, 64\)"):
        kernels.moe_gate_up_swiglu(mx.zeros((1, 1, 64)), w, s, b, ids, backend="metal")
    with pytest.raises(ValueError, match="expert_ids must be integer"):
        kernels.moe_gate_up_swiglu(mx.zeros((2, 64)), w, s, b, ids, backend="metal")
    wd, sd, bd = mxfp4(2, 64, 32, seed=13)
    weights = mx.full((1, 2), 0.5)
    with pytest.raises(ValueError, match=r"h \[T, k, I\] must have k = 2"):
        kernels.moe_down(mx.zeros((1, 3, 32)), wd, sd, bd, ids, weights, backend="metal")
    with pytest.raises(ValueError, match="h must have 3 dimensions"):
        kernels.moe_down(mx.zeros((1, 32)), wd, sd, bd, ids, weights, backend="metal")
    with pytest.raises(ValueError, match="expert_weights must match expert_ids"):
        kernels.moe_down(mx.zeros((1, 2, 32)), wd, sd, bd, ids, weights[:, :1], backend="metal")
    with pytest.raises(ValueError, match="expected w \\[E, rows, cols/8\\]"):
        kernels.moe_down(mx.zeros((1, 2, 32)), wd[0], sd, bd, ids, weights, backend="metal")


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


# ---- the decode, exhaustively; one kernel variant for every T; bad expert ids -------------------------------

@pytest.mark.parametrize("cxx", COMPILERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_of_every_code_and_scale_matches_mlx_dequantize(emulated, dtype, cxx):
    """Row n has scale byte n (all 256, 0 and 255 included) and codes 0..15 in its first 16 values; token t
    is one-hot at value t, so out[t, n] is exactly the decode of code t at scale n, as the kernel computes it
    (float32 accumulation, then one rounding to dtype). MLX's own dequantization must give the same value:
    bit for bit, except that a sum cannot keep the sign of -0 (code 8)."""
    codes = np.zeros((256, 32), dtype=np.uint8)
    codes[:, :16] = np.arange(16)
    words = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.uint32).reshape(1, 256, 4)
    w, s = mx.array(words), mx.array(np.arange(256, dtype=np.uint8).reshape(1, 256, 1))
    h = mx.array(np.eye(16, 32, dtype=np.float32)[:, None, :]).astype(dtype)  # [T=16, k=1, I=32]
    ids = mx.zeros((16, 1), dtype=mx.uint32)
    with emu.compiler(cxx):
        got = kernels.moe_down(h, w, s, mx.zeros((1, 256), dtype=dtype), ids, mx.ones((16, 1)), backend="metal")
    want32 = mx.dequantize(w[0], s[0], group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)[:, :16].T
    # MLX's values for the two odd scale bytes: 0 is 2^-127 (not 0), 255 is inf (so code 0 gives NaN)
    assert np.array(want32)[1, 0] == np.float32(2.0**-128) and np.isinf(np.array(want32)[1, 255])
    assert np.isnan(np.array(want32)[0, 255])
    want = np.array(want32.astype(dtype).astype(mx.float32))
    got = np.array(got.astype(mx.float32))
    np.testing.assert_array_equal(got, want)  # NaN == NaN and -0 == 0 here; every other bit must agree
    assert np.array_equal(np.signbit(got[1:8]), np.signbit(want[1:8]))


def test_the_self_test_runs_every_kernel_variant_decode_runs(emulated, monkeypatch):
    """MLX generates one source text per address-space layout: at T = 1 the 4 ids and router weights go to
    `constant` memory, at T = 2..DECODE_MAX_TOKENS to `device`. The self-test's token counts must produce
    every text that decode's token counts do (nothing is padded to hide the difference)."""
    from mlx_gptoss import metal_selftest

    texts = {}
    real_generate = emu.generate

    def record(name, *args, **kwargs):
        kname, text = real_generate(name, *args, **kwargs)
        texts.setdefault(T, set()).add(text)
        return kname, text

    monkeypatch.setattr(emu, "generate", record)
    E, H, I = 4, 64, 32
    wg, sg, bg = mxfp4(E, 2 * I, H, seed=20)
    wd, sd, bd = mxfp4(E, H, I, seed=21)
    for T in range(1, kernels.DECODE_MAX_TOKENS + 1):
        x = mx.ones((T, H))
        ids = mx.array(np.arange(4 * T).reshape(T, 4) % E, dtype=mx.uint32)
        h = kernels.moe_gate_up_swiglu(x, wg, sg, bg, ids, backend="metal")
        kernels.moe_down(h, wd, sd, bd, ids, mx.full((T, 4), 0.25), backend="metal")
    decode = set().union(*texts.values())
    tested = set().union(*(texts[T] for T in metal_selftest.CASE["tokens"]))
    assert decode == tested and len(decode) == 4  # 2 kernels x {constant, device} ids
    assert all(re.search(r"const constant uint32_t\* ids \[\[buffer", t) for t in texts[1])
    assert all(re.search(r"const device uint32_t\* ids \[\[buffer", t) for t in texts[2])


def test_expert_id_out_of_range_gives_nan_not_a_bad_read(emulated):
    E, H, I = 3, 64, 32
    wg, sg, bg = mxfp4(E, 2 * I, H, seed=22)
    wd, sd, bd = mxfp4(E, H, I, seed=23)
    ids = mx.array([[0, 7]], dtype=mx.uint32)  # 7 >= E: the guard pages would catch any read past the weights
    h = kernels.moe_gate_up_swiglu(mx.ones((1, H)), wg, sg, bg, ids, backend="metal")
    assert not np.isnan(np.array(h[0, 0])).any() and np.isnan(np.array(h[0, 1])).all()
    y = kernels.moe_down(mx.ones((1, 2, I)), wd, sd, bd, ids, mx.full((1, 2), 0.5), backend="metal")
    assert np.isnan(np.array(y)).all()


@pytest.mark.parametrize("cxx", COMPILERS)
def test_kernels_need_only_element_alignment(emulated, cxx):
    """Every buffer placed only as aligned as its element type (a uint32 array at 4 mod 16, as a sliced MLX
    array may be): the 16-byte weight loads are packed_uint4, so nothing traps and the results hold."""
    E, H, I = 3, 96, 64
    wg, sg, bg = mxfp4(E, 2 * I, H, seed=24)
    wd, sd, bd = mxfp4(E, H, I, seed=25)
    x = mx.array(np.random.default_rng(26).standard_normal((2, H)).astype(np.float32))
    ids = mx.array([[2, 0, 1, 2], [1, 1, 0, 2]], dtype=mx.uint32)
    weights = mx.full((2, 4), 0.25)
    with emu.compiler(cxx), emu.alignment("element"):
        h = kernels.moe_gate_up_swiglu(x, wg, sg, bg, ids, backend="metal")
        y = kernels.moe_down(h, wd, sd, bd, ids, weights, backend="metal")
    assert rel_err(h, kernels.moe_gate_up_swiglu(x, wg, sg, bg, ids, backend="builtin")) <= TOL[mx.float32]
    assert rel_err(y, kernels.moe_down(h, wd, sd, bd, ids, weights, backend="builtin")) <= TOL[mx.float32]


@pytest.mark.parametrize("cxx", COMPILERS)
def test_sharing_an_experts_weights_between_tokens_changes_no_bit(emulated, monkeypatch, cxx):
    """At T = 2..4 pairs with the same expert are computed together, each weight block read once (SHARE);
    IDS repeat experts across tokens and within one (expert 1 four times: one group of GROUP = 4). The
    results must be the unshared kernels' bit for bit, in any thread order."""
    E, H, I = 5, 96, 90  # gate_up: 90 outputs and down: 100 rows leave the last tile partial
    wg, sg, bg = mxfp4(E, 2 * I, H, seed=30)
    wd, sd, bd = mxfp4(E, 100, 96, seed=31)
    rng = np.random.default_rng(32)
    x = mx.array(rng.standard_normal((len(IDS), H)).astype(np.float32))
    h = mx.array(rng.standard_normal((len(IDS), 4, 96)).astype(np.float32))
    ids = mx.array(IDS, dtype=mx.uint32)
    weights = mx.softmax(mx.array(rng.standard_normal((len(IDS), 4)).astype(np.float32)), axis=-1)

    def run():
        return (np.array(kernels.moe_gate_up_swiglu(x, wg, sg, bg, ids, backend="metal")),
                np.array(kernels.moe_down(h, wd, sd, bd, ids, weights, backend="metal")))

    with emu.compiler(cxx):
        with emu.thread_order("random", 5):
            shared = run()
        monkeypatch.setattr(kernels, "SHARE_TOKENS", 0)
        unshared = run()
    np.testing.assert_array_equal(shared[0], unshared[0])
    np.testing.assert_array_equal(shared[1], unshared[1])
    assert rel_err(mx.array(shared[0]), kernels.moe_gate_up_swiglu(x, wg, sg, bg, ids, backend="builtin")) \
        <= TOL[mx.float32]
    assert rel_err(mx.array(shared[1]), kernels.moe_down(h, wd, sd, bd, ids, weights, backend="builtin")) \
        <= TOL[mx.float32]
