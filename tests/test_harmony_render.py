"""Rendering against openai-harmony's own Conversation rendering (exact token equality), tools as JSON
schema, and the offline vocabulary derived from a tokenizer.json."""

from __future__ import annotations

import enum
import hashlib
import json
import os
from typing import Literal, Optional

import pytest
from openai_harmony import (Author, Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent,
                            ToolDescription)

from mlx_gptoss import GptOssError, harmony
from scripted_checkpoint import forget_models, get_weather, offline_harmony, scripted_model

DATE = "2025-08-05"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name, e.g. \"Paris\"."}},
                  "required": ["city"]}


@pytest.fixture(scope="module")
def enc():
    offline_harmony()
    return harmony.encoding()


def theirs(enc, messages) -> list[int]:
    return list(enc.render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT))


def system(effort="medium", cutoff="2024-06"):
    return Message.from_role_and_content(
        Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort[effort.upper()])
        .with_conversation_start_date(DATE).with_knowledge_cutoff(cutoff))


def user(text):
    return Message.from_role_and_content(Role.USER, text)


def ours(messages, **kw) -> list[int]:
    return harmony.render(messages, date=DATE, **kw)


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_system_effort_date_cutoff(enc, effort):
    got = ours([{"role": "user", "content": "Hi"}], reasoning_effort=effort)
    assert got == theirs(enc, [system(effort), user("Hi")])
    text = enc.decode(got)
    assert f"Reasoning: {effort}" in text and f"Current date: {DATE}" in text and "Knowledge cutoff: 2024-06" in text
    assert got[-2:] == [harmony.START, enc.encode("assistant")[0]]


def test_knowledge_cutoff_and_identity(enc):
    got = ours([{"role": "user", "content": "Hi"}], knowledge_cutoff="2025-01")
    assert got == theirs(enc, [system(cutoff="2025-01"), user("Hi")])
    assert "You are ChatGPT, a large language model trained by OpenAI." in enc.decode(got)


def test_system_message_becomes_developer_instructions(enc):
    """As the official chat template and vLLM do: the identity line stays the spec's."""
    got = ours([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}],
               developer="Be brief.")
    dev = Message.from_role_and_content(Role.DEVELOPER,
                                        DeveloperContent.new().with_instructions("Be brief.\n\nYou are a pirate."))
    assert got == theirs(enc, [system(), dev, user("Hi")])
    text = enc.decode(got)
    assert "You are ChatGPT, a large language model trained by OpenAI." in text
    assert text.index("You are a pirate.") > text.index("<|start|>developer")


def test_developer_instructions(enc):
    got = ours([{"role": "user", "content": "Hi"}], developer="Answer in French.")
    dev = Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions("Answer in French."))
    assert got == theirs(enc, [system(), dev, user("Hi")])
    # a developer message in the list is the same thing
    assert ours([{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]) == got


def test_function_tools_from_python_and_dict(enc):
    dev = Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions("Be brief.")
                                        .with_function_tools([ToolDescription.new("get_weather", "Current weather in a city.",
                                                                                  parameters=WEATHER_SCHEMA)]))
    expected = theirs(enc, [system(), dev, user("Weather?")])
    msgs = [{"role": "user", "content": "Weather?"}]
    assert ours(msgs, tools=[get_weather], developer="Be brief.") == expected
    spec = {"name": "get_weather", "description": "Current weather in a city.", "parameters": WEATHER_SCHEMA}
    assert ours(msgs, tools=[spec], developer="Be brief.") == expected
    assert ours(msgs, tools=[{"type": "function", "function": spec}], developer="Be brief.") == expected
    text = enc.decode(expected)
    assert "type get_weather" in text and "'functions'" in text


def test_tools_without_instructions(enc):
    dev = Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_function_tools(
        [ToolDescription.new("get_weather", "Current weather in a city.", parameters=WEATHER_SCHEMA)]))
    assert ours([{"role": "user", "content": "Weather?"}], tools=[get_weather]) == theirs(enc, [system(), dev, user("Weather?")])


def test_history_drops_analysis_after_a_final_answer(enc):
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "reasoning": "SECRET-THOUGHT adds.", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    expected = theirs(enc, [system(), user("2+2?"),
                            Message.from_role_and_content(Role.ASSISTANT, "SECRET-THOUGHT adds.").with_channel("analysis"),
                            Message.from_role_and_content(Role.ASSISTANT, "4").with_channel("final"),
                            user("And 3+3?")])
    got = ours(msgs)
    assert got == expected
    assert "SECRET-THOUGHT" not in enc.decode(got)
    assert harmony.RETURN not in got  # a finished answer is stored with <|end|>
    final = enc.encode("<|start|>assistant<|channel|>final<|message|>4<|end|>", allowed_special="all")
    assert any(got[i:i + len(final)] == final for i in range(len(got)))


def test_tool_call_and_result_keep_the_reasoning(enc):
    """An unfinished turn renders the call exactly as gpt-oss writes it (channel before recipient, what the
    harmony spec shows the model producing); openai-harmony reads it back as the same message."""
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "reasoning": "KEEP-THIS need weather.", "tool_calls": [call]},
            {"role": "tool", "name": "get_weather", "content": '{"temp_c": 21}'}]
    dev = Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_function_tools(
        [ToolDescription.new("get_weather", "Current weather in a city.", parameters=WEATHER_SCHEMA)]))
    head = list(enc.render_conversation(Conversation.from_messages([
        system(), dev, user("Weather in Paris?"),
        Message.from_role_and_content(Role.ASSISTANT, "KEEP-THIS need weather.").with_channel("analysis")])))
    as_written = enc.encode('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json'
                            '<|message|>{"city": "Paris"}<|call|>', allowed_special="all")
    result = theirs(enc, [Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"),
                                                          '{"temp_c": 21}').with_channel("commentary")
                          .with_recipient("assistant")])
    got = ours(msgs, tools=[get_weather])
    assert got == head + as_written + result
    back = enc.parse_messages_from_completion_tokens(as_written[2:], Role.ASSISTANT)[0]
    assert (back.channel, back.recipient, back.content_type) == ("commentary", "functions.get_weather",
                                                                  "<|constrain|>json")
    text = enc.decode(got)
    assert "KEEP-THIS" in text and "<|call|>" in text and "functions.get_weather to=assistant" in text


def test_multi_turn_with_tools_and_finals(enc):
    call = {"name": "get_weather", "arguments": {"city": "Oslo"}}  # a dict is sent as JSON
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "reasoning": "greet", "content": "Hello!"},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "reasoning": "call it", "tool_calls": [call]},
            {"role": "tool", "name": "functions.get_weather", "content": "cold"},
            {"role": "assistant", "reasoning": "answer", "content": "It is cold."},
            {"role": "user", "content": "Thanks"}]
    a = lambda text, ch: Message.from_role_and_content(Role.ASSISTANT, text).with_channel(ch)  # noqa: E731
    dev = Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions("Be kind.")
                                        .with_function_tools([ToolDescription.new("get_weather", "Current weather in a city.",
                                                                                  parameters=WEATHER_SCHEMA)]))
    expected = theirs(enc, [
        system("high"), dev, user("Hi"), a("greet", "analysis"), a("Hello!", "final"), user("Weather in Oslo?"),
        a('{"city": "Oslo"}', "commentary").with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), "cold")
        .with_channel("commentary").with_recipient("assistant"),
        a("It is cold.", "final"), user("Thanks")])
    got = ours(msgs, tools=[get_weather], developer="Be kind.", reasoning_effort="high")
    assert got == expected
    text = enc.decode(got)
    assert not any(w in text for w in ("greet", "call it", "answer<"))  # all before the last final: dropped
    # openai-harmony's own auto-drop stops at the first final answer: it would keep "call it" and "answer"
    kept = enc.decode(theirs(enc, [system("high"), dev, user("Hi"), a("greet", "analysis"), a("Hello!", "final"),
                                   a("answer", "analysis"), a("It is cold.", "final")]))
    assert "answer<" in kept and "greet" not in kept


def test_encode_chat_on_a_model(enc):
    gpt = scripted_model("final")
    msgs = [{"role": "user", "content": "Hi"}]
    assert gpt.encode_chat(msgs, reasoning_effort="low", date=DATE) == theirs(enc, [system("low"), user("Hi")])


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


def forecast(city: str, days: int = 3, unit: Unit = Unit.C, hourly: bool = False,
             kind: Literal["rain", "sun"] = "sun", tags: list[str] | None = None, extra: Optional[dict] = None):
    """Weather forecast.

    More text here.

    Args:
        city: Where.
        days (int): How many days.
    """


def test_tool_schema_from_a_python_function():
    t = harmony.tool_spec(forecast)
    assert t.name == "forecast" and t.description == "Weather forecast. More text here."
    p = t.parameters
    assert p["required"] == ["city"]
    props = p["properties"]
    assert props["city"] == {"type": "string", "description": "Where."}
    assert props["days"] == {"type": "integer", "description": "How many days.", "default": 3}
    assert props["unit"] == {"type": "string", "enum": ["celsius", "fahrenheit"]}
    assert props["hourly"] == {"type": "boolean", "default": False}
    assert props["kind"] == {"type": "string", "enum": ["rain", "sun"], "default": "sun"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "default": None}
    assert props["extra"] == {"type": "object", "default": None}


def sphinx(a: float, b):
    """Add.

    :param a: first
    :param b: second
    """
    return a + b


def test_tool_sphinx_docstring_and_run():
    t = harmony.tool_spec(sphinx)
    assert t.parameters["properties"] == {"a": {"type": "number", "description": "first"},
                                          "b": {"type": "string", "description": "second"}}
    assert t.run('{"a": 1.5, "b": 2}') == "3.5"
    assert t.run("not json").startswith("error: invalid arguments for sphinx")
    assert t.run('{"a": 1}').startswith("error: TypeError")


@pytest.mark.parametrize("bad,match", [
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "tool", "content": "x"}], "name"),
    ([{"role": "assistant", "tool_calls": [{"arguments": "{}"}]}], "tool call"),
])
def test_bad_messages_are_clear_errors(enc, bad, match):
    with pytest.raises(GptOssError, match=match):
        ours(bad)


def test_bad_settings_are_clear_errors(enc):
    with pytest.raises(GptOssError, match="reasoning_effort 'max'"):
        ours([{"role": "user", "content": "x"}], reasoning_effort="max")
    with pytest.raises(GptOssError, match="name"):
        ours([], tools=[{"description": "no name"}])
    with pytest.raises(GptOssError, match="used twice"):
        ours([], tools=[get_weather, get_weather])
    with pytest.raises(GptOssError, match="Python function"):
        ours([], tools=[42])


# ------------------------------------------------------------------------------- offline vocabulary

@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty project cache, no TIKTOKEN_ENCODINGS_BASE (the loaded encoding itself stays)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    return tmp_path


def test_vocab_derived_from_tokenizer_json_is_o200k_base(fresh_cache):
    tok = offline_harmony() / "tokenizer.json"
    folder = harmony.ensure_vocab(tok.parent)
    f = folder / harmony.VOCAB_FILE
    assert folder == fresh_cache / "cache" / "gptoss-mac"
    assert hashlib.sha256(f.read_bytes()).hexdigest() == harmony.VOCAB_SHA256
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(folder)
    mtime = f.stat().st_mtime_ns
    harmony.ensure_vocab(None)  # found in the cache: nothing derived again, no tokenizer needed
    assert f.stat().st_mtime_ns == mtime


def test_missing_tokenizer_json_is_named(fresh_cache):
    with pytest.raises(GptOssError, match=r"tokenizer\.json is missing"):
        harmony.ensure_vocab(fresh_cache / "no-tokenizer-here")


def test_wrong_tokenizer_json_is_refused(fresh_cache):
    src = json.loads((offline_harmony() / "tokenizer.json").read_text())
    vocab = src["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (1000, 1001)]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ranks swapped: same size, different vocabulary
    (fresh_cache / "m").mkdir()
    (fresh_cache / "m" / "tokenizer.json").write_text(json.dumps(src))
    with pytest.raises(GptOssError, match="sha256"):
        harmony.ensure_vocab(fresh_cache / "m")
    (fresh_cache / "m" / "tokenizer.json").write_text("{not json")
    with pytest.raises(GptOssError, match="not a readable tokenizer.json"):
        harmony.ensure_vocab(fresh_cache / "m")
    assert not (fresh_cache / "cache" / "gptoss-mac" / harmony.VOCAB_FILE).exists()


def test_chat_on_a_folder_without_tokenizer_names_the_file(fresh_cache, monkeypatch):
    gpt = scripted_model("final")
    bare = fresh_cache / "bare"
    bare.mkdir()
    monkeypatch.setattr(harmony.vocabulary, "_ENCODING", None)  # as in a fresh process
    monkeypatch.setattr(gpt, "path", bare)
    with pytest.raises(GptOssError, match=r"bare/tokenizer\.json is missing"):
        list(gpt.chat([{"role": "user", "content": "Hi"}]))


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    forget_models()
