"""The Chat Completions API: its messages and tools read into the shared conversation model, and its output,
the chat.completion object and its chat.completion.chunk stream.

In: system/developer -> developer instructions; user; assistant reasoning_content (or reasoning), content,
tool_calls; tool messages by tool_call_id. Tools: function tools; any other type is left out of the prompt with
a `warnings` entry.

The reasoning goes to message.reasoning_content (llama.cpp, LM Studio and vLLM's name) and to its alias
message.reasoning (Ollama's), never into content; tool calls (also those the model put on the analysis
channel) to message.tool_calls with finish_reason "tool_calls". Streamed: a first chunk with the role, then
delta.reasoning_content (+ delta.reasoning), delta.content, delta.tool_calls[{index, id, type, function:
{name, arguments}}] then the argument text as the model writes it, a last chunk with finish_reason, a usage
chunk when stream_options.include_usage, and `data: [DONE]`. A reply cut off by a cancel or the shutdown ends
with an error chunk ({"error": {...}}) instead of a finish_reason.
"""

from __future__ import annotations

import time

from . import conversation
from . import schemas as S
from .conversation import Assistant, Turn, text_of
from .errors import bad
from .responses import cut_reason, visible_kind


def read_turn(req, known: dict) -> Turn:
    tools = conversation.Tools()
    for i, t in enumerate(req.tools or []):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind == "function":
            f = S.validate(S.ChatTool, t, f"tools[{i}]").function
            tools.function(f.name, f.description, f.parameters)
        elif isinstance(kind, str) and kind:
            tools.left_out(f"tools[{i}]", f"the {kind!r} tool")
        else:
            raise bad(f"tools[{i}].type: required, \"function\"", param=f"tools[{i}].type")
    turn = tools.turn([], conversation.effort_of(req.reasoning_effort))
    turn.messages = read_messages(req.messages, known, turn)
    return turn


def read_messages(raw: list, known: dict, turn: Turn) -> list[dict]:
    msgs: list[dict] = []
    for i, r in enumerate(raw):
        where = f"messages[{i}]"
        m = S.validate(S.ChatMessage, r, where)
        if m.role in ("system", "developer"):
            msgs.append({"role": "developer", "content": text_of(m.content, f"{where}.content")})
        elif m.role == "user":
            msgs.append({"role": "user", "content": text_of(m.content, f"{where}.content")})
        elif m.role == "assistant":
            reply = Assistant(turn.exact)
            reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
            if reasoning:
                reply.reasoning(reasoning)
            text = text_of(m.content, f"{where}.content")
            if text:
                reply.add("commentary" if m.tool_calls else "final", text)
            for j, c in enumerate(m.tool_calls or []):
                reply.call(c.id, conversation.recipient(c.function.name), c.function.arguments, known,
                           f"{where}.tool_calls[{j}].function.name")
            if not reply.parts:
                reply.add("final", "")
            msgs.append(reply.message())
        else:
            if not m.tool_call_id:
                raise bad(f"{where}: a tool message needs the tool_call_id of the call it answers",
                          param=f"{where}.tool_call_id")
            msgs.append(conversation.tool_message(conversation.call_names(msgs), m.tool_call_id,
                                                  text_of(m.content, f"{where}.content"), f"{where}.tool_call_id"))
    return msgs

FINISH = {"return": "stop", "call": "tool_calls", "max_tokens": "length", "context": "length", "malformed": "stop"}


def completion_usage(stats, reasoning_tokens: int) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}


class ChatBuilder:
    def __init__(self, cid: str, model: str, warnings: list[str] | None = None):
        self.id, self.model, self.created = cid, model, int(time.time())
        self.warnings = list(warnings or [])  # what the request asked for and was left out
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict] = []  # finished calls
        self.streamed: dict[str, int] = {}  # call id -> index, for calls whose arguments streamed

    def chunk(self, delta: dict | None, finish: str | None = None, **extra) -> dict:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def start(self) -> list[dict]:
        return [self.chunk({"role": "assistant", "content": ""})]

    def feed(self, ev) -> list[dict]:
        kind = visible_kind(ev) if not getattr(ev, "separator", False) else ev.kind
        if kind == "reasoning":
            self.reasoning.append(ev.text)
            return [self.chunk({"reasoning_content": ev.text, "reasoning": ev.text})]
        if kind in ("content", "preamble"):
            self.content.append(ev.text)
            return [self.chunk({"content": ev.text})]
        if kind == "tool_call_delta":  # the arguments as the model writes them; the head with the first piece
            out = []
            if ev.id not in self.streamed:
                i = self.streamed[ev.id] = len(self.calls) + len(self.streamed)
                out.append(self._head(i, ev.id, ev.name))
            return out + [self.chunk({"tool_calls": [{"index": self.streamed[ev.id],
                                                      "function": {"arguments": ev.text}}]})]
        if kind == "tool_call":
            call = {"id": getattr(ev, "id", None) or f"call_{len(self.calls)}_{self.id[-12:]}", "type": "function",
                    "function": {"name": ev.name, "arguments": ev.arguments or ""}}
            self.calls.append(call)
            if self.streamed.pop(call["id"], None) is not None:
                return []
            i = len(self.calls) - 1
            out = [self._head(i, call["id"], ev.name)]
            if call["function"]["arguments"]:
                out.append(self.chunk({"tool_calls": [{"index": i, "function": {"arguments": call["function"]
                                                                              ["arguments"]}}]}))
            return out
        return []

    def _head(self, i: int, cid: str, name: str) -> dict:
        return self.chunk({"tool_calls": [{"index": i, "id": cid, "type": "function",
                                           "function": {"name": name, "arguments": ""}}]})

    def finish_reason(self, stats) -> str:
        return "tool_calls" if self.calls else FINISH.get(stats.stop_reason, "stop")

    def all_warnings(self, stats) -> dict:
        w = self.warnings + (list(stats.warnings) if stats.malformed else [])
        return {"warnings": w} if w else {}

    def finish(self, stats, include_usage: bool) -> list[dict]:
        cut = cut_reason(stats.stop_reason)
        if cut:  # not finished: say so (an OpenAI error object in the stream), never finish_reason "stop"
            out = [{"error": {"message": cut[1], "type": "server_error", "param": None, "code": cut[0]}}]
        else:
            out = [self.chunk({}, self.finish_reason(stats), **self.all_warnings(stats))]
        if include_usage:
            out.append(self.chunk(None, usage=completion_usage(stats, len(self.reasoning))))
        return out

    def completion(self, stats) -> dict:
        reasoning = "".join(self.reasoning) or None
        msg = {"role": "assistant", "content": "".join(self.content) or (None if self.calls else ""),
               "reasoning_content": reasoning, "reasoning": reasoning, "refusal": None}
        if self.calls:
            msg["tool_calls"] = self.calls
        out = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
               "system_fingerprint": None,
               "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": self.finish_reason(stats)}],
               "usage": completion_usage(stats, len(self.reasoning)), **self.all_warnings(stats)}
        return out
