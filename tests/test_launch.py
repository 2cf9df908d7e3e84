"""`gptoss-mac launch codex|claude|opencode`: with a fake client executable that records its argv and
environment, against a server that already answers (the client is exec'd, the server left alone) and with
none (launch starts `gptoss-mac serve`, the client reaches it, and the server stops with the client). The
user's own configuration files are never written. (The real clients through launch: tests/clients.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import httpx
import pytest

from mlx_gptoss.cli.launch import claude_env, codex_args, opencode_config
from mlx_gptoss.server import free_port
from scripted_checkpoint import scripted_path
from server_fixtures import running

FAKE = textwrap.dedent("""\
    #!{python}
    import json, os, sys, urllib.request
    base = os.environ.get("ANTHROPIC_BASE_URL") or "http://127.0.0.1:" + os.environ["FAKE_PORT"]
    try:
        with urllib.request.urlopen(base + "/health", timeout=10) as r:
            health = json.load(r)
    except Exception as e:
        health = repr(e)
    with open(os.environ["FAKE_RECORD"], "w") as f:
        json.dump({{"argv": sys.argv, "env": dict(os.environ), "health": health}}, f)
    sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
""")


@pytest.fixture
def fake(tmp_path):
    """A folder with fake codex/claude/opencode executables, and the environment launch runs in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("codex", "claude", "opencode"):
        exe = bin_dir / name
        exe.write_text(FAKE.format(python=sys.executable))
        exe.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOME=str(home),
               XDG_STATE_HOME=str(tmp_path / "state"), XDG_CONFIG_HOME=str(home / ".config"),
               FAKE_RECORD=str(tmp_path / "record.json"), HF_HUB_OFFLINE="1")
    env.pop("GPTOSS_API_KEY", None)
    return env


def launch(env, *args, timeout=180) -> tuple[subprocess.CompletedProcess, dict | None]:
    r = subprocess.run([sys.executable, "-m", "mlx_gptoss.cli.app", "launch", *args], env=env, capture_output=True,
                       text=True, timeout=timeout)
    record = env["FAKE_RECORD"]
    return r, (json.loads(open(record).read()) if os.path.exists(record) else None)


def test_the_client_configurations():
    args = codex_args("http://127.0.0.1:8000", "gpt-oss-20b", None)
    assert 'model_provider="gptoss-mac"' in args and 'model="gpt-oss-20b"' in args
    assert ('model_providers.gptoss-mac={name = "gptoss-mac", base_url = "http://127.0.0.1:8000/v1", '
            'wire_api = "responses"}') in args
    assert "check_for_update_on_startup=false" in args and "analytics.enabled=false" in args
    assert 'env_key = "GPTOSS_API_KEY"' in " ".join(codex_args("http://127.0.0.1:8000", "m", "k"))
    env = claude_env("http://127.0.0.1:8000", "gpt-oss-20b", "k")
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8000" and env["ANTHROPIC_AUTH_TOKEN"] == "k"
    roles = ("ANTHROPIC_MODEL", "ANTHROPIC_SMALL_FAST_MODEL", "CLAUDE_CODE_SUBAGENT_MODEL")
    assert all(env[r] == "gpt-oss-20b" for r in roles)
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    cfg = opencode_config("http://127.0.0.1:8000", "gpt-oss-20b", None)
    assert cfg["model"] == "gptoss-mac/gpt-oss-20b"
    assert cfg["provider"]["gptoss-mac"]["options"]["baseURL"] == "http://127.0.0.1:8000/v1"
    limit = opencode_config("http://127.0.0.1:8000", "m", None, context=8192)["provider"]["gptoss-mac"]["models"]["m"]
    assert limit["limit"] == {"context": 8192, "output": 4096}  # opencode compacts before the server's context


@pytest.mark.parametrize("client", ["codex", "claude", "opencode"])
def test_a_running_server_is_used_and_the_client_execd(fake, client, tmp_path):
    with running("reason") as s:
        fake["FAKE_PORT"] = str(s.port)
        r, rec = launch(fake, client, "--port", str(s.port), "--", "exec", "--flag", "hello world")
        assert r.returncode == 0, r.stderr
        assert httpx.get(s.url + "/health").is_success  # left running
    assert rec["health"]["model"] == "gpt-oss-20b"  # the client reached the server
    assert rec["argv"][-3:] == ["exec", "--flag", "hello world"]
    env = rec["env"]
    if client == "codex":
        assert f'base_url = "http://127.0.0.1:{s.port}/v1"' in " ".join(rec["argv"])
        assert 'model="gpt-oss-20b"' in rec["argv"]
    elif client == "claude":
        assert env["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{s.port}" and env["ANTHROPIC_MODEL"] == "gpt-oss-20b"
    else:
        cfg = json.loads(open(env["OPENCODE_CONFIG"]).read())
        assert env["OPENCODE_CONFIG"].startswith(str(tmp_path / "state"))
        assert cfg["provider"]["gptoss-mac"]["options"]["baseURL"] == f"http://127.0.0.1:{s.port}/v1"
        assert cfg["provider"]["gptoss-mac"]["models"]["gpt-oss-20b"]["limit"]["context"] == s.worker.engine.cap
    assert not any((tmp_path / "home").iterdir())  # the user's own files: untouched


@pytest.mark.slow
def test_launch_starts_a_server_for_the_client_and_stops_it(fake):
    port = free_port()
    fake.update(FAKE_PORT=str(port), FAKE_EXIT="3")
    r, rec = launch(fake, "codex", "--model", str(scripted_path("reason")), "--port", str(port), "--api-key",
                    "sk-1", "--", "exec", "hi", timeout=300)
    assert r.returncode == 3, r.stderr  # the client's exit status
    assert rec["health"]["status"] == "ok" and rec["env"]["GPTOSS_API_KEY"] == "sk-1"
    assert 'env_key = "GPTOSS_API_KEY"' in " ".join(rec["argv"])
    with pytest.raises(httpx.TransportError):  # stopped with the client
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_a_server_that_needs_a_key_is_said_so(fake, monkeypatch):
    from typer.testing import CliRunner

    from mlx_gptoss.cli.app import app

    monkeypatch.setenv("PATH", fake["PATH"])  # the fake clients (these cases stop before running one)
    monkeypatch.delenv("GPTOSS_API_KEY", raising=False)
    with running("reason", api_key="sk-right") as s:
        r = CliRunner().invoke(app, ["launch", "claude", "--port", str(s.port)])
        assert r.exit_code == 1 and "needs its API key" in r.output
        r = CliRunner().invoke(app, ["launch", "claude", "--port", str(s.port), "--api-key", "sk-wrong"])
        assert r.exit_code == 1 and "refuses this API key" in r.output
        r, rec = launch(dict(fake, GPTOSS_API_KEY="sk-right", FAKE_PORT=str(s.port)), "claude", "--port", str(s.port))
        assert r.returncode == 0 and rec["env"]["ANTHROPIC_AUTH_TOKEN"] == "sk-right"


def test_clear_errors(fake, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mlx_gptoss.cli.app import app

    r = CliRunner().invoke(app, ["launch", "emacs"])
    assert r.exit_code == 2 and "choose codex, claude or opencode" in r.output
    monkeypatch.setenv("PATH", str(tmp_path))  # no client on PATH
    r = CliRunner().invoke(app, ["launch", "claude", "--port", str(free_port())])
    assert r.exit_code == 1 and "npm install -g @anthropic-ai/claude-code" in r.output
