"""Run by the distributed tests under `mlx.launch -n N --backend ring` (one process per rank).

    python distributed_worker.py parity CKPT OUT_DIR    sharded vs single-process logits, greedy generation,
                                                         per-rank parameter bytes, peak memory, bytes read
Each rank writes OUT_DIR/rank{R}.json; the test reads and checks them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

import mlx_gptoss
from mlx_gptoss.distributed.layout import slice_of
from mlx_gptoss.distributed.loading import load_rank
from mlx_gptoss.memory import local_checkpoint

PROMPT = [5, 17, 3, 99, 250, 7, 7, 1, 300, 42, 11, 13, 400, 2, 8, 64, 128, 255, 31, 77]  # > 2 sliding windows


def greedy(model, cache, prompt, n):
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    out = []
    for _ in range(n):
        t = int(mx.argmax(logits).item())
        out.append(t)
        logits = model(mx.array([[t]]), cache=cache)[0, -1]
    return out


def decode_logits(model, cache, tokens):
    """Logits of each token fed one at a time through the cache (cached decode)."""
    return mx.concatenate([model(mx.array([[t]]), cache=cache)[0] for t in tokens])


def parity(ckpt: str, out: Path) -> None:
    group = mx.distributed.init(backend="ring")
    rank, n = group.rank(), group.size()
    ck = local_checkpoint(Path(ckpt), check_size=True)
    mx.reset_peak_memory()
    net, plan, stats = load_rank(ck, group, dtype=mx.float32, memory="8GB", ctx=4096)
    peak_load = mx.get_peak_memory()
    params = tree_flatten(net.parameters())
    sharded = sum(p.nbytes for k, p in params if ".self_attn." in k or ".mlp.experts." in k)
    replicated = sum(p.nbytes for k, p in params) - sharded
    # what this rank must hold: its slices of every tensor split across ranks (zeros for rank-0-only biases)
    whole = mlx_gptoss.load(ckpt, dtype=mx.float32, allow_download=False, memory="8GB", ctx=4096)
    wparams = tree_flatten(whole.model.parameters())
    whole_sharded = sum(p.nbytes for k, p in wparams if ".self_attn." in k or ".mlp.experts." in k)
    whole_replicated = sum(p.nbytes for k, p in wparams) - whole_sharded

    prefill_s = net(mx.array([PROMPT]))
    prefill_w = whole.model(mx.array([PROMPT]))
    cs, cw = net.make_cache(), whole.model.make_cache()
    net(mx.array([PROMPT[:-6]]), cache=cs)
    whole.model(mx.array([PROMPT[:-6]]), cache=cw)
    dec_s, dec_w = decode_logits(net, cs, PROMPT[-6:] * 3), decode_logits(whole.model, cw, PROMPT[-6:] * 3)
    gen_s = greedy(net, net.make_cache(), PROMPT, 16)
    gen_w = greedy(whole.model, whole.model.make_cache(), PROMPT, 16)

    def rel(a, b):
        return float(mx.max(mx.abs(a - b)).item() / mx.max(mx.abs(b)).item())

    kept_expected = sum(
        (lambda s, t: t.nbytes if s is None else (0 if s.zero else t.nbytes // t.shape[s.axis] * (s.hi - s.lo)))(
            slice_of(name, t.shape, ck.config, rank, n), t) for name, t in ck.tensors.items())
    result = {
        "rank": rank, "size": n, "prefill_rel": rel(prefill_s, prefill_w), "decode_rel": rel(dec_s, dec_w),
        "gen_sharded": gen_s, "gen_whole": gen_w,
        "param_sharded": sharded, "param_replicated": replicated,
        "whole_sharded": whole_sharded, "whole_replicated": whole_replicated,
        "peak_load": peak_load, "kept": stats.kept, "read": stats.read, "kept_expected": kept_expected,
        "file_bytes": sum(t.nbytes for t in ck.tensors.values()), "plan_weights": plan.weight_bytes,
        "plan_kv_per_token": plan.kv_per_token, "whole_plan_kv_per_token": whole.plan.kv_per_token,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    {"parity": parity}[sys.argv[1]](*sys.argv[2:-1], Path(sys.argv[-1]))
