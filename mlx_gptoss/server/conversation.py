"""The conversation model every wire protocol shares: protocol-neutral messages and tools -> a harmony prompt,
and the generated parts -> what the protocols call them.

Each protocol module (responses.py, chat_completions.py, anthropic.py) reads its request into these terms and
writes the results out in its own; none of them talks harmony or the model directly.

In:
- message dicts as mlx_gptoss.chat takes them (user / developer / assistant / tool). An assistant message is
  built with Assistant: its harmony messages in order ("parts": reasoning, preamble or final text, tool
  calls). Reasoning sent back with its sealed blob (sealed.py) renders as the exact tokens generated.
- Tools: function tools (the `functions` namespace), groups of them in a namespace of their own (Responses'
  `namespace` tools: the model calls multi_agent_v1.spawn_agent), and the tools this server cannot offer
  (hosted web search, ...), left out of the prompt with one warning each; never a refusal of the request.
- tool_choice: auto (default); none renders without the tools; required and a named function make the reply
  open with a call (the header is part of the prompt, so the model writes the arguments at once).
- A Turn holds all that plus the reasoning effort; render(turn) makes the prompt and the reply's parser.

Out: a call's recipient as (namespace, name) (call_name), and the sealed blob of a generated analysis message
(sealed_message), so a stateless client can send the reasoning back token for token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import harmony
from ..errors import GptOssError
from . import schemas as S
from . import sealed
from .errors import bad, unsupported

IMAGE_PARTS = ("image_url", "input_image", "input_audio", "input_file", "file", "audio", "image", "document")


@dataclass
class Turn:
    """What one generation needs: the conversation, the tools, how the reply must start, and the exact ids of
    the parts the server generated that came back (sealed reasoning, known calls, a stored reply)."""
    messages: list[dict]
    tools: list[harmony.Tool] = field(default_factory=list)
    effort: str = "medium"
    forced: str = ""  # harmony text the reply is made to start with (tool_choice required / named)
    tool_choice: object = "auto"
    warnings: list[str] = field(default_factory=list)  # what the request asked for and was left out
    exact: dict[tuple, list[int]] = field(default_factory=dict)  # part_key -> ids as generated
    namespaces: dict[str, str] = field(default_factory=dict)  # namespace -> its description
    kinds: dict[str, str] = field(default_factory=dict)  # recipient -> the client's kind of tool, if not function

    def render_settings(self) -> dict:
        return {"reasoning_effort": self.effort, "tools": self.tools or None, "namespaces": self.namespaces,
                "exact": lambda part: self.exact.get(harmony.part_key(part))}


def render(turn: Turn, model_path: Path, developer: str | None, param: str, *, stream_arguments: bool = True):
    """(prompt ids, the StreamParser of the reply) for a turn; a conversation harmony cannot hold is a 400 on
    `param`."""
    try:
        ids = harmony.render(turn.messages, model_path=model_path, developer=developer, **turn.render_settings())
    except GptOssError as e:
        raise bad(str(e), param=param) from None
    except ValueError as e:  # openai-harmony's own refusals, e.g. a tool schema nested past its JSON limit
        raise bad(f"this conversation cannot be written in harmony: {e}", param=param) from None
    parser = harmony.StreamParser(model_path, stream_arguments=stream_arguments)
    if turn.forced:
        forced = harmony.encoding().encode(turn.forced, allowed_special="all")
        for t in forced:
            parser.feed(t)
        ids = ids + forced
    return ids, parser


def text_of(content, where: str) -> str:
    """A message's text: a string, or a list of text parts ({"type": ..., "text"}; joined by newlines)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in IMAGE_PARTS:
            raise unsupported(f"{where}[{i}]: {kind} content is not supported (gpt-oss reads text only)",
                              param=f"{where}[{i}].type")
        p = S.validate(S.TextPart, part, f"{where}[{i}]")
        texts.append(p.refusal if p.type == "refusal" and p.refusal else p.text)
    return "\n".join(texts)


def effort_of(effort: str | None) -> str:
    return "low" if effort == "minimal" else (effort or "medium")


# ------------------------------------------------------------------------------------ assistant turns

class Assistant:
    """Collects one assistant message's parts in order. `exact` (a Turn's) receives the ids of sealed reasoning."""

    def __init__(self, exact: dict | None = None):
        self.parts: list[dict] = []
        self.exact = exact if exact is not None else {}

    def add(self, channel: str, content: str, recipient: str | None = None, content_type: str | None = None,
            id: str | None = None) -> None:
        self.parts.append({"channel": channel, "content": content, "recipient": recipient,
                           "content_type": content_type, "id": id})

    def reasoning(self, text: str, blob: str | None = None) -> None:
        """An analysis message sent back: its exact generated ids when blob unseals to one (the blob's text then
        wins: a client may send it without the text), else the text as plain text."""
        ids = sealed.unseal(blob) if blob else None
        generated = analysis_text(ids) if ids else None
        if generated is not None:
            self.add("analysis", generated)
            self.exact[harmony.part_key(self.parts[-1])] = ids
        elif text:
            self.add("analysis", text)

    def call(self, call_id: str, recipient: str, arguments: str, known: dict | None, where: str = "tool call") -> None:
        """A tool call sent back by a client. If this server generated it (known: call id -> the part's channel,
        recipient, content type, text, ids: responses.CallMemory), it is rendered exactly as generated (e.g. on
        the analysis channel, with the model's own tokenization), which the client's JSON does not say; else as
        a commentary call to the recipient with <|constrain|>json."""
        if not harmony.RECIPIENT.fullmatch(recipient):
            raise bad(f"{where}: {harmony.call_name(recipient)!r} is not a tool name (letters, digits, _ and -, "
                      "optionally dotted)", param=where)
        meta = (known or {}).get(call_id)
        if meta and harmony.call_name(meta["recipient"]) == harmony.call_name(recipient):  # also a bare `python`
            self.add(meta["channel"], arguments, meta["recipient"], meta["content_type"], call_id)
            if meta.get("ids") and meta.get("content") == arguments:  # the very tokens generated
                self.exact[harmony.part_key(self.parts[-1])] = meta["ids"]
        else:
            self.add("commentary", arguments, recipient, "<|constrain|>json", call_id)

    def message(self) -> dict:
        # a text part followed by a call in the same turn is a preamble (commentary), else a final answer
        last_call = max((i for i, p in enumerate(self.parts) if p["recipient"]), default=-1)
        for i, p in enumerate(self.parts):
            if p["channel"] == "final" and i < last_call:
                p["channel"] = "commentary"
        return harmony.assistant_dict(self.parts)


def analysis_text(ids: list[int]) -> str | None:
    """The text of a sealed analysis message (<|start|>assistant<|channel|>analysis<|message|>TEXT<|end|>), or
    None when the ids are not one."""
    if len(ids) < 3 or ids[0] != harmony.START or ids[-1] != harmony.END or harmony.MESSAGE not in ids:
        return None
    enc = harmony.encoding()
    m = ids.index(harmony.MESSAGE)
    try:
        head, text = enc.decode(ids[:m]), enc.decode(ids[m + 1:-1])
    except Exception:  # ids outside the vocabulary: not a message we made
        return None
    return text if "<|channel|>analysis" in head and " to=" not in head else None


def generated_ids(parser) -> dict[tuple, list[int]]:
    """part_key -> ids of each well-formed part of a reply (for render(exact=) in a later request)."""
    return {harmony.part_key(p): ids for p, ids in zip(parser.parts, parser.part_ids) if ids}


def sealed_message(parser, message: int) -> str | None:
    """The sealed blob of generated message `message` (its ids as they stand in a prompt), None if it broke the
    format or was cut off."""
    ids = parser.message_ids.get(message)
    return sealed.seal(ids) if ids else None


def recipient(name: str, namespace: str | None = None) -> str:
    """The harmony recipient of a call named by a client: get_weather -> functions.get_weather; with a namespace
    multi_agent_v1 -> multi_agent_v1.spawn_agent; a dotted name (python, browser.search) as it is."""
    if namespace and namespace != "functions":
        return f"{namespace}.{name}"
    return name if "." in name and not namespace else f"functions.{name}"


def call_name(recipient: str, namespaces) -> tuple[str | None, str]:
    """(namespace, name) of a generated call as a client names it: functions.x -> (None, x); a declared
    namespace's call -> (namespace, name); anything else (python, browser.search) -> (None, as is)."""
    ns, _, name = recipient.partition(".")
    if ns == "functions" and name:
        return None, name
    if ns in namespaces and name:
        return ns, name
    return None, recipient


def call_names(messages: list[dict]) -> dict[str, str]:
    """tool-call id -> the tool's name, over the assistant messages so far."""
    return {c["id"]: c["name"] for m in messages if m.get("role") == "assistant"
            for c in m.get("tool_calls") or [] if c.get("id")}


def tool_message(names: dict[str, str], call_id: str, content: str, where: str) -> dict:
    """A tool result for the call with this id (a 400 on `where` when no earlier call has it)."""
    if call_id not in names:
        raise bad(f"{where}: no earlier function call has the id {call_id!r}; send the call "
                  "(or use previous_response_id) before its output", param=where)
    return {"role": "tool", "name": names[call_id], "tool_call_id": call_id, "content": content}


# ------------------------------------------------------------------------------------------------ tools

class Tools:
    """The tools of a request: harmony Tools, the descriptions of their namespaces, and the warnings for
    those left out."""

    def __init__(self):
        self.declared: list[dict] = []
        self.namespaces: dict[str, str] = {}
        self.warnings: list[str] = []
        self.kinds: dict[str, str] = {}  # recipient -> the client's kind of tool, when it is not a function

    def function(self, name: str, description: str | None, parameters: dict | None,
                 namespace: str = "functions", kind: str | None = None) -> None:
        self.declared.append({"name": name, "description": description or "", "parameters": parameters,
                              "namespace": namespace})
        if kind:
            self.kinds[recipient(name, namespace)] = kind

    def namespace(self, name: str, description: str | None) -> None:
        self.namespaces[name] = description or ""

    def left_out(self, where: str, what: str) -> None:
        self.warnings.append(f"{where}: {what} is not available on this server; it was left out of the prompt")

    def specs(self) -> list[harmony.Tool]:
        return specs(self.declared)

    def turn(self, messages: list[dict], effort: str, exact: dict | None = None) -> Turn:
        return Turn(messages, self.specs(), effort, warnings=list(self.warnings), exact=exact or {},
                    namespaces=dict(self.namespaces), kinds=dict(self.kinds))


def specs(tools: list[dict]) -> list[harmony.Tool]:
    try:
        return harmony.tool_specs(tools)
    except GptOssError as e:
        raise bad(str(e) if str(e).startswith("tools") else f"tools: {e}", param="tools") from None


def apply_tool_choice(turn: Turn, choice) -> Turn:
    """Set turn.tools / turn.forced for tool_choice (the Responses and Chat Completions spellings)."""
    names = [t.name for t in turn.tools if t.namespace == "functions"]
    if choice is None or choice == "auto":
        return turn
    if choice == "none":
        turn.tools = []
    elif choice == "required":
        if not turn.tools:
            raise bad("tool_choice \"required\" needs at least one tool in tools", param="tool_choice")
        # the model picks the tool; a namespace of its own only when every tool is in one
        ns = {t.namespace for t in turn.tools}
        turn.forced = f"<|channel|>commentary to={ns.pop() if len(ns) == 1 else 'functions'}."
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


def arguments_as_generated(known: dict, call_id: str, value: dict) -> str:
    """The argument text of a call sent back as an object (Responses' custom and local_shell calls, Anthropic's
    tool_use input): as the model wrote it when that is the same object, so the turn re-renders exactly."""
    raw = (known.get(call_id) or {}).get("content")
    try:
        if raw is not None and json.loads(raw) == value:
            return raw
    except ValueError:
        pass
    return json.dumps(value, ensure_ascii=False)
