"""`gptoss-mac serve`: the OpenAI-compatible server (mlx_gptoss.server) from the command line.

Loads the model once on the model thread (progress bar, the memory plan line), prints the URL and a client
snippet, logs one line per request, and stops cleanly on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from mlx_gptoss import hub
from mlx_gptoss.errors import GptOssError

from . import options
from .chat import load_model

err = Console(stderr=True, highlight=False)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _port(value: int) -> int:
    if not 0 < value < 65536:
        raise typer.BadParameter(f"must be a TCP port (1-65535); got {value}")
    return value


def _host_names(values: list[str]) -> list[str]:
    for v in values:
        if not options.HOSTNAME.fullmatch(v):
            raise typer.BadParameter(f"not a host name (like my-mac.local); got {v!r}")
    return [v.lower().rstrip(".") for v in values]


def _check_port(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be bound."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise GptOssError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None


def client_lines(url: str, model_id: str, api_key: str | None) -> list[str]:
    """A curl and a Python command that work as pasted into a shell: the key is read from $GPTOSS_API_KEY
    (never printed); when the server did not get it from there, the first line says to export it."""
    auth = ' -H "Authorization: Bearer $GPTOSS_API_KEY"' if api_key else ""
    body = shlex.quote(json.dumps({"model": model_id, "input": "Hello"}))
    key = 'os.environ["GPTOSS_API_KEY"]' if api_key else '"none"'
    code = (f"import os; from openai import OpenAI; print(OpenAI(base_url={json.dumps(url)}, api_key={key})"
            f".responses.create(model={json.dumps(model_id)}, input=\"Hello\").output_text)")
    lines = []
    if api_key and os.environ.get("GPTOSS_API_KEY") != api_key:
        lines.append("  first, in the shell you paste these into: export GPTOSS_API_KEY=<the key given to --api-key>")
    return lines + [f"  curl {url}/responses -H 'Content-Type: application/json'{auth} -d {body}",
                    f"  python3 -c {shlex.quote(code)}   # pip install openai"]


def serve(
    model: str = typer.Option(hub.DEFAULT_MODEL, "--model", "-m",
                              help="Hugging Face repo id or local folder; a repo is downloaded on first use."),
    host: str = typer.Option("127.0.0.1", "--host", callback=options.host,
                             help="Address to listen on (any but the loopback needs --api-key or --no-auth)."),
    port: int = typer.Option(8000, "--port", callback=_port, help="TCP port."),
    ctx: int | None = typer.Option(None, "--ctx", callback=options.positive("8192"),
                                   help="Context length in tokens (default: what fits in memory)."),
    memory: str | None = typer.Option(None, "--memory", callback=options.memory_size,
                                      help="Memory budget for the plan, like 16GB (default: this machine's)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="GPTOSS_API_KEY",
                                       help="Require `Authorization: Bearer KEY` (also $GPTOSS_API_KEY)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve a non-loopback --host without an API key."),
    cors: list[str] = typer.Option([], "--cors", help="Allow browser requests from this origin (repeatable; "
                                   "* for any)."),
    slots: int | None = typer.Option(None, "--slots", callback=options.count("4"),
                                     help="KV cache slots (default: from the memory plan, at most 8)."),
    max_queue: int = typer.Option(16, "--max-queue", callback=options.count("16"),
                                  help="Requests that may wait; more get 429."),
    max_batch: int | None = typer.Option(None, "--max-batch", callback=options.count("4"),
                                         help="Requests that decode together (default: the KV slots)."),
    max_body: int = typer.Option(16, "--max-body", callback=options.positive("16", "MB"),
                                  help="Largest request body, in MB."),
    max_tokens: int = typer.Option(16384, "--max-tokens", callback=options.positive("16384"),
                                   help="Output cap of a request that sets none (a runaway reply ends there)."),
    write_timeout: float = typer.Option(30.0, "--write-timeout", callback=options.positive("30", "seconds"),
                                        help="Seconds a stream may wait for a client that stops reading; then "
                                        "it is closed and its generation cancelled."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", callback=_host_names,
                                           help="A Host name to serve without --api-key besides localhost, IP "
                                           "addresses and --host (repeatable; e.g. my-mac.local behind a proxy)."),
) -> None:
    """Serve gpt-oss over OpenAI's API (Responses, Chat Completions, Completions) for agents and apps."""
    from mlx_gptoss.distributed import launched_rank
    from mlx_gptoss.server import Settings, Worker, make_server

    if launched_rank():  # under mlx.launch, ranks > 0 load their share and replay rank 0's model calls: never serve
        load_model(model, ctx=ctx, memory=memory, interactive=False)  # returns on rank 0 only

    if host not in LOOPBACK:
        if not api_key and not no_auth:
            raise typer.BadParameter(f"--host {host} is reachable from other machines: give --api-key KEY "
                                     "(or --no-auth to serve without one)", param_hint="--host")
        err.print(f"[yellow]warning:[/] listening on {host}: other machines can reach this server"
                  + ("" if api_key else " and it has NO API key"))
    _check_port(host, port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    interactive = err.is_terminal
    worker = Worker(lambda: load_model(model, ctx=ctx, memory=memory, interactive=interactive), slots=slots,
                    max_queue=max_queue, max_batch=max_batch)
    worker.start()  # loads on the model thread; a GptOssError ends here as one red line
    model_id = Path(model).name if Path(model).expanduser().exists() else model
    settings = Settings(model_id, api_key=api_key, cors=list(cors), max_body=max_body << 20,
                        default_max_tokens=max_tokens, write_timeout=write_timeout, allowed_hosts=list(allowed_host))
    server = make_server(worker, settings, host, port)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    err.print(f"serving {escape(model_id)} at [bold]{url}[/] ({worker.engine.pool.size} KV slots, batches of up to "
              f"{worker.max_batch}, queue {max_queue}); Ctrl-C stops", markup=True, soft_wrap=True)
    err.print("\n".join(client_lines(url, model_id, api_key)), markup=False, soft_wrap=True)
    try:
        server.run()
    finally:
        worker.shutdown()
    err.print("stopped")
