"""`gptoss-mac`: the Typer app. Each command lives in its own module and registers itself here.

Errors the user can fix (mlx_gptoss.GptOssError) print as one red sentence and exit 1, never a traceback.
"""

from __future__ import annotations

import re
import sys

import typer
from rich.console import Console
from rich.markup import escape

from mlx_gptoss.errors import GptOssError

app = typer.Typer(
    name="gptoss-mac",
    help="Run OpenAI's gpt-oss-20b and gpt-oss-120b on Apple silicon with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: Rich markup mode would eat "[default: ...]" as a tag and show flags as "<bool>".
    rich_markup_mode=None,
)
err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        version()
        raise typer.Exit()


@app.callback()
def root(
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="Print the versions of gptoss-mac and MLX and exit."),
) -> None:
    """Run OpenAI's gpt-oss-20b and gpt-oss-120b on Apple silicon with MLX."""


@app.command()
def version() -> None:
    """Print the versions of gptoss-mac and MLX."""
    import mlx.core as mx

    import mlx_gptoss

    print(f"gptoss-mac {mlx_gptoss.__version__} (mlx {mx.__version__})")


from .chat import chat  # noqa: E402
from .download import download  # noqa: E402
from .doctor import doctor  # noqa: E402
from .plan import plan  # noqa: E402
from .bench import bench  # noqa: E402
from .serve import serve  # noqa: E402
from .launch import launch  # noqa: E402

app.command()(chat)
app.command()(download)
app.command()(doctor)
app.command()(plan)
app.command()(bench)
app.command()(serve)
app.command()(launch)


UNIT = re.compile(r"[kmgt]i?b?", re.IGNORECASE)
NUMBER = re.compile(r"[0-9]*\.?[0-9]+")


def join_sizes(args: list[str]) -> list[str]:
    """`--memory 16 GB` (unquoted: two arguments) -> `--memory 16GB`."""
    out = list(args)
    for i in range(len(out) - 1, 0, -1):
        value = out[i - 1].removeprefix("--memory=")
        is_memory = out[i - 1].startswith("--memory=") or (i >= 2 and out[i - 2] == "--memory")
        if is_memory and NUMBER.fullmatch(value) and UNIT.fullmatch(out[i]):
            out[i - 1:i + 1] = [out[i - 1] + out[i]]
    return out


def main() -> None:
    try:
        app(args=join_sizes(sys.argv[1:]))
    except GptOssError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # one line, never wrapped
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
