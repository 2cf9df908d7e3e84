"""Assistant turns as the ordered harmony messages the model wrote (preambles, calls on the analysis channel,
a bare `python` recipient, several analysis messages), tool-call ids, what the history keeps, and tool loops
that prefill only what is new (measured through the public Session API on scripted checkpoints)."""

from __future__ import annotations

import json

import pytest
from openai_harmony import Author, Message, Role

from mlx_gptoss import Session, harmony
from scripted_checkpoint import (LOOKUP, SCRIPTS, forget_models, get_weather, make_counter, script_ids,
                                 scripted_model)

ASK = "What's the weather in Paris?"


def part(channel, content, recipient=None, content_type=None, id=None):
    return {"channel": channel, "content": content, "recipient": recipient, "content_type": content_type, "id": id}


def text_of(s: Session) -> str:
    return harmony.encoding().decode(s.render())


def merged(evs):
    out = []
    for e in evs:
        if e.kind == "done":
            continue
        if out and out[-1][0] == e.kind and e.kind != "tool_call":
            out[-1] = (e.kind, out[-1][1] + e.text)
        else:
            out.append((e.kind, e.text))
    return out


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    forget_models()


# ------------------------------------------------------------------------------------------ preambles

def test_a_preamble_is_commentary_before_its_call_never_a_final_answer():
    gpt = scripted_model("preamble")
    s = gpt.session(tools=[get_weather])
    evs = list(s.send(ASK, temperature=0))
    assert merged(evs) == [("reasoning", "Need the weather."), ("preamble", "Let me look that up."),
                           ("tool_call", '{"city": "Paris"}')]
    call = evs[-2]
    assert call.id.startswith("call_") and call.channel == "commentary"
    m = s.messages[1]
    assert m["parts"] == [part("analysis", "Need the weather."), part("commentary", "Let me look that up."),
                          part("commentary", '{"city": "Paris"}', "functions.get_weather", "<|constrain|>json",
                               call.id)]
    assert "content" not in m and m["tool_calls"] == [{"id": call.id, "name": "get_weather",
                                                       "arguments": '{"city": "Paris"}'}]
    s.add_tool_result("get_weather", get_weather("Paris"), tool_call_id=call.id)
    text = text_of(s)
    assert ("<|start|>assistant<|channel|>commentary<|message|>Let me look that up.<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.get_weather") in text
    assert "<|channel|>final" not in text  # the model never wrote a final answer in this turn
    assert "Need the weather." in text  # the reasoning stays for the rest of the tool loop
    evs = list(s.send(None, temperature=0))
    assert merged(evs) == [("content", "It is sunny and 21 C.")]
    stats = evs[-1].stats
    # only the tool result (and the "<|start|>assistant" after it) is new
    tool_ids = harmony.encoding().render(
        Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), s.messages[2]["content"])
        .with_channel("commentary").with_recipient("assistant"))
    assert stats.prefilled_tokens == len(tool_ids) + 2


def test_several_analysis_messages_are_not_glued_together():
    gpt = scripted_model("multi_analysis")
    s = gpt.session()
    evs = list(s.send("Think twice", temperature=0))
    reasoning = "".join(e.text for e in evs if e.kind == "reasoning")
    assert reasoning == "First thought.\n\nThen a second one."  # harmony.REASONING_SEPARATOR between messages
    assert s.messages[1]["reasoning"] == reasoning and s.messages[1]["content"] == "Done."
    assert [p["content"] for p in s.messages[1]["parts"]] == ["First thought.", "Then a second one.", "Done."]


# ------------------------------------------------------------------------- calls the model may write

def test_a_call_on_the_analysis_channel_is_a_call_rendered_back_on_that_channel():
    gpt = scripted_model("analysis_call")
    s = gpt.session(tools=[get_weather])
    evs = list(s.send(ASK, temperature=0, auto_tools=True))
    calls = [e for e in evs if e.kind == "tool_call"]
    assert len(calls) == 1 and calls[0].channel == "analysis" and calls[0].name == "get_weather"
    assert merged(evs)[-1] == ("content", "It is sunny and 21 C.")  # the model saw its own call and the result
    assert s.messages[1]["parts"][-1]["channel"] == "analysis"
    assert s.messages[2]["tool_call_id"] == calls[0].id
    s.messages.append({"role": "user", "content": "Thanks"})
    text = text_of(s)  # the turn is finished: canonical order, still on the analysis channel
    assert "<|start|>assistant to=functions.get_weather<|channel|>analysis <|constrain|>json" in text
    assert "<|start|>functions.get_weather to=assistant<|channel|>analysis<|message|>" in text


def test_a_bare_python_recipient_is_not_renamed():
    gpt = scripted_model("python")
    s = gpt.session()
    evs = list(s.send("What is 1+1?", temperature=0))
    (call,) = [e for e in evs if e.kind == "tool_call"]
    assert (call.recipient, call.name, call.arguments, call.channel) == ("python", "python", "print(1+1)",
                                                                          "analysis")
    assert s.messages[1]["tool_calls"] == [{"id": call.id, "name": "python", "arguments": "print(1+1)",
                                            "recipient": "python"}]
    assert s.messages[1]["parts"][-1]["content_type"] == "code"
    s.add_tool_result("python", "2")  # matched to the call by name: it gets the call's id
    assert s.messages[2]["tool_call_id"] == call.id
    text = text_of(s)
    assert "<|channel|>analysis to=python code<|message|>print(1+1)<|call|>" in text
    assert "<|start|>python to=assistant<|channel|>analysis<|message|>2<|end|>" in text
    assert "functions.python" not in text
    evs = list(s.send(None, temperature=0))
    assert merged(evs) == [("content", "It is 2.")]
    d = json.loads(json.dumps(s.to_dict()))  # parts and ids survive save/load
    t = Session.from_dict(gpt, d)
    assert t.messages == s.messages and t.render() == s.render()


# ------------------------------------------------------------------------ what a tool loop prefills

def test_twelve_tool_rounds_prefill_only_the_tool_results_then_the_next_turn_reuses_its_start():
    gpt = scripted_model("loop12")
    s = gpt.session(tools=[make_counter()])
    stats, ids_after = [], []
    for ev in s.send("Count to twelve", temperature=0, auto_tools=True, max_tool_rounds=20):
        if ev.kind == "done":
            stats.append(ev.stats)
            ids_after.append(list(s.runner.ids))  # the prompt and every token the model generated
    assert len(stats) == 13 and stats[-1].stop_reason == "return"
    assert [m["role"] for m in s.messages] == ["user"] + ["assistant", "tool"] * 12 + ["assistant"]
    assert [json.loads(m["content"]) for m in s.messages if m["role"] == "tool"] == [{"n": k} for k in range(1, 13)]
    gen = script_ids("loop12")
    enc = harmony.encoding()
    for k in range(1, 13):
        prev = ids_after[k - 1]
        assert prev[-len(gen[k - 1]):] == gen[k - 1]  # what the model generated is the script
        # the history renders what was generated token for token: the whole cache is reused ...
        assert stats[k].cached_tokens == len(prev)
        # ... and only the tool message (+ "<|start|>assistant") is prefilled
        tool = enc.render(Message.from_author_and_content(Author.new(Role.TOOL, "functions.count"),
                                                          json.dumps({"n": k}))
                          .with_channel("commentary").with_recipient("assistant"))
        assert stats[k].prefilled_tokens == len(tool) + 2
    # the next turn: the finished turn's reasoning is dropped, so the cache diverges where the turn began;
    # the mark at the end of the user message survived 26 snapshots
    start = len(s.render(s.messages[:1])) - 2
    *_, done = s.send("Again", temperature=0, max_tokens=2)
    assert done.stats.cached_tokens == start
    assert done.stats.prefilled_tokens == done.stats.prompt_tokens - start


def test_the_next_user_turn_after_a_pending_tool_result_prefills_only_what_it_adds():
    gpt = scripted_model("tool")
    spec = {"name": "get_weather", "description": "Current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                      "description": "The city's name, e.g. \"Paris\"."}},
                           "required": ["city"]}}
    s = gpt.session(tools=[spec])
    evs = list(s.send(ASK, temperature=0))
    assert evs[-1].stats.stop_reason == "call"
    before = list(s.runner.ids)
    (call,) = [e for e in evs if e.kind == "tool_call"]
    s.add_tool_result("get_weather", get_weather("Paris"), tool_call_id=call.id)
    *_, done = s.send("And in Rome?", temperature=0, max_tokens=2)
    # the answered turn keeps its reasoning (it never reached a final answer, but its call was answered)
    assert done.stats.cached_tokens == len(before)
    added = len(s.render(s.messages[:4])) - len(before)
    assert done.stats.prefilled_tokens == added < 70


def test_a_tokenization_encode_would_not_give_still_renders_back_token_for_token():
    """The model writes the arguments one character a token; the session renders its own ids back."""
    gpt = scripted_model("noncanonical")
    enc = harmony.encoding()
    gen = script_ids("noncanonical")[0]
    args = gen[gen.index(harmony.MESSAGE, gen.index(harmony.CONSTRAIN)) + 1:-1]
    assert enc.decode(args) == '{"q": 7}' and args != enc.encode('{"q": 7}')
    s = gpt.session(tools=[LOOKUP])
    evs = list(s.send("Look up 7", temperature=0))
    before = list(s.runner.ids)
    assert before[-len(gen):] == gen
    (call,) = [e for e in evs if e.kind == "tool_call"]
    assert call.arguments == '{"q": 7}'
    s.add_tool_result("lookup", "seven", tool_call_id=call.id)
    assert s.render()[:len(before)] == before
    evs = list(s.send(None, temperature=0))
    assert merged(evs) == [("content", "Seven.")] and evs[-1].stats.cached_tokens == len(before)
    # from message dicts alone (no generated ids), the canonical encoding is the fallback
    plain = harmony.render(s.messages[:3], tools=[LOOKUP], date=s.date)
    assert plain[:len(before) - len(gen)] == before[:len(before) - len(gen)] and plain[:len(before)] != before


# --------------------------------------------------------------------------- what the history keeps

def test_reasoning_of_a_turn_whose_call_nobody_answered_is_dropped_at_the_next_user_message():
    gpt = scripted_model("tool")
    s = gpt.session(tools=[{"name": "get_weather", "parameters": {"type": "object"}}])
    list(s.send(ASK, temperature=0))
    assert s.messages[-1]["tool_calls"]
    assert "Need the weather." in text_of(s)  # still the current turn
    s.messages.append({"role": "user", "content": "Never mind."})
    text = text_of(s)
    assert "Need the weather." not in text and "to=functions.get_weather" in text


def test_reasoning_of_a_reply_cut_by_max_tokens_is_dropped_and_no_empty_answer_is_invented():
    gpt = scripted_model("reason")
    s = gpt.session()
    *_, done = s.send("Hi", temperature=0, max_tokens=6)
    assert done.stats.stop_reason == "max_tokens"
    assert s.messages[1]["parts"] == [part("analysis", "The user gre")]
    assert "The user gre" in text_of(s)  # the turn is still the current one
    s.messages.append({"role": "user", "content": "Go on"})
    text = text_of(s)
    assert "The user gre" not in text and "<|channel|>final<|message|><|end|>" not in text


def test_tool_results_are_matched_to_calls_by_id_then_by_name():
    offline = scripted_model("final")  # noqa: F841 (the offline vocabulary)
    msgs = [{"role": "user", "content": "Two things"},
            {"role": "assistant", "parts": [
                part("commentary", '{"city": "Oslo"}', "functions.get_weather", "<|constrain|>json", "call_a"),
                part("analysis", "print(2)", "python", "code", "call_b")]},
            {"role": "tool", "name": "whatever", "tool_call_id": "call_b", "content": "2"},
            {"role": "tool", "name": "get_weather", "content": "cold"}]
    text = harmony.encoding().decode(harmony.render(msgs))
    assert "<|start|>python to=assistant<|channel|>analysis<|message|>2<|end|>" in text
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>cold<|end|>" in text


def test_scripts_are_what_the_parser_reads():
    """The scripts themselves parse cleanly (a broken script would make the tests above meaningless)."""
    for name in ("preamble", "analysis_call", "python", "multi_analysis", "loop12", "noncanonical"):
        for ids in script_ids(name):
            p = harmony.StreamParser()
            for t in ids:
                p.feed(t)
            p.finish("return")
            assert not p.malformed and p.stopped, (name, p.warnings)
    assert len(SCRIPTS["loop12"]) == 13


def test_the_cli_shows_a_preamble_dimmed_before_the_answer():
    from rich.console import Console

    from mlx_gptoss.chat import Event
    from mlx_gptoss.cli.render import ReplyView

    console = Console(record=True, width=80, force_terminal=True, color_system="standard")
    view = ReplyView(console, show_reasoning=False, plain=False)
    for ev in (Event("reasoning", "hidden", channel="analysis"), Event("preamble", "Let me look that up."),
               Event("content", "It is sunny.")):
        view.event(ev)
    console.print(view._view())
    text = console.export_text(clear=False)
    assert text.index("Let me look that up.") < text.index("It is sunny.") and "hidden" not in text
    assert "\x1b[2m" in console.export_text(styles=True)  # dim
