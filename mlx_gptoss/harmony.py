"""The harmony format: the offline vocabulary, prompt rendering, tools, stream parsing.

openai-harmony (OpenAI's reference library for the format) renders the system, developer, user, tool and
finished assistant messages; this module adapts it and adds what it does not do:
- the vocabulary: openai-harmony reads o200k_base.tiktoken from $TIKTOKEN_ENCODINGS_BASE or downloads it.
  We derive that file from the model snapshot's tokenizer.json (the same byte-level BPE ranks), check its
  sha256 and point TIKTOKEN_ENCODINGS_BASE at our cache folder, so chat works with no network;
- render(): message dicts (see mlx_gptoss.chat) -> prompt token ids, applying harmony's history rules, with
  the messages of an unfinished turn exactly as the model wrote them (openai-harmony would put a call's
  recipient before its channel, so a tool loop's cache would diverge every round);
- Python functions as tools (JSON schema from signature, type hints and docstring);
- StreamParser: generated tokens -> reasoning / preamble / content / tool-call pieces and the ordered parts,
  strictly by the format, never raising (openai-harmony's StreamableParser either raises on bad output or,
  not strict, lets text without a channel through as if it were an answer).
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
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .errors import ConfigError, GptOssError

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


def check_vocabulary(vocab_size: int, where) -> None:
    """Refuse a model whose vocabulary cannot hold the harmony chat tokens: their ids (up to 200012) would
    index past its embedding, which reads out of bounds (garbage, or a segmentation fault)."""
    highest = max(START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
    if vocab_size <= highest:
        raise ConfigError(f"{where}: vocab_size {vocab_size:,} cannot hold the harmony chat tokens (ids up to "
                          f"{highest:,}; gpt-oss has 201,088), so this model cannot chat; its raw forward pass "
                          "(gpt.model) still works")


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

CHANNELS = ("analysis", "commentary", "final")
RECIPIENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_][A-Za-z0-9_\-]*)*")  # functions.get_weather, python
CONTENT_TYPE = re.compile(r"(?:<\|constrain\|>)?[A-Za-z0-9_./+\-]+")  # <|constrain|>json, code


def _text(m: dict, key: str) -> str:
    v = m.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise GptOssError(f"message {m!r}: {key!r} must be a string")
    return v


def call_recipient(call: dict) -> str:
    """The harmony recipient of a tool_calls entry: its "recipient", else functions.NAME (a dotted name as is)."""
    r = call.get("recipient") or call.get("name")
    if not isinstance(r, str) or not r:
        raise GptOssError(f"tool call {call!r}: needs a \"name\" (or a \"recipient\") and \"arguments\"")
    return r if ("." in r or call.get("recipient")) else f"functions.{r}"


def call_name(recipient: str) -> str:
    """The tool name callers see: functions.get_weather -> get_weather; python, browser.search: as is."""
    return recipient.removeprefix("functions.")


def assistant_parts(m: dict) -> list[dict]:
    """An assistant message dict as its ordered harmony messages (the "parts" shape, see mlx_gptoss.chat):
    its "parts" when present (validated), else analysis, tool calls, final from the summary keys."""
    if m.get("parts") is not None:
        if not isinstance(m["parts"], list):
            raise GptOssError(f"message {m!r}: \"parts\" must be a list of harmony messages")
        out = []
        for p in m["parts"]:
            if not isinstance(p, dict) or p.get("channel") not in CHANNELS:
                raise GptOssError(f"message part {p!r}: needs a \"channel\" of {', '.join(CHANNELS)}")
            r, ct = p.get("recipient"), p.get("content_type")
            if r is not None and (not isinstance(r, str) or not RECIPIENT.fullmatch(r)):
                raise GptOssError(f"message part {p!r}: \"recipient\" must look like functions.NAME or python")
            if ct is not None and (not isinstance(ct, str) or not CONTENT_TYPE.fullmatch(ct)):
                raise GptOssError(f"message part {p!r}: \"content_type\" must look like <|constrain|>json")
            out.append({"channel": p["channel"], "content": _text(p, "content"), "recipient": r or None,
                        "content_type": ct or None, "id": p.get("id")})
        return out
    parts = []
    if m.get("reasoning"):
        parts.append({"channel": "analysis", "content": _text(m, "reasoning"), "recipient": None,
                      "content_type": None, "id": None})
    for call in m.get("tool_calls") or []:
        if not isinstance(call, dict):
            raise GptOssError(f"message {m!r}: each tool call needs a \"name\" and \"arguments\"")
        recipient = call_recipient(call)
        if not RECIPIENT.fullmatch(recipient):
            raise GptOssError(f"tool call {call!r}: the name must look like get_weather or functions.get_weather")
        args = call.get("arguments", "{}")
        args = args if isinstance(args, str) else json.dumps(args)
        parts.append({"channel": call.get("channel") or "commentary", "content": args, "recipient": recipient,
                      "content_type": call.get("content_type", "<|constrain|>json"), "id": call.get("id")})
    if m.get("content") or not parts:
        parts.append({"channel": "final", "content": _text(m, "content"), "recipient": None, "content_type": None,
                      "id": None})
    return parts


def assistant_tool_calls(m: dict) -> list[dict]:
    """The tool_calls of an assistant message dict (from its parts when it has them)."""
    out = []
    for p in assistant_parts(m):
        if p["recipient"]:
            call = {"id": p["id"], "name": call_name(p["recipient"]), "arguments": p["content"]}
            if p["recipient"] != f"functions.{call['name']}":
                call["recipient"] = p["recipient"]
            out.append(call)
    return out


def assistant_dict(parts: list[dict]) -> dict:
    """An assistant message dict from its ordered parts (copied), with the summary keys: "reasoning" (the
    analysis texts joined by REASONING_SEPARATOR), "tool_calls", "content" (the final text; also when no call)."""
    m: dict = {"role": "assistant", "parts": [dict(p) for p in parts]}
    reasoning = [p["content"] for p in parts if p["channel"] == "analysis" and not p["recipient"]]
    if reasoning:
        m["reasoning"] = REASONING_SEPARATOR.join(reasoning)
    calls = assistant_tool_calls({"parts": parts})
    if calls:
        m["tool_calls"] = calls
    final = [p["content"] for p in parts if p["channel"] == "final" and not p["recipient"]]
    if final or not calls:
        m["content"] = "".join(final)
    return m


def _head(messages: list[dict], reasoning_effort: str, tools, developer: str | None, date: str | None,
          knowledge_cutoff: str):
    """The system message and the developer message (instructions: developer=, then every system and
    developer message in order; the function tools), as openai-harmony Messages."""
    from openai_harmony import DeveloperContent, Message, ReasoningEffort, Role, SystemContent, ToolDescription

    if reasoning_effort not in EFFORTS:
        raise GptOssError(f"reasoning_effort {reasoning_effort!r}: use one of {', '.join(EFFORTS)}")
    system = (SystemContent.new().with_reasoning_effort(ReasoningEffort[reasoning_effort.upper()])
              .with_conversation_start_date(date or _dt.date.today().isoformat())
              .with_knowledge_cutoff(knowledge_cutoff))
    # A system message is developer instructions (as the official chat template and vLLM do); the model
    # identity line stays the spec's.
    instructions = ([developer] if developer else []) + [
        _text(m, "content") for m in messages if m.get("role") in ("system", "developer") and m.get("content")]
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
    return head


def _turns(messages: list[dict]) -> list[tuple[int, int]]:
    """[(start, end)) of each turn: a user message and what follows it up to the next user message."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    bounds = [0] + users[1:] if users and users[0] > 0 else users or [0]
    return [(a, b) for a, b in zip(bounds, bounds[1:] + [len(messages)])]


def _as_generated(enc, part: dict) -> list[int]:
    """A tool call exactly as gpt-oss writes it: <|start|>assistant<|channel|>commentary to=functions.x
    <|constrain|>json<|message|>...<|call|> (openai-harmony puts the recipient before <|channel|>)."""
    header = part["channel"] + f" to={part['recipient']}" + (f" {part['content_type']}" if part["content_type"] else "")
    return ([START] + enc.encode("assistant") + [CHANNEL] + enc.encode(header, allowed_special={"<|constrain|>"})
            + [MESSAGE] + enc.encode(part["content"], disallowed_special=()) + [CALL])


def part_key(part: dict) -> tuple:
    """What identifies a part's text for render(exact=): channel, recipient, content type, content."""
    return part["channel"], part["recipient"], part["content_type"], part["content"]


def render(messages: list[dict], *, model_path: Path | None = None, reasoning_effort: str = "medium", tools=None,
           developer: str | None = None, date: str | None = None, knowledge_cutoff: str = KNOWLEDGE_CUTOFF,
           exact: Callable[[dict], list[int] | None] | None = None) -> list[int]:
    """The prompt ids for the assistant's next message, ending with <|start|>assistant.

    What the history keeps (harmony's rules, as OpenAI's Responses server applies them):
    - the reasoning (analysis without a recipient) of a turn is dropped once a final answer follows it, and at
      the next user message unless the turn ended with a tool result (a turn cut off by max_tokens, or whose
      call nobody answered, loses it);
    - a turn that has not reached a final answer is rendered exactly as the model wrote it (tool calls with
      the channel before the recipient), so a tool loop's cache never diverges; finished turns render in
      openai-harmony's canonical form. exact(part) may give the ids the model generated for a part (a
      Session keeps them): those are used as they are in an unfinished turn, so even a tokenization that
      encode() would not produce renders back token for token;
    - a tool result is authored by the recipient of the call it answers (found by tool_call_id, else by name)
      on the channel that call used."""
    from openai_harmony import Message, Role

    enc = encoding(model_path)
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise GptOssError(f"message {m!r}: needs a \"role\" of system, developer, user, assistant or tool")
    items: list = _head(messages, reasoning_effort, tools, developer, date, knowledge_cutoff)
    n_head = len(items)
    parts_of = {i: assistant_parts(m) for i, m in enumerate(messages) if m["role"] == "assistant"}
    turns = _turns(messages)
    finals_in = [[k for k, p in enumerate(p for i in range(a, b) for p in parts_of.get(i, []))
                  if p["channel"] == "final" and not p["recipient"]] for a, b in turns]
    calls: list[dict] = []  # every call so far, for matching tool results
    for t, (a, b) in enumerate(turns):
        finals = finals_in[t]
        later_final = any(finals_in[t + 1:])
        # reasoning survives the next user message only when the turn ended with a tool result
        keeps = t == len(turns) - 1 or (messages[b - 1]["role"] == "tool" and not later_final)
        k = -1
        for i in range(a, b):
            m = messages[i]
            if m["role"] == "user":
                items.append(Message.from_role_and_content(Role.USER, _text(m, "content")))
            elif m["role"] == "tool":
                items.append(_tool_message(m, calls))
            elif m["role"] == "assistant":
                for p in parts_of[i]:
                    k += 1
                    if p["channel"] == "analysis" and not p["recipient"] and (
                            not keeps or any(f > k for f in finals)):
                        continue
                    if p["recipient"]:
                        calls.append(p)
                    if not finals:  # unfinished turn: as the model wrote it, token for token
                        ids = exact(p) if exact else None
                        if ids or p["recipient"]:
                            items.append(list(ids) if ids else _as_generated(enc, p))
                            continue
                    msg = Message.from_role_and_content(Role.ASSISTANT, p["content"]).with_channel(p["channel"])
                    if p["recipient"]:
                        msg = msg.with_recipient(p["recipient"])
                    if p["content_type"]:
                        msg = msg.with_content_type(p["content_type"])
                    items.append(msg)
    # the system and developer messages depend on each other (the system message names the tool namespaces)
    from openai_harmony import Conversation

    ids = list(enc.render_conversation(Conversation.from_messages(items[:n_head])))
    for item in items[n_head:]:
        ids += item if isinstance(item, list) else enc.render(item)
    return ids + [START] + enc.encode("assistant")


def _tool_message(m: dict, calls: list[dict]):
    """A tool result as harmony: author = the answered call's recipient, on that call's channel."""
    from openai_harmony import Author, Message, Role

    name, cid = m.get("name"), m.get("tool_call_id")
    if not isinstance(name, str) or not name:
        if not cid:
            raise GptOssError(f"message {m!r}: a tool message needs the \"name\" of the tool it answers "
                              "(or its \"tool_call_id\")")
        name = ""
    call = next((c for c in reversed(calls) if cid and c.get("id") == cid), None)
    if call is None and cid and not name:
        raise GptOssError(f"message {m!r}: no earlier tool call has the id {cid!r}")
    call = call or next((c for c in reversed(calls) if name in (c["recipient"], call_name(c["recipient"]))), None)
    author = call["recipient"] if call else (name if "." in name else f"functions.{name}")
    channel = call["channel"] if call else "commentary"
    return (Message.from_author_and_content(Author.new(Role.TOOL, author), _text(m, "content"))
            .with_channel(channel).with_recipient("assistant"))


# ------------------------------------------------------------------------------------------- parsing

_TOKEN_BYTES: list[bytes] | None = None


def token_bytes() -> list[bytes]:
    """The bytes of every ordinary token (rank order), read once from the verified o200k_base.tiktoken."""
    global _TOKEN_BYTES
    if _TOKEN_BYTES is None:
        encoding()  # makes sure the verified file is in place
        path = Path(os.environ["TIKTOKEN_ENCODINGS_BASE"]) / VOCAB_FILE
        table = [b""] * N_ORDINARY
        for line in path.read_bytes().splitlines():
            tok, rank = line.split()
            table[int(rank)] = base64.b64decode(tok)
        _TOKEN_BYTES = table
    return _TOKEN_BYTES


@dataclass
class Piece:
    kind: str  # "reasoning" | "content" | "preamble" | "tool_call"
    text: str = ""
    recipient: str | None = None
    message: int = 0  # which generated message (0, 1, ...) the text belongs to
    id: str | None = None  # a tool call's id
    channel: str | None = None
    separator: bool = False  # "\n\n" between two analysis messages, not model text


REASONING_SEPARATOR = "\n\n"
MAX_HEADER_TOKENS = 32  # a header longer than this is not one: its text is treated as a message without channel


class StreamParser:
    """Generated ids -> Pieces, strictly by the harmony format; it never raises, and never shows as the
    answer what the model did not put on the final channel.

    A message is `<|start|>assistant HEADER <|message|> TEXT <|end|>|<|return|>|<|call|>` (the first
    `<|start|>assistant` is the prompt's). Its text streams as "reasoning" (analysis), "preamble" (commentary
    without a recipient) or "content" (final); a message with a recipient (`to=functions.x`, `to=python`) is
    one "tool_call" piece when it ends. Output that breaks the format sets `malformed` and a warning:
    - a missing or unknown channel, an invalid recipient, text where a `<|start|>` must come, a header that
      never reaches <|message|>: the text is kept, hidden as "reasoning" (it is how chain-of-thought leaks);
    - a `<|start|>` with a role other than assistant: everything from there on is dropped (`halted`);
    - a special token inside a message, or any token after the reply stopped: dropped.
    Text is decoded incrementally from the token bytes: a multi-byte character split across tokens is never
    a U+FFFD. Every token is counted once in `n_shown` (its text reached a piece), `n_framing` (the markup of
    a well-formed message) or `n_dropped`; `parts` holds the finished messages in order (the message dict
    "parts" shape of mlx_gptoss.chat)."""

    def __init__(self, model_path: Path | None = None, *, trace: bool = False):
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
            return []
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
                self.cut_call = {"recipient": m["recipient"], "arguments": text}
                self._warn(f"the reply was cut off inside a call to {m['recipient']}; its partial arguments "
                           f"were {text!r}")
                self._n += 1
                return out
            self.n_shown += self._tokens
            kind["id"] = "call_" + uuid.uuid4().hex[:24]
            out.append(Piece("tool_call", text, m["recipient"], message=self._n, id=kind["id"],
                             channel=kind["channel"]))
        if text or m["recipient"]:
            self.parts.append(kind)
            whole = self._ids_ok and not partial and self._ids[-1] in (END, RETURN, CALL)
            self.part_ids.append(list(self._ids) if whole else None)
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
