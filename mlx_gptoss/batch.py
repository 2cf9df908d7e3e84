"""Continuous batching: requests that decode together, one token each per step, while new ones prefill.

Each request has its own Runner (KV cache, snapshots, prompt cache) and its own Reply (sampler with its own
RNG key, parser, limits, Stats): what it generates does not depend on what runs beside it. A step:
  1. at most one chunk of one request's prefill (the oldest first); a prefill that ends samples its first
     token, and the request decodes from the next step on;
  2. one decode step for every decoding request: ONE forward pass over the stacked [B, 1, hidden] rows
     (embedding, norms, QKV/O projections, router, the experts' gather_qmm over all B tokens, unembedding:
     each weight is read once per step, not once per request), where attention alone runs per row against
     that request's own caches (mlx_gptoss.model.Rows), so each keeps its own length and sliding window.
Decoding is pipelined as in generate_events: the next forward pass is queued before Python reads the
current tokens. A request leaves when its Reply is done or it is cancelled (checked before each token and
between prefill chunks); the others are not disturbed.

The prefill chunk: the plan's (the most one forward pass may hold) while nothing decodes; while requests
decode, a chunk that keeps each step at most about twice a plain decode step, adjusted from measured step
times (halved when a step with a chunk took over 1.8x a decode-only step, grown by a quarter under 1.3x).

Under mlx.launch (a model mirrored to followers, not a plain Transformer) the rows are not stacked: each
decoding request runs its own mirrored forward pass per step (interleaved, not batched).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import mlx.core as mx

from .chat import Event, Reply, Runner
from .model import Rows, Transformer

GROW, SHRINK = 1.3, 1.8  # a step with a prefill chunk vs a decode-only step: grow the chunk below, shrink above


class Cancel(threading.Event):
    """A cancel flag that says why (the Stats' stop_reason: "cancelled", "shutdown")."""

    reason = "cancelled"

    def set(self, reason: str = "cancelled") -> None:
        self.reason = reason
        super().set()


def step_lazy(runners: list[Runner], tokens: list[mx.array]) -> list[mx.array]:
    """Queue one decode step of several runners (each token [1], lazy): each one's [V] logits, lazy."""
    gpt = runners[0].gpt
    if len(runners) == 1 or not isinstance(gpt.model, Transformer):
        return [r.step_lazy(t) for r, t in zip(runners, tokens)]
    for r in runners:
        r.dirty = True
    layers = [Rows(r.cache[i] for r in runners) for i in range(len(runners[0].cache))]
    x = mx.concatenate([t.reshape(1) for t in tokens]).reshape(-1, 1).astype(mx.int32)
    logits = gpt.model(x, cache=layers)[:, -1].astype(mx.float32)
    for r in runners:
        r.ids.append(None)  # set_last() fills it in, as after Runner.step_lazy
        r.dirty = False
    return [logits[b] for b in range(len(runners))]


@dataclass(eq=False)
class Request:
    """One generation in a Batch: its runner (a KV slot), prompt, Reply and cancel flag."""
    runner: Runner
    prompt: list[int]
    reply: Reply
    cancel: threading.Event = field(default_factory=Cancel)
    tag: object = None  # the caller's (the server's Job)
    batch: int = 0  # the most requests it decoded together with (itself included)
    _prefill: object = None  # Runner.prefill_steps, while prefilling
    _started: bool = False
    _y: mx.array | None = None  # the current token (lazy) while decoding

    def advance(self, n: int):
        """Run one prefill chunk of up to n tokens; (logits, prefilled) once the prompt is all in."""
        if self._prefill is None:
            self._prefill = self.runner.prefill_steps(self.prompt)
        try:
            if not self._started:
                self._started = True
                next(self._prefill)  # restores a snapshot if one is reused; no forward pass yet
            self._prefill.send(n)
        except StopIteration as done:
            self._prefill = None
            return done.value
        return None

    @property
    def decoding(self) -> bool:
        return self._y is not None


class Batch:
    """The requests being served on one model: add() them, call step() until idle."""

    def __init__(self, gpt, chunk: int):
        self.gpt = gpt
        self.chunk = max(1, chunk)  # the plan's prefill chunk
        self.requests: list[Request] = []  # in arrival order
        self.interleaved = 0  # the chunk used while others decode (0: not measured yet)
        self._plain = 0.0  # seconds of a decode-only step (moving average)
        self.steps = self.chunks = 0

    def add(self, req: Request) -> None:
        self.requests.append(req)

    @property
    def idle(self) -> bool:
        return not self.requests

    @property
    def size(self) -> int:
        """How many requests decode together now."""
        return sum(r.decoding for r in self.requests)

    def step(self) -> list[tuple[Request, list[Event] | BaseException]]:
        """One step. Returns each request's new events, or the exception that ended it; a request whose
        events end with "done", or that got an exception, has left the batch."""
        out: list[tuple[Request, list[Event] | BaseException]] = []
        t0 = time.perf_counter()
        decoding = [r for r in self.requests if r.decoding]
        for r in [r for r in self.requests if r.cancel.is_set()]:  # before its next forward pass is queued
            r.reply.cancel(getattr(r.cancel, "reason", "cancelled"))
            if r._prefill is not None:
                r._prefill.close()
            out.append((r, r.reply.finish()))
        decoding = [r for r in decoding if not r.reply.done]
        chunked = self._prefill_one(out, bool(decoding))
        fw = [r for r in decoding if r.reply.wants_next()]
        nxt = {}
        if fw:
            try:
                logits = step_lazy([r.runner for r in fw], [r._y for r in fw])
                nxt = {r: r.reply.sample(lg) for r, lg in zip(fw, logits)}
                mx.async_eval(list(nxt.values()))
            except Exception as e:  # a fault in the batched pass ends every request in it
                out += [(r, e) for r in decoding]
                decoding = []
        for r in decoding:
            r.batch = max(r.batch, len(decoding))
            try:
                token = int(r._y.item())
                if r in nxt:
                    r.runner.set_last(token)
                events = r.reply.feed(token)
                r._y = nxt.get(r)
                out.append((r, events + (r.reply.finish() if r.reply.done else [])))
            except Exception as e:
                out.append((r, e))
        gone = {id(r) for r, item in out if not isinstance(item, list) or (item and item[-1].kind == "done")}
        self.requests = [r for r in self.requests if id(r) not in gone]
        self._measure(time.perf_counter() - t0, chunked, bool(decoding))
        return out

    def _prefill_one(self, out: list, others_decode: bool) -> bool:
        """One chunk of the oldest prefilling request; returns whether a chunk ran."""
        req = next((r for r in self.requests if not r.decoding and not r.reply.done), None)
        if req is None:
            return False
        n = self.chunk
        if others_decode:
            self.interleaved = self.interleaved or max(1, self.chunk // 16)
            n = self.interleaved
        try:
            done = req.advance(n)
            if done is not None:
                req._y = req.reply.prefilled(*done)
                mx.async_eval(req._y)
        except Exception as e:
            req.reply.done = True
            out.append((req, e))
        self.chunks += 1
        return True

    def _measure(self, seconds: float, chunked: bool, decoded: bool) -> None:
        """Adjust the interleaved chunk so a step with a chunk stays near a decode-only step's time."""
        if not decoded:
            return
        self.steps += 1
        if not chunked:
            self._plain = seconds if not self._plain else 0.8 * self._plain + 0.2 * seconds
        elif self._plain and self.interleaved:
            ratio = seconds / self._plain
            if ratio > SHRINK:
                self.interleaved = max(1, self.interleaved // 2)
            elif ratio < GROW:
                self.interleaved = min(self.chunk, max(self.interleaved + 1, int(self.interleaved * 1.25)))
