"""The request bodies of the endpoints, as pydantic models: strict types, unknown fields ignored.

Real clients send fields of their own or of newer API versions (Codex: client_metadata; Claude Code:
context_management): an unknown field is accepted and ignored, its name logged once at debug level, as vLLM
and llama.cpp do. A known field of the wrong type or out of range is a 400. Fields that would change the
answer and are not implemented (n > 1, logprobs, ...) are refused with 422 by the endpoint (errors.refuse), so
no request is silently answered differently from what it asked. Input items, messages and tools are validated
one by one by the protocol modules (by their "type"/"role"), with validate().
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import bad, from_validation

log = logging.getLogger("gptoss_mac.server")
_unknown_seen: set[tuple[str, str]] = set()

# OpenAI's bounds on metadata: 16 pairs, keys up to 64 characters, string values up to 512
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512


class Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _note_unknown(cls, data):
        if isinstance(data, dict):
            known = {k for name, f in cls.model_fields.items() for k in (name, f.alias) if k}
            for name in data:
                if name not in known and (cls.__name__, name) not in _unknown_seen:
                    _unknown_seen.add((cls.__name__, name))
                    log.debug("ignoring the unknown field %r of %s (first time seen)", name, cls.__name__)
        return data


def validate(model: type[BaseModel], data, where: str):
    """data as `model`, or a 400 naming the field at fault under `where` (e.g. input[3].call_id)."""
    if not isinstance(data, dict):
        raise bad(f"{where}: must be a JSON object, got {type(data).__name__}", param=where)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e, where) from None


Number = Union[int, float]
Effort = Literal["minimal", "low", "medium", "high"]  # minimal (OpenAI's lowest) runs as low


class Reasoning(Strict):
    effort: Effort | None = None
    summary: str | None = None  # accepted: harmony has no summaries; the reasoning text is returned instead
    generate_summary: str | None = None


class TextFormat(Strict):
    type: str = "text"
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: str | None = None


class StreamOptions(Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class Sampling(Strict):
    model: str | None = None
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, v):
        if v is not None:
            if len(v) > METADATA_PAIRS:
                raise ValueError(f"at most {METADATA_PAIRS} key-value pairs ({len(v)} given)")
            for k, value in v.items():
                if len(k) > METADATA_KEY:
                    raise ValueError(f"the key {k[:METADATA_KEY]!r}... is longer than {METADATA_KEY} characters")
                if len(value) > METADATA_VALUE:
                    raise ValueError(f"the value of {k!r} is longer than {METADATA_VALUE} characters")
        return v


class ResponsesRequest(Sampling):
    input: Union[str, list[dict]]
    instructions: str | None = None
    tools: list[dict] | None = None
    tool_choice: Union[str, dict] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    store: bool = True
    previous_response_id: str | None = None
    include: list[str] | None = None
    text: TextConfig | None = None
    truncation: str | None = None
    background: bool | None = None
    top_logprobs: int | None = None
    conversation: Any = None
    prompt: Any = None


class ChatRequest(Sampling):
    messages: list[dict] = Field(min_length=1)
    tools: list[dict] | None = None
    tool_choice: Union[str, dict] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Effort | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stop: Union[str, list[str]] | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    modalities: list[str] | None = None
    store: bool | None = None
    functions: Any = None
    function_call: Any = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[int], list[str]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stop: Union[str, list[str]] | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None


# ----------------------------------------------------------------------- items, messages, tools

class ChatFunction(Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class FunctionTool(ChatFunction):
    """A Responses function tool: the same fields flat, beside its type."""
    type: Literal["function"]


class ChatTool(Strict):
    type: Literal["function"]
    function: ChatFunction


class TextPart(Strict):
    type: Literal["input_text", "output_text", "text", "reasoning_text", "summary_text", "refusal"]
    text: str = ""
    refusal: str | None = None
    annotations: list | None = None
    logprobs: list | None = None


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[dict]]
    id: str | None = None
    status: str | None = None


class CallItem(Strict):
    call_id: str
    name: str
    namespace: str | None = None  # a call to a namespace tool's function (Codex: multi_agent_v1)
    id: str | None = None
    status: str | None = None


class FunctionCallItem(CallItem):
    type: Literal["function_call"]
    arguments: str


class CustomToolCallItem(CallItem):
    type: Literal["custom_tool_call"]
    input: str


class LocalShellAction(Strict):
    type: Literal["exec"] = "exec"
    command: list[str]
    timeout_ms: int | None = None
    working_directory: str | None = None
    env: dict[str, str] | None = None
    user: str | None = None


class LocalShellCallItem(Strict):
    type: Literal["local_shell_call"]
    call_id: str | None = None
    id: str | None = None
    action: LocalShellAction
    status: str | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output", "custom_tool_call_output", "local_shell_call_output"]
    call_id: str
    output: Union[str, list[dict]]
    id: str | None = None
    status: str | None = None


class NamespaceTool(Strict):
    """A group of tools in a namespace of their own (Codex's multi_agent_v1); its members are function tools."""
    type: Literal["namespace"]
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    description: str | None = None
    tools: list[dict]


class CustomTool(Strict):
    """A freeform tool (Codex's apply_patch): the model writes its input as plain text, in a format
    (a grammar) the description states."""
    type: Literal["custom"]
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    description: str | None = None
    format: dict | None = None


class ReasoningItem(Strict):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict] = []
    content: list[dict] | None = None
    encrypted_content: str | None = None
    status: str | None = None


class ItemReference(Strict):
    type: Literal["item_reference"]
    id: str


class ToolCallFunction(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction
    index: int | None = None


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: str | None = None
    audio: Any = None
    function_call: Any = None
