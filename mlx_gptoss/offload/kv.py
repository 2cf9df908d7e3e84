"""An 8-bit KV cache for the full-attention layers, with gpt-oss's attention sinks handled exactly.

Keys and values are stored as MLX affine-quantized tensors (mx.quantize, groups of `group_size` along the
head dimension: one group per head at head_dim 64), as mlx-lm's QuantizedKVCache does. mlx-lm's attention
over such a cache (models/base.py quantized_scaled_dot_product_attention) has no sinks, so gpt-oss cannot
use it. Here the sink is what mx.fast.scaled_dot_product_attention(..., sinks=) does: one extra logit per
head appended to every query's scores, included in the softmax and dropped after it. The only difference
to the bf16/float cache is the rounding of K and V (tests/test_offload_kv.py measures it).

The cache subclasses mlx-lm's KVCache and writes at `offset`, so trimming (the chat Runner's prompt cache)
stays `offset = n`, exactly as for the float cache. Sliding-window layers keep their float RotatingKVCache:
they hold only the window.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache

STEP = 256  # tokens the buffers grow by


class QuantizedKV(KVCache):
    def __init__(self, bits: int = 8, group_size: int = 64):
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def _grow(self, like: tuple[mx.array, ...] | None, shape, dim: int, dtype) -> tuple[mx.array, ...]:
        per_int = 32 // self.bits
        B, H, n = shape
        new = (mx.zeros((B, H, n, dim // per_int), dtype=mx.uint32),
               mx.zeros((B, H, n, dim // self.group_size), dtype=dtype),
               mx.zeros((B, H, n, dim // self.group_size), dtype=dtype))
        if like is None:
            return new
        return tuple(mx.concatenate([a[..., :self.offset, :], b], axis=2) for a, b in zip(like, new))

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        B, H, L, D = keys.shape
        prev = self.offset
        if self.keys is None or prev + L > self.keys[0].shape[2]:
            n = (STEP + L - 1) // STEP * STEP
            self.keys = self._grow(self.keys, (B, H, n), D, keys.dtype)
            self.values = self._grow(self.values, (B, H, n), values.shape[-1], values.dtype)
        self.offset += L
        for store, x in ((self.keys, keys), (self.values, values)):
            for buf, q in zip(store, mx.quantize(x, group_size=self.group_size, bits=self.bits)):
                buf[..., prev:self.offset, :] = q
        return self.keys_and_values()

    def keys_and_values(self):
        return tuple(tuple(a[..., :self.offset, :] for a in t) for t in (self.keys, self.values))

    @property
    def state(self):
        return () if self.keys is None else self.keys_and_values()

    @state.setter
    def state(self, v):
        self.keys, self.values = v
        self.offset = self.keys[0].shape[2]

    @property
    def nbytes(self):
        return 0 if self.keys is None else sum(a.nbytes for t in (self.keys, self.values) for a in t)

    def attention(self, q: mx.array, keys, values, *, scale: float, mask, sinks: mx.array | None = None):
        return quantized_attention(q, keys, values, scale=scale, mask=mask, sinks=sinks,
                                   group_size=self.group_size, bits=self.bits)


def quantized_attention(q: mx.array, keys, values, *, scale: float, mask, sinks=None, group_size: int = 64,
                        bits: int = 8) -> mx.array:
    """softmax([q K^T * scale + mask, sink]) minus the sink column, times V; K and V quantized
    (w, scales, biases) triples [B, kv_heads, S, ...]; q [B, heads, L, D] -> [B, heads, L, D]."""
    B, n_q, L, D = q.shape
    n_kv = keys[0].shape[1]
    rep = n_q // n_kv
    # query head h attends with kv head h // rep (grouped-query attention)
    qg = (q * scale).reshape(B, n_kv, rep, L, D)
    keys = tuple(a[:, :, None] for a in keys)
    values = tuple(a[:, :, None] for a in values)
    scores = mx.quantized_matmul(qg, *keys, transpose=True, group_size=group_size, bits=bits)
    S = scores.shape[-1]
    if isinstance(mask, str):  # "causal": query i sits at position S - L + i
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    if mask is not None:
        if mask.ndim == 4:
            mask = mask[:, :, None]
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    if sinks is not None:
        sink = mx.broadcast_to(sinks.astype(scores.dtype).reshape(1, n_kv, rep, 1, 1), (B, n_kv, rep, L, 1))
        scores = mx.concatenate([sink, scores], axis=-1)
    probs = mx.softmax(scores, axis=-1, precise=True)
    if sinks is not None:
        probs = probs[..., 1:]
    out = mx.quantized_matmul(probs.astype(q.dtype), *values, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, n_q, L, D)
