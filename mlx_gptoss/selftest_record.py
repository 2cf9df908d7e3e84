"""What the Metal kernels' self-test remembers between runs, and the rule that turns a result into a verdict.

No GPU is needed here, so all of it is tested on Linux: the cache file, its key, the pending record that
makes a crash count as a failure, which failures are transient (never stored), and the decision rule.

- The cache file (~/.cache/gptoss-mac/kernel-selftest.json, $XDG_CACHE_HOME honoured) maps a setup key to
  {"moe_down/bfloat16": record, ...}. The key names everything that can change a kernel's fate: the GPU, the
  macOS version and build (the Metal compiler ships with the OS), the MLX version, and a hash of the kernel
  sources, tiles, the wrapper in kernels.py and the test definition. A new one of any re-runs the test.
- Before a test runs, a pending record {"state": "pending", "pid", "started"} is written. A GPU fault can
  abort the process inside Metal's completion handler, before any result is recorded; the next process then
  finds the pending record of a dead process and stores it as a failure, instead of crashing again. A pending
  record of this very process is a test another of its threads is running (busy), unless this process never
  claimed it (then its pid was reused: a crash). Ctrl-C or SIGTERM during the test removes the record.
- Out-of-memory failures (and a command buffer discarded for another process's GPU fault) say nothing about
  the kernel: they are kept for the process only. A timeout is the kernel's: stored as a failure.
- decide(): a kernel is enabled for "auto" only if it is correct AND faster than MLX's own ops by at least
  MIN_SPEEDUP; at T = 1 by its T = 1 timing, at T = 2..4 by its T = 4 timing (a different kernel variant).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

# auto uses a kernel only if MLX's time / the kernel's time >= this at every timed shape: a 5% margin
# keeps timing noise from switching a kernel on that is no faster.
MIN_SPEEDUP = 1.05
# A pending record older than this is a crash even if its pid was reused by another process.
PENDING_STALE_SECONDS = 3600
TRANSIENT = re.compile(r"out of memory|outofmemory|insufficient memory|resource exhausted|"
                       r"command buffer.*(?:discarded|not enqueued)", re.I)
_claimed_here: set[tuple[str, str]] = set()  # (key, name) whose pending record this process wrote


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptoss-mac" / "kernel-selftest.json"


def setup_key(device: str, os_version: str, mlx_version: str, code_hash: str) -> str:
    return f"{device}|{os_version}|mlx {mlx_version}|code {code_hash}"


@contextlib.contextmanager
def _locked():
    """Serialize read-modify-write of the cache file between processes (two chats starting at once)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # read-only home: no lock, no file; the test simply runs again next time
        yield
        return
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _load() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(data: dict) -> None:
    path = cache_file()
    try:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def write(key: str, name: str, record: dict | None) -> None:
    """Store record under key/name (None removes it)."""
    with _locked():
        data = _load()
        entry = data.setdefault(key, {})
        if record is None:
            entry.pop(name, None)
        else:
            entry[name] = record
        _store(data)
    _claimed_here.discard((key, name))


def claim(key: str, name: str) -> dict | None:
    """The stored record, if any; else None, after storing this process's pending record in the same locked
    step, so that of two processes starting at once only one runs the test (the other sees it pending)."""
    with _locked():
        data = _load()
        record = data.get(key, {}).get(name)
        if isinstance(record, dict) and ("passed" in record or record.get("state") == "pending"):
            return record
        data.setdefault(key, {})[name] = {"state": "pending", "pid": os.getpid(), "started": time.time()}
        _store(data)
        _claimed_here.add((key, name))
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def settle(record: dict | None, key: str, name: str) -> dict | None:
    """A stored record as the caller should see it: None when there is none (the test is due), a finished
    record as is, a pending one as {"state": "busy"} while its process runs the test now, else (its process
    died mid-test) as a failure, which is stored."""
    if record is None or record.get("state") != "pending":
        return record
    pid, started = int(record.get("pid", -1)), float(record.get("started", 0))
    ours = pid == os.getpid()
    if (ours and (key, name) in _claimed_here) or (not ours and _alive(pid)
                                                   and time.time() - started < PENDING_STALE_SECONDS):
        return {"state": "busy", "pid": pid}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    failed = {"passed": False, "enabled": False, "crashed": True, "tested": when,
              "detail": f"the self-test did not finish: process {pid}, started {when}, ended without a result "
                        f"(a GPU fault aborts the process); not retried until the kernels, MLX or macOS "
                        f"change, or {cache_file()} is deleted"}
    write(key, name, failed)
    return failed


def is_transient(detail: str) -> bool:
    return bool(TRANSIENT.search(detail))


def decide(correct: bool, timings: dict) -> tuple[list[int], str]:
    """(the timed token counts at which auto uses the kernel, why) from correctness and
    {"T=1": {"metal_s", "builtin_s"}, "T=4": ...}. A call with T tokens follows the verdict of the smallest
    timed count >= T (covering_count): T = 1 its own, T = 2..4 that of T = 4 (one kernel variant)."""
    if not correct:
        return [], "not correct"
    if not timings:
        return [], "not timed"
    ratios = {t: v["builtin_s"] / v["metal_s"] if v["metal_s"] > 0 else 0.0 for t, v in timings.items()}
    text = ", ".join(f"{r:.2f}x at {t}" for t, r in ratios.items())
    faster = [int(t.removeprefix("T=")) for t, r in ratios.items() if r >= MIN_SPEEDUP]
    if len(faster) == len(ratios):
        return faster, f"faster than MLX's built-in ops ({text}): used by auto"
    if faster:
        where = ", ".join(f"T={n}" for n in faster)
        return faster, (f"faster than MLX's built-in ops by {MIN_SPEEDUP:.2f}x only at {where} ({text}): used by "
                        f"auto for calls those counts cover, MLX's ops for the others")
    return [], f"not faster than MLX's built-in ops by {MIN_SPEEDUP:.2f}x ({text}): auto keeps MLX's ops"


def covering_count(timed: list[int], tokens: int) -> int | None:
    """The smallest timed token count >= tokens (the kernel variant and load a call with `tokens` has)."""
    return min((n for n in timed if n >= tokens), default=None)
