"""The machinery of the real-client tests: scripted checkpoints keyed to what a client's prompt ends with, a
real `gptoss-mac serve` process on a free 127.0.0.1 port, a recorder in front of it (every request's path,
status and body), a trap standing in as the HTTP(S) proxy (any address but 127.0.0.1 lands there and fails
the test), and a bounded client run.

Scripted models: the scripted checkpoint (tests/scripted_checkpoint.py) is a model whose next token depends
only on the last 8 tokens, so an episode's prompt only has to end the way the client's real prompt ends: it is
rendered from a short conversation whose last message is the one the client sends last (the user's prompt,
or a tool result). What comes before (a client's 10k-token system prompt and tools) changes nothing.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from install_clients import ClientUnavailable, HOW, ensure, required
from scripted_checkpoint import _STATE, offline_harmony, write_scripted_checkpoint

SERVE_TIMEOUT = 180  # s for the server to load and answer /health
RUN_TIMEOUT = 240  # s for one client run
REQUEST_LINE = re.compile(r"(\S+) (\S+) prompt=(\d+) cached=(\d+) generated=(\d+) .*stop=(\S+)")


# ------------------------------------------------------------------------------------------ clients

def client_or_skip(name: str) -> Path:
    """The pinned client's executable; skips (one line saying how to run it) when it cannot be installed,
    fails instead under GPTOSS_REQUIRE_CLIENTS=1."""
    try:
        return ensure(name)
    except ClientUnavailable as e:
        if required():
            pytest.fail(f"GPTOSS_REQUIRE_CLIENTS=1 but {name} is unavailable: {e}")
        pytest.skip(f"{name} not installed ({HOW})")


# ------------------------------------------------------------------------------------------ models

def scripted_client_model(name: str, episodes: list[tuple[list[dict], str]]) -> Path:
    """A checkpoint folder named gpt-oss-20b (so the served model id is the real one) whose greedy decoding
    writes gen_text after a prompt ending like render(messages), for each (messages, gen_text)."""
    from mlx_gptoss import harmony

    tok = offline_harmony()
    key = "client-ckpt:" + name
    if key not in _STATE:
        enc = harmony.encoding()
        eps = [(harmony.render(msgs), enc.encode(gen, allowed_special="all")) for msgs, gen in episodes]
        _STATE[key] = write_scripted_checkpoint(_STATE["root"] / name / "gpt-oss-20b", eps, tok / "tokenizer.json")
    return _STATE[key]


def call(name: str, args: dict, thought: str = "Run it.") -> str:
    """Harmony text of reasoning + a function call, as gpt-oss writes it."""
    return (f"<|channel|>analysis<|message|>{thought}<|end|><|start|>assistant<|channel|>commentary "
            f"to=functions.{name} <|constrain|>json<|message|>{json.dumps(args)}<|call|>")


def answer(text: str, thought: str = "Done") -> str:
    """Reasoning + a final answer. Every answer's reasoning is "THOUGHT answer" (" answer" tells the scripted
    model to write on the final channel rather than call a tool, THOUGHT which answer to write)."""
    return (f"<|channel|>analysis<|message|>{thought} answer<|end|><|start|>assistant<|channel|>final<|message|>"
            f"{text}<|return|>")


def tool_turns(prompt: str, tool: str, rounds: list[tuple[dict, str]], final: str) -> list[tuple[list[dict], str]]:
    """Episodes of a tool loop: after `prompt` the model calls `tool` with rounds[0]'s arguments; after the tool
    returns rounds[k]'s output it calls with rounds[k+1]'s, and after the last output it answers `final`."""
    msgs: list[dict] = [{"role": "user", "content": prompt}]
    out = []
    for k, (args, output) in enumerate(rounds):
        out.append((list(msgs), call(tool, args)))
        cid = f"call_{k}"
        msgs += [{"role": "assistant", "reasoning": "Run it.",
                  "tool_calls": [{"id": cid, "name": tool, "arguments": json.dumps(args)}]},
                 {"role": "tool", "name": tool, "tool_call_id": cid, "content": output}]
    out.append((msgs, answer(final)))
    return out


# The conversation every CLI's tests script: a greeting, and a tool loop counting to three (the same call every
# round, its output counting up: the scripted model, which sees only the last 8 tokens, calls it again after 1 and
# 2 and answers after 3).
HI = "Say hi to the user."
GREETING = "Hi from gpt-oss!"
DONE = "Counted to three."
COUNT = "echo x >> n.txt && wc -l < n.txt"


def greeting_and_count(loop: str, tool: str, args: dict) -> list[tuple[list[dict], str]]:
    """Episodes: HI -> GREETING; `loop` -> `tool`(args) -> "1" -> again -> "2" -> again -> "3" -> DONE."""
    rounds = [(args, str(n)) for n in (1, 2, 3)]
    return [([{"role": "user", "content": HI}], answer(GREETING, "Greet"))] + tool_turns(loop, tool, rounds, DONE)


# ------------------------------------------------------------------------------------------ network

@dataclass
class Exchange:
    method: str
    path: str
    status: int
    body: object


class Recorder:
    """A transparent HTTP relay on 127.0.0.1 in front of the server: forwards every request as it is (the
    response streamed back chunk by chunk) and records method, path, status and the JSON body."""

    def __init__(self, upstream_port: int):
        self.exchanges: list[Exchange] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes: streams pass through

            def log_message(self, *a):
                pass

            def relay(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "accept-encoding")}
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=RUN_TIMEOUT)
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                try:
                    parsed = json.loads(body) if body else None
                except ValueError:
                    parsed = body[:200]
                recorder.exchanges.append(Exchange(self.command, self.path, resp.status, parsed))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.end_headers()
                while chunk := resp.read1(65536):
                    self.wfile.write(chunk)
                    self.wfile.flush()
                conn.close()

            do_GET = do_POST = do_DELETE = relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Trap:
    """Stands in as HTTP_PROXY/HTTPS_PROXY for the clients (NO_PROXY covers 127.0.0.1): a client reaching for
    any other address lands here, is refused, and is recorded."""

    def __init__(self):
        self.hits: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.hits.append(conn.recv(512).split(b"\r\n")[0].decode("latin-1"))
                    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def env(self) -> dict:
        url = f"http://127.0.0.1:{self.port}"
        return {k: url for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                 "all_proxy")} | {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

    def close(self):
        self.sock.close()


# ------------------------------------------------------------------------------------------ the server

@dataclass
class Served:
    url: str  # the recorder's URL: what clients are given
    model_id: str
    proc: subprocess.Popen
    recorder: Recorder
    trap: Trap
    log: list[str] = field(default_factory=list)
    api_key: str = "sk-gptoss-test"

    def requests(self) -> list[dict]:
        """The server's log line of every generation, in order: id, kind, prompt, cached, generated, stop."""
        out = []
        for line in list(self.log):
            m = REQUEST_LINE.search(line)
            if m:
                out.append({"id": m[1], "kind": m[2], "prompt": int(m[3]), "cached": int(m[4]),
                            "generated": int(m[5]), "stop": m[6]})
        return out

    def report(self) -> str:
        """What went over the wire and what the server logged (shown when a test fails)."""
        lines = [f"{e.method} {e.path} -> {e.status}" for e in self.recorder.exchanges]
        return "requests:\n  " + "\n  ".join(lines) + "\nserver log (tail):\n" + "".join(self.log[-40:])


@contextlib.contextmanager
def serve(model_dir: Path, tmp: Path):
    """`gptoss-mac serve` as a real process on a free 127.0.0.1 port, with the recorder and the trap."""
    from mlx_gptoss.cli.launch import stop_server
    from mlx_gptoss.server import free_port

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", XDG_STATE_HOME=str(tmp / "state"))
    proc = subprocess.Popen([sys.executable, "-m", "mlx_gptoss.cli.app", "serve", "--model", str(model_dir),
                             "--port", str(port), "--api-key", Served.api_key],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    reader.start()
    recorder, trap = Recorder(port), Trap()
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise AssertionError("gptoss-mac serve exited:\n" + "".join(log))
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"gptoss-mac serve did not come up within {SERVE_TIMEOUT} s:\n" + "".join(log))
            time.sleep(0.2)
        yield Served(recorder.url, model_dir.name, proc, recorder, trap, log)
    finally:
        stop_server(proc)
        reader.join(5)
        recorder.close()
        trap.close()


def run_client(argv: list, env: dict, cwd: Path, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a client to the end within timeout seconds (its whole process group is killed past it)."""
    proc = subprocess.Popen([str(a) for a in argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{argv[0]} did not finish within {timeout} s\nstdout: {out[-3000:]}\n"
                             f"stderr: {err[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def base_env(home: Path, served: Served) -> dict:
    """A client's environment: a fresh HOME, the trap as proxy, PATH and the locale kept, nothing else."""
    home.mkdir(parents=True, exist_ok=True)
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TERM", "TMPDIR") if k in os.environ}
    return keep | served.trap.env() | {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                                       "XDG_CACHE_HOME": str(home / ".cache"), "XDG_STATE_HOME": str(home / ".state"),
                                       "NO_COLOR": "1", "CI": "1"}


def mark(served: Served) -> tuple[int, int]:
    """Where a test's traffic starts (the server is shared by a module's tests)."""
    return len(served.recorder.exchanges), len(served.requests())


def assert_all_2xx_and_local(served: Served, since: tuple[int, int] = (0, 0)) -> None:
    bad = [e for e in served.recorder.exchanges[since[0]:] if not 200 <= e.status < 300]
    assert not bad, f"non-2xx responses: {[(e.path, e.status) for e in bad]}\n{served.report()}"
    assert not served.trap.hits, f"the client tried to reach other addresses: {served.trap.hits}"


def assert_loop_cached(served: Served, since: tuple[int, int], min_requests: int, share: float = 0.9) -> list[dict]:
    """Every request 2xx, nothing but the server contacted, at least min_requests generations, and each one
    after the first read at least `share` of its prompt from the prefix cache."""
    assert_all_2xx_and_local(served, since)
    reqs = served.requests()[since[1]:]
    print("prompt/cached tokens per request:", [(r["prompt"], r["cached"]) for r in reqs])  # shown with -rP
    assert len(reqs) >= min_requests, served.report()
    for r in reqs[1:]:
        assert r["cached"] >= share * r["prompt"], f"{r} read less than {share:.0%} from the cache\n{served.report()}"
    return reqs


def launch_env(exe: Path, home: Path, served: Served) -> dict:
    """The environment `gptoss-mac launch` runs in for a real client: the client on PATH, a fresh HOME, the trap
    as proxy, the server's key in $GPTOSS_API_KEY."""
    env = base_env(home, served)
    env["PATH"] = f"{exe.parent}{os.pathsep}{env.get('PATH', '')}"
    return env | {"GPTOSS_API_KEY": served.api_key, "HF_HUB_OFFLINE": "1"}


def run_launch(client: str, served: Served, env: dict, cwd: Path, *client_args) -> subprocess.CompletedProcess:
    """`gptoss-mac launch CLIENT --port P -- ARGS` against the served model (through the recorder's port)."""
    port = served.url.rsplit(":", 1)[1]
    return run_client([sys.executable, "-m", "mlx_gptoss.cli.app", "launch", client, "--port", port, "--",
                       *client_args], env, cwd)
