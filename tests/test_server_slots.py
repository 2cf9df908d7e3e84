"""The KV slot pool: longest reusable prefix wins, new conversations take empty slots, then the least
recently used; the memory plan's token budget empties other slots before a request could exceed it."""

from __future__ import annotations

import pytest

from mlx_gptoss import harmony
from mlx_gptoss.server.slots import SlotPool, default_slots, token_budget
from scripted_checkpoint import forget_models, scripted_model


@pytest.fixture(scope="module")
def gpt():
    yield scripted_model("reason")
    forget_models()


def prompt(text: str) -> list[int]:
    return harmony.render([{"role": "user", "content": text}])


def run(pool: SlotPool, ids: list[int]):
    runner = pool.acquire(ids)
    runner.prefill(ids)
    pool.release(runner)
    return runner


def test_budget_and_slot_count_come_from_the_memory_plan(gpt):
    plan = gpt.plan
    budget = token_budget(gpt)
    assert budget >= plan.context
    assert budget * plan.kv_per_token <= plan.budget.usable - plan.weight_bytes
    assert 1 <= default_slots(gpt) <= 8


def test_each_conversation_keeps_its_slot(gpt):
    pool = SlotPool(gpt, 3, budget=None)
    a, b = prompt("conversation A, first question"), prompt("conversation B is about something else")
    ra, rb = run(pool, a), run(pool, b)
    assert ra is not rb and len(pool.slots) == 2
    a2 = a + harmony.encoding().encode("<|channel|>final<|message|>Sure.<|end|><|start|>user<|message|>More"
                                       "<|end|><|start|>assistant", allowed_special="all")
    assert ra.reusable(a2) == len(a) and rb.reusable(a2) < len(a)
    assert pool.acquire(a2) is ra  # the slot holding A's prefix, not the most recent one
    pool.release(ra)
    c = prompt("a third one")
    rc = run(pool, c)
    assert rc not in (ra, rb) and len(pool.slots) == 3
    d = prompt("a fourth one, no slot left: the least recently used (B) is reused")
    assert pool.acquire(d) is rb


def test_token_budget_empties_least_recently_used_slots(gpt):
    a, b, c = prompt("first"), prompt("second conversation"), prompt("third conversation here")
    pool = SlotPool(gpt, 3, budget=len(b) + len(c) + 1)  # a is the shortest: a + b fit, a + b + c do not
    ra, rb = run(pool, a), run(pool, b)
    assert ra.ids and rb.ids and pool.evictions == 0
    rc = run(pool, c)  # a + b + c do not fit: A, the least recently used, is emptied
    assert not ra.ids and rb.ids and rc.ids and pool.evictions == 1
    assert sum(pool.held_tokens()) <= pool.budget


def test_busy_slots_are_never_given_away_nor_emptied(gpt):
    a, b, c = prompt("first"), prompt("second conversation"), prompt("third conversation here")
    pool = SlotPool(gpt, 2, budget=len(a) + len(b) + 4)
    ra = pool.acquire(a)
    ra.prefill(a)
    assert pool.acquire(a) is not ra  # a's own cache is busy: another slot, prefilled afresh
    assert pool.acquire(c) is None  # both slots busy: c waits
    pool.release(ra)
    assert pool.acquire(b, reserve=len(a) + len(b)) is None  # the busy slot's reservation leaves no room
    assert ra.ids  # and nothing was emptied trying
    assert pool.acquire(b) is ra and pool.busy.keys() == set(pool.slots)
