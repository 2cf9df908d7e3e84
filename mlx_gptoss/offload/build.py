"""Turn a plan's levers into the model: swap in streamed experts, the mapped embedding, the 8-bit
unembedding and KV cache before the weights are loaded, and quantize attention layer by layer after."""

from __future__ import annotations

import functools

import mlx.core as mx
from mlx.utils import tree_flatten

from ..memory import Checkpoint
from .experts import StreamedExperts, StreamStats
from .kv import QuantizedKV
from .plan import Levers, kv_group
from .quantized import MappedEmbedding, quantize_attention, quantized_unembedding
from .reader import ShardReader

STREAMED = ("gate_up_proj", "gate_up_proj_scales", "down_proj", "down_proj_scales")


class Offloaded:
    """What load() keeps of the levers: the reader of the checkpoint files and the streaming statistics."""

    def __init__(self, levers: Levers):
        self.levers = levers
        self.reader = ShardReader()
        self.stats = StreamStats()
        self.skipped: set[str] = set()  # model parameter names that stay in the files

    def keeps(self, name: str) -> bool:
        return name not in self.skipped

    def finish_layer(self, layer) -> None:
        """After a layer's weights are evaluated: quantize its attention, fill its expert cache."""
        if self.levers.weight_bits == 8:
            quantize_attention(layer.self_attn, bits=self.levers.weight_bits)
            mx.eval(layer.self_attn.parameters())
        if isinstance(layer.mlp.experts, StreamedExperts):
            layer.mlp.experts.fill()

    def reset_counts(self) -> None:
        """Count from here (load() calls it once the model is loaded): what running the model reads."""
        self.reader.reads.clear()
        self.reader.bytes_read = 0
        self.stats.__init__()

    def resident_expert_bytes(self, net) -> int:
        return sum(layer.mlp.experts.resident_bytes for layer in net.model.layers
                   if isinstance(layer.mlp.experts, StreamedExperts))


def prepare(net, ckpt: Checkpoint, levers: Levers, dtype: mx.Dtype) -> tuple[Offloaded, list]:
    """Swap the levered modules into `net` (before load_weights). Returns the Offloaded handle and the
    extra (name, array) pairs the new modules hold that the checkpoint does not (the 8-bit lm_head)."""
    off = Offloaded(levers)
    extra = []
    cfg = ckpt.config
    if levers.embedding:
        net.model.embed_tokens = MappedEmbedding(ckpt.tensors["model.embed_tokens.weight"], off.reader, dtype)
        off.skipped.add("model.embed_tokens.weight")
    if levers.weight_bits == 8:
        net.lm_head = quantized_unembedding(ckpt.tensors["lm_head.weight"], off.reader, dtype, bits=levers.weight_bits)
        off.skipped.add("lm_head.weight")
        extra = [("lm_head." + k, v) for k, v in tree_flatten(net.lm_head.parameters())]
    if levers.kv_bits == 8:
        net.full_attention_cache = functools.partial(QuantizedKV, bits=8, group_size=kv_group(cfg.head_dim))
    if levers.expert_slots is not None:
        for i, layer in enumerate(net.model.layers):
            layer.mlp.experts = StreamedExperts(i, ckpt.tensors, off.reader, levers.expert_slots, off.stats,
                                                first=i == 0)
            off.skipped.update(f"model.layers.{i}.mlp.experts.{n}" for n in STREAMED)
    return off, extra
