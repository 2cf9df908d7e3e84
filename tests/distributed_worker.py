"""Run by the distributed tests under `mlx.launch -n N --backend ring` (one process per rank).

    python distributed_worker.py parity CKPT OUT_DIR    sharded vs single-process logits, greedy generation,
                                                         per-rank parameter bytes, peak memory, bytes read
Each rank writes OUT_DIR/rank{R}.json; the test reads and checks them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

import mlx_gptoss
from mlx_gptoss.distributed.layout import slice_of
from mlx_gptoss.distributed.loading import load_rank
from mlx_gptoss.memory import local_checkpoint

PROMPT = [5, 17, 3, 99, 250, 7, 7, 1, 300, 42, 11, 13, 400, 2, 8, 64, 128, 255, 31, 77]  # > 2 sliding windows


def free_ports(n: int) -> int:
    """A port p with p .. p+n-1 free on the loopback (mlx.launch's ring listens on consecutive ports)."""
    for _ in range(200):
        p = random.randrange(20000, 60000 - n)
        try:
            socks = []
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def launch(n: int, argv: list[str], *, timeout: float, input: str | None = None, env: dict | None = None,
           on_start=None) -> subprocess.CompletedProcess:
    """`mlx.launch -n n --backend ring` over the loopback, bounded in time; on timeout the whole process
    group (launcher and ranks) is killed, so nothing is left behind. on_start(proc, stderr_file) runs once
    started. (mlx.launch exits 0 even when a rank failed: check the output, not returncode.)"""
    exe = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or "mlx.launch"
    cmd = [exe, "-n", str(n), "--backend", "ring", "--starting-port", str(free_ports(n)),
           "--python", sys.executable, "--", *argv]  # "--": the command's own -n, -p are not mlx.launch's
    with tempfile.TemporaryDirectory() as tmp:
        out_f, err_f = Path(tmp) / "out", Path(tmp) / "err"
        with open(out_f, "w") as out, open(err_f, "w") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            if input:
                proc.stdin.write(input)
                proc.stdin.flush()
            if on_start:
                on_start(proc, err_f)
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # on timeout or error; and anything a rank left running
            except ProcessLookupError:
                pass
            proc.wait()
            proc.stdin.close()
        return subprocess.CompletedProcess(cmd, proc.returncode, out_f.read_text(), err_f.read_text())


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


def scripted_two_rank_checkpoint(folder: Path, name: str) -> Path:
    """scripted_checkpoint's model `name` with its one attention head split in two (each head carries half
    of the codes, so both ranks' heads matter) and a second, all-zero MXFP4 block of intermediate units:
    the same function, shardable over 2 ranks."""
    import numpy as np
    from scripted_checkpoint import CODES, _episodes, offline_harmony, scripted_config, scripted_weights
    from tiny_checkpoint import from_bf16, to_bf16, write_hub_checkpoint

    tok = offline_harmony()
    cfg = scripted_config()
    w = scripted_weights(cfg, _episodes(name))
    D, half = cfg["head_dim"], CODES // 2
    wide = dict(cfg, num_attention_heads=2, num_key_value_heads=2, intermediate_size=2 * cfg["intermediate_size"])
    out = {}
    for k, a in w.items():
        leaf = k.rsplit(".", 2)[-2:]
        if ".self_attn." in k:
            f = from_bf16(a)
            if leaf[0] in ("q_proj", "k_proj", "v_proj"):  # rows of head 0 keep codes < half, head 1 the rest
                lo, hi = f.copy(), f.copy()
                lo[half:], hi[:half] = 0, 0
                f = np.concatenate([lo, hi]) if leaf[0] == "v_proj" else np.concatenate([f, f])
            elif leaf == ["o_proj", "weight"]:
                lo, hi = f.copy(), f.copy()
                lo[:, half:], hi[:, :half] = 0, 0
                f = np.concatenate([lo, hi], axis=1)
            elif leaf[-1] == "sinks":
                f = np.concatenate([f, f])
            out[k] = to_bf16(f)
        elif "gate_up_proj" in k:  # zero codes, scale 2^0, zero bias for the new rows
            out[k] = np.concatenate([a, np.zeros_like(a) if a.dtype == np.uint16 or k.endswith("_blocks")
                                     else np.full_like(a, 127)], axis=1)
        elif k.endswith(("down_proj_blocks", "down_proj_scales")):
            out[k] = np.concatenate([a, np.zeros_like(a) if k.endswith("_blocks") else np.full_like(a, 127)],
                                    axis=2)
        else:
            out[k] = a
    folder = write_hub_checkpoint(folder, wide, out, shards=1)
    (folder / "tokenizer.json").write_bytes((tok / "tokenizer.json").read_bytes())
    return folder


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


def mirror(ckpt: str, out: Path) -> None:
    """Rank 0 drives chat.Runner (prefill with prefix reuse, snapshots and restores, pipelined steps, reset,
    dropped caches) on the leader while the followers replay it; every logit is compared with a
    single-process model fed the same operations."""
    import gc

    from mlx_gptoss.chat import Runner, runner_for
    from mlx_gptoss.distributed import lead_or_follow

    kw = dict(dtype=mx.float32, allow_download=False, memory="8GB", ctx=4096)
    gpt = lead_or_follow(mlx_gptoss.load(ckpt, group="auto", **kw))  # followers replay and exit here
    whole = mlx_gptoss.load(ckpt, **kw)
    worst = 0.0

    def check(a, b):
        nonlocal worst
        worst = max(worst, float(mx.max(mx.abs(a - b)).item() / mx.max(mx.abs(b)).item()))

    a, b = runner_for(gpt), Runner(whole)
    assert type(a).__name__ == "LeaderRunner"
    p1 = PROMPT + [9, 10, 11]
    p2 = PROMPT + [9, 12, 13, 14]  # shares a prefix with p1: restored from p1's snapshots
    for prompt in (p1, p1 + [5, 6], p2, p1, PROMPT[:5]):
        (la, _), (lb, _) = a.prefill(prompt), b.prefill(prompt)
        check(la, lb)
        for t in (3, 4, 5):
            check(a.step_lazy(mx.array([t])), b.step_lazy(mx.array([t])))
            a.set_last(t), b.set_last(t)
    for _ in range(3):  # runners dropped: their caches are freed on the followers too
        r = runner_for(gpt)
        r.prefill(p1)
        del r
        gc.collect()
    a.reset(), b.reset()
    check(a.prefill(p2)[0], b.prefill(p2)[0])
    (out / "mirror.json").write_text(json.dumps({"worst": worst, "freed": len(gpt.model.link.freed)}))


if __name__ == "__main__":
    {"parity": parity, "mirror": mirror}[sys.argv[1]](*sys.argv[2:-1], Path(sys.argv[-1]))
