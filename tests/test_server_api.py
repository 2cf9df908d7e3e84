"""The server through the official openai client and raw SSE: both APIs, streaming and not, tools,
previous_response_id, reasoning fields, event order and sequence numbers, raw completions, models."""

from __future__ import annotations

import json

import httpx
import pytest

from scripted_checkpoint import forget_models, get_weather
from server_fixtures import CHAT_WEATHER_TOOL, WEATHER_TOOL, client, running, sse_events


@pytest.fixture(scope="module")
def reason():
    with running("reason") as s:
        yield s


@pytest.fixture(scope="module")
def tool():
    with running("tool") as s:
        yield s
    forget_models()


# ------------------------------------------------------------------------------------------- Responses

def test_responses_reasoning_and_answer(reason):
    r = client(reason).responses.create(model="gpt-oss-20b", input="Say hi", temperature=0)
    assert r.status == "completed" and r.output_text == "Hello there!"
    kinds = [o.type for o in r.output]
    assert kinds == ["reasoning", "message"]
    assert r.output[0].content[0].type == "reasoning_text" and r.output[0].content[0].text == "The user greets."
    assert "greets" not in r.output_text  # reasoning never in the answer
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_responses_stream_with_the_client(reason):
    c = client(reason)
    with c.responses.stream(model="gpt-oss-20b", input="Say hi", temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == "Hello there!"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == "Hello there!" and reasoning == "The user greets."
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_raw_sse_event_order(reason):
    body = {"model": "gpt-oss-20b", "input": "Say hi", "stream": True, "temperature": 0}
    with httpx.stream("POST", reason.url + "/v1/responses", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.iter_lines())
    names = [n for n, _ in events]
    data = [json.loads(d) for _, d in events]
    assert all(n == d["type"] for n, d in zip(names, data))
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    collapsed = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    assert collapsed == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert data[0]["response"]["status"] == "in_progress" and data[-1]["response"]["status"] == "completed"
    items = data[-1]["response"]["output"]
    assert [i["type"] for i in items] == ["reasoning", "message"]
    added = [d for d in data if d["type"] == "response.output_item.added"]
    assert [a["output_index"] for a in added] == [0, 1]
    done_text = next(d for d in data if d["type"] == "response.output_text.done")
    assert done_text["text"] == "Hello there!" and done_text["item_id"] == items[1]["id"]


def test_responses_function_call_then_previous_response_id(tool):
    c = client(tool)
    r = c.responses.create(model="gpt-oss-20b", input="What's the weather in Paris?", tools=[WEATHER_TOOL],
                           temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert [o.type for o in r.output] == ["reasoning", "function_call"] and r.status == "completed"
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].call_id.startswith("call_") and calls[0].id.startswith("fc_")
    out = {"type": "function_call_output", "call_id": calls[0].call_id, "output": json.dumps(get_weather("Paris"))}
    r2 = c.responses.create(model="gpt-oss-20b", previous_response_id=r.id, input=[out], tools=[WEATHER_TOOL],
                            temperature=0)
    assert r2.output_text == "It is sunny and 21 C." and r2.previous_response_id == r.id
    # the stored conversation came from the cache: at least the first request's prompt
    assert r2.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens
    assert c.responses.retrieve(r2.id).output_text == r2.output_text


def test_responses_items_sent_back_by_hand_equal_previous_response_id(tool):
    """Resending the whole conversation as items gives the same prompt as previous_response_id."""
    c = client(tool)
    first = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = c.responses.create(model="gpt-oss-20b", input=first, tools=[WEATHER_TOOL], temperature=0)
    call = next(o for o in r.output if o.type == "function_call")
    items = first + [o.model_dump(exclude_none=True) for o in r.output] + [
        {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps(get_weather("Paris"))}]
    r2 = c.responses.create(model="gpt-oss-20b", input=items, tools=[WEATHER_TOOL], temperature=0)
    r3 = c.responses.create(model="gpt-oss-20b", previous_response_id=r.id, input=items[-1:], tools=[WEATHER_TOOL],
                            temperature=0)
    assert r2.output_text == r3.output_text == "It is sunny and 21 C."
    assert r2.usage.input_tokens == r3.usage.input_tokens
    assert r3.usage.input_tokens_details.cached_tokens == r3.usage.input_tokens  # the same prompt: all cached


def test_responses_tool_stream_events(tool):
    body = {"input": "What's the weather in Paris?", "tools": [WEATHER_TOOL], "stream": True, "temperature": 0}
    with httpx.stream("POST", tool.url + "/v1/responses", json=body, timeout=60) as resp:
        data = [json.loads(d) for _, d in sse_events(resp.iter_lines())]
    kinds = [d["type"] for d in data]
    i = kinds.index("response.function_call_arguments.done")
    added = max(j for j in range(i) if kinds[j] == "response.output_item.added")
    # the arguments stream as the model writes them (one delta per token), then done
    assert set(kinds[added + 1:i]) == {"response.function_call_arguments.delta"} and i - added > 2
    assert "".join(d["delta"] for d in data[added + 1:i]) == '{"city": "Paris"}'
    assert kinds[i + 1] == "response.output_item.done"
    assert data[i]["arguments"] == '{"city": "Paris"}' and data[i]["name"] == "get_weather"
    assert data[i + 1]["item"]["type"] == "function_call" and data[i + 1]["item"]["status"] == "completed"


def test_tool_choice_none_and_named(tool):
    c = client(tool)
    r = c.responses.create(model="gpt-oss-20b", input="What's the weather in Paris?", tools=[WEATHER_TOOL],
                           tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
    assert [o.type for o in r.output] == ["function_call"]  # forced: the reply opens with the call
    assert r.output[0].name == "get_weather" and json.loads(r.output[0].arguments) == {"city": "Paris"}


# ------------------------------------------------------------------------------------- Chat Completions

def test_chat_reasoning_content_not_in_content(reason):
    r = client(reason).chat.completions.create(model="gpt-oss-20b", messages=[{"role": "user", "content": "Hi"}],
                                               temperature=0)
    m = r.choices[0].message
    assert m.content == "Hello there!" and r.choices[0].finish_reason == "stop"
    extra = m.model_extra
    assert extra["reasoning_content"] == extra["reasoning"] == "The user greets."
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    assert r.usage.completion_tokens_details.reasoning_tokens > 0


def test_chat_stream_chunks_and_usage(reason):
    chunks = list(client(reason).chat.completions.create(
        model="gpt-oss-20b", messages=[{"role": "user", "content": "Hi"}], stream=True, temperature=0,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks
                        if c.choices)
    assert content == "Hello there!" and reasoning == "The user greets."
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_chat_tool_loop_with_reasoning_passed_back(tool):
    c = client(tool)
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = c.chat.completions.create(model="gpt-oss-20b", messages=msgs, tools=[CHAT_WEATHER_TOOL], temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    call = ch.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert ch.message.model_extra["reasoning_content"] == "Need the weather."
    msgs += [{"role": "assistant", "content": None, "reasoning_content": "Need the weather.",
              "tool_calls": [call.model_dump()]},
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps(get_weather("Paris"))}]
    r2 = c.chat.completions.create(model="gpt-oss-20b", messages=msgs, tools=[CHAT_WEATHER_TOOL], temperature=0)
    assert r2.choices[0].message.content == "It is sunny and 21 C." and r2.choices[0].finish_reason == "stop"
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens


def test_chat_stream_tool_call_deltas(tool):
    chunks = list(client(tool).chat.completions.create(
        model="gpt-oss-20b", messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[CHAT_WEATHER_TOOL], stream=True, temperature=0))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].index == 0 and calls[0].id.startswith("call") and calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"city": "Paris"}'
    assert all(tc.index == 0 for tc in calls) and len(calls) > 3  # streamed as generated, not in one piece
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # no markup leaks into content


# ------------------------------------------------------------------------------------ raw completions

def test_raw_completions_return_harmony_text(reason):
    from mlx_gptoss import harmony

    prompt = harmony.encoding().decode(harmony.render([{"role": "user", "content": "Say hi"}]))
    c = client(reason)
    r = c.completions.create(model="gpt-oss-20b", prompt=prompt, max_tokens=200, temperature=0)
    assert r.choices[0].text == ("<|channel|>analysis<|message|>The user greets.<|end|><|start|>assistant"
                                 "<|channel|>final<|message|>Hello there!<|return|>")
    assert r.choices[0].finish_reason == "stop" and r.usage.prompt_tokens > 0
    short = c.completions.create(model="gpt-oss-20b", prompt=prompt, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="gpt-oss-20b", prompt=prompt, max_tokens=200, temperature=0, stream=True) if ch.choices)
    assert streamed == r.choices[0].text


def test_models_and_health(reason):
    c = client(reason)
    assert [m.id for m in c.models.list()] == ["gpt-oss-20b"]
    assert c.models.retrieve("gpt-oss-20b").id == "gpt-oss-20b"
    h = httpx.get(reason.url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["model"] == "gpt-oss-20b"
    cap = reason.worker.engine.cap  # the context a request may fill, as clients (and `launch opencode`) read it
    assert h["context"] == cap and c.models.retrieve("gpt-oss-20b").model_extra["context_length"] == cap
