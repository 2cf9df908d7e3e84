"""The Responses API's output: items, the response object, its streaming events, and the response store.

Output items, in the order the model produced them: reasoning (analysis; content [{type: reasoning_text}]),
message (final answer or a preamble; content [{type: output_text}]), function_call (id fc_..., call_id
call_..., name, arguments; also for calls the model put on the analysis channel). Streaming follows OpenAI's
reference server: response.created, response.in_progress, then per item output_item.added,
content_part.added, *_text.delta..., *_text.done, content_part.done, output_item.done (function calls:
output_item.added, function_call_arguments.delta/done, output_item.done), last response.completed
(response.incomplete when cut by max_output_tokens or the context, response.failed at shutdown), each with
an increasing sequence_number.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict

from .errors import bad


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def usage(stats, reasoning_tokens: int) -> dict:
    return {"input_tokens": stats.prompt_tokens, "input_tokens_details": {"cached_tokens": stats.cached_tokens},
            "output_tokens": stats.generated_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


class ResponseBuilder:
    """Turns the engine's Events into output items, and (for streaming) into the events that announce them."""

    def __init__(self, response: dict, forced_name: str | None = None):
        self.response = response  # the response object's settings (id, model, tools, ...), status in_progress
        self.output: list[dict] = self.response["output"]
        self.seq = 0
        self.open: dict | None = None  # the item being streamed
        self.reasoning_tokens = 0

    def event(self, kind: str, **fields) -> dict:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def start(self) -> list[dict]:
        return [self.event("response.created", response=self.snapshot()),
                self.event("response.in_progress", response=self.snapshot())]

    def snapshot(self) -> dict:
        return {**self.response, "output": [dict(i) for i in self.output]}

    # ---- events in
    def feed(self, ev) -> list[dict]:
        if getattr(ev, "separator", False):  # the engine's "\n\n" between two analysis messages: items split
            return []
        kind = visible_kind(ev)
        if kind == "tool_call":
            return self._call(ev)
        if kind == "reasoning":
            self.reasoning_tokens += 1
        return self._text({"content": "message"}.get(kind, kind), ev.text, getattr(ev, "message", 0))

    def _text(self, kind: str, delta: str, message: int) -> list[dict]:
        out = []
        if self.open is None or self.open["_kind"] != kind or self.open["_message"] != message:
            out += self.close()
            out += self._open_text(kind, message)
        item = self.open
        item["_text"].append(delta)
        idx = len(self.output) - 1
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        out.append(self.event(name, item_id=item["id"], output_index=idx, content_index=0, delta=delta, **extra))
        return out

    def _open_text(self, kind: str, message: int) -> list[dict]:
        if kind == "reasoning":
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.output.append(item)
        idx = len(self.output) - 1
        out = [self.event("response.output_item.added", output_index=idx, item=self._public(item)),
               self.event("response.content_part.added", item_id=item["id"], output_index=idx, content_index=0,
                          part=part)]
        item.update(_kind=kind, _text=[], _message=message)
        self.open = item
        return out

    def close(self) -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        idx = self.output.index(item)
        text = "".join(item.pop("_text"))
        kind = item.pop("_kind")
        item.pop("_message")
        item["status"] = "completed"
        if kind == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            done = self.event("response.reasoning_text.done", item_id=item["id"], output_index=idx,
                              content_index=0, text=text)
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            done = self.event("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                              text=text, logprobs=[])
        item["content"] = [part]
        return [done, self.event("response.content_part.done", item_id=item["id"], output_index=idx,
                                 content_index=0, part=part),
                self.event("response.output_item.done", output_index=idx, item=dict(item))]

    def _call(self, ev) -> list[dict]:
        out = self.close()
        call_id = getattr(ev, "id", None) or new_id("call")
        item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": call_id,
                "name": ev.name, "arguments": ""}
        self.output.append(item)
        idx = len(self.output) - 1
        args = ev.arguments or ""
        out.append(self.event("response.output_item.added", output_index=idx, item=dict(item)))
        if args:
            out.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=idx,
                                  delta=args))
        out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                              arguments=args, name=ev.name))
        item.update(arguments=args, status="completed")
        out.append(self.event("response.output_item.done", output_index=idx, item=dict(item)))
        return out

    @staticmethod
    def _public(item: dict) -> dict:
        return {k: v for k, v in item.items() if not k.startswith("_")}

    # ---- the end
    def finish(self, stats, failed: str | None = None) -> list[dict]:
        out = self.close()
        r = self.response
        r["usage"] = usage(stats, self.reasoning_tokens)
        if failed:
            r.update(status="failed", error={"code": "server_shutting_down", "message": failed})
            kind = "response.failed"
        elif stats.stop_reason in ("max_tokens", "context"):
            r.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
            kind = "response.incomplete"
        else:
            r["status"] = "completed"
            kind = "response.completed"
        if stats.malformed:
            r["warnings"] = list(stats.warnings)
        out.append(self.event(kind, response=self.snapshot()))
        return out


def visible_kind(ev) -> str:
    """The event's kind as clients see it: text outside any valid harmony message (the engine hides it as
    reasoning, channel None) is shown as content, with the warning in the response."""
    return "content" if ev.kind == "reasoning" and ev.channel is None else ev.kind


def response_object(rid: str, req, model: str, tools: list, effort: str) -> dict:
    """The response object's fields as OpenAI returns them (status in_progress, no output yet)."""
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "model": model, "output": [],
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": effort, "summary": None}, "store": req.store,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": req.tool_choice or "auto", "tools": tools,
            "top_p": req.top_p if req.top_p is not None else 1.0, "truncation": "disabled", "usage": None,
            "user": req.user, "metadata": req.metadata or {}}


class CallMemory:
    """The calls this server generated, by call id: their channel, recipient, content type and arguments text
    (the newest `size`), so a call a client sends back renders token for token as the model wrote it (Anthropic's
    tool_use sends the arguments back as an object: the text is used when it parses to the same object)."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.calls: OrderedDict[str, dict] = OrderedDict()

    def remember(self, parts) -> None:
        for p in parts or []:
            if p.get("recipient") and p.get("id"):
                self.calls[p["id"]] = {k: p.get(k) for k in ("channel", "recipient", "content_type", "content")}
        while len(self.calls) > self.size:
            self.calls.popitem(last=False)


class Store:
    """Stored responses (store=true) for previous_response_id and GET /v1/responses/{id}: the newest
    `size`, each with the whole conversation it ended (messages) so a follow-up extends it."""

    def __init__(self, size: int = 256):
        self.size = size
        self.items: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, response: dict, messages: list[dict]) -> None:
        self.items[response["id"]] = (response, messages)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def messages(self, rid: str) -> list[dict]:
        if rid not in self.items:
            raise bad(f"previous_response_id {rid!r}: no stored response has this id (responses are kept in "
                      f"memory, the newest {self.size}, only with store=true)", param="previous_response_id",
                      code="previous_response_not_found")
        return self.items[rid][1]

    def get(self, rid: str) -> dict | None:
        item = self.items.get(rid)
        return item[0] if item else None
