"""First-use self-test of the custom Metal kernels on the user's Mac, with the outcome remembered.

Nothing proves a kernel compiles and runs right on a given Mac except running it there. So before
kernels.py's "auto" backend uses a kernel for an activation dtype, it compiles it and runs one small
representative launch (ragged sizes, a repeated expert id, inputs not a multiple of the kernel's step)
against MLX's own mx.gather_qmm path. A compile error or a mismatch warns once and the model keeps using
the builtin ops. The outcome is stored in a small JSON file (~/.cache/gptoss-mac/kernel-selftest.json,
$XDG_CACHE_HOME honoured) keyed by device, MLX version and kernel-source hash, so it runs once per setup.

For `gptoss-mac doctor`: kernel_status() -> [{"kernel", "dtype", "passed", "detail", "cached"}].
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import mlx.core as mx

from . import kernels

# Relative tolerance (max |diff| / max |reference|) against the float32 builtin on the same inputs:
# the kernels accumulate in float32 and round once, so float32 agrees to ~1e-6 and the 16-bit types to
# a few of their ulps.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 2e-2}
DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
# The representative launch: H, I multiples of 32 but not of the kernels' 512-input step, E > k.
CASE = {"experts": 5, "hidden": 288, "intermediate": 96, "expert_ids": [[0, 3, 3, 1], [4, 2, 0, 3]]}

_results: dict[str, dict] = {}  # "kernel/dtype" -> record, for this process
_warned: set[str] = set()


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptoss-mac" / "kernel-selftest.json"


def setup_key() -> str:
    """Device, MLX version and kernel-source hash: a new one of any re-runs the self-test."""
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        device = str(info.get("device_name") or info.get("architecture") or "unknown")
    except Exception:  # no Metal device info (CPU backend)
        device = "cpu"
    return f"{device}|mlx {mx.__version__}|kernels {kernels.source_hash()}"


def _load() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(key: str, name: str, record: dict) -> None:
    data = _load()
    data.setdefault(key, {})[name] = record
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only means the test runs again next time


def _case(dtype):
    """Inputs for one launch of each kernel, deterministic, built with MLX's own mxfp4 quantizer."""
    E, H, I = CASE["experts"], CASE["hidden"], CASE["intermediate"]
    ids = mx.array(CASE["expert_ids"], dtype=mx.uint32)
    T, k = ids.shape
    key = mx.random.key(7)
    k1, k2, k3, k4, k5, k6 = mx.random.split(key, 6)

    def quantized(rows, cols, rkey):
        w = mx.random.normal((E, rows, cols), key=rkey) * 0.05
        q, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
        return q, s

    wg, sg = quantized(2 * I, H, k1)
    wd, sd = quantized(H, I, k2)
    bg = mx.random.normal((E, 2 * I), key=k3)
    bd = mx.random.normal((E, H), key=k4)
    x = mx.random.normal((T, H), key=k5)
    weights = mx.softmax(mx.random.normal((T, k), key=k6), axis=-1)
    return [a.astype(dtype) if a.dtype == mx.float32 else a for a in (x, wg, sg, bg, wd, sd, bd, ids, weights)]


def run(spec: kernels.KernelSpec, dtype) -> dict:
    """Compile and run spec once for dtype against the builtin path; never raises."""
    try:
        x, wg, sg, bg, wd, sd, bd, ids, weights = _case(dtype)
        f32 = [a.astype(mx.float32) if a.dtype == dtype else a for a in (x, bg, bd, weights)]
        if spec is kernels.GATE_UP:
            got = kernels._metal_gate_up_swiglu(x, wg, sg, bg, ids, 7.0, 1.702)
            want = kernels._builtin_gate_up_swiglu(f32[0], wg, sg, f32[1], ids, 7.0, 1.702)
        else:
            h = kernels._builtin_gate_up_swiglu(x, wg, sg, bg, ids, 7.0, 1.702)
            got = kernels._metal_down(h, wd, sd, bd, ids, weights)
            want = kernels._builtin_down(h.astype(mx.float32), wd, sd, f32[2], ids, f32[3])
        got = got.astype(mx.float32)
        mx.eval(got, want)
        if got.shape != want.shape:
            return {"passed": False, "detail": f"output shape {got.shape}, expected {want.shape}"}
        err = mx.abs(got - want).max().item() / max(mx.abs(want).max().item(), 1e-6)
        tol = TOLERANCE[dtype]
        if not err <= tol:  # NaN fails too
            return {"passed": False, "detail": f"mismatch vs mx.gather_qmm: relative error {err:.2e} > {tol:.0e}"}
        return {"passed": True, "detail": f"matches mx.gather_qmm (relative error {err:.1e} <= {tol:.0e})"}
    except Exception as exc:  # a Metal compile error arrives as RuntimeError; anything else is a failure too
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"passed": False, "detail": f"{type(exc).__name__}: {first[:300]}"}


def result(spec: kernels.KernelSpec, dtype) -> dict:
    """The self-test record for (kernel, dtype) on this setup: from memory, the cache file, or a fresh run."""
    name = f"{spec.key}/{DTYPE_NAMES[dtype]}"
    if not kernels.on_metal_gpu():  # nothing to test, nothing to remember
        return {"passed": False, "detail": "not used: no Metal GPU (MLX's built-in mxfp4 ops run)", "cached": False}
    key = setup_key()
    memo = f"{key}|{name}"
    if memo in _results:
        return _results[memo]
    record = _load().get(key, {}).get(name)
    if isinstance(record, dict) and "passed" in record:
        record = dict(record, cached=True)
    else:
        record = dict(run(spec, dtype), tested=time.strftime("%Y-%m-%d %H:%M:%S"))
        _save(key, name, record)
        record["cached"] = False
    _results[memo] = record
    if not record["passed"] and name not in _warned:
        _warned.add(name)
        warnings.warn(f"gptoss-mac: Metal kernel {name} failed its self-test ({record['detail']}); "
                      "using MLX's built-in mxfp4 ops instead", RuntimeWarning, stacklevel=3)
    return record


def passed(spec: kernels.KernelSpec, dtype) -> bool:
    return bool(result(spec, dtype)["passed"])


def kernel_status(dtypes=None) -> list[dict]:
    """Self-test outcome of every kernel, for `gptoss-mac doctor`; runs the tests not yet done here.

    Each dict: kernel (e.g. "moe_down"), dtype ("bfloat16"), passed (bool), detail (one line), cached (bool:
    read from the cache file rather than run now). dtypes defaults to bfloat16, the activation dtype on Metal.
    """
    rows = []
    for dtype in dtypes or (mx.bfloat16,):
        for spec in kernels.SPECS:
            r = result(spec, dtype)
            rows.append({"kernel": spec.key, "dtype": DTYPE_NAMES[dtype], "passed": r["passed"],
                         "detail": r["detail"], "cached": r["cached"]})
    return rows


def clear() -> None:
    """Forget this process's results (tests; the cache file is left alone)."""
    _results.clear()
    _warned.clear()
