"""Requests -> harmony: Responses input items and Chat Completions messages as the engine's message dicts.

The message dicts are mlx_gptoss.chat's (role user / developer / assistant / tool). An assistant message
carries its harmony messages in order as "parts" ({"channel", "content", "recipient", "content_type", "id"}),
plus the summary keys "reasoning", "tool_calls" ({"id", "name", "arguments"}) and "content" (final text).
- Responses: message (user; system and developer become developer instructions; assistant output_text is
  a final answer, or a preamble (commentary) when a function_call of the same turn follows), function_call
  (a commentary call to functions.NAME, <|constrain|>json), function_call_output (a tool message, its
  name found by call_id), reasoning (analysis; the renderer keeps it only while its turn is unfinished).
  Consecutive assistant items form one assistant message.
- Chat Completions: system/developer -> developer; assistant reasoning_content (or reasoning), content,
  tool_calls; tool messages by tool_call_id.
- tool_choice: auto (default); none renders without the tools; required and a named function force the
  reply to open with a call (the header is part of the prompt, so the model writes the arguments at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

from .. import harmony
from ..errors import GptOssError
from . import schemas as S
from .errors import APIError, bad, from_validation, unsupported

IMAGE_PARTS = ("image_url", "input_image", "input_audio", "input_file", "file", "audio")
OTHER_ITEMS = ("web_search_call", "file_search_call", "computer_call", "computer_call_output", "image_generation_call",
               "code_interpreter_call", "local_shell_call", "local_shell_call_output", "custom_tool_call",
               "custom_tool_call_output", "mcp_call", "mcp_list_tools", "mcp_approval_request",
               "mcp_approval_response", "item_reference")


@dataclass
class Turn:
    """What one generation needs: the conversation, the function tools, how the reply must start."""
    messages: list[dict]
    tools: list[harmony.Tool] = field(default_factory=list)
    effort: str = "medium"
    forced: str = ""  # harmony text the reply is made to start with (tool_choice required / named)
    tool_choice: object = "auto"

    def render_settings(self) -> dict:
        return {"reasoning_effort": self.effort, "tools": self.tools or None}


def validate(model: type[BaseModel], data, where: str):
    if not isinstance(data, dict):
        raise bad(f"{where}: must be a JSON object, got {type(data).__name__}", param=where)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e, where) from None


def text_of(content, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in IMAGE_PARTS:
            raise unsupported(f"{where}[{i}]: {kind} content is not supported (gpt-oss reads text only)",
                              param=f"{where}[{i}].type")
        p = validate(S.TextPart, part, f"{where}[{i}]")
        texts.append(p.refusal if p.type == "refusal" and p.refusal else p.text)
    return "\n".join(texts)


def effort_of(effort: str | None) -> str:
    return "low" if effort == "minimal" else (effort or "medium")


# ------------------------------------------------------------------------------------ assistant turns

class _Assistant:
    """Collects one assistant message's parts in order."""

    def __init__(self):
        self.parts: list[dict] = []

    def add(self, channel: str, content: str, recipient: str | None = None, content_type: str | None = None,
            id: str | None = None) -> None:
        self.parts.append({"channel": channel, "content": content, "recipient": recipient,
                           "content_type": content_type, "id": id})

    def message(self) -> dict:
        # a text part followed by a call in the same turn is a preamble (commentary), else a final answer
        last_call = max((i for i, p in enumerate(self.parts) if p["recipient"]), default=-1)
        for i, p in enumerate(self.parts):
            if p["channel"] == "final" and i < last_call:
                p["channel"] = "commentary"
        return harmony.assistant_dict(self.parts)


def call_names(messages: list[dict]) -> dict[str, str]:
    """tool-call id -> function name, over the assistant messages so far."""
    return {c["id"]: c["name"] for m in messages if m.get("role") == "assistant"
            for c in m.get("tool_calls") or [] if c.get("id")}


def tool_message(names: dict[str, str], call_id: str, content: str, where: str) -> dict:
    if call_id not in names:
        raise bad(f"{where}: no earlier function call has the id {call_id!r}; send the call "
                  "(or use previous_response_id) before its output", param=where)
    return {"role": "tool", "name": names[call_id], "tool_call_id": call_id, "content": content}


# -------------------------------------------------------------------------------------- Responses

def call_part(turn: "_Assistant", call_id: str, name: str, arguments: str, known: dict | None) -> None:
    """A function call sent back by a client. If this server generated it (known: call id -> the part's
    channel, recipient, content type), it is rendered exactly as generated (e.g. on the analysis channel, or
    to a bare `python`), which the client's JSON does not say; else as a commentary call to functions.NAME."""
    meta = (known or {}).get(call_id)
    if meta and harmony.call_name(meta["recipient"]) == name:
        turn.add(meta["channel"], arguments, meta["recipient"], meta["content_type"], call_id)
    else:
        turn.add("commentary", arguments, f"functions.{name}", "<|constrain|>json", call_id)


def response_messages(items: str | list, prior: list[dict] | None = None, known: dict | None = None) -> list[dict]:
    """Responses `input` (after the stored conversation `prior`, from previous_response_id) -> message dicts."""
    msgs = [dict(m) for m in prior or []]
    if isinstance(items, str):
        return msgs + [{"role": "user", "content": items}]
    names = call_names(msgs)
    turn: _Assistant | None = None

    def close():
        nonlocal turn
        if turn is not None and turn.parts:
            m = turn.message()
            msgs.append(m)
            names.update(call_names([m]))
        turn = None

    for i, raw in enumerate(items):
        where = f"input[{i}]"
        kind = raw.get("type", "message" if "role" in raw else None) if isinstance(raw, dict) else None
        if kind in OTHER_ITEMS:
            raise unsupported(f"{where}: {kind} items are not supported (function tools only)", param=f"{where}.type")
        if kind == "message":
            m = validate(S.MessageItem, raw, where)
            text = text_of(m.content, f"{where}.content")
            if m.role == "assistant":
                turn = turn or _Assistant()
                turn.add("final", text)
                continue
            close()
            msgs.append({"role": "user" if m.role == "user" else "developer", "content": text})
        elif kind == "function_call":
            c = validate(S.FunctionCallItem, raw, where)
            turn = turn or _Assistant()
            call_part(turn, c.call_id, c.name, c.arguments, known)
        elif kind == "reasoning":
            r = validate(S.ReasoningItem, raw, where)
            parts = r.content if r.content else r.summary
            text = text_of(parts, f"{where}.content")
            if text:
                turn = turn or _Assistant()
                turn.add("analysis", text)
        elif kind == "function_call_output":
            o = validate(S.FunctionCallOutputItem, raw, where)
            close()
            names.update(call_names(msgs))
            msgs.append(tool_message(names, o.call_id, text_of(o.output, f"{where}.output"), f"{where}.call_id"))
        else:
            raise bad(f"{where}: unknown item type {kind!r}; use message, function_call, function_call_output "
                      "or reasoning", param=f"{where}.type")
    close()
    return msgs


def response_tools(tools: list | None) -> list[harmony.Tool]:
    return function_tools(tools, lambda t, where: validate(S.FunctionTool, t, where))


# ------------------------------------------------------------------------------------ Chat Completions

def chat_messages(raw: list, known: dict | None = None) -> list[dict]:
    msgs: list[dict] = []
    for i, r in enumerate(raw):
        where = f"messages[{i}]"
        m = validate(S.ChatMessage, r, where)
        if m.role in ("system", "developer"):
            msgs.append({"role": "developer", "content": text_of(m.content, f"{where}.content")})
        elif m.role == "user":
            msgs.append({"role": "user", "content": text_of(m.content, f"{where}.content")})
        elif m.role == "assistant":
            turn = _Assistant()
            reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
            if reasoning:
                turn.add("analysis", reasoning)
            text = text_of(m.content, f"{where}.content")
            if text:
                turn.add("commentary" if m.tool_calls else "final", text)
            for c in m.tool_calls or []:
                call_part(turn, c.id, c.function.name, c.function.arguments, known)
            if not turn.parts:
                turn.add("final", "")
            msgs.append(turn.message())
        else:
            if not m.tool_call_id:
                raise bad(f"{where}: a tool message needs the tool_call_id of the call it answers",
                          param=f"{where}.tool_call_id")
            msgs.append(tool_message(call_names(msgs), m.tool_call_id, text_of(m.content, f"{where}.content"),
                                     f"{where}.tool_call_id"))
    return msgs


def chat_tools(tools: list | None) -> list[harmony.Tool]:
    return function_tools(tools, lambda t, where: validate(S.ChatTool, t, where).function)


def function_tools(tools: list | None, function) -> list[harmony.Tool]:
    """Function tools of either API (function(raw, where) -> its validated name/description/parameters)."""
    out = []
    for i, t in enumerate(tools or []):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise unsupported(f"tools[{i}]: {kind!r} tools are not supported; only function tools are",
                              param=f"tools[{i}].type")
        f = function(t, f"tools[{i}]")
        out.append({"name": f.name, "description": f.description or "", "parameters": f.parameters})
    return specs(out)


def specs(tools: list[dict]) -> list[harmony.Tool]:
    try:
        return harmony.tool_specs(tools)
    except GptOssError as e:
        raise bad(f"tools: {e}", param="tools") from None


# ------------------------------------------------------------------------------------------ tool_choice

def apply_tool_choice(turn: Turn, choice) -> Turn:
    """Set turn.tools / turn.forced for tool_choice (Responses and Chat Completions spellings)."""
    names = [t.name for t in turn.tools]
    if choice is None or choice == "auto":
        return turn
    if choice == "none":
        turn.tools = []
    elif choice == "required":
        if not names:
            raise bad("tool_choice \"required\" needs at least one tool in tools", param="tool_choice")
        turn.forced = "<|channel|>commentary to=functions."
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        if name not in names:
            raise bad(f"tool_choice names the function {name!r}, which is not in tools "
                      f"({', '.join(names) or 'none given'})", param="tool_choice")
        turn.forced = f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"
    elif isinstance(choice, dict) and choice.get("type") in ("allowed_tools", "custom", "mcp"):
        raise unsupported(f"tool_choice of type {choice['type']!r} is not supported; use auto, none, required "
                          "or a function", param="tool_choice")
    else:
        raise bad(f"tool_choice {choice!r}: use \"auto\", \"none\", \"required\" or "
                  "{\"type\": \"function\", \"name\": ...}", param="tool_choice")
    turn.tool_choice = choice
    return turn


def refuse(flag, message: str, param: str) -> None:
    """422 when a request asks for something this server does not do."""
    if flag:
        raise unsupported(message, param=param)


def check_model(asked: str | None, served: set[str], shown: str) -> None:
    if asked is not None and asked not in served:
        raise APIError(404, f"The model {asked!r} does not exist here; this server runs {shown!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")
