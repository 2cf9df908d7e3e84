"""The MoE block and a full-attention layer of mlx_gptoss and mlx-lm, timed alternately on the same inputs
(the sequential profile in profile_ops.py is at the mercy of other load on a shared machine).

    python benchmarks/micro_alternating.py [--tokens 512] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

from compare_mlx_lm import load_both, write_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.models.switch_layers import _gather_sort

    from mlx_gptoss import kernels

    ours, lm = load_both(write_checkpoint())
    H = ours.config.hidden_size
    x = mx.random.normal((1, args.tokens, H)) * 0.5
    x1 = mx.random.normal((1, 1, H))
    mx.eval(x, x1)
    mo, ml = ours.model.model.layers[0].mlp, lm.model.layers[0].mlp
    print(f"MoE outputs agree to {float(mx.abs(mo(x) - ml(x)).max()):.1e} (max |out| {float(mx.abs(mo(x)).max()):.1f})")

    xs = x.reshape(-1, H)
    ids = mx.argpartition(-mo.router(xs), kth=3, axis=-1)[:, :4]
    mx.eval(ids)
    e, sw = mo.experts, ml.experts

    def ours_gate_up():
        return kernels._gather_mxfp4(xs[:, None, :], e.gate_up_proj, e.gate_up_proj_scales, ids)

    def lm_gate_up():
        xx, idx, _ = _gather_sort(mx.expand_dims(xs, (-2, -3)), ids)
        return sw.gate_proj(xx, idx, sorted_indices=True), sw.up_proj(xx, idx, sorted_indices=True)

    def attention(model, make_cache):
        layer = model.model.layers[1]  # a full-attention layer
        cache = make_cache()[1]
        t0 = time.perf_counter()
        mx.eval(layer.self_attn(x, create_attention_mask(x, cache), cache))
        t1 = time.perf_counter()
        for _ in range(50):
            mx.eval(layer.self_attn(x1, None, cache))
        return t1 - t0, time.perf_counter() - t1

    times: dict[str, list[float]] = {}

    def timed(key, fn):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.setdefault(key, []).append(time.perf_counter() - t0)

    for _ in range(args.reps):
        timed("MoE block: mlx_gptoss", lambda: mo(x))
        timed("MoE block: mlx-lm", lambda: ml(x))
        timed("gate_up matmul: mlx_gptoss (one gather_qmm, 2I rows)", ours_gate_up)
        timed("gate_up matmul: mlx-lm (two gather_qmm, I rows each)", lm_gate_up)
        for name, model, mk in (("mlx_gptoss", ours.model, ours.model.make_cache),
                                ("mlx-lm", lm, lambda: make_prompt_cache(lm))):
            pre, dec = attention(model, mk)
            times.setdefault(f"full attention layer, prefill: {name}", []).append(pre)
            times.setdefault(f"full attention layer, 50 decode steps: {name}", []).append(dec)
    print(f"\n{args.tokens} tokens, median of {args.reps}, seconds\n")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.3f} |")


if __name__ == "__main__":
    main()
