"""Whether backend "auto" may use a custom Metal kernel: the one place a verdict passes from the self-test
to the kernels wrapper.

kernels.py asks `approved(kernel, dtype, tokens)` on every decode-sized MoE call; metal_selftest.py answers by
registering its judge with `set_judge` when it is imported (model.py imports it: every model has the judge).
The judge is asked once per (kernel, dtype, tokens) and its answer kept, so a decode step costs a dict lookup,
never a file, a hash or a
subprocess; load() calls `forget()` so that each model load decides afresh (metal_selftest remembers its
results, so that is cheap). Data flows one way, self-test -> this registry -> kernels, and neither of the two
imports the other's direction: kernels.py knows nothing of how a kernel is tested. With no judge registered,
nothing is approved and the builtin ops run.
"""

from __future__ import annotations

from typing import Callable

# judge(kernel_key, dtype, tokens) -> bool: kernel_key like "moe_down", dtype an mx.Dtype, tokens the T of the call
_judge: Callable[[str, object, int], bool] | None = None
_verdicts: dict[tuple[str, object, int], bool] = {}


def set_judge(judge: Callable[[str, object, int], bool] | None) -> Callable[[str, object, int], bool] | None:
    """Install the function that decides (None removes it); returns the previous one. Forgets all verdicts."""
    global _judge
    previous, _judge = _judge, judge
    _verdicts.clear()
    return previous


def approved(kernel_key: str, dtype, tokens: int) -> bool:
    """True only when a judge is registered and approved this kernel for this activation dtype at T = tokens."""
    key = (kernel_key, dtype, tokens)
    verdict = _verdicts.get(key)
    if verdict is None:
        verdict = _verdicts[key] = bool(_judge is not None and _judge(*key))
    return verdict


def forget() -> None:
    """Drop every kept verdict: the next approved() asks the judge again (a new model load, tests)."""
    _verdicts.clear()
