"""Whether backend "auto" may use a custom Metal kernel: the one place a verdict passes from the self-test
to the kernels wrapper.

kernels.py asks `approved(kernel, dtype)`; metal_selftest.py answers by registering its judge with
`set_judge` when it is imported (model.py imports it: every model has the judge). Data flows one way, self-test ->
this registry -> kernels, and neither of the two imports the other's direction: kernels.py knows nothing
of how a kernel is tested. With no judge registered, nothing is approved and the builtin ops run.
"""

from __future__ import annotations

from typing import Callable

# judge(kernel_key, dtype) -> bool: kernel_key like "moe_down", dtype an mx.Dtype
_judge: Callable[[str, object], bool] | None = None


def set_judge(judge: Callable[[str, object], bool] | None) -> Callable[[str, object], bool] | None:
    """Install the function that decides (None removes it); returns the previous one."""
    global _judge
    previous, _judge = _judge, judge
    return previous


def approved(kernel_key: str, dtype) -> bool:
    """True only when a judge is registered and approves this kernel for this activation dtype."""
    return bool(_judge is not None and _judge(kernel_key, dtype))
