"""Harmony fidelity through the server: preambles, calls on the analysis channel, several analysis
messages, malformed output shown as content with a warning (never a 500), calls sent back by clients
rendered exactly as generated (so the loop stays incremental)."""

from __future__ import annotations

import json

import pytest

from scripted_checkpoint import forget_models, get_weather
from server_fixtures import CHAT_WEATHER_TOOL, WEATHER_TOOL, client, running

WEATHER = json.dumps(get_weather("Paris"))


def responses_round_trip(server):
    """A call, then its result with all items sent back: (first response, second response)."""
    c = client(server)
    items = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = c.responses.create(model="gpt-oss-20b", input=items, tools=[WEATHER_TOOL], temperature=0)
    call = next(o for o in r.output if o.type == "function_call")
    items += [o.model_dump(exclude_none=True) for o in r.output]
    items.append({"type": "function_call_output", "call_id": call.call_id, "output": WEATHER})
    r2 = c.responses.create(model="gpt-oss-20b", input=items, tools=[WEATHER_TOOL], temperature=0)
    return r, r2


def assert_extends(first, second):
    """The second prompt came from the cache up to the end of what the first reply generated."""
    cached = second.usage.input_tokens_details.cached_tokens
    assert cached == first.usage.input_tokens + first.usage.output_tokens


@pytest.mark.parametrize("script", ["tool", "preamble", "analysis_call"])
def test_call_round_trip_is_exact_and_incremental(script):
    with running(script) as s:
        r, r2 = responses_round_trip(s)
        assert r2.output_text == "It is sunny and 21 C."
        assert_extends(r, r2)
        kinds = [o.type for o in r.output]
        if script == "preamble":
            assert kinds == ["reasoning", "message", "function_call"]
            assert r.output[1].content[0].text == "Let me look that up."
        else:
            assert kinds == ["reasoning", "function_call"]  # the analysis-channel call is a call, not reasoning
        assert "get_weather" not in "".join(o.content[0].text for o in r.output if o.type == "reasoning")
        # Chat Completions: the same loop with the reasoning and the calls passed back
        c = client(s)
        msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
        a = c.chat.completions.create(model="gpt-oss-20b", messages=msgs, tools=[CHAT_WEATHER_TOOL], temperature=0)
        m = a.choices[0].message
        assert a.choices[0].finish_reason == "tool_calls" and m.tool_calls[0].function.name == "get_weather"
        assert m.content == ("Let me look that up." if script == "preamble" else None)
        msgs += [{"role": "assistant", "content": m.content, "reasoning_content": m.model_extra["reasoning_content"],
                  "tool_calls": [t.model_dump() for t in m.tool_calls]},
                 {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": WEATHER}]
        b = c.chat.completions.create(model="gpt-oss-20b", messages=msgs, tools=[CHAT_WEATHER_TOOL], temperature=0)
        assert b.choices[0].message.content == "It is sunny and 21 C."
        assert b.usage.prompt_tokens_details.cached_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    forget_models()


def test_several_analysis_messages_are_separate_reasoning_items():
    with running("multi_analysis") as s:
        c = client(s)
        r = c.responses.create(model="gpt-oss-20b", input="Think twice", temperature=0)
        assert [o.type for o in r.output] == ["reasoning", "reasoning", "message"]
        assert [o.content[0].text for o in r.output[:2]] == ["First thought.", "Then a second one."]
        assert r.output_text == "Done."
        a = c.chat.completions.create(model="gpt-oss-20b", messages=[{"role": "user", "content": "Think twice"}],
                                      temperature=0)
        assert a.choices[0].message.model_extra["reasoning_content"] == "First thought.\n\nThen a second one."
    forget_models()


@pytest.mark.parametrize("script,shown", [("no_header", "hello world"), ("bad_special", "Hi there")])
def test_malformed_output_is_content_with_a_warning(script, shown):
    with running(script) as s:
        c = client(s)
        r = c.responses.create(model="gpt-oss-20b", input="Say something", temperature=0)
        assert r.status == "completed" and shown in r.output_text
        assert r.model_extra["warnings"]
        a = c.chat.completions.create(model="gpt-oss-20b", messages=[{"role": "user", "content": "Hi"}],
                                      temperature=0)
        assert shown in a.choices[0].message.content and a.model_extra["warnings"]
        assert "<|" not in a.choices[0].message.content  # no markup leaks
    forget_models()


def test_tool_choice_shapes_the_prompt():
    from mlx_gptoss.server import conversation, responses

    def turn():
        return responses.read_tools([WEATHER_TOOL]).turn([{"role": "user", "content": "Hi"}], "medium")

    assert conversation.apply_tool_choice(turn(), "auto").forced == "" and turn().tools
    assert conversation.apply_tool_choice(turn(), "none").tools == []  # rendered without the tools
    assert conversation.apply_tool_choice(turn(), "required").forced == "<|channel|>commentary to=functions."
    named = conversation.apply_tool_choice(turn(), {"type": "function", "name": "get_weather"})
    assert named.forced == "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    chat_named = conversation.apply_tool_choice(turn(), {"type": "function", "function": {"name": "get_weather"}})
    assert chat_named.forced == named.forced


def test_reasoning_effort_reaches_the_system_prompt():
    from mlx_gptoss import harmony

    with running("reason") as s:
        enc = harmony.encoding()
        c = client(s)
        for effort, expect in (("low", "low"), ("high", "high"), ("minimal", "low")):  # minimal runs as low
            r = c.responses.create(model="gpt-oss-20b", input="Say hi", reasoning={"effort": effort},
                                   max_output_tokens=2)
            assert r.reasoning.effort == expect
            assert f"Reasoning: {expect}" in enc.decode(s.worker.done[-1].prompt)
        c.chat.completions.create(model="gpt-oss-20b", messages=[{"role": "user", "content": "Hi"}],
                                  reasoning_effort="high", max_tokens=2)
        assert "Reasoning: high" in enc.decode(s.worker.done[-1].prompt)
