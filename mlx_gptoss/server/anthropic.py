"""Anthropic's Messages API: POST /v1/messages (also `?beta=true`, as Claude Code sends it) and
POST /v1/messages/count_tokens, over the same conversation model and model thread as the OpenAI APIs.

Request -> harmony (the message dicts of mlx_gptoss.chat, as inputs.py builds them for the other APIs):
- `system` (a string or text blocks) and messages with role "system" (Claude Code sends one) -> developer
  instructions; user text blocks -> a user message; `tool_result` blocks -> tool messages (their name found
  by tool_use_id); an assistant message's blocks in order: `thinking` -> analysis, `text` -> final answer (a
  preamble when a tool_use of the same message follows), `tool_use` -> a commentary call to functions.NAME.
- A thinking block's `signature` is the sealed exact-token blob of that analysis message (sealed.py): sent
  back, the message renders token for token as generated, so the turn hits the prefix cache. A signature
  that does not unseal (tampered, from another server) is ignored and the block's text is used.
- tools (`input_schema`) -> function tools; server tools (typed, e.g. web_search_20250305) are left out of
  the prompt with a `warnings` entry; tool_choice auto | any | tool | none; max_tokens; temperature, top_p.
- Effort: `output_config.effort` (low | medium | high; max runs as high), else `thinking` (disabled -> low,
  budget_tokens under 4096 -> low, under 16384 -> medium, more -> high), else medium.
- Fields that change nothing here (metadata, context_management, container, service_tier, betas, ...) are
  accepted and ignored, as Claude Code sends them; stop_sequences and top_k are refused (they would change
  the answer and are not implemented).

Output: content blocks thinking (with its signature; its text left out when `thinking.display` is
"omitted"), text, tool_use; stop_reason end_turn | max_tokens | tool_use; usage in Anthropic's sense:
`input_tokens` are the prompt tokens read from no cache, `cache_read_input_tokens` the ones served from the
prefix cache (their sum is the prompt). Streaming is Anthropic's event sequence (message_start, ping,
content_block_start / _delta (text_delta, thinking_delta, signature_delta, input_json_delta) / _stop,
message_delta with stop_reason and usage, message_stop); errors are Anthropic's error object
{"type": "error", "error": {"type", "message"}}, also as an `error` event inside a stream.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from .. import harmony
from .errors import APIError, bad, from_validation
from . import inputs, responses

log = logging.getLogger("gptoss_mac.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
STOP = {"return": "end_turn", "call": "tool_use", "max_tokens": "max_tokens", "context": "max_tokens",
        "malformed": "end_turn"}
EFFORT_OF = {"low": "low", "medium": "medium", "high": "high", "max": "high"}


# ------------------------------------------------------------------------------------------ requests

class Loose(BaseModel):
    """Unknown fields are accepted and ignored (Claude Code sends betas); known ones are type-checked."""
    model_config = ConfigDict(extra="ignore", strict=True)


Number = Union[int, float]


class Tool(Loose):
    name: str = Field(min_length=1)
    type: str | None = None  # absent or "custom": a client tool; anything else is a server tool
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoice(Loose):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(Loose):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None
    display: str | None = None


class OutputConfig(Loose):
    effort: Literal["low", "medium", "high", "max"] | None = None


class Message(Loose):
    role: Literal["user", "assistant", "system"]
    content: Union[str, list[dict[str, Any]]]


class CountRequest(Loose):
    model: str
    messages: list[Message]
    system: Union[str, list[dict[str, Any]], None] = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(CountRequest):
    max_tokens: int = Field(ge=1)
    stream: bool = False
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    stop_sequences: list[str] | None = None


def validate(model: type[BaseModel], data, where: str):
    if not isinstance(data, dict):
        raise bad(f"{where}: must be a JSON object, got {type(data).__name__}", param=where)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e, where) from None


def effort_of(req: CountRequest) -> str:
    if req.output_config and req.output_config.effort:
        return EFFORT_OF[req.output_config.effort]
    t = req.thinking
    if t is None or t.type == "adaptive":
        return "medium"
    if t.type == "disabled":
        return "low"
    budget = t.budget_tokens or 0
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


def block_text(content, where: str, allowed=("text",)) -> str:
    """The text of a string or of a list of text blocks (joined by newlines); images and documents are refused."""
    if isinstance(content, str):
        return content
    texts = []
    for i, b in enumerate(content or []):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind in ("image", "document", "search_result", "container_upload"):
            raise inputs.unsupported(f"{where}[{i}]: {kind} blocks are not supported (gpt-oss reads text only)",
                                     param=f"{where}[{i}].type")
        if kind == "tool_reference":  # a tool search result (Claude Code's ToolSearch): every tool is loaded
            texts.append(f"Tool {b.get('tool_name')} is available.")
            continue
        if kind not in allowed or not isinstance(b.get("text"), str):
            raise bad(f"{where}[{i}]: expected a text block with a \"text\" string", param=f"{where}[{i}]")
        texts.append(b["text"])
    return "\n".join(texts)


class Conversation:
    """An Anthropic request as harmony message dicts, with the exact ids of the thinking blocks whose
    signature unsealed (for render(exact=))."""

    def __init__(self, req: CountRequest, known: dict):
        from .sealed import unseal

        self.unseal, self.known = unseal, known
        self.exact: dict[tuple, list[int]] = {}
        self.warnings: list[str] = []
        self.messages: list[dict] = []
        if req.system:
            self.messages.append({"role": "developer", "content": block_text(req.system, "system")})
        for i, m in enumerate(req.messages):
            where = f"messages[{i}]"
            if m.role == "system":
                self.messages.append({"role": "developer", "content": block_text(m.content, f"{where}.content")})
            elif m.role == "user":
                self._user(m.content, where)
            else:
                self.messages.append(self._assistant(m.content, where))
        self.tools = self._tools(req.tools)

    def _user(self, content, where: str) -> None:
        if isinstance(content, str):
            self.messages.append({"role": "user", "content": content})
            return
        texts = []
        names = inputs.call_names(self.messages)
        for i, b in enumerate(content):
            w = f"{where}.content[{i}]"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "tool_result":
                cid = b.get("tool_use_id")
                if not isinstance(cid, str):
                    raise bad(f"{w}.tool_use_id: required (the id of the tool_use it answers)", param=f"{w}.tool_use_id")
                text = block_text(b.get("content") or "", f"{w}.content")
                if b.get("is_error") is True:
                    text = f"Error: {text}"
                self.messages.append(inputs.tool_message(names, cid, text, f"{w}.tool_use_id"))
            elif kind == "text":
                texts.append(block_text([b], f"{where}.content"))
            else:
                texts.append(block_text([b], f"{where}.content"))  # raises with the reason
        if texts:
            self.messages.append({"role": "user", "content": "\n".join(texts)})

    def _assistant(self, content, where: str) -> dict:
        turn = inputs._Assistant()
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        for i, b in enumerate(content):
            w = f"{where}.content[{i}]"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text":
                if b.get("text"):
                    turn.add("final", block_text([b], w))
            elif kind == "thinking":
                self._thinking(turn, b, w)
            elif kind == "redacted_thinking":  # never made here: nothing to render
                continue
            elif kind == "tool_use":
                cid, name, args = b.get("id"), b.get("name"), b.get("input", {})
                if not isinstance(cid, str) or not isinstance(name, str) or not isinstance(args, dict):
                    raise bad(f"{w}: a tool_use block needs \"id\", \"name\" and an \"input\" object", param=w)
                raw = (self.known.get(cid) or {}).get("content")
                text = raw if raw is not None and _same_json(raw, args) else json.dumps(args, ensure_ascii=False)
                inputs.call_part(turn, cid, name, text, self.known)
            else:
                raise bad(f"{w}: unknown assistant block type {kind!r}; use text, thinking or tool_use",
                          param=f"{w}.type")
        if not turn.parts:
            turn.add("final", "")
        return turn.message()

    def _thinking(self, turn, b: dict, where: str) -> None:
        text, sig = b.get("thinking"), b.get("signature")
        if not isinstance(text, str):
            raise bad(f"{where}.thinking: required (a string)", param=f"{where}.thinking")
        ids = self.unseal(sig) if isinstance(sig, str) and sig else None
        generated = _analysis_text(ids) if ids else None
        if generated is not None:  # ours: the tokens as generated (also when the text was omitted)
            part = {"channel": "analysis", "content": generated, "recipient": None, "content_type": None}
            self.exact[harmony.part_key(part)] = ids
            text = generated
        if text:
            turn.add("analysis", text)

    def _tools(self, raw: list | None) -> list[harmony.Tool]:
        out = []
        for i, t in enumerate(raw or []):
            tool = validate(Tool, t, f"tools[{i}]")
            if tool.type not in (None, "custom"):
                self.warnings.append(f"tools[{i}]: the server tool {tool.name!r} ({tool.type}) is not available "
                                     "here; it was left out of the prompt")
                continue
            out.append({"name": tool.name, "description": tool.description or "",
                        "parameters": tool.input_schema or {"type": "object", "properties": {}}})
        return inputs.specs(out)

    def exact_ids(self, part: dict) -> list[int] | None:
        return self.exact.get(harmony.part_key(part))


def _same_json(raw: str, value) -> bool:
    try:
        return json.loads(raw) == value
    except ValueError:
        return False


def _analysis_text(ids: list[int]) -> str | None:
    """The text of a sealed analysis message (<|start|>assistant<|channel|>analysis<|message|>TEXT<|end|>),
    or None when the ids are not one."""
    try:
        m = ids.index(harmony.MESSAGE)
        head = harmony.encoding().decode(ids[:m])
        if ids[0] != harmony.START or ids[-1] != harmony.END or "<|channel|>analysis" not in head or " to=" in head:
            return None
        return harmony.encoding().decode(ids[m + 1:-1])
    except (ValueError, IndexError, Exception):
        return None


def tool_choice(choice: ToolChoice | None):
    """Anthropic's tool_choice in the OpenAI spelling inputs.apply_tool_choice takes."""
    if choice is None or choice.type == "auto":
        return "auto"
    if choice.type == "any":
        return "required"
    if choice.type == "none":
        return "none"
    if not choice.name:
        raise bad("tool_choice.name: required when tool_choice.type is \"tool\"", param="tool_choice.name")
    return {"type": "function", "name": choice.name}


class Turn(inputs.Turn):
    """inputs.Turn plus the exact ids of the unsealed thinking blocks."""

    def __init__(self, conv: Conversation, effort: str):
        super().__init__(conv.messages, conv.tools, effort)
        self.conv = conv

    def render_settings(self) -> dict:
        return {**super().render_settings(), "exact": self.conv.exact_ids}


# ------------------------------------------------------------------------------------------- output

def new_id(prefix: str) -> str:
    return responses.new_id(prefix)


def usage(stats) -> dict:
    return {"input_tokens": stats.prompt_tokens - stats.cached_tokens, "output_tokens": stats.generated_tokens,
            "cache_read_input_tokens": stats.cached_tokens, "cache_creation_input_tokens": 0}


class MessageBuilder:
    """The engine's Events -> content blocks, and (streaming) Anthropic's events announcing them."""

    def __init__(self, mid: str, model: str, prompt_tokens: int, parser, show_thinking: bool = True,
                 warnings: list[str] | None = None):
        self.id, self.model, self.parser = mid, model, parser
        self.prompt_tokens, self.show_thinking = prompt_tokens, show_thinking
        self.warnings = list(warnings or [])
        self.content: list[dict] = []
        self.open: dict | None = None  # the block being written (text or thinking), with its message index
        self.open_message = -1
        self.called = False

    def message(self, stop_reason=None, usage_=None) -> dict:
        out = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": self.content,
               "stop_reason": stop_reason, "stop_sequence": None,
               "usage": usage_ or {"input_tokens": self.prompt_tokens, "output_tokens": 0,
                                   "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}}
        if self.warnings:
            out["warnings"] = self.warnings
        return out

    def start(self) -> list[dict]:
        m = dict(self.message(), content=[])
        m.pop("warnings", None)
        return [{"type": "message_start", "message": m}, {"type": "ping"}]

    def feed(self, ev) -> list[dict]:
        if getattr(ev, "separator", False):  # "\n\n" between two analysis messages: each is its own block
            return []
        kind = responses.visible_kind(ev)
        message = getattr(ev, "message", 0)
        if kind == "tool_call":
            return self._tool_use(ev)
        block = "thinking" if kind == "reasoning" else "text"
        out = []
        if self.open is None or self.open["type"] != block or self.open_message != message:
            out += self.close() + self._open(block, message)
        b = self.open
        if block == "thinking":
            b["_text"].append(ev.text)
            if self.show_thinking:
                b["thinking"] += ev.text
                out.append(self._delta({"type": "thinking_delta", "thinking": ev.text}))
        else:
            b["text"] += ev.text
            out.append(self._delta({"type": "text_delta", "text": ev.text}))
        return out

    def _open(self, block: str, message: int) -> list[dict]:
        b = {"type": "thinking", "thinking": "", "signature": ""} if block == "thinking" else {"type": "text", "text": ""}
        self.content.append(b)
        self.open, self.open_message = b, message
        if block == "thinking":
            b["_text"] = []
        shown = {k: v for k, v in b.items() if not k.startswith("_")}
        return [{"type": "content_block_start", "index": len(self.content) - 1, "content_block": shown}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta}

    def close(self) -> list[dict]:
        b, self.open = self.open, None
        if b is None:
            return []
        out = []
        if b["type"] == "thinking":
            b["signature"] = self._signature("".join(b.pop("_text")))
            out.append(self._delta({"type": "signature_delta", "signature": b["signature"]}))
        return out + [{"type": "content_block_stop", "index": self.content.index(b)}]

    def _signature(self, text: str) -> str:
        """The sealed ids of the analysis message with this text (the newest one; "" when it has none, e.g. it
        broke the format or was cut off)."""
        from .sealed import seal

        parts, ids = list(self.parser.parts), list(self.parser.part_ids)
        for p, i in zip(reversed(parts), reversed(ids)):
            if p["channel"] == "analysis" and not p["recipient"] and p["content"] == text:
                return seal(i) if i else ""
        return ""

    def _tool_use(self, ev) -> list[dict]:
        out = self.close()
        self.called = True
        raw = ev.arguments or ""
        try:
            args = json.loads(raw) if raw.strip() else {}
        except ValueError:
            args = None
        if not isinstance(args, dict):
            self.warnings.append(f"the model called {ev.name} with arguments that are not a JSON object: {raw!r}")
            args = {}
            raw = "{}"
        b = {"type": "tool_use", "id": ev.id or new_id("toolu"), "name": ev.name, "input": args}
        self.content.append(b)
        i = len(self.content) - 1
        out.append({"type": "content_block_start", "index": i, "content_block": dict(b, input={})})
        out.append({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta",
                                                                         "partial_json": raw}})
        out.append({"type": "content_block_stop", "index": i})
        return out

    def stop_reason(self, stats) -> str:
        return "tool_use" if self.called else STOP.get(stats.stop_reason, "end_turn")

    def finish(self, stats) -> list[dict]:
        if stats.malformed:
            self.warnings += [w for w in stats.warnings if w not in self.warnings]
        out = self.close()
        delta = {"type": "message_delta", "delta": {"stop_reason": self.stop_reason(stats), "stop_sequence": None},
                 "usage": usage(stats)}
        if self.warnings:
            delta["warnings"] = self.warnings
        return out + [delta, {"type": "message_stop"}]

    def result(self, stats) -> dict:
        self.finish(stats)
        return self.message(self.stop_reason(stats), usage(stats))


# ------------------------------------------------------------------------------------------- errors

def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message), status_code=e.status, headers=e.headers)


def anthropic_errors(handler):
    """Errors of an Anthropic route as Anthropic's error object (the app's handlers speak OpenAI's)."""
    @functools.wraps(handler)
    async def wrapped(request: Request):
        try:
            return await handler(request)
        except APIError as e:
            return error_response(e)
        except Exception as e:  # a bug: the client gets its name, the log the traceback
            log.exception("unhandled error on %s", request.url.path)
            return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))
    return wrapped


# ------------------------------------------------------------------------------------------- routes

def add_routes(app, *, read, render, submit, events, model_id: str, calls) -> None:
    """POST /v1/messages and /v1/messages/count_tokens, over the app's request reading, rendering, model
    thread and event stream (the helpers the other protocol modules use)."""
    from starlette.concurrency import run_in_threadpool

    def conversation(req: CountRequest):
        conv = Conversation(req, calls.calls)
        turn = Turn(conv, effort_of(req))
        inputs.apply_tool_choice(turn, tool_choice(req.tool_choice))
        return conv, turn

    @app.post("/v1/messages/count_tokens")
    @anthropic_errors
    async def count_tokens(request: Request):
        req = await read(request, CountRequest)
        conv, turn = conversation(req)
        prompt, _ = await run_in_threadpool(render, turn, None, "messages")
        return {"input_tokens": len(prompt)}

    @app.post("/v1/messages")
    @anthropic_errors
    async def messages(request: Request):
        req = await read(request, MessagesRequest)
        inputs.refuse(req.stop_sequences, "stop_sequences are not supported (harmony's stop tokens end every "
                      "reply)", "stop_sequences")
        inputs.refuse(req.top_k is not None, "top_k is not supported; use top_p", "top_k")
        conv, turn = conversation(req)
        prompt, parser = await run_in_threadpool(render, turn, None, "messages")
        show = not (req.thinking and req.thinking.display == "omitted")
        builder = MessageBuilder(new_id("msg"), model_id, len(prompt), parser, show, conv.warnings)
        job = submit("messages", builder.id, prompt, parser, max_tokens=req.max_tokens,
                     temperature=req.temperature, top_p=req.top_p)

        def cut(stats) -> APIError | None:
            if stats.stop_reason == "cancelled":
                return APIError(503, "the server is shutting down; the reply was cut off, retry")
            return None

        if not req.stream:
            async for ev in events(job, request):
                if ev.kind != "done":
                    builder.feed(ev)
                    continue
                calls.remember(parser.parts)
                if cut(ev.stats):
                    raise cut(ev.stats)
                return builder.result(ev.stats)

        async def stream():
            for e in builder.start():
                yield {"event": e["type"], "data": json.dumps(e)}
            try:
                async for ev in events(job, None):
                    if ev.kind == "done":
                        calls.remember(parser.parts)
                        if cut(ev.stats):
                            raise cut(ev.stats)
                    for e in (builder.finish(ev.stats) if ev.kind == "done" else builder.feed(ev)):
                        yield {"event": e["type"], "data": json.dumps(e)}
            except APIError as err:
                yield {"event": "error", "data": json.dumps(error_body(err.status, err.message))}

        return EventSourceResponse(stream(), ping=10, send_timeout=30,
                                   ping_message_factory=lambda: ServerSentEvent(event="ping", data='{"type": "ping"}'))
