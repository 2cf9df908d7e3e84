"""8-bit attention and unembedding weights, and an embedding table that stays in the checkpoint file.

8-bit: MLX's affine quantization (nn.QuantizedLinear, groups of 64 along the input dimension, a scale and
a bias per group in the activation dtype), biases of the projections kept as they are. The unembedding
(lm_head, vocab x hidden) is quantized from the file a block of rows at a time into preallocated buffers,
so its float copy never exists in memory as a whole.

MappedEmbedding: a token's embedding is one row of the table; the rows a step needs are read from the
shard (ShardReader) and cast exactly as nn.Embedding's weight would have been, so the numbers are the same.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..safetensors_header import TensorInfo
from ..tensor_read import to_mx
from .reader import ShardReader

BITS, GROUP = 8, 64
ROWS_PER_BLOCK = 8192  # rows of lm_head quantized at a time


def quantized_bytes(n_out: int, n_in: int, act_bytes: int, bits: int = BITS, group: int = GROUP) -> int:
    """Bytes of an [n_out, n_in] weight quantized by mx.quantize: packed values + a scale and bias per group."""
    return n_out * n_in * bits // 8 + 2 * n_out * (n_in // group) * act_bytes


def quantize_attention(block: nn.Module, bits: int = BITS, group: int = GROUP) -> None:
    """Replace q/k/v/o projections of one (loaded) attention block by 8-bit QuantizedLinear layers."""
    nn.quantize(block, group_size=group, bits=bits, class_predicate=lambda _, m: isinstance(m, nn.Linear))


def quantized_unembedding(info: TensorInfo, reader: ShardReader, dtype: mx.Dtype, bits: int = BITS,
                          group: int = GROUP) -> nn.QuantizedLinear:
    """lm_head as an 8-bit QuantizedLinear, read and quantized ROWS_PER_BLOCK rows at a time."""
    V, H = info.shape
    layer = nn.QuantizedLinear(H, V, bias=False, group_size=group, bits=bits)
    w = mx.zeros((V, H * bits // 32), dtype=mx.uint32)
    scales = mx.zeros((V, H // group), dtype=dtype)
    biases = mx.zeros((V, H // group), dtype=dtype)
    for lo in range(0, V, ROWS_PER_BLOCK):
        n = min(ROWS_PER_BLOCK, V - lo)
        rows = to_mx(reader.read(info, lo, n), info.dtype, dtype)
        for buf, part in zip((w, scales, biases), mx.quantize(rows, group_size=group, bits=bits)):
            buf[lo:lo + n] = part
        mx.eval(w, scales, biases)
    layer.weight, layer.scales, layer.biases = w, scales, biases
    return layer


class MappedEmbedding(nn.Module):
    """nn.Embedding whose table stays in the checkpoint: each call reads the rows of its tokens."""

    def __init__(self, info: TensorInfo, reader: ShardReader, dtype: mx.Dtype):
        super().__init__()
        object.__setattr__(self, "_info", info)
        object.__setattr__(self, "_reader", reader)
        object.__setattr__(self, "_dtype", dtype)

    def __call__(self, tokens: mx.array) -> mx.array:
        ids = np.array(tokens)
        vocab = self._info.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise IndexError(f"token id out of range 0..{vocab - 1}")
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = np.concatenate([self._reader.read(self._info, int(t)) for t in uniq]) if uniq.size else \
            np.zeros((0, self._info.shape[1]), dtype=np.uint16)
        table = to_mx(rows, self._info.dtype, self._dtype)
        return table[mx.array(inverse.reshape(ids.shape).astype(np.int32))]
