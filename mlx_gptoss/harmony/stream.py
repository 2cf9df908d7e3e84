"""StreamParser: generated tokens -> reasoning / preamble / content / tool-call pieces and the ordered parts,
strictly by the format, never raising (openai-harmony's StreamableParser either raises on bad output or, not
strict, lets text without a channel through as if it were an answer)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from .rendering import CHANNELS, CONTENT_TYPE, REASONING_SEPARATOR, RECIPIENT, assistant_tool_calls
from .vocabulary import (CALL, CHANNEL, CONSTRAIN, END, MESSAGE, N_ORDINARY, RETURN, START, STOP_TOKENS, encoding,
                         token_bytes)

MAX_HEADER = 16  # tokens; a header cut off by max_tokens within this is not called malformed


@dataclass
class Piece:
    kind: str  # "reasoning" | "content" | "preamble" | "tool_call" | "tool_call_delta" (see StreamParser)
    text: str = ""
    recipient: str | None = None
    message: int = 0  # which generated message (0, 1, ...) the text belongs to
    id: str | None = None  # a tool call's id
    channel: str | None = None
    separator: bool = False  # "\n\n" between two analysis messages, not model text


MAX_HEADER_TOKENS = 32  # a header longer than this is not one: its text is treated as a message without channel


class StreamParser:
    """Generated ids -> Pieces, strictly by the harmony format; it never raises, and never shows as the
    answer what the model did not put on the final channel.

    A message is `<|start|>assistant HEADER <|message|> TEXT <|end|>|<|return|>|<|call|>` (the first
    `<|start|>assistant` is the prompt's). Its text streams as "reasoning" (analysis), "preamble" (commentary
    without a recipient) or "content" (final); a message with a recipient (`to=functions.x`, `to=python`) is
    one "tool_call" piece when it ends; with stream_arguments=True, its text also streams as "tool_call_delta"
    pieces (recipient and call id set) while it is generated, for APIs that stream a call's arguments.
    Output that breaks the format sets `malformed` and a warning:
    - a missing or unknown channel, an invalid recipient, text where a `<|start|>` must come, a header that
      never reaches <|message|>: the text is kept, hidden as "reasoning" (it is how chain-of-thought leaks);
    - a `<|start|>` with a role other than assistant: everything from there on is dropped (`halted`);
    - a special token inside a message, or any token after the reply stopped: dropped.
    Text is decoded incrementally from the token bytes: a multi-byte character split across tokens is never
    a U+FFFD. Every token is counted once in `n_shown` (its text reached a piece), `n_framing` (the markup of
    a well-formed message) or `n_dropped`; `parts` holds the finished messages in order (the message dict
    "parts" shape of mlx_gptoss.chat); `message_ids[n]` the ids of well-formed message n as it stands in a
    prompt (what render(exact=) takes back)."""

    def __init__(self, model_path: Path | None = None, *, trace: bool = False, stream_arguments: bool = False):
        self.enc = encoding(model_path)
        self.bytes = token_bytes()
        self.trace: dict[int, list[int]] | None = {} if trace else None  # message -> its shown token ids
        self.parts: list[dict] = []
        self.malformed = False
        self.warnings: list[str] = []
        self.stopped = False  # saw <|return|> or <|call|>: the reply is complete
        self.halted = False  # the output left the assistant's turn: nothing more is parsed
        self.n_shown = self.n_framing = self.n_dropped = 0
        self.cut_call: dict | None = None  # a tool call cut off before <|call|> (see finish())
        self.stream_arguments = stream_arguments
        self.message_ids: dict[int, list[int]] = {}
        self._call_id: str | None = None  # the id of the call being generated
        self._state = "header"  # "header" | "content" | "between"
        self._header: list[int] = []
        self._role_given = True  # the prompt ended with <|start|>assistant
        self._msg: dict | None = None
        self._tokens = 0  # ordinary tokens of the current message
        self._decoder = None
        self._text: list[str] = []
        self._n = 0  # index of the current message
        self._reasoned = False  # some reasoning was shown (the next analysis message gets a separator)
        # the ids of each finished part as it stands in a prompt (None if it broke the format): rendering
        # them back (render(exact=)) keeps a tool loop's cache even where the model's tokenization of a
        # text is not the one encode() gives
        self.part_ids: list[list[int] | None] = []
        self._ids: list[int] = [START] + self.enc.encode("assistant")
        self._ids_ok = True

    # -- state
    @property
    def reasoning(self) -> list[str]:
        return [p["content"] for p in self.parts if p["channel"] == "analysis" and not p["recipient"]]

    @property
    def content(self) -> list[str]:
        return [p["content"] for p in self.parts if p["channel"] == "final" and not p["recipient"]]

    @property
    def tool_calls(self) -> list[dict]:
        """The finished calls: {"id", "name", "arguments"} (+ "recipient" when it is not functions.NAME)."""
        return assistant_tool_calls({"parts": self.parts})

    def _warn(self, why: str) -> None:
        self.malformed = True
        self._ids_ok = False  # this message is not rendered back from its ids
        if why not in self.warnings:
            self.warnings.append(why)

    def _name(self, token: int) -> str:
        try:
            return self.enc.decode([token])
        except Exception:
            return f"<special {token}>"

    # -- feeding
    def feed(self, token: int) -> list[Piece]:
        if self.halted or self.stopped:
            self.n_dropped += 1
            return []
        self._ids.append(token)
        out = self._feed(token)
        if token == START:  # a message begins (also after a format break)
            self._ids, self._ids_ok = [START], True
        return out

    def _feed(self, token: int) -> list[Piece]:
        if self._state == "content":
            return self._content(token)
        if self._state == "between":
            if token in (END, RETURN, CALL):  # e.g. <|end|><|return|>: nothing lost
                self.n_framing += 1
                self.stopped = token in STOP_TOKENS
                return []
            if token >= N_ORDINARY and token not in (START, CHANNEL):
                self._warn(f"the model wrote the special token {self._name(token)} between messages")
                self.n_dropped += 1
                return []
            if token == START:
                self.n_framing += 1
                self._state, self._header, self._role_given = "header", [], False
                return []
            if token == CHANNEL:  # <|start|>assistant left out: accept the message, flag it
                self._warn("the model began a message without <|start|>assistant")
                self._state, self._header, self._role_given = "header", [], True
                return self._header_token(token)
            self._warn("the model wrote outside a message (where <|start|> must come)")
            self._open({"channel": None, "recipient": None, "content_type": None})
            return self._content(token)
        return self._header_token(token)

    def _header_token(self, token: int) -> list[Piece]:
        if token == MESSAGE:
            n = 1 + len(self._header)
            out = self._open_from_header()
            if self.halted:
                self.n_dropped += n
            else:
                self.n_framing += n
            return out
        if token in (END, RETURN, CALL, START):
            out = self._unopened()
            self.n_framing += 1
            if token == START:
                self._state, self._header, self._role_given = "header", [], False
            else:
                self._state = "between"
                self.stopped = token in STOP_TOKENS
            return out
        if token >= N_ORDINARY and token not in (CHANNEL, CONSTRAIN):
            self._warn(f"the model put the special token {self._name(token)} in a message header")
            self.n_dropped += 1
            return []
        self._header.append(token)
        if len(self._header) > MAX_HEADER_TOKENS:
            return self._unopened(keep_open=True)
        return []

    def _header_text(self) -> str:
        out = []
        for t in self._header:
            if t == CHANNEL:
                out.append(" <|channel|> ")
            elif t == CONSTRAIN:
                out.append(" <|constrain|>")
            else:
                out.append(self.bytes[t].decode("utf-8", "replace"))
        return "".join(out)

    def _open_from_header(self) -> list[Piece]:
        words = self._header_text().split()
        role = None
        if not self._role_given:
            role = words.pop(0) if words and not words[0].startswith("<|") else None
            if role != "assistant":
                self._warn(f"the model started a message as {role or 'nobody'!r}, not as the assistant; "
                           "the output after it was dropped")
                self.halted = True
                return []
        channel = recipient = content_type = None
        i = 0
        while i < len(words):
            w = words[i]
            if w == "<|channel|>":
                channel = words[i + 1] if i + 1 < len(words) else ""
                i += 1
            elif w.startswith("to="):
                recipient = w[3:]
            elif w == "<|constrain|>" and i + 1 < len(words):
                content_type = w + words[i + 1]
                i += 1
            elif content_type is None and channel is not None:
                content_type = w
            else:
                self._warn(f"the model wrote {w!r} in a message header")
            i += 1
        msg = {"channel": channel, "recipient": recipient, "content_type": content_type}
        if channel not in CHANNELS:
            self._warn("the model wrote a message without a channel" if not channel else
                       f"the model wrote on an unknown channel {channel!r}")
            msg["channel"] = None
        if recipient is not None and not RECIPIENT.fullmatch(recipient):
            self._warn(f"the model addressed {recipient!r}, which is not a tool name; it is not a tool call")
            msg["channel"] = msg["recipient"] = None
        if content_type is not None and not CONTENT_TYPE.fullmatch(content_type):
            msg["content_type"] = None
        self._open(msg)
        return []

    def _open(self, msg: dict) -> None:
        import codecs

        self._msg = msg
        self._call_id = "call_" + uuid.uuid4().hex[:24] if msg["recipient"] else None
        self._state, self._header = "content", []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._text, self._tokens = [], 0

    def _kind(self) -> str:
        m = self._msg
        if m["recipient"]:
            return "tool_call"
        return {"final": "content", "commentary": "preamble"}.get(m["channel"], "reasoning")

    def _piece(self, text: str) -> list[Piece]:
        if not text:
            return []
        self._text.append(text)
        kind = self._kind()
        if kind == "tool_call":
            return [Piece("tool_call_delta", text, self._msg["recipient"], message=self._n, id=self._call_id,
                          channel=self._msg["channel"])] if self.stream_arguments else []
        out = []
        if kind == "reasoning":
            if self._reasoned and len(self._text) == 1:
                out.append(Piece("reasoning", REASONING_SEPARATOR, message=self._n, separator=True))
            self._reasoned = True
        return out + [Piece(kind, text, message=self._n, channel=self._msg["channel"])]

    def _content(self, token: int) -> list[Piece]:
        if token < N_ORDINARY:
            self._tokens += 1
            if self.trace is not None:
                self.trace.setdefault(self._n, []).append(token)
            if self._kind() != "tool_call":
                self.n_shown += 1
            return self._piece(self._decoder.decode(self.bytes[token]))
        if token in (END, RETURN, CALL, START):
            self.n_framing += 1
            out = self._close()
            if token == START:
                self._warn("the model began a new message without ending the last one (<|start|> inside a message)")
                self._state, self._header, self._role_given = "header", [], False
            else:
                self._state = "between"
                self.stopped = token in STOP_TOKENS
            return out
        self._warn(f"the model put the special token {self._name(token)} inside a message")
        self.n_dropped += 1
        return []

    def _close(self, partial: bool = False) -> list[Piece]:
        """End the current message: flush its text, record it in parts (a tool call gets its id)."""
        out = self._piece(self._decoder.decode(b"", final=True))
        m, text = self._msg, "".join(self._text)
        self._msg, self._state = None, "between"
        kind = {"channel": m["channel"] or "analysis", "content": text, "recipient": m["recipient"],
                "content_type": m["content_type"], "id": None}
        if m["recipient"]:
            if partial:
                self.n_dropped += self._tokens
                if self.trace is not None:
                    self.trace.pop(self._n, None)
                self.cut_call = {"recipient": m["recipient"], "arguments": text, "id": self._call_id}
                self._warn(f"the reply was cut off inside a call to {m['recipient']}; its partial arguments "
                           f"were {text!r}")
                self._n += 1
                return out
            self.n_shown += self._tokens
            kind["id"] = self._call_id
            out.append(Piece("tool_call", text, m["recipient"], message=self._n, id=kind["id"],
                             channel=kind["channel"]))
        if text or m["recipient"]:
            self.parts.append(kind)
            whole = self._ids_ok and not partial and self._ids[-1] in (END, RETURN, CALL)
            self.part_ids.append(list(self._ids) if whole else None)
            if whole:
                self.message_ids[self._n] = self.part_ids[-1]
        self._n += 1
        return out

    def _unopened(self, keep_open: bool = False) -> list[Piece]:
        """A header that never reached <|message|>: its text is a message without channel (hidden)."""
        self._warn("the model's output never opened a message (no <|message|>)")
        header = [t for t in self._header if t < N_ORDINARY]
        self.n_dropped += len(self._header) - len(header)
        self._open({"channel": None, "recipient": None, "content_type": None})
        out = []
        for t in header:
            out += self._content(t)
        return out if keep_open else out + self._close()

    def finish(self, stop: str) -> list[Piece]:
        """At the end of generation: a message cut off (max_tokens, context, cancel) keeps what it showed; a
        cut-off tool call is reported in the warnings (with its partial arguments) and `cut_call`; a header
        cut off within MAX_HEADER tokens is not called malformed."""
        if self.halted or self.stopped:
            return []
        if self._state == "content":
            return self._close(partial=True)
        if self._state == "header" and self._header:
            if stop in ("max_tokens", "context", "cancelled") and len(self._header) <= MAX_HEADER:
                self.n_dropped += len(self._header)
                self._header = []
                return []
            return self._unopened()
        return []
