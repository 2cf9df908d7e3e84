"""How far each offload lever moves the logits from the resident model's, on random test checkpoints.

    python benchmarks/offload_accuracy.py            # writes the "accuracy" section of benchmarks/RESULTS_offload.md
    python benchmarks/offload_accuracy.py --no-write

Two checkpoints with the same random weights (hub layout, 4 layers, hidden 256, 16 experts top-4, 4 query /
2 KV heads of 64, vocab 1024): "random routing" as written, and "fixed routing" with the router weights set
to 0 (every token goes to the experts of the router bias). A random model's router has no margin: an error
of 1e-3 in its input swaps experts, whose random weights then differ completely, so on it the 8-bit levers'
error is mostly routing flips. Fixed routing measures the levers themselves. Each lever is loaded alone
(load(offload=Levers(...))) and compared to the resident float32 model over a 256-token prompt (every
position) and 32 decoded tokens fed the resident model's greedy choices. The 8-bit KV cache is also
measured at long context (last 4 positions of every 512-token chunk).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from offload_results import write_section  # noqa: E402

SMALL = dict(num_hidden_layers=4, num_local_experts=16, hidden_size=256, intermediate_size=256, head_dim=64,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
PROMPT, DECODE = 256, 32
LONG = (512, 2048, 8192)


def checkpoints(folder: Path) -> dict[str, Path]:
    from tiny_checkpoint import hub_config, random_weights, to_bf16, write_hub_checkpoint

    cfg = hub_config(**SMALL)
    w = random_weights(cfg, seed=1)
    out = {"random routing": write_hub_checkpoint(folder / "random", cfg, w)}
    w = {n: (to_bf16(np.zeros(a.shape, np.float32)) if n.endswith("router.weight") else a) for n, a in w.items()}
    out["fixed routing"] = write_hub_checkpoint(folder / "fixed", cfg, w)
    return out


def levers():
    from mlx_gptoss.offload import Levers

    E = SMALL["num_local_experts"]
    return {
        "embedding from the file": Levers(embedding=True),
        "experts streamed, 50% resident": Levers(expert_slots=E // 2),
        "8-bit KV cache": Levers(kv_bits=8),
        "8-bit attention + unembedding": Levers(weight_bits=8),
        "all four": Levers(embedding=True, kv_bits=8, weight_bits=8, expert_slots=E // 2),
    }


def logits_of(gpt, prompt: np.ndarray, fed: list[int] | None):
    """Every prompt position's logits, then DECODE steps fed `fed` (or greedy); returns (logits, tokens)."""
    import mlx.core as mx

    cache = gpt.make_cache()
    out = [np.array(gpt.model(mx.array(prompt[None]), cache=cache)[0])]
    tok, toks = int(out[0][-1].argmax()), []
    for i in range(DECODE):
        tok = fed[i] if fed is not None else tok
        toks.append(tok)
        step = np.array(gpt.model(mx.array([[tok]], dtype=mx.int32), cache=cache)[0])
        out.append(step)
        tok = int(step[-1].argmax())
    return np.concatenate(out), toks


def compare(ref: np.ndarray, x: np.ndarray) -> dict:
    d = np.abs(x - ref)
    return {"max_rel": float(d.max() / np.abs(ref).max()),
            "rms_rel": float(np.sqrt((d ** 2).mean() / (ref ** 2).mean())),
            "top1": float((x.argmax(-1) == ref.argmax(-1)).mean())}


def measure() -> dict:
    import mlx.core as mx

    import mlx_gptoss

    out = {"levers": {}, "long_context": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = checkpoints(Path(tmp))
        prompt = np.random.default_rng(0).integers(0, SMALL["vocab_size"], PROMPT).astype(np.int32)
        for cname, path in ckpts.items():
            ref, fed = logits_of(mlx_gptoss.load(path, memory="64GB", ctx=4096), prompt, None)
            for lname, lv in levers().items():
                x, _ = logits_of(mlx_gptoss.load(path, memory="64GB", ctx=4096, offload=lv), prompt, fed)
                out["levers"].setdefault(lname, {})[cname] = compare(ref, x)
                print(f"  {cname}: {lname} {out['levers'][lname][cname]}", file=sys.stderr, flush=True)
        path = ckpts["fixed routing"]
        for n in LONG:
            tokens = mx.array(np.random.default_rng(1).integers(0, SMALL["vocab_size"], (1, n)).astype(np.int32))
            runs = []
            for kv in (16, 8):
                gpt = mlx_gptoss.load(path, memory="64GB", ctx=n + 8, kv_bits=kv)
                cache, last = gpt.make_cache(), []
                for i in range(0, n, 512):
                    logits = gpt.model(tokens[:, i:i + 512], cache=cache)
                    last.append(np.array(logits[0, -4:]))
                runs.append(np.concatenate(last))
            out["long_context"][n] = compare(runs[0], runs[1])
            print(f"  kv8 at {n}: {out['long_context'][n]}", file=sys.stderr, flush=True)
    return out


def table(run: dict) -> str:
    lines = ["Logit difference to the resident float32 model: max |diff| / max |logit| (max), RMS of the "
             "difference / RMS of the logits (rms), and the share of positions whose top token is unchanged "
             f"(top-1), over {PROMPT} prompt positions and {DECODE} decoded tokens.", "",
             "| lever | fixed routing: max / rms / top-1 | random routing: max / rms / top-1 |", "|---|---|---|"]
    for lname, res in run["levers"].items():
        cells = [f"{res[c]['max_rel']:.2e} / {res[c]['rms_rel']:.2e} / {res[c]['top1']:.1%}"
                 for c in ("fixed routing", "random routing")]
        lines.append(f"| {lname} | " + " | ".join(cells) + " |")
    lines += ["", "The 8-bit KV cache at long context (fixed routing; the last 4 positions of each 512-token chunk):",
              "", "| context | max / rms / top-1 |", "|---:|---|"]
    for n, r in run["long_context"].items():
        lines.append(f"| {int(n):,} | {r['max_rel']:.2e} / {r['rms_rel']:.2e} / {r['top1']:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true", help="print the table; do not write RESULTS_offload.md")
    args = ap.parse_args()
    run = measure()
    text = table(run)
    print(text)
    if not args.no_write:
        write_section("accuracy", "Reproduce: `python benchmarks/offload_accuracy.py`.\n\n" + text,
                      raw=json.dumps(run, indent=1))


if __name__ == "__main__":
    main()
