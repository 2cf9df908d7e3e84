"""The KV slot pool: several prompt caches (chat.Runner), so several agents each stay incremental.

Each request goes to the slot whose cache can be reused for the longest prefix of its prompt: the slot's
cache as it is when it holds a prefix of the prompt, else its longest snapshot that is one (the engine
snapshots the sliding-window layers at the end of every prompt, which is also where a finished turn's
history diverges from what was generated: the next prompt drops that turn's reasoning). With no reuse
anywhere, an empty slot is taken, else the least recently used one.

Memory: the slots share one token budget, what the memory plan leaves for KV after the weights, the
activation peak and the reserve, with each slot's sliding-window layers and growth step counted (the same
figures as `plan --json`; at least the planned context). Before a request runs, the least recently used idle
slots are emptied until all caches plus this prompt and its reply fit that budget. The slots of running
requests (the scheduler runs several at once) are busy: never given to another request nor emptied, and
counted at what they may come to hold; a request for which they leave no room waits.
"""

from __future__ import annotations

from ..chat import Runner, runner_for

MAX_SLOTS = 8
TOKENS_PER_SLOT = 4096  # the default slot count: one per this many tokens of budget (an agent's typical size)


def token_budget(gpt) -> int | None:
    """How many cached tokens all slots together may hold (None: no plan, unbounded)."""
    plan = getattr(gpt, "plan", None)
    if plan is None or not getattr(plan, "kv_per_token", 0):
        return None
    spare = plan.budget.usable - plan.weight_bytes - plan.activations - plan.overhead
    per_slot = plan.kv_sliding + plan.kv_per_token * getattr(plan, "kv_slack", 0)
    return max(plan.context, (spare - MAX_SLOTS * per_slot) // plan.kv_per_token)


def default_slots(gpt) -> int:
    budget = token_budget(gpt)
    return MAX_SLOTS if budget is None else max(1, min(MAX_SLOTS, budget // TOKENS_PER_SLOT))


class SlotPool:
    """Up to `size` Runners, created on first use, ordered by last use. Used only by the model thread.
    A slot acquired for a running request is busy (with the tokens it may come to hold) until released:
    it is never given to another request nor emptied to make room."""

    def __init__(self, gpt, size: int | None = None, budget: int | None = -1):
        self.gpt = gpt
        self.size = max(1, size or default_slots(gpt))
        self.budget = token_budget(gpt) if budget == -1 else budget
        self.slots: list[Runner] = []  # least recently used first
        self.busy: dict[Runner, int] = {}  # running requests' slots -> the tokens each may hold
        self.evictions = 0

    def acquire(self, prompt: list[int], reserve: int = 0) -> Runner | None:
        """The slot to run `prompt` on (marked busy and most recently used), after making room for it; None
        when every slot is busy or the busy ones leave no room for it (the request waits)."""
        need = len(prompt) + reserve
        if self.budget is not None and self.busy and sum(self.busy.values()) + need > self.budget:
            return None
        free = [r for r in self.slots if r not in self.busy]
        scored = [(r.reusable(prompt), -i, r) for i, r in enumerate(free)]
        best = max(scored, key=lambda s: (s[0], s[1]), default=None)
        if best is not None and best[0] > 0:
            runner = best[2]
        elif len(self.slots) < self.size:
            runner = runner_for(self.gpt)  # under mlx.launch, a cache mirrored on every rank
        elif free:
            empty = [r for r in free if not r.ids]
            runner = empty[0] if empty else free[0]  # the least recently used
        else:
            return None
        if runner in self.slots:
            self.slots.remove(runner)
        self.slots.append(runner)
        self.busy[runner] = need
        self._fit(runner, need)
        return runner

    def release(self, runner: Runner) -> None:
        self.busy.pop(runner, None)

    def _fit(self, runner: Runner, need: int) -> None:
        """Empty idle slots, least recently used first, until all caches and the busy slots' reservations fit."""
        if self.budget is None:
            return
        for other in list(self.slots):
            held = sum(self.busy.get(r, len(r.ids)) for r in self.slots if r is not runner)
            if held + need <= self.budget:
                return
            if other is not runner and other not in self.busy and other.ids:
                other.reset()
                self.evictions += 1

    def held_tokens(self) -> list[int]:
        return [len(r.ids) for r in self.slots]
