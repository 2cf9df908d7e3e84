"""Codex CLI (`codex exec`, the pinned npm release) end to end against a real `gptoss-mac serve` process on
127.0.0.1, configured as `gptoss-mac launch codex` configures it (a provider with wire_api "responses", given
by -c overrides; CODEX_HOME a fresh folder): a final answer printed with exit status 0, and a loop where the
model calls Codex's shell tool (exec_command), Codex runs it and sends the output back, every request 2xx and
each one after the first read >= 90% from the prefix cache. Codex sends `store: false`, the whole history
every turn, `include: ["reasoning.encrypted_content"]`, namespace and web_search tools, client_metadata."""

from __future__ import annotations

import pytest

from harness import (COUNT, DONE, GREETING, HI, assert_all_2xx_and_local, assert_loop_cached, base_env,
                     client_or_skip, greeting_and_count, launch_env, mark, run_client, run_launch,
                     scripted_client_model, serve)
from mlx_gptoss.cli.launch import codex_args

pytestmark = pytest.mark.slow

LOOP = "Count to three with the shell."
EPISODES = greeting_and_count(LOOP, "exec_command", {"cmd": COUNT})


@pytest.fixture(scope="module")
def codex():
    return client_or_skip("codex")


@pytest.fixture(scope="module")
def served(codex, tmp_path_factory):
    with serve(scripted_client_model("codex", EPISODES), tmp_path_factory.mktemp("codex")) as s:
        yield s


def run_codex(codex, served, tmp, prompt: str, *args):
    home = tmp / "codex-home"
    home.mkdir(exist_ok=True)
    env = base_env(tmp / "home", served) | {"CODEX_HOME": str(home), "GPTOSS_API_KEY": served.api_key}
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    return run_client([codex, "exec", *codex_args(served.url, served.model_id, served.api_key),
                       "--skip-git-repo-check", *args, prompt], env, work)


def test_final_answer(codex, served, tmp_path):
    since = mark(served)
    r = run_codex(codex, served, tmp_path, HI)
    assert r.returncode == 0 and GREETING in r.stdout, (r.stdout, r.stderr, served.report())
    assert_all_2xx_and_local(served, since)
    body = served.recorder.exchanges[-1].body
    assert body["store"] is False and "reasoning.encrypted_content" in body["include"]


def test_shell_tool_loop_stays_cached(codex, served, tmp_path):
    since = mark(served)
    r = run_codex(codex, served, tmp_path, LOOP, "--sandbox", "danger-full-access")
    assert r.returncode == 0 and DONE in r.stdout, (r.stdout, r.stderr, served.report())
    reqs = assert_loop_cached(served, since, min_requests=4)
    assert [q["stop"] for q in reqs[-4:]] == ["call", "call", "call", "return"]
    assert (tmp_path / "work" / "n.txt").read_text() == "x\nx\nx\n"  # Codex ran the command three times
    last = served.recorder.exchanges[-1].body
    outputs = [i["output"] for i in last["input"] if i.get("type") == "function_call_output"]
    assert len(outputs) == 3 and all(str(n) in o for n, o in zip((1, 2, 3), outputs))
    sealed = [i for i in last["input"] if i.get("type") == "reasoning"]
    assert sealed and all(i.get("encrypted_content") for i in sealed)  # Codex sent our sealed tokens back


def test_through_gptoss_mac_launch(codex, served, tmp_path):
    """The README's recipe: `gptoss-mac launch codex -- exec ...` (the provider given as -c overrides)."""
    since = mark(served)
    work = tmp_path / "work"
    work.mkdir()
    env = launch_env(codex, tmp_path / "home", served) | {"CODEX_HOME": str(tmp_path / "codex-home")}
    (tmp_path / "codex-home").mkdir()
    r = run_launch("codex", served, env, work, "exec", "--skip-git-repo-check", HI)
    assert r.returncode == 0 and GREETING in r.stdout, (r.stdout, r.stderr, served.report())
    assert "Greet answer" in r.stderr  # the model's reasoning, shown
    assert_all_2xx_and_local(served, since)
