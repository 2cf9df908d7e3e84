"""The harmony format through openai-harmony: the offline vocabulary, prompt rendering, tools, stream parsing.

openai-harmony (OpenAI's reference library for the format) renders and parses; this module only adapts it:
- the vocabulary: openai-harmony reads o200k_base.tiktoken from $TIKTOKEN_ENCODINGS_BASE or downloads it.
  We derive that file from the model snapshot's tokenizer.json (the same byte-level BPE ranks), check its
  sha256 and point TIKTOKEN_ENCODINGS_BASE at our cache folder, so chat works with no network;
- messages as plain dicts (see mlx_gptoss.chat) -> a harmony Conversation -> prompt token ids;
- Python functions as tools (JSON schema from signature, type hints and docstring);
- StreamParser: generated tokens -> reasoning / content / tool-call pieces, never raising on bad output.
"""

from __future__ import annotations

import base64
import datetime as _dt
import enum
import hashlib
import inspect
import json
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .errors import GptOssError

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
N_ORDINARY = 199998  # o200k_base's BPE ranks 0..199997; the rest of the 201088 ids are special tokens

START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = 200006, 200007, 200008, 200005, 200003, 200002, 200012
STOP_TOKENS = {RETURN: "return", CALL: "call"}
EFFORTS = ("low", "medium", "high")
KNOWLEDGE_CUTOFF = "2024-06"
MAX_HEADER = 16  # tokens; a header cut off by max_tokens within this is not called malformed


# --------------------------------------------------------------------------------------- vocabulary

def cache_dir() -> Path:
    """gptoss-mac's own cache folder ($XDG_CACHE_HOME/gptoss-mac, else ~/.cache/gptoss-mac)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptoss-mac"


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character standing for each byte, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def tiktoken_from_tokenizer_json(tokenizer_json: Path) -> bytes:
    """The o200k_base.tiktoken text (base64 token, space, rank per line) from a gpt-oss tokenizer.json."""
    try:
        data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise GptOssError(f"{tokenizer_json}: not a readable tokenizer.json ({type(e).__name__}: {e}); "
                          "download the model folder again") from None
    dec = _byte_decoder()
    by_rank: dict[int, bytes] = {}
    for text, rank in vocab.items():
        if isinstance(rank, int) and 0 <= rank < N_ORDINARY:
            try:
                by_rank[rank] = bytes(dec[ch] for ch in text)
            except KeyError:
                raise GptOssError(f"{tokenizer_json}: token {text!r} is not byte-level BPE; "
                                  "is this a gpt-oss tokenizer?") from None
    if len(by_rank) != N_ORDINARY:
        raise GptOssError(f"{tokenizer_json}: holds {len(by_rank)} of the {N_ORDINARY} o200k tokens; "
                          "is this a gpt-oss tokenizer? download the model folder again")
    return b"".join(base64.b64encode(by_rank[r]) + b" %d\n" % r for r in range(N_ORDINARY))


def ensure_vocab(model_path: Path | None = None) -> Path:
    """The folder holding a verified o200k_base.tiktoken, deriving it from model_path/tokenizer.json if needed;
    sets TIKTOKEN_ENCODINGS_BASE to it (before openai-harmony first loads its encoding)."""
    env = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    candidates = ([Path(env)] if env else []) + [cache_dir()]
    for folder in candidates:
        f = folder / VOCAB_FILE
        if f.is_file() and hashlib.sha256(f.read_bytes()).hexdigest() == VOCAB_SHA256:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
            return folder
    src = Path(model_path) / "tokenizer.json" if model_path is not None else None
    if src is None or not src.is_file():
        where = f"{src}" if src is not None else "no model folder given"
        raise GptOssError(f"the harmony vocabulary {VOCAB_FILE} is not in {cache_dir()} and cannot be derived: "
                          f"{where} is missing; download the model with its tokenizer.json "
                          "(gptoss-mac download) or put a verified o200k_base.tiktoken there")
    text = tiktoken_from_tokenizer_json(src)
    digest = hashlib.sha256(text).hexdigest()
    if digest != VOCAB_SHA256:
        raise GptOssError(f"{src}: the vocabulary derived from it has sha256 {digest}, not o200k_base's "
                          f"{VOCAB_SHA256}; this is not gpt-oss's tokenizer, download the model folder again")
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{VOCAB_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(text)
    tmp.replace(folder / VOCAB_FILE)  # atomic: a concurrent reader never sees half a file
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    return folder


_ENCODING = None


def encoding(model_path: Path | None = None):
    """openai-harmony's HarmonyEncoding for gpt-oss, loaded once per process from the offline vocabulary."""
    global _ENCODING
    if _ENCODING is None:
        ensure_vocab(model_path)
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding

        try:
            _ENCODING = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        except Exception as e:  # its Rust errors are plain exceptions
            raise GptOssError(f"openai-harmony could not load its encoding from "
                              f"{os.environ.get('TIKTOKEN_ENCODINGS_BASE')}: {e}") from None
    return _ENCODING


# --------------------------------------------------------------------------------------------- tools

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _schema(tp) -> dict:
    """A JSON schema for one Python type hint (the common cases; anything else is left unconstrained)."""
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return {"type": _JSON_TYPES.get(type(args[0]), "string"), "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _schema(rest[0]) if len(rest) == 1 else {"anyOf": [_schema(a) for a in rest]}
    if tp in (list, tuple, set) or origin in (list, tuple, set):
        return {"type": "array", **({"items": _schema(args[0])} if args else {})}
    if tp is dict or origin is dict:
        return {"type": "object"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"type": "string", "enum": [m.value for m in tp]}
    return {}


def _doc_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) from a Google-style (Args:) or Sphinx-style (:param x:) docstring."""
    doc = inspect.cleandoc(doc or "")
    params: dict[str, str] = {}
    for m in re.finditer(r"^\s*:param\s+(?:\w+\s+)?(\w+):\s*(.+)$", doc, re.M):
        params[m.group(1)] = m.group(2).strip()
    section = re.search(r"^(Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?)+)", doc, re.M)
    if section:
        for m in re.finditer(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", section.group(2), re.M):
            params[m.group(1)] = m.group(2).strip()
    body = re.split(r"^\s*(?:Args|Arguments|Parameters|Returns|Raises):|^\s*:param", doc, maxsplit=1, flags=re.M)[0]
    return " ".join(body.split()), params


@dataclass
class Tool:
    """A function tool: name, description, JSON-schema parameters, and the Python callable if any."""

    name: str
    description: str
    parameters: dict
    fn: Callable | None = None

    def run(self, arguments: str) -> str:
        """Call fn with the model's JSON arguments; errors become a message the model can read."""
        if self.fn is None:
            raise GptOssError(f"tool {self.name!r} has no Python function to run; answer it with add_tool_result()")
        try:
            args = json.loads(arguments or "{}")
            if not isinstance(args, dict):
                raise ValueError("the arguments must be a JSON object")
        except ValueError as e:
            return f"error: invalid arguments for {self.name}: {e}"
        try:
            out = self.fn(**args)
        except Exception as e:  # the model gets to see and recover from a tool's failure
            return f"error: {type(e).__name__}: {e}"
        return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)


def tool_spec(tool: Callable | dict | Tool) -> Tool:
    """A Tool from a Python callable (schema from its signature, type hints and docstring) or from a dict
    {"name", "description", "parameters"} (also accepted: OpenAI's {"type": "function", "function": {...}})."""
    if isinstance(tool, Tool):
        return tool
    if isinstance(tool, dict):
        d = tool.get("function", tool) if tool.get("type") == "function" else tool
        name = d.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise GptOssError(f"tool {tool!r}: needs a \"name\" made of letters, digits and _")
        params = d.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise GptOssError(f"tool {name!r}: \"parameters\" must be a JSON schema object")
        return Tool(name, str(d.get("description", "")), params, d.get("fn"))
    if not callable(tool):
        raise GptOssError(f"tool {tool!r}: expected a Python function or a dict with name/description/parameters")
    name = getattr(tool, "__name__", type(tool).__name__)
    description, docs = _doc_parts(tool.__doc__ or "")
    try:
        hints = typing.get_type_hints(tool)
    except Exception:
        hints = {}
    props, required = {}, []
    for p in inspect.signature(tool).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        s = _schema(hints.get(p.name, str if p.annotation is p.empty else p.annotation))
        if p.name in docs:
            s["description"] = docs[p.name]
        if p.default is p.empty:
            required.append(p.name)
        elif p.default is None or isinstance(p.default, (str, int, float, bool)):
            s["default"] = p.default
        props[p.name] = s
    params = {"type": "object", "properties": props, **({"required": required} if required else {})}
    return Tool(name, description, params, tool)


def tool_specs(tools: Iterable | None) -> list[Tool]:
    specs = [tool_spec(t) for t in (tools or [])]
    names = [t.name for t in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise GptOssError(f"tools: the name {sorted(dup)[0]!r} is used twice")
    return specs


# ------------------------------------------------------------------------------------------ rendering

def _text(m: dict, key: str) -> str:
    v = m.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise GptOssError(f"message {m!r}: {key!r} must be a string")
    return v


def to_harmony(messages: list[dict], *, reasoning_effort: str = "medium", tools=None, developer: str | None = None,
               date: str | None = None, knowledge_cutoff: str = KNOWLEDGE_CUTOFF):
    """Message dicts (mlx_gptoss.chat) + settings -> openai-harmony Messages, system and developer first."""
    from openai_harmony import (Author, DeveloperContent, Message, ReasoningEffort, Role, SystemContent,
                                ToolDescription)

    if reasoning_effort not in EFFORTS:
        raise GptOssError(f"reasoning_effort {reasoning_effort!r}: use one of {', '.join(EFFORTS)}")
    date = date or _dt.date.today().isoformat()
    system = (SystemContent.new().with_reasoning_effort(ReasoningEffort[reasoning_effort.upper()])
              .with_conversation_start_date(date).with_knowledge_cutoff(knowledge_cutoff))
    instructions = [developer] if developer else []
    body = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise GptOssError(f"message {m!r}: needs a \"role\" of system, developer, user, assistant or tool")
        role = m["role"]
        if role == "system":
            system = system.with_model_identity(_text(m, "content"))
        elif role == "developer":
            instructions.append(_text(m, "content"))
        elif role == "user":
            body.append(Message.from_role_and_content(Role.USER, _text(m, "content")))
        elif role == "tool":
            name = m.get("name")
            if not isinstance(name, str) or not name:
                raise GptOssError(f"message {m!r}: a tool message needs the \"name\" of the tool it answers")
            author = name if "." in name else f"functions.{name}"
            body.append(Message.from_author_and_content(Author.new(Role.TOOL, author), _text(m, "content"))
                        .with_channel("commentary").with_recipient("assistant"))
        else:
            if m.get("reasoning"):
                body.append(Message.from_role_and_content(Role.ASSISTANT, _text(m, "reasoning")).with_channel("analysis"))
            for call in m.get("tool_calls") or []:
                if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                    raise GptOssError(f"message {m!r}: each tool call needs a \"name\" and \"arguments\"")
                name = call["name"]
                recipient = name if "." in name else f"functions.{name}"
                args = call.get("arguments", "{}")
                args = args if isinstance(args, str) else json.dumps(args)
                body.append(Message.from_role_and_content(Role.ASSISTANT, args).with_channel("commentary")
                            .with_recipient(recipient).with_content_type("<|constrain|>json"))
            if m.get("content") or not (m.get("reasoning") or m.get("tool_calls")):
                body.append(Message.from_role_and_content(Role.ASSISTANT, _text(m, "content")).with_channel("final"))
    # The format's rule: chain-of-thought of turns that ended in a final answer is dropped; only the current,
    # unfinished turn (e.g. around its tool calls) keeps it. openai-harmony 0.0.8's own auto-drop removes only
    # the analysis before the *first* final message, which would keep the reasoning of every later turn.
    finals = [i for i, msg in enumerate(body) if msg.channel == "final"]
    if finals:
        body = [msg for i, msg in enumerate(body) if not (msg.channel == "analysis" and i < finals[-1])]
    specs = tool_specs(tools)
    head = [Message.from_role_and_content(Role.SYSTEM, system)]
    if instructions or specs:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if specs:
            dev = dev.with_function_tools([ToolDescription.new(t.name, t.description, parameters=t.parameters)
                                           for t in specs])
        head.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    return head + body


def render(messages: list[dict], *, model_path: Path | None = None, **settings) -> list[int]:
    """The prompt ids for the assistant's next message, ending with <|start|>assistant."""
    from openai_harmony import Conversation, Role

    enc = encoding(model_path)
    conv = Conversation.from_messages(to_harmony(messages, **settings))
    return list(enc.render_conversation_for_completion(conv, Role.ASSISTANT))


# ------------------------------------------------------------------------------------------- parsing

@dataclass
class Piece:
    kind: str  # "reasoning" | "content" | "tool_call"
    text: str = ""
    recipient: str | None = None


class StreamParser:
    """Generated ids -> Pieces, via openai-harmony's StreamableParser. Output that breaks the format
    (an error from the parser, or a header that never reaches <|message|>) is shown as content and flags
    `malformed`; this class never raises."""

    def __init__(self, model_path: Path | None = None):
        from openai_harmony import Role, StreamableParser

        self.enc = encoding(model_path)
        self.parser = StreamableParser(self.enc, Role.ASSISTANT, strict=False)
        self.malformed = False
        self.warnings: list[str] = []
        self.broken = False  # after a parser error: every later token is plain content
        self.pending: list[int] = []  # ids since the last message boundary, for the fallback text
        self.reasoning, self.content = [], []
        self.tool_calls: list[dict] = []
        self._n_messages = 0
        self._hide: list[str] = []  # special-token texts to cut from the coming deltas
        self.stopped = False  # saw <|return|> or <|call|>: the reply is complete

    def _warn(self, why: str) -> None:
        self.malformed = True
        if why not in self.warnings:
            self.warnings.append(why)

    def _plain(self, ids: list[int]) -> str:
        ordinary = [t for t in ids if t < N_ORDINARY]
        return self.enc.decode(ordinary) if ordinary else ""

    def feed(self, token: int) -> list[Piece]:
        if token in STOP_TOKENS:
            self.stopped = True
        if self.broken:
            text = self._plain([token])
            if text:
                self.content.append(text)
            return [Piece("content", text)] if text else []
        self.pending.append(token)
        out = []
        state = None
        try:
            state = self.parser.state_data.get("state") if token >= N_ORDINARY else None
            if token in (END, RETURN, CALL) and state == "Header":
                out += self._unopened()  # the message ends before its header reached <|message|>
            self.parser.process(token)
            delta = self.parser.last_content_delta
            channel, recipient = self.parser.current_channel, self.parser.current_recipient
            n = len(self.parser.messages) if token in (END, RETURN, CALL) else self._n_messages
        except Exception as e:  # the format broke: show what the model says from here on as content
            self._warn(f"the model's output broke the harmony format ({e})")
            self.broken = True
            # inside a message its text was streamed already: only this token is new; else the header is
            text = self._plain([token] if state == "Content" or self._in_content() else self.pending)
            self.pending = []
            if text:
                self.content.append(text)
            return out + ([Piece("content", text)] if text else [])
        if state == "Content" and token not in (END, RETURN, CALL):
            # a special token inside a message: its text reaches a delta (maybe a later one); never show markup
            name = self.enc.decode([token])
            self._warn(f"the model put the special token {name} inside a message")
            self._hide.append(name)
        while delta and self._hide and self._hide[0] in delta:
            delta = delta.replace(self._hide.pop(0), "", 1)
        if delta and not recipient:
            kind = "reasoning" if channel == "analysis" else "content"
            (self.reasoning if kind == "reasoning" else self.content).append(delta)
            out.append(Piece(kind, delta))
        if n > self._n_messages:  # a message just ended
            for msg in self.parser.messages[self._n_messages:n]:
                if msg.recipient and msg.recipient != "assistant":
                    args = "".join(c.text for c in msg.content if hasattr(c, "text"))
                    self.tool_calls.append({"name": msg.recipient.removeprefix("functions."), "arguments": args})
                    out.append(Piece("tool_call", args, msg.recipient))
            self._n_messages = n
            self.pending = []
        return out

    def _in_content(self) -> bool:
        try:
            return self.parser.state_data.get("state") == "Content"
        except Exception:
            return False

    def finish(self, stop: str) -> list[Piece]:
        """At the end of generation: a header that never reached <|message|> becomes content (malformed)."""
        if self.broken or not self.pending or self._in_content():
            return []
        if stop in ("max_tokens", "context", "cancelled") and len(self.pending) <= MAX_HEADER:
            return []  # cut off mid-header: nothing to show, nothing wrong with the format
        return self._unopened()

    def _unopened(self) -> list[Piece]:
        self._warn("the model's output never opened a message (no <|message|>)")
        text = self._plain(self.pending)
        self.pending = []
        if text:
            self.content.append(text)
        return [Piece("content", text)] if text else []
