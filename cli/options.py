"""Options that several commands share, declared once (typer reads a default's metadata per command)."""

from __future__ import annotations

import typer

from mlx_gptoss.errors import GptOssError

OFFLOAD = typer.Option("auto", "--offload", help="auto: stream experts / 8-bit weights only when the model does "
                       "not fit; none: never; experts: stream experts anyway.")
KV_BITS = typer.Option(None, "--kv-bits", help="KV cache of the full-attention layers: 8 or 16 bits "
                       "[default: the plan's choice].")


# --- option checks: one sentence each, exit status 2 (click's usage error)

def positive(example: str):
    def check(value):
        if value is not None and value <= 0:
            raise typer.BadParameter(f"must be a positive number of tokens, like {example}; got {value}")
        return value
    return check


def memory_size(value: str | None) -> str | None:
    from mlx_gptoss.memory import parse_size

    if value is not None:
        try:
            parse_size(value)
        except GptOssError:
            raise typer.BadParameter(f"not a size: write it like 16GB, 24GiB or 64G; got {value!r}") from None
    return value
