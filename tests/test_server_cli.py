"""`gptoss-mac serve` as a real process: loads, prints the URL and a client snippet, logs one line per
request, refuses an exposed host without a key, ends open streams with a final event on SIGTERM, and a
process exits cleanly right after its server stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from mlx_gptoss.server import free_port
from scripted_checkpoint import scripted_path
from server_fixtures import sse_events, wait_for


def serve(*args, **kw) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "mlx_gptoss.cli.app", "serve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def quick(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "mlx_gptoss.cli.app", "serve", *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_serve_process_end_to_end():
    path = scripted_path("loop")
    port = free_port()
    proc = serve("--model", str(path), "--port", str(port), "--max-tokens", "7", "--allowed-host", "My-Mac.lan")
    url = f"http://127.0.0.1:{port}"
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        def up():
            if proc.poll() is not None:
                raise AssertionError("serve exited: " + "".join(err_lines))
            try:
                return httpx.get(url + "/health", timeout=2).is_success
            except httpx.TransportError:
                return False
        wait_for(up, 180, "the server to come up")
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        wait_for(lambda: any("stop=max_tokens" in line for line in err_lines), 30, "the request's log line")
        # --max-tokens caps a request that sets none; --allowed-host names a Host served without a key
        r = httpx.post(url + "/v1/chat/completions", timeout=60, headers={"Host": "my-mac.lan:8000"},
                       json={"messages": [{"role": "user", "content": "Hi"}], "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7, r.text
        r = httpx.get(url + "/v1/models", headers={"Host": "other.lan"}, timeout=10)
        assert r.status_code == 403 and "--allowed-host" in r.json()["error"]["message"]
        with httpx.stream("POST", url + "/v1/responses", timeout=60,
                          json={"input": "Loop", "stream": True, "temperature": 0}) as resp:
            lines = resp.iter_lines()
            for line in lines:
                if "reasoning_text.delta" in line:
                    break
            proc.send_signal(signal.SIGTERM)
            rest = sse_events(lines)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    reader.join(10)
    text = "".join(err_lines)
    assert f"http://127.0.0.1:{port}/v1" in text and "OpenAI(base_url=" in text and "curl" in text
    assert "memory plan:" in text
    log = next(line for line in err_lines if "stop=max_tokens" in line)  # the first request's
    assert "prompt=" in log and "cached=0" in log and "generated=6" in log and "tok/s" in log
    last = json.loads(rest[-1][1])
    assert last["type"] == "response.failed" and last["response"]["error"]["code"] == "server_shutting_down"


def test_exposed_host_needs_a_key():
    r = quick("--model", "/nonexistent", "--host", "0.0.0.0")
    assert r.returncode == 2 and "--api-key" in r.stderr and "--no-auth" in r.stderr


def test_bad_port_and_busy_port():
    r = quick("--port", "70000")
    assert r.returncode == 2 and "1-65535" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = quick("--model", "/nonexistent", "--port", str(s.getsockname()[1]))
    assert r.returncode == 1 and "cannot listen on 127.0.0.1" in r.stderr and "Traceback" not in r.stderr


def test_the_printed_client_lines_work_as_pasted(tmp_path):
    """serve --api-key KEY: the curl and Python lines it prints, run by a shell exactly as printed (after the
    export it asks for), get the answer; the key itself is never printed."""
    key = "s3cret-key"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_gptoss.cli.app", "serve", "--model",
                             str(scripted_path("final")), "--port", str(port), "--api-key", key],
                            env=dict(env, HF_HUB_OFFLINE="1", COLUMNS="200"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("  python3 -c"):
                break
        text = "".join(lines)
        assert "export GPTOSS_API_KEY=" in text and key not in text, text

        def listening():  # the lines are printed as uvicorn starts; a person pastes them a moment later
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 60, "the server to listen")
        shell_env = dict(env, GPTOSS_API_KEY=key, PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"])
        for line in lines:
            if line.startswith(("  curl", "  python3")):
                r = subprocess.run(["bash", "-c", line.strip()], env=shell_env, capture_output=True, text=True,
                                   timeout=120)
                assert r.returncode == 0 and "Just the answer." in r.stdout, (line, r.stdout, r.stderr)
        wrong = subprocess.run(["bash", "-c", next(x for x in lines if x.startswith("  curl")).strip()],
                               env=dict(shell_env, GPTOSS_API_KEY="wrong"), capture_output=True, text=True,
                               timeout=60)
        assert "Just the answer." not in wrong.stdout  # the key really is checked
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


EXIT_AFTER_SERVING = """
import sys, httpx, mlx_gptoss
from mlx_gptoss.server import ServerThread
with ServerThread(lambda: mlx_gptoss.load(sys.argv[1], allow_download=False), model_id="m") as s:
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
"""


@pytest.mark.slow
def test_a_process_exits_cleanly_right_after_its_server_stops():
    """The interpreter finalizes right after the model thread's loop ends: MLX's per-thread destructors must
    not run then (they aborted 1 exit in 3 with SIGABRT, "terminate called without an active exception")."""
    path = scripted_path("loop")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for _ in range(8):  # the old code failed within 3
        done = subprocess.run([sys.executable, "-c", EXIT_AFTER_SERVING, str(path)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
