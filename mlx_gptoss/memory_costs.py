"""What MLX allocates for gpt-oss's two large transients, measured once per machine.

The memory plan sizes weights and KV caches from first principles (bytes are bytes). Two transients depend on
how MLX evaluates a graph, which no header says: how many score-sized buffers attention keeps alive at once
(MLX's CPU backend composes attention from ops: scores, masked scores, scores with the sink column, softmax, the
slice fed to the second matmul; Metal runs one fused kernel), and how many row-sized buffers the MoE block keeps
(gathered inputs, gather_qmm outputs, gathered biases, their sums, SwiGLU, the unsort). Both are measured here
with mx.get_peak_memory() on small shapes of the exact ops the model runs, as multiples of one score matrix
element and of one (token, expert) row, and the multiples are kept in ~/.cache/gptoss-mac/memory-costs.json,
keyed on the device, MLX version, dtype and this file's text, like the Metal kernels' self-test.

A plan for another backend (a Mac planned from Linux) cannot measure: it uses FIRST_PRINCIPLES, which counts
the buffers the ops name (fused attention: none of score size) and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx


@dataclass(frozen=True)
class Costs:
    """Peak bytes of a transient per unit, in units of the activation dtype's size."""

    attention: float  # per score element (query head x query x key), fused float KV cache
    attention_kv8: float  # the same over the 8-bit KV cache (offload.kv: its attention is not fused)
    moe_hidden: float  # per routed row (token x expert) per hidden unit
    moe_intermediate: float  # per routed row per intermediate unit
    moe_overlap: float = 1.0  # share of the MoE block's transient alive with attention's (float KV cache)
    moe_overlap_kv8: float = 1.0  # the same with the 8-bit KV cache
    source: str = "first principles"


# What the ops name when nothing can be measured (a backend other than this machine's). Metal's fused attention
# keeps no score matrix; MLX's CPU backend composes it: scores, scores with the sink column, softmax. The 8-bit
# cache's attention (never fused): scores, masked, with the sink column, softmax, its slice. MoE (kernels.moe,
# sorted path): gathered inputs + gate_up output + gathered bias + sum + SwiGLU per row in intermediate units
# (2 + 2 + 2 + 1 = 7 I, less what is freed before SwiGLU: 5 I), and 5 buffers of H per row in the down half
# (input gather, output, bias, sum, unsort) plus the weighted copy. Overlap: all of it (MLX queues ops ahead of
# running them, and their outputs are allocated when queued).
FIRST_PRINCIPLES = Costs(attention=0.0, attention_kv8=5.0, moe_hidden=5.5, moe_intermediate=5.0)
FIRST_PRINCIPLES_CPU = Costs(attention=3.0, attention_kv8=5.0, moe_hidden=5.5, moe_intermediate=5.0)

# probe shapes: small enough to run in well under a second on a loaded CPU, large enough that the fixed
# parts (outputs, masks) are a few percent of the measured transient
HEADS, KV_HEADS, HEAD_DIM, QUERIES, KEYS = 8, 2, 64, 256, 2048
ROWS, EXPERTS, TOP_K = 256, 8, 4


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptoss-mac" / "memory-costs.json"


def setup_key(dtype: mx.Dtype) -> str:
    device = mx.device_info().get("device_name", "") if mx.metal.is_available() else "cpu"
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    return f"{device}|mlx {mx.__version__}|{str(dtype).removeprefix('mlx.core.')}|code {code}"


def costs(dtype: mx.Dtype, metal: bool) -> Costs:
    """The costs for planning `dtype` on the Metal backend (metal=True) or MLX's CPU backend: measured on
    this machine when it is that backend (cached), else FIRST_PRINCIPLES(_CPU)."""
    if metal != mx.metal.is_available():
        return FIRST_PRINCIPLES if metal else FIRST_PRINCIPLES_CPU
    if (dtype, metal) in _known:  # a plan sizes many candidates: read the file once per process
        return _known[dtype, metal]
    _known[dtype, metal] = found = _stored_or_measured(dtype)
    return found


_known: dict = {}  # (dtype, Metal backend): a process that ran as a Mac (tests' simulated Mac) keeps both apart


def _stored_or_measured(dtype: mx.Dtype) -> Costs:
    key = setup_key(dtype)
    path = cache_file()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if isinstance(stored.get(key), dict):
        try:
            return Costs(**stored[key])
        except TypeError:
            pass
    found = measure(dtype)
    stored[key] = asdict(found)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        tmp.replace(path)
    except OSError:  # a read-only home: measured again next time
        pass
    return found


def _peak(fn, *inputs) -> int:
    """Peak bytes allocated while fn(*inputs) is evaluated, beyond what existed before (inputs included)."""
    mx.eval(*inputs)
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn(*inputs)
    mx.eval(out)
    mx.synchronize()
    peak = mx.get_peak_memory() - base
    del out
    return peak


def measure(dtype: mx.Dtype) -> Costs:
    """Run the probes (a few seconds) on the model's own modules and return the multiples.
    mx.get_peak_memory() is reset after them, so that a process's peak counts the model, not the probe."""
    from mlx_lm.models.cache import KVCache

    from . import kernels
    from .config import GptOssConfig
    from .memory import GPT_OSS_20B
    from .model import TransformerBlock
    from .offload.kv import QuantizedKV

    act = dtype.size
    mx.random.seed(0)
    cfg = GptOssConfig.from_dict(dict(GPT_OSS_20B, hidden_size=256, intermediate_size=256, num_local_experts=EXPERTS,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                                      num_hidden_layers=2, vocab_size=256), source="memory probe")
    block = TransformerBlock(cfg, "full_attention")
    block.set_dtype(dtype)
    block.mlp.experts.gate_up_proj = mx.random.randint(0, 1 << 30, block.mlp.experts.gate_up_proj.shape).astype(
        mx.uint32)
    mx.eval(block.parameters())
    x = mx.random.normal((1, QUERIES, 256)).astype(dtype)
    past = mx.random.normal((1, KV_HEADS, KEYS, HEAD_DIM)).astype(dtype)

    def cache(kind):  # filled up to the last chunk, with room for it: the cache's growth is counted apart
        c = kind()
        c.update_and_fetch(past, past)
        mx.eval(c.keys, c.values)
        c.offset = KEYS - QUERIES
        return c

    # attention's own transient, per score element: the op alone (q/k/v/o are counted apart, by their shapes)
    q = mx.random.normal((1, HEADS, QUERIES, HEAD_DIM)).astype(dtype)
    k = mx.random.normal((1, KV_HEADS, QUERIES, HEAD_DIM)).astype(dtype)
    sinks = block.self_attn.sinks
    scores = HEADS * QUERIES * KEYS * act
    found = {}
    for name, kind in (("float", KVCache), ("kv8", lambda: QuantizedKV(bits=8, group_size=HEAD_DIM))):
        c = cache(kind)

        def attend(q, k, c=c):
            keys, values = c.update_and_fetch(k, k)
            op = getattr(c, "attention", None) or mx.fast.scaled_dot_product_attention
            return op(q, keys, values, scale=0.125, mask="causal", sinks=sinks)

        attention = _peak(attend, q, k)
        # how much of the MoE block's transient is alive with attention's: a whole block against its parts
        c = cache(kind)
        alone = _peak(lambda x: block.self_attn(x, "causal", c), x)
        moe = _peak(lambda x: block.mlp(x), x)
        c = cache(kind)
        both = _peak(lambda x: block(x, "causal", c), x)
        found[name] = attention / scores, min(1.0, max(0.0, (both - alone) / moe))

    def moe(hidden: int, inter: int) -> int:
        w1 = mx.random.randint(0, 1 << 30, (EXPERTS, 2 * inter, hidden // 8)).astype(mx.uint32)
        s1 = mx.full((EXPERTS, 2 * inter, hidden // 32), 120, dtype=mx.uint8)
        w2 = mx.random.randint(0, 1 << 30, (EXPERTS, hidden, inter // 8)).astype(mx.uint32)
        s2 = mx.full((EXPERTS, hidden, inter // 32), 120, dtype=mx.uint8)
        b1, b2 = mx.zeros((EXPERTS, 2 * inter), dtype=dtype), mx.zeros((EXPERTS, hidden), dtype=dtype)
        x = mx.random.normal((ROWS, hidden)).astype(dtype)
        ids = (mx.arange(ROWS * TOP_K) % EXPERTS).reshape(ROWS, TOP_K).astype(mx.uint32)
        w = mx.full((ROWS, TOP_K), 1 / TOP_K, dtype=dtype)
        mx.eval(w1, s1, w2, s2, b1, b2)
        return _peak(lambda x: kernels.moe(x, (w1, s1, b1), (w2, s2, b2), ids, w, backend="builtin"), x)

    rows = ROWS * TOP_K * act
    small, wide = moe(256, 256), moe(256, 512)  # peak = rows x (h x H + i x I): two shapes, two unknowns
    mx.synchronize()
    mx.reset_peak_memory()
    inter = (wide - small) / (rows * 256)
    hidden = (small - rows * 256 * inter) / (rows * 256)
    return Costs(attention=round(found["float"][0], 3), attention_kv8=round(found["kv8"][0], 3),
                 moe_hidden=round(hidden, 3), moe_intermediate=round(inter, 3),
                 moe_overlap=round(found["float"][1], 3), moe_overlap_kv8=round(found["kv8"][1], 3),
                 source=f"measured on this machine ({'Metal' if mx.metal.is_available() else 'CPU'} backend)")
