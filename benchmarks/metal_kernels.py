"""Time the custom Metal MoE kernels against MLX's built-in mxfp4 ops on this Mac, side by side.

For each kernel and activation dtype this runs the self-test afresh (metal_selftest.run: gpt-oss's decode
shapes, H = I = 2880, 4 experts per token, T = 1 and T = 4; correctness first, then the timing of 8
chained decode layers on other experts each, per layer; the one kernel under test on Metal, the rest MLX)
and prints a Markdown table naming the machine; --write appends it to benchmarks/RESULTS_metal_kernels.md.
Needs a Mac (Metal). Nobody has run it for this project yet, so that file does not exist.

    python benchmarks/metal_kernels.py --write
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_gptoss import bench, kernels, metal_selftest, selftest_record

RESULTS = Path(__file__).resolve().parent / "RESULTS_metal_kernels.md"


def table() -> str:
    m = bench.machine_info()
    lines = [f"### {m['chip']}, {m['os']}, MLX {m['mlx_version']} ({time.strftime('%Y-%m-%d')})", "",
             "| kernel | dtype | T | correct (rel. error) | metal ms per layer | MLX ms per layer | MLX / metal | auto uses it |",
             "|---|---|---:|---|---:|---:|---:|---|"]
    for dtype in metal_selftest.DTYPES:
        for spec in kernels.SPECS:
            r = metal_selftest.run(spec, dtype)
            name = metal_selftest.DTYPE_NAMES[dtype]
            if not r["passed"]:
                lines.append(f"| {spec.key} | {name} | | no: {r['detail']} | | | | no |")
                continue
            for t, v in r["timings"].items():
                lines.append(f"| {spec.key} | {name} | {t.removeprefix('T=')} | yes ({r['error']:.1e}) | "
                             f"{v['metal_s'] * 1e3:.3f} | {v['builtin_s'] * 1e3:.3f} | "
                             f"{v['builtin_s'] / v['metal_s']:.2f}x | "
                             f"{'yes' if int(t.removeprefix('T=')) in r['enabled_tokens'] else 'no'} |")
    lines += ["", f"auto needs >= {selftest_record.MIN_SPEEDUP:.2f}x (single tokens: at T = 1; 2-4 tokens: at "
              "T = 4). Reproduce: `python benchmarks/metal_kernels.py`.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.name}")
    args = ap.parse_args()
    if not mx.metal.is_available():
        sys.exit("benchmarks/metal_kernels.py: needs a Mac with Metal (MLX sees no Metal GPU here)")
    text = table()
    print(text)
    if args.write:
        with RESULTS.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
