"""GptOss.chat() through the real model path: scripted checkpoints (exact events), malformed output, a
random-weights model on the real vocabulary, context cap, chunked prefill, sampling options."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest

from mlx_gptoss import GptOssError, harmony
from mlx_gptoss.chat import Runner
from scripted_checkpoint import (SCRIPTS, forget_models, get_weather, harmony_specials, offline_harmony,
                                 random_real_vocab_model, scripted_model, scripted_path)

HI = [{"role": "user", "content": "Hello"}]
SPECIAL_TEXTS = set(harmony_specials().values())


def events(gpt, messages=HI, **kw):
    evs = list(gpt.chat(messages, temperature=0, **kw))
    assert evs[-1].kind == "done" and all(e.kind != "done" for e in evs[:-1])
    return [(e.kind, e.text) for e in evs[:-1]], evs[-1].stats, evs


def merged(evs):
    """Consecutive pieces of one kind joined: [("reasoning", "The user greets."), ...]."""
    out = []
    for kind, text in evs:
        if out and out[-1][0] == kind and kind != "tool_call":
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


def test_analysis_then_final():
    gpt = scripted_model("reason")
    evs, stats, _ = events(gpt)
    assert evs == [("reasoning", "The"), ("reasoning", " user"), ("reasoning", " gre"), ("reasoning", "ets"),
                   ("reasoning", "."), ("content", "Hello"), ("content", " there"), ("content", "!")]
    enc = harmony.encoding()
    prompt = gpt.encode_chat(HI)
    assert stats.prompt_tokens == stats.prefilled_tokens == len(prompt) and stats.cached_tokens == 0
    assert stats.generated_tokens == len(enc.encode(SCRIPTS["reason"][0], allowed_special="all"))
    assert stats.stop_reason == "return" and not stats.malformed and stats.warnings == []
    assert stats.time_to_first_token > 0 and stats.prefill_tps > 0 and stats.decode_tps > 0
    assert stats.peak_memory > 0 and stats.dropped_messages == 0


def test_final_only_and_generate():
    gpt = scripted_model("final")
    evs, stats, _ = events(gpt, max_tokens=50)
    assert merged(evs) == [("content", "Just the answer.")]
    assert stats.stop_reason == "return"
    assert gpt.generate("Hi there", temperature=0) == "Just the answer."


def test_tool_call_event():
    gpt = scripted_model("tool")
    evs, stats, raw = events(gpt, [{"role": "user", "content": "Weather in Paris?"}], tools=[get_weather])
    assert merged(evs) == [("reasoning", "Need the weather."), ("tool_call", '{"city": "Paris"}')]
    call = raw[-2]
    assert call.recipient == "functions.get_weather" and call.name == "get_weather"
    assert call.arguments == '{"city": "Paris"}'
    assert stats.stop_reason == "call"


def test_tool_result_then_answer():
    gpt = scripted_model("tool")
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "reasoning": "Need the weather.",
             "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]},
            {"role": "tool", "name": "get_weather", "content": '{"city": "Paris", "temp_c": 21, "sky": "sunny"}'}]
    evs, stats, _ = events(gpt, msgs, tools=[get_weather])
    assert merged(evs) == [("content", "It is sunny and 21 C.")]
    assert stats.stop_reason == "return"


def test_special_token_inside_a_message_is_not_shown():
    # "<|start|>" ends the answer; " there" is a header that never opens a message: kept hidden, flagged
    evs, stats, _ = events(scripted_model("bad_special"))
    assert evs == [("content", "Hi"), ("reasoning", " there")]
    assert stats.malformed and "<|start|>" in stats.warnings[0] and stats.stop_reason == "return"


def test_output_without_a_header_is_not_shown_as_the_answer():
    evs, stats, _ = events(scripted_model("no_header"))
    assert merged(evs) == [("reasoning", "hello world")]  # no channel: hidden like chain-of-thought, flagged
    assert stats.malformed and stats.stop_reason == "return"


def test_a_channel_that_never_closes_stops_at_max_tokens():
    evs, stats, _ = events(scripted_model("loop"), max_tokens=20)
    assert merged(evs) == [("reasoning", " again and" * 8 + " again")]
    assert stats.stop_reason == "max_tokens" and stats.generated_tokens == 20 and not stats.malformed


def test_generation_stops_at_the_context_cap():
    gpt = scripted_model("loop")
    n = len(gpt.encode_chat(HI))
    _, stats, _ = events(gpt, max_context=n + 7)
    assert stats.stop_reason == "context" and stats.generated_tokens == 7


def test_prompt_over_the_context_cap_is_a_clear_error():
    gpt = scripted_model("final")
    n = len(gpt.encode_chat(HI))
    with pytest.raises(GptOssError, match=f"prompt has {n} tokens.*context cap of {n - 1}"):
        list(gpt.chat(HI, max_context=n - 1))
    with pytest.raises(GptOssError, match="context cap"):
        list(gpt.chat(HI, max_context=n))  # no room for a single token


@pytest.mark.parametrize("kw,match", [({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"),
                                      ({"top_k": -2}, "top_k"), ({"min_p": "x"}, "min_p"),
                                      ({"max_tokens": 0}, "max_tokens"), ({"reasoning_effort": "max"}, "effort")])
def test_bad_options_are_clear_errors(kw, match):
    with pytest.raises(GptOssError, match=match):
        list(scripted_model("final").chat(HI, **kw))


def test_stream_parser_never_raises_on_random_tokens():
    offline_harmony()
    rng = random.Random(0)
    specials = sorted(harmony_specials())
    for trial in range(200):
        p = harmony.StreamParser()
        pieces = []
        for _ in range(rng.randint(1, 40)):
            pick = rng.random()
            tok = rng.choice(specials) if pick < 0.3 else (
                rng.choice([harmony.START, harmony.CHANNEL, harmony.MESSAGE, harmony.END]) if pick < 0.5
                else rng.randrange(harmony.N_ORDINARY))
            pieces += p.feed(tok)
            if tok in harmony.STOP_TOKENS:
                break
        pieces += p.finish("return")
        for piece in pieces:
            assert piece.kind in ("reasoning", "content", "tool_call")
            assert not any(s in piece.text for s in SPECIAL_TEXTS if piece.kind != "tool_call"), piece


# ------------------------------------------------------------------ a random model on the real vocab

@pytest.fixture(scope="module")
def random_gpt(tmp_path_factory):
    return random_real_vocab_model(tmp_path_factory.mktemp("rnd") / "ckpt", layers=2, seed=3)


def test_random_model_output_degrades_to_content(random_gpt):
    kinds = set()
    for seed in range(3):
        evs = list(random_gpt.chat(HI, temperature=1.0, seed=seed, max_tokens=60))
        stats = evs[-1].stats
        assert stats.generated_tokens <= 60 and stats.stop_reason in ("return", "call", "max_tokens")
        for e in evs[:-1]:
            kinds.add(e.kind)
            assert e.kind in ("reasoning", "content", "tool_call")
            if e.kind != "tool_call":
                assert not any(s in e.text for s in SPECIAL_TEXTS)
        text = "".join(e.text for e in evs[:-1] if e.kind in ("reasoning", "content", "preamble"))
        assert stats.malformed and text  # random tokens: no header; kept (hidden), with the warning
    assert "reasoning" in kinds


def test_seed_makes_sampling_repeatable(random_gpt):
    a = [(e.kind, e.text) for e in random_gpt.chat(HI, seed=7, max_tokens=20, top_k=50, top_p=0.9)]
    b = [(e.kind, e.text) for e in random_gpt.chat(HI, seed=7, max_tokens=20, top_k=50, top_p=0.9)]
    assert a[:-1] == b[:-1]


def test_chunked_prefill_matches_one_pass(random_gpt):
    ids = random_gpt.encode_chat(HI)
    assert len(ids) > 40
    one = Runner(random_gpt)
    one.chunk = 10_000
    chunked = Runner(random_gpt)
    chunked.chunk = 5  # smaller than the sliding window of 8: exercises the rotating cache across chunks
    a, n_a = one.prefill(ids)
    b, n_b = chunked.prefill(ids)
    assert n_a == n_b == len(ids)
    ref = random_gpt.model(mx.array([ids]))[0, -1]
    np.testing.assert_allclose(np.array(a), np.array(ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(b), np.array(ref), rtol=1e-4, atol=1e-4)


def test_scripted_checkpoint_is_a_hub_mxfp4_checkpoint():
    folder = scripted_path("final")
    gpt = scripted_model("final")
    assert gpt.config.vocab_size == 201088 and gpt.config.quantization == "mxfp4"
    assert (folder / "tokenizer.json").is_file() and (folder / "model.safetensors.index.json").is_file()


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    forget_models()


def test_multibyte_text_streams_whole_characters():
    offline_harmony()
    enc = harmony.encoding()
    text = "héllo 日本語 😀🎉 ∑x"
    p = harmony.StreamParser()
    pieces = []
    for t in enc.encode(f"<|channel|>final<|message|>{text}<|return|>", allowed_special="all"):
        pieces += p.feed(t)
    assert "".join(x.text for x in pieces) == text and "\ufffd" not in "".join(x.text for x in pieces)
    assert not p.malformed and p.stopped


def test_stats_are_json_able():
    import json

    *_, done = scripted_model("final").chat(HI, temperature=0)
    d = json.loads(json.dumps(done.stats.to_dict()))
    assert d["stop_reason"] == "return" and d["generated_tokens"] == done.stats.generated_tokens


@pytest.mark.parametrize("text,content,hidden", [
    ("<|channel|>final<|message|>Hi<|end|>junk after", "Hi", "junk after"),  # text where <|start|> must come
    ("<|channel|>final hello<|return|>", "", "final hello"),  # a header that never opens a message
    ("<|channel|>analysis<|message|>a<|constrain|>b<|return|>", "", "ab"),  # markup in reasoning: dropped
    ("<|channel|>finale<|message|>leaked thoughts<|return|>", "", "leaked thoughts"),  # an unknown channel
    ("<|message|>no channel<|return|>", "", "no channel"),  # a missing channel
])
def test_scripted_bad_sequences_in_the_parser(text, content, hidden):
    offline_harmony()
    p = harmony.StreamParser()
    pieces = []
    for t in harmony.encoding().encode(text, allowed_special="all"):
        pieces += p.feed(t)
    pieces += p.finish("return")
    assert "".join(x.text for x in pieces if x.kind == "content") == content
    assert "".join(x.text for x in pieces if x.kind == "reasoning") == hidden
    assert p.malformed and p.warnings
