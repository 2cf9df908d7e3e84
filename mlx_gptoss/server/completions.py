"""POST /v1/completions, for clients that render harmony themselves: the raw prompt (text, special tokens
written out, or token ids) in, the model's raw text out with its special tokens (so the client parses the
harmony it asked for); generation ends at <|return|> or <|call|>, whose text ends the output."""

from __future__ import annotations

import time

from ..harmony import Piece

MAX_SPLIT = 4  # a UTF-8 character spans at most 4 tokens' bytes


class RawText:
    """A parser for chat.generate_events that passes every token through as text (multi-byte characters
    split across tokens are held back until whole)."""

    def __init__(self, enc):
        self.enc = enc
        self.pending: list[int] = []
        self.text: list[str] = []
        self.malformed, self.warnings, self.stopped, self.halted = False, [], False, False

    def feed(self, token: int) -> list[Piece]:
        self.pending.append(token)
        text = self.enc.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < MAX_SPLIT:
            return []
        return self._flush(text)

    def _flush(self, text: str) -> list[Piece]:
        self.pending = []
        self.text.append(text)
        return [Piece("content", text)] if text else []

    def finish(self, stop: str) -> list[Piece]:
        return self._flush(self.enc.decode(self.pending)) if self.pending else []


FINISH = {"return": "stop", "call": "stop", "max_tokens": "length", "context": "length", "cancelled": "stop",
          "malformed": "stop"}


def completion(cid: str, model: str, text: str, stats=None, finish: str | None = None) -> dict:
    """A text_completion object (or, with stats None, one streamed chunk of it)."""
    out = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
           "system_fingerprint": None,
           "choices": [{"index": 0, "text": text, "logprobs": None,
                        "finish_reason": finish or (FINISH.get(stats.stop_reason, "stop") if stats else None)}]}
    if stats is not None:
        out["usage"] = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
                        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
                        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}
    return out
