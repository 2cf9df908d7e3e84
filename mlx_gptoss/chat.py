"""Harmony chat on a loaded model: the generation loop, its events, and the multi-turn Session.

Messages are plain JSON-able dicts (what `Session.messages`, `save()` and `GptOss.chat()` use):

    {"role": "user", "content": "What is the weather in Paris?"}
    {"role": "developer", "content": "Answer in French."}          # instructions, usually via developer=
    {"role": "assistant", "content": "final answer", "reasoning": "chain-of-thought (optional)"}
    {"role": "assistant", "reasoning": "...", "tool_calls": [{"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}]}
    {"role": "tool", "name": "get_weather", "content": "{\"temp_c\": 21}"}

Rendering follows harmony (mlx_gptoss.harmony): earlier chain-of-thought is dropped once a final answer
follows it, kept around tool calls; `<|return|>` is stored as `<|end|>`.

Events (`Event`, yielded by `GptOss.chat()` and `Session.send()`), `.kind` is one of:
    "reasoning"  .text: a piece of chain-of-thought (analysis channel; hide it from end users by default)
    "content"    .text: a piece of the answer (final channel; also malformed output, see stats.malformed)
    "tool_call"  .recipient ("functions.get_weather"), .name ("get_weather"), .arguments (the JSON string,
                 exactly as generated; may be invalid JSON), .text == .arguments
    "done"       .stats: a `Stats` (always the last event, also after a cancel or an error in the output)

`Stats` fields: prompt_tokens (the whole rendered prompt), prefilled_tokens (what this turn actually ran
through the model; the rest came from the session's prompt cache), cached_tokens, generated_tokens,
time_to_first_token (s), prefill_tps, decode_tps, peak_memory (bytes, mx.get_peak_memory), stop_reason
("return" | "call" | "max_tokens" | "context" | "cancelled"), malformed (True when the model's output did not
follow harmony; it was then shown as content), warnings (list of str), dropped_messages (how many of the
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
    add_tool_result(name, content): append a tool message answering a "tool_call" (then send(None)).
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
    generating (e.g. the prompt is over the context cap), the user message is not kept.

Prompt cache (Runner): the growing KVCache layers can be trimmed to any length, but the sliding-window
RotatingKVCache layers cannot once they have wrapped. So the runner snapshots the sliding layers (128 tokens
each: cheap) at the end of every prompt and of its last message; a new prompt resumes from the current cache
if that is a prefix of it, else from the longest snapshot that is (trimming the full-attention layers to it),
else it is prefilled from scratch. Prefill runs in chunks (the memory plan's prefill_chunk); decoding is
pipelined as in mlx-lm (the next forward pass is queued before Python handles the current token).

Context: a prompt longer than the context cap (max_context, default min(config max_position_embeddings,
the memory plan's context)) raises GptOssError from GptOss.chat(); a Session with drop_oldest=True drops
the oldest user turns instead, keeping room for max_tokens (default: a quarter of the context, at most 4096
tokens), and reports it in stats.dropped_messages (never silently).

Tools: a Python callable (JSON schema from its signature, type hints and docstring) or a dict
{"name", "description", "parameters": JSON schema}. See mlx_gptoss.harmony.tool_spec().
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import make_sampler

from . import harmony
from .errors import GptOssError

DEFAULT_PREFILL_CHUNK = 512
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
    kind: str  # "reasoning" | "content" | "tool_call" | "done"
    text: str = ""
    recipient: str | None = None
    arguments: str | None = None
    stats: Stats | None = None

    @property
    def name(self) -> str | None:
        """The tool's name without its namespace ("get_weather" for "functions.get_weather")."""
        return self.recipient.removeprefix("functions.") if self.recipient else None


# --------------------------------------------------------------------------------- the KV cache engine

@dataclass
class _Snapshot:
    n: int  # tokens in the cache when taken (the end of a prompt)
    sliding: dict  # layer index -> RotatingKVCache.state (cheap: a window of 128 tokens per layer)
    logits: mx.array | None  # the logits the prompt ended with (an identical prompt needs no forward pass)


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
        plan = getattr(gpt, "plan", None)
        self.chunk = max(1, getattr(plan, "prefill_chunk", 0) or DEFAULT_PREFILL_CHUNK)

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
        self.snapshots = [s for s in self.snapshots if s.n != len(self.ids)][-(MAX_SNAPSHOTS - 1):]
        self.snapshots.append(_Snapshot(len(self.ids), sliding, logits))

    def _restore(self, s: _Snapshot) -> None:
        restore_cache(self.cache, s.sliding, s.n)
        self.ids = self.ids[:s.n]
        self.snapshots = [t for t in self.snapshots if t.n <= s.n]
        self.dirty = False

    def reset(self) -> None:
        self.cache = self.gpt.make_cache()
        self.ids, self.snapshots, self.dirty = [], [], False

    def prefill(self, prompt: list[int]) -> tuple[mx.array, int]:
        """Bring the cache to exactly `prompt`; returns (the last position's logits, tokens prefilled)."""
        n = len(self.ids)
        if self.dirty or n >= len(prompt) or self.ids != prompt[:n]:
            best = max((s for s in self.snapshots if s.n <= len(prompt) and self.ids[:s.n] == prompt[:s.n]),
                       key=lambda s: s.n, default=None)
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
            for i in range(lo, hi, self.chunk):
                self._forward(prompt[i:min(i + self.chunk, hi)], want_logits=False)
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


def _context_cap(gpt, max_context: int | None) -> int:
    cap = gpt.config.max_position_embeddings
    planned = getattr(gpt, "max_context", 0) or 0
    if planned:
        cap = min(cap, planned)
    if max_context is not None:
        if max_context < 1:
            raise GptOssError(f"max_context {max_context}: must be at least 1 token")
        cap = min(cap, int(max_context))
    return cap


def _sampler(temperature, top_p, top_k, min_p):
    for name, v, lo, hi in (("temperature", temperature, 0, None), ("top_p", top_p, 0, 1), ("min_p", min_p, 0, 1)):
        if not isinstance(v, (int, float)) or v < lo or (hi is not None and v > hi):
            raise GptOssError(f"{name} {v!r}: must be a number" + (f" in [{lo}, {hi}]" if hi else f" >= {lo}"))
    if not isinstance(top_k, int) or top_k < 0:
        raise GptOssError(f"top_k {top_k!r}: must be an integer >= 0 (0: off)")
    return make_sampler(temp=float(temperature), top_p=float(top_p), min_p=float(min_p), top_k=top_k)


def generate_events(runner: Runner, prompt: list[int], *, cap: int, max_tokens: int | None = None,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    seed: int | None = None, cancel: threading.Event | None = None,
                    parser: "harmony.StreamParser | None" = None, dropped: int = 0) -> Iterator[Event]:
    """Prefill `prompt` on runner, sample until <|return|>/<|call|>/max_tokens/the context cap, yield Events.
    The parser (exposed for the session) collects the reply; the last event is "done"."""
    if len(prompt) >= cap:
        raise GptOssError(f"the prompt has {len(prompt):,} tokens: the context cap of {cap:,} tokens leaves no room "
                          "for a reply; shorten the conversation, start a new one, or raise the context (--ctx)")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise GptOssError(f"max_tokens {max_tokens!r}: must be a positive integer (or None: up to the context cap)")
    sampler = _sampler(temperature, top_p, top_k, min_p)
    parser = parser or harmony.StreamParser(runner.gpt.path)
    budget = cap - len(prompt)
    limit = min(budget, max_tokens) if max_tokens else budget
    if seed is not None:
        mx.random.seed(seed)
    mx.reset_peak_memory()
    stats = Stats(prompt_tokens=len(prompt), dropped_messages=dropped)
    t0 = time.perf_counter()
    logits, stats.prefilled_tokens = runner.prefill(prompt)
    stats.cached_tokens = len(prompt) - stats.prefilled_tokens
    t_prefill = time.perf_counter() - t0
    stop, t_first = ("max_tokens" if max_tokens and max_tokens < budget else "context"), None

    def sample(logits):  # [V] -> [1], lazy
        logits = logits[None]
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    # Pipelined like mlx-lm's generate_step: the forward pass of token i and the sampling of token i+1 are
    # queued before Python waits for token i, so the model never idles while events are handled.
    y = sample(logits)
    mx.async_eval(y)
    for i in range(limit):
        if cancel is not None and cancel.is_set():
            stop = "cancelled"
            break
        nxt = None
        if i + 1 < limit:
            nxt = sample(runner.step_lazy(y))
            mx.async_eval(nxt)
        token = int(y.item())
        if nxt is not None:
            runner.set_last(token)
        stats.generated_tokens += 1
        if t_first is None:
            t_first = time.perf_counter()
            stats.time_to_first_token = t_first - t0
        for ev in _pieces_to_events(parser.feed(token)):  # at a stop token: closes the message (tool call)
            yield ev
        if token in harmony.STOP_TOKENS:
            stop = harmony.STOP_TOKENS[token]
            break
        y = nxt
    for ev in _pieces_to_events(parser.finish(stop)):
        yield ev
    t_end = time.perf_counter()
    stats.stop_reason = stop
    stats.prefill_tps = stats.prefilled_tokens / t_prefill if t_prefill > 0 and stats.prefilled_tokens else 0.0
    if t_first is not None and stats.generated_tokens > 1 and t_end > t_first:
        stats.decode_tps = (stats.generated_tokens - 1) / (t_end - t_first)
    stats.peak_memory = int(mx.get_peak_memory())
    stats.malformed, stats.warnings = parser.malformed, list(parser.warnings)
    yield Event("done", stats=stats)


def _pieces_to_events(pieces) -> list[Event]:
    return [Event(p.kind, p.text, p.recipient, p.text) if p.kind == "tool_call" else Event(p.kind, p.text)
            for p in pieces]


# ------------------------------------------------------------------------------------------- Session

def assistant_message(parser: "harmony.StreamParser") -> dict:
    """The message dict of a finished reply (what the history keeps)."""
    m: dict = {"role": "assistant"}
    if parser.reasoning:
        m["reasoning"] = "".join(parser.reasoning)
    if parser.tool_calls:
        m["tool_calls"] = [dict(c) for c in parser.tool_calls]
    if parser.content or not parser.tool_calls:
        m["content"] = "".join(parser.content)
    return m


class Session:
    """A multi-turn chat that keeps its KV cache between turns (see the module docstring)."""

    def __init__(self, gpt, *, reasoning_effort: str = "medium", developer: str | None = None, tools=None,
                 messages: list[dict] | None = None, max_context: int | None = None, drop_oldest: bool = True,
                 date: str | None = None):
        self.gpt = gpt
        self.effort = reasoning_effort
        self.developer = developer or None
        self.tools = harmony.tool_specs(tools)
        self.date = date or time.strftime("%Y-%m-%d")  # fixed for the session: the prompt prefix stays cached
        self.cap = _context_cap(gpt, max_context)
        self.drop_oldest = drop_oldest
        self.messages: list[dict] = [dict(m) for m in (messages or [])]
        self.runner = runner_for(gpt)
        self.last_stats: Stats | None = None
        self.dropped = 0
        self._cancel = threading.Event()
        self._busy, self._pending, self._active = False, [], None
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
        self.runner.reset()

    def cancel(self) -> None:
        self._cancel.set()

    def add_tool_result(self, name: str, content) -> None:
        """Answer a tool call; while its reply is still streaming, the result is added right after it."""
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, default=str)
        (self._pending if self._busy else self.messages).append({"role": "tool", "name": name, "content": text})

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
                              date=self.date)

    def _fit(self, reserve: int) -> tuple[list[int], int]:
        """The prompt ids, dropping the oldest turns (whole user turns) while it does not fit."""
        dropped = 0
        while True:
            prompt = self.render()
            if len(prompt) + reserve <= self.cap or not self.drop_oldest:
                return prompt, dropped
            users = [i for i, m in enumerate(self.messages) if m.get("role") == "user"]
            if len(users) < 2:  # only the current turn is left: it does not fit at all
                return prompt, dropped
            cut = users[1]
            dropped += cut
            del self.messages[:cut]

    def send(self, text: str | None, *, max_tokens: int | None = None, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None, tools=None,
             auto_tools: bool = False, keep_partial: bool = False, max_tool_rounds: int = 8) -> Iterator[Event]:
        if self._active is not None:  # an unfinished earlier reply: end it now so the history stays in order
            self._active.close()
            self._active = None
        if text is not None:
            if not isinstance(text, str):
                raise GptOssError(f"send(): the message must be a string, got {type(text).__name__}")
            self.messages.append({"role": "user", "content": text})
        if tools is not None:
            self.set_tools(tools)
        self._active = self._turn(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  min_p=min_p, seed=seed, auto_tools=auto_tools, keep_partial=keep_partial,
                                  rounds=max_tool_rounds, added=text is not None)
        return self._active

    def _turn(self, *, auto_tools, keep_partial, rounds, added, **sampling) -> Iterator[Event]:
        self._cancel.clear()
        by_name = {t.name: t for t in self.tools}
        for round_ in range(max(1, rounds)):
            # room kept for the reply when dropping old turns: max_tokens, else a quarter of the context
            reserve = sampling["max_tokens"] or max(1, min(self.cap // 4, 4096))
            prompt, dropped = self._fit(reserve)
            self.dropped += dropped
            parser = harmony.StreamParser(self.gpt.path)
            done = None
            self._busy = True
            try:
                try:
                    stream = generate_events(self.runner, prompt, cap=self.cap, cancel=self._cancel, parser=parser,
                                             dropped=dropped, **sampling)
                    first = next(stream)
                except GptOssError:  # refused before anything ran (e.g. over the context cap)
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
                elif keep_partial and parser.content:
                    self.messages.append({"role": "assistant", "content": "".join(parser.content)})
                self.messages.extend(self._pending)  # tool results given while the reply streamed
                self._pending = []
            self.last_stats = done.stats
            yield done
            calls = parser.tool_calls if done.stats.stop_reason == "call" else []
            # auto_tools: run Python tools; a tool given only as a schema is the caller's to answer
            if not (auto_tools and calls and all(by_name[c["name"]].fn for c in calls if c["name"] in by_name)):
                return
            answered = {m.get("name") for m in self.messages[-len(calls):] if m.get("role") == "tool"}
            for c in calls:
                if c["name"] in answered:
                    continue
                tool = by_name.get(c["name"])
                self.add_tool_result(c["name"], tool.run(c["arguments"]) if tool else  # the model can recover
                                     f"error: there is no tool named {c['name']!r}; available: "
                                     + (", ".join(by_name) or "none"))
