"""Expert streaming: a layer's MXFP4 experts live in the checkpoint files; a per-layer cache keeps the most
often routed ones resident, the rest are read (ShardReader) when the router picks them.

Per step the router's choices are needed on the host (which experts to bring in), so the step evaluates up
to the router. The experts used in this step are stacked in ascending expert order and the routed ids are
renumbered into that stack by an order-preserving map, so `kernels.moe` sees the same bytes, the same
(token, expert) pairs in the same sorted order, and gives bit-identical results to the resident model.

Cache policy: each layer holds `slots` experts, chosen by routing frequency (counts of (token, expert)
pairs so far, prefill included). A streamed expert replaces the least-routed resident one that this step
does not use, and only if it has been routed more often; LRU would instead be flushed by every prefill
chunk, which touches almost every expert of every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import kernels
from ..safetensors_header import TensorInfo
from .reader import ShardReader

PARTS = ("gate_up_proj", "down_proj")


@dataclass
class StreamStats:
    """Expert fetches (one per layer, step and distinct expert) served from the cache or read from disk."""

    hits: int = 0
    misses: int = 0
    bytes_streamed: int = 0
    tokens: int = 0  # tokens through the first streamed layer

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_streamed / self.tokens if self.tokens else 0.0

    def copy(self) -> "StreamStats":
        return StreamStats(self.hits, self.misses, self.bytes_streamed, self.tokens)

    def __sub__(self, other: "StreamStats") -> "StreamStats":
        return StreamStats(self.hits - other.hits, self.misses - other.misses,
                           self.bytes_streamed - other.bytes_streamed, self.tokens - other.tokens)


def expert_tensors(tensors: dict[str, TensorInfo], layer: int) -> dict[str, TensorInfo]:
    """'gate_up_proj' -> blocks info, 'gate_up_proj_scales' -> scales info, ... for one layer."""
    p = f"model.layers.{layer}.mlp.experts."
    out = {}
    for part in PARTS:
        out[part] = tensors[p + part + "_blocks"]
        out[part + "_scales"] = tensors[p + part + "_scales"]
    return out


def expert_bytes(tensors: dict[str, TensorInfo], layer: int = 0) -> int:
    """Bytes of one expert's MXFP4 blocks and scales (both matmuls): what streaming one expert reads."""
    return sum(t.nbytes // t.shape[0] for t in expert_tensors(tensors, layer).values())


class StreamedExperts(nn.Module):
    """Drop-in for model.Experts: same biases (resident parameters), weights fetched per step."""

    def __init__(self, layer: int, tensors: dict[str, TensorInfo], reader: ShardReader, slots: int,
                 stats: StreamStats, first: bool):
        super().__init__()
        infos = expert_tensors(tensors, layer)
        E, R = infos["gate_up_proj"].shape[:2]
        self.gate_up_proj_bias = mx.zeros((E, R))
        self.down_proj_bias = mx.zeros(infos["down_proj"].shape[:2])
        # plain attributes (not parameters): the file layout and the cache
        object.__setattr__(self, "_infos", infos)
        object.__setattr__(self, "_reader", reader)
        object.__setattr__(self, "_stats", stats)
        object.__setattr__(self, "_first", first)
        object.__setattr__(self, "slots", max(0, min(slots, E)))
        object.__setattr__(self, "counts", np.zeros(E, dtype=np.int64))
        object.__setattr__(self, "resident", {})  # expert -> (gate_up w, scales, down w, scales)
        object.__setattr__(self, "num_experts", E)

    def fill(self) -> None:
        """Load the first `slots` experts (the cache starts full; routing counts then decide)."""
        for e in range(self.slots):
            w = self._read(e)
            mx.eval(w)
            self.resident[e] = w

    def _read(self, e: int) -> tuple[mx.array, ...]:
        out = []
        for part in PARTS:
            blocks = self._reader.read(self._infos[part], e)[0]  # [R, G, 16] uint8
            out.append(mx.view(mx.array(blocks.reshape(blocks.shape[0], -1)), mx.uint32))
            out.append(mx.array(self._reader.read(self._infos[part + "_scales"], e)[0]))
        return tuple(out)

    def _fetch(self, e: int, used: set) -> tuple[mx.array, ...]:
        w = self.resident.get(e)
        if w is not None:
            self._stats.hits += 1
            return w
        before = self._reader.bytes_read
        w = self._read(e)
        self._stats.misses += 1
        self._stats.bytes_streamed += self._reader.bytes_read - before
        if len(self.resident) < self.slots:
            self.resident[e] = w
        elif self.slots:
            victims = [v for v in self.resident if v not in used]
            if victims:
                victim = min(victims, key=lambda v: (self.counts[v], v))
                if self.counts[e] > self.counts[victim]:
                    del self.resident[victim]
                    self.resident[e] = w
        return w

    def __call__(self, x, expert_ids, expert_weights, *, limit, alpha, backend):
        ids = np.array(expert_ids)  # evaluates the step up to the router
        if self._first:
            self._stats.tokens += ids.shape[0]
        self.counts += np.bincount(ids.reshape(-1), minlength=self.num_experts)
        order = np.unique(ids)
        used = set(order.tolist())
        ws = [self._fetch(int(e), used) for e in order]
        gate_w, gate_s, down_w, down_s = (mx.stack([w[i] for w in ws]) for i in range(4))
        sel = mx.array(order.astype(np.int32))
        local = mx.array(np.searchsorted(order, ids).astype(np.uint32))  # order-preserving renumbering
        y = kernels.moe(x, (gate_w, gate_s, self.gate_up_proj_bias[sel]), (down_w, down_s, self.down_proj_bias[sel]),
                        local, expert_weights, limit=limit, alpha=alpha, backend=backend)
        mx.eval(y)  # free this step's stacked experts before the next layer reads its own
        return y

    @property
    def resident_bytes(self) -> int:
        return sum(a.nbytes for w in self.resident.values() for a in w)
