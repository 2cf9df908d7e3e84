"""`gptoss-mac`: the Typer app. Each command lives in its own module and registers itself here.

Errors the user can fix (mlx_gptoss.GptOssError) print as one red sentence and exit 1, never a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys

import typer
from rich.console import Console
from rich.markup import escape

from mlx_gptoss.errors import GptOssError

from . import on_ctrl_c

app = typer.Typer(
    name="gptoss-mac",
    help="Run OpenAI's gpt-oss-20b and gpt-oss-120b on Apple silicon with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: Rich markup mode would eat "[default: ...]" as a tag and show flags as "<bool>".
    rich_markup_mode=None,
    # The root's --help is declared below as a plain bool flag: typer's own, unset when a command's --help is
    # asked for, would coerce its None through pydantic (a 0.1 s import) before the command's help prints.
    add_help_option=False,
)
err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        version()
        raise typer.Exit()


def _print_help(ctx: typer.Context, value: bool) -> None:
    if value:
        print(ctx.get_help())
        raise typer.Exit()


@app.callback()
def root(
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="Print the versions of gptoss-mac and MLX and exit."),
    _help: bool = typer.Option(False, "--help", callback=_print_help, is_eager=True,
                               help="Show this message and exit."),
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
    """The `gptoss-mac` command. What can go wrong before or around a command is one line on stderr:
    a bad option (exit 2), a GptOssError (exit 1), Ctrl-C at any moment (exit 130), never a traceback."""
    signal.signal(signal.SIGINT, on_ctrl_c)  # from here on Ctrl-C is a KeyboardInterrupt (but while importing)
    command = typer.main.get_command(app)
    try:
        try:
            with command.make_context("gptoss-mac", join_sizes(sys.argv[1:])) as ctx:
                command.invoke(ctx)
        except Exception as e:
            if not hasattr(e, "format_message") or not hasattr(e, "exit_code"):  # a click error carries both
                raise
            usage_error(e)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except GptOssError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # one line, never wrapped
        sys.exit(1)
    except KeyboardInterrupt:
        interrupted()
    except typer.Abort:  # typer.confirm() read the end of the input
        sys.exit(1)
    except OSError as e:
        if e.errno != errno.EPIPE:  # `gptoss-mac plan --json | head -1`: the reader left, nothing to say
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not complain
        sys.exit(1)


def usage_error(e) -> None:
    """click's error (an option's value, an unknown option or command) as one line, exit status 2."""
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError":  # `gptoss-mac` alone: the help is the answer
        print(ctx.get_help())
        sys.exit(e.exit_code)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    text = " ".join(e.format_message().split())
    err.print(f"[bold red]error:[/] {escape(text)}{escape(where)}", highlight=False, soft_wrap=True)
    sys.exit(e.exit_code)


def interrupted() -> None:
    """Ctrl-C outside a reply: one line, status 130, at once (no thread or cleanup may print a traceback)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


if __name__ == "__main__":
    main()
