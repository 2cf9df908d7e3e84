"""Options that several commands share, declared once (typer reads a default's metadata per command), and the
checks every command's options go through: one sentence naming what is accepted, exit status 2 (click's usage
error, printed as one line by app.main)."""

from __future__ import annotations

import ipaddress
import re

import typer

OFFLOAD_MODES = ("auto", "none", "experts")  # mlx_gptoss.offload.OFFLOAD_MODES, without importing MLX for --help
KV_BITS_CHOICES = (8, 16)
DTYPES = ("bfloat16", "float16", "float32")


def _words(values) -> str:
    values = [str(v) for v in values]
    return ", ".join(values[:-1]) + " or " + values[-1]


def choice(*values):
    """The value must be one of `values` (strings or ints, as the option is typed); None passes (a default)."""
    def check(value):
        if value is not None and value not in values:
            raise typer.BadParameter(f"must be {_words(values)}; got {value!r}")
        return value
    return check


def positive(example: str, unit: str = "tokens"):
    """A positive amount of `unit` (tokens, MB)."""
    def check(value):
        if value is not None and value <= 0:
            raise typer.BadParameter(f"must be a positive number of {unit}, like {example}; got {value}")
        return value
    return check


def count(example: str):
    """How many of something (slots, ranks, requests): a whole number >= 1."""
    def check(value):
        if value is not None and value < 1:
            raise typer.BadParameter(f"must be a whole number of at least 1, like {example}; got {value}")
        return value
    return check


ZERO = re.compile(r"\s*0*\.?0*\s*[kmgt]?i?b?\s*", re.IGNORECASE)  # "0GB", "0.0", "0 GiB": a size, but no memory


def memory_size(value: str | None) -> str | None:
    """A memory budget: 16GB, 24GiB, 64G, as mlx_gptoss.memory.parse_size reads it."""
    from mlx_gptoss.errors import GptOssError
    from mlx_gptoss.memory import parse_size

    if value is not None:
        try:
            parse_size(value)
        except GptOssError:
            if ZERO.fullmatch(value) and any(c.isdigit() for c in value):
                raise typer.BadParameter(f"must be more than zero, like 16GB; got {value!r}") from None
            raise typer.BadParameter(f"not a size: write it like 16GB, 24GiB or 64G; got {value!r}") from None
    return value


HOSTNAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?",
                      re.IGNORECASE)


def host(value: str) -> str:
    """An address to listen on: an IPv4 or IPv6 address, or a host name (resolved when the port is bound)."""
    try:
        ipaddress.ip_address(value.strip("[]"))
        return value.strip("[]")
    except ValueError:
        pass
    if ":" in value:
        raise typer.BadParameter(f"not an IPv6 address; got {value!r}")
    if re.fullmatch(r"[0-9.]+", value):
        raise typer.BadParameter(f"not an IPv4 address (four numbers 0-255, like 127.0.0.1 or 0.0.0.0); got {value!r}")
    if not HOSTNAME.fullmatch(value):
        raise typer.BadParameter(f"not an address or a host name (like 127.0.0.1, 0.0.0.0 or localhost); got {value!r}")
    return value


OFFLOAD = typer.Option("auto", "--offload", callback=choice(*OFFLOAD_MODES),
                       help="auto: stream experts / 8-bit weights only when the model does not fit; none: never; "
                       "experts: stream experts anyway.")
KV_BITS = typer.Option(None, "--kv-bits", callback=choice(*KV_BITS_CHOICES),
                       help="KV cache of the full-attention layers: 8 or 16 bits [default: the plan's choice].")
