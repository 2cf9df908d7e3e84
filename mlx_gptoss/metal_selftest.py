"""First-use self-test of the custom Metal kernels on the user's Mac: correct, then faster, or not used.

Nothing proves a kernel compiles, runs right and is fast on a given Mac except running it there. Before
backend "auto" (kernels.py) uses a kernel for an activation dtype, this module runs it on exactly what
decode runs: gpt-oss's shapes (H = I = 2880, 4 experts per token) at T = 1 and T = 4 tokens, against MLX's
own mx.gather_qmm path in float32 on the same inputs. Only if it is correct does it time both (median of
interleaved runs) and the kernel is enabled only if it is also faster by selftest_record.MIN_SPEEDUP at
both T. A compile error or mismatch warns once; a slower kernel is quietly left off (doctor shows why).

The outcome is remembered per setup (GPU, macOS version and build, MLX version, kernel sources, tiles,
wrapper and this test: selftest_record.py), so the test runs once per setup; a pending record written
before each run turns a process-killing GPU fault into a stored failure on the next start.

It answers kernels.py through kernel_gate (registered below): kernels.py never imports this module.
For `gptoss-mac doctor`: kernel_status() -> [{"kernel", "dtype", "passed", "enabled", "detail", "timings", ...}].
"""

from __future__ import annotations

import hashlib
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import kernel_gate, kernels, machine, selftest_record

# Relative tolerance (max |diff| / max |reference|) against the float32 builtin on the same inputs:
# the kernels accumulate in float32 and round once, so float32 agrees to ~1e-6 and the 16-bit types to
# a few of their ulps.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 2e-2}
DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
DTYPES = tuple(DTYPE_NAMES)
# What decode runs: gpt-oss's H = I = 2880 and k = 4, at T = 1 (decode) and T = DECODE_MAX_TOKENS (the most
# auto gives the kernels); 16 experts so the 4 tokens of T = 4 read 16 different experts, as they mostly do.
CASE = {"hidden": 2880, "intermediate": 2880, "experts": 16, "experts_per_token": 4, "tokens": (1, 4), "seed": 7}
# Timing: medians of REPS samples, each LAUNCHES calls evaluated together (the launch and sync overhead of
# one eval is shared, as in decode where a whole token is one graph); metal and builtin interleaved.
WARMUP, REPS, LAUNCHES = 3, 15, 8

_results: dict[str, dict] = {}  # "setup|kernel/dtype" -> record, for this process
_warned: set[str] = set()


def code_hash() -> str:
    """Kernel sources + tiles + wrapper (kernels.source_hash) + this test's definition."""
    h = hashlib.sha256(kernels.source_hash().encode())
    for module in (sys.modules[__name__], selftest_record):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def setup_key() -> str:
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        device = str(info.get("device_name") or info.get("architecture") or "unknown")
    except Exception:  # no Metal device info (CPU backend)
        device = "cpu"
    if sys.platform == "darwin":
        os_version = f"macOS {platform.mac_ver()[0]} ({machine.sysctl('kern.osversion') or '?'})"
    else:
        os_version = platform.platform()
    return selftest_record.setup_key(device, os_version, mx.__version__, code_hash())


def _weights(case: dict) -> dict:
    """Deterministic MXFP4 experts: random bytes (every code), E8M0 scales 2^-9..2^-2, float32 biases."""
    E, H, I = case["experts"], case["hidden"], case["intermediate"]
    rng = np.random.default_rng(case["seed"])

    def mxfp4(rows, cols):
        w = np.frombuffer(rng.bytes(E * rows * cols // 2), dtype=np.uint32).reshape(E, rows, cols // 8)
        s = rng.integers(118, 126, (E, rows, cols // 32), dtype=np.uint8)
        return mx.array(w), mx.array(s), mx.array(rng.standard_normal((E, rows), dtype=np.float32))

    (wg, sg, bg), (wd, sd, bd) = mxfp4(2 * I, H), mxfp4(H, I)
    return dict(wg=wg, sg=sg, bg=bg, wd=wd, sd=sd, bd=bd, order=rng.permutation(E))


def _inputs(dtype, tokens: int, case: dict, weights: dict) -> dict:
    """The case at T = tokens in dtype; token t uses experts order[4t..4t+3] (all distinct while 4T <= E)."""
    H, k = case["hidden"], case["experts_per_token"]
    rng = np.random.default_rng(case["seed"] + tokens)
    ids = np.resize(weights["order"], tokens * k).reshape(tokens, k)
    a = dict(weights, ids=mx.array(ids.astype(np.uint32)),
             x=mx.array(rng.standard_normal((tokens, H), dtype=np.float32)),
             weights=mx.softmax(mx.array(rng.standard_normal((tokens, k), dtype=np.float32)), axis=-1))
    a = {n: v.astype(dtype) if isinstance(v, mx.array) and v.dtype == mx.float32 else v for n, v in a.items()}
    a["h"] = kernels._builtin_gate_up_swiglu(a["x"], a["wg"], a["sg"], a["bg"], a["ids"], 7.0, 1.702)
    mx.eval(a["h"])
    return a


def _calls(spec: kernels.KernelSpec, a: dict):
    """(metal call, builtin call in the same dtype, float32 reference) for one kernel on inputs a."""
    f32 = {n: a[n].astype(mx.float32) for n in ("x", "bg", "bd", "weights", "h")}
    if spec is kernels.GATE_UP:
        return (lambda: kernels._metal_gate_up_swiglu(a["x"], a["wg"], a["sg"], a["bg"], a["ids"], 7.0, 1.702),
                lambda: kernels._builtin_gate_up_swiglu(a["x"], a["wg"], a["sg"], a["bg"], a["ids"], 7.0, 1.702),
                lambda: kernels._builtin_gate_up_swiglu(f32["x"], a["wg"], a["sg"], f32["bg"], a["ids"], 7.0, 1.702))
    return (lambda: kernels._metal_down(a["h"], a["wd"], a["sd"], a["bd"], a["ids"], a["weights"]),
            lambda: kernels._builtin_down(a["h"], a["wd"], a["sd"], a["bd"], a["ids"], a["weights"]),
            lambda: kernels._builtin_down(f32["h"], a["wd"], a["sd"], f32["bd"], a["ids"], f32["weights"]))


def measure(calls: dict) -> dict:
    """Median seconds per call of each of {name: fn}, interleaved so drift hits all alike."""
    def sample(fn):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(LAUNCHES)])
        return (time.perf_counter() - t0) / LAUNCHES

    for _ in range(WARMUP):
        for fn in calls.values():
            sample(fn)
    samples = {name: [] for name in calls}
    for _ in range(REPS):
        for name, fn in calls.items():
            samples[name].append(sample(fn))
    return {name: statistics.median(v) for name, v in samples.items()}


def run(spec: kernels.KernelSpec, dtype, case: dict | None = None) -> dict:
    """Test spec for dtype: correctness at every T of the case, then timing; never raises."""
    case = case or CASE
    tol = TOLERANCE[dtype]
    try:
        worst, timings, weights = 0.0, {}, _weights(case)
        for tokens in case["tokens"]:
            a = _inputs(dtype, tokens, case, weights)
            metal, builtin, reference = _calls(spec, a)
            got, want = metal().astype(mx.float32), reference()
            mx.eval(got, want)
            if got.shape != want.shape:
                return _failed(f"T={tokens}: output shape {got.shape}, expected {want.shape}")
            err = mx.abs(got - want).max().item() / max(mx.abs(want).max().item(), 1e-6)
            if not err <= tol:  # NaN fails too
                return _failed(f"T={tokens}: mismatch vs mx.gather_qmm: relative error {err:.2e} > {tol:.0e}",
                               error=err)
            worst = max(worst, err)
            t = measure({"metal": metal, "builtin": builtin})
            timings[f"T={tokens}"] = {"metal_s": t["metal"], "builtin_s": t["builtin"]}
        enabled, why = selftest_record.decide(True, timings)
        return {"passed": True, "enabled": enabled, "error": worst, "timings": timings, "tested": _now(),
                "detail": f"matches mx.gather_qmm (relative error {worst:.1e} <= {tol:.0e}); {why}"}
    except Exception as exc:  # a Metal compile error arrives as RuntimeError; anything else is a failure too
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        detail = f"{type(exc).__name__}: {first[:300]}"
        return _failed(detail, transient=selftest_record.is_transient(str(exc)))


def _failed(detail: str, **extra) -> dict:
    return {"passed": False, "enabled": False, "detail": detail, "tested": _now(), **extra}


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def result(spec: kernels.KernelSpec, dtype) -> dict:
    """The self-test record for (kernel, dtype) on this setup: from memory, the cache file, or a fresh run."""
    name = f"{spec.key}/{DTYPE_NAMES[dtype]}"
    if not kernels.on_metal_gpu():  # nothing to test, nothing to remember
        return {"passed": False, "enabled": False, "cached": False,
                "detail": "not used: no Metal GPU (MLX's built-in mxfp4 ops run)"}
    key = setup_key()
    memo = f"{key}|{name}"
    if memo in _results:
        return _results[memo]
    stored = selftest_record.settle(selftest_record.claim(key, name), key, name)
    busy = stored is not None and stored.get("state") == "busy"
    if busy:
        record = {"passed": False, "enabled": False, "cached": False,
                  "detail": f"being self-tested by process {stored['pid']}; MLX's built-in ops until it is done"}
    elif stored is not None:
        record = dict(stored, cached=True)
    else:  # claimed: our pending record is stored
        record = run(spec, dtype)
        selftest_record.write(key, name, None if record.get("transient") else record)
        record = dict(record, cached=False)
    _results[memo] = record
    if not record["passed"] and not busy and name not in _warned:
        _warned.add(name)
        warnings.warn(f"gptoss-mac: Metal kernel {name} failed its self-test ({record['detail']}); "
                      "using MLX's built-in mxfp4 ops instead", RuntimeWarning, stacklevel=3)
    return record


def approves(kernel_key: str, dtype) -> bool:
    """kernel_gate's judge: is this kernel enabled for this dtype on this setup (testing it if due)?"""
    spec = next((s for s in kernels.SPECS if s.key == kernel_key), None)
    return spec is not None and dtype in DTYPE_NAMES and bool(result(spec, dtype)["enabled"])


def kernel_status(dtypes=None) -> list[dict]:
    """Self-test outcome of every kernel, for `gptoss-mac doctor`; runs the tests not yet done here.

    Each dict: kernel (e.g. "moe_down"), dtype ("bfloat16"), passed (correct), enabled (auto uses it),
    detail (one line), timings ({"T=1": {"metal_s", "builtin_s"}, ...} when timed), cached (read from the
    cache file rather than run now). dtypes defaults to bfloat16, the activation dtype on Metal.
    """
    rows = []
    for dtype in dtypes or (mx.bfloat16,):
        for spec in kernels.SPECS:
            r = result(spec, dtype)
            rows.append({"kernel": spec.key, "dtype": DTYPE_NAMES[dtype], "passed": r["passed"],
                         "enabled": r.get("enabled", False), "detail": r["detail"],
                         "timings": r.get("timings", {}), "cached": r.get("cached", False)})
    return rows


def clear() -> None:
    """Forget this process's results (tests; the cache file is left alone)."""
    _results.clear()
    _warned.clear()


kernel_gate.set_judge(approves)
