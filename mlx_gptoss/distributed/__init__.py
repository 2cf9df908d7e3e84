"""gpt-oss over several Macs with MLX's own engine (mx.distributed, mlx.launch): tensor parallelism.

    gpt = mlx_gptoss.load(model, group="auto")   # under mlx.launch: each rank loads only its share
    logits = gpt.model(tokens)                    # every rank calls it with the same tokens (SPMD, as mlx-lm)
    gpt = lead_or_follow(gpt)                     # or: rank 0 runs the program, the others replay its calls

layout.py    which slice of every tensor a rank holds (heads; intermediate in whole MXFP4 blocks)
reader.py    reading those slices from the safetensors files by offset
shard.py     the rank's model: built at its shapes, one all_sum after attention and one after the MoE
loading.py   joining the group, the per-rank memory plan, loading
mirror.py    rank 0 leads, followers replay its model calls and cache operations (chat, bench, serve)
plan.py      `gptoss-mac plan --ranks N` and the "shard it over N Macs" remedy
"""

from __future__ import annotations

from .loading import join, launched_rank
from .mirror import follow_and_exit, lead, time_comm


def lead_or_follow(gpt):
    """For programs run under mlx.launch: rank 0 gets gpt back with its model calls mirrored on the other
    ranks; every other rank replays them here until rank 0 ends, then exits (never returns). A gpt loaded
    without a group is returned as it is."""
    group = getattr(gpt, "group", None)
    if group is None:
        return gpt
    if group.rank() == 0:
        return lead(gpt, group)
    follow_and_exit(gpt.model, group)


__all__ = ["join", "launched_rank", "lead_or_follow", "time_comm"]
