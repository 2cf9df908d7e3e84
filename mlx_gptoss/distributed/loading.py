"""Joining the group and loading one rank's share: the group from mlx.launch, the per-rank memory plan
(agreed on by all ranks), and the sharded model read by offset."""

from __future__ import annotations

import dataclasses
import os

import mlx.core as mx

from ..errors import GptOssError
from ..memory import apply as apply_plan, make_plan
from .layout import check_ranks, rank_view
from .mirror import on_sigterm
from .reader import ReadStats
from .shard import build

# Environment variables a launcher sets: mlx.launch (ring, jaccl), mpirun.
LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launched_rank() -> int | None:
    """This process's rank when a launcher started it (mlx.launch, mpirun), else None; nothing is connected.
    A server checks it first: ranks other than 0 load their share and follow, and never serve."""
    for var in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def join(group):
    """group=None -> None; "auto" -> the group mlx.launch (or mpirun) started, None when run alone;
    a mx.distributed.Group -> itself. A group of one is None (nothing to share)."""
    if group is None:
        return None
    if isinstance(group, str):
        if group != "auto":
            raise GptOssError(f"group={group!r}: use \"auto\", None, or a mx.distributed.Group")
        if not any(v in os.environ for v in LAUNCH_ENV):
            return None
        if not mx.distributed.is_available():
            raise GptOssError("started by a launcher, but this MLX build has no distributed backend")
        group = mx.distributed.init(backend="any")
    if group.size() < 2:
        return None
    on_sigterm(group.rank())
    return group


def rank_plan(ckpt, group, *, dtype, memory=None, ctx=None):
    """This rank's memory plan (its share of the weights and of the KV heads), at a context every rank
    can hold: each rank plans on its own machine, then all take the smallest context that fits all."""
    rank, n = group.rank(), group.size()
    check_ranks(ckpt.config, n)
    view = rank_view(ckpt, rank, n)
    view = dataclasses.replace(view, name=f"{ckpt.name} (rank {rank} of {n})")
    plan = make_plan(view, context=ctx, memory=memory, dtype=dtype)
    contexts = mx.distributed.all_gather(mx.array([plan.context]), group=group).tolist()
    if 0 in contexts:
        if not plan.fits:
            raise GptOssError(plan.message)
        raise GptOssError(f"rank {contexts.index(0)} cannot hold its share of {ckpt.name}; its error says why. "
                          "Use more ranks (gptoss-mac plan --ranks N)")
    if min(contexts) < plan.context:
        plan = make_plan(view, context=min(contexts), memory=memory, dtype=dtype)
    return plan


def load_rank(ckpt, group, *, dtype, memory=None, ctx=None, progress=None):
    """(sharded model, plan, ReadStats) of this rank: the plan is applied before any weight is read."""
    plan = rank_plan(ckpt, group, dtype=dtype, memory=memory, ctx=ctx)
    apply_plan(plan)
    stats = ReadStats()
    net = build(ckpt, group, dtype, progress=progress, stats=stats)
    return net, plan, stats
