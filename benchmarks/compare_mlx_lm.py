"""mlx_gptoss vs mlx-lm: prefill and decode tokens/s on the same mid-size MXFP4 checkpoint, in one process.

    python benchmarks/compare_mlx_lm.py                 # both BLAS settings, writes benchmarks/RESULTS.md
    python benchmarks/compare_mlx_lm.py --reps 3 --no-write

The checkpoint is written by tests/tiny_checkpoint.py in the exact hub layout (random weights, MXFP4 experts):
hidden 1024, 8 layers, 16 experts top-4, vocab 8192, 16 query / 2 KV heads of 64, window 128. Both models
load the same files: ours with mlx_gptoss.load, mlx-lm's gpt_oss model with mlx_lm.utils.load_model (no
tokenizer needed). Both run through the same timing loops (mlx_gptoss.bench: chunked prefill, greedy decode
with async_eval pipelining), runs alternate between the variants, and each test reports the median.

Each project at its best setting on this CPU: ours in float32 (its default off Metal); mlx-lm as it loads
(bf16) and cast to float32 (model.set_dtype), whichever is faster. On Linux the whole comparison runs twice,
in child processes: with the mlx-cpu wheel's bundled BLAS and with OpenBLAS preloaded (LD_PRELOAD), since
the preload must be in place before MLX starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

OPENBLAS = f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libopenblas.so.0"
CKPT = Path(os.environ.get("GPTOSS_BENCH_CKPT", "/tmp/gptoss-bench-mid"))
MID = dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=8, num_local_experts=16,
           num_experts_per_tok=4, experts_per_token=4, vocab_size=8192, head_dim=64,
           num_attention_heads=16, num_key_value_heads=2, sliding_window=128)
TESTS = (("pp512", 512, 0), ("tg128", 0, 128))  # pp2048 takes ~2.5 min per run here: see RESULTS.md
CHUNK = 512  # prefill chunk for both (the plan's chunk at these contexts)


def write_checkpoint() -> Path:
    from tiny_checkpoint import hub_config, random_weights, write_hub_checkpoint

    if not (CKPT / "config.json").is_file():
        cfg = hub_config(**MID)
        write_hub_checkpoint(CKPT, cfg, random_weights(cfg, seed=1, full_scale_blocks=True))
    return CKPT


def load_both(folder: Path):
    """mlx_gptoss and mlx-lm's gpt_oss model on the same files, mlx-lm cast to float32 (its best here)."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    import mlx_gptoss

    lm, _ = load_model(folder)
    lm.set_dtype(mx.float32)
    return mlx_gptoss.load(folder), lm


def child(reps: int) -> dict:
    """Load both projects, alternate their runs, return medians (JSON)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    import mlx_gptoss
    from mlx_gptoss import bench

    folder = write_checkpoint()
    ours = mlx_gptoss.load(folder)
    cfg = ours.config
    lm_bf16, _ = load_model(folder)
    lm_f32, _ = load_model(folder)
    lm_f32.set_dtype(mx.float32)
    variants = {
        f"mlx_gptoss ({ours.dtype})".replace("mlx.core.", ""): (ours.model, ours.model.make_cache),
        "mlx-lm (float32)": (lm_f32, lambda: make_prompt_cache(lm_f32)),
    }
    # mlx-lm as it loads (bf16) is ~10x slower on this CPU (bf16 inputs to mxfp4 matmuls): measured once
    # on short tests to show that float32 is its best setting, then left out of the long runs.
    short = {}
    for name, m in (("mlx-lm (bfloat16, as loaded)", lm_bf16), ("mlx-lm (float32)", lm_f32),
                    (next(iter(variants)), ours.model)):
        mk = ours.make_cache if m is ours.model else (lambda m=m: make_prompt_cache(m))
        bench.time_test(m, mk, n_prompt=64, n_gen=0, depth=0, chunk=CHUNK, vocab=cfg.vocab_size, seed=98)
        pp = 128 / bench.time_test(m, mk, n_prompt=128, n_gen=0, depth=0, chunk=CHUNK, vocab=cfg.vocab_size, seed=1)
        tg = 32 / bench.time_test(m, mk, n_prompt=0, n_gen=32, depth=0, chunk=CHUNK, vocab=cfg.vocab_size, seed=1)
        short[name] = {"pp128": pp, "tg32": tg}
    print(f"  short runs: {short}", file=sys.stderr, flush=True)
    # Same model? Logits over a prompt shorter than the window (mlx-lm's YaRN truncates its correction
    # range, ours does not: DESIGN.md; a small difference is expected, a large one would void the comparison).
    toks = bench.random_tokens(64, cfg.vocab_size, 7)[None]
    ref = ours.model(toks)
    agree = {name: float(mx.abs(m(toks).astype(mx.float32) - ref).max() / mx.abs(ref).max())
             for name, m in (("mlx-lm (bfloat16, as loaded)", lm_bf16), ("mlx-lm (float32)", lm_f32))}

    times = {name: {t: [] for t, _, _ in TESTS} for name in variants}
    for name, (m, mk) in variants.items():  # warm-up: one run of each test
        for t, p, g in TESTS:
            bench.time_test(m, mk, n_prompt=min(p, CHUNK), n_gen=min(g, 8), depth=0, chunk=CHUNK,
                            vocab=cfg.vocab_size, seed=99)
    for r in range(reps):
        for t, p, g in TESTS:
            for name, (m, mk) in variants.items():
                times[name][t].append(bench.time_test(m, mk, n_prompt=p, n_gen=g, depth=0, chunk=CHUNK,
                                                      vocab=cfg.vocab_size, seed=r))
            print(f"  rep {r + 1}/{reps} {t} done", file=sys.stderr, flush=True)
    out = {"variants": {}, "agreement": agree, "short_runs": short}
    for name, (m, _) in variants.items():
        res = {}
        for t, p, g in TESTS:
            secs = times[name][t]
            tps = [(p or g) / s for s in secs]
            res[t] = {"median_tps": statistics.median(tps), "tps": tps}
        nbytes = bench.decode_bytes(m, 64, cfg=cfg)  # tg128 from one token: mean context 64
        res["decode_bytes_per_token"] = nbytes["total"]
        out["variants"][name] = res
    out["bandwidth"] = bench.measure_bandwidth()
    out["machine"] = bench.machine_info()
    out["versions"] = {"mlx_lm": _version("mlx-lm"), "mlx_gptoss": mlx_gptoss.__version__}
    return out


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def run_child(reps: int, preload: str | None) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    label = "OpenBLAS preloaded" if preload else "bundled BLAS"
    print(f"{label}: running", file=sys.stderr, flush=True)
    t0 = time.time()
    p = subprocess.run([sys.executable, __file__, "--child", "--reps", str(reps)], env=env,
                       stdout=subprocess.PIPE, text=True)
    if p.returncode:
        raise SystemExit(f"{label}: the benchmark child failed (exit {p.returncode})")
    res = json.loads(p.stdout)
    res["label"], res["wall_seconds"] = label, time.time() - t0
    return res


def table(runs: list[dict]) -> str:
    lines = []
    for run in runs:
        v = run["variants"]
        ours = next(n for n in v if n.startswith("mlx_gptoss"))
        lm_best = {t: max((n for n in v if n.startswith("mlx-lm")), key=lambda n: v[n][t]["median_tps"])
                   for t, _, _ in TESTS}
        lines += [f"### {run['label']} ({run['machine']['blas']})", "",
                  "| test | " + " | ".join(v) + " | ratio: ours / best mlx-lm |",
                  "|---|" + "---:|" * (len(v) + 1)]
        for t, _, _ in TESTS:
            cells = [f"{v[n][t]['median_tps']:.1f}" for n in v]
            ratio = v[ours][t]["median_tps"] / v[lm_best[t]][t]["median_tps"]
            lines.append(f"| {t} tok/s | " + " | ".join(cells) + f" | **{ratio:.2f}** (vs {lm_best[t]}) |")
        bw = run["bandwidth"]["best_read"]
        roof = []
        for n in v:
            gbps = v[n]["decode_bytes_per_token"] * v[n]["tg128"]["median_tps"] / 1e9
            roof.append(f"{n}: {v[n]['decode_bytes_per_token'] / 1e6:.1f} MB/token, {gbps:.2f} GB/s = "
                        f"{100 * gbps / bw:.1f}%")
        lines += ["", f"Roofline (tg128, bytes a decoded token reads x tokens/s, against the {bw:.1f} GB/s read "
                      f"bandwidth measured in the same run): " + "; ".join(roof) + ".", ""]
        short = "; ".join(f"{n}: pp128 {r['pp128']:.1f}, tg32 {r['tg32']:.1f}" for n, r in run["short_runs"].items())
        lines += [f"Short single runs (tok/s), to pick each project's best dtype: {short}.", ""]
        agree = ", ".join(f"{n}: {d:.1e}" for n, d in run["agreement"].items())
        lines += [f"Logit agreement with mlx_gptoss (max |diff| / max |logit|, 64 tokens): {agree}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print the table; do not write RESULTS.md")
    ap.add_argument("--blas", choices=("both", "bundled", "openblas"), default="both")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.reps)))
        return
    write_checkpoint()
    runs = []
    if args.blas in ("both", "bundled"):
        runs.append(run_child(args.reps, None))
    if args.blas in ("both", "openblas") and sys.platform == "linux":
        if Path(OPENBLAS).is_file():
            runs.append(run_child(args.reps, OPENBLAS))
        else:
            print(f"no {OPENBLAS}: apt install libopenblas0-pthread to measure with OpenBLAS", file=sys.stderr)
    text = table(runs)
    print(text)
    raw = ROOT / "benchmarks" / "results_mlx_lm.json"
    if not args.no_write:
        raw.write_text(json.dumps(runs, indent=1))
        print(f"raw results: {raw}", file=sys.stderr)


if __name__ == "__main__":
    main()
