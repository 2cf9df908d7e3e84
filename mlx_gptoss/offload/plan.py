"""The offload plan: when a model does not fit resident, which levers make it fit, cheapest first.

Levers, in order of cost (what the user gives up):
  1. embedding: the embedding table stays in the checkpoint file; each step reads its tokens' rows.
     Exact, and costs one row read per token: free.
  2. kv8: an 8-bit KV cache for the full-attention layers (offload.kv). No speed cost; a small, measured
     logit error (README "Running where it does not fit"). Saves memory in proportion to the context.
  3. attention8: 8-bit attention and unembedding weights (offload.quantized). Faster if anything; a small,
     measured logit error.
  4. experts: expert streaming (offload.experts) with as many experts resident as still fit. Exact, but
     every miss reads an expert from the SSD: the cost is speed, and it grows as the resident share falls.
The plan takes levers in this order until the model fits, and for the last one keeps as many experts
resident as the budget allows, but at least MIN_RESIDENT_SHARE of them (--offload experts goes below).
Everything is arithmetic on the safetensors headers (memory.py's model of weights, KV cache, activations
and reserve), plus the streaming buffer: one step's experts of one layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .. import memory
from ..errors import GptOssError
from ..memory import Budget, Checkpoint, Plan, gb
from .experts import expert_bytes
from .quantized import BITS, GROUP, quantized_bytes

OFFLOAD_MODES = ("auto", "none", "experts")
KV_BITS = (8, 16)
# "auto" keeps at least this share of each layer's experts resident: below it most routed experts come
# from the SSD every token (gpt-oss-120b on a 16 GB Mac: ~1.7 GB per token). --offload experts goes lower.
MIN_RESIDENT_SHARE = 0.25
# Streaming takes the largest prefill chunk that keeps at least this share of the most experts that could
# stay resident (with the smallest chunk).
STREAM_KEEP = 0.95
OFFLOAD_CONTEXT = 8192  # the context levers are chosen for when none was asked for and the model does not fit
LEVERS = ("embedding", "kv8", "attention8", "experts")


def kv_group(head_dim: int) -> int:
    """Quantization group of the 8-bit KV cache: a whole head (64) when it divides head_dim."""
    return GROUP if head_dim % GROUP == 0 else 32


@dataclass(frozen=True)
class Levers:
    embedding: bool = False  # embedding rows read from the checkpoint file
    kv_bits: int = 16  # full-attention layers' KV cache
    weight_bits: int = 16  # attention + unembedding weights (16 = as loaded)
    expert_slots: int | None = None  # resident experts per layer when streaming (None: all, no streaming)

    @property
    def active(self) -> bool:
        return self.embedding or self.kv_bits != 16 or self.weight_bits != 16 or self.expert_slots is not None

    def names(self) -> list[str]:
        on = (self.embedding, self.kv_bits == 8, self.weight_bits == 8, self.expert_slots is not None)
        return [n for n, v in zip(LEVERS, on) if v]


@dataclass
class OffloadPlan(Plan):
    """memory.Plan with levers: weights/KV/activations are the levered figures; the activations include the
    streaming buffer (one prefill step's experts of one layer, `stream_buffer`) when the MoE block sets the
    peak. streamed_per_token estimates decode's reads (layers x k x miss rate x expert bytes) with the miss
    rate of uniform routing (1 - resident share)."""

    levers: Levers = field(default_factory=Levers)
    resident_weights: dict = field(default_factory=dict)  # by part, without levers (what `none` would need)
    stream_buffer: int = 0
    expert_bytes: int = 0
    streamed_per_token: int = 0

    @property
    def resident_share(self) -> float:
        s = self.levers.expert_slots
        return 1.0 if s is None else s / self.config.num_local_experts

    def lever_notes(self) -> list[str]:
        lv, cfg, out = self.levers, self.config, []
        if lv.embedding:
            saved = gb(self.resident_weights["embedding"])
            out.append(f"embedding read from the checkpoint file (exact; saves {saved})")
        if lv.kv_bits == 8:
            out.append("8-bit KV cache in the full-attention layers (small logit error, see README)")
        if lv.weight_bits == 8:
            saved = sum(self.resident_weights[p] - self.weights[p] for p in ("attention", "unembedding"))
            out.append(f"8-bit attention and unembedding weights (saves {gb(saved)}; small logit error, see README)")
        if lv.expert_slots is not None:
            out.append(f"experts: {self.resident_share:.0%} resident ({lv.expert_slots} of {cfg.num_local_experts} "
                       f"per layer, exact), ~{gb(self.streamed_per_token)} streamed per token from SSD "
                       "(at the miss rate of uniform routing)")
        return out

    @property
    def message(self) -> str:
        if not self.levers.active:
            return super().message
        levers = "; ".join(self.lever_notes())
        if not self.fits and self.min_needed <= self.budget.usable:  # only under MIN_RESIDENT_SHARE
            return (f"{self.checkpoint} does not fit well: even with every lever ({levers}) only "
                    f"{self.resident_share:.0%} of its experts stay resident at a context of "
                    f"{self.requested_context:,} tokens (auto wants at least {MIN_RESIDENT_SHARE:.0%}). "
                    + " ".join(self.remedies)).strip()
        only_kv8 = self.levers.names() == ["kv8"]  # a KV width, not offloading: nothing leaves memory
        with_what = "with an 8-bit KV cache" if only_kv8 else "with offloading"
        if not self.fits:
            return (f"{self.checkpoint} does not fit even {with_what} ({levers}): it needs "
                    f"{gb(self.min_needed)} at a context of {self.requested_context:,} tokens, and "
                    f"{gb(self.budget.usable)} is available ({self.budget.source}). " + " ".join(self.remedies)).strip()
        head = f"{self.checkpoint} fits {with_what} at a context of {self.context:,} tokens"
        if self.status == "smaller context":
            tried = "asked for" if self.context_asked else "planned for when no --ctx is given"
            head += f" (not the {self.requested_context:,} {tried}: run with --ctx {self.context})"
        return (f"{head}: {gb(self.needed)} needed, {gb(self.budget.usable)} available ({self.budget.source}). "
                + (f"Levers, cheapest first: {levers}." if not only_kv8 else f"{levers[0].upper()}{levers[1:]}."))


def check_options(offload, kv_bits: int | None) -> None:
    if isinstance(offload, Levers):
        if offload.kv_bits not in KV_BITS or offload.weight_bits not in KV_BITS:
            raise GptOssError(f"{offload}: kv_bits and weight_bits are 8 or 16")
        return
    if offload not in OFFLOAD_MODES:
        raise GptOssError(f"--offload {offload!r}: use one of {', '.join(OFFLOAD_MODES)}")
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise GptOssError(f"--kv-bits {kv_bits!r}: use 8 or 16")


def _is_mxfp4(ckpt: Checkpoint) -> bool:
    return any(n.endswith("_blocks") for n in ckpt.tensors)


def stream_buffer(cfg, expert_bytes: int, slots: int, chunk: int) -> int:
    """One prefill step of one layer (offload.experts): the experts it uses, stacked, and those it reads."""
    step = min(cfg.num_local_experts, chunk * cfg.num_experts_per_tok)  # distinct experts a step can use
    return (step + min(step, cfg.num_local_experts - slots)) * expert_bytes


def sized(ckpt: Checkpoint, levers: Levers, context: int, dtype, metal: bool, budget: Budget,
          chunk: int | None = None) -> memory.Sizing:
    """Every figure of the plan at `context` tokens with `levers`, at prefill chunks of `chunk` tokens
    (default: the largest that fits)."""
    cfg = ckpt.config
    act = dtype.size
    base = ckpt.loaded_bytes(act)
    weights = dict(base)
    if levers.embedding:
        weights["embedding"] = 0
    if levers.weight_bits == 8:
        weights["attention"] = weights["unembedding"] = 0
        for t in ckpt.tensors.values():
            part = memory.part_of(t.name)
            if part == "unembedding" or (part == "attention" and t.name.endswith("_proj.weight")):
                weights[part] += quantized_bytes(*t.shape, act, BITS, GROUP)
            elif part == "attention":
                weights[part] += math.prod(t.shape) * act
    E = cfg.num_local_experts
    eb = expert_bytes(ckpt.tensors) if _is_mxfp4(ckpt) else 0
    buffer = None
    if levers.expert_slots is not None:
        slots = levers.expert_slots
        weights["experts"] = base["experts"] - cfg.num_hidden_layers * (E - slots) * eb

        def buffer(chunk):
            return stream_buffer(cfg, eb, slots, chunk)

    def at(n: int) -> memory.Sizing:
        return memory.size(ckpt, context, n, dtype, metal, budget, weights=weights, kv_bits=levers.kv_bits,
                           stream_buffer=buffer, embedding_mapped=levers.embedding, weight_bits=levers.weight_bits)

    return at(chunk) if chunk else memory.choose_chunk(at, budget.usable)


def make_offload_plan(ckpt: Checkpoint, *, context: int | None = None, memory_: str | int | None = None,
                      budget: Budget | None = None, dtype=None, metal: bool | None = None,
                      offload: "str | Levers" = "auto",
                      kv_bits: int | None = None, resident_experts: float | None = None) -> Plan:
    """The plan load() applies. offload: "auto" (levers only when the model does not fit resident),
    "none" (never), "experts" (stream experts even if they fit), or a Levers (exactly those). kv_bits: 8 or
    16 forces the KV cache width (None: the plan's choice). resident_experts: the share of each layer's
    experts kept resident when streaming (default: as many as fit)."""
    check_options(offload, kv_bits)
    if resident_experts is not None and not 0 <= resident_experts <= 1:
        raise GptOssError(f"resident_experts={resident_experts}: a share between 0 and 1")
    budget = budget or memory.machine_budget(memory_)
    base = memory.make_plan(ckpt, context=context, budget=budget, dtype=dtype, metal=metal)
    forced_stream = offload == "experts" or isinstance(offload, Levers) and offload.expert_slots is not None
    if forced_stream and not _is_mxfp4(ckpt):
        raise GptOssError(f"--offload experts: {ckpt.name} has unquantized (bf16) experts; streaming reads MXFP4 "
                          "experts as stored. Use an MXFP4 checkpoint (the openai/gpt-oss-* repos are)")
    if offload == "none" and kv_bits != 8 or (offload == "auto" and kv_bits != 8 and base.status == "fits"):
        return base
    if offload == "auto" and kv_bits != 8 and base.status == "smaller context" and context is None:
        return base  # fits resident at a shorter context: no lever needed to run

    metal = base.fused_attention
    dt = memory._dtype(base.dtype, metal)
    E, k = ckpt.config.num_local_experts, ckpt.config.num_experts_per_tok
    eb = expert_bytes(ckpt.tensors) if _is_mxfp4(ckpt) else 0
    fixed_slots = None if resident_experts is None else round(resident_experts * E)

    def build(lv: Levers, ctx: int, chunk: int | None = None) -> OffloadPlan:
        s = sized(ckpt, lv, ctx, dt, metal, budget, chunk)
        fits = s.needed <= budget.usable
        slots = lv.expert_slots
        p = s.plan(ckpt, base.dtype, metal, budget, ctx, ctx if fits else 0, "fits" if fits else "does not fit",
                   cls=OffloadPlan, levers=lv, resident_weights=ckpt.loaded_bytes(dt.size), expert_bytes=eb,
                   stream_buffer=0 if slots is None else stream_buffer(ckpt.config, eb, slots, s.chunk),
                   streamed_per_token=0 if slots is None else
                   round(ckpt.config.num_hidden_layers * k * (1 - slots / E) * eb))
        p.min_needed = s.needed
        p.context_asked = context is not None
        return p

    if isinstance(offload, Levers):  # chosen by the caller (benchmarks, experiments): only checked
        p = build(offload, base.requested_context if context is not None else base.context or
                  min(OFFLOAD_CONTEXT, ckpt.config.context_length))
        if not p.fits:
            p.status, p.context = "does not fit", 0
        return p

    def most_slots(lv: Levers, ctx: int, chunk: int | None = None) -> int | None:
        """The most resident experts per layer that fit (None: not even none), at `chunk` or any chunk."""
        if not build(replace(lv, expert_slots=0), ctx, chunk).fits:
            return None
        lo, hi = 0, E  # needed grows with slots
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if build(replace(lv, expert_slots=mid), ctx, chunk).fits else (lo, mid - 1)
        return lo

    def with_experts(lv: Levers, ctx: int) -> OffloadPlan:
        """Streaming with the most resident experts that fit (or the share asked for), at the largest prefill
        chunk that keeps at least STREAM_KEEP of that most: a prefill step reads every missing expert its
        tokens route to, so 16-token chunks read ~30x what 512-token ones do, for a few experts more."""
        if fixed_slots is not None:
            return build(replace(lv, expert_slots=fixed_slots), ctx)
        best = most_slots(lv, ctx)
        if best is None:
            return build(replace(lv, expert_slots=0), ctx)
        chunk = memory.PREFILL_CHUNK
        while chunk > memory.MIN_PREFILL_CHUNK:
            slots = most_slots(lv, ctx, chunk)
            if slots is not None and slots >= STREAM_KEEP * best:
                return build(replace(lv, expert_slots=slots), ctx, chunk)
            chunk //= 2
        return build(replace(lv, expert_slots=best), ctx)

    # kv_bits=8 on a model that fits resident, no context asked for: the 8-bit cache alone, for more context
    only_kv = context is None and kv_bits == 8 and not forced_stream and base.status != "does not fit"

    def choose(ctx: int) -> OffloadPlan:
        lv = Levers(kv_bits=kv_bits or 16)
        if forced_stream:
            return with_experts(lv, ctx)
        p = build(lv, ctx)
        if p.fits or offload == "none" or only_kv:
            return p
        for name in LEVERS:
            if name == "embedding":
                lv = replace(lv, embedding=True)
            elif name == "kv8" and kv_bits is None:
                lv = replace(lv, kv_bits=8)
            elif name == "attention8":
                lv = replace(lv, weight_bits=8)
            elif name == "experts":
                if not _is_mxfp4(ckpt):
                    break
                p = with_experts(lv, ctx)
                if p.fits and p.levers.expert_slots < math.ceil(MIN_RESIDENT_SHARE * E):
                    p.status, p.context = "does not fit", 0
                    p.remedies = [f"Streaming could run it with {p.resident_share:.0%} of the experts resident, "
                                  f"reading ~{gb(p.streamed_per_token)} per token from the SSD (slow); "
                                  "`--offload experts` does that."]
                return p
            p = build(lv, ctx)
            if p.fits:
                return p
        return p

    full = ckpt.config.context_length
    if context is not None:
        target = base.requested_context
    elif only_kv:
        target = None  # the largest context that fits
    else:  # as much context as resident would get, or a usual chat's when it does not fit resident
        target = base.context if base.fits else min(OFFLOAD_CONTEXT, full)
    if target is None:
        target = full // memory.CONTEXT_STEP * memory.CONTEXT_STEP or full
    p = choose(target)
    if p.fits:
        return p
    if base.fits and offload == "auto" and kv_bits is None:
        return base  # the levers cannot reach the context asked for; a smaller one fits resident
    for ctx in memory.smaller_contexts(target):  # the largest context that fits, as memory.make_plan
        p = choose(ctx)
        if p.fits:
            p.status, p.requested_context = "smaller context", target
            return p
    p.status, p.context = "does not fit", 0
    p.remedies += [r for r in base.remedies if "--ctx" not in r]
    return p


def plan(model, *, context: int | None = None, memory_: str | int | None = None, dtype=None,
         device: str | None = None, offload: str = "auto", kv_bits: int | None = None) -> Plan:
    """memory.plan() with the levers: the plan for a model folder or hub repo id on this machine, or for
    `device` (memory.device_budget: e.g. "metal" plans for a Mac from another machine)."""
    check_options(offload, kv_bits)
    budget = memory.device_budget(device, memory_)  # a bad --device or --memory is said before any file is read
    return make_offload_plan(memory.read_checkpoint(model), context=context, budget=budget, dtype=dtype,
                             offload=offload, kv_bits=kv_bits)
