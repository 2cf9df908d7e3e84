"""The Responses API: its request (input items, tools) read into the shared conversation model, and its
output: items, the response object, its streaming events, and the response store.

In: message (user; system and developer become developer instructions; assistant output_text is a final answer,
or a preamble (commentary) when a call of the same turn follows), function_call (namespace + name: a
namespace tool's function), function_call_output, reasoning (plain text, or its encrypted_content: the sealed
exact tokens), custom_tool_call / local_shell_call and their outputs. Consecutive assistant items form one
assistant message. Items this server never produces (web_search_call, ...) are skipped with a warning.
Tools: function; namespace (its functions in a harmony namespace of their own); custom (freeform, e.g.
apply_patch: offered as a function taking {"input": TEXT}, answered as a custom_tool_call); local_shell
(offered as a function taking the argv, answered as a local_shell_call); hosted tools (web_search, file_search,
...) are left out of the prompt with a `warnings` entry.

Out, in the order the model produced them: reasoning (analysis; content [{type: reasoning_text}], summary
always empty: harmony has none; encrypted_content with include ["reasoning.encrypted_content"]), message
(final answer or a preamble; content [{type: output_text}]), function_call (id fc_..., call_id call_...,
name, arguments, namespace when it has one; also for calls the model put on the analysis channel),
custom_tool_call, local_shell_call. Streaming follows OpenAI's reference server: response.created,
response.in_progress, then per item output_item.added, content_part.added, *_text.delta..., *_text.done,
content_part.done, output_item.done (function calls: output_item.added, function_call_arguments.delta as
the model writes them, function_call_arguments.done, output_item.done), last response.completed
(response.incomplete when cut by max_output_tokens or the context, response.failed when the reply was cut
by a cancel or the shutdown), each with an increasing sequence_number.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from typing import Callable

from . import conversation
from . import schemas as S
from .conversation import Assistant, Turn, arguments_as_generated, text_of
from .errors import bad

SKIPPED_ITEMS = ("web_search_call", "file_search_call", "computer_call", "computer_call_output",
                 "image_generation_call", "code_interpreter_call", "mcp_call", "mcp_list_tools",
                 "mcp_approval_request", "mcp_approval_response", "tool_search_call", "tool_search_output")
OUTPUTS = ("function_call_output", "custom_tool_call_output", "local_shell_call_output")
CUSTOM_PARAMETERS = {"type": "object", "properties": {"input": {
    "type": "string", "description": "The input, as plain text in the format the description gives."}},
    "required": ["input"]}
LOCAL_SHELL = "local_shell"
ITEM_PREFIX = {"function_call": "fc", "custom_tool_call": "ctc", "local_shell_call": "lsh"}
LOCAL_SHELL_PARAMETERS = {"type": "object", "properties": {
    "command": {"type": "array", "items": {"type": "string"}, "description": "The program and its arguments."},
    "workdir": {"type": "string", "description": "The working directory."},
    "timeout_ms": {"type": "integer", "description": "The most milliseconds the command may run."}},
    "required": ["command"]}


# ------------------------------------------------------------------------------------------- requests

def read_turn(req, prior: list[dict], known: dict, prior_exact: dict | None = None) -> Turn:
    """A Responses request (after the stored conversation `prior`, from previous_response_id, whose generated
    parts' ids are prior_exact) as a Turn."""
    turn = read_tools(req.tools).turn([], conversation.effort_of(req.reasoning.effort if req.reasoning else None),
                                      dict(prior_exact or {}))
    turn.messages = read_input(req.input, prior, known, turn)
    return turn


def _custom(out: conversation.Tools, t: S.CustomTool, namespace: str = "functions") -> None:
    """A freeform tool as a function taking {"input": TEXT}; its grammar goes into the description."""
    fmt = t.format or {}
    how = "Call it with {\"input\": TEXT}, TEXT being the whole input as plain text"
    if fmt.get("type") == "grammar" and fmt.get("definition"):
        how += f", which must follow this {fmt.get('syntax') or ''} grammar:\n{fmt['definition']}"
    out.function(t.name, f"{t.description or ''}\n\n{how}".strip(), CUSTOM_PARAMETERS, namespace, "custom")


def read_tools(raw: list | None) -> conversation.Tools:
    out = conversation.Tools()
    for i, t in enumerate(raw or []):
        where = f"tools[{i}]"
        kind = t.get("type") if isinstance(t, dict) else None
        if kind == "function":
            f = S.validate(S.FunctionTool, t, where)
            out.function(f.name, f.description, f.parameters)
        elif kind == "namespace":
            ns = S.validate(S.NamespaceTool, t, where)
            if ns.name != "functions":
                out.namespace(ns.name, ns.description)
            for j, member in enumerate(ns.tools):
                w, mk = f"{where}.tools[{j}]", member.get("type") if isinstance(member, dict) else None
                if mk == "function":
                    f = S.validate(S.FunctionTool, member, w)
                    out.function(f.name, f.description, f.parameters, ns.name)
                elif mk == "custom":
                    _custom(out, S.validate(S.CustomTool, member, w), ns.name)
                else:
                    out.left_out(w, f"the {mk!r} tool")
        elif kind == "custom":
            _custom(out, S.validate(S.CustomTool, t, where))
        elif kind == LOCAL_SHELL:
            out.function(LOCAL_SHELL, "Runs a command on the user's machine and returns its output.",
                         LOCAL_SHELL_PARAMETERS, kind=LOCAL_SHELL)
        elif isinstance(kind, str) and kind:
            out.left_out(where, f"the hosted tool {kind!r}")  # web_search, file_search, ...: run by OpenAI
        else:
            raise bad(f"{where}.type: required, a string (function, namespace, custom, local_shell, ...)",
                      param=f"{where}.type")
    return out


def read_input(items: str | list, prior: list[dict], known: dict, turn: Turn) -> list[dict]:
    msgs = [dict(m) for m in prior or []]
    if isinstance(items, str):
        return msgs + [{"role": "user", "content": items}]
    names = conversation.call_names(msgs)
    reply: Assistant | None = None

    def assistant() -> Assistant:
        nonlocal reply
        reply = reply or Assistant(turn.exact)
        return reply

    def close():
        nonlocal reply
        if reply is not None and reply.parts:
            m = reply.message()
            msgs.append(m)
            names.update(conversation.call_names([m]))
        reply = None

    for i, raw in enumerate(items):
        where = f"input[{i}]"
        kind = raw.get("type", "message" if "role" in raw else None) if isinstance(raw, dict) else None
        if kind in SKIPPED_ITEMS:
            turn.warnings.append(f"{where}: {kind} items are not produced by this server; it was left out")
        elif kind == "message":
            m = S.validate(S.MessageItem, raw, where)
            text = text_of(m.content, f"{where}.content")
            if m.role == "assistant":
                assistant().add("final", text)
                continue
            close()
            msgs.append({"role": "user" if m.role == "user" else "developer", "content": text})
        elif kind == "function_call":
            c = S.validate(S.FunctionCallItem, raw, where)
            assistant().call(c.call_id, conversation.recipient(c.name, c.namespace), c.arguments, known,
                             f"{where}.name")
        elif kind == "custom_tool_call":
            c = S.validate(S.CustomToolCallItem, raw, where)
            assistant().call(c.call_id, conversation.recipient(c.name, c.namespace),
                             arguments_as_generated(known, c.call_id, {"input": c.input}), known, f"{where}.name")
        elif kind == "local_shell_call":
            c = S.validate(S.LocalShellCallItem, raw, where)
            cid = c.call_id or c.id
            if not cid:
                raise bad(f"{where}.call_id: required", param=f"{where}.call_id")
            args = {"command": c.action.command, **({"workdir": c.action.working_directory}
                                                    if c.action.working_directory else {}),
                    **({"timeout_ms": c.action.timeout_ms} if c.action.timeout_ms is not None else {})}
            assistant().call(cid, f"functions.{LOCAL_SHELL}", arguments_as_generated(known, cid, args), known)
        elif kind == "reasoning":
            r = S.validate(S.ReasoningItem, raw, where)
            assistant().reasoning(text_of(r.content if r.content else r.summary, f"{where}.content"),
                                  r.encrypted_content)
        elif kind in OUTPUTS:
            o = S.validate(S.FunctionCallOutputItem, raw, where)
            close()
            names.update(conversation.call_names(msgs))
            msgs.append(conversation.tool_message(names, o.call_id, text_of(o.output, f"{where}.output"),
                                                  f"{where}.call_id"))
        elif kind == "item_reference":
            raise bad(f"{where}: item_reference is not supported; send the item itself (or use "
                      "previous_response_id)", param=f"{where}.type")
        else:
            raise bad(f"{where}: unknown item type {kind!r}; use message, function_call, function_call_output "
                      "or reasoning", param=f"{where}.type")
    close()
    return msgs


# -------------------------------------------------------------------------------------------- output

def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def usage(stats, reasoning_tokens: int) -> dict:
    """Usage as the openai client requires it; cache_write_tokens are the tokens prefilled now, which stay in
    the slot's cache for the next request."""
    return {"input_tokens": stats.prompt_tokens,
            "input_tokens_details": {"cached_tokens": stats.cached_tokens,
                                     "cache_write_tokens": stats.prefilled_tokens},
            "output_tokens": stats.generated_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


def call_item(turn: Turn, recipient: str, arguments: str) -> dict:
    """A generated call as the client's kind of item: function_call (with the namespace of a namespace tool),
    custom_tool_call or local_shell_call (when the arguments have the shape those were offered with)."""
    ns, name = conversation.call_name(recipient, turn.namespaces)
    kind = turn.kinds.get(recipient)
    try:
        args = json.loads(arguments) if kind else None
    except ValueError:
        args = None
    if kind == "custom" and isinstance(args, dict) and isinstance(args.get("input"), str):
        return {"type": "custom_tool_call", "name": name, "input": args["input"], **({"namespace": ns} if ns else {})}
    if kind == LOCAL_SHELL and isinstance(args, dict) and isinstance(args.get("command"), list) and all(
            isinstance(a, str) for a in args["command"]):
        return {"type": "local_shell_call", "action": {
            "type": "exec", "command": args["command"], "timeout_ms": args.get("timeout_ms"),
            "working_directory": args.get("workdir"), "env": {}, "user": None}}
    return {"type": "function_call", "name": name, "arguments": arguments, **({"namespace": ns} if ns else {})}


class ResponseBuilder:
    """Turns the engine's Events into output items, and (for streaming) into the events that announce them.
    seal(message) gives a reasoning item's encrypted_content (None: not asked for)."""

    def __init__(self, response: dict, turn: Turn, seal: Callable[[int], str | None] | None = None):
        self.response = response  # the response object's settings (id, model, tools, ...), status in_progress
        self.turn, self.seal = turn, seal
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
        return {**self.response, "output": [self._public(i) for i in self.output]}

    # ---- events in
    def feed(self, ev) -> list[dict]:
        if getattr(ev, "separator", False):  # the engine's "\n\n" between two analysis messages: items split
            return []
        kind = visible_kind(ev)
        if kind == "tool_call_delta":
            return self._arguments(ev)
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
            if self.seal:
                item["encrypted_content"] = None
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

    def close(self, status: str = "completed") -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        idx = self.output.index(item)
        text = "".join(item.pop("_text"))
        kind = item.pop("_kind")
        message = item.pop("_message")
        item["status"] = status
        if kind == "call":
            item["arguments"] = text
            return [self.event("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                               arguments=text, name=item["name"]),
                    self.event("response.output_item.done", output_index=idx, item=dict(item))]
        if kind == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            if self.seal:
                item["encrypted_content"] = self.seal(message)
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

    def _arguments(self, ev) -> list[dict]:
        """A piece of a function call's arguments as the model writes it (other kinds of call wait for the
        whole call: their items hold the arguments parsed)."""
        if call_item(self.turn, ev.recipient, "{}")["type"] != "function_call":
            return []
        out = []
        if self.open is None or self.open.get("call_id") != ev.id:
            out += self.close()
            item = {"id": new_id("fc"), "status": "in_progress", "call_id": ev.id,
                    **call_item(self.turn, ev.recipient, "")}
            self.output.append(item)
            out.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
            item.update(_kind="call", _text=[], _message=getattr(ev, "message", 0))
            self.open = item
        self.open["_text"].append(ev.text)
        out.append(self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                              output_index=len(self.output) - 1, delta=ev.text))
        return out

    def _call(self, ev) -> list[dict]:
        args = ev.arguments or ""
        if self.open is not None and self.open.get("call_id") == ev.id and ev.id:  # streamed: now complete
            self.open["_text"] = [args]
            return self.close()
        out = self.close()
        call_id = getattr(ev, "id", None) or new_id("call")
        fields = call_item(self.turn, ev.recipient, args)
        item = {"id": new_id(ITEM_PREFIX[fields["type"]]), "status": "in_progress", "call_id": call_id, **fields}
        self.output.append(item)
        idx = len(self.output) - 1
        out.append(self.event("response.output_item.added", output_index=idx,
                              item={**item, **({"arguments": ""} if "arguments" in item else {})}))
        if item["type"] == "function_call":
            if args:
                out.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=idx, delta=args))
            out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                                  arguments=args, name=item["name"]))
        item["status"] = "completed"
        out.append(self.event("response.output_item.done", output_index=idx, item=dict(item)))
        return out

    @staticmethod
    def _public(item: dict) -> dict:
        return {k: v for k, v in item.items() if not k.startswith("_")}

    # ---- the end
    def finish(self, stats) -> list[dict]:
        """The last events: a call cut off while its arguments streamed ends "incomplete"; the reply ends
        completed, incomplete (max_output_tokens, the context) or failed (cancelled, the server shutting down)."""
        out = self.close("incomplete" if self.open is not None and self.open["_kind"] == "call" else "completed")
        r = self.response
        r["usage"] = usage(stats, self.reasoning_tokens)
        warnings = list(self.turn.warnings) + (list(stats.warnings) if stats.malformed else [])
        if warnings:
            r["warnings"] = warnings
        failed = cut_reason(stats.stop_reason)
        if failed:
            r.update(status="failed", error={"code": failed[0], "message": failed[1]})
            kind = "response.failed"
        elif stats.stop_reason in ("max_tokens", "context"):
            r.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
            kind = "response.incomplete"
        else:
            r["status"] = "completed"
            kind = "response.completed"
        out.append(self.event(kind, response=self.snapshot()))
        return out


def cut_reason(stop_reason: str) -> tuple[str, str] | None:
    """(code, message) when a reply was cut before its end by the server, not the model: every protocol
    says so instead of calling it finished."""
    if stop_reason == "shutdown":
        return "server_shutting_down", "the server is shutting down; the reply was cut off, retry"
    if stop_reason == "cancelled":
        return "cancelled", "the reply was cancelled before it was finished (client gone, or the server stopping)"
    if stop_reason == "timeout":
        return "timeout", "the reply was cancelled: the client did not read the stream for too long"
    return None


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
            "reasoning": {"effort": effort, "summary": req.reasoning.summary if req.reasoning else None},
            "store": req.store,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": req.tool_choice or "auto", "tools": tools,
            "top_p": req.top_p if req.top_p is not None else 1.0, "truncation": "disabled", "usage": None,
            "user": req.user, "metadata": req.metadata or {}}


class CallMemory:
    """The calls this server generated, by call id: their channel, recipient, content type, argument text and
    generated ids (the newest `size`), so a call a client sends back renders token for token as the model wrote
    it (also one sent back as an object, e.g. a custom tool's input: the text is used when it parses to the
    same object)."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.calls: OrderedDict[str, dict] = OrderedDict()

    def remember(self, parts, part_ids=None) -> None:
        """The calls among a reply's parts; part_ids (the parser's) adds each call's generated ids."""
        for p, ids in zip(parts or [], part_ids or [None] * len(parts or [])):
            if p.get("recipient") and p.get("id"):
                self.calls[p["id"]] = {k: p.get(k) for k in ("channel", "recipient", "content_type", "content")}
                self.calls[p["id"]]["ids"] = ids
        while len(self.calls) > self.size:
            self.calls.popitem(last=False)


class Store:
    """Stored responses (store=true) for previous_response_id and GET /v1/responses/{id}: the newest `size`
    and at most `max_bytes` of them (their JSON size), each with the whole conversation it ended (messages)
    and the ids of its generated parts (exact: part_key -> ids), so a follow-up extends it token for token.
    A response bigger than the whole budget is not stored."""

    def __init__(self, size: int = 256, max_bytes: int = 256 << 20):
        self.size, self.max_bytes = size, max_bytes
        self.items: OrderedDict[str, tuple[dict, list[dict], dict, int]] = OrderedDict()
        self.bytes = 0

    def put(self, response: dict, messages: list[dict], exact: dict | None = None) -> None:
        exact = exact or {}
        n = len(json.dumps(response)) + len(json.dumps(messages)) + 8 * sum(map(len, exact.values()))
        if n > self.max_bytes:
            return
        if response["id"] in self.items:
            self.bytes -= self.items.pop(response["id"])[-1]
        self.items[response["id"]] = (response, messages, exact, n)
        self.bytes += n
        while len(self.items) > self.size or self.bytes > self.max_bytes:
            self.bytes -= self.items.popitem(last=False)[1][-1]

    def messages(self, rid: str) -> list[dict]:
        if rid not in self.items:
            raise bad(f"previous_response_id {rid!r}: no stored response has this id (responses are kept in "
                      f"memory, the newest {self.size} up to {self.max_bytes >> 20} MiB, only with store=true)",
                      param="previous_response_id",
                      code="previous_response_not_found")
        return self.items[rid][1]

    def exact(self, rid: str) -> dict:
        return self.items[rid][2] if rid in self.items else {}

    def get(self, rid: str) -> dict | None:
        item = self.items.get(rid)
        return item[0] if item else None
