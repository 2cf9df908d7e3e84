"""Session: the prompt cache across turns (prefilled counts, logits equal to a fresh prefill), tools,
interruption, save/load, settings changes, dropping the oldest turns."""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss import GptOssError, Session
from mlx_gptoss.chat import Runner
from scripted_checkpoint import (forget_models, get_weather, random_real_vocab_model,
                                 scripted_model, scripted_path)

README = Path(__file__).resolve().parent.parent / "README.md"


def run(events):
    evs = list(events)
    return evs, evs[-1].stats


def part(channel, content, recipient=None, content_type=None, id=None):
    return {"channel": channel, "content": content, "recipient": recipient, "content_type": content_type, "id": id}


def summary(m):
    """A message dict without its ordered parts."""
    return {k: v for k, v in m.items() if k != "parts"}


def answer(evs):
    return "".join(e.text for e in evs if e.kind == "content")


def test_five_turns_prefill_only_what_is_new():
    gpt = scripted_model("reason")
    s = gpt.session()
    prev = 0
    for turn in range(5):
        evs, stats = run(s.send(f"Question number {turn} about MXFP4, please?", temperature=0))
        assert answer(evs) == "Hello there!" and stats.stop_reason == "return"
        assert stats.prompt_tokens == len(s.render(s.messages[:-1]))
        if turn == 0:
            assert stats.prefilled_tokens == stats.prompt_tokens
        else:  # the previous prompt came from the cache; only the final answer + the new message are new
            assert stats.cached_tokens == prev
            assert stats.prefilled_tokens == stats.prompt_tokens - prev
            assert stats.prefilled_tokens < 30
        prev = stats.prompt_tokens
    assert [m["role"] for m in s.messages] == ["user", "assistant"] * 5
    assert s.messages[1] == {"role": "assistant", "reasoning": "The user greets.", "content": "Hello there!",
                             "parts": [part("analysis", "The user greets."), part("final", "Hello there!")]}


def test_final_only_turns_are_incremental_too():
    gpt = scripted_model("final")
    s = gpt.session()
    _, first = run(s.send("Hi", temperature=0))
    _, second = run(s.send("Again", temperature=0))
    # the cache ends with the generated <|return|> (history has <|end|>): back to the prompt's snapshot
    assert second.cached_tokens == first.prompt_tokens
    assert second.prefilled_tokens == second.prompt_tokens - first.prompt_tokens < 25


# ---------------------------------------------------------------- cache reuse == fresh prefill

@pytest.fixture(scope="module")
def random_gpt(tmp_path_factory):
    return random_real_vocab_model(tmp_path_factory.mktemp("rnd") / "ckpt", layers=4, seed=5)


def fresh(gpt, ids):
    r = Runner(gpt)
    r.chunk = 7
    return np.array(r.prefill(ids)[0])


def close(a, b):
    np.testing.assert_allclose(np.array(a), b, rtol=1e-4, atol=1e-4)


def test_reused_cache_gives_the_logits_of_a_fresh_prefill(random_gpt):
    rng = np.random.default_rng(0)
    ids = lambda n: [int(x) for x in rng.integers(0, 199998, n)]  # noqa: E731
    r = Runner(random_gpt)
    r.chunk = 7
    p1 = ids(40) + [200006, 173781]  # ends like a prompt: <|start|>assistant
    logits, n = r.prefill(p1)
    assert n == len(p1)
    close(logits, fresh(random_gpt, p1))
    for t in ids(12):  # a reply longer than the sliding window: the rotating caches wrap
        r.step(t)
    p2 = p1 + ids(9)  # the next prompt drops the reply: back to the snapshot, then only the 9 new tokens
    logits, n = r.prefill(p2)
    assert n == 9
    close(logits, fresh(random_gpt, p2))
    close(r.step(5)[None][0], np.array(random_gpt.model(mx.array([p2 + [5]]))[0, -1]))
    p3 = p1 + ids(4)  # the same snapshot again (it must not have been changed by the use above)
    logits, n = r.prefill(p3)
    assert n == 4
    close(logits, fresh(random_gpt, p3))
    p4 = p3 + [7, 8, 9]  # the cache as it is already starts this prompt: continue from it
    logits, n = r.prefill(p4)
    assert n == 3
    close(logits, fresh(random_gpt, p4))
    logits, n = r.prefill(p4)  # the very same prompt: nothing to run
    assert n == 0
    close(logits, fresh(random_gpt, p4))
    p5 = p1[:-2] + [200006, 1428] + ids(5)  # a reply dropped before it began: back to the end of the last message
    logits, n = r.prefill(p5)
    assert n == 7
    close(logits, fresh(random_gpt, p5))


def test_rotating_cache_state_round_trips_its_offsets(random_gpt):
    """Runner._restore writes RotatingKVCache.state into a cache: that state must carry the offsets (mlx-lm
    >= 0.32.2; before, a restore silently gave wrong logits). Restored into a fresh cache, it must continue
    exactly as the original does."""
    from mlx_lm.models.cache import KVCache

    rng = np.random.default_rng(2)
    ids = [int(x) for x in rng.integers(0, 199998, 21)]
    a = random_gpt.make_cache()
    random_gpt.model(mx.array([ids[:13]]), cache=a)
    for t in ids[13:20]:  # single steps past the window of 8: the rotating layers wrapped mid-buffer
        random_gpt.model(mx.array([[t]]), cache=a)
    mx.eval([c.state for c in a])
    rotating = [i for i, c in enumerate(a) if not isinstance(c, KVCache)]
    assert rotating and all(a[i].offset == 20 for i in rotating)
    b = random_gpt.make_cache()
    for x, y in zip(a, b):
        y.state = tuple(mx.array(v) if isinstance(v, mx.array) else v for v in x.state)
    for i in rotating:
        assert (b[i].offset, b[i]._idx) == (a[i].offset, a[i]._idx)
    la = random_gpt.model(mx.array([[ids[20]]]), cache=a)[0, -1]
    lb = random_gpt.model(mx.array([[ids[20]]]), cache=b)[0, -1]
    close(lb, np.array(la))
    close(la[None][0], np.array(random_gpt.model(mx.array([ids]))[0, -1]))


def test_dependency_floors_match_the_code():
    """The floors the code needs: RotatingKVCache.state with offsets (mlx-lm 0.32.2), the cache fixes of mlx
    0.32.1, openai-harmony 0.0.5 (the API this code was checked against); the installed versions meet them."""
    import tomllib
    from importlib.metadata import version

    deps = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {"mlx>=0.32.1; sys_platform == 'darwin'", "mlx[cpu]>=0.32.1; sys_platform != 'darwin'",
              "mlx-lm>=0.32.2", "openai-harmony>=0.0.5"}
    assert floors <= set(deps), deps
    as_tuple = lambda v: tuple(int(x) for x in v.split(".")[:3])  # noqa: E731
    assert as_tuple(version("mlx")) >= (0, 32, 1) and as_tuple(version("mlx-lm")) >= (0, 32, 2)
    assert as_tuple(version("openai-harmony")) >= (0, 0, 5)


def test_an_interrupted_forward_pass_is_repaired(random_gpt):
    rng = np.random.default_rng(1)
    r = Runner(random_gpt)
    p1 = [int(x) for x in rng.integers(0, 199998, 30)] + [200006, 173781]
    r.prefill(p1)
    layer = r.cache[2]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    layer.update_and_fetch = interrupted  # layers 0-1 take the token, layer 2 is interrupted
    with pytest.raises(KeyboardInterrupt):
        r.step(11)
    del layer.update_and_fetch
    assert r.dirty
    p2 = p1 + [3, 4, 5]
    logits, n = r.prefill(p2)
    assert n == 3
    close(logits, fresh(random_gpt, p2))


def test_random_model_session_never_raises(random_gpt):
    s = random_gpt.session()
    for i in range(3):
        evs, stats = run(s.send(f"turn {i}", max_tokens=30, seed=i))
        assert stats.generated_tokens <= 30
    assert [m["role"] for m in s.messages] == ["user", "assistant"] * 3
    # after pipelined decoding (the cache got tokens before Python saw them), reuse is still exact
    s.messages.append({"role": "user", "content": "one more"})
    prompt = s.render()
    logits, n = s.runner.prefill(prompt)
    assert 0 < n < len(prompt)
    close(logits, fresh(random_gpt, prompt))


# -------------------------------------------------------------------------------------------- tools

def test_tool_call_answered_by_hand():
    gpt = scripted_model("tool")
    s = gpt.session(tools=[get_weather])
    calls, ids = [], []
    for ev in s.send("What's the weather in Paris?", temperature=0):
        if ev.kind == "tool_call":  # answered while the reply is still streaming (its id found by name)
            calls.append((ev.name, ev.arguments))
            ids.append(ev.id)
            s.add_tool_result(ev.name, get_weather(**json.loads(ev.arguments)))
    assert calls == [("get_weather", '{"city": "Paris"}')]
    assert [m["role"] for m in s.messages] == ["user", "assistant", "tool"]
    evs, stats = run(s.send(None, temperature=0))
    assert answer(evs) == "It is sunny and 21 C."
    assert summary(s.messages[-1]) == {"role": "assistant", "content": "It is sunny and 21 C."}
    (call,) = s.messages[1]["tool_calls"]
    assert call == {"id": ids[0], "name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
    assert s.messages[2] == {"role": "tool", "name": "get_weather", "tool_call_id": call["id"],
                             "content": json.dumps(get_weather("Paris"))}
    assert stats.cached_tokens > 0 and stats.prefilled_tokens < 80


def test_a_result_for_a_call_never_made_is_refused_naming_the_pending_calls():
    gpt = scripted_model("tool")
    s = gpt.session(tools=[get_weather])
    with pytest.raises(GptOssError, match=r"add_tool_result\('nope'\): there is no pending tool call with a call "
                                          r"of 'nope'; the calls waiting for a result: none"):
        s.add_tool_result("nope", "42")  # nothing was called yet
    evs, _ = run(s.send("What's the weather in Paris?", temperature=0))
    (call,) = [e for e in evs if e.kind == "tool_call"]
    before = copy.deepcopy(s.messages)
    for args in (("nope", "42"), ("get_weather", "42", "call_000")):
        with pytest.raises(GptOssError, match=f"the calls waiting for a result: get_weather \\(tool_call_id "
                                              f"'{call.id}'\\)"):
            s.add_tool_result(*args[:2], tool_call_id=args[2] if len(args) > 2 else None)
    assert s.messages == before  # nothing was kept
    s.add_tool_result("get_weather", get_weather("Paris"), tool_call_id=call.id)
    with pytest.raises(GptOssError, match="waiting for a result: none"):  # answered already
        s.add_tool_result("get_weather", "again", tool_call_id=call.id)
    assert [m["role"] for m in s.messages] == ["user", "assistant", "tool"]


def test_auto_tools_run_python_functions():
    gpt = scripted_model("tool")
    seen = []

    def get_weather(city: str) -> dict:
        """Current weather in a city.

        Args:
            city: The city's name, e.g. "Paris".
        """
        seen.append(city)
        return {"city": city, "temp_c": 21, "sky": "sunny"}

    s = gpt.session(tools=[get_weather])
    evs = list(s.send("What's the weather in Paris?", temperature=0, auto_tools=True))
    kinds = [e.kind for e in evs]
    assert kinds.count("tool_call") == 1 and kinds.count("done") == 2 and kinds[-1] == "done"
    assert seen == ["Paris"]
    assert answer(evs) == "It is sunny and 21 C."
    assert [m["role"] for m in s.messages] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(s.messages[2]["content"]) == {"city": "Paris", "temp_c": 21, "sky": "sunny"}
    # the next turn drops this turn's reasoning and still reuses the cache
    evs, stats = run(s.send("Thanks", temperature=0, max_tokens=3))
    assert stats.cached_tokens > 0


def test_readme_tool_example_runs(monkeypatch):
    text = README.read_text()
    m = re.search(r"## Chat and tools from Python\n.*?```python\n(.*?)```", text, re.S)
    assert m, "README: the 'Chat and tools from Python' example is missing"
    code = m.group(1)
    path = scripted_path("tool")
    gpt = scripted_model("tool")
    monkeypatch.setattr(mlx_gptoss, "load", lambda *a, **k: gpt)
    buf = io.StringIO()
    ns = {"print": lambda *a, **k: print(*a, **k, file=buf)}
    exec(compile(code, "README.md", "exec"), ns)
    out = buf.getvalue().strip()
    assert out.startswith('model calls get_weather {"city": "Paris"}\nIt is sunny and 21 C.'), out
    assert out.endswith("\nIt is sunny and 21 C."), out  # the auto_tools turn
    chat = ns["chat"]
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"] * 2
    assert path.is_dir()


# ------------------------------------------------------------------------------------- interruption

def test_closing_the_stream_drops_the_reply_keeps_the_question():
    gpt = scripted_model("reason")
    s = gpt.session()
    gen = s.send("Hi", temperature=0)
    first = next(gen)
    assert first.kind == "reasoning"
    gen.close()
    assert s.messages == [{"role": "user", "content": "Hi"}]
    evs, stats = run(s.send("Hello again", temperature=0))
    assert answer(evs) == "Hello there!"
    assert stats.cached_tokens > 0 and stats.prefilled_tokens < 20  # from the end of the last message
    assert [m["role"] for m in s.messages] == ["user", "user", "assistant"]


def test_ctrl_c_in_the_loop_keeps_the_session_consistent():
    gpt = scripted_model("reason")
    s = gpt.session()
    with pytest.raises(KeyboardInterrupt):
        for ev in s.send("Hi", temperature=0):
            if ev.kind == "content":
                raise KeyboardInterrupt
    assert s.messages == [{"role": "user", "content": "Hi"}]
    evs, _ = run(s.send("Again", temperature=0))
    assert answer(evs) == "Hello there!"


def test_keep_partial_and_cancel():
    gpt = scripted_model("reason")
    s = gpt.session()
    evs = []
    for ev in s.send("Hi", temperature=0, keep_partial=True):
        evs.append(ev)
        if ev.kind == "content":
            s.cancel()  # e.g. from another thread
    assert evs[-1].kind == "done" and evs[-1].stats.stop_reason == "cancelled"
    assert s.messages[0] == {"role": "user", "content": "Hi"} and len(s.messages) == 2
    assert summary(s.messages[1]) == {"role": "assistant", "reasoning": "The user greets.", "content": "Hello"}
    assert s.last_stats.stop_reason == "cancelled"
    evs, stats = run(s.send("More", temperature=0))  # the cancel flag does not stick
    assert stats.stop_reason == "return"


def test_a_new_send_ends_an_unfinished_one():
    gpt = scripted_model("reason")
    s = gpt.session()
    gen = s.send("Hi", temperature=0)
    next(gen)
    evs, _ = run(s.send("Second", temperature=0))
    assert answer(evs) == "Hello there!"
    assert [m["role"] for m in s.messages] == ["user", "user", "assistant"]


# ------------------------------------------------------------------------------- settings and saving

def test_save_and_load_round_trip():
    gpt = scripted_model("reason")
    s = gpt.session(reasoning_effort="high", developer="Be brief.")
    run(s.send("Hi", temperature=0))
    d = json.loads(json.dumps(s.to_dict()))
    t = Session.from_dict(gpt, d)
    assert t.render() == s.render() and t.messages == s.messages
    u = gpt.session(**d)
    assert u.render() == s.render()
    evs, stats = run(t.send("Next", temperature=0))
    assert answer(evs) == "Hello there!" and stats.prefilled_tokens == stats.prompt_tokens
    with pytest.raises(GptOssError, match="messages"):
        Session.from_dict(gpt, {"messages": "nope"})
    with pytest.raises(GptOssError, match="role"):
        gpt.session(messages=[{"role": "nobody"}])


def test_settings_changes_apply_to_the_next_turn():
    gpt = scripted_model("reason")
    s = gpt.session()
    _, a = run(s.send("Hi", temperature=0))
    s.set_effort("low")
    s.set_developer("Talk like a pirate.")
    text = __import__("mlx_gptoss").harmony.encoding().decode(s.render())
    assert "Reasoning: low" in text and "Talk like a pirate." in text
    _, b = run(s.send("Again", temperature=0))
    assert b.prefilled_tokens == b.prompt_tokens  # the system prompt changed: nothing matched
    with pytest.raises(GptOssError, match="reasoning_effort"):
        s.set_effort("extreme")
    s.reset()
    assert s.messages == []
    _, c = run(s.send("Fresh", temperature=0))
    assert c.prefilled_tokens == c.prompt_tokens


def test_oldest_turns_are_dropped_to_fit_and_reported():
    gpt = scripted_model("reason")
    base = len(gpt.session().render([{"role": "user", "content": "Question 0"}]))
    s = gpt.session(max_context=base + 60)
    dropped = []
    for i in range(4):
        evs, stats = run(s.send(f"Question {i}", temperature=0))
        assert answer(evs) == "Hello there!"
        dropped.append(stats.dropped_messages)
    assert sum(dropped) > 0 and s.dropped == sum(dropped)
    assert s.messages[0]["role"] == "user" and len(s.messages) < 8
    strict = gpt.session(max_context=base + 60, drop_oldest=False)
    run(strict.send("Question 0", temperature=0))
    with pytest.raises(GptOssError, match="context cap"):  # once the prompt alone is over the cap
        for _ in range(6):
            run(strict.send("Another question", temperature=0))
    assert strict.dropped == 0 and strict.messages[-1]["role"] == "assistant"  # the refused question is not kept


def test_after_dropping_turns_the_following_turns_are_incremental_again():
    """A 200-token context (the newcomer's `chat --ctx 200`): once turns must go, enough go that the
    conversation fills at most half the context; the turns after that prefill only what is new, instead of
    dropping one turn and re-prefilling the whole conversation every turn."""
    from mlx_gptoss.chat import DROP_TO

    gpt = scripted_model("final")
    s = gpt.session(max_context=200)
    turns = []
    for i in range(12):
        _, stats = run(s.send(f"Say hi {i}", temperature=0))
        turns.append(stats)
    drops = [i for i, t in enumerate(turns) if t.dropped_messages]
    assert drops and len(drops) <= 3, [t.dropped_messages for t in turns]  # not one drop per turn
    incremental = turns[1].prefilled_tokens  # a normal second turn: the new message and the reply's tail
    assert incremental < turns[1].prompt_tokens / 3
    for i in drops:
        assert turns[i].prompt_tokens <= 200 * DROP_TO  # the conversation after the drop fits the documented half
        if i + 1 < len(turns) and i + 1 not in drops:
            assert turns[i + 1].prefilled_tokens == incremental, (i, turns[i + 1])
            assert turns[i + 1].cached_tokens == turns[i + 1].prompt_tokens - incremental
    assert sum(t.prefilled_tokens == incremental for t in turns) >= len(turns) - 1 - len(drops)


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    forget_models()


def test_auto_tools_answers_an_unknown_tool_with_an_error():
    gpt = scripted_model("tool")

    def get_time(zone: str) -> str:
        """The time in a zone."""
        return "12:00"

    s = gpt.session(tools=[get_time])
    evs = list(s.send("What's the weather in Paris?", temperature=0, auto_tools=True, max_tool_rounds=2,
                      max_tokens=60))
    assert [e.kind for e in evs].count("done") == 2
    errors = [m for m in s.messages if m["role"] == "tool"]
    assert errors and errors[0]["content"] == "error: there is no tool named 'get_weather'; available: get_time"


def test_schema_only_tools_are_left_to_the_caller():
    gpt = scripted_model("tool")
    spec = {"name": "get_weather", "description": "Current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    s = gpt.session(tools=[spec])
    evs = list(s.send("What's the weather in Paris?", temperature=0, auto_tools=True))
    assert [e.kind for e in evs].count("done") == 1 and evs[-1].stats.stop_reason == "call"
    assert s.messages[-1]["role"] == "assistant" and s.messages[-1]["tool_calls"][0]["name"] == "get_weather"


# --------------------------------------------------- issue 10: bad input never loses or corrupts a session

def test_a_message_that_cannot_fit_is_refused_with_the_session_unchanged():
    gpt = scripted_model("reason")
    base = len(gpt.session().render([{"role": "user", "content": "Question 0"}]))
    s = gpt.session(max_context=base + 200)
    run(s.send("Question 0", temperature=0))
    run(s.send("Question 1", temperature=0))
    before, dropped = json.loads(json.dumps(s.messages)), s.dropped
    with pytest.raises(GptOssError, match="does not fit the context.*nothing was dropped"):
        s.send("word " * 600, temperature=0)  # alone it is over the cap: refused at once
        pytest.fail("send() must refuse before returning a stream")
    assert s.messages == before and s.dropped == dropped
    evs, stats = run(s.send("Question 2", temperature=0))  # the session goes on, its cache intact
    assert answer(evs) == "Hello there!" and stats.cached_tokens > 0


def test_turns_are_dropped_only_for_a_message_that_then_fits():
    gpt = scripted_model("reason")
    base = len(gpt.session().render([{"role": "user", "content": "Question 0"}]))
    s = gpt.session(max_context=base + 90)
    for i in range(2):
        run(s.send(f"Question {i}", temperature=0))
    long = "word " * 60  # fits only once the earlier turns are gone
    evs, stats = run(s.send(long, temperature=0, max_tokens=5))
    assert stats.dropped_messages == s.dropped > 0 and s.messages[0]["role"] == "user"
    assert {"role": "user", "content": long} in s.messages and len(s.messages) < 6


@pytest.mark.parametrize("kw,match", [
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"top_p": float("nan")}, "top_p"), ({"min_p": float("inf")}, "min_p"), ({"top_k": 1.5}, "top_k"),
    ({"top_k": True}, "top_k"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": "7"}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"temperature": -0.5}, "temperature")])
def test_every_sampling_option_is_checked_before_anything_runs(kw, match):
    gpt = scripted_model("reason")
    s = gpt.session()
    with pytest.raises(GptOssError, match=match):
        s.send("Hi", **kw)  # at once, not at the first next()
    assert s.messages == []
    with pytest.raises(GptOssError, match=match):
        gpt.chat([{"role": "user", "content": "Hi"}], **kw)


def test_nan_weights_stop_at_the_first_token_with_the_likely_cause(tmp_path):
    gpt = random_real_vocab_model(tmp_path / "nan", layers=2, seed=4, nan="model.norm.weight")
    with pytest.raises(GptOssError, match="NaN or infinity.*corrupt or wrongly converted.*dtype"):
        list(gpt.chat([{"role": "user", "content": "Hi"}], max_tokens=50))
    s = gpt.session()
    with pytest.raises(GptOssError, match="NaN"):
        list(s.send("Hi", max_tokens=50))
    assert s.messages == []  # the question was not taken
