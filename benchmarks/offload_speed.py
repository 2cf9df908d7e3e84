"""Tokens/s resident vs expert streaming at 100/75/50/25% resident experts, on one checkpoint, in one process.

    python benchmarks/offload_speed.py              # writes the "speed" section of benchmarks/RESULTS_offload.md
    python benchmarks/offload_speed.py --reps 1 --no-write

The checkpoint is benchmarks/compare_mlx_lm.py's mid-size MXFP4 model (hidden 1024, 8 layers, 16 experts
top-4, random weights) in the hub layout, written to GPTOSS_OFFLOAD_CKPT. Every variant loads the same
files: `offload="none"` (resident) and `offload="experts", resident_experts=s`. Runs alternate between
variants; each test reports the median, and the streaming variants the expert hit rate and the bytes read
from the checkpoint per token during the timed runs. The router of a random model spreads tokens evenly over
the experts, so the hit rate is near the resident share; a trained model's skewed routing does better.
On this Linux box the checkpoint sits in the page cache: a "read from the file" is a memory copy, where a Mac
reads the SSD. The table shows the cost of the streaming machinery, not of an SSD.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from offload_results import write_section  # noqa: E402

CKPT = Path(os.environ.get("GPTOSS_OFFLOAD_CKPT", "/tmp/gptoss-bench-offload/ckpt"))
SHARES = (1.0, 0.75, 0.5, 0.25)
TESTS = (("pp128", 128, 0), ("tg64", 0, 64))
CTX, CHUNK = 4096, 512


def checkpoint() -> Path:
    from compare_mlx_lm import MID
    from tiny_checkpoint import hub_config, random_weights, write_hub_checkpoint

    if not (CKPT / "config.json").is_file():
        cfg = hub_config(**MID)
        write_hub_checkpoint(CKPT, cfg, random_weights(cfg, seed=1, full_scale_blocks=True))
    return CKPT


def measure(reps: int) -> dict:
    import mlx_gptoss
    from mlx_gptoss import bench

    folder = checkpoint()
    load_before = os.getloadavg()
    variants = {"resident": mlx_gptoss.load(folder, ctx=CTX, offload="none")}
    for s in SHARES:
        variants[f"streaming, {s:.0%} resident"] = mlx_gptoss.load(folder, ctx=CTX, offload="experts",
                                                                    resident_experts=s)
    cfg = variants["resident"].config

    def once(gpt, p, g, seed):
        return bench.time_test(gpt.model, gpt.make_cache, n_prompt=p, n_gen=g, depth=0, chunk=CHUNK,
                               vocab=cfg.vocab_size, seed=seed)

    for gpt in variants.values():  # warm-up (also fills the streaming caches' routing counts a little)
        once(gpt, 16, 0, 99)
        once(gpt, 0, 4, 99)
    times = {n: {t: [] for t, _, _ in TESTS} for n in variants}
    streamed = {n: {t: [] for t, _, _ in TESTS} for n in variants if n != "resident"}
    for r in range(reps):
        for t, p, g in TESTS:
            for name, gpt in variants.items():
                before = gpt.offload.stats.copy() if gpt.offload else None
                times[name][t].append(once(gpt, p, g, r))
                if before is not None:
                    d = gpt.offload.stats - before
                    streamed[name][t].append((d.hits, d.misses, d.bytes_streamed, d.tokens))
            print(f"  rep {r + 1}/{reps} {t} done", file=sys.stderr, flush=True)
    out = {"variants": {}, "machine": bench.machine_info(), "bandwidth": bench.measure_bandwidth(),
           "load_average": [load_before, os.getloadavg()],
           "config": {k: getattr(cfg, k) for k in ("num_hidden_layers", "num_local_experts", "hidden_size",
                                                   "intermediate_size", "vocab_size")}}
    for name in variants:
        res = {}
        for t, p, g in TESTS:
            res[t] = {"median_tps": statistics.median((p or g) / s for s in times[name][t])}
            if name in streamed:
                hits, misses, nbytes, tokens = (sum(x) for x in zip(*streamed[name][t]))
                res[t] |= {"hit_rate": hits / max(1, hits + misses), "mb_per_token": nbytes / tokens / 1e6}
        out["variants"][name] = res
    return out


def table(run: dict) -> str:
    v = run["variants"]
    base = v["resident"]
    m = run["machine"]
    lines = [f"Machine: {m['chip']}, {m['cores']} cores, {m['os']}, MLX {m['mlx_version']} ({m['mlx_backend']}), "
             f"BLAS {m['blas']}; read bandwidth {run['bandwidth']['best_read']:.1f} GB/s. Checkpoint: "
             f"{run['config']}. The checkpoint files are in the page cache (Linux): streamed experts are memory "
             "copies here, SSD reads on a Mac." + (" Load average (1/5/15 min) at the start and end: " + " / ".join(
                 ", ".join(f"{x:.1f}" for x in la) for la in run["load_average"]) if "load_average" in run else ""),
             "",
             "| variant | " + " | ".join(f"{t} tok/s (x resident)" for t, _, _ in TESTS) +
             " | expert hit rate (tg) | MB streamed per token (tg) |",
             "|---|" + "---:|" * (len(TESTS) + 2)]
    for name, res in v.items():
        cells = [f"{res[t]['median_tps']:.2f} ({res[t]['median_tps'] / base[t]['median_tps']:.2f})"
                 for t, _, _ in TESTS]
        tg = res[TESTS[-1][0]]
        extra = [f"{tg['hit_rate']:.0%}", f"{tg['mb_per_token']:.1f}"] if "hit_rate" in tg else ["-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print the table; do not write RESULTS_offload.md")
    args = ap.parse_args()
    run = measure(args.reps)
    text = table(run)
    print(text)
    if not args.no_write:
        cmd = f"python benchmarks/offload_speed.py --reps {args.reps}"
        write_section("speed", f"Reproduce: `{cmd}` (medians of {args.reps} alternating runs).\n\n" + text,
                      raw=json.dumps(run, indent=1))


if __name__ == "__main__":
    main()
