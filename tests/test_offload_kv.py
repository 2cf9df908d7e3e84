"""The 8-bit KV cache of the full-attention layers (mlx_gptoss.offload.kv) and its attention with sinks.

References nobody here wrote: mx.fast.scaled_dot_product_attention with sinks= (run on the dequantized
cache, the sink handling must agree exactly) and mlx-lm's QuantizedKVCache / quantized attention (the
stored bytes and, without sinks, the attention must agree)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import quantized_scaled_dot_product_attention
from mlx_lm.models.cache import QuantizedKVCache

import mlx_gptoss
from mlx_gptoss.chat import Runner
from mlx_gptoss.offload.kv import QuantizedKV
from tiny_checkpoint import hub_config, random_weights, to_bf16, write_hub_checkpoint

B, NQ, NKV, D = 1, 8, 2, 64


def filled(chunks=(37, 5, 1)):
    """Our cache and mlx-lm's, fed the same keys/values in chunks; returns (ours, theirs, q of the last chunk)."""
    mx.random.seed(0)
    ours, theirs = QuantizedKV(bits=8, group_size=64), QuantizedKVCache(group_size=64, bits=8)
    for n in chunks:
        k, v = mx.random.normal((B, NKV, n, D)), mx.random.normal((B, NKV, n, D))
        kq, vq = ours.update_and_fetch(k, v)
        tk, tv = theirs.update_and_fetch(k, v)
    q = mx.random.normal((B, NQ, chunks[-1], D))
    return ours, (kq, vq), (tk, tv), q


def test_stored_bytes_match_mlx_lm():
    ours, (kq, vq), (tk, tv), _ = filled()
    for a, b in zip(kq + vq, tk + tv):
        assert a.shape == b.shape and mx.array_equal(a, b)
    assert ours.offset == 43


@pytest.mark.parametrize("mask", ["causal", None])
def test_sinks_exactly_as_mlx_fused_attention(mask):
    mx.random.seed(1)
    ours, (kq, vq), _, _ = filled((30, 7))
    q = mx.random.normal((B, NQ, 7, D))
    sinks = mx.random.normal((NQ,)) * 3
    kd, vd = (mx.dequantize(*t, group_size=64, bits=8) for t in (kq, vq))
    ref = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=0.125, mask=mask, sinks=sinks)
    out = ours.attention(q, kq, vq, scale=0.125, mask=mask, sinks=sinks)
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=2e-6, rtol=0)
    # and the sinks matter: without them the result is different
    assert mx.abs(ours.attention(q, kq, vq, scale=0.125, mask=mask) - ref).max().item() > 1e-3


def test_without_sinks_as_mlx_lm():
    ours, (kq, vq), _, q = filled()
    ref = quantized_scaled_dot_product_attention(mx.array(q), kq, vq, scale=0.125,  # it scales q in place
                                                 mask=None, group_size=64, bits=8)
    np.testing.assert_allclose(np.array(ours.attention(q, kq, vq, scale=0.125, mask=None)), np.array(ref),
                               atol=2e-6, rtol=0)


def test_trim_and_state():
    ours, _, _, _ = filled()
    ours.trim(10)
    assert ours.offset == 33 and ours.state[0][0].shape[2] == 33
    k, v = mx.ones((B, NKV, 2, D)), mx.ones((B, NKV, 2, D))
    kq, _ = ours.update_and_fetch(k, v)
    assert kq[0].shape[2] == 35  # written at the trimmed offset


@pytest.fixture(scope="module")
def fixed_small(tmp_path_factory):
    cfg = hub_config(num_hidden_layers=4, num_local_experts=16, hidden_size=256, intermediate_size=256, head_dim=64,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    w = random_weights(cfg, seed=1)
    for n in w:  # fixed routing: the bound measures the cache, not routing flips (README)
        if n.endswith("router.weight"):
            w[n] = to_bf16(np.zeros(w[n].shape, np.float32))
    return write_hub_checkpoint(tmp_path_factory.mktemp("kv") / "ckpt", cfg, w)


def last_logits(gpt, tokens, chunk=512):
    cache, out = gpt.make_cache(), []
    for i in range(0, tokens.shape[1], chunk):
        logits = gpt.model(tokens[:, i:i + chunk], cache=cache)
        mx.eval(logits)
        out.append(np.array(logits[0, -4:]))
    return np.concatenate(out), cache


def test_long_context_logits_within_the_bound(fixed_small):
    """2048 tokens: the 8-bit cache moves the logits by under 0.5% of their largest magnitude (README)."""
    n = 2048
    tokens = mx.array(np.random.default_rng(0).integers(0, 1024, (1, n)).astype(np.int32))
    ref, _ = last_logits(mlx_gptoss.load(fixed_small, memory="64GB", ctx=n + 8), tokens)
    gpt = mlx_gptoss.load(fixed_small, memory="64GB", ctx=n + 8, kv_bits=8)
    assert gpt.plan.levers.names() == ["kv8"]
    out, cache = last_logits(gpt, tokens)
    assert [type(c).__name__ for c in cache][1] == "QuantizedKV"
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.005
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_prompt_cache_reuse_with_the_8bit_cache(fixed_small):
    """The chat Runner trims full-attention layers by offset: a second prompt sharing a prefix gives the
    same logits as prefilling it from scratch."""
    gpt = mlx_gptoss.load(fixed_small, memory="64GB", ctx=4096, kv_bits=8)
    rng = np.random.default_rng(3)
    a = rng.integers(0, 1024, 300).tolist()
    b = a[:298] + rng.integers(0, 1024, 50).tolist()  # back to the snapshot before a's last two tokens
    r = Runner(gpt)
    r.chunk = 64
    r.prefill(a)
    reused, prefilled = r.prefill(b)
    assert prefilled == 50  # the cache was trimmed back to 298 tokens and reused
    fresh = Runner(gpt)
    fresh.chunk = 64
    scratch, _ = fresh.prefill(b)
    np.testing.assert_allclose(np.array(reused), np.array(scratch), atol=1e-4, rtol=0)
