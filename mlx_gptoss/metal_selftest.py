"""First-use self-test of the custom Metal kernels on the user's Mac: correct, then faster, or not used.

Nothing proves a kernel compiles, runs right and is fast on a given Mac except running it there. Before
backend "auto" (kernels.py) uses a kernel for an activation dtype, this module runs it on exactly what
decode runs: gpt-oss's shapes (H = I = 2880, 4 experts per token) at T = 1 and T = 4 tokens (the two kernel
variants decode uses), against MLX's own mx.gather_qmm path in float32 on the same inputs. Only if it is
correct does it time it, the way decode runs it: ROUNDS layers of gate_up -> down chained, each on other
experts, cycling through more expert bytes than a Max/Ultra system-level cache holds (decode reads every
layer's experts from DRAM); the graph is built before the clock starts; the kernel's chain and MLX's own
alternate which goes first. The kernel is enabled only where its chain is faster by
selftest_record.MIN_SPEEDUP: at T = 1 for single tokens, at T = 4 for 2..4 (different kernel variants). A compile error or mismatch warns once; a slower kernel is quietly left off (doctor shows why).

Where and when. The test runs in a child process (ISOLATE): a GPU fault there, whether it aborts the process
or leaves MLX raising on every later operation, cannot touch the user's process; a child that dies or
exceeds TIMEOUT_S is a failed kernel, stored. It runs at load() (before any weight is read, so the child has
the memory the plan leaves free) or on `gptoss-mac doctor`, never inside a decode step, announced on stderr
in one line. Ctrl-C or SIGTERM during it kills the child and removes the pending record. Of two processes
starting at once, one tests each kernel and the other waits for its record (up to TIMEOUT_S).

The outcome is remembered per setup (GPU, macOS version and build, MLX version, kernel sources, tiles,
wrapper and this test: selftest_record.py), so the test runs once per setup; the key is computed once per
process. kernel_gate keeps each verdict, so a decode step never comes back here.

It answers kernels.py through kernel_gate (registered below): kernels.py never imports this module.
For `gptoss-mac doctor`: kernel_status() -> [{"kernel", "dtype", "passed", "enabled", "detail", "timings", ...}].
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
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
# auto gives the kernels). 32 experts (a 20b layer) are ~424 MB of MXFP4 weights, several times the largest
# system-level cache of an M-series Max or Ultra: ROUNDS = 8 chained layers of 4 experts at T = 1 read each
# of them once per sample, so every sample reads its weights from DRAM as decode does.
CASE = {"hidden": 2880, "intermediate": 2880, "experts": 32, "experts_per_token": 4, "tokens": (1, 4), "seed": 7,
        "rounds": 8}
# Timing: medians of REPS samples (each one evaluation of a ROUNDS-layer chain, its graph built beforehand);
# metal and builtin alternate, and which goes first alternates too.
WARMUP, REPS = 2, 15
ISOLATE = True  # run each test in a child process (tests of the logic itself may run it in-process)
TIMEOUT_S = 300.0  # a child still running after this is a kernel that hangs the GPU: a failure
WAIT_POLL_S = 0.25  # how often a process waiting for another's test reads the cache file

_results: dict[str, dict] = {}  # "setup|kernel/dtype" -> record, for this process
_warned: set[str] = set()
_setup: list[str] = []  # this process's setup key, computed once
_lock = threading.RLock()  # one thread tests at a time; the others wait for its record
_announced: list[str] = []


def code_hash() -> str:
    """Kernel sources + tiles + wrapper (kernels.source_hash) + this test's definition."""
    h = hashlib.sha256(kernels.source_hash().encode())
    for module in (sys.modules[__name__], selftest_record):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def compute_setup_key() -> str:
    """The GPU, macOS version and build, MLX version and code hash (a sysctl, file reads, a sha256)."""
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


def setup_key() -> str:
    """compute_setup_key(), once per process (nothing it names changes while a process runs)."""
    if not _setup:
        _setup.append(compute_setup_key())
    return _setup[0]


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
    """The case at T = tokens in dtype. Round r's token t uses experts order[n(r) + 4t .. n(r) + 4t + 3] (mod
    E), except that every token's first expert is token 0's: decode's tokens often share experts, and the
    kernels read a shared expert once. The rounds walk through all E experts in turn."""
    H, k, E = case["hidden"], case["experts_per_token"], case["experts"]
    rng = np.random.default_rng(case["seed"] + tokens)
    n = tokens * k

    def ids(r):  # with several tokens, all share their first expert (the kernels' SHARE path, as in drafts)
        a = weights["order"][(np.arange(n) + r * n) % E].reshape(tokens, k)
        a[:, 0] = a[0, 0]
        return mx.array(a.astype(np.uint32))

    rounds = [ids(r) for r in range(max(1, case.get("rounds", 1)))]
    a = dict(weights, ids=rounds[0], rounds=rounds,
             x=mx.array(rng.standard_normal((tokens, H), dtype=np.float32)),
             weights=mx.softmax(mx.array(rng.standard_normal((tokens, k), dtype=np.float32)), axis=-1))
    a = {n: v.astype(dtype) if isinstance(v, mx.array) and v.dtype == mx.float32 else v for n, v in a.items()}
    a["h"] = kernels._builtin_gate_up_swiglu(a["x"], a["wg"], a["sg"], a["bg"], a["ids"], 7.0, 1.702)
    mx.eval(a["h"], a["rounds"])
    return a


def _calls(spec: kernels.KernelSpec, a: dict):
    """(metal call, float32 reference) for one kernel on inputs a: the correctness check."""
    f32 = {n: a[n].astype(mx.float32) for n in ("x", "bg", "bd", "weights", "h")}
    if spec is kernels.GATE_UP:
        return (lambda: kernels._metal_gate_up_swiglu(a["x"], a["wg"], a["sg"], a["bg"], a["ids"], 7.0, 1.702),
                lambda: kernels._builtin_gate_up_swiglu(f32["x"], a["wg"], a["sg"], f32["bg"], a["ids"], 7.0, 1.702))
    return (lambda: kernels._metal_down(a["h"], a["wd"], a["sd"], a["bd"], a["ids"], a["weights"]),
            lambda: kernels._builtin_down(f32["h"], a["wd"], a["sd"], f32["bd"], a["ids"], f32["weights"]))


def _chains(spec: kernels.KernelSpec, a: dict) -> dict:
    """{"metal", "builtin"}: each builds (does not evaluate) what decode runs for len(a["rounds"]) layers:
    gate_up -> down chained, every layer on its own experts; "metal" runs spec's kernel, the other op on
    MLX's, so the two differ only in the kernel under test."""
    def chain(on_metal: bool):
        gate_up = kernels._metal_gate_up_swiglu if on_metal and spec is kernels.GATE_UP \
            else kernels._builtin_gate_up_swiglu
        down = kernels._metal_down if on_metal and spec is kernels.DOWN else kernels._builtin_down

        def build():
            x = a["x"]
            for ids in a["rounds"]:
                x = down(gate_up(x, a["wg"], a["sg"], a["bg"], ids, 7.0, 1.702), a["wd"], a["sd"], a["bd"], ids,
                         a["weights"])
            return x
        return build
    return {"metal": chain(True), "builtin": chain(False)}


def measure(calls: dict) -> dict:
    """Median seconds per evaluation of each of {name: build}: the graph is built before the clock starts,
    the backends alternate and so does which goes first, so drift and caches hit all alike."""
    names = list(calls)

    def sample(name):
        graph = calls[name]()
        t0 = time.perf_counter()
        mx.eval(graph)
        return time.perf_counter() - t0

    for _ in range(WARMUP):
        for name in names:
            sample(name)
    samples = {name: [] for name in names}
    for rep in range(REPS):
        for name in names if rep % 2 == 0 else names[::-1]:
            samples[name].append(sample(name))
    return {name: statistics.median(v) for name, v in samples.items()}


def run(spec: kernels.KernelSpec, dtype, case: dict | None = None) -> dict:
    """Test spec for dtype in this process: correctness at every T of the case, then timing; never raises
    (an Exception becomes a failed record; KeyboardInterrupt and the like pass)."""
    case = case or CASE
    tol = TOLERANCE[dtype]
    try:
        worst, timings, weights = 0.0, {}, _weights(case)
        for tokens in case["tokens"]:
            a = _inputs(dtype, tokens, case, weights)
            metal, reference = _calls(spec, a)
            got, want = metal().astype(mx.float32), reference()
            mx.eval(got, want)
            if got.shape != want.shape:
                return _failed(f"T={tokens}: output shape {got.shape}, expected {want.shape}")
            err = mx.abs(got - want).max().item() / max(mx.abs(want).max().item(), 1e-6)
            if not err <= tol:  # NaN fails too
                return _failed(f"T={tokens}: mismatch vs mx.gather_qmm: relative error {err:.2e} > {tol:.0e}",
                               error=err)
            worst = max(worst, err)
            t = measure(_chains(spec, a))
            layers = len(a["rounds"])
            timings[f"T={tokens}"] = {"metal_s": t["metal"] / layers, "builtin_s": t["builtin"] / layers}
        enabled_tokens, why = selftest_record.decide(True, timings)
        return {"passed": True, "enabled": bool(enabled_tokens), "enabled_tokens": enabled_tokens, "error": worst,
                "timings": timings, "tested": _now(),
                "detail": f"matches mx.gather_qmm (relative error {worst:.1e} <= {tol:.0e}); {why}"}
    except Exception as exc:  # a Metal compile error or GPU fault arrives as RuntimeError; anything else too
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        detail = f"{type(exc).__name__}: {first[:300]}"
        return _failed(detail, transient=selftest_record.is_transient(str(exc)))


def _failed(detail: str, **extra) -> dict:
    return {"passed": False, "enabled": False, "detail": detail, "tested": _now(), **extra}


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


CHILD = "from mlx_gptoss.metal_selftest import child_main; child_main()"


def run_isolated(spec: kernels.KernelSpec, dtype, case: dict | None = None) -> dict:
    """run() in a child process (CHILD). A child killed by a GPU fault, or still running after TIMEOUT_S, is
    a failed kernel; Ctrl-C or SIGTERM here kills the child and passes on."""
    args = [spec.key, DTYPE_NAMES[dtype], json.dumps(case or CASE)]
    try:  # stdin: never the user's (a piped chat's input stays the chat's)
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:  # says nothing about the kernel: tested again next time
        return _failed(f"could not start the test process ({sys.executable}): {e}", transient=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return _failed(f"the test did not finish within {TIMEOUT_S:.0f} s (a kernel that never ends hangs the "
                       "GPU)", timed_out=True)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    lines = out.strip().splitlines()
    if proc.returncode == 0 and lines:
        with contextlib.suppress(ValueError):
            return json.loads(lines[-1])
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    last = (err.strip().splitlines() or ["no output"])[-1][:300]
    return _failed(f"the test process died ({how}; a GPU fault aborts the process): {last}", crashed=True)


def child_main() -> None:
    """The child's side of run_isolated: argv = kernel key, dtype name, case (JSON); prints the record."""
    key, dtype_name, case = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    spec = next(s for s in kernels.SPECS if s.key == key)
    dtype = next(d for d, n in DTYPE_NAMES.items() if n == dtype_name)
    record = run(spec, dtype, dict(case, tokens=tuple(case["tokens"])))
    print(json.dumps(record), flush=True)


class _Terminated(BaseException):
    """SIGTERM arrived during a self-test (raised by the handler _sigterm_raises installs)."""


@contextlib.contextmanager
def _sigterm_raises():
    """On the main thread, SIGTERM raises _Terminated inside the block (else it would end the process
    without running any cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _test(spec: kernels.KernelSpec, dtype, key: str, name: str) -> dict:
    """Run the claimed test and store its record (a transient failure is not stored); an interruption
    removes the pending record so that it never reads as a crash."""
    try:
        with _sigterm_raises():
            record = run_isolated(spec, dtype) if ISOLATE else run(spec, dtype)
    except _Terminated:
        selftest_record.write(key, name, None)
        signal.raise_signal(signal.SIGTERM)  # what SIGTERM would have done, now that the record is gone
        return _failed("interrupted by SIGTERM", transient=True)  # only if a handler let the process live
    except BaseException:  # Ctrl-C
        selftest_record.write(key, name, None)
        raise
    selftest_record.write(key, name, None if record.get("transient") else record)
    return dict(record, cached=False)


def _announce(what: str = "testing the Metal MoE kernels on this Mac against MLX's own ops (once per setup, "
                          "a few seconds; `gptoss-mac doctor` shows the result)") -> None:
    """One line on stderr, once per process, when a self-test runs (or is waited for)."""
    if what not in _announced:
        _announced.append(what)
        print(f"gptoss-mac: {what}", file=sys.stderr, flush=True)


def _claim_or_wait(key: str, name: str) -> dict | None:
    """The stored record, or None once this process has claimed the test. While another process tests this
    kernel (two chats starting at once), wait for its record, up to TIMEOUT_S: then busy."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        stored = selftest_record.settle(selftest_record.claim(key, name), key, name)
        if stored is None or stored.get("state") != "busy" or stored["pid"] == os.getpid() \
                or time.monotonic() > deadline:
            return stored
        _announce(f"waiting for process {stored['pid']}, which is testing the Metal MoE kernels on this Mac")
        time.sleep(WAIT_POLL_S)


def result(spec: kernels.KernelSpec, dtype) -> dict:
    """The self-test record for (kernel, dtype) on this setup: from memory, the cache file, or a fresh run."""
    name = f"{spec.key}/{DTYPE_NAMES[dtype]}"
    if not kernels.on_metal_gpu():  # nothing to test, nothing to remember
        return {"passed": False, "enabled": False, "cached": False,
                "detail": "not used: no Metal GPU (MLX's built-in mxfp4 ops run)"}
    with _lock:
        key = setup_key()
        memo = f"{key}|{name}"
        if memo in _results:
            return _results[memo]
        stored = _claim_or_wait(key, name)
        if stored is not None and stored.get("state") == "busy":  # not remembered: the next load asks again
            return {"passed": False, "enabled": False, "cached": False, "busy": True,
                    "detail": f"being self-tested by process {stored['pid']}; MLX's built-in ops until it is done"}
        if stored is not None:
            record = dict(stored, cached=True)
        else:  # claimed: our pending record is stored
            _announce()
            record = _test(spec, dtype, key, name)
        _results[memo] = record
    if not record["passed"] and name not in _warned:
        _warned.add(name)
        warnings.warn(f"gptoss-mac: Metal kernel {name} failed its self-test ({record['detail']}); "
                      "using MLX's built-in mxfp4 ops instead", RuntimeWarning, stacklevel=3)
    return record


def approves(kernel_key: str, dtype, tokens: int) -> bool:
    """kernel_gate's judge: is this kernel enabled for this dtype at T = tokens on this setup (testing it if
    due)? By the timing of the smallest tested T >= tokens."""
    spec = next((s for s in kernels.SPECS if s.key == kernel_key), None)
    if spec is None or dtype not in DTYPE_NAMES:
        return False
    record = result(spec, dtype)
    timed = [int(t.removeprefix("T=")) for t in record.get("timings", {})]
    return bool(record["enabled"]) and selftest_record.covering_count(timed, tokens) in record["enabled_tokens"]


def prepare(dtype) -> None:
    """At model load: decide now (testing if due) whether auto uses each kernel for dtype, so that no decode
    step ever does; each load decides afresh (from this process's memory or the cache file)."""
    kernel_gate.forget()
    if dtype in DTYPE_NAMES and kernels.on_metal_gpu():
        for spec in kernels.SPECS:
            for tokens in range(1, kernels.DECODE_MAX_TOKENS + 1):
                kernel_gate.approved(spec.key, dtype, tokens)


def kernel_status(dtypes=None) -> list[dict]:
    """Self-test outcome of every kernel, for `gptoss-mac doctor`; runs the tests not yet done here.

    Each dict: kernel (e.g. "moe_down"), dtype ("bfloat16"), passed (correct), enabled (auto uses it),
    detail (one line), timings ({"T=1": {"metal_s", "builtin_s"}, ...} seconds per decode layer, when timed),
    cached (read from the cache file rather than run now), busy (another process is still testing it). dtypes defaults to bfloat16, the activation dtype on Metal.
    """
    rows = []
    for dtype in dtypes or (mx.bfloat16,):
        for spec in kernels.SPECS:
            r = result(spec, dtype)
            rows.append({"kernel": spec.key, "dtype": DTYPE_NAMES[dtype], "passed": r["passed"],
                         "enabled": r.get("enabled", False), "detail": r["detail"],
                         "timings": r.get("timings", {}), "cached": r.get("cached", False),
                         "busy": r.get("busy", False)})
    return rows


def clear() -> None:
    """Forget everything this process knows (tests: as a new process would start; the cache file stays)."""
    _results.clear()
    _warned.clear()
    _setup.clear()
    _announced.clear()
    kernel_gate.forget()


kernel_gate.set_judge(approves)
