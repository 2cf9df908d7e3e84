"""Rendering: message dicts (see mlx_gptoss.chat) -> prompt token ids, applying harmony's history rules.

openai-harmony renders the system, developer, user, tool and finished assistant messages; the messages of
an unfinished turn are rendered exactly as the model wrote them (openai-harmony would put a call's recipient
before its channel, so a tool loop's cache would diverge every round)."""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Callable

from ..errors import GptOssError
from .tools import tool_specs
from .vocabulary import CALL, CHANNEL, MESSAGE, START, encoding

EFFORTS = ("low", "medium", "high")
KNOWLEDGE_CUTOFF = "2024-06"

CHANNELS = ("analysis", "commentary", "final")
RECIPIENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_][A-Za-z0-9_\-]*)*")  # functions.get_weather, python
CONTENT_TYPE = re.compile(r"(?:<\|constrain\|>)?[A-Za-z0-9_./+\-]+")  # <|constrain|>json, code

REASONING_SEPARATOR = "\n\n"  # between two analysis messages shown as one reasoning text


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
          knowledge_cutoff: str, namespaces: dict[str, str]):
    """The system message and the developer message (instructions: developer=, then every system and
    developer message in order; the tools, one harmony namespace each), as openai-harmony Messages."""
    from openai_harmony import (DeveloperContent, Message, ReasoningEffort, Role, SystemContent, ToolDescription,
                                ToolNamespaceConfig)

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
        for ns in dict.fromkeys(t.namespace for t in specs):  # each namespace once, in the order given
            described = [ToolDescription.new(t.name, t.description, parameters=t.parameters)
                         for t in specs if t.namespace == ns]
            dev = (dev.with_function_tools(described) if ns == "functions" else
                   dev.with_tools(ToolNamespaceConfig(name=ns, description=namespaces.get(ns), tools=described)))
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
           exact: Callable[[dict], list[int] | None] | None = None,
           namespaces: dict[str, str] | None = None) -> list[int]:
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
      on the channel that call used.
    Tools declared in another namespace than `functions` (Tool.namespace) get a namespace of their own in the
    developer message, described by namespaces[name]."""
    from openai_harmony import Message, Role

    enc = encoding(model_path)
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise GptOssError(f"message {m!r}: needs a \"role\" of system, developer, user, assistant or tool")
    items: list = _head(messages, reasoning_effort, tools, developer, date, knowledge_cutoff, namespaces or {})
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


