"""`gptoss-mac launch codex|claude|opencode [-- ARGS]`: one command from a gpt-oss model to a coding agent.

It uses the server answering on 127.0.0.1:PORT, or starts `gptoss-mac serve` with the same model options;
writes the client's configuration without touching the user's own files; and runs the client:
- codex: `-c` overrides on the command line (a provider with wire_api "responses"; the raw reasoning shown,
  as gpt-oss writes no summaries; update checks, analytics, the plugin sync from GitHub and ChatGPT apps off);
  the user's ~/.codex (history, AGENTS.md, MCP servers) is used as it is.
- claude: environment variables only (ANTHROPIC_BASE_URL, ANTHROPIC_AUTH_TOKEN, every model role mapped to
  the served model, non-essential traffic off).
- opencode: OPENCODE_CONFIG pointing to a file written in gptoss-mac's state folder.
A server that was already answering stays up and the client replaces this process (exec); a server started
here lives exactly as long as the client: it runs in its own session (Ctrl-C reaches only the client), and
is stopped when the client exits, whose exit status becomes launch's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

from mlx_gptoss import hub

from . import options

CLIENTS = {  # name: (executable, how to install it)
    "codex": ("codex", "npm install -g @openai/codex"),
    "claude": ("claude", "npm install -g @anthropic-ai/claude-code"),
    "opencode": ("opencode", "npm install -g opencode-ai"),
}
PROVIDER = "gptoss-mac"
OUTPUT_LIMIT = 16384  # the reply cap opencode is told (serve's default --max-tokens); at most half the context
KEY_ENV = "GPTOSS_API_KEY"
LOAD_TIMEOUT = 1800.0  # s: the first start may download and load a 13-65 GB model


def codex_args(url: str, model: str, api_key: str | None) -> list[str]:
    """`codex` options selecting the server as its model provider (nothing written to ~/.codex)."""
    provider = {"name": PROVIDER, "base_url": f"{url}/v1", "wire_api": "responses"}
    if api_key:
        provider["env_key"] = KEY_ENV
    inline = "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in provider.items()) + "}"
    return ["-c", f"model_providers.{PROVIDER}={inline}", "-c", f"model_provider={json.dumps(PROVIDER)}",
            "-c", f"model={json.dumps(model)}", "-c", "check_for_update_on_startup=false",
            "-c", "analytics.enabled=false", "-c", "features.plugins=false", "-c", "features.apps=false",
            "-c", "show_raw_agent_reasoning=true"]  # gpt-oss writes no summaries: show its reasoning itself


def codex_env(api_key: str | None) -> dict[str, str]:
    return {KEY_ENV: api_key} if api_key else {}


def claude_env(url: str, model: str, api_key: str | None) -> dict[str, str]:
    """Claude Code's environment: the server as its Anthropic endpoint, the served model in every role (main,
    small/fast, sub-agents), and no traffic to anyone else (updates, telemetry, error reports)."""
    env = {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_AUTH_TOKEN": api_key or PROVIDER, "ANTHROPIC_API_KEY": "",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1",
           "DISABLE_ERROR_REPORTING": "1"}
    for role in ("ANTHROPIC_MODEL", "ANTHROPIC_SMALL_FAST_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL",
                 "ANTHROPIC_DEFAULT_SONNET_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL", "CLAUDE_CODE_SUBAGENT_MODEL"):
        env[role] = model
    return env


def opencode_config(url: str, model: str, api_key: str | None, context: int | None = None) -> dict:
    """opencode's configuration: the server as an OpenAI-compatible provider, its model the default, with the
    server's context as the model's limit (opencode compacts a conversation before it outgrows it)."""
    card = {"name": model, "tool_call": True, "reasoning": True}
    if context:
        card["limit"] = {"context": context, "output": min(OUTPUT_LIMIT, context // 2)}
    return {"$schema": "https://opencode.ai/config.json", "autoupdate": False, "share": "disabled",
            "provider": {PROVIDER: {"npm": "@ai-sdk/openai-compatible", "name": PROVIDER,
                                    "options": {"baseURL": f"{url}/v1", "apiKey": api_key or PROVIDER},
                                    "models": {model: card}}},
            "model": f"{PROVIDER}/{model}"}


def client_command(client: str, exe: str, url: str, model: str, api_key: str | None, args: list[str],
                   config_dir: Path, context: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The client's argv and the environment variables to add (context: the server's, in tokens)."""
    if client == "codex":
        return [exe, *codex_args(url, model, api_key), *args], codex_env(api_key)
    if client == "claude":
        return [exe, *args], claude_env(url, model, api_key)
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "opencode.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(opencode_config(url, model, api_key, context), indent=2))
    os.replace(tmp, path)
    # no traffic to anyone else for what only cloud providers need: the models.dev catalog, default auth plugins
    return [exe, *args], {"OPENCODE_CONFIG": str(path), "OPENCODE_DISABLE_AUTOUPDATE": "1",
                          "OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1"}


# ------------------------------------------------------------------------------------------ the server

def server_health(url: str) -> dict | None:
    """GET /health of a gptoss-mac server answering at url ({"model", "context", ...}), or None when nothing
    (or something else) answers."""
    import httpx

    try:
        health = httpx.get(f"{url}/health", timeout=2)
        body = health.json() if health.is_success else None
        return body if isinstance(body, dict) and "model" in body else None
    except (httpx.HTTPError, ValueError):
        return None


def key_accepted(url: str, api_key: str | None) -> bool:
    """Whether the server at url takes this key (or needs none): GET /v1/models is not a 401."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        return httpx.get(f"{url}/v1/models", headers=headers, timeout=5).status_code != 401
    except httpx.HTTPError:
        return True  # it answered /health a moment ago; the client will say what goes wrong


def start_server(model: str, port: int, ctx: int | None, memory: str | None, api_key: str | None,
                 log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlx_gptoss.cli.app", "serve", "--model", model, "--port", str(port)]
    cmd += ["--ctx", str(ctx)] if ctx else []
    cmd += ["--memory", memory] if memory else []
    env = dict(os.environ)
    if api_key:
        env[KEY_ENV] = api_key  # not on the command line, where ps would show it
    else:
        env.pop(KEY_ENV, None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)


def wait_until_up(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = LOAD_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    with _err().status(f"starting gptoss-mac serve (log: {log_path})"):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise typer.Exit(_fail("gptoss-mac serve stopped before answering:\n  " + "\n  ".join(tail)))
            health = server_health(url)
            if health:
                return health
            time.sleep(0.5)
    stop_server(proc)
    raise typer.Exit(_fail(f"gptoss-mac serve did not answer within {timeout:.0f} s (log: {log_path})"))


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _err():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _fail(text: str) -> int:
    from .chat import error

    error(text)
    return 1


# ------------------------------------------------------------------------------------------ the command

def launch(
    client: str = typer.Argument(..., help="The agent to run: codex, claude or opencode."),
    args: list[str] = typer.Argument(None, help="Arguments for the client, after `--`."),
    model: str = typer.Option(hub.DEFAULT_MODEL, "--model", "-m",
                              help="Model to serve when no server is answering on --port (repo id or folder)."),
    port: int = typer.Option(8000, "--port", help="The server's port on 127.0.0.1 (used if one answers there)."),
    ctx: int | None = typer.Option(None, "--ctx", callback=options.positive("32768"),
                                   help="Context length for a server started here (default: what fits)."),
    memory: str | None = typer.Option(None, "--memory", callback=options.memory_size,
                                      help="Memory budget for a server started here, like 16GB."),
    api_key: str | None = typer.Option(None, "--api-key", envvar=KEY_ENV,
                                       help="The server's API key (also $GPTOSS_API_KEY)."),
) -> None:
    """Run Codex CLI, Claude Code or opencode on gpt-oss: serve the model (unless a server already answers
    on --port), configure the client for it without touching your own config files, and start the client.
    Example: gptoss-mac launch claude -- -p "fix the failing test"."""
    from .chat import state_dir

    if client not in CLIENTS:
        raise typer.BadParameter(f"choose codex, claude or opencode; got {client!r}", param_hint="CLIENT")
    if not 0 < port < 65536:
        raise typer.BadParameter(f"must be a TCP port (1-65535); got {port}", param_hint="--port")
    exe_name, install = CLIENTS[client]
    exe = shutil.which(exe_name)
    if exe is None:
        raise typer.Exit(_fail(f"{exe_name} is not on PATH; install it with `{install}`"))
    url = f"http://127.0.0.1:{port}"
    folder = state_dir() / "launch"
    proc = None
    served = server_health(url)
    if served is not None and not key_accepted(url, api_key):
        raise typer.Exit(_fail(f"the server on port {port} needs its API key: give it with --api-key KEY or "
                               f"${KEY_ENV}" if not api_key else f"the server on port {port} refuses this API key"))
    if served is None:
        proc = start_server(model, port, ctx, memory, api_key, folder / f"serve-{port}.log")
        served = wait_until_up(proc, url, folder / f"serve-{port}.log")
    _err().print(f"{client} on {served['model']} at {url}" + (" (the server stops with it)" if proc else
                                                              " (a running server)"), soft_wrap=True)
    argv, extra = client_command(client, exe, url, served["model"], api_key, list(args or []), folder,
                                 served.get("context"))
    env = {**os.environ, **extra}
    if proc is None:  # the server is someone else's: become the client
        os.execvpe(argv[0], argv, env)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the client's to handle
    try:
        code = subprocess.call(argv, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
        stop_server(proc)
    raise typer.Exit(code)
