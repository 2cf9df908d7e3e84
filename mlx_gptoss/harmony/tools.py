"""Function tools: a Tool from a Python callable (JSON schema from its signature, type hints and docstring)
or from a dict."""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Callable, Iterable

from ..errors import GptOssError

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")  # a tool's or a namespace's name


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
    """A function tool: name, description, JSON-schema parameters, the Python callable if any, and the harmony
    namespace it is declared in (the model calls it as NAMESPACE.NAME: functions.get_weather)."""

    name: str
    description: str
    parameters: dict
    fn: Callable | None = None
    namespace: str = "functions"

    @property
    def recipient(self) -> str:
        return f"{self.namespace}.{self.name}"

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
    {"name", "description", "parameters", "namespace"} (also accepted: OpenAI's {"type": "function", "function":
    {...}}). Names are letters, digits, _ and - (MCP tools such as resolve-library-id)."""
    if isinstance(tool, Tool):
        return tool
    if isinstance(tool, dict):
        d = tool.get("function", tool) if tool.get("type") == "function" else tool
        name = d.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise GptOssError(f"tool {tool!r}: needs a \"name\" made of letters, digits, _ and -")
        namespace = d.get("namespace") or "functions"
        if not isinstance(namespace, str) or not NAME.fullmatch(namespace):
            raise GptOssError(f"tool {name!r}: the namespace {namespace!r} must be made of letters, digits, _ and -")
        params = d.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise GptOssError(f"tool {name!r}: \"parameters\" must be a JSON schema object")
        return Tool(name, str(d.get("description", "")), params, d.get("fn"), namespace)
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
    names = [t.recipient for t in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise GptOssError(f"tools: the name {sorted(dup)[0].removeprefix('functions.')!r} is used twice")
    return specs

