"""Anthropic's Messages API through the official `anthropic` SDK against a real server on a free port:
non-streaming and streaming (messages.stream), thinking blocks with sealed signatures, a tool loop that stays
incremental in the prefix cache, count_tokens, Claude Code's extra fields, auth, and Anthropic error objects."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from scripted_checkpoint import forget_models, get_weather
from server_fixtures import running, sse_events

MODEL = "gpt-oss-20b"
HI = [{"role": "user", "content": "hi"}]
T0 = {"extra_body": {"temperature": 0}}  # this SDK's create() has no temperature parameter any more
WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module", autouse=True)
def _state(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))  # the sealing secret lives there
    yield
    mp.undo()


@pytest.fixture(scope="module")
def reason():
    with running("reason") as s:
        yield s


@pytest.fixture(scope="module")
def tool():
    with running("tool") as s:
        yield s


@pytest.fixture(scope="module")
def agent():
    with running("agent", api_key="sk-test") as s:
        yield s
    forget_models()


def client(server, **kw) -> anthropic.Anthropic:
    kw.setdefault("api_key", "unused")
    return anthropic.Anthropic(base_url=server.url, max_retries=0, timeout=60, **kw)


def cached_share(u) -> float:
    return u.cache_read_input_tokens / (u.input_tokens + u.cache_read_input_tokens)


# ------------------------------------------------------------------------------------------ messages

def test_message_with_thinking_and_answer(reason):
    m = client(reason).messages.create(model=MODEL, max_tokens=200, **T0,
                                       messages=[{"role": "user", "content": "Say hi"}])
    assert m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "The user greets." and m.content[0].signature.startswith("gm1.")
    assert m.content[1].text == "Hello there!" and m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0 and m.usage.cache_read_input_tokens == 0


def test_stream_with_the_sdk(reason):
    with client(reason).messages.stream(model=MODEL, max_tokens=200, **T0,
                                        messages=[{"role": "user", "content": "Say hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello there!"
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "The user greets." and final.content[0].signature.startswith("gm1.")
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


def test_raw_stream_event_order(reason):
    body = {"model": MODEL, "max_tokens": 200, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Say hi"}]}
    with httpx.stream("POST", reason.url + "/v1/messages?beta=true", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    names = [n for n, _ in events]
    data = [json.loads(d) for _, d in events]
    assert all(d["type"] == n for n, d in zip(names, data))  # each event's name is its data's type
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    kinds = [(d["type"], d.get("delta", {}).get("type") or d.get("content_block", {}).get("type")) for d in data]
    first_text = kinds.index(("content_block_start", "text"))
    assert kinds[2] == ("content_block_start", "thinking")
    assert ("content_block_delta", "signature_delta") in kinds[:first_text]
    assert kinds[first_text - 1] == ("content_block_stop", None)
    assert data[-2]["delta"]["stop_reason"] == "end_turn" and data[-2]["usage"]["output_tokens"] > 0
    assert data[0]["message"]["usage"]["input_tokens"] > 0


def test_thinking_display_omitted_still_renders_exactly(reason):
    c = client(reason)
    msgs = [{"role": "user", "content": "Say hi"}]
    m = c.messages.create(model=MODEL, max_tokens=200, **T0, messages=msgs,
                          thinking={"type": "adaptive", "display": "omitted"})
    think = m.content[0]
    assert think.type == "thinking" and think.thinking == "" and think.signature.startswith("gm1.")
    # the omitted text comes back from the signature: the same prompt as with the text shown
    shown = c.messages.create(model=MODEL, max_tokens=200, **T0, messages=msgs)
    back = [{"role": "assistant", "content": [b.model_dump() for b in shown.content]}]
    omitted = [{"role": "assistant", "content": [b.model_dump() for b in m.content]}]
    more = [{"role": "user", "content": "Again"}]
    a = c.messages.count_tokens(model=MODEL, messages=msgs + back + more)
    b = c.messages.count_tokens(model=MODEL, messages=msgs + omitted + more)
    assert a.input_tokens == b.input_tokens


def test_claude_code_fields_and_system_blocks_are_accepted(reason):
    c = client(reason)
    m = c.beta.messages.create(  # POST /v1/messages?beta=true with an anthropic-beta header
        model=MODEL, max_tokens=200, betas=["context-management-2025-06-27"],
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}],
        metadata={"user_id": "u1"}, thinking={"type": "adaptive"},
        extra_body={"temperature": 0,
                    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
                    "output_config": {"effort": "high"}, "something_new": {"x": 1}})
    assert m.content[-1].text == "Hello there!"


def test_count_tokens_is_the_prompt(reason):
    c = client(reason)
    msgs = [{"role": "user", "content": "Say hi"}]
    n = c.messages.count_tokens(model=MODEL, messages=msgs, system="Be brief.").input_tokens
    m = c.messages.create(model=MODEL, max_tokens=200, **T0, messages=msgs, system="Be brief.")
    assert n == m.usage.input_tokens + m.usage.cache_read_input_tokens > 20


def test_each_analysis_message_is_its_own_thinking_block():
    with running("multi_analysis") as s:
        with client(s).messages.stream(model=MODEL, max_tokens=200, **T0,
                                       messages=[{"role": "user", "content": "Say hi"}]) as stream:
            events = list(stream)
            m = stream.get_final_message()
    assert [b.type for b in m.content] == ["thinking", "thinking", "text"]
    assert [b.thinking for b in m.content[:2]] == ["First thought.", "Then a second one."]
    sigs = [b.signature for b in m.content[:2]]
    assert sigs[0] != sigs[1] and all(x.startswith("gm1.") for x in sigs)
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert stops == [0, 1, 2]


# ------------------------------------------------------------------------------------------ tools

def test_tool_loop_stays_in_the_cache(tool):
    c = client(tool)
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    m = c.messages.create(model=MODEL, max_tokens=300, **T0, messages=msgs, tools=[WEATHER])
    assert m.stop_reason == "tool_use"
    call = m.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    msgs += [{"role": "assistant", "content": [b.model_dump() for b in m.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                           "content": json.dumps(get_weather("Paris"))}]}]
    m2 = c.messages.create(model=MODEL, max_tokens=300, **T0, messages=msgs, tools=[WEATHER])
    assert m2.stop_reason == "end_turn" and m2.content[-1].text == "It is sunny and 21 C."
    u1, u2 = m.usage, m2.usage
    # only the tool result is prefilled: the previous prompt and reply all come from the cache
    assert u2.cache_read_input_tokens == u1.input_tokens + u1.cache_read_input_tokens + u1.output_tokens


def test_tool_use_streams_input_json(tool):
    with client(tool).messages.stream(model=MODEL, max_tokens=300, **T0, tools=[WEATHER],
                                      messages=[{"role": "user", "content": "Weather?"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta"
              and e.delta.type == "input_json_delta"]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == {"city": "Paris"}  # streamed as generated
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "Paris"}


def test_tool_choice_forces_the_named_tool(tool):
    m = client(tool).messages.create(model=MODEL, max_tokens=300, **T0, tools=[WEATHER],
                                     tool_choice={"type": "tool", "name": "get_weather"},
                                     messages=[{"role": "user", "content": "Weather?"}])
    assert m.content[0].type == "tool_use" and m.stop_reason == "tool_use"  # forced: no thinking first


def test_server_tools_are_left_out_with_a_warning(tool):
    r = httpx.post(tool.url + "/v1/messages", timeout=60, json={
        "model": MODEL, "max_tokens": 300, "temperature": 0, "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [WEATHER, {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]})
    assert r.status_code == 200, r.text
    assert any("web_search" in w for w in r.json()["warnings"])


def test_ten_step_loop_with_bearer_auth_every_step_cached(agent):
    c = client(agent, api_key=None, auth_token="sk-test")  # Authorization: Bearer
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    usages = []
    for step in range(10):
        m = c.messages.create(model=MODEL, max_tokens=300, **T0, messages=msgs, tools=[WEATHER])
        call = m.content[-1]
        assert m.stop_reason == "tool_use" and call.type == "tool_use"
        usages.append(m.usage)
        msgs += [{"role": "assistant", "content": [b.model_dump() for b in m.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": json.dumps({"temp_c": 20 + step})}]}]
    for before, now in zip(usages, usages[1:]):
        prompt = before.input_tokens + before.cache_read_input_tokens
        assert now.cache_read_input_tokens == prompt + before.output_tokens
        assert 0 < now.input_tokens < 40  # the tool message alone
    assert cached_share(usages[-1]) > 0.9


def test_a_tampered_signature_is_plain_text(agent):
    c = client(agent, api_key="sk-test")
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = c.messages.create(model=MODEL, max_tokens=300, **T0, messages=msgs, tools=[WEATHER])
    blocks = [b.model_dump() for b in m.content]
    sig = blocks[0]["signature"]
    blocks[0]["signature"] = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    call = blocks[-1]
    msgs += [{"role": "assistant", "content": blocks},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny"}]}]
    m2 = c.messages.create(model=MODEL, max_tokens=300, **T0, messages=msgs, tools=[WEATHER])
    assert m2.stop_reason == "tool_use"


# ------------------------------------------------------------------------------------------ errors

def test_errors_are_anthropic_error_objects(agent, reason):
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(agent, api_key="wrong").messages.create(model=MODEL, max_tokens=10, messages=[
            {"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(reason.url + "/v1/messages", json={"model": MODEL, "messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in r.json()["error"]["message"]
    c = client(reason)
    with pytest.raises(anthropic.NotFoundError) as e:
        c.messages.create(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "not_found_error" and MODEL in e.value.body["error"]["message"]
    with pytest.raises(anthropic.APIStatusError) as e:
        c.messages.create(model=MODEL, max_tokens=10, stop_sequences=["x"], messages=HI)
    assert "stop_sequences" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}])
    assert "toolu_nope" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=MODEL, max_tokens=10, extra_body={"temperature": 7}, messages=HI)
    assert "temperature" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=MODEL, max_tokens=10, messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "no such!", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}])
    assert "messages[1].content[0].name" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.APIStatusError) as e:
        c.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[1]: image blocks are not supported" in e.value.body["error"]["message"]
    r = httpx.post(reason.url + "/v1/messages", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # what the app answers before any route: the method, an unknown path under /v1/messages, a foreign Host
    for r, status in ((httpx.get(reason.url + "/v1/messages", timeout=30), 405),
                      (httpx.post(reason.url + "/v1/messages/nope", json={}, timeout=30), 404),
                      (httpx.post(reason.url + "/v1/messages", json={}, headers={"Host": "evil.example"},
                                  timeout=30), 403)):
        assert r.status_code == status and r.json()["type"] == "error" and r.json()["error"]["message"], r.text


def test_tool_choice_any_and_none(tool):
    c = client(tool)
    ask = [{"role": "user", "content": "Weather?"}]
    with_tools = c.messages.count_tokens(model=MODEL, messages=ask, tools=[WEATHER]).input_tokens
    # any: the reply is made to open with a call (its header is part of the prompt)
    forced = c.messages.count_tokens(model=MODEL, messages=ask, tools=[WEATHER], tool_choice={"type": "any"})
    assert forced.input_tokens > with_tools
    without = c.messages.count_tokens(model=MODEL, messages=ask, tools=[WEATHER], tool_choice={"type": "none"})
    assert without.input_tokens == c.messages.count_tokens(model=MODEL, messages=ask).input_tokens < with_tools


# ------------------------------------------------------------------------------------------ cut replies

def test_max_tokens_and_a_stream_cut_by_the_shutdown():
    from mlx_gptoss.server import ServerThread
    from server_fixtures import model, stream_cut_by_shutdown

    s = ServerThread(model("loop"), model_id=MODEL).start()
    try:
        m = client(s).messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "Loop"}])
        assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 5
        body = {"model": MODEL, "max_tokens": 4000, "stream": True, "messages": [{"role": "user", "content": "Loop"}]}
        got = stream_cut_by_shutdown(s, "/v1/messages", body)
    finally:
        s.stop()  # stopped already unless the first request failed
    names = [n for n, _ in got]
    assert names[-1] == "error" and "message_stop" not in names  # a cut reply says it was cut
    assert json.loads(got[-1][1])["error"]["type"] == "overloaded_error"
