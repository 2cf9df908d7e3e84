"""gpt-oss in MLX, one small module per idea, following OpenAI's gpt_oss/torch/model.py.

Parameter names are the hub checkpoint's (model.layers.N.self_attn.q_proj.weight, ...), so loading is a
name-for-name update; the only renames happen in checkpoint.py (MXFP4 `_blocks` -> the packed weight).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

from . import kernels, metal_selftest  # noqa: F401  (metal_selftest registers the kernels' judge in kernel_gate)
from .config import GptOssConfig, YarnConfig


def yarn_inv_freq(head_dim: int, rope: YarnConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies and attention concentration of YaRN (arXiv:2309.00071), as OpenAI's
    RotaryEmbedding._compute_concentration_and_inv_freq, with transformers' optional truncation."""
    freq = rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope.factor <= 1:
        return 1.0 / freq, 1.0
    concentration = 0.1 * math.log(rope.factor) + 1.0

    def correction_dim(rotations):
        return head_dim * math.log(rope.original_context / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (1 / (rope.factor * freq)) * (1 - extrapolate) + (1 / freq) * extrapolate
    return inv_freq, concentration


class Rows(list):
    """One layer's caches for a batch of independent sequences, one per row (mlx_gptoss.batch): everything
    but attention runs on the stacked rows, attention runs per row against that row's own cache."""


class Attention(nn.Module):
    """GQA with biased projections, YaRN rotary, a learned sink logit per head, optional sliding window."""

    def __init__(self, cfg: GptOssConfig, sliding: bool):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window if sliding else None
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=True)
        self.sinks = mx.zeros((self.n_heads,))
        inv_freq, concentration = yarn_inv_freq(self.head_dim, cfg.rope)
        self._wavelengths = mx.array(1.0 / inv_freq, dtype=mx.float32)
        # The reference multiplies cos and sin by the concentration, i.e. scales q and k by it: the same
        # as scaling the attention logits by concentration**2, which is where we put it.
        self.scale = concentration**2 / math.sqrt(self.head_dim)

    def rope(self, x: mx.array, offset: "int | mx.array") -> mx.array:  # an array: one offset per row
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0,
                            offset=offset, freqs=self._wavelengths)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv, -1).transpose(0, 2, 1, 3)
        rows = isinstance(cache, Rows)  # batched decoding: each row at its own position, over its own cache
        offset = mx.array([c.offset for c in cache]) if rows else cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if rows:
            o = mx.concatenate([self.attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], c, create_attention_mask(
                x[b:b + 1], c, window_size=self.window)) for b, c in enumerate(cache)])
        else:
            o = self.attend(q, k, v, cache, mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def attend(self, q, k, v, cache, mask) -> mx.array:
        """The cache updated with the rotated k and v, then attention with the sinks: [B, heads, L, D]."""
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # a quantized KV cache (mlx_gptoss.offload.kv) brings its own attention over its packed keys/values
        attend = getattr(cache, "attention", None) or mx.fast.scaled_dot_product_attention
        return attend(q, k, v, scale=self.scale, mask=mask, sinks=self.sinks)


class Experts(nn.Module):
    """All experts of one layer, MXFP4: weights uint32 [E, rows, cols/8], scales uint8 [E, rows, cols/32]."""

    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = mx.zeros((E, 2 * I, H // 8), dtype=mx.uint32)
        self.gate_up_proj_scales = mx.zeros((E, 2 * I, H // 32), dtype=mx.uint8)
        self.gate_up_proj_bias = mx.zeros((E, 2 * I))
        self.down_proj = mx.zeros((E, H, I // 8), dtype=mx.uint32)
        self.down_proj_scales = mx.zeros((E, H, I // 32), dtype=mx.uint8)
        self.down_proj_bias = mx.zeros((E, H))

    def __call__(self, x, expert_ids, expert_weights, *, limit, alpha, backend):
        """x [T, H] through each token's experts, router-weighted: kernels.moe. mlx_gptoss.offload's
        StreamedExperts has the same call with its weights fetched per step."""
        return kernels.moe(x, (self.gate_up_proj, self.gate_up_proj_scales, self.gate_up_proj_bias),
                           (self.down_proj, self.down_proj_scales, self.down_proj_bias), expert_ids,
                           expert_weights, limit=limit, alpha=alpha, backend=backend)


class MLPBlock(nn.Module):
    """Router -> top-k -> softmax over those k -> clamped-SwiGLU experts -> weighted sum."""

    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.k, self.limit, self.alpha = cfg.num_experts_per_tok, cfg.swiglu_limit, cfg.swiglu_alpha
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=True)
        self.experts = Experts(cfg)
        self.backend = "auto"

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        ids = mx.argpartition(-logits, kth=self.k - 1, axis=-1)[:, : self.k]
        weights = mx.softmax(mx.take_along_axis(logits, ids, axis=-1), axis=-1, precise=True)
        y = self.experts(x, ids, weights.astype(x.dtype), limit=self.limit, alpha=self.alpha, backend=self.backend)
        return y.reshape(shape)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer_type: str):
        super().__init__()
        self.self_attn = Attention(cfg, sliding=layer_type == "sliding_attention")
        self.mlp = MLPBlock(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [TransformerBlock(cfg, t) for t in cfg.layer_types]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class Transformer(nn.Module):
    """tokens [B, T] int32 -> logits [B, T, vocab]. `cache` is make_cache()'s list, updated in place (or,
    with T == 1, per layer the Rows of B such caches: B sequences decoding together)."""

    full_attention_cache = KVCache  # the cache class of full-attention layers (offload.kv swaps in 8-bit)

    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        x = self.model.embed_tokens(tokens)
        layers = self.model.layers
        cache = cache if cache is not None else [None] * len(layers)
        masks = {}  # one mask per attention kind, built from the first layer of that kind
        for layer, c in zip(layers, cache):
            window = layer.self_attn.window
            if window not in masks:
                masks[window] = create_attention_mask(x, c, window_size=window)
            x = layer(x, masks[window], c)
        return self.lm_head(self.model.norm(x))

    def make_cache(self) -> list:
        """RotatingKVCache(window) for sliding layers, a growing KVCache for full-attention layers."""
        return [
            RotatingKVCache(max_size=layer.self_attn.window) if layer.self_attn.window else self.full_attention_cache()
            for layer in self.model.layers
        ]

    def set_moe_backend(self, backend: str) -> None:
        for layer in self.model.layers:
            layer.mlp.backend = backend
