"""Anthropic's Messages API: POST /v1/messages (also `?beta=true`, as Claude Code sends it) and
POST /v1/messages/count_tokens, over the shared conversation model (conversation.py) and the one model thread.

Request -> conversation:
- `system` (a string or text blocks) and messages with role "system" (Claude Code sends one) -> developer
  instructions; user text blocks -> a user message; `tool_result` blocks -> tool messages (their name found
  by tool_use_id); an assistant message's blocks in order: `thinking` -> reasoning, `text` -> final answer (a
  preamble when a tool_use of the same message follows), `tool_use` -> a call to functions.NAME.
- A thinking block's `signature` is the sealed exact-token blob of that analysis message (sealed.py): sent
  back, the message renders token for token as generated (also when the client left its text out), so the
  turn hits the prefix cache. A signature that does not unseal (tampered, another machine's) is ignored and
  the block's text is used as plain text.
- tools (`input_schema`) -> function tools; server tools (typed, e.g. web_search_20250305) are left out of
  the prompt with a `warnings` entry; tool_choice auto | any | tool | none; max_tokens; temperature, top_p.
- Effort: `output_config.effort` (low | medium | high; max runs as high), else `thinking` (disabled -> low,
  budget_tokens under 4096 -> low, under 16384 -> medium, more -> high), else medium.
- Unknown fields (context_management, metadata, container, betas, ...) are accepted and ignored, as Claude
  Code sends them; stop_sequences and top_k are refused (they would change the answer and are not implemented).

Output: content blocks thinking (with its signature; its text left out when `thinking.display` is
"omitted"), text, tool_use; stop_reason end_turn | max_tokens | tool_use; usage in Anthropic's sense:
`input_tokens` are the prompt tokens read from no cache, `cache_read_input_tokens` the ones served from the
prefix cache (their sum is the prompt; cache_creation_input_tokens is 0). Streaming is Anthropic's event
sequence (message_start, ping, content_block_start / _delta (text_delta, thinking_delta, signature_delta,
input_json_delta as the model writes the arguments) / _stop, message_delta with stop_reason and usage,
message_stop); errors are Anthropic's error object {"type": "error", "error": {"type", "message"}}, also as an
`error` event inside a stream (a reply the server cut off, e.g. at shutdown, ends with one).
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Literal, Union

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from . import conversation, responses
from . import schemas as S
from .conversation import Assistant, Turn, arguments_as_generated
from .errors import APIError, bad, refuse, unsupported

log = logging.getLogger("gptoss_mac.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 415: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
STOP = {"return": "end_turn", "call": "tool_use", "max_tokens": "max_tokens", "context": "max_tokens",
        "malformed": "end_turn"}
EFFORT_OF = {"low": "low", "medium": "medium", "high": "high", "max": "high"}
NOT_TEXT = ("image", "document", "search_result", "container_upload")


# ------------------------------------------------------------------------------------------ requests

class Tool(S.Strict):
    name: str = Field(min_length=1)
    type: str | None = None  # absent or "custom": a client tool; anything else is a server tool
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoice(S.Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(S.Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None
    display: str | None = None


class OutputConfig(S.Strict):
    effort: Literal["low", "medium", "high", "max"] | None = None


class Message(S.Strict):
    role: Literal["user", "assistant", "system"]  # Claude Code sends a "system" message among the others
    content: Union[str, list[dict[str, Any]]]


class CountRequest(S.Strict):
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
    temperature: S.Number | None = Field(None, ge=0, le=2)
    top_p: S.Number | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    stop_sequences: list[str] | None = None


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


def block_text(content, where: str) -> str:
    """The text of a string or of a list of text blocks (joined by newlines)."""
    if isinstance(content, str):
        return content
    return "\n".join(text_of(b, f"{where}[{i}]") for i, b in enumerate(content or []))


def text_of(block, where: str) -> str:
    """One text block's text; images and documents are refused (gpt-oss reads text only)."""
    kind = block.get("type") if isinstance(block, dict) else None
    if kind in NOT_TEXT:
        raise unsupported(f"{where}: {kind} blocks are not supported (gpt-oss reads text only)", param=f"{where}.type")
    if kind == "tool_reference":  # a tool search result (Claude Code's ToolSearch): every tool is loaded
        return f"Tool {block.get('tool_name')} is available."
    if kind != "text" or not isinstance(block.get("text"), str):
        raise bad(f"{where}: expected a text block with a \"text\" string", param=where)
    return block["text"]


def read_turn(req: CountRequest, known: dict) -> Turn:
    """An Anthropic request as a Turn of the shared conversation model."""
    tools = conversation.Tools()
    for i, raw in enumerate(req.tools or []):
        t = S.validate(Tool, raw, f"tools[{i}]")
        if t.type in (None, "custom"):
            tools.function(t.name, t.description, t.input_schema or {"type": "object", "properties": {}})
        else:
            tools.left_out(f"tools[{i}]", f"the server tool {t.name!r} ({t.type})")
    turn = tools.turn([], effort_of(req))
    msgs = turn.messages
    if req.system:
        msgs.append({"role": "developer", "content": block_text(req.system, "system")})
    for i, m in enumerate(req.messages):
        where = f"messages[{i}].content"
        if m.role == "system":
            msgs.append({"role": "developer", "content": block_text(m.content, where)})
        elif m.role == "user":
            read_user(m.content, where, msgs)
        else:
            msgs.append(read_assistant(m.content, where, known, turn))
    return turn


def read_user(content, where: str, msgs: list[dict]) -> None:
    """A user message: its tool_result blocks as tool messages, then its text as a user message."""
    if isinstance(content, str):
        msgs.append({"role": "user", "content": content})
        return
    texts = []
    for i, b in enumerate(content):
        w = f"{where}[{i}]"
        if isinstance(b, dict) and b.get("type") == "tool_result":
            cid = b.get("tool_use_id")
            if not isinstance(cid, str):
                raise bad(f"{w}.tool_use_id: required (the id of the tool_use it answers)", param=f"{w}.tool_use_id")
            text = block_text(b.get("content") or "", f"{w}.content")
            msgs.append(conversation.tool_message(conversation.call_names(msgs), cid,
                                                  f"Error: {text}" if b.get("is_error") is True else text,
                                                  f"{w}.tool_use_id"))
        else:
            texts.append(text_of(b, w))
    if texts:
        msgs.append({"role": "user", "content": "\n".join(texts)})


def read_assistant(content, where: str, known: dict, turn: Turn) -> dict:
    """An assistant message's blocks in order: thinking (exact tokens when its signature unseals), text (a
    preamble when a tool_use follows), tool_use (as generated when this server made the call)."""
    reply = Assistant(turn.exact)
    for i, b in enumerate([{"type": "text", "text": content}] if isinstance(content, str) else content):
        w = f"{where}[{i}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            if text_of(b, w):
                reply.add("final", b["text"])
        elif kind == "thinking":
            if not isinstance(b.get("thinking"), str):
                raise bad(f"{w}.thinking: required (a string)", param=f"{w}.thinking")
            sig = b.get("signature")
            reply.reasoning(b["thinking"], sig if isinstance(sig, str) else None)
        elif kind == "redacted_thinking":  # never made here: nothing to render
            continue
        elif kind == "tool_use":
            cid, name, args = b.get("id"), b.get("name"), b.get("input", {})
            if not isinstance(cid, str) or not isinstance(name, str) or not isinstance(args, dict):
                raise bad(f"{w}: a tool_use block needs \"id\", \"name\" and an \"input\" object", param=w)
            reply.call(cid, conversation.recipient(name), arguments_as_generated(known, cid, args), known,
                       f"{w}.name")
        else:
            raise bad(f"{w}.type: {kind!r} is not an assistant block; use text, thinking or tool_use",
                      param=f"{w}.type")
    if not reply.parts:
        reply.add("final", "")
    return reply.message()


def tool_choice(choice: ToolChoice | None):
    """Anthropic's tool_choice in the OpenAI spelling conversation.apply_tool_choice takes."""
    if choice is None or choice.type == "auto":
        return "auto"
    if choice.type == "any":
        return "required"
    if choice.type == "none":
        return "none"
    if not choice.name:
        raise bad("tool_choice.name: required when tool_choice.type is \"tool\"", param="tool_choice.name")
    return {"type": "function", "name": choice.name}


# ------------------------------------------------------------------------------------------- output

def usage(stats) -> dict:
    return {"input_tokens": stats.prompt_tokens - stats.cached_tokens, "output_tokens": stats.generated_tokens,
            "cache_read_input_tokens": stats.cached_tokens, "cache_creation_input_tokens": 0}


class MessageBuilder:
    """The engine's Events -> content blocks, and (streaming) Anthropic's events announcing them. Each
    generated message is its own block: thinking (analysis; closed with the sealed signature), text (final
    answer or preamble), tool_use (its arguments streamed as input_json_delta while the model writes them)."""

    def __init__(self, mid: str, model: str, prompt_tokens: int, parser, show_thinking: bool, warnings: list[str]):
        self.id, self.model, self.parser = mid, model, parser
        self.prompt_tokens, self.show_thinking = prompt_tokens, show_thinking
        self.warnings = list(warnings)
        self.content: list[dict] = []
        self.open: dict | None = None  # the block being written
        self.open_message = -1  # the generated message it holds
        self.args: list[str] = []  # the open tool_use block's argument pieces
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
        if kind in ("tool_call", "tool_call_delta"):
            return self._tool_use(ev, kind == "tool_call")
        block = "thinking" if kind == "reasoning" else "text"
        out = []
        if self.open is None or self.open["type"] != block or self.open_message != getattr(ev, "message", 0):
            out += self.close() + self._open({"type": "thinking", "thinking": "", "signature": ""}
                                             if block == "thinking" else {"type": "text", "text": ""},
                                             getattr(ev, "message", 0))
        if block == "text":
            self.open["text"] += ev.text
            out.append(self._delta({"type": "text_delta", "text": ev.text}))
        elif self.show_thinking:
            self.open["thinking"] += ev.text
            out.append(self._delta({"type": "thinking_delta", "thinking": ev.text}))
        return out

    def _open(self, block: dict, message: int) -> list[dict]:
        self.content.append(block)
        self.open, self.open_message = block, message
        return [{"type": "content_block_start", "index": len(self.content) - 1, "content_block": dict(block)}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta}

    def close(self) -> list[dict]:
        b, self.open = self.open, None
        if b is None:
            return []
        out = []
        if b["type"] == "thinking":  # "" when the message broke the format or was cut off
            b["signature"] = conversation.sealed_message(self.parser, self.open_message) or ""
            out.append(self._delta({"type": "signature_delta", "signature": b["signature"]}))
        return out + [{"type": "content_block_stop", "index": len(self.content) - 1}]  # the open block is the last

    def _tool_use(self, ev, whole: bool) -> list[dict]:
        """A piece of a call's arguments (whole=False), or the finished call."""
        out = []
        if self.open is None or self.open.get("id") != ev.id:
            out += self.close() + self._open({"type": "tool_use", "id": ev.id or responses.new_id("toolu"),
                                              "name": ev.name, "input": {}}, getattr(ev, "message", 0))
            self.args = []
        if not whole:
            self.args.append(ev.text)
            return out + [self._delta({"type": "input_json_delta", "partial_json": ev.text})]
        self.called = True
        raw = ev.arguments or ""
        if not self.args and raw:  # not streamed piece by piece: all at once
            out.append(self._delta({"type": "input_json_delta", "partial_json": raw}))
        try:
            args = json.loads(raw) if raw.strip() else {}
        except ValueError:
            args = None
        if not isinstance(args, dict):
            self.warnings.append(f"the model called {ev.name} with arguments that are not a JSON object: {raw!r}")
            args = {}
        self.open["input"] = args
        self.open = None
        return out + [{"type": "content_block_stop", "index": len(self.content) - 1}]

    def stop_reason(self, stats) -> str:
        return "tool_use" if self.called else STOP.get(stats.stop_reason, "end_turn")

    def finish(self, stats) -> list[dict]:
        self.warnings += [w for w in stats.warnings if w not in self.warnings] if stats.malformed else []
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
    """An Anthropic route's errors as Anthropic's error object (the app's handlers speak OpenAI's)."""
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


def cut_error(stats) -> APIError | None:
    """A reply the server cut off (a cancel, the shutdown) is an error, not an answer."""
    cut = responses.cut_reason(stats.stop_reason)
    return APIError(503, cut[1], code=cut[0]) if cut else None


# ------------------------------------------------------------------------------------------- routes

def add_routes(app, *, read, render, submit, events, settings, calls) -> None:
    """POST /v1/messages and /v1/messages/count_tokens, over the app's request reading, rendering, model
    thread and event stream (the helpers every protocol module uses)."""
    from starlette.concurrency import run_in_threadpool

    def turn_of(req: CountRequest) -> Turn:
        turn = read_turn(req, calls.calls)
        return conversation.apply_tool_choice(turn, tool_choice(req.tool_choice))

    @app.post("/v1/messages/count_tokens")
    @anthropic_errors
    async def count_tokens(request: Request):
        req = await read(request, CountRequest)
        prompt, _ = await run_in_threadpool(render, turn_of(req), None, "messages")
        return {"input_tokens": len(prompt)}

    @app.post("/v1/messages")
    @anthropic_errors
    async def messages(request: Request):
        req = await read(request, MessagesRequest)
        refuse(req.stop_sequences, "stop_sequences are not supported (harmony's stop tokens end every reply)",
               "stop_sequences")
        refuse(req.top_k is not None, "top_k is not supported; use top_p", "top_k")
        turn = turn_of(req)
        prompt, parser = await run_in_threadpool(render, turn, None, "messages")
        show = not (req.thinking and req.thinking.display == "omitted")
        builder = MessageBuilder(responses.new_id("msg"), settings.model_id, len(prompt), parser, show, turn.warnings)
        job = submit("messages", builder.id, prompt, parser, max_tokens=req.max_tokens,
                     temperature=req.temperature, top_p=req.top_p)
        if not req.stream:
            async for ev in events(job, request):
                if ev.kind != "done":
                    builder.feed(ev)
                    continue
                calls.remember(parser.parts, parser.part_ids)
                if err := cut_error(ev.stats):
                    raise err
                return builder.result(ev.stats)

        async def stream():
            for e in builder.start():
                yield {"event": e["type"], "data": json.dumps(e)}
            try:
                async for ev in events(job, None):
                    if ev.kind == "done":
                        calls.remember(parser.parts, parser.part_ids)
                        if err := cut_error(ev.stats):
                            raise err
                    for e in (builder.finish(ev.stats) if ev.kind == "done" else builder.feed(ev)):
                        yield {"event": e["type"], "data": json.dumps(e)}
            except APIError as err:
                yield {"event": "error", "data": json.dumps(error_body(err.status, err.message))}

        return EventSourceResponse(stream(), ping=10, send_timeout=settings.write_timeout,
                                   ping_message_factory=lambda: ServerSentEvent(event="ping", data='{"type": "ping"}'))
