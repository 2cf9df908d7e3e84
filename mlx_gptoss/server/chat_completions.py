"""The Chat Completions API's output: the chat.completion object and its chat.completion.chunk stream.

The reasoning goes to message.reasoning_content (llama.cpp, LM Studio and vLLM's name) and to its alias
message.reasoning (Ollama's), never into content; tool calls (also those the model put on the analysis
channel) to message.tool_calls with finish_reason "tool_calls". Streamed: a first chunk with the role, then
delta.reasoning_content (+ delta.reasoning), delta.content, delta.tool_calls[{index, id, type, function:
{name, arguments}}] then the argument text, a last chunk with finish_reason, a usage chunk when
stream_options.include_usage, and `data: [DONE]`.
"""

from __future__ import annotations

import time

from .responses import visible_kind

FINISH = {"return": "stop", "call": "tool_calls", "max_tokens": "length", "context": "length", "cancelled": "stop",
          "malformed": "stop"}


def completion_usage(stats, reasoning_tokens: int) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}


class ChatBuilder:
    def __init__(self, cid: str, model: str):
        self.id, self.model, self.created = cid, model, int(time.time())
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict] = []

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
        if kind == "tool_call":
            call = {"id": getattr(ev, "id", None) or f"call_{len(self.calls)}_{self.id[-12:]}", "type": "function",
                    "function": {"name": ev.name, "arguments": ev.arguments or ""}}
            self.calls.append(call)
            i = len(self.calls) - 1
            head = {"index": i, "id": call["id"], "type": "function", "function": {"name": ev.name, "arguments": ""}}
            out = [self.chunk({"tool_calls": [head]})]
            if call["function"]["arguments"]:
                out.append(self.chunk({"tool_calls": [{"index": i, "function": {"arguments": call["function"]
                                                                              ["arguments"]}}]}))
            return out
        return []

    def finish_reason(self, stats) -> str:
        return "tool_calls" if self.calls else FINISH.get(stats.stop_reason, "stop")

    def finish(self, stats, include_usage: bool) -> list[dict]:
        extra = {"warnings": list(stats.warnings)} if stats.malformed else {}
        out = [self.chunk({}, self.finish_reason(stats), **extra)]
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
               "usage": completion_usage(stats, len(self.reasoning))}
        if stats.malformed:
            out["warnings"] = list(stats.warnings)
        return out
