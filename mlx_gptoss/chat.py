"""Harmony chat on a loaded model: the generation loop, its events, and the multi-turn Session.

Messages are plain JSON-able dicts (what `Session.messages`, `save()` and `GptOss.chat()` use):

    {"role": "user", "content": "What is the weather in Paris?"}
    {"role": "developer", "content": "Answer in French."}   # instructions (also developer=); a "system"
                                                             # message is instructions too (the identity line stays)
    {"role": "assistant", "content": "final answer", "reasoning": "chain-of-thought (optional)"}
    {"role": "assistant", "reasoning": "...", "tool_calls": [{"id": "call_1f..", "name": "get_weather",
                                                              "arguments": "{\"city\": \"Paris\"}"}]}
    {"role": "tool", "name": "get_weather", "tool_call_id": "call_1f..", "content": "{\"temp_c\": 21}"}

An assistant message the model produced also carries "parts": the harmony messages exactly as it wrote them,
in order, each {"channel": "analysis"|"commentary"|"final", "content": str, "recipient": str|None
("functions.get_weather", or a bare "python"), "content_type": str|None ("<|constrain|>json", "code"),
"id": str|None (the call id, on parts with a recipient)}. A commentary part without recipient is a preamble
(text for the user before a call). When "parts" is present it is what gets rendered; the summary keys
("content": the final text, "reasoning": the analysis texts joined by a blank line, "tool_calls") are for simple
readers. A dict without "parts" renders in the canonical order: analysis, tool calls, final.
tool_calls entries: {"id", "name", "arguments": str} plus "recipient" when it is not functions.NAME (a bare
"python": name and recipient "python"). A tool message answers the call with its tool_call_id, else the latest
call of that name; it is rendered as authored by that call's recipient, on that call's channel.

What the history keeps (mlx_gptoss.harmony.render): the reasoning of a turn is dropped once a final answer
follows it, and at the next user message unless the turn ended with a tool result (a reply cut by max_tokens,
or whose call nobody answered, loses it). A turn without a final answer yet is rendered exactly as the model
wrote it: a Session renders the very ids it generated; from message dicts alone (a server) the text is
re-encoded in the model's header order (a call's channel before its recipient). In a tool loop every model
call after the first prefills only the tool results it adds, and a user message after an answered call only itself and
the results. After a final answer the next turn re-prefills that turn from its user message on (its reasoning
is gone, so the cache diverges there); `<|return|>` is stored as `<|end|>`.

Events (`Event`, yielded by `GptOss.chat()` and `Session.send()`), `.kind` is one of:
    "reasoning"  .text: a piece of chain-of-thought (analysis channel; hide it from end users by default).
                 Two analysis messages are separated by one "\n\n" reasoning event. Text the model wrote
                 without a valid channel or header is also reasoning, with .channel None (the only text
                 event without a channel: a UI can show it as what it is) and stats.malformed set.
    "preamble"   .text: a piece of commentary without recipient: what the model tells the user before a
                 tool call (show it, e.g. dimmed, before the call)
    "content"    .text: a piece of the answer (final channel)
    "tool_call"  .id ("call_<hex>"), .recipient ("functions.get_weather", "python"), .name ("get_weather",
                 "python"), .arguments (the string exactly as generated; may be invalid JSON), .channel
                 ("commentary", or "analysis" where gpt-oss often calls from), .text == .arguments
    "done"       .stats: a `Stats` (always the last event, also after a cancel or an error in the output)
Each text event has .channel too. `StreamParser.parts` (pass your own parser to generate_events) holds the
finished messages in the "parts" shape, in order.

`Stats` fields: prompt_tokens (the whole rendered prompt), prefilled_tokens (what this turn actually ran
through the model; the rest came from the session's prompt cache), cached_tokens, generated_tokens,
time_to_first_token (s), prefill_tps, decode_tps, peak_memory (bytes, mx.get_peak_memory), stop_reason
("return" | "call" | "max_tokens" | "context" | "cancelled" | "malformed": the output began a message that is
not the assistant's), malformed (True when the model's output did not follow harmony), warnings (list of str;
a call cut off by max_tokens is reported there with its partial arguments), dropped_messages (how many of the
oldest messages a Session removed to fit the context; 0 normally).

Session (`gpt.session(reasoning_effort="medium", developer=None, tools=None, messages=None, max_context=None,
drop_oldest=True)`), keeps the KV cache between turns so turn N prefills only what is new:
    send(text, *, max_tokens=None, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None,
         tools=None, auto_tools=False, keep_partial=False) -> iterator of Events
        Appends the user message, streams the reply, and appends the assistant message when the reply
        is complete. text=None continues the conversation as it is (e.g. after add_tool_result()).
        auto_tools=True runs Python tool functions itself: each call is yielded as a "tool_call" event,
        then run, its result appended as a tool message and generation continues until a final answer;
        several "done" events can then occur (one per model call); the last one ends the reply.
    add_tool_result(name, content, *, tool_call_id=None): append a tool message answering a "tool_call"
        (pass the event's .id; without it the oldest unanswered call of that name gets it), then send(None).
        A result for no pending call (an id never generated, a name the model did not call, a call answered
        already) raises GptOssError naming the pending calls. pending_calls(): those calls.
    messages: list of message dicts (a copy is safe to json.dumps).
    reset(): forget messages and cache (keeps settings).
    set_effort("low"|"medium"|"high"), set_developer(text | None), set_tools(tools): change the system/
        developer prefix; the cache is kept where it still matches (the next turn re-prefills the rest).
    to_dict() -> JSON-able dict (settings + messages); Session.from_dict(gpt, d) / gpt.session(**d).
    last_stats: the Stats of the last finished model call; dropped: total messages dropped for context.
    cancel(): ask a running send() (e.g. from another thread) to stop after the current token; it then
        yields "done" with stop_reason "cancelled".
    Interruption (Ctrl-C inside the loop, or closing the generator, or cancel()): the session stays
    consistent. The user message is kept; the unfinished reply is DROPPED unless send(keep_partial=True),
    which keeps the final-channel text produced so far as the assistant's answer. The KV cache goes back
    to the snapshot taken at the end of the last message, so the next turn is still incremental.
    A new send() (or reset()) first closes an unfinished earlier stream. If send() raises GptOssError before
    generating (a bad option, a message that cannot fit the context, NaN logits), the session is exactly as
    it was before send(): the user message is not kept and no turn is dropped.

Prompt cache (Runner): the growing KVCache layers can be trimmed to any length, but the sliding-window
RotatingKVCache layers cannot once they have wrapped. So the runner snapshots the sliding layers (128 tokens
each: cheap) at the end of every prompt and of its last message (a "mark"); a new prompt resumes from the
current cache if that is a prefix of it, else from the longest snapshot that is (trimming the full-attention
layers to it), else it is prefilled from scratch. Eight snapshots are kept, oldest evicted first, except the
marks a Session protects: the end of its last user message and every mark of the current turn, however many
tool rounds it takes. Prefill runs in chunks (the memory plan's prefill_chunk); decoding is
pipelined as in mlx-lm (the next forward pass is queued before Python handles the current token).

Context: a prompt longer than the context cap (max_context, default min(config max_position_embeddings,
the memory plan's context)) raises GptOssError from GptOss.chat(); a Session with drop_oldest=True drops
the oldest user turns instead when the prompt leaves less room than max_tokens (default: a quarter of the
context, at most 4096 tokens): as many as it takes for the conversation to fill at most half of the context
(DROP_TO) with that room kept, so that the turns after it are incremental again (one re-prefill per drop,
not one per turn), and reports it in stats.dropped_messages (never silently). Turns are dropped only when
the message then fits: one that cannot fit even alone is refused with the session unchanged.

Sampling options are checked before anything runs (one GptOssError naming the option): temperature >= 0,
top_p and min_p in [0, 1], all finite; top_k an integer >= 0; seed an integer >= 0 or None; max_tokens a
positive integer or None. A seeded reply samples from its own RNG key (Sampler), so the same seed gives the
same tokens whatever else runs beside it (the server decodes several requests together: mlx_gptoss.batch). Logits that are not finite at the first token (NaN weights, a dtype overflow) stop
the reply with a GptOssError naming the likely cause instead of sampling garbage up to the cap.

Tools: a Python callable (JSON schema from its signature, type hints and docstring) or a dict
{"name", "description", "parameters": JSON schema}. See mlx_gptoss.harmony.tool_spec().
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from . import harmony
from .errors import GptOssError
from .memory import PREFILL_CHUNK

DROP_TO = 0.5  # a full context drops the oldest turns until the conversation fills at most this fraction of it
MAX_SNAPSHOTS = 8


@dataclass
class Stats:
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory: int = 0
    stop_reason: str = ""
    malformed: bool = False
    warnings: list[str] = field(default_factory=list)
    dropped_messages: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Event:
    kind: str  # "reasoning" | "content" | "preamble" | "tool_call" | "tool_call_delta" (opt-in) | "done"
    text: str = ""
    recipient: str | None = None
    arguments: str | None = None
    stats: Stats | None = None
    id: str | None = None  # a tool call's id ("call_<hex>"): answer it with add_tool_result(..., tool_call_id=)
    channel: str | None = None  # the harmony channel the text or call came on

    @property
    def name(self) -> str | None:
        """The tool's name without the functions namespace ("get_weather"; a bare "python" stays "python")."""
        return harmony.call_name(self.recipient) if self.recipient else None


# --------------------------------------------------------------------------------- the KV cache engine

@dataclass
class _Snapshot:
    n: int  # tokens in the cache when taken (the end of a prompt, or of its last message: a "mark")
    sliding: dict  # layer index -> RotatingKVCache.state (cheap: a window of 128 tokens per layer)
    logits: mx.array | None  # the logits the prompt ended with (None for a mark)


def sliding_state(cache: list) -> dict:
    """Copies of the sliding-window layers' states, by layer index (cheap: one window each)."""
    return {i: tuple(mx.array(x) if isinstance(x, mx.array) else x for x in c.state)
            for i, c in enumerate(cache) if not isinstance(c, KVCache)}


def restore_cache(cache: list, sliding: dict, n: int) -> None:
    """Back to n tokens: the sliding layers from sliding_state() copies, the growing layers trimmed."""
    for i, c in enumerate(cache):
        if i in sliding:
            c.state = tuple(mx.array(x) if isinstance(x, mx.array) else x for x in sliding[i])
        else:
            c.offset = n  # KVCache.trim: positions past offset are overwritten by the next update


def prefill_chunk(gpt) -> int:
    """Tokens per prefill forward pass: the memory plan's (what its activation peak allows)."""
    return max(1, getattr(getattr(gpt, "plan", None), "prefill_chunk", 0) or PREFILL_CHUNK)


def runner_for(gpt) -> "Runner":
    """gpt's Runner: under mlx.launch rank 0's mirrors its cache operations (mlx_gptoss.distributed)."""
    return getattr(gpt, "runner_class", Runner)(gpt)


class Runner:
    """A model + one KV cache + the ids it holds. prefill(prompt) reuses the longest cached prefix:
    either the cache as it is (when its ids start the prompt), or a snapshot taken at the end of an earlier
    prompt (the growing KVCache layers are trimmed back to it, the sliding-window layers, which cannot be
    trimmed once they have wrapped, are restored from the snapshot's copy)."""

    def __init__(self, gpt):
        self.gpt = gpt
        self.cache = gpt.make_cache()
        self.ids: list[int] = []
        self.snapshots: list[_Snapshot] = []
        self.dirty = False  # a forward pass was interrupted: the cache may be ahead of self.ids in some layers
        # Marks at or after this many tokens are never evicted (a Session sets it to the end of its last user
        # message: the marks of the current turn, however many tool rounds it takes, and its start).
        self.keep_from: int | None = None
        self.chunk = prefill_chunk(gpt)

    def _forward(self, ids: list[int], want_logits: bool):
        self.dirty = True
        logits = self.gpt.model(mx.array([ids], dtype=mx.int32), cache=self.cache)
        if want_logits:
            logits = logits[0, -1].astype(mx.float32)
            mx.eval(logits, [c.state for c in self.cache])
        else:  # only the cache: the lm_head over the whole chunk is never computed
            mx.eval([c.state for c in self.cache])
        self.ids.extend(ids)
        self.dirty = False
        return logits if want_logits else None

    def _snapshot(self, logits) -> None:
        sliding = sliding_state(self.cache)
        snaps = [s for s in self.snapshots if s.n != len(self.ids)] + [_Snapshot(len(self.ids), sliding, logits)]
        kept = lambda s: self.keep_from is not None and s.logits is None and s.n >= self.keep_from  # noqa: E731
        evictable = [s for s in snaps if not kept(s)]
        gone = {id(s) for s in evictable[:max(0, len(evictable) - MAX_SNAPSHOTS)]}  # oldest first
        self.snapshots = [s for s in snaps if id(s) not in gone]

    def _restore(self, s: _Snapshot) -> None:
        restore_cache(self.cache, s.sliding, s.n)
        self.ids = self.ids[:s.n]
        self.snapshots = [t for t in self.snapshots if t.n <= s.n]
        self.dirty = False

    def reset(self) -> None:
        self.cache = self.gpt.make_cache()
        self.ids, self.snapshots, self.dirty = [], [], False

    def _extends(self, prompt: list[int]) -> bool:
        """The cache as it is holds a proper prefix of prompt."""
        n = len(self.ids)
        return not self.dirty and n < len(prompt) and self.ids == prompt[:n]

    def _best_snapshot(self, prompt: list[int]) -> "_Snapshot | None":
        return max((s for s in self.snapshots if s.n <= len(prompt) and self.ids[:s.n] == prompt[:s.n]),
                   key=lambda s: s.n, default=None)

    def reusable(self, prompt: list[int]) -> int:
        """How many tokens of prompt prefill(prompt) would take from this cache (e.g. to pick a cache)."""
        if self.ids and self._extends(prompt):
            return len(self.ids)
        best = self._best_snapshot(prompt)
        return best.n if best else 0

    def prefill(self, prompt: list[int]) -> tuple[mx.array, int]:
        """Bring the cache to exactly `prompt`; returns (the last position's logits, tokens prefilled)."""
        steps = self.prefill_steps(prompt)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def prefill_steps(self, prompt: list[int]):
        """prefill() one chunk at a time, for a scheduler that interleaves it with other work: a generator
        that yields before each chunk (send() it the chunk's size; None: self.chunk) and returns what
        prefill() returns. Closing it between chunks leaves a consistent cache holding the chunks run."""
        if not self._extends(prompt):
            best = self._best_snapshot(prompt)
            if best is None:
                self.reset()
            else:
                self._restore(best)
                if best.n == len(prompt) and best.logits is not None:
                    return best.logits, 0
                if best.n == len(prompt):  # a mark snapshot holds no logits: step back one token
                    best = max((s for s in self.snapshots if s.n < len(prompt)), key=lambda s: s.n, default=None)
                    self._restore(best) if best else self.reset()
        start = len(self.ids)
        # Two snapshots: at the end of the last message (before "<|start|>assistant"), so that a turn whose
        # reply is dropped (interrupted) still reuses the cache, and at the end of the prompt.
        mark = len(prompt) - 2 if len(prompt) - 2 > start else None
        for lo, hi in ((start, mark), (mark, len(prompt) - 1)) if mark else ((start, len(prompt) - 1),):
            i = lo
            while i < hi:
                n = max(1, (yield) or self.chunk)
                self._forward(prompt[i:min(i + n, hi)], want_logits=False)
                i += n
            if hi == mark:
                self._snapshot(None)
        logits = self._forward(prompt[-1:], want_logits=True)
        self._snapshot(logits)
        return logits, len(prompt) - start

    def step(self, token: int) -> mx.array:
        return self._forward([token], want_logits=True)

    def step_lazy(self, token: mx.array) -> mx.array:
        """Queue the forward pass of a sampled token not yet known to Python (shape [1]): its logits, lazy.
        Its id is recorded as None until set_last(); a None never matches a prompt, so an interruption
        before that only costs a restore from a snapshot."""
        self.dirty = True
        logits = self.gpt.model(token.reshape(1, 1).astype(mx.int32), cache=self.cache)[0, -1].astype(mx.float32)
        self.ids.append(None)
        self.dirty = False
        return logits

    def set_last(self, token: int) -> None:
        if self.ids and self.ids[-1] is None:
            self.ids[-1] = token


def context_cap(gpt, max_context: int | None) -> int:
    """The most tokens a prompt plus its reply may hold: the model's context, the plan's, max_context."""
    cap = gpt.config.max_position_embeddings
    planned = getattr(gpt, "max_context", 0) or 0
    if planned:
        cap = min(cap, planned)
    if max_context is not None:
        if max_context < 1:
            raise GptOssError(f"max_context {max_context}: must be at least 1 token")
        cap = min(cap, int(max_context))
    return cap


def check_sampling(*, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, max_tokens=None) -> None:
    """One clear GptOssError for any bad sampling option (also nan and inf, which would run silently)."""
    for name, v, lo, hi in (("temperature", temperature, 0, None), ("top_p", top_p, 0, 1), ("min_p", min_p, 0, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or (
                hi is not None and v > hi):
            raise GptOssError(f"{name} {v!r}: must be a finite number" + (f" in [{lo}, {hi}]" if hi else f" >= {lo}"))
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise GptOssError(f"top_k {top_k!r}: must be an integer >= 0 (0: off)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64):
        raise GptOssError(f"seed {seed!r}: must be an integer >= 0 (or None: a random seed)")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise GptOssError(f"max_tokens {max_tokens!r}: must be a positive integer (or None: up to the context cap)")


def _check_finite(logits: mx.array) -> None:
    """NaN or inf logits never sample anything meaningful: stop at the first token with the likely cause."""
    if not bool(mx.isfinite(logits).all().item()):
        raise GptOssError("the model's output (logits) holds NaN or infinity: the weights are probably corrupt or "
                          "wrongly converted, or the dtype overflows (try --dtype float32); check the checkpoint "
                          "(gptoss-mac doctor -m MODEL) and download it again if needed")


class Sampler:
    """One request's sampling, [V] logits -> a [1] token (lazy), with mlx-lm's filters. A seeded request
    draws from its own RNG key, so its tokens are the same whatever else runs beside it (a batch);
    without a seed it draws from MLX's global stream."""

    def __init__(self, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None):
        self.temperature = float(temperature)
        self.filters = [f for use, f in ((0 < top_p < 1, lambda x: apply_top_p(x, top_p)),
                                         (min_p != 0, lambda x: apply_min_p(x, min_p)),
                                         (top_k > 0, lambda x: apply_top_k(x, top_k))) if use]
        self.key = mx.random.key(seed) if seed is not None else None

    def __call__(self, logits: mx.array) -> mx.array:
        logits = logits[None]
        if self.temperature == 0:  # greedy: normalizing cannot change the argmax (and is a pass over the vocabulary)
            return mx.argmax(logits, axis=-1)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for f in self.filters:
            logprobs = f(logprobs)
        key = None
        if self.key is not None:
            self.key, key = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1 / self.temperature), key=key)


class Reply:
    """One request's generation after its prefill: sampling, limits, the parser, its Stats. generate_events
    drives one; the server's scheduler (mlx_gptoss.batch) drives several that decode together, so both
    stop, count and report exactly alike."""

    def __init__(self, prompt: list[int], *, cap: int, parser, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None, dropped: int = 0):
        check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                       max_tokens=max_tokens)
        if len(prompt) >= cap:
            raise GptOssError(f"the prompt has {len(prompt):,} tokens: the context cap of {cap:,} tokens leaves no "
                              "room for a reply; shorten the conversation, start a new one, or raise the context "
                              "(--ctx)")
        self.sample = Sampler(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
        self.parser = parser
        budget = cap - len(prompt)
        self.limit = min(budget, max_tokens) if max_tokens else budget
        self.stop = "max_tokens" if max_tokens and max_tokens < budget else "context"
        self.stats = Stats(prompt_tokens=len(prompt), dropped_messages=dropped)
        self.done = False
        self.t0 = time.perf_counter()
        self.t_prefill = 0.0
        self.t_first: float | None = None

    def prefilled(self, logits: mx.array, prefilled: int) -> mx.array:
        """After the prefill: checks its logits and returns the first token (lazy)."""
        _check_finite(logits)
        self.stats.prefilled_tokens = prefilled
        self.stats.cached_tokens = self.stats.prompt_tokens - prefilled
        self.t_prefill = time.perf_counter() - self.t0
        return self.sample(logits)

    def wants_next(self) -> bool:
        """Whether a token after the current one can still come (so its forward pass is worth queueing)."""
        return self.stats.generated_tokens + 1 < self.limit

    def feed(self, token: int) -> list[Event]:
        """The current token: its events; sets self.done at a stop token, a malformed turn or the limit."""
        self.stats.generated_tokens += 1
        if self.t_first is None:
            self.t_first = time.perf_counter()
            self.stats.time_to_first_token = self.t_first - self.t0
        events = _pieces_to_events(self.parser.feed(token))  # at a stop token: closes the message (tool call)
        if token in harmony.STOP_TOKENS:
            self.stop, self.done = harmony.STOP_TOKENS[token], True
        elif self.parser.halted:  # the output left the assistant's turn (e.g. <|start|>user): nothing more to show
            self.stop, self.done = "malformed", True
        elif self.stats.generated_tokens >= self.limit:
            self.done = True
        return events

    def cancel(self, reason: str = "cancelled") -> None:
        self.stop, self.done = reason, True

    def finish(self) -> list[Event]:
        """The events closing the reply, the last one "done" with the Stats."""
        events = _pieces_to_events(self.parser.finish(self.stop))
        t_end, stats = time.perf_counter(), self.stats
        stats.stop_reason = self.stop
        stats.prefill_tps = stats.prefilled_tokens / self.t_prefill if self.t_prefill > 0 and stats.prefilled_tokens \
            else 0.0
        if self.t_first is not None and stats.generated_tokens > 1 and t_end > self.t_first:
            stats.decode_tps = (stats.generated_tokens - 1) / (t_end - self.t_first)
        stats.peak_memory = int(mx.get_peak_memory())
        stats.malformed, stats.warnings = self.parser.malformed, list(self.parser.warnings)
        return events + [Event("done", stats=stats)]


def generate_events(runner: Runner, prompt: list[int], *, cap: int, max_tokens: int | None = None,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    seed: int | None = None, cancel: threading.Event | None = None,
                    parser: "harmony.StreamParser | None" = None, dropped: int = 0) -> Iterator[Event]:
    """Prefill `prompt` on runner, sample until <|return|>/<|call|>/max_tokens/the context cap, yield Events.
    The parser (pass your own to read `parser.parts` afterwards) collects the reply; the last event is "done"."""
    reply = Reply(prompt, cap=cap, parser=parser or harmony.StreamParser(runner.gpt.path), max_tokens=max_tokens,
                  temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, dropped=dropped)
    mx.reset_peak_memory()
    y = reply.prefilled(*runner.prefill(prompt))
    # Pipelined like mlx-lm's generate_step: the forward pass of token i and the sampling of token i+1 are
    # queued before Python waits for token i, so the model never idles while events are handled.
    mx.async_eval(y)
    while True:
        if cancel is not None and cancel.is_set():
            reply.cancel()
            break
        nxt = None
        if reply.wants_next():
            nxt = reply.sample(runner.step_lazy(y))
            mx.async_eval(nxt)
        token = int(y.item())
        if nxt is not None:
            runner.set_last(token)
        yield from reply.feed(token)
        if reply.done:
            break
        y = nxt
    yield from reply.finish()


def _pieces_to_events(pieces) -> list[Event]:
    """One Event per Piece; a tool call (and, from a parser with stream_arguments, each piece of its arguments
    as "tool_call_delta") carries its recipient, argument text and id."""
    return [Event(p.kind, p.text, p.recipient, p.text, id=p.id, channel=p.channel)
            if p.kind in ("tool_call", "tool_call_delta") else Event(p.kind, p.text, channel=p.channel)
            for p in pieces]


# ------------------------------------------------------------------------------------------- Session

def assistant_message(parser: "harmony.StreamParser") -> dict:
    """The message dict of a reply (what the history keeps): its ordered "parts", and the summary keys."""
    return harmony.assistant_dict(parser.parts)


class Session:
    """A multi-turn chat that keeps its KV cache between turns (see the module docstring)."""

    def __init__(self, gpt, *, reasoning_effort: str = "medium", developer: str | None = None, tools=None,
                 messages: list[dict] | None = None, max_context: int | None = None, drop_oldest: bool = True,
                 date: str | None = None):
        harmony.check_vocabulary(gpt.config.vocab_size, gpt.path)
        self.gpt = gpt
        self.effort = reasoning_effort
        self.developer = developer or None
        self.tools = harmony.tool_specs(tools)
        self.date = date or time.strftime("%Y-%m-%d")  # fixed for the session: the prompt prefix stays cached
        self.cap = context_cap(gpt, max_context)
        self.drop_oldest = drop_oldest
        self.messages: list[dict] = copy.deepcopy(list(messages or []))
        self.runner = runner_for(gpt)
        self.last_stats: Stats | None = None
        self.dropped = 0
        self._cancel = threading.Event()
        self._busy, self._pending, self._active, self._parser = False, [], None, None
        self._exact: dict[tuple, list[int]] = {}  # harmony.part_key -> the ids the model generated for it
        self.render()  # validate settings and messages now, not at the first send

    # -- settings
    def set_effort(self, effort: str) -> None:
        if effort not in harmony.EFFORTS:
            raise GptOssError(f"reasoning_effort {effort!r}: use one of {', '.join(harmony.EFFORTS)}")
        self.effort = effort

    def set_developer(self, text: str | None) -> None:
        self.developer = text or None

    def set_tools(self, tools) -> None:
        self.tools = harmony.tool_specs(tools)

    def reset(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None
        self.messages = []
        self._exact = {}
        self.runner.reset()

    def cancel(self) -> None:
        self._cancel.set()

    def pending_calls(self) -> list[dict]:
        """The tool calls of the current turn (since the last user message, and of the reply still streaming)
        that no tool message answers yet, in order: {"id", "name", "arguments"} (+ "recipient")."""
        answered = {m.get("tool_call_id") for m in self.messages + self._pending if m.get("role") == "tool"}
        last_user = max((i for i, m in enumerate(self.messages) if m.get("role") == "user"), default=-1)
        calls = [c for m in self.messages[last_user + 1:] if m.get("role") == "assistant"
                 for c in harmony.assistant_tool_calls(m)]
        if self._busy and self._parser:
            calls += self._parser.tool_calls
        return [c for c in calls if c.get("id") is None or c["id"] not in answered]

    def add_tool_result(self, name: str, content, *, tool_call_id: str | None = None) -> None:
        """Answer a pending tool call (best with the "tool_call" event's .id; else the oldest unanswered call of
        that name gets it). While its reply is still streaming, the result is added right after it. A result
        for a call that was never made (or is answered already) raises GptOssError naming the pending calls."""
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, default=str)
        pending = self.pending_calls()
        call = next((c for c in pending if (c.get("id") == tool_call_id if tool_call_id is not None
                                            else name in (c["name"], c.get("recipient")))), None)
        if call is None:
            asked = f"tool_call_id {tool_call_id!r}" if tool_call_id is not None else f"a call of {name!r}"
            waiting = ", ".join(f"{c['name']} (tool_call_id {c.get('id')!r})" for c in pending) or "none"
            raise GptOssError(f"add_tool_result({name!r}): there is no pending tool call with {asked}; "
                              f"the calls waiting for a result: {waiting}")
        msg = {"role": "tool", "name": name, "content": text}
        if call.get("id"):
            msg["tool_call_id"] = call["id"]
        (self._pending if self._busy else self.messages).append(msg)

    # -- persistence
    def to_dict(self) -> dict:
        return {"reasoning_effort": self.effort, "developer": self.developer, "date": self.date,
                "messages": copy.deepcopy(self.messages)}

    @classmethod
    def from_dict(cls, gpt, d: dict, **kw) -> "Session":
        if not isinstance(d, dict) or not isinstance(d.get("messages", []), list):
            raise GptOssError("a saved session must be a dict with a \"messages\" list")
        return cls(gpt, reasoning_effort=d.get("reasoning_effort", "medium"), developer=d.get("developer"),
                   date=d.get("date"), messages=d.get("messages"), **kw)

    # -- turns
    def render(self, messages: list[dict] | None = None) -> list[int]:
        return harmony.render(self.messages if messages is None else messages, model_path=self.gpt.path,
                              reasoning_effort=self.effort, tools=self.tools, developer=self.developer,
                              date=self.date, exact=lambda p: self._exact.get(harmony.part_key(p)))

    def _fit(self, reserve: int) -> tuple[list[int], int]:
        """The prompt ids; when they leave less than `reserve` tokens for the reply, the oldest whole turns are
        dropped until the prompt fills at most DROP_TO of the context (and leaves `reserve`). Turns are dropped
        only if the prompt then fits: a message that cannot fit at all raises GptOssError and leaves the
        messages exactly as they were."""
        msgs, dropped = self.messages, 0
        prompt = self.render(msgs)
        # Once turns must go, enough of them go that the conversation fills at most DROP_TO of the context:
        # dropping changes the prompt right after the system prefix (one re-prefill), and the turns after it
        # are incremental again until the context fills up once more (dropping one turn per turn would
        # re-prefill the whole conversation every turn).
        target = min(int(self.cap * DROP_TO), self.cap - reserve)
        while self.drop_oldest and len(prompt) + reserve > self.cap or dropped and len(prompt) > target:
            users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
            if len(users) < 2:  # only the current turn is left
                break
            dropped += users[1]
            msgs = msgs[users[1]:]
            prompt = self.render(msgs)
        if len(prompt) >= self.cap:
            alone = "" if dropped or not self.drop_oldest else " on its own"
            raise GptOssError(f"this message does not fit the context: the conversation needs {len(prompt):,} tokens"
                              f"{alone} and the context cap is {self.cap:,} (no room for a reply); nothing was "
                              "dropped. Send a shorter message, start a new conversation, or raise the context (--ctx)")
        if dropped:
            del self.messages[:dropped]
        return prompt, dropped

    def _keep_from(self) -> int | None:
        """Where the last user message ends in the prompt: the runner keeps the marks from there on."""
        users = [i for i, m in enumerate(self.messages) if m.get("role") == "user"]
        return len(self.render(self.messages[:users[-1] + 1])) - 2 if users else None

    def send(self, text: str | None, *, max_tokens: int | None = None, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None, tools=None,
             auto_tools: bool = False, keep_partial: bool = False, max_tool_rounds: int = 8) -> Iterator[Event]:
        check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                       max_tokens=max_tokens)
        if self._active is not None:  # an unfinished earlier reply: end it now so the history stays in order
            self._active.close()
            self._active = None
        if text is not None:
            if not isinstance(text, str):
                raise GptOssError(f"send(): the message must be a string, got {type(text).__name__}")
            self.messages.append({"role": "user", "content": text})
        if tools is not None:
            self.set_tools(tools)
        try:  # a message that cannot fit is refused now, with the session as it was
            fitted = self._fit(self._reserve(max_tokens))
        except GptOssError:
            if text is not None:
                self.messages.pop()
            raise
        self._active = self._turn(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  min_p=min_p, seed=seed, auto_tools=auto_tools, keep_partial=keep_partial,
                                  rounds=max_tool_rounds, added=text is not None, fitted=fitted)
        return self._active

    def _reserve(self, max_tokens: int | None) -> int:
        """Room kept for the reply when dropping old turns: max_tokens, else a quarter of the context."""
        return max_tokens or max(1, min(self.cap // 4, 4096))

    def _turn(self, *, auto_tools, keep_partial, rounds, added, fitted, **sampling) -> Iterator[Event]:
        self._cancel.clear()
        by_name = {t.name: t for t in self.tools}
        for round_ in range(max(1, rounds)):
            prompt, dropped = fitted if round_ == 0 else self._fit(self._reserve(sampling["max_tokens"]))
            self.dropped += dropped
            self.runner.keep_from = self._keep_from()
            parser = self._parser = harmony.StreamParser(self.gpt.path)
            done = None
            self._busy = True
            try:
                try:
                    stream = generate_events(self.runner, prompt, cap=self.cap, cancel=self._cancel, parser=parser,
                                             dropped=dropped, **sampling)
                    first = next(stream)
                except GptOssError:  # refused before anything ran (e.g. non-finite logits)
                    if added and round_ == 0 and self.messages and self.messages[-1].get("role") == "user":
                        self.messages.pop()  # the question was not taken: the session is as before send()
                    raise
                for ev in itertools.chain([first], stream):
                    if ev.kind == "done":
                        done = ev
                    else:
                        yield ev
            finally:  # also on Ctrl-C or close(): the history stays well-formed
                self._busy = False
                if parser.stopped or (done is not None and done.stats.stop_reason != "cancelled"):
                    self.messages.append(assistant_message(parser))
                    self._exact.update((harmony.part_key(p), ids) for p, ids in zip(parser.parts, parser.part_ids)
                                       if ids)
                elif keep_partial:
                    parser.finish("cancelled")  # closes the message that was streaming
                    if parser.content:
                        self.messages.append(assistant_message(parser))
                self.messages.extend(self._pending)  # tool results given while the reply streamed
                self._pending = []
            self.last_stats = done.stats
            yield done
            calls = parser.tool_calls if done.stats.stop_reason == "call" else []
            # auto_tools: run Python tools; a tool given only as a schema is the caller's to answer
            if not (auto_tools and calls and all(by_name[c["name"]].fn for c in calls if c["name"] in by_name)):
                return
            answered = {m.get("tool_call_id") for m in self.messages if m.get("role") == "tool"}
            for c in calls:
                if c["id"] in answered:
                    continue
                tool = by_name.get(c["name"])
                self.add_tool_result(c["name"], tool.run(c["arguments"]) if tool else  # the model can recover
                                     f"error: there is no tool named {c['name']!r}; available: "
                                     + (", ".join(by_name) or "none"), tool_call_id=c["id"])
