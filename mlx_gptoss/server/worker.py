"""The model thread: a bounded queue of jobs, run one at a time in arrival order, on one thread.

MLX streams belong to the thread that made them, so every model call (loading too, when the server is
given a loader) happens on this thread; the event loop only renders prompts and moves events. Engine.run()
is the one place the model thread calls the model: a distributed follower mirrors exactly that call.

Policy (documented in the README): one request generates at a time; others wait in a queue of max_queue
jobs (a full queue answers 429 with Retry-After). Batched decoding of concurrent requests is a later step.
A job is cancelled when its client disconnects (queued: it is skipped; running: the engine checks the flag
before every token, so it stops within one token and its slot keeps a consistent cache), or at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..chat import Event, Stats, context_cap, generate_events
from ..errors import GptOssError
from ..memory import ContextLengthError
from .errors import APIError
from .slots import SlotPool

log = logging.getLogger("gptoss_mac.server")


class Engine:
    """The model calls of the server: the slot pool and generation. Only the model thread uses it."""

    def __init__(self, gpt, slots: int | None = None):
        self.gpt = gpt
        self.pool = SlotPool(gpt, slots)
        self.cap = context_cap(gpt, None)

    def run(self, prompt: list[int], parser, cancel: threading.Event, *, max_tokens: int | None = None,
            temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None):
        room = self.cap - len(prompt)
        runner = self.pool.acquire(prompt, reserve=min(max_tokens, room) if max_tokens else room)
        return generate_events(runner, prompt, cap=self.cap, max_tokens=max_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, cancel=cancel, parser=parser)


class _Tap:
    """Wraps a parser: counts the tokens generated (for the cancel measurement) and keeps the Pieces it
    returns, whose `message` index and `separator` flag the Events made from them (one each, in order) drop."""

    def __init__(self, parser, job: "Job"):
        self._parser, self._job = parser, job
        self.pieces: deque = deque()

    def feed(self, token: int):
        self._job.tokens += 1
        out = self._parser.feed(token)
        self.pieces.extend(out)
        return out

    def finish(self, stop: str):
        out = self._parser.finish(stop)
        self.pieces.extend(out)
        return out

    def annotate(self, ev: Event) -> Event:
        """ev.message (which generated message it belongs to) and ev.separator, from its Piece."""
        piece = self.pieces.popleft() if ev.kind != "done" and self.pieces else None
        ev.message = getattr(piece, "message", 0)
        ev.separator = getattr(piece, "separator", False)
        return ev

    def __getattr__(self, name):
        return getattr(self._parser, name)


@dataclass
class Job:
    """One generation: its prompt, parser and sampling, and the channel its events go back to."""
    id: str
    kind: str  # the endpoint, for the log line
    prompt: list[int]
    parser: object
    sampling: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    tokens: int = 0  # generated so far
    cancelled_at: int | None = None  # tokens generated when cancel was asked
    stats: Stats | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    def stop(self) -> None:
        if not self.cancel.is_set():
            self.cancelled_at = self.tokens
            self.cancel.set()

    async def next(self, timeout: float):
        """The next Event or APIError from the model thread, or None after timeout seconds."""
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            return None


class Worker:
    """The model thread and its queue. `load` is a loaded GptOss, or a function loading one (run on the
    model thread itself)."""

    def __init__(self, load, *, slots: int | None = None, max_queue: int = 16,
                 on_ready: Callable[[object], None] | None = None):
        self._load, self._slots, self._on_ready = load, slots, on_ready
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self.thread = threading.Thread(target=self._main, name="gptoss-model", daemon=True)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.engine: Engine | None = None
        self.current: Job | None = None
        self.done: deque[Job] = deque(maxlen=256)  # recent jobs (for inspection and tests)
        self._closing = threading.Event()
        self._seconds: deque[float] = deque(maxlen=16)  # recent job durations, for Retry-After

    # ---- lifecycle
    def start(self, timeout: float | None = None) -> "Worker":
        self.thread.start()
        if not self.ready.wait(timeout):
            raise GptOssError(f"the model did not load within {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        return self

    def _main(self) -> None:
        try:
            gpt = self._load() if callable(self._load) else self._load
            self.engine = Engine(gpt, self._slots)
            if self._on_ready:
                self._on_ready(gpt)
        except BaseException as e:  # reported by start() on the caller's thread
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        while not self._closing.is_set():
            try:
                job = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if job is None:
                break
            self._run(job)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel every job (each still gets its final event) and stop the thread."""
        self.cancel_all()
        self._closing.set()
        self.thread.join(timeout) if self.thread.is_alive() else None

    def cancel_all(self) -> None:
        for job in list(self.queue.queue) + [self.current]:
            if job is not None:
                job.stop()

    # ---- jobs
    def submit(self, job: Job) -> None:
        if self._closing.is_set():
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            avg = sum(self._seconds) / len(self._seconds) if self._seconds else 1.0
            wait = max(1, min(60, round(avg * self.queue.maxsize)))
            raise APIError(429, f"the server is busy: {self.queue.maxsize} requests are already waiting; retry "
                           f"in about {wait} s", code="queue_full", headers={"Retry-After": str(wait)}) from None

    def _run(self, job: Job) -> None:
        self.current = job
        t0 = time.perf_counter()
        try:
            if job.cancel.is_set():  # cancelled while queued: never reaches the model
                job.stats = Stats(prompt_tokens=len(job.prompt), stop_reason="cancelled")
                self._finish(job, t0)
                job.emit(Event("done", stats=job.stats))
                return
            tap = _Tap(job.parser, job)
            for ev in self.engine.run(job.prompt, tap, job.cancel, **job.sampling):
                if ev.kind == "done":  # the job is on record before its client hears it is done
                    job.stats = ev.stats
                    self._finish(job, t0)
                job.emit(tap.annotate(ev))
        except GptOssError as e:  # the context filled up in a way the request check could not foresee (400), or
            self._finish(job, t0)  # a fault inside generation, e.g. non-finite logits: the server's (500)
            job.emit(APIError(400, str(e), code="context_length_exceeded") if isinstance(e, ContextLengthError)
                     else APIError(500, f"generation failed: {e}", code="generation_failed"))
        except Exception as e:  # a bug: the client gets its name, the log the traceback
            log.exception("request %s failed", job.id)
            self._finish(job, t0)
            job.emit(APIError(500, f"internal error: {type(e).__name__}: {e}"))
        finally:
            if not job.finished.is_set():
                self._finish(job, t0)

    def _finish(self, job: Job, t0: float) -> None:
        if job.finished.is_set():
            return
        self.current = None
        seconds = time.perf_counter() - t0
        self._seconds.append(seconds)
        self.done.append(job)
        job.finished.set()
        log.info(request_line(job, seconds))


def request_line(job: Job, seconds: float) -> str:
    s = job.stats
    if s is None:
        return f"{job.id} {job.kind} failed after {seconds:.2f} s"
    tps = s.generated_tokens / seconds if seconds > 0 else 0.0
    return (f"{job.id} {job.kind} prompt={s.prompt_tokens} cached={s.cached_tokens} generated={s.generated_tokens} "
            f"{tps:.1f} tok/s stop={s.stop_reason}" + (" malformed" if s.malformed else ""))
