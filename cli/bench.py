"""`gptoss-mac bench`: prompt processing and generation speed, llama-bench style (mlx_gptoss.bench)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mlx_gptoss.hub import DEFAULT_MODEL

from . import options

err = Console(stderr=True)


def bench(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model folder or downloaded repo id."),
    n_prompt: Optional[str] = typer.Option(None, "--n-prompt", "-p", help="Prompt lengths, comma-separated "
                                           "[default: 512,2048]; 0 skips prompt processing."),
    n_gen: Optional[str] = typer.Option(None, "--n-gen", "-n", help="Generated tokens, comma-separated "
                                        "[default: 128]; 0 skips generation."),
    depth: Optional[str] = typer.Option(None, "--depth", "-d", help="Context already in the cache before each "
                                        "test, comma-separated [default: 0]."),
    repetitions: int = typer.Option(5, "--repetitions", "-r", callback=options.count("5"),
                                    help="Timed repetitions per test (after a warm-up)."),
    kernels: str = typer.Option("auto", "--kernels", help="MoE kernels: auto, metal or builtin; several "
                                "separated by commas run one after the other (metal,builtin prints the ratio)."),
    memory: Optional[str] = typer.Option(None, "--memory", callback=options.memory_size,
                                         help="Memory budget instead of this machine's, e.g. 16GB."),
    ctx: Optional[int] = typer.Option(None, "--ctx", callback=options.positive("8192"),
                                      help="Context to plan for [default: the model's, or what fits]."),
    dtype: Optional[str] = typer.Option(None, "--dtype", callback=options.choice(*options.DTYPES),
                                        help="Activation dtype [default: bfloat16 on Metal, float32 on the CPU]."),
    offload: str = options.OFFLOAD,
    kv_bits: Optional[int] = options.KV_BITS,
    as_json: bool = typer.Option(False, "--json", help="Print the whole result as JSON."),
    as_csv: bool = typer.Option(False, "--csv", help="Print one CSV row per test."),
    bandwidth_bytes: int = typer.Option(1 << 30, "--bandwidth-bytes", hidden=True,
                                        help="Buffer size of the bandwidth measurement."),
) -> None:
    """Measure prompt processing (ppN) and generation (tgN) speed in tokens/s, with the roofline."""
    from mlx_gptoss import bench as B
    from mlx_gptoss.errors import GptOssError

    if as_json and as_csv:
        raise typer.BadParameter("--json and --csv: choose one output format")
    try:
        B.validate(n_prompt=n_prompt, n_gen=n_gen, depth=depth, repetitions=repetitions, kernels=kernels)
    except GptOssError as e:  # a bad option: one line naming it, exit status 2, like every option check
        raise typer.BadParameter(str(e)) from None
    dt = _dtype(dtype)
    quiet = as_json or as_csv
    with err.status("starting") as status:
        result = B.run(model, n_prompt=n_prompt, n_gen=n_gen, depth=depth, repetitions=repetitions,
                       kernels=kernels, memory=memory, ctx=ctx, dtype=dt, bandwidth_bytes=bandwidth_bytes,
                       offload=offload, kv_bits=kv_bits, group="auto",
                       progress=None if quiet and not sys.stderr.isatty() else status.update)
    if as_json:
        print(json.dumps(result, indent=2))
    elif as_csv:
        rows = B.csv_rows(result)
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    else:
        show(result)


def _dtype(name):
    if name is None:
        return None
    from mlx_gptoss.memory import _dtype

    return _dtype(name, metal=False)


def show(result: dict) -> None:
    from mlx_gptoss.memory import gb

    console = Console()
    m, mod, bw = result["machine"], result["model"], result["bandwidth"]
    console.print(f"[bold]{m['chip']}[/], {m['cores']} cores, {gb(m['memory_bytes'])}, {m['os']}; "
                  f"MLX {m['mlx_version']} ({m['mlx_backend']}), BLAS: {m['blas']}; MoE kernels: {mod['kernels']}",
                  highlight=False)
    t = Table(title_justify="left")
    for col in ("model", "size", "backend", "kernels", "dtype", "test", "t/s"):
        t.add_column(col, justify="right" if col in ("size", "t/s") else "left")
    for r in result["results"]:
        t.add_row(Path(mod["name"]).name or mod["name"], gb(mod["weight_bytes"]), m["mlx_backend"],
                  r.get("kernels_ran") or mod["kernels"], mod["dtype"], r["test"],
                  f"{r['tokens_per_s']:.2f} ± {r['std']:.2f}")
    console.print(t)
    for note in result.get("notes", []):
        console.print(note, highlight=False)
    if result.get("comparison"):
        console.print("metal / builtin: " + ", ".join(f"{c['test']} {c['ratio']:.2f}x" for c in result["comparison"]),
                      highlight=False)
    console.print(f"load {result['load_seconds']:.2f} s, peak memory {gb(result['peak_memory_bytes'])}; "
                  f"memory bandwidth (1 GiB): read {bw['best_read']:.1f} GB/s, copy {bw['numpy_copy']:.1f} GB/s",
                  highlight=False)
    off = result.get("offload")
    if off:
        console.print(f"offload: {'; '.join(off['lever_notes'])}", highlight=False)
        for test, st in off["streaming"].items():
            console.print(f"streaming {test}: expert hit rate {st['hit_rate']:.0%}, "
                          f"{st['bytes_per_token'] / 1e9:.3f} GB streamed per token", highlight=False)
    dist = result.get("distributed")
    if dist:
        console.print(f"{dist['ranks']} ranks (figures per rank): {dist['all_sums_per_token']} all_sums of "
                      f"{dist['bytes_per_all_sum']:,} B per token, {dist['sent_bytes_per_token_per_rank']:,} B sent "
                      f"per rank per token; communication alone {dist['seconds_per_token'] * 1e3:.2f} ms per token "
                      f"({dist['seconds_per_all_sum'] * 1e6:.0f} µs per all_sum)", highlight=False)
    for r in result["roofline"]:
        console.print(f"roofline {r['test']} [{r['kernels']}]: {gb(r['bytes_per_token'])} read per token x "
                      f"{r['achieved_gbps'] * 1e9 / r['bytes_per_token']:.1f} tok/s = {r['achieved_gbps']:.1f} GB/s, "
                      f"{r['percent_of_bandwidth']:.0f}% of the measured {r['bandwidth_gbps']:.1f} GB/s",
                      highlight=False)
