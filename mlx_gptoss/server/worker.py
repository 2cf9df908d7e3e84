"""The model thread: a bounded queue of jobs, and one scheduler (mlx_gptoss.batch) serving them on one thread.

MLX streams belong to the thread that made them, so every model call (loading too, when the server is
given a loader) happens on this thread; the event loop only renders prompts and moves events. Engine.run()
starts a job's generation and Batch.step() runs the model: a distributed follower mirrors those model calls.

Policy (documented in the README): jobs wait in a queue of max_queue (a full queue answers 429 with
Retry-After) and join the running batch between steps, in arrival order, while it has room: at most
max_batch requests (--max-batch; default the slot count, which the memory plan sizes), each on its own KV
slot, all of whose caches fit the plan's token budget (a prompt plus the room its reply may take). Running
requests decode together, one token each per step; a new one prefills one chunk per step in between. A job
is cancelled when its client disconnects (queued: it is skipped; prefilling: it stops between chunks;
decoding: before its next token, so its slot keeps a consistent cache) or at shutdown: a running job then
ends with stop_reason "shutdown", a queued one gets a 503.
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

from ..batch import Batch, Cancel, Request
from ..chat import Event, Reply, Stats, context_cap, prefill_chunk
from ..errors import GptOssError
from ..memory import ContextLengthError
from .errors import APIError
from .slots import SlotPool

log = logging.getLogger("gptoss_mac.server")
SHUTTING_DOWN = "the server is shutting down; retry"


class Engine:
    """The model calls of the server: the slot pool and the batch. Only the model thread uses it."""

    def __init__(self, gpt, slots: int | None = None, max_batch: int | None = None):
        self.gpt = gpt
        self.pool = SlotPool(gpt, slots)
        self.cap = context_cap(gpt, None)
        self.max_batch = max(1, min(max_batch or self.pool.size, self.pool.size))
        self.batch = Batch(gpt, prefill_chunk(gpt))

    def run(self, prompt: list[int], parser, cancel: threading.Event, *, max_tokens: int | None = None,
            temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> Request | None:
        """Start a generation: it joins the batch (None: no slot or KV room for it yet; it waits)."""
        if len(self.batch.requests) >= self.max_batch:
            return None
        reply = Reply(prompt, cap=self.cap, parser=parser, max_tokens=max_tokens, temperature=temperature,
                      top_p=top_p, seed=seed)
        room = self.cap - len(prompt)
        runner = self.pool.acquire(prompt, reserve=min(max_tokens, room) if max_tokens else room)
        if runner is None:
            return None
        req = Request(runner, prompt, reply, cancel)
        self.batch.add(req)
        return req

    def release(self, req: Request) -> None:
        self.pool.release(req.runner)


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
    cancel: Cancel = field(default_factory=Cancel)
    tokens: int = 0  # generated so far
    cancelled_at: int | None = None  # tokens generated when cancel was asked
    stats: Stats | None = None
    batch: int = 0  # the most requests it decoded together with
    finished: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0  # perf_counter when it left the queue

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    def stop(self, reason: str = "cancelled") -> None:
        """Ask the job to end ("cancelled": its client left; "shutdown": the server stops, which wins)."""
        if not self.cancel.is_set():
            self.cancelled_at = self.tokens
            self.cancel.set(reason)
        elif reason == "shutdown":
            self.cancel.reason = reason

    async def next(self, timeout: float):
        """The next Event or APIError from the model thread, or None after timeout seconds."""
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            return None


class Worker:
    """The model thread and its queue. `load` is a loaded GptOss, or a function loading one (run on the
    model thread itself)."""

    def __init__(self, load, *, slots: int | None = None, max_queue: int = 16, max_batch: int | None = None,
                 on_ready: Callable[[object], None] | None = None):
        self._load, self._slots, self._max_batch, self._on_ready = load, slots, max_batch, on_ready
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self.thread = threading.Thread(target=_run_then_park, args=([self._main],), name="gptoss-model", daemon=True)
        self.ready = threading.Event()
        self.stopped = threading.Event()  # the model loop has ended (its thread then parks: _run_then_park)
        self.error: BaseException | None = None
        self.engine: Engine | None = None
        self.running: list[Job] = []  # in arrival order: prefilling or decoding
        self.done: deque[Job] = deque(maxlen=256)  # recent jobs (for inspection and tests)
        self._closing = threading.Event()
        self._wake = threading.Event()  # a job was submitted or stopped: the idle model thread looks again
        self._seconds: deque[float] = deque(maxlen=16)  # recent job durations, for Retry-After

    @property
    def current(self) -> Job | None:
        """The oldest running job."""
        running = self.running
        return running[0] if running else None

    @property
    def alive(self) -> bool:
        """The model loop runs (False once it has ended: shut down, or died of a bug)."""
        return self.thread.is_alive() and not self.stopped.is_set()

    @property
    def batch_size(self) -> int:
        """How many jobs decode together now."""
        return self.engine.batch.size if self.engine else 0

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch if self.engine else 0

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
            self._serve()
        except BaseException as e:  # a bug: /health and every waiting request report the stopped thread
            log.error("the model thread stopped", exc_info=e)
            self.error = e
        finally:
            self.stopped.set()

    def _serve(self) -> None:
        try:
            gpt = self._load() if callable(self._load) else self._load
            self.engine = Engine(gpt, self._slots, self._max_batch)
            if self._on_ready:
                self._on_ready(gpt)
        except BaseException as e:  # reported by start() on the caller's thread
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        batch = self.engine.batch
        while not (self._closing.is_set() and batch.idle and self.queue.empty()):
            self._admit()
            if batch.idle:
                if self.queue.empty():
                    self._wake.wait(0.2)
                    self._wake.clear()
                continue
            for req, item in batch.step():
                self._deliver(req.tag, req, item)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every job (a running one ends with stop_reason "shutdown", a queued one gets a 503) and the
        thread, once each has had its final event."""
        self.cancel_all()
        self._closing.set()
        self._wake.set()
        self.stopped.wait(timeout) if self.thread.is_alive() else None

    def cancel_all(self) -> None:
        """The server is stopping: every job ends (see shutdown)."""
        for job in list(self.queue.queue) + list(self.running):
            if job is not None:
                job.stop("shutdown")
        self._wake.set()

    # ---- jobs
    def submit(self, job: Job) -> None:
        if self._closing.is_set():
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        try:
            self.queue.put_nowait(job)
            self._wake.set()
        except queue.Full:
            avg = sum(self._seconds) / len(self._seconds) if self._seconds else 1.0
            wait = max(1, min(60, round(avg * self.queue.maxsize / max(1, self.max_batch))))
            raise APIError(429, f"the server is busy: {self.queue.maxsize} requests are already waiting; retry "
                           f"in about {wait} s", code="queue_full", headers={"Retry-After": str(wait)}) from None

    def _admit(self) -> None:
        """Move queued jobs into the batch, oldest first, while it has room (the oldest waits for room)."""
        while True:
            with self.queue.mutex:
                job = self.queue.queue[0] if self.queue.queue else None
            if job is None:
                return
            job.started = time.perf_counter()
            if job.cancel.is_set():  # cancelled while queued: never reaches the model
                self.queue.get_nowait()
                if job.cancel.reason == "shutdown":
                    self._finish(job)
                    job.emit(APIError(503, SHUTTING_DOWN, code="server_shutting_down"))
                else:
                    job.stats = Stats(prompt_tokens=len(job.prompt), stop_reason="cancelled")
                    self._finish(job)
                    job.emit(Event("done", stats=job.stats))
                continue
            tap = _Tap(job.parser, job)
            try:
                req = self.engine.run(job.prompt, tap, job.cancel, **job.sampling)
            except Exception as e:  # refused before it ran (sampling, context): the request's fault
                self.queue.get_nowait()
                self._fail(job, e, admitted=False)
                continue
            if req is None:
                return
            self.queue.get_nowait()
            req.tag = job
            job.parser = tap
            self.running.append(job)

    def _deliver(self, job: Job, req: Request, item) -> None:
        job.batch = req.batch
        if not isinstance(item, list):
            self.engine.release(req)
            self._fail(job, item)
            return
        for ev in item:
            if ev.kind == "done":  # the job is on record before its client hears it is done
                self.engine.release(req)
                job.stats = ev.stats
                self._finish(job)
            job.emit(job.parser.annotate(ev))

    def _fail(self, job: Job, e: BaseException, admitted: bool = True) -> None:
        if isinstance(e, ContextLengthError):  # the context filled up in a way the request check could not foresee
            err = APIError(400, str(e), code="context_length_exceeded")
        elif isinstance(e, GptOssError) and not admitted:  # e.g. sampling values the request check let through
            err = APIError(400, str(e))
        elif isinstance(e, GptOssError):  # a fault inside generation, e.g. non-finite logits: the server's
            err = APIError(500, f"generation failed: {e}", code="generation_failed")
        else:  # a bug: the client gets its name, the log the traceback
            log.error("request %s failed", job.id, exc_info=e)
            err = APIError(500, f"internal error: {type(e).__name__}: {e}")
        self._finish(job)
        job.emit(err)

    def _finish(self, job: Job) -> None:
        if job.finished.is_set():
            return
        if job in self.running:
            self.running.remove(job)
        seconds = time.perf_counter() - (job.started or time.perf_counter())
        self._seconds.append(seconds)
        self.done.append(job)
        job.finished.set()
        log.info(request_line(job, seconds))


def _run_then_park(box: list) -> None:
    """The model thread: run the worker's loop, then wait for the process to end instead of ending itself.

    Why: MLX keeps a compile cache per thread, and its destructor takes the GIL when the OS thread ends,
    which is after Thread.join() has returned (Python < 3.13). Should the interpreter be finalizing then
    (serve's main thread exits right after shutdown), CPython ends the thread inside that noexcept
    destructor and the process aborts: "terminate called without an active exception", SIGABRT (1 serve
    exit in 3 here, mlx 0.32.4, Python 3.11). A parked daemon thread runs no destructors: the exit takes it.
    It keeps no reference to the worker or its model (the box held the only one)."""
    box.pop()()
    threading.Event().wait()


def request_line(job: Job, seconds: float) -> str:
    s = job.stats
    if s is None:
        return f"{job.id} {job.kind} failed after {seconds:.2f} s"
    tps = s.generated_tokens / seconds if seconds > 0 else 0.0
    return (f"{job.id} {job.kind} prompt={s.prompt_tokens} cached={s.cached_tokens} generated={s.generated_tokens} "
            f"{tps:.1f} tok/s batch={job.batch} stop={s.stop_reason}" + (" malformed" if s.malformed else ""))
