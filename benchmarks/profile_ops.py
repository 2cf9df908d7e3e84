"""Where the time goes: seconds per block kind (embedding, attention, MoE, norm + unembedding), mlx_gptoss vs
mlx-lm, on the compare_mlx_lm.py checkpoint, for one prefill chunk and for decode steps.

    python benchmarks/profile_ops.py [--prefill 512] [--decode 32]

Each block's output is evaluated at its boundary (mx.eval), so a block's time is its own work plus its graph
building, without overlap with the next block; the sum is a little above an unprofiled run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

from compare_mlx_lm import CHUNK, load_both, write_checkpoint  # noqa: E402


def instrument(model, totals: dict) -> None:
    """Make every layer's attention and MLP, the embedding and the head evaluate and time their output."""

    def wrap(mod, key):
        base = type(mod)

        def call(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = base.__call__(self, *args, **kwargs)
            mx.eval(out)
            totals[key] += time.perf_counter() - t0
            return out

        mod.__class__ = type(f"Timed{base.__name__}", (base,), {"__call__": call})

    inner = model.model
    wrap(inner.embed_tokens, "embedding")
    for layer in inner.layers:
        wrap(layer.self_attn, "attention")
        wrap(layer.mlp, "moe (router + experts)")
        wrap(layer.input_layernorm, "norms")
        wrap(layer.post_attention_layernorm, "norms")
    wrap(inner.norm, "norms")
    wrap(model.lm_head, "unembedding")


def profile(name, model, make_cache, vocab, prefill_tokens, decode_tokens):
    from mlx_gptoss import bench

    totals = defaultdict(float)
    instrument(model, totals)
    bench.time_test(model, make_cache, n_prompt=64, n_gen=0, depth=0, chunk=CHUNK, vocab=vocab, seed=5)  # warm
    totals.clear()
    t0 = time.perf_counter()
    bench.time_test(model, make_cache, n_prompt=prefill_tokens, n_gen=0, depth=0, chunk=CHUNK, vocab=vocab, seed=1)
    pre = dict(totals), time.perf_counter() - t0
    totals.clear()
    t0 = time.perf_counter()
    bench.time_test(model, make_cache, n_prompt=0, n_gen=decode_tokens, depth=0, chunk=CHUNK, vocab=vocab, seed=1)
    dec = dict(totals), time.perf_counter() - t0
    return pre, dec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args()
    from mlx_lm.models.cache import make_prompt_cache

    ours, lm = load_both(write_checkpoint())
    vocab = ours.config.vocab_size
    rows = {}
    rows["mlx_gptoss"] = profile("mlx_gptoss", ours.model, ours.model.make_cache, vocab, args.prefill, args.decode)
    rows["mlx-lm (float32)"] = profile("mlx-lm", lm, lambda: make_prompt_cache(lm), vocab, args.prefill,
                                       args.decode)
    for phase, i, n in (("prefill", 0, args.prefill), ("decode", 1, args.decode)):
        kinds = sorted({k for r in rows.values() for k in r[i][0]})
        print(f"\n{phase} ({n} tokens): seconds per block kind, each block evaluated at its boundary\n")
        print("| block | " + " | ".join(rows) + " |")
        print("|---|" + "---:|" * len(rows))
        for k in kinds:
            print(f"| {k} | " + " | ".join(f"{r[i][0].get(k, 0):.3f}" for r in rows.values()) + " |")
        print("| wall (incl. sampling, cache eval) | " + " | ".join(f"{r[i][1]:.3f}" for r in rows.values()) + " |")


if __name__ == "__main__":
    main()
