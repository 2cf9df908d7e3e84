"""One rank's share of the model: built at its sliced shapes, filled from its slices, summed over the group.

The model is mlx_gptoss.model.Transformer built from the rank's config (its heads and intermediate share:
layout.rank_config), so every shape is already the slice's. shard() then makes the two row-parallel outputs
of each layer sum over the group (one all_sum after the attention output projection, one after the MoE) by
swapping the class of those two modules for a subclass whose __call__ adds the all_sum: the parameter names
stay the checkpoint's, and model.py knows nothing of ranks.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..checkpoint import EXPERT_PARTS, quantize_experts
from ..model import MLPBlock, Transformer
from .layout import rank_config, slice_of, sliced_shape
from .reader import ReadStats, read_slice


class SumLinear(nn.Linear):
    """o_proj over this rank's heads, summed over the group (the bias is non-zero on rank 0 only)."""

    group = None

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(super().__call__(x), group=self.group)


class SumMLPBlock(MLPBlock):
    """The MoE over this rank's intermediate share, summed over the group. `last` keeps the last output of
    the final layer: evaluating it runs every collective of a forward pass (see mirror.py)."""

    group = None
    last = None

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.distributed.all_sum(super().__call__(x), group=self.group)
        if self.last is not None:
            self.last[0] = y
        return y


def shard(net: Transformer, group) -> Transformer:
    """Make net's attention outputs and MoE outputs sum over `group` (net built from rank_config)."""
    for layer in net.model.layers:
        for module, cls in ((layer.self_attn.o_proj, SumLinear), (layer.mlp, SumMLPBlock)):
            module.__class__ = cls
            module.group = group
    object.__setattr__(net.model.layers[-1].mlp, "last", [None])  # a plain attribute, not a parameter
    return net


def last_output(net: Transformer):
    """The final layer's summed MoE output of the last forward pass (lazy), or None."""
    return net.model.layers[-1].mlp.last[0]


def sharded_weights(tensors: dict, cfg, rank: int, n: int, dtype: mx.Dtype, stats: ReadStats | None = None):
    """(parameter name, array) of rank's slices, read by offset and evaluated one tensor at a time, so the
    process holds its share plus one tensor in flight (mlx_gptoss.checkpoint.load_weights, sliced)."""
    for name, info in sorted(tensors.items()):
        s = slice_of(name, info.shape, cfg, rank, n)
        part = next((p for p in EXPERT_PARTS if f"experts.{p}" in name), None)
        if s is not None and s.zero:
            pairs = [(name, mx.zeros(sliced_shape(info.shape, s), dtype=dtype))]
        else:
            a = read_slice(info, s, stats)
            if part is None or name.endswith("_bias"):
                pairs = [(name, a.astype(dtype))]
            elif name.endswith("_blocks"):
                E, R, G, B = a.shape
                pairs = [(name[: -len("_blocks")], mx.view(a.reshape(E, R, G * B), mx.uint32))]
            elif name.endswith("_scales"):
                pairs = [(name, a)]
            else:  # bf16 experts [E, in, out], quantized one expert at a time
                w, sc = quantize_experts(a)
                pairs = [(name, w), (name + "_scales", sc)]
        mx.eval([p for _, p in pairs])
        yield from pairs


def build(ckpt, group, dtype: mx.Dtype, progress=None, stats: ReadStats | None = None) -> Transformer:
    """The rank's sharded model, loaded from ckpt's files (mlx_gptoss.memory.Checkpoint, checked)."""
    rank, n = group.rank(), group.size()
    net = Transformer(rank_config(ckpt.config, rank, n))
    net.set_dtype(dtype)
    shard(net, group)
    weights, total, done = [], len(ckpt.tensors), 0
    for pair in sharded_weights(ckpt.tensors, ckpt.config, rank, n, dtype, stats):
        weights.append(pair)
        done += 1
        if progress and done % 16 == 0:
            progress(done, total + 1)
    net.load_weights(weights, strict=True)
    mx.eval(net.parameters())
    net.eval()
    if progress:
        progress(total + 1, total + 1)
    return net
