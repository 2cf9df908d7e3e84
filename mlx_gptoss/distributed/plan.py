"""`gptoss-mac plan --ranks N`: the memory plan of one rank of N (rank 0: the largest share when the
intermediate size does not split evenly), from the headers alone, like the single-machine plan."""

from __future__ import annotations

import dataclasses

from ..memory import Plan, device_budget, make_plan, read_checkpoint
from .layout import check_ranks, rank_view


def plan_ranks(model, ranks: int, *, context=None, memory=None, dtype=None, device=None) -> Plan:
    budget = device_budget(device, memory)  # each Mac's budget (the same Macs assumed)
    ckpt = read_checkpoint(model)
    check_ranks(ckpt.config, ranks)
    view = rank_view(ckpt, 0, ranks)
    view = dataclasses.replace(view, name=f"{ckpt.name}, each of {ranks} Macs (rank 0, the largest share)")
    return make_plan(view, context=context, budget=budget, dtype=dtype)
