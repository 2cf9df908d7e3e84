"""The unified-memory plan: will this checkpoint fit, at which context, and if not, what to do about it.

Everything is sized from the safetensors headers and config.json (no tensor data is read), so a plan can be
made for a checkpoint whose weights are not downloaded yet. The peak MLX allocates at a context of C tokens:

    weights (as loaded: MXFP4 expert bytes as stored, every float tensor in the activation dtype)
  + KV cache: the full-attention layers' C tokens (their caches grow in 256-token steps, so up to one step
              more), the sliding-window layers' window + one prefill chunk, and the Runner's window snapshots
  + activations: the transient of one prefill chunk at the end of that context: the residual stream, a
              full-attention cache's growth, attention (score matrices unless fused) and the share of the
              MoE block's routed rows alive with it (with expert streaming: the larger of attention and the
              MoE block with the step's streamed experts)
  + loading: what converting the weights needs beyond that, when it is more (float32 from bf16 files)
  + reserve: memory the process needs outside MLX's buffers, counted only when the budget is this machine's
              available RAM (a --memory or Metal budget bounds MLX's allocations: mx.set_memory_limit)

The attention and MoE transients are multiples of their shapes measured once per machine on the exact ops
(memory_costs.py; cached like the kernel self-test); a plan for another backend uses the multiples the ops
name. The prefill chunk is the largest (up to PREFILL_CHUNK) with which the plan fits: a tight budget gets a
smaller chunk before a smaller context. tests/test_memory_calibration.py checks planned against
mx.get_peak_memory() in fresh processes: never under, at most 10% over.

The budget is MLX's recommended GPU working set on a Mac, available RAM elsewhere, or `--memory SIZE`.
`apply()` turns a plan into MLX memory limits and a context cap; load() and chat use it.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx

from .config import GptOssConfig
from .errors import CheckpointError, GptOssError
from .memory_costs import Costs, costs as measured_costs
from .safetensors_header import DTYPE_BYTES, TensorInfo

PARTS = ("experts", "attention", "embedding", "unembedding", "other")
PREFILL_CHUNK = 512  # tokens per prefill step where that fits (mlx-lm uses 512-2048); the engine uses plan.prefill_chunk
MIN_PREFILL_CHUNK = 16  # below this a prefill step is mostly fixed cost: a smaller context is the better cut
KV_STEP = 256  # mlx-lm's KVCache (and offload.kv's) grow by this many tokens at a time
MAX_SNAPSHOTS = 8  # chat.Runner keeps this many copies of the sliding-window layers (chat.MAX_SNAPSHOTS)
ROUTED_SORT = 64  # kernels.SORT_THRESHOLD: from this many (token, expert) rows the MoE block sorts them
# The process outside MLX's buffers (Python, the tokenizer, harmony's encoding, MLX's own runtime): counted
# only against a budget of available RAM, which they share with MLX. 0.5 GiB: the imports alone hold 0.27 GB
# of RSS here (measured); the tokenizer and harmony's encoding (200k tokens each) come on top, and no real
# tokenizer is available on this machine to measure them.
RESERVE = 1 << 29
CONTEXT_STEP = 1024  # a reduced context is rounded down to a multiple of this
MIN_CONTEXT = 2048  # below this a chat does not fit its own system prompt and a few turns: "does not fit"
GIB, MIB = 1 << 30, 1 << 20


class ContextLengthError(GptOssError):
    """A prompt longer than the context the memory plan allows."""


# --------------------------------------------------------------------------------------------- sizes


def parse_size(text: str | int | float) -> int:
    """'16GB' -> 16e9 bytes, '16GiB' -> 16 * 2^30, '512MB', '1.5T'; a bare number is GB."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise GptOssError(f"--memory {text!r}: not a size; write it like 16GB, 24GiB or 64G")
    unit = (m.group(2) or "g").lower()
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "bkmgt".index(unit))


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------ checkpoint sizes


def part_of(name: str) -> str:
    if ".mlp.experts." in name:
        return "experts"
    if ".self_attn." in name:
        return "attention"
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "unembedding"
    return "other"  # norms, router


def loaded_bytes(info: TensorInfo, act_bytes: int) -> int:
    """Bytes of one tensor once loaded (mlx_gptoss.checkpoint.load_weights): MXFP4 blocks and scales are
    kept as stored (a byte view), bf16 experts are quantized to MXFP4 (17 bytes per 32 values), every
    other tensor is cast to the activation dtype."""
    n = math.prod(info.shape)
    if part_of(info.name) == "experts" and info.name.endswith(("_blocks", "_scales")):
        return info.nbytes
    if part_of(info.name) == "experts" and info.name.endswith(("gate_up_proj", "down_proj")):
        return n // 2 + n // 32
    return n * act_bytes


@dataclass
class Checkpoint:
    """What the planner knows of a checkpoint: its config and its tensors' headers."""

    name: str
    config: GptOssConfig
    tensors: dict[str, TensorInfo]
    source: str  # "headers" (local files) or "hub metadata"

    def file_bytes(self) -> dict[str, int]:
        out = dict.fromkeys(PARTS, 0)
        for t in self.tensors.values():
            out[part_of(t.name)] += t.nbytes
        return out

    def loaded_bytes(self, act_bytes: int) -> dict[str, int]:
        out = dict.fromkeys(PARTS, 0)
        for t in self.tensors.values():
            out[part_of(t.name)] += loaded_bytes(t, act_bytes)
        return out


def read_checkpoint(model: str | Path) -> Checkpoint:
    """A local folder (weights downloaded or not, as long as the headers are), a hub repo id that is in
    the local cache, or else a hub repo id sized from the hub's safetensors metadata (network)."""
    from . import hub

    p = Path(str(model)).expanduser()
    if p.exists() or hub.looks_like_path(str(model)):
        return local_checkpoint(hub.resolve(str(model), allow_download=False))
    folder = _cached_snapshot(str(model))
    if folder is not None:
        return local_checkpoint(folder, name=str(model))
    return _hub_checkpoint(str(model))


def local_checkpoint(folder: Path, name: str | None = None, *, check_size: bool = False) -> Checkpoint:
    """config.json and every tensor header of a local folder, checked against each other. The planner
    leaves check_size off (the data may be absent: only sizes matter); load() turns it on."""
    from .checkpoint import check_tensors, read_tensor_index

    cfg = GptOssConfig.from_file(folder / "config.json")
    tensors = read_tensor_index(folder, check_size=check_size)
    check_tensors(cfg, tensors)
    return Checkpoint(name or str(folder), cfg, tensors, "headers")


def _cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of repo_id in the HF cache if it holds config.json (weights may be partial)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed repo id, an unreadable cache: not cached
        return None
    if not isinstance(cfg, str):
        return None
    folder = Path(cfg).parent
    index = folder / "model.safetensors.index.json"
    try:
        names = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else set()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if names and not all((folder / n).is_file() for n in names):
        return None  # shards missing from the cache: the hub's metadata knows their headers
    return folder if names or any(folder.glob("*.safetensors")) else None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within `timeout` seconds (name lookup
    included), so that "no network" is said at once rather than after huggingface_hub's retries."""
    import socket
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def connect():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except (OSError, UnicodeError):
            pass

    probe = threading.Thread(target=connect, daemon=True)  # a name lookup has no timeout of its own
    probe.start()
    probe.join(timeout)
    return bool(ok)


def _hub_checkpoint(repo_id: str) -> Checkpoint:
    from huggingface_hub import get_safetensors_metadata, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from .checkpoint import check_tensors
    from .hub import _offline, check_repo_id

    check_repo_id(repo_id)
    if _offline():
        raise GptOssError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; unset it "
                          "to read the headers from the hub, or pass a local folder")
    if not hub_reachable():
        raise GptOssError(f"{repo_id}: not in the local Hugging Face cache, and the Hugging Face hub cannot be "
                          "reached (no network?); connect and run again, or pass a local folder")
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # a few kB of headers: no bar
    try:
        cfg = GptOssConfig.from_file(hf_hub_download(repo_id, "config.json"))
        meta = get_safetensors_metadata(repo_id)
    except GptOssError:
        raise
    except GatedRepoError:
        raise GptOssError(f"{repo_id}: a gated model; accept its terms on huggingface.co and log in "
                          "(`hf auth login`), or pass a local folder") from None
    except RepositoryNotFoundError:
        raise GptOssError(f"{repo_id}: no such model on the Hugging Face hub (or it is private)") from None
    except Exception:  # a connection lost half-way, HTTP errors: one message
        raise GptOssError(f"{repo_id}: cannot read its safetensors headers from the Hugging Face hub; check the "
                          "connection and run again, or pass a local folder") from None
    finally:
        if not quiet:
            enable_progress_bars()
    tensors = {}
    for fname, fm in meta.files_metadata.items():
        for tname, t in fm.tensors.items():
            if t.dtype not in DTYPE_BYTES:
                raise CheckpointError(f"{repo_id}/{fname}: tensor {tname}: unknown dtype {t.dtype!r}")
            lo, hi = t.data_offsets
            tensors[tname] = TensorInfo(tname, t.dtype, tuple(t.shape), Path(fname), lo, hi)
    check_tensors(cfg, tensors)
    return Checkpoint(repo_id, cfg, tensors, "hub metadata")


# ------------------------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """How many bytes the model may use, where that number comes from, and the machine's memory."""

    usable: int
    source: str
    total: int | None = None  # physical memory, when known
    metal: bool = False  # a Mac GPU: the macOS wired limit applies and can be raised with sysctl


def machine_budget(memory: str | int | None = None) -> Budget:
    metal = mx.metal.is_available()
    info = mx.device_info() if metal else {}
    total = info.get("memory_size")
    if memory is not None:
        n = parse_size(memory)
        return Budget(n, f"--memory {memory}" if isinstance(memory, str) else "memory=", total, metal)
    if metal and info.get("max_recommended_working_set_size"):
        return Budget(int(info["max_recommended_working_set_size"]), "Metal recommended working set", total, True)
    import psutil

    vm = psutil.virtual_memory()
    return Budget(int(vm.available), "available RAM", int(vm.total), False)


def mac_budget(total: int, label: str) -> Budget:
    """The budget of a Mac with `total` bytes of memory, planned from another machine: macOS's default GPU
    working set (recommendedMaxWorkingSetSize), about 2/3 of the memory up to 32 GiB and 3/4 above."""
    usable = total * 2 // 3 if total <= 32 * GIB else total * 3 // 4
    return Budget(int(usable), f"the default GPU working set of a Mac with {label}", total, metal=True)


def device_budget(device: str | None, memory: str | int | None) -> Budget:
    """The budget for `device`: None/"auto" this machine; "metal" a Mac (this one, or one with --memory of
    memory); "cpu" MLX's CPU backend on this machine (or --memory)."""
    if device in (None, "auto"):
        return machine_budget(memory)
    if device == "metal":
        if memory is None:
            if not mx.metal.is_available():
                raise GptOssError("--device metal on a machine without Metal: give the Mac's memory with --memory, "
                                  "like --memory 16GiB")
            return machine_budget()
        return mac_budget(parse_size(memory), f"{memory} of memory" if isinstance(memory, str) else f"{gb(memory)}")
    if device == "cpu":
        b = machine_budget(memory)
        return Budget(b.usable, b.source, b.total, metal=False)
    raise GptOssError(f"--device {device!r}: use auto, metal or cpu")


def macos_reserve(total: int) -> int:
    """Memory left to macOS, Python and other apps when raising the GPU wired limit: wired memory cannot be
    paged out, so keep at least 2 GiB, and 1/8 of larger machines."""
    return max(2 * GIB, total // 8)


# --------------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    checkpoint: str
    source: str
    config: GptOssConfig
    dtype: str
    fused_attention: bool
    file_bytes: dict[str, int]
    weights: dict[str, int]  # as loaded, by part
    kv_per_token: int  # full-attention layers, per token of context
    kv_sliding: int  # sliding-window layers: the live window + one chunk, and the Runner's snapshots
    prefill_chunk: int
    activations: int  # the largest transient of a prefill chunk at the planned context (see activations_note)
    overhead: int  # the reserve outside MLX's buffers (RESERVE, only against a budget of available RAM)
    budget: Budget
    requested_context: int
    context: int  # the planned context (0: nothing fits)
    status: str  # "fits" | "smaller context" | "does not fit"
    remedies: list[str] = field(default_factory=list)
    min_needed: int = 0  # what the smallest useful context (MIN_CONTEXT) needs
    context_asked: bool = True  # False: no --ctx was given (the model's full context was tried)
    kv_slack: int = 0  # tokens a full-attention cache may hold beyond the context (it grows in KV_STEP steps)
    loading: int = 0  # what loading needs beyond the running peak (0 when running needs more)
    activations_note: str = ""
    loading_note: str = ""
    decode_activations: int = 0  # transient of one sequence's decode step at the planned context
    costs: Costs | None = None  # the measured (or first-principles) multiples the activations come from

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def kv_bytes(self) -> int:
        return self.kv_per_token * (self.context + self.kv_slack) + self.kv_sliding

    @property
    def needed(self) -> int:
        """The planned peak: every term the plan names, added."""
        return self.weight_bytes + self.kv_bytes + self.activations + self.loading + self.overhead

    @property
    def peak(self) -> int:
        """What MLX's allocator will peak at (mx.get_peak_memory()): needed without the reserve."""
        return self.needed - self.overhead

    @property
    def fits(self) -> bool:
        return self.status != "does not fit"

    def terms(self) -> list[tuple[str, int, str]]:
        """(name, bytes, one line on what it is) for every term of `needed`, in order; they add up to it."""
        n_full = sum(t == "full_attention" for t in self.config.layer_types)
        ctx = self.context or min(MIN_CONTEXT, self.requested_context)
        out = [("weights", self.weight_bytes, f"as loaded, {self.dtype} (MXFP4 experts as stored)"),
               ("KV cache", self.kv_per_token * (ctx + self.kv_slack) + self.kv_sliding,
                f"{n_full} full-attention layers x {ctx:,} tokens (+{self.kv_slack} of growth step), "
                f"{len(self.config.layer_types) - n_full} sliding-window layers' window + chunk + snapshots"),
               ("activations", self.activations, self.activations_note)]
        if self.loading:
            out.append(("loading", self.loading, self.loading_note))
        if self.overhead:
            out.append(("reserve", self.overhead, "Python, tokenizer and MLX runtime outside MLX's buffers "
                        "(counted against available RAM only)"))
        return out

    def sum_line(self) -> str:
        """'weights 13.8 GB + KV cache 3.2 GB + activations 0.3 GB = 17.3 GB': every term, adding up."""
        return " + ".join(f"{name} {gb(n)}" for name, n, _ in self.terms()) + f" = {gb(self.needed)}"

    @property
    def message(self) -> str:
        """The decision in one or two plain sentences, with the remedies."""
        name = self.checkpoint
        if self.status == "fits":
            return (f"{name} fits: {gb(self.needed)} needed at a context of {self.context:,} tokens, "
                    f"{gb(self.budget.usable)} available ({self.budget.source}).")
        if self.status == "smaller context":
            asked = (f"not the {self.requested_context:,} asked for" if self.context_asked else
                     f"not the model's full {self.requested_context:,}")
            return (f"{name} fits with a context of at most {self.context:,} tokens ({asked}): "
                    f"{gb(self.needed)} needed, {gb(self.budget.usable)} available "
                    f"({self.budget.source}). Run with --ctx {self.context}"
                    + (", or: " + " ".join(self.remedies) if self.remedies else "."))
        return (f"{name} does not fit: it needs {gb(self.min_needed)} even at a context of {MIN_CONTEXT:,} tokens, "
                f"and {gb(self.budget.usable)} is available ({self.budget.source}). " + " ".join(self.remedies))


def smaller_contexts(target: int):
    """The contexts to try, largest first, when `target` does not fit: multiples of CONTEXT_STEP below it,
    down to MIN_CONTEXT."""
    ctx = target // CONTEXT_STEP * CONTEXT_STEP
    if ctx == target:
        ctx -= CONTEXT_STEP
    while ctx >= MIN_CONTEXT:
        yield ctx
        ctx -= CONTEXT_STEP


def make_plan(ckpt: Checkpoint, *, context: int | None = None, budget: Budget | None = None,
              memory: str | int | None = None, dtype: mx.Dtype | str | None = None,
              metal: bool | None = None, ranks_remedy: bool = True) -> Plan:
    """The plan for ckpt at `context` tokens (default: the model's full context) within the budget.
    metal: plan for the Metal backend (fused attention; default bf16) rather than MLX's CPU backend."""
    cfg = ckpt.config
    budget = budget or machine_budget(memory)
    metal = budget.metal if metal is None else metal
    dtype = _dtype(dtype, metal)
    requested = cfg.context_length if context is None else int(context)
    if requested < 1:
        raise GptOssError(f"--ctx {requested}: the context must be at least 1 token")
    if requested > cfg.context_length:
        raise GptOssError(f"--ctx {requested}: more than {ckpt.name}'s context length of {cfg.context_length:,} "
                          "tokens (config.json max_position_embeddings)")
    at = _sizer(ckpt, dtype, metal, budget)
    ctx = requested
    s = at(ctx)
    status = "fits"
    if s.needed > budget.usable:
        status = "does not fit"
        for ctx in smaller_contexts(requested):
            s = at(ctx)
            if s.needed <= budget.usable:
                status = "smaller context"
                break
    plan = s.plan(ckpt, _dtype_name(dtype), metal, budget, requested, ctx if status != "does not fit" else 0, status)
    plan.context_asked = context is not None
    smallest = at(min(MIN_CONTEXT, requested))
    plan.min_needed = smallest.needed
    if status == "does not fit":  # show what the smallest useful context would take
        plan = smallest.plan(ckpt, _dtype_name(dtype), metal, budget, requested, 0, status)
        plan.context_asked, plan.min_needed = context is not None, smallest.needed
    if status != "fits":
        plan.remedies = remedies(plan, at)
        if dtype != mx.bfloat16:  # the Mac's activation dtype: half the bytes for every float tensor and the KV
            half = make_plan(ckpt, context=requested, budget=budget, dtype=mx.bfloat16, metal=metal,
                             ranks_remedy=False)
            if half.fits:
                where = f"at its full {requested:,}-token context" if half.status == "fits" else \
                    f"at a context of {half.context:,} tokens"
                plan.remedies.insert(0, f"In bfloat16 (`--dtype bfloat16`, the default on a Mac) it fits {where}"
                                     + (" (on MLX's CPU backend bf16 runs several times slower)." if not metal
                                        else "."))
    if status == "does not fit" and ranks_remedy:
        plan.remedies += _ranks_remedy(ckpt, context=context, budget=budget, dtype=dtype, metal=metal)
    return plan


def _ranks_remedy(ckpt: Checkpoint, **kw) -> list[str]:
    """Sharding over several Macs (mlx_gptoss.distributed): the fewest whose per-Mac plan fits this budget."""
    from .distributed.layout import fewest_ranks

    n = fewest_ranks(ckpt, lambda view: make_plan(view, ranks_remedy=False, **kw).fits)
    if n is None:
        return []
    return [f"Or split it over {n} such Macs with mlx.launch (README: Two Macs); `gptoss-mac plan --ranks {n}` "
            "shows what each needs."]


# ------------------------------------------------------------------------------- the terms, sized


@dataclass
class Sizing:
    """Every figure of a plan at one context and prefill chunk (levers included: offload/plan.py)."""

    weights: dict[str, int]
    kv_per_token: int
    kv_slack: int
    kv_sliding: int
    chunk: int
    context: int
    activations: int
    activations_note: str
    loading: int
    loading_note: str
    overhead: int
    decode_activations: int
    costs: Costs

    @property
    def needed(self) -> int:
        return (sum(self.weights.values()) + self.kv_per_token * (self.context + self.kv_slack) + self.kv_sliding
                + self.activations + self.loading + self.overhead)

    def plan(self, ckpt: Checkpoint, dtype: str, metal: bool, budget: Budget, requested: int, context: int,
             status: str, cls=None, **extra) -> Plan:
        return (cls or Plan)(
            ckpt.name, ckpt.source, ckpt.config, dtype, metal, ckpt.file_bytes(), self.weights, self.kv_per_token,
            self.kv_sliding, self.chunk, self.activations, self.overhead, budget, requested, context, status,
            kv_slack=self.kv_slack, loading=self.loading, activations_note=self.activations_note,
            loading_note=self.loading_note, decode_activations=self.decode_activations, costs=self.costs, **extra)


def reserve(budget: Budget) -> int:
    """RESERVE against a budget of this machine's available RAM; nothing against a --memory or Metal budget,
    which bound MLX's own allocations (apply() sets mx.set_memory_limit to it)."""
    return RESERVE if budget.source == "available RAM" else 0


def size(ckpt: Checkpoint, context: int, chunk: int, dtype: mx.Dtype, metal: bool, budget: Budget, *,
         weights: dict[str, int] | None = None, kv_bits: int = 16, stream_buffer=None,
         embedding_mapped: bool = False, weight_bits: int = 16) -> Sizing:
    """The plan's figures at `context` with prefill chunks of `chunk` tokens. The levers (offload/plan.py)
    pass their weights, the KV width, the streaming buffer (a function of the chunk) and what load skips."""
    cfg, act = ckpt.config, dtype.size
    c = measured_costs(dtype, metal)
    n_full = sum(t == "full_attention" for t in cfg.layer_types)
    n_sliding = len(cfg.layer_types) - n_full
    Hkv, D = cfg.num_key_value_heads, cfg.head_dim
    float_token = 2 * Hkv * D * act  # K and V of one layer
    if kv_bits == 8:
        from .offload.plan import kv_group  # the 8-bit cache's layout: 1 byte per value + scale, bias per group

        full_token = 2 * Hkv * (D + 2 * (D // kv_group(D)) * act)
    else:
        full_token = float_token
    weights = dict(ckpt.loaded_bytes(act) if weights is None else weights)
    slack = KV_STEP * math.ceil(chunk / KV_STEP) - 1
    window = min(cfg.sliding_window, context)
    sliding = n_sliding * float_token * (min(cfg.sliding_window + chunk, context + chunk) + MAX_SNAPSHOTS * window)
    buffer = stream_buffer(chunk) if stream_buffer else 0
    acts, note = _prefill_transient(cfg, chunk, context, act, c, kv_bits=kv_bits, layer_kv=full_token * (context + slack), buffer=buffer)
    running = n_full * full_token * (context + slack) + sliding + acts
    load, load_note = load_transient(ckpt, dtype, embedding_mapped=embedding_mapped, weight_bits=weight_bits)
    decode = _decode_transient(cfg, context, act, c, kv_bits=kv_bits)
    return Sizing(weights, n_full * full_token, slack, sliding, chunk, context, acts, note,
                  max(0, load - running), load_note, reserve(budget), decode, c)


def choose_chunk(sized, usable: int) -> Sizing:
    """sized(chunk) at the largest chunk, from PREFILL_CHUNK halving down to MIN_PREFILL_CHUNK, that fits
    `usable` (the smallest when none does): a tight budget costs prefill speed before it costs context."""
    chunk = PREFILL_CHUNK
    s = sized(chunk)
    while s.needed > usable and chunk > MIN_PREFILL_CHUNK:
        chunk //= 2
        s = sized(chunk)
    return s


def _sizer(ckpt: Checkpoint, dtype: mx.Dtype, metal: bool, budget: Budget):
    """at(ctx) -> the Sizing at a context of ctx tokens, with the largest prefill chunk that fits."""
    return lambda ctx: choose_chunk(lambda chunk: size(ckpt, ctx, chunk, dtype, metal, budget), budget.usable)


def plan(model: str | Path, *, context: int | None = None, memory: str | int | None = None,
         dtype: mx.Dtype | str | None = None, device: str | None = None) -> Plan:
    """The plan for a model folder or hub repo id on this machine, or for `device` (see device_budget):
    nothing is loaded."""
    budget = device_budget(device, memory)  # a bad --device or --memory is said before any file is read
    return make_plan(read_checkpoint(model), context=context, budget=budget, dtype=dtype)


def _prefill_transient(cfg: GptOssConfig, chunk: int, context: int, act: int, c: Costs, *, kv_bits: int, layer_kv: int, buffer: int) -> tuple[int, str]:
    """Peak bytes of temporaries while one prefill chunk of T tokens runs at the end of `context`, and which
    part sets it: the residual stream (x, its norm, the attention output), a full-attention cache growing
    (concatenated: one layer's old copy exists with the new one), and
      attention: the chunk's q/k/v/o and the score matrices [heads, T, context] times the measured multiple
                 (scores, masked, with the sink column, softmax, the slice to the matmul; 0 where fused);
      MoE: the routed rows [T x k] times the measured multiples of hidden and intermediate size, plus the
           router's logits, plus (when experts stream) the step's stacked and read experts.
    MLX allocates the outputs of the ops it has queued before the earlier ones run and free theirs, so part of
    the MoE block's transient exists while attention's is alive: the measured overlap share of it is added.
    Streaming evaluates up to the router first (the experts to read are needed on the host), which frees
    attention's buffers: there it is the larger of the two.
    The chunk's logits are never computed (chat.Runner evaluates only the cache during prefill)."""
    T, H, D, Hq, Hkv = chunk, cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    k, I, E = cfg.num_experts_per_tok, cfg.intermediate_size, cfg.num_local_experts
    resid = 3 * T * H * act
    multiple, overlap = (c.attention_kv8, c.moe_overlap_kv8) if kv_bits == 8 else (c.attention, c.moe_overlap)
    attention = T * (2 * Hq + 2 * Hkv) * D * act + math.ceil(multiple * Hq * T * context * act)
    rows = T * k
    per_row = c.moe_hidden * H + c.moe_intermediate * I if rows >= ROUTED_SORT else 3 * (H + 2 * I)
    moe = math.ceil(rows * per_row * act) + 2 * T * E * act + buffer
    what_attn = f"attention of a {T}-token chunk over {context:,} keys" + (" (score matrices)" if multiple else "")
    what_moe = f"MoE block ({rows:,} routed rows" + (", the step's streamed experts)" if buffer else ")")
    if buffer:  # evaluated apart: the larger one
        name, peak = max(((what_attn, attention), (what_moe, moe)), key=lambda p: p[1])
    else:
        name, peak = f"{what_attn} + {overlap:.0%} of the {what_moe}", attention + math.ceil(overlap * moe)
    return resid + layer_kv + peak, f"peak of prefill: {name}; multiples: {c.source}"


def _decode_transient(cfg: GptOssConfig, context: int, act: int, c: Costs, *, kv_bits: int) -> int:
    """One sequence's decode step at `context`: its attention row, its k routed rows, the residual stream and
    the float32 logits. A batch of B sequences decoding together needs B times this (server scheduling)."""
    H, I, V, Hq = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_attention_heads
    multiple = c.attention_kv8 if kv_bits == 8 else c.attention
    return (math.ceil(multiple * Hq * context * act) + 3 * cfg.num_experts_per_tok * (H + 2 * I) * act
            + 3 * H * act + V * (act + 4))


def load_transient(ckpt: Checkpoint, dtype: mx.Dtype, *, embedding_mapped: bool = False,
                   weight_bits: int = 16) -> tuple[int, str]:
    """Bytes load() holds beyond the loaded weights while it converts them (api.load, checkpoint.load_weights):
    a float tensor stored in another dtype is read as stored, then converted; the embedding, the final norm
    and lm_head are evaluated together last; in a layer, one tensor at a time (8-bit attention: the layer's
    float attention until it is quantized); bf16 experts are quantized one expert at a time."""
    act = dtype.size
    stored_as = {mx.float32: "F32", mx.bfloat16: "BF16", mx.float16: "F16"}[dtype]
    top, layer, layer_attention = 0, 0, {}
    for t in ckpt.tensors.values():
        part = part_of(t.name)
        converted = 0 if t.dtype == stored_as else t.nbytes  # astype to its own dtype is no copy
        if part == "experts" and t.name.endswith(("_blocks", "_scales")):
            continue
        if part == "experts" and t.name.endswith(("gate_up_proj", "down_proj")):  # bf16 experts: quantized
            E = t.shape[0]
            per = math.prod(t.shape[1:])
            layer = max(layer, t.nbytes + E * (per // 2 + per // 32) + 20 * per * 4)
            continue
        if part in ("embedding", "unembedding") or ".layers." not in t.name:
            if (part == "embedding" and embedding_mapped) or (part == "unembedding" and weight_bits == 8):
                continue
            top += converted
        elif part == "attention" and weight_bits == 8:
            key = t.name.split(".self_attn.")[0]
            layer_attention[key] = layer_attention.get(key, 0) + math.prod(t.shape) * act + converted
        else:
            layer = max(layer, converted)
    biggest = max(layer, max(layer_attention.values(), default=0))
    if top >= biggest:
        return top, "loading: the embedding, norm and lm_head read as stored, then converted"
    return biggest, "loading: one layer's tensors read as stored, then converted or quantized"


def remedies(p: Plan, at) -> list[str]:
    out = []
    if p.status == "does not fit":
        if p.requested_context > MIN_CONTEXT:
            out.append(f"A smaller --ctx does not help enough (at --ctx {MIN_CONTEXT} it still needs "
                       f"{gb(p.min_needed)}).")
    b = p.budget
    if b.metal and b.total:
        cap = b.total - macos_reserve(b.total)
        want = p.min_needed if p.status == "does not fit" else at(p.requested_context).needed
        n_mb = math.ceil(want / (512 * MIB)) * 512  # MB, as sysctl wants; rounded up to 512
        if n_mb * MIB <= cap:
            out.append(f"Let the GPU use more of this Mac's {b.total / GIB:.0f} GB: "
                       f"`sudo sysctl iogpu.wired_limit_mb={n_mb}` (until reboot), then run again.")
        elif p.status == "does not fit" and p.min_needed <= cap:
            out.append(f"Let the GPU use more memory: `sudo sysctl iogpu.wired_limit_mb={cap // MIB}` (until reboot).")
        else:
            out.append(f"Even raising the GPU wired limit (at most ~{gb(cap)} on this "
                       f"{b.total / GIB:.0f} GB Mac, leaving macOS {gb(b.total - cap)}) is not enough.")
    if p.config.num_local_experts > 32 or p.weight_bytes > 30e9:
        small = _twenty_b_needed(p)
        verdict = "within" if small <= b.usable else "also more than"
        out.append(f"Use the 20b model: openai/gpt-oss-20b needs {gb(small)} at --ctx {min(p.requested_context, 8192)}, "
                   f"{verdict} this budget.")
    if b.source == "available RAM":
        out.append("Close other programs to free RAM.")
    return out


def _twenty_b_needed(p: Plan) -> int:
    """What gpt-oss-20b needs at an 8k context with this plan's dtype and backend: its tensors are known."""
    from .checkpoint import expected_tensors

    cfg = GptOssConfig.from_dict(GPT_OSS_20B, source="gpt-oss-20b")
    tensors = {}
    for name, (shape, dtypes) in expected_tensors(cfg, mxfp4=True).items():
        n = math.prod(shape) * DTYPE_BYTES[dtypes[0]]
        tensors[name] = TensorInfo(name, dtypes[0], shape, Path("-"), 0, n)
    ckpt = Checkpoint("openai/gpt-oss-20b", cfg, tensors, "config")
    # usable 0: the smallest prefill chunk, i.e. the least it needs (a larger budget only buys larger chunks)
    at = _sizer(ckpt, _dtype(p.dtype, p.fused_attention), p.fused_attention, replace(p.budget, usable=0))
    return at(min(p.requested_context, 8192)).needed


# The hub config of openai/gpt-oss-20b (fields the plan needs), for the "use the 20b model" remedy.
GPT_OSS_20B = {
    "model_type": "gpt_oss", "num_hidden_layers": 24, "num_local_experts": 32, "num_experts_per_tok": 4,
    "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880, "head_dim": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
    "max_position_embeddings": 131072, "rope_theta": 150000,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 4096, "truncate": False},
    "quantization_config": {"quant_method": "mxfp4"},
}


def _dtype(dtype, metal: bool) -> mx.Dtype:
    if dtype is None:
        return mx.bfloat16 if metal else mx.float32
    if isinstance(dtype, mx.Dtype):
        return dtype
    names = {"bfloat16": mx.bfloat16, "bf16": mx.bfloat16, "float16": mx.float16, "fp16": mx.float16,
             "float32": mx.float32, "fp32": mx.float32}
    if str(dtype).removeprefix("mlx.core.") not in names:
        raise GptOssError(f"dtype {dtype!r}: use bfloat16, float16 or float32")
    return names[str(dtype).removeprefix("mlx.core.")]


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


# ------------------------------------------------------------------------------------ applying a plan


def apply(p: Plan) -> dict[str, int]:
    """Refuse a plan that does not fit; otherwise set MLX's memory limits from it. Returns what was set."""
    if not p.fits:
        raise GptOssError(p.message)
    applied = {}
    usable = p.budget.usable
    if p.fused_attention and mx.metal.is_available():
        # Wire what the model keeps resident (weights + KV) so macOS does not page it out between tokens;
        # MLX refuses a wired limit above the recommended working set.
        info = mx.device_info()
        wired = min(p.weight_bytes + p.kv_bytes, int(info.get("max_recommended_working_set_size", 0)) or usable)
        mx.set_wired_limit(wired)
        applied["wired_limit"] = wired
    # Beyond the budget MLX waits for pending work to free memory, then fails, rather than swapping.
    mx.set_memory_limit(usable)
    applied["memory_limit"] = usable
    # Freed buffers are kept for reuse; cap that cache at the headroom the plan leaves (at most 2 GiB, at
    # least 256 MiB: without a cache every decode step would allocate its temporaries afresh).
    cache = max(256 * MIB, min(2 * GIB, usable - p.needed))
    mx.set_cache_limit(cache)
    applied["cache_limit"] = cache
    return applied


def check_context(n_tokens: int, max_context: int) -> None:
    """Refuse a prompt that does not fit the planned context, before anything is computed."""
    if max_context and n_tokens > max_context:
        raise ContextLengthError(
            f"the prompt is {n_tokens:,} tokens but the memory plan allows a context of {max_context:,}; "
            "shorten it or start a new chat, or load with a larger ctx= if `gptoss-mac plan` says it fits"
        )


def bounded_cache(model, max_context: int) -> list:
    """model.make_cache() with every layer refusing to grow past max_context tokens. Layer 0 checks
    first, so a refused prompt leaves every layer's cache as it was."""
    caches = model.make_cache()
    if not max_context:
        return caches
    bounded = _bounded_classes()
    for c in caches:
        c.__class__ = bounded.get(type(c), type(c))
        c.max_context = max_context
    return caches


def _bounded(base):
    class Bounded(base):
        max_context = 0

        def update_and_fetch(self, keys, values):
            check_context(self.offset + keys.shape[2], self.max_context)
            return super().update_and_fetch(keys, values)

    Bounded.__name__ = f"Bounded{base.__name__}"
    return Bounded


@functools.cache
def _bounded_classes() -> dict:
    """mlx-lm's cache classes -> their bounded subclasses, made on first use (importing mlx-lm takes
    seconds: `gptoss-mac plan` and every `--help` never pay for it)."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    return {KVCache: _bounded(KVCache), RotatingKVCache: _bounded(RotatingKVCache)}

