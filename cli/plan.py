"""`gptoss-mac plan`: will the model fit in this machine's memory, and at which context? Loads nothing."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mlx_gptoss import memory
from mlx_gptoss.hub import DEFAULT_MODEL
from mlx_gptoss.memory import gb

from . import options

console = Console()
STYLE = {"fits": "bold green", "smaller context": "bold yellow", "does not fit": "bold red"}


def plan(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model folder or Hugging Face repo id."),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context length in tokens [default: the model's, 131072].",
                                      callback=options.positive("8192")),
    memory_: Optional[str] = typer.Option(None, "--memory", help="Memory budget instead of this machine's, "
                                          "e.g. 16GB (10^9 bytes) or 16GiB; with --device metal, the Mac's memory.",
                                          callback=options.memory_size),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Activation dtype: bfloat16, float16 or float32 "
                                        "[default: bfloat16 on Metal, float32 on MLX's CPU backend].",
                                        callback=options.choice(*options.DTYPES)),
    device: str = typer.Option("auto", "--device", help="Plan for: auto (this machine), metal (a Mac: fused "
                               "attention, bf16, the GPU working set of a Mac with --memory) or cpu.",
                               callback=options.choice("auto", "metal", "cpu")),
    offload: str = options.OFFLOAD,
    kv_bits: Optional[int] = options.KV_BITS,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (keys in the README), for scripts."),
    ranks: int = typer.Option(1, "--ranks", help="Plan one Mac of N sharing the model under mlx.launch.",
                              callback=options.count("2")),
) -> None:
    """Show the memory a model needs (from its safetensors headers) and whether it fits. Loads nothing."""
    if ranks > 1:
        from mlx_gptoss.distributed.plan import plan_ranks

        p = plan_ranks(model, ranks, context=ctx, memory=memory_, dtype=dtype, device=device)
    else:
        from mlx_gptoss.offload import plan as offload_plan

        p = offload_plan.plan(model, context=ctx, memory_=memory_, dtype=dtype, device=device, offload=offload,
                              kv_bits=kv_bits)
    if as_json:
        print(json.dumps(plan_dict(p), indent=2))
    else:
        console.print(plan_table(p))
        console.print(p.message, style=STYLE[p.status], highlight=False)
    if not p.fits:
        raise typer.Exit(1)


def plan_dict(p: memory.Plan) -> dict:
    """The plan for scripts; every size in bytes."""
    return {
        "model": p.checkpoint, "sized_from": p.source,
        "backend": "metal" if p.fused_attention else "cpu", "dtype": p.dtype,
        "weights": {"on_disk": p.file_bytes, "in_memory": p.weights, "total": p.weight_bytes},
        "kv_cache": {"per_token": p.kv_per_token, "sliding_window_layers": p.kv_sliding,
                     "growth_tokens": p.kv_slack, "total": p.kv_bytes if p.fits else None},
        "activations": {"bytes": p.activations, "prefill_chunk": p.prefill_chunk, "what": p.activations_note,
                        "decode_per_sequence": p.decode_activations,
                        "measured": asdict(p.costs) if p.costs else None},
        "loading": p.loading, "overhead": p.overhead,
        "terms": [{"name": n, "bytes": b, "what": w} for n, b, w in p.terms()],
        "needed": p.needed if p.fits else None, "needed_at_min_context": p.min_needed,
        "budget": {"usable": p.budget.usable, "source": p.budget.source, "machine_total": p.budget.total},
        "context": {"requested": p.requested_context, "planned": p.context, "min": memory.MIN_CONTEXT},
        "decision": p.status, "fits": p.fits, "message": p.message, "remedies": p.remedies,
        "levers": p.levers.names() if hasattr(p, "levers") else [],
        "lever_notes": p.lever_notes() if hasattr(p, "lever_notes") else [],
    }


def plan_table(p: memory.Plan) -> Table:
    kv8 = getattr(getattr(p, "levers", None), "kv_bits", 16) == 8  # the 8-bit cache's attention is not fused
    backend = ("Metal" if p.fused_attention else "CPU") + (" (fused attention)" if p.fused_attention and not kv8
                                                           else " (unfused attention)")
    t = Table(title=f"memory plan: {p.checkpoint}", caption=f"sized from {p.source}; {backend}, {p.dtype}",
              title_justify="left", caption_justify="left")
    t.add_column("part")
    t.add_column("on disk", justify="right")
    t.add_column("in memory", justify="right")
    t.add_column("note")
    notes = {"experts": "MXFP4, kept as stored", "attention": f"q/k/v/o + sinks, {p.dtype}",
             "embedding": p.dtype, "unembedding": f"lm_head, {p.dtype}", "other": "norms, router"}
    for part in memory.PARTS:
        t.add_row(f"weights: {part}", gb(p.file_bytes[part]), gb(p.weights[part]), notes[part])
    t.add_row("weights", gb(sum(p.file_bytes.values())), gb(p.weight_bytes), "", style="bold")
    ctx = p.context or min(memory.MIN_CONTEXT, p.requested_context)
    n_full = sum(lt == "full_attention" for lt in p.config.layer_types)
    per8k = p.kv_per_token * 8192
    t.add_row("KV cache: full-attention layers", "", gb(p.kv_per_token * (ctx + p.kv_slack)),
              f"{n_full} layers, {p.kv_per_token:,} B/token = {gb(per8k)} per 8k, at {ctx:,} tokens "
              f"(+ up to {p.kv_slack} as it grows in {memory.KV_STEP}-token steps)")
    t.add_row("KV cache: sliding-window layers", "", gb(p.kv_sliding),
              f"{len(p.config.layer_types) - n_full} layers, window {p.config.sliding_window} + one "
              f"{p.prefill_chunk}-token chunk, and up to {memory.MAX_SNAPSHOTS} window snapshots")
    t.add_row("activations", "", gb(p.activations), p.activations_note)
    if getattr(p, "stream_buffer", 0):
        t.add_row("  expert streaming buffer", "", f"({gb(p.stream_buffer)})", "one prefill step's experts of one "
                  "layer, stacked and read: part of the activations when the MoE block sets their peak")
    if p.loading:
        t.add_row("loading", "", gb(p.loading), p.loading_note + ", beyond the running peak")
    if p.overhead:
        t.add_row("reserve", "", gb(p.overhead), "Python, tokenizer, MLX runtime outside MLX's buffers "
                  "(against available RAM only)")
    for note in p.lever_notes() if hasattr(p, "lever_notes") else ():
        t.add_row("lever", "", "", note)
    if p.fits:
        t.add_row("needed", "", gb(p.needed), f"at a context of {p.context:,} tokens", style="bold")
    else:
        t.add_row("needed", "", gb(p.min_needed), f"even at {memory.MIN_CONTEXT:,} tokens", style="bold")
    total = f", machine {gb(p.budget.total)}" if p.budget.total else ""
    t.add_row("budget", "", gb(p.budget.usable), f"{p.budget.source}{total}", style="bold")
    return t
