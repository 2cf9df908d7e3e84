"""A 20,000-token generation keeps memory flat apart from the KV cache: the engine (pipelined decode loop,
Runner, stream parser, events) holds nothing per token but the cache.

The generation runs the real engine (mlx_gptoss.chat.generate_events, Runner, harmony.StreamParser, mlx-lm's
KVCache and RotatingKVCache) on a "scripted" stand-in model: a successor table on the real 201088-token
vocabulary (prompt -> <|channel|>analysis<|message|> -> " again and again and ..." forever) that writes
gpt-oss-20b-sized K/V rows (8 heads x 64) into one full-attention and one sliding-window cache layer. A real
tiny checkpoint spends ~20 ms a token on this CPU (its 201088-row lm_head, the MoE ops), so 20,000 tokens
through it would take minutes; the stand-in takes ~30 s and exercises every engine path. Greedy sampling
(temperature 0) skips the normalization over the vocabulary, which alone cost ~11 ms a token here.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import psutil
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlx_gptoss import harmony
from mlx_gptoss.chat import Runner, generate_events
from scripted_checkpoint import offline_harmony

N = 20_000
VOCAB = 201088
HEADS, HEAD_DIM, WINDOW = 8, 64, 128


@dataclass
class _Config:
    max_position_embeddings: int = 131072


class ScriptedStandIn:
    """A GptOss-shaped object: model(tokens [1, T], cache) -> logits [1, T, VOCAB] from a successor table."""

    def __init__(self, tok_folder: Path):
        enc = harmony.encoding()
        again, and_ = enc.encode(" again")[0], enc.encode(" and")[0]
        analysis = enc.encode("analysis")
        assert len(analysis) == 1
        chain = [harmony.CHANNEL, analysis[0], harmony.MESSAGE, again, and_]
        succ = {enc.encode("assistant")[0]: chain[0], **dict(zip(chain, chain[1:])), and_: again}
        code = [0] * VOCAB  # row 0 of the table: every token not in the script -> " again"
        for i, tok in enumerate(succ, start=1):
            code[tok] = i
        self.code = mx.array(code, dtype=mx.int32)
        table = mx.zeros((len(succ) + 1, VOCAB))
        targets = [again] + list(succ.values())
        table[mx.arange(len(targets)), mx.array(targets)] = 10.0
        self.table = table
        self.kv = mx.ones((1, HEADS, 1, HEAD_DIM))
        self.config, self.path, self.plan, self.max_context = _Config(), tok_folder, None, 0

    def make_cache(self):
        return [KVCache(), RotatingKVCache(max_size=WINDOW, keep=0)]

    def model(self, tokens: mx.array, cache=None):
        T = tokens.shape[1]
        kv = mx.broadcast_to(self.kv, (1, HEADS, T, HEAD_DIM))
        for c in cache:
            c.update_and_fetch(kv, kv)
        return self.table[self.code[tokens]]  # [1, T, VOCAB]


def test_twenty_thousand_tokens_keep_memory_flat_apart_from_the_kv_cache():
    gpt = ScriptedStandIn(offline_harmony())
    prompt = harmony.render([{"role": "user", "content": "Say it forever"}])
    runner = Runner(gpt)
    parser = harmony.StreamParser()
    gc.collect()
    mx.clear_cache()
    proc = psutil.Process()
    rss0, active0 = proc.memory_info().rss, mx.get_active_memory()
    samples = []  # (tokens so far, active memory)
    n_events = 0
    for ev in generate_events(runner, prompt, cap=N + len(prompt) + 1, max_tokens=N, temperature=0.0,
                              parser=parser):
        n_events += 1
        if ev.kind == "done":
            stats = ev.stats
        elif n_events % 2000 == 0:
            samples.append((n_events, mx.get_active_memory()))
    assert stats.generated_tokens == N and stats.stop_reason == "max_tokens" and not stats.malformed
    assert "".join(parser._text).startswith(" again and again")
    kv_per_token = 2 * HEADS * HEAD_DIM * 4  # K and V, float32, in the one growing layer
    step = 256 * kv_per_token  # KVCache grows in chunks of 256 tokens
    sliding = 2 * HEADS * WINDOW * HEAD_DIM * 4
    slack = 4 * 2 ** 20
    grown = mx.get_active_memory() - active0
    kv = (len(prompt) + N) * kv_per_token
    assert grown <= kv + step + sliding + slack, (grown, kv)
    # flat: between any two samples the active memory grows by the cache's share, nothing more
    for (n1, m1), (n2, m2) in zip(samples, samples[1:]):
        assert m2 - m1 <= (n2 - n1) * kv_per_token + 2 * step + slack, samples
    # the peak is the cache plus one step's transients (a few logits vectors of 201088 floats)
    assert stats.peak_memory - active0 <= kv + step + sliding + 8 * VOCAB * 4 + slack, (stats.peak_memory, kv)
    # the Python side (token ids, the parser's text) stays small too
    assert proc.memory_info().rss - rss0 <= kv + 64 * 2 ** 20, (proc.memory_info().rss - rss0, kv)
