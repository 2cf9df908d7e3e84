"""opencode (`opencode run`, the pinned npm release) end to end against a real `gptoss-mac serve` process on
127.0.0.1, configured exactly as `gptoss-mac launch opencode` configures it (client_command: OPENCODE_CONFIG
naming our provider file, @ai-sdk/openai-compatible over Chat Completions, the server's context as the model's
limit): a final answer with the reasoning
kept out of the text, and a tool loop through its bash tool that stays in the prefix cache.

opencode itself tries one thing beyond the server: a background `npm install` of its plugin SDK
(@opencode-ai/plugin) into the user's opencode config folder, which it logs and does without. The trap refuses
it; the tests allow exactly that address, and nothing else."""

from __future__ import annotations

import json

import httpx
import pytest

from harness import (COUNT, DONE, GREETING, HI, assert_all_2xx_and_local, assert_loop_cached, base_env,
                     client_or_skip, greeting_and_count, launch_env, mark, run_client, run_launch,
                     scripted_client_model, serve)
from mlx_gptoss.cli.launch import client_command

pytestmark = pytest.mark.slow

LOOP = "Count to three with bash."  # opencode joins its message arguments, quoting those with spaces: the
# prompts go word by word (run_opencode)
OPENCODE_OWN = "CONNECT registry.npmjs.org:443"  # its plugin SDK install (see the docstring)
EPISODES = greeting_and_count(LOOP, "bash", {"command": COUNT})


@pytest.fixture(scope="module")
def opencode():
    return client_or_skip("opencode")


@pytest.fixture(scope="module")
def served(opencode, tmp_path_factory):
    with serve(scripted_client_model("opencode", EPISODES), tmp_path_factory.mktemp("opencode")) as s:
        s.context = httpx.get(s.url + "/health", timeout=10).json()["context"]  # as launch reads it
        yield s


def only_the_server(served, since) -> None:
    served.trap.hits[:] = [h for h in served.trap.hits if not h.startswith(OPENCODE_OWN)]
    assert_all_2xx_and_local(served, since)


def run_opencode(opencode, served, tmp, prompt: str, *args):
    argv, extra = client_command("opencode", opencode, served.url, served.model_id, served.api_key,
                                 ["run", "--format", "json", "--title", "test", *args, *prompt.split()], tmp / "state",
                                 served.context)
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    r = run_client(argv, base_env(tmp / "home", served) | extra, work)
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return r, events


def texts(events) -> list[str]:
    return [e["part"]["text"] for e in events if e["type"] == "text"]


def test_final_answer(opencode, served, tmp_path):
    since = mark(served)
    r, events = run_opencode(opencode, served, tmp_path, HI)
    assert r.returncode == 0 and texts(events) == [GREETING], (r.stdout, r.stderr, served.report())
    finish = [e for e in events if e["type"] == "step_finish"][-1]["part"]
    assert finish["reason"] == "stop" and finish["tokens"]["reasoning"] > 0  # the reasoning arrived as reasoning
    only_the_server(served, since)
    assert {e.path for e in served.recorder.exchanges[since[0]:]} == {"/v1/chat/completions"}


def test_bash_tool_loop_stays_cached(opencode, served, tmp_path):
    since = mark(served)
    r, events = run_opencode(opencode, served, tmp_path, LOOP)
    assert r.returncode == 0 and DONE in texts(events), (r.stdout, r.stderr, served.report())
    only_the_server(served, since)
    reqs = assert_loop_cached(served, since, min_requests=4)
    assert [q["stop"] for q in reqs[-4:]] == ["call", "call", "call", "return"]
    assert (tmp_path / "work" / "n.txt").read_text() == "x\nx\nx\n"  # opencode ran the command three times
    tools = [e["part"] for e in events if e["type"] == "tool_use"]
    assert [t["tool"] for t in tools] == ["bash"] * 3 and [t["state"]["status"] for t in tools] == ["completed"] * 3


def test_through_gptoss_mac_launch(opencode, served, tmp_path):
    """The README's recipe: `gptoss-mac launch opencode -- run ...`."""
    since = mark(served)
    work = tmp_path / "work"
    work.mkdir()
    env = launch_env(opencode, tmp_path / "home", served) | {"XDG_STATE_HOME": str(tmp_path / "state")}
    r = run_launch("opencode", served, env, work, "run", "--format", "json", *HI.split())
    assert r.returncode == 0 and GREETING in r.stdout, (r.stdout, r.stderr, served.report())
    only_the_server(served, since)
