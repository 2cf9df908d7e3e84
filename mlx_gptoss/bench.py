"""`gptoss-mac bench`: llama-bench for this project.

Tests, as llama-bench names them: ppN (prompt processing: N random tokens through a fresh cache, in
prefill chunks) and tgN (generation: N tokens decoded one at a time), each optionally "@ dD" after D tokens
of context. Every test is warmed up once, then repeated; results are mean ± std tokens/s. Each result
names the machine, MLX, the MoE kernels that ran and the dtype, and ends with the roofline: the bytes a
decoded token must read (active experts, attention, unembedding, KV) over the decode time, as a share of
this machine's memory bandwidth measured in the same run.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import machine
from . import memory as mem
from .chat import prefill_chunk
from .errors import GptOssError

KERNELS = ("auto", "metal", "builtin")
DEFAULT_PROMPTS = (512, 2048)
DEFAULT_GEN = (128,)


@dataclass
class TestResult:
    test: str  # "pp512", "tg128 @ d4096"
    n_prompt: int
    n_gen: int
    depth: int
    repetitions: int
    tokens_per_s: float  # mean
    std: float
    samples: list[float] = field(default_factory=list)
    seconds: float = 0.0  # mean wall time of one repetition
    kernels: str = "auto"  # the --kernels value this test ran with
    kernels_ran: str = ""  # what that meant on this machine: metal, builtin, or split by decode / prefill


# ----------------------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """Chip, memory, OS, MLX version and backend: what a result needs to be comparable."""
    import psutil

    metal = mx.metal.is_available()
    info = mx.device_info() if metal else {}
    return {
        "chip": machine.chip(info.get("device_name")),
        "cores": os.cpu_count(),
        "memory_bytes": int(info.get("memory_size") or psutil.virtual_memory().total),
        "os": machine.os_name(),
        "python": platform.python_version(),
        "mlx_version": mx.__version__,
        "mlx_backend": "metal" if metal else "cpu",
        "blas": machine.blas(),
    }


def measure_bandwidth(nbytes: int = 1 << 30, reps: int = 3) -> dict:
    """Read and copy bandwidth in GB/s, best of reps: numpy on the CPU, and MLX on the device the model
    runs on (on a Mac the GPU reads far faster than one CPU thread). `best_read` is the roofline's ceiling."""
    out = {"bytes": nbytes}
    a = np.ones(nbytes // 8, dtype=np.float64)
    b = np.empty_like(a)
    out["numpy_read"] = _best(lambda: a.sum(), nbytes, reps)
    out["numpy_copy"] = _best(lambda: np.copyto(b, a), 2 * nbytes, reps)  # read + write
    del a, b
    x = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(x)
    out["mlx_read"] = _best(lambda: mx.eval(mx.sum(x)), nbytes, reps)
    del x
    out["best_read"] = max(out["numpy_read"], out["mlx_read"])
    return out


def _best(fn, nbytes, reps) -> float:
    fn()  # warm-up: page faults, caches
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


# ------------------------------------------------------------------------------------------ roofline


def decode_bytes(model, context: int, cfg=None) -> dict:
    """Bytes one decoded token reads at `context` tokens, by part, from the loaded model's parameters:
    every non-expert weight once (attention, router, norms, the unembedding; one embedding row), the k
    active experts of each layer, and the KV cache (full layers: context; sliding layers: the window)."""
    cfg = cfg or model.config  # cfg: a GptOssConfig, for models that keep another config (mlx-lm's)
    out = dict.fromkeys(("experts", "attention", "unembedding", "other", "kv"), 0)
    for name, p in tree_flatten(model.parameters()):
        if ".mlp.experts." in name:  # [E, ...]: k of the E experts are read
            out["experts"] += p.nbytes * cfg.num_experts_per_tok // cfg.num_local_experts
        elif ".self_attn." in name:
            out["attention"] += p.nbytes
        elif name.startswith("lm_head"):
            out["unembedding"] += p.nbytes
        elif "embed_tokens" in name:
            out["other"] += p.nbytes // cfg.vocab_size  # one row
        else:
            out["other"] += p.nbytes
    act = model.model.norm.weight.dtype.size
    per_token_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * act
    for t in cfg.layer_types:
        out["kv"] += per_token_layer * (context if t == "full_attention" else min(context, cfg.sliding_window))
    out["total"] = sum(out.values())
    return out


# -------------------------------------------------------------------------------------------- timing


def random_tokens(n: int, vocab: int, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, vocab, n, dtype=np.int32))


def prefill(model, cache, tokens: mx.array, chunk: int) -> None:
    """Run tokens through the cache in chunks, as a generation engine does (mlx-lm's prefill loop)."""
    for i in range(0, tokens.size, chunk):
        model(tokens[None, i:i + chunk], cache=cache)
        mx.eval([c.state for c in cache])


def logits_prefill(model, cache, tokens: mx.array, chunk: int) -> mx.array:
    """Prefill, then the last chunk's logits too: what a prompt costs before the first token."""
    n = tokens.size
    last = max(0, (n - 1) // chunk * chunk)
    if last:
        prefill(model, cache, tokens[:last], chunk)
    logits = model(tokens[None, last:], cache=cache)[:, -1, :]
    mx.eval(logits)
    return logits


def decode(model, cache, first: mx.array, n: int) -> mx.array:
    """n greedy steps, each token fed back; the next step is queued before the current one is read
    (mx.async_eval), as mlx-lm's generate_step does."""

    def step(y):
        return mx.argmax(model(y[None], cache=cache)[:, -1, :], axis=-1).astype(mx.int32)

    nxt = step(first)
    mx.async_eval(nxt)
    for _ in range(n - 1):
        cur, nxt = nxt, step(nxt)
        mx.async_eval(nxt)
        cur.item()
    return nxt


def time_test(model, make_cache, *, n_prompt: int, n_gen: int, depth: int, chunk: int, vocab: int,
              seed: int) -> float:
    """Seconds for one repetition of a pp or tg test (the depth context is built first, not timed)."""
    cache = make_cache()
    if depth:
        prefill(model, cache, random_tokens(depth, vocab, seed + 1), chunk)
    if n_prompt:
        tokens = random_tokens(n_prompt, vocab, seed)
        t0 = time.perf_counter()
        logits_prefill(model, cache, tokens, chunk)
        return time.perf_counter() - t0
    first = random_tokens(1, vocab, seed)
    t0 = time.perf_counter()
    mx.eval(decode(model, cache, first, n_gen))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- run


def parse_list(text: str | list | tuple | None, option: str, default: tuple[int, ...], minimum: int = 0) -> list[int]:
    """'512,2048' -> [512, 2048]; one clear error naming the option for anything else."""
    if text is None:
        return list(default)
    parts = text if isinstance(text, (list, tuple)) else [p for t in str(text).split(",") for p in [t.strip()] if p]
    out = []
    for p in parts:
        try:
            v = int(p)
        except (TypeError, ValueError):
            raise GptOssError(f"{option} {text!r}: expected whole numbers separated by commas, like 512,2048") from None
        if v < minimum:
            raise GptOssError(f"{option} {v}: must be at least {minimum}")
        out.append(v)
    if not out:
        raise GptOssError(f"{option}: give at least one number")
    return out


def validate(*, n_prompt, n_gen, depth, repetitions, kernels) -> tuple[list, list, list]:
    prompts = parse_list(n_prompt, "--n-prompt", DEFAULT_PROMPTS)
    gens = parse_list(n_gen, "--n-gen", DEFAULT_GEN)
    depths = parse_list(depth, "--depth", (0,))
    if not isinstance(repetitions, int) or isinstance(repetitions, bool) or repetitions < 1:
        raise GptOssError(f"--repetitions {repetitions!r}: must be a whole number >= 1")
    parse_kernels(kernels)
    if not any(prompts) and not any(gens):
        raise GptOssError("--n-prompt and --n-gen are all 0: nothing to measure")
    return [p for p in prompts if p], [g for g in gens if g], depths


METAL_UNAVAILABLE = ("metal: not run, this machine has no Metal GPU (the kernels' speed can only be measured on a "
                     "Mac; the test emulator's speed would mean nothing)")


def parse_kernels(kernels: str) -> tuple[list[str], list[str]]:
    """'metal,builtin' -> (backends to run, in order; notes). Each name once; metal on a machine without
    Metal is an error alone and a one-line note in a list (the others still run)."""
    names = [k.strip() for k in str(kernels).split(",") if k.strip()]
    bad = [k for k in names if k not in KERNELS]
    if not names or bad:
        raise GptOssError(f"--kernels {kernels!r}: use one of {', '.join(KERNELS)}, or several separated by "
                          "commas (metal,builtin runs both and prints the ratio)")
    names = list(dict.fromkeys(names))
    notes = []
    if "metal" in names and not mx.metal.is_available():
        if len(names) == 1:
            raise GptOssError("--kernels metal: this machine has no Metal GPU; use --kernels auto or builtin")
        names.remove("metal")
        notes.append(METAL_UNAVAILABLE)
    return names, notes


def kernels_ran(requested: str, dtype=mx.float32) -> str:
    """Which MoE kernels the model runs: kernels.backend_for answers per call size (on a Mac it runs the
    Metal kernels' self-test if due; a failed self-test means the builtin ops)."""
    from . import kernels

    backend_for = getattr(kernels, "backend_for", None)
    if backend_for is None:
        return "builtin"
    decode, prefill = backend_for(1, dtype, requested), backend_for(PREFILL_PROBE, dtype, requested)
    return decode if decode == prefill else f"{decode} (decode), {prefill} (prefill)"


PREFILL_PROBE = 512  # tokens in a prefill call, to ask which kernels prefill uses


def run(model: str, *, n_prompt=None, n_gen=None, depth=None, repetitions: int = 5, kernels: str = "auto",
        memory: str | None = None, ctx: int | None = None, dtype=None, warmup: bool = True, seed: int = 0,
        bandwidth_bytes: int = 1 << 30, progress=None, offload: str = "auto", kv_bits: int | None = None,
        resident_experts: float | None = None, group=None) -> dict:
    """Load model, run every test, return the whole result as a JSON-ready dict. group="auto" under
    mlx.launch: rank 0 runs the tests on the sharded model, the other ranks follow (and exit in load)."""
    import mlx_gptoss
    from mlx_gptoss.distributed import lead_or_follow, time_comm

    prompts, gens, depths = validate(n_prompt=n_prompt, n_gen=n_gen, depth=depth, repetitions=repetitions,
                                     kernels=kernels)
    say = progress or (lambda msg: None)
    say("measuring memory bandwidth")
    bandwidth = measure_bandwidth(bandwidth_bytes)
    mx.reset_peak_memory()
    say(f"loading {model}")
    t0 = time.perf_counter()
    gpt = mlx_gptoss.load(model, memory=memory, ctx=ctx, dtype=dtype, allow_download=False, offload=offload,
                          kv_bits=kv_bits, resident_experts=resident_experts, group=group)
    gpt = lead_or_follow(gpt)  # a rank other than 0 replays rank 0's model calls, then exits
    load_s = time.perf_counter() - t0
    load_peak = mx.get_peak_memory()
    net = gpt.model
    cfg = gpt.config
    tests = [(p, 0, d) for d in depths for p in prompts] + [(0, g, d) for d in depths for g in gens]
    for p, g, d in tests:
        if gpt.max_context and d + p + g > gpt.max_context:
            raise GptOssError(f"--depth {d} + {'--n-prompt ' + str(p) if p else '--n-gen ' + str(g)}: "
                              f"{d + p + g} tokens, more than the planned context of {gpt.max_context}")
    backends, notes = parse_kernels(kernels)
    results, streamed = [], {}
    for backend in backends:
        net.set_moe_backend(backend)
        for p, g, d in tests:
            results.append(_measure(gpt, backend, p, g, d, repetitions, warmup, seed, say, streamed))
    net.set_moe_backend(backends[0])
    roofline = []
    for r in results:
        if r.n_gen:
            nbytes = decode_bytes(net, r.depth + r.n_gen // 2)  # the average context during the test
            gbps = nbytes["total"] * r.tokens_per_s / 1e9
            roofline.append({"test": r.test, "kernels": r.kernels, "bytes_per_token": nbytes["total"],
                             "bytes_by_part": nbytes,
                             "achieved_gbps": gbps, "bandwidth_gbps": bandwidth["best_read"],
                             "percent_of_bandwidth": 100 * gbps / bandwidth["best_read"]})
    return {
        "machine": machine_info(),
        "model": {
            "path": str(gpt.path), "name": model,
            "layers": cfg.num_hidden_layers, "experts": cfg.num_local_experts,
            "experts_per_token": cfg.num_experts_per_tok, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
            "weight_bytes": sum(p.nbytes for _, p in tree_flatten(net.parameters())),
            "dtype": str(gpt.dtype).removeprefix("mlx.core."),
            "kernels_requested": kernels,
            "kernels": "; ".join(kernels_ran(b, gpt.dtype) for b in backends),
            "max_context": gpt.max_context, "prefill_chunk": prefill_chunk(gpt),
        },
        "load_seconds": load_s,
        "peak_memory_load_bytes": load_peak,
        "peak_memory_bytes": mx.get_peak_memory(),
        "bandwidth": bandwidth,
        "results": [asdict(r) for r in results],
        "comparison": compare(results),
        "notes": notes,
        "roofline": roofline,  # per rank when distributed: this rank's share of the bytes
        "offload": None if gpt.offload is None else {
            "levers": gpt.plan.levers.names(), "lever_notes": gpt.plan.lever_notes(),
            "resident_experts": gpt.plan.resident_share, "streaming": streamed},
        "distributed": time_comm(gpt) if gpt.group is not None else None,
        "settings": {"repetitions": repetitions, "warmup": warmup, "seed": seed, "memory": memory, "ctx": ctx,
                     "prompt": "random tokens", "offload": offload, "kv_bits": kv_bits},
    }


def _measure(gpt, backend, p, g, d, repetitions, warmup, seed, say, streamed: dict) -> TestResult:
    """One test (pp or tg, at depth d) on one MoE backend: a warm-up, then the timed repetitions.
    With streamed experts, streamed[label] gets the hit rate and bytes per token of the timed runs."""
    cfg = gpt.config
    name = (f"pp{p}" if p else f"tg{g}") + (f" @ d{d}" if d else "")
    label = f"{name} [{backend}]"
    chunk = prefill_chunk(gpt)  # the chunk chat prefills in: the memory plan's
    say(f"{label}: warm-up" if warmup else label)

    def once(seed_):
        return time_test(gpt.model, gpt.make_cache, n_prompt=p, n_gen=g, depth=d, chunk=chunk,
                         vocab=cfg.vocab_size, seed=seed_)

    if warmup:
        once(seed + 1000)
    secs = []
    before = gpt.offload.stats.copy() if gpt.offload else None
    for r in range(repetitions):
        say(f"{label}: {r + 1}/{repetitions}")
        secs.append(once(seed + r))
    if before is not None:  # streamed experts during the timed runs (depth prefill included)
        s = gpt.offload.stats - before
        streamed[label] = {"hit_rate": s.hit_rate, "bytes_per_token": s.bytes_per_token}
    tps = [(p or g) / s for s in secs]
    return TestResult(name, p, g, d, repetitions, statistics.fmean(tps),
                      statistics.stdev(tps) if len(tps) > 1 else 0.0, tps, statistics.fmean(secs),
                      kernels=backend, kernels_ran=kernels_ran(backend, gpt.dtype))


def compare(results: list[TestResult]) -> list[dict]:
    """metal vs builtin per test when both ran: tokens/s of each and metal / builtin."""
    by = {(r.test, r.kernels): r.tokens_per_s for r in results}
    return [{"test": t, "metal_tokens_per_s": by[t, "metal"], "builtin_tokens_per_s": by[t, "builtin"],
             "ratio": by[t, "metal"] / by[t, "builtin"]}
            for t in dict.fromkeys(r.test for r in results) if (t, "metal") in by and (t, "builtin") in by]


CSV_FIELDS = ("test", "kernels", "kernels_ran", "n_prompt", "n_gen", "depth", "repetitions", "tokens_per_s", "std",
              "seconds")


def csv_rows(result: dict) -> list[dict]:
    """One row per test, with the machine and model columns repeated (like llama-bench -o csv)."""
    m, mod = result["machine"], result["model"]
    base = {"chip": m["chip"], "memory_bytes": m["memory_bytes"], "os": m["os"], "mlx_version": m["mlx_version"],
            "mlx_backend": m["mlx_backend"], "model": mod["name"], "dtype": mod["dtype"], "kernels": mod["kernels"]}
    return [{**base, **{k: r[k] for k in CSV_FIELDS}} for r in result["results"]]
