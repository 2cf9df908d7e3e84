"""Options that several commands share, declared once (typer reads a default's metadata per command)."""

from __future__ import annotations

import typer

OFFLOAD = typer.Option("auto", "--offload", help="auto: stream experts / 8-bit weights only when the model does "
                       "not fit; none: never; experts: stream experts anyway.")
KV_BITS = typer.Option(None, "--kv-bits", help="KV cache of the full-attention layers: 8 or 16 bits "
                       "[default: the plan's choice].")
