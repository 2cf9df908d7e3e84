"""The two MoE expert operations the model calls, behind one contract with interchangeable backends.

    moe_gate_up_swiglu(x [T, H], w, scales, bias, expert_ids [T, k]) -> [T, k, I]
        MXFP4 gate_up matmul (rows interleaved gate, up, gate, up, ... as in the checkpoint) + bias + clamped SwiGLU.
    moe_down(h [T, k, I], w, scales, bias, expert_ids, expert_weights [T, k]) -> [T, H]
        MXFP4 down matmul + bias, then the router-weighted sum over the k experts.

w is MLX's mxfp4 packing (uint32 [E, rows, cols/8], low nibble first) and scales uint8 [E, rows, cols/32],
exactly as the loader produces them. backend "builtin" composes MLX's own ops (mx.gather_qmm); it is the
reference every other backend is tested against.
"""

from __future__ import annotations


import mlx.core as mx

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
    _check_backend(backend)
    return _builtin_gate_up_swiglu(x, w, scales, bias, expert_ids, limit, alpha)


def moe_down(h, w, scales, bias, expert_ids, expert_weights, *, backend="auto"):
    _check_backend(backend)
    return _builtin_down(h, w, scales, bias, expert_ids, expert_weights)


def _check_backend(backend: str) -> None:
    if backend not in ("auto", "builtin", "metal"):
        raise ValueError(f"backend must be 'auto', 'builtin' or 'metal', got {backend!r}")
