"""The two MoE expert operations the model calls, behind one contract with interchangeable backends.

    moe_gate_up_swiglu(x [T, H], w, scales, bias, expert_ids [T, k]) -> [T, k, I]
        MXFP4 gate_up matmul (rows interleaved gate, up, gate, up, ... as in the checkpoint) + bias + clamped SwiGLU.
    moe_down(h [T, k, I], w, scales, bias, expert_ids, expert_weights [T, k]) -> [T, H]
        MXFP4 down matmul + bias, then the router-weighted sum over the k experts.

w is MLX's mxfp4 packing (uint32 [E, rows, cols/8], low nibble first) and scales uint8 [E, rows, cols/32],
exactly as the loader produces them. backend "builtin" composes MLX's own ops (mx.gather_qmm); it is the
reference every other backend is tested against.

backend "metal" runs our own kernels (metal/moe_gate_up_swiglu.metal, metal/moe_down.metal, sharing
metal/mxfp4.h) through mx.fast.metal_kernel, which is looked up on every build so a test can put an emulator
in its place. Each is a fused decode matvec: one launch for gate_up + bias + clamped SwiGLU over each token's
k experts, one for down + bias + the router-weighted sum over k (one simdgroup per expert, summed in a fixed
order in threadgroup memory, no atomics: deterministic). The wrappers take the model's arrays as they are
(uint32 ids, router weights and biases in the activation dtype) and build the SwiGLU constants once, so a call
adds no op to the graph but the kernel itself. MLX passes an input of under 8 elements in `constant` memory:
at T = 1 the ids and router weights are constant, at T = 2..4 device; the self-test runs T = 1 and T = 4, so
it tests both kernel variants decode runs.

backend "auto" (the default) uses a kernel only on a Metal GPU, for at most DECODE_MAX_TOKENS tokens, and only
when kernel_gate approves it: the self-test (metal_selftest.py, which registers itself there; this module
never imports it) found it correct on gpt-oss's decode shapes on this Mac AND faster than MLX's own ops.

What is proven where. On Linux (CI), an MSL-on-CPU emulator (tests/msl_emu) compiles the exact source MLX
generates with g++ and clang, checks its types and address spaces with clang, runs every GPU thread with
guarded buffers, poisoned memory and misaligned-access traps, and compares the results with MLX's mxfp4 ops
(bit for bit for the decode of every code and scale byte). That proves results and memory safety, not that
Metal compiles the source nor any speed. On a Mac, the self-test proves compile, results and speed on that
machine, each time the setup changes. No Mac has run these kernels for this project yet: no speed is claimed.

Prefill keeps mx.gather_qmm, by decision: with many tokens, gather_qmm sorts the (token, expert) pairs and
reads each expert's weights once for all its tokens in a tiled quantized matmul, while a matvec kernel
reads them once per pair; beating it needs an expert-grouped simdgroup_matrix kernel whose speed only a Mac
can show, and nobody here can measure one. The unfused bias/SwiGLU/sum ops are small next to the matmuls
at prefill sizes. Forcing backend="metal" runs the decode kernels for any number of tokens (correct, slower).
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path

import mlx.core as mx

from . import kernel_gate

# Above this many (token, expert) pairs, sort them by expert so gather_qmm reads each expert's weights once.
SORT_THRESHOLD = 64


@mx.compile  # one fused elementwise kernel instead of eight (recompiled per shape)
def swiglu(gate_up: mx.array, limit: float, alpha: float) -> mx.array:
    """gpt-oss's clamped SwiGLU on interleaved rows: even = gate, odd = up (reference: MLPBlock.swiglu)."""
    gate = mx.minimum(gate_up[..., ::2], limit)
    up = mx.clip(gate_up[..., 1::2], -limit, limit)
    return gate * mx.sigmoid(alpha * gate) * (up + 1)


def _gather_mxfp4(x: mx.array, w: mx.array, scales: mx.array, ids: mx.array) -> mx.array:
    """x [T, k or 1, K] times expert ids[t, j]'s matrix (transposed) -> [T, k, N]."""
    T, k = ids.shape
    if ids.size < SORT_THRESHOLD:
        y = mx.gather_qmm(x[:, :, None, :], w, scales, None, rhs_indices=ids,
                          transpose=True, group_size=32, bits=4, mode="mxfp4")
        return y.squeeze(-2)
    flat = ids.reshape(-1)
    order = mx.argsort(flat)
    inverse = mx.argsort(order)
    rows = order // k if x.shape[1] == 1 else order
    xs = x.reshape(-1, x.shape[-1])[rows][:, None, :]
    y = mx.gather_qmm(xs, w, scales, None, rhs_indices=flat[order], transpose=True,
                      group_size=32, bits=4, mode="mxfp4", sorted_indices=True)
    return y.squeeze(-2)[inverse].reshape(T, k, -1)


def _builtin_gate_up_swiglu(x, w, scales, bias, expert_ids, limit, alpha):
    y = _gather_mxfp4(x[:, None, :], w, scales, expert_ids) + bias[expert_ids]
    return swiglu(y, limit, alpha)


def _builtin_down(h, w, scales, bias, expert_ids, expert_weights):
    y = _gather_mxfp4(h, w, scales, expert_ids) + bias[expert_ids]
    return (y * expert_weights[..., None]).sum(axis=1)


def moe_gate_up_swiglu(x, w, scales, bias, expert_ids, *, limit=7.0, alpha=1.702, backend="auto"):
    if _use_metal(backend, GATE_UP, x.dtype, x.shape[0]):
        return _metal_gate_up_swiglu(x, w, scales, bias, expert_ids, limit, alpha)
    return _builtin_gate_up_swiglu(x, w, scales, bias, expert_ids, limit, alpha)


def moe_down(h, w, scales, bias, expert_ids, expert_weights, *, backend="auto"):
    if _use_metal(backend, DOWN, h.dtype, h.shape[0]):
        return _metal_down(h, w, scales, bias, expert_ids, expert_weights)
    return _builtin_down(h, w, scales, bias, expert_ids, expert_weights)


def moe(x, gate_up, down, expert_ids, expert_weights, *, limit=7.0, alpha=1.702, backend="auto"):
    """The whole expert block, x [T, H] -> [T, H]: moe_down(moe_gate_up_swiglu(x)). gate_up and down are
    (w, scales, bias) triples. Each kernel's backend is looked up once per call (a dict lookup once the
    verdict is known). With many tokens on the builtin ops, the (token, expert) pairs are sorted by expert
    once for both matmuls and unsorted once at the end, instead of around each."""
    metal_gate_up = _use_metal(backend, GATE_UP, x.dtype, x.shape[0])
    metal_down = _use_metal(backend, DOWN, x.dtype, x.shape[0])
    if expert_ids.size < SORT_THRESHOLD or metal_gate_up or metal_down:
        h = (_metal_gate_up_swiglu if metal_gate_up else _builtin_gate_up_swiglu)(x, *gate_up, expert_ids,
                                                                                  limit, alpha)
        return (_metal_down if metal_down else _builtin_down)(h, *down, expert_ids, expert_weights)
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = mx.argsort(flat)
    ids = flat[order]

    def matmul(a, w, scales, bias):  # a [T*k, 1, K] sorted by expert -> [T*k, 1, N]
        y = mx.gather_qmm(a, w, scales, None, rhs_indices=ids, transpose=True, group_size=32, bits=4,
                          mode="mxfp4", sorted_indices=True)
        return y + bias[ids][:, None, :]

    h = swiglu(matmul(x[order // k][:, None, :], *gate_up), limit, alpha)
    y = matmul(h, *down).squeeze(1)[mx.argsort(order)].reshape(T, k, -1)
    return (y * expert_weights[..., None]).sum(axis=1)


def _check_backend(backend: str) -> None:
    if backend not in ("auto", "builtin", "metal"):
        raise ValueError(f"backend must be 'auto', 'builtin' or 'metal', got {backend!r}")


# ---- the Metal backend ------------------------------------------------------------------------------------

# "auto" uses the fused matvec kernels up to this many tokens (decode, speculative drafts); above, gather_qmm.
DECODE_MAX_TOKENS = 4
SIMD_WIDTH = 32
MXFP4_BLOCK = 32
# MLX passes an input with fewer elements than this in `constant` memory instead of `device`: a different
# kernel variant. Decode's ids and router weights [T, 4] are constant at T = 1 and device at T = 2..4; the
# self-test runs T = 1 and T = DECODE_MAX_TOKENS, so it runs both variants decode uses (nothing is padded).
MIN_DEVICE_ELEMENTS = 8
ACTIVATION_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
MAX_EXPERTS_PER_TOKEN = 1024 // SIMD_WIDTH  # moe_down: one simdgroup per expert slot in one threadgroup


class KernelSpec:
    """One kernel: its body file, MLX argument names and tile constants (template ints)."""

    def __init__(self, name: str, file: str, inputs: list[str], tiles: dict[str, int]):
        self.name, self.file, self.inputs, self.tiles = name, file, inputs, tiles

    @property
    def key(self) -> str:  # the name users see (doctor, self-test cache)
        return self.file.removesuffix(".metal")


# Tiles for gpt-oss's H = I = 2880 (the reasoning is in each .metal file's opening comment).
# GROUP: at T = 2..SHARE_TOKENS, up to this many (token, expert) pairs with the same expert share one read of
# its weights (SHARE in the .metal files).
GATE_UP = KernelSpec("gptoss_moe_gate_up_swiglu", "moe_gate_up_swiglu.metal",
                     ["x", "w", "scales", "bias", "ids", "params"], {"SIMDS": 2, "OUTS": 4, "GROUP": 4})
DOWN = KernelSpec("gptoss_moe_down", "moe_down.metal",
                  ["h", "w", "scales", "bias", "ids", "weights"], {"ROWS": 8, "GROUP": 4})
SHARE_TOKENS = DECODE_MAX_TOKENS  # the kernels share expert reads between tokens up to this many tokens
SPECS = (GATE_UP, DOWN)
HEADER_FILE = "mxfp4.h"


@functools.lru_cache(maxsize=None)
def kernel_source(file: str) -> str:
    return resources.files("mlx_gptoss.metal").joinpath(file).read_text()


def source_hash() -> str:
    """Hash of every kernel source, tile constant and of this wrapper: a change to any is tested again."""
    h = hashlib.sha256(kernel_source(HEADER_FILE).encode())
    for spec in SPECS:
        h.update(spec.name.encode() + kernel_source(spec.file).encode() + repr(sorted(spec.tiles.items())).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


_built: dict = {}


def build(spec: KernelSpec):
    """mx.fast.metal_kernel(...) for spec, looked up now (not at import) and cached per factory."""
    factory = mx.fast.metal_kernel
    key = (spec.name, factory)
    if key not in _built:
        _built[key] = factory(name=spec.name, input_names=spec.inputs, output_names=["out"],
                              source=kernel_source(spec.file), header=kernel_source(HEADER_FILE))
    return _built[key]


def _use_metal(backend: str, spec: KernelSpec, dtype, tokens: int) -> bool:
    """Per call: a few comparisons and kernel_gate's memo (the verdict is decided once per kernel and dtype)."""
    if backend == "auto":  # the judge checks for a Metal GPU once; per call only an approved kernel does
        return tokens <= DECODE_MAX_TOKENS and kernel_gate.approved(spec.key, dtype, tokens) and on_metal_gpu()
    _check_backend(backend)
    return backend == "metal"


def on_metal_gpu() -> bool:
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def _describe(a) -> str:
    return f"{a.dtype}{tuple(a.shape)}".removeprefix("mlx.core.")


def _check_metal_inputs(what: str, a: mx.array, a_name: str, w: mx.array, scales: mx.array, bias: mx.array,
                        ids: mx.array, a_ndim: int) -> None:
    """One ValueError naming the argument at fault for anything the kernels cannot take."""
    def bad(msg):
        raise ValueError(f"{what} (backend 'metal'): {msg}")

    if a.dtype not in ACTIVATION_DTYPES:
        bad(f"{a_name} must be float32, float16 or bfloat16, got {a.dtype}; use backend='builtin'")
    if a.ndim != a_ndim:
        bad(f"{a_name} must have {a_ndim} dimensions, got {_describe(a)}")
    if ids.ndim != 2 or ids.shape[0] != a.shape[0] or ids.dtype not in (mx.int32, mx.uint32, mx.int64, mx.uint64):
        bad(f"expert_ids must be integer [T, k] with T = {a.shape[0]} rows like {a_name}, got {_describe(ids)}")
    if a_ndim == 3 and a.shape[1] != ids.shape[1]:
        bad(f"{a_name} [T, k, I] must have k = {ids.shape[1]} (expert_ids' columns), got {_describe(a)}")
    K = a.shape[-1]
    if w.ndim != 3 or scales.ndim != 3 or bias.ndim != 2:
        bad(f"expected w [E, rows, cols/8], scales [E, rows, cols/32], bias [E, rows]; got w {_describe(w)}, "
            f"scales {_describe(scales)}, bias {_describe(bias)}")
    E, R = w.shape[0], w.shape[1]
    if (K % MXFP4_BLOCK or w.dtype != mx.uint32 or w.shape[2] * 8 != K or scales.dtype != mx.uint8
            or tuple(scales.shape) != (E, R, K // MXFP4_BLOCK) or tuple(bias.shape) != (E, R)):
        bad(f"expected mxfp4 weights uint32 [E, rows, {K}/8], uint8 scales [E, rows, {K}/32] and bias [E, rows] "
            f"for {a_name} [..., {K}] ({K} a multiple of 32); got w {_describe(w)}, scales {_describe(scales)}, "
            f"bias {_describe(bias)}")


def _as(a: mx.array, dtype) -> mx.array:
    return a if a.dtype == dtype else a.astype(dtype)


_swiglu_params: dict[tuple[float, float], mx.array] = {}


def _params(limit: float, alpha: float) -> mx.array:
    """The SwiGLU constants as the kernel's `params` input, built once per (limit, alpha)."""
    key = (float(limit), float(alpha))
    if key not in _swiglu_params:
        _swiglu_params[key] = mx.array(key, dtype=mx.float32)
    return _swiglu_params[key]


def _metal_gate_up_swiglu(x, w, scales, bias, expert_ids, limit, alpha):
    _check_metal_inputs("moe_gate_up_swiglu", x, "x", w, scales, bias, expert_ids, 2)
    T, k = expert_ids.shape
    I = w.shape[1] // 2
    if T * k == 0 or I == 0:
        return mx.zeros((T, k, I), dtype=x.dtype)
    simds, outs = GATE_UP.tiles["SIMDS"], GATE_UP.tiles["OUTS"]
    (out,) = build(GATE_UP)(
        inputs=[x, w, scales, _as(bias, x.dtype), _as(expert_ids, mx.uint32), _params(limit, alpha)],
        template=[("T", x.dtype), ("SIMDS", simds), ("OUTS", outs), ("SHARE", 2 <= T <= SHARE_TOKENS),
                  ("GROUP", GATE_UP.tiles["GROUP"])],
        grid=(SIMD_WIDTH * simds, -(-I // (simds * outs)), T * k), threadgroup=(SIMD_WIDTH * simds, 1, 1),
        output_shapes=[(T, k, I)], output_dtypes=[x.dtype])
    return out


def _metal_down(h, w, scales, bias, expert_ids, expert_weights):
    _check_metal_inputs("moe_down", h, "h", w, scales, bias, expert_ids, 3)
    if tuple(expert_weights.shape) != tuple(expert_ids.shape):
        raise ValueError(f"moe_down (backend 'metal'): expert_weights must match expert_ids {tuple(expert_ids.shape)}, "
                         f"got {_describe(expert_weights)}")
    T, k = expert_ids.shape
    H = w.shape[1]
    if k > MAX_EXPERTS_PER_TOKEN:
        raise ValueError(f"moe_down (backend 'metal'): at most {MAX_EXPERTS_PER_TOKEN} experts per token (one "
                         f"simdgroup each in a threadgroup of at most 1024 threads), got k = {k}")
    if T == 0 or H == 0 or k == 0:
        return mx.zeros((T, H), dtype=h.dtype)
    rows = DOWN.tiles["ROWS"]
    share = 2 <= T <= SHARE_TOKENS and T * k <= MAX_EXPERTS_PER_TOKEN  # one threadgroup for all T tokens
    tokens = T if share else 1  # per threadgroup
    (out,) = build(DOWN)(
        inputs=[h, w, scales, _as(bias, h.dtype), _as(expert_ids, mx.uint32),
                _as(expert_weights, h.dtype)],
        template=[("T", h.dtype), ("K", k), ("ROWS", rows), ("SHARE", share), ("GROUP", DOWN.tiles["GROUP"]),
                  ("SHARE_TOKENS", SHARE_TOKENS)],
        grid=(SIMD_WIDTH * k * tokens, -(-H // rows), T // tokens), threadgroup=(SIMD_WIDTH * k * tokens, 1, 1),
        output_shapes=[(T, H)], output_dtypes=[h.dtype])
    return out


def backend_for(tokens: int, dtype=mx.bfloat16, backend: str = "auto") -> str:
    """Which backend a call with this many tokens would use: 'metal' or 'builtin' (runs the self-test if due)."""
    return "metal" if _use_metal(backend, GATE_UP, dtype, tokens) and _use_metal(backend, DOWN, dtype, tokens) \
        else "builtin"
