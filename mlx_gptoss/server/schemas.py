"""The request bodies of the three endpoints, as pydantic models (strict types, unknown fields refused).

Fields OpenAI defines that change nothing here (metadata, user, parallel_tool_calls, include, ...) are
accepted; fields that would change the answer and are not implemented are refused with 422 by the endpoint
(see inputs.refuse_unsupported), so no request is silently answered differently from what it asked.
Input items, messages and tools are validated one by one in mlx_gptoss.server.inputs (by their "type"/"role").
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


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
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None


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


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[dict]]
    id: str | None = None
    status: str | None = None


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
