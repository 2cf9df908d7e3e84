"""Claude Code (`claude -p`, the pinned npm release) end to end against a real `gptoss-mac serve` process on
127.0.0.1: a final answer, and a tool loop through its Bash tool that stays in the prefix cache. It talks
Anthropic's Messages API (POST /v1/messages?beta=true, streaming) with ANTHROPIC_API_KEY (x-api-key)."""

from __future__ import annotations

import pytest

from harness import (COUNT, DONE, GREETING, HI, assert_all_2xx_and_local, assert_loop_cached, base_env,
                     client_or_skip, greeting_and_count, launch_env, mark, run_client, run_launch,
                     scripted_client_model, serve)
from mlx_gptoss.cli.launch import claude_env

pytestmark = pytest.mark.slow

LOOP = "Count to three with bash."
EPISODES = greeting_and_count(LOOP, "Bash", {"command": COUNT, "description": "Count one more"})


@pytest.fixture(scope="module")
def claude():
    return client_or_skip("claude")


@pytest.fixture(scope="module")
def served(claude, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("claude")
    with serve(scripted_client_model("claude", EPISODES), tmp) as s:
        yield s


def run_claude(claude, served, tmp, prompt: str, *args):
    env = base_env(tmp / "home", served) | claude_env(served.url, served.model_id, None)
    env.pop("ANTHROPIC_AUTH_TOKEN")
    env["ANTHROPIC_API_KEY"] = served.api_key  # as x-api-key; `launch` uses the Bearer token (tests/test_launch.py)
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    return run_client([claude, "-p", prompt, *args], env, work)


def test_final_answer(claude, served, tmp_path):
    since = mark(served)
    r = run_claude(claude, served, tmp_path, HI)
    assert r.returncode == 0 and GREETING in r.stdout, (r.stdout, r.stderr, served.report())
    assert_all_2xx_and_local(served, since)
    paths = {e.path for e in served.recorder.exchanges[since[0]:]}
    assert "/v1/messages?beta=true" in paths


def test_bash_tool_loop_stays_cached(claude, served, tmp_path):
    since = mark(served)
    r = run_claude(claude, served, tmp_path, LOOP, "--allowedTools", "Bash")
    assert r.returncode == 0 and DONE in r.stdout, (r.stdout, r.stderr, served.report())
    reqs = assert_loop_cached(served, since, min_requests=4)
    assert [q["stop"] for q in reqs[-4:]] == ["call", "call", "call", "return"]
    # Claude Code ran each command and sent its output back
    last = [e.body for e in served.recorder.exchanges[since[0]:] if e.path.startswith("/v1/messages")][-1]
    results = [b for m in last["messages"] if m["role"] == "user" and isinstance(m["content"], list)
               for b in m["content"] if b.get("type") == "tool_result"]
    assert [b["content"] for b in results] == ["1", "2", "3"]
    thinking = [b for m in last["messages"] if m["role"] == "assistant" for b in m["content"]
                if b["type"] == "thinking"]
    assert thinking and all(b["signature"].startswith("gm1.") for b in thinking)  # our sealed tokens came back


def test_through_gptoss_mac_launch(claude, served, tmp_path):
    """The README's recipe: `gptoss-mac launch claude -- -p ...` (a Bearer token, every model role mapped)."""
    since = mark(served)
    work = tmp_path / "work"
    work.mkdir()
    r = run_launch("claude", served, launch_env(claude, tmp_path / "home", served), work, "-p", HI)
    assert r.returncode == 0 and GREETING in r.stdout, (r.stdout, r.stderr, served.report())
    assert_all_2xx_and_local(served, since)
