"""Expert streaming: a layer's MXFP4 experts live in the checkpoint files; a per-layer cache keeps the most
often routed ones resident, the rest are read (ShardReader) when the router picks them.

Per step the router's choices are needed on the host (which experts to bring in), so the step evaluates up
to the router. A decode step whose experts are all resident runs `kernels.moe` on the resident slot arrays
directly (each (token, expert) pair is computed on its own there, so only the bytes matter). Any other step
stacks the experts it uses in ascending expert order and renumbers the routed ids into that stack by an
order-preserving map, so `kernels.moe` sees the same bytes and the same (token, expert) pairs in the same
sorted order. Either way the results are bit-identical to the resident model's.

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
    """Drop-in for model.Experts: same biases (resident parameters), weights fetched per step.

    The resident experts live in one array per tensor, [slots, rows, ...], updated in place. A step whose
    experts are all resident and that the kernels compute pair by pair (fewer than kernels.SORT_THRESHOLD
    (token, expert) pairs: decode) runs on those arrays directly, ids mapped to slots, copying nothing.
    Other steps stack the experts they use (resident slices and the ones read) in ascending expert order."""

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
        object.__setattr__(self, "slot_of", {})  # resident expert -> its slot
        object.__setattr__(self, "_store", [])  # gate_up w, scales, down w, scales: [slots, ...] each
        object.__setattr__(self, "_slot_bias", None)  # the biases of the slots' experts (rebuilt on change)
        object.__setattr__(self, "num_experts", E)

    def fill(self) -> None:
        """Load the first `slots` experts (the cache starts full; routing counts then decide)."""
        if not self.slots:
            return
        for i, part in enumerate(PARTS):
            blocks, scales = self._infos[part], self._infos[part + "_scales"]
            self._store.append(mx.zeros((self.slots, blocks.shape[1], blocks.shape[2] * 4), dtype=mx.uint32))
            self._store.append(mx.zeros((self.slots, *scales.shape[1:]), dtype=mx.uint8))
        for e in range(self.slots):
            self._put(e, e, self._read(e))

    def _read(self, e: int) -> tuple[mx.array, ...]:
        out = []
        for part in PARTS:
            blocks = self._reader.read(self._infos[part], e)[0]  # [R, G, 16] uint8
            out.append(mx.view(mx.array(blocks.reshape(blocks.shape[0], -1)), mx.uint32))
            out.append(mx.array(self._reader.read(self._infos[part + "_scales"], e)[0]))
        return tuple(out)

    def _put(self, slot: int, e: int, w: tuple[mx.array, ...]) -> None:
        """Expert e into `slot`, in place (nothing else may hold the slot arrays: see __call__)."""
        for buf, a in zip(self._store, w):
            buf[slot] = a
        mx.eval(self._store)
        self.slot_of.pop(next((x for x, s in self.slot_of.items() if s == slot), None), None)
        self.slot_of[e] = slot
        object.__setattr__(self, "_slot_bias", None)

    def _admit(self, e: int, w: tuple[mx.array, ...], used: set) -> None:
        """Keep a streamed expert if a slot is free, or in place of the least-routed resident expert this
        step does not use, when e has been routed more often."""
        if not self.slots:
            return
        if len(self.slot_of) < self.slots:
            self._put(len(self.slot_of), e, w)
            return
        victims = [v for v in self.slot_of if v not in used]
        if victims:
            victim = min(victims, key=lambda v: (self.counts[v], v))
            if self.counts[e] > self.counts[victim]:
                self._put(self.slot_of[victim], e, w)

    def _biases(self) -> tuple[mx.array, mx.array]:
        if self._slot_bias is None:
            experts = np.zeros(self.slots, dtype=np.int32)
            for e, s in self.slot_of.items():
                experts[s] = e
            sel = mx.array(experts)
            object.__setattr__(self, "_slot_bias", (self.gate_up_proj_bias[sel], self.down_proj_bias[sel]))
            mx.eval(self._slot_bias)
        return self._slot_bias

    def __call__(self, x, expert_ids, expert_weights, *, limit, alpha, backend):
        ids = np.array(expert_ids)  # evaluates the step up to the router
        if self._first:
            self._stats.tokens += ids.shape[0]
        self.counts += np.bincount(ids.reshape(-1), minlength=self.num_experts)
        order = np.unique(ids)
        missing = [int(e) for e in order if int(e) not in self.slot_of]
        self._stats.hits += len(order) - len(missing)
        self._stats.misses += len(missing)
        if not missing and ids.size < kernels.SORT_THRESHOLD:
            slot = np.vectorize(self.slot_of.__getitem__, otypes=[np.uint32])(ids)
            gate_b, down_b = self._biases()
            w = self._store
            y = kernels.moe(x, (w[0], w[1], gate_b), (w[2], w[3], down_b), mx.array(slot), expert_weights,
                            limit=limit, alpha=alpha, backend=backend)
            mx.eval(y)
            return y
        before = self._reader.bytes_read
        read = {e: self._read(e) for e in missing}
        self._stats.bytes_streamed += self._reader.bytes_read - before
        ws = [read[int(e)] if int(e) in read else tuple(buf[self.slot_of[int(e)]] for buf in self._store)
              for e in order]
        stacked = [mx.stack([w[i] for w in ws]) for i in range(4)]
        mx.eval(stacked)  # done with the slot arrays before any of them is updated in place
        del ws
        used = set(order.tolist())
        for e, w in read.items():
            self._admit(e, w, used)
        sel = mx.array(order.astype(np.int32))
        local = mx.array(np.searchsorted(order, ids).astype(np.uint32))  # order-preserving renumbering
        y = kernels.moe(x, (stacked[0], stacked[1], self.gate_up_proj_bias[sel]),
                        (stacked[2], stacked[3], self.down_proj_bias[sel]), local, expert_weights,
                        limit=limit, alpha=alpha, backend=backend)
        mx.eval(y)  # free this step's stacked experts before the next layer reads its own
        return y

    @property
    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in self._store)
