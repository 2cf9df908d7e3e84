"""The builtin MoE path against a dense numpy computation from the MXFP4 bytes (an independent decoder)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gptoss import kernels
from tiny_checkpoint import decode_mxfp4


def swiglu_np(y, limit=7.0, alpha=1.702):
    gate, up = np.minimum(y[..., ::2], limit), np.clip(y[..., 1::2], -limit, limit)
    return gate / (1 + np.exp(-alpha * gate)) * (up + 1)


@pytest.mark.parametrize("tokens", [1, 3, 40])  # 40 x 4 pairs takes the sorted path
def test_moe_matches_dense_numpy(tokens):
    rng = np.random.default_rng(tokens)
    E, H, I, k = 6, 64, 96, 4
    blocks = {n: rng.integers(0, 256, (E, r, c // 32, 16), dtype=np.uint8) for n, r, c in (("gu", 2 * I, H), ("dn", H, I))}
    scales = {n: rng.integers(121, 125, b.shape[:-1], dtype=np.uint8) for n, b in blocks.items()}
    bias = {"gu": rng.normal(0, .1, (E, 2 * I)).astype(np.float32), "dn": rng.normal(0, .1, (E, H)).astype(np.float32)}
    x = rng.normal(0, 1, (tokens, H)).astype(np.float32)
    ids = rng.integers(0, E, (tokens, k)).astype(np.int32)
    ids[0] = [2, 2, 5, 2]  # an expert repeated within one token
    wts = rng.dirichlet(np.ones(k), tokens).astype(np.float32)

    def packed(n):
        b = blocks[n]
        return mx.view(mx.array(b.reshape(*b.shape[:2], -1)), mx.uint32), mx.array(scales[n]), mx.array(bias[n])

    got = kernels.moe(mx.array(x), packed("gu"), packed("dn"), mx.array(ids), mx.array(wts), backend="builtin")

    dense = {n: decode_mxfp4(blocks[n], scales[n]) for n in blocks}  # [E, out, in]
    want = np.zeros((tokens, H), np.float32)
    for t in range(tokens):
        for j, e in enumerate(ids[t]):
            h = swiglu_np(dense["gu"][e] @ x[t] + bias["gu"][e])
            want[t] += wts[t, j] * (dense["dn"][e] @ h + bias["dn"][e])
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
