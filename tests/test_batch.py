"""Continuous batching in the library (mlx_gptoss.batch): a batched decode step gives each row the logits
its request gets alone (also past the sliding window, and with the 8-bit KV cache); requests that join,
leave, are cancelled or prefill in between each generate exactly what they generate alone (greedy and
seeded sampling); a prefill runs one chunk per step and stops between chunks when cancelled."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_gptoss.batch import Batch, Cancel, Request, step_lazy
from mlx_gptoss.chat import Reply, Runner, generate_events
from mlx_gptoss.offload.kv import QuantizedKV
from scripted_checkpoint import Tokens, forget_models, random_real_vocab_model


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    g = random_real_vocab_model(tmp_path_factory.mktemp("batch") / "ckpt", layers=2, seed=11)
    yield g
    forget_models()


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(1000 + 37 * i + 101 * salt) % 199000 for i in range(n)]


def solo(gpt, ids, **sampling):
    parser = Tokens()
    stats = list(generate_events(Runner(gpt), ids, cap=4096, parser=parser, **sampling))[-1].stats
    return parser.ids, stats.stop_reason


def run_batch(batch: Batch, reqs: dict, joins: dict[int, list] = None, cancels: dict[int, list] = None,
              limit: int = 500):
    """Step until idle; joins/cancels: step number -> names to add/cancel then. Returns name -> stop reason."""
    joins, cancels, stops = joins or {}, cancels or {}, {}
    names = {id(r): n for n, r in reqs.items()}
    for step in range(limit):
        for n in joins.get(step, []):
            batch.add(reqs[n])
        for n in cancels.get(step, []):
            reqs[n].cancel.set()
        if batch.idle and step > max(joins, default=0):
            return stops
        for r, item in batch.step():
            assert isinstance(item, list), item
            if item and item[-1].kind == "done":
                stops[names[id(r)]] = item[-1].stats.stop_reason
    raise AssertionError("the batch did not finish")


def request(gpt, ids, **sampling) -> Request:
    return Request(Runner(gpt), ids, Reply(ids, cap=4096, parser=Tokens(), **sampling))


@pytest.fixture(scope="module")
def tiny_gpt(tiny_ckpt):
    import mlx_gptoss

    return mlx_gptoss.load(tiny_ckpt, allow_download=False)


@pytest.mark.parametrize("kv", ["float", "8-bit"])
def test_batched_step_gives_each_row_its_solo_logits(tiny_gpt, kv, monkeypatch):
    gpt = tiny_gpt
    if kv == "8-bit":  # mlx_gptoss.offload.kv's cache for the full-attention layers
        monkeypatch.setattr(gpt.model, "full_attention_cache", lambda: QuantizedKV(group_size=32))
    # window 8: the last two have wrapped their sliding window
    prompts = [[t % 512 for t in p] for p in (prompt(3), prompt(13, 1), prompt(30, 2))]
    alone, together = [Runner(gpt) for _ in prompts], [Runner(gpt) for _ in prompts]
    for a, b, p in zip(alone, together, prompts):
        a.prefill(p)
        b.prefill(p)
    tokens = [mx.array([p[-1]]) for p in prompts]
    for _ in range(12):
        rows = step_lazy(together, tokens)
        for a, t, row in zip(alone, tokens, rows):
            ref = a.step_lazy(t)
            scale = float(mx.abs(ref).max())
            assert float(mx.abs(row - ref).max()) <= 1e-4 * scale
            assert int(mx.argmax(row)) == int(mx.argmax(ref))
        tokens = [mx.argmax(r)[None] for r in rows]
    assert [len(r.ids) for r in together] == [len(p) + 12 for p in prompts]
    if kv == "8-bit":
        assert isinstance(together[0].cache[1], QuantizedKV)


def test_joining_leaving_requests_each_generate_their_solo_output(gpt):
    specs = {"greedy": (prompt(5), dict(temperature=0, max_tokens=14)),
             "seeded": (prompt(20, 1), dict(temperature=1.0, top_p=0.9, seed=7, max_tokens=40)),
             "other_seed": (prompt(9, 2), dict(temperature=1.0, seed=8, max_tokens=9)),
             "short": (prompt(40, 3), dict(temperature=0, max_tokens=3))}
    reqs = {n: request(gpt, p, **s) for n, (p, s) in specs.items()}
    batch = Batch(gpt, chunk=256)
    stops = run_batch(batch, reqs, joins={0: ["greedy", "seeded"], 4: ["other_seed"], 6: ["short"]})
    for n, (p, s) in specs.items():
        ids, stop = solo(gpt, p, **s)
        assert reqs[n].reply.parser.ids == ids, n
        assert stops[n] == stop == "max_tokens"
    assert max(r.batch for r in reqs.values()) >= 3


def test_cancel_mid_batch_and_between_prefill_chunks(gpt):
    specs = {"a": (prompt(6), dict(temperature=0, max_tokens=16)),
             "b": (prompt(7, 1), dict(temperature=0, max_tokens=16)),
             "long": (prompt(300, 2), dict(temperature=0, max_tokens=4))}
    reqs = {n: request(gpt, p, **s) for n, (p, s) in specs.items()}
    batch = Batch(gpt, chunk=64)
    stops = run_batch(batch, reqs, joins={0: ["a", "b"], 3: ["long"]}, cancels={6: ["b"], 8: ["long"]})
    assert stops == {"a": "max_tokens", "b": "cancelled", "long": "cancelled"}
    assert reqs["a"].reply.parser.ids == solo(gpt, specs["a"][0], **specs["a"][1])[0]
    b = reqs["b"].reply.parser.ids
    assert 0 < len(b) < 16 and b == solo(gpt, specs["b"][0], **specs["b"][1])[0][:len(b)]
    long = reqs["long"]
    assert not long.reply.parser.ids and 0 < len(long.runner.ids) < 300  # stopped between chunks
    assert not long.runner.dirty  # a consistent cache: the same prompt later resumes from it
    assert long.runner.reusable(specs["long"][0]) == len(long.runner.ids)


def test_a_long_prefill_runs_one_chunk_per_decode_step(gpt):
    specs = {"a": (prompt(6), dict(temperature=0, max_tokens=40)),
             "b": (prompt(8, 1), dict(temperature=0, max_tokens=40)),
             "long": (prompt(400, 2), dict(temperature=0, max_tokens=2))}
    reqs = {n: request(gpt, p, **s) for n, (p, s) in specs.items()}
    batch = Batch(gpt, chunk=512)
    batch.add(reqs["a"])
    batch.add(reqs["b"])
    for _ in range(3):
        batch.step()
    batch.add(reqs["long"])
    while reqs["long"].runner.ids[-1:] != specs["long"][0][-1:] and not batch.idle:
        decoding = [r for r in (reqs["a"], reqs["b"]) if r.decoding]
        before = [len(r.reply.parser.ids) for r in decoding]
        held, allowed = len(reqs["long"].runner.ids), batch.interleaved or batch.chunk // 16
        batch.step()
        grown = len(reqs["long"].runner.ids) - held
        assert grown <= allowed + 1  # one chunk (plus the last token), not the whole prompt
        # the running streams got their token in the same step
        assert [len(r.reply.parser.ids) for r in decoding] == [n + 1 for n in before]
    assert batch.chunks > 3
    run_batch(batch, reqs)
    for n in ("a", "b", "long"):
        assert reqs[n].reply.parser.ids == solo(gpt, specs[n][0], **specs[n][1])[0], n


def test_cancel_carries_its_reason():
    c = Cancel()
    c.set("shutdown")
    assert c.is_set() and c.reason == "shutdown"
