"""The `gptoss-mac` commands through Typer's CliRunner, and (download) as a real process against a local
fake of the Hugging Face hub's HTTP API. Nothing here reaches the internet."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fake_hub import FakeHub
from mlx_gptoss import hub, smoke
from mlx_gptoss.cli.app import app
from mlx_gptoss.errors import GptOssError
from mlx_gptoss.model import Transformer
from tiny_checkpoint import hub_config

runner = CliRunner()
REPO = "openai/gpt-oss-20b"


def invoke(*args, **kwargs):
    """Run a command in-process; a GptOssError is what main() prints as one line with exit status 1."""
    kwargs.setdefault("env", {"COLUMNS": "200"})  # no wrapped lines
    result = runner.invoke(app, list(args), **kwargs)
    if result.exception is not None and not isinstance(result.exception, (SystemExit, GptOssError)):
        raise result.exception
    return result


def error_text(result) -> str:
    assert isinstance(result.exception, GptOssError), result.output
    return str(result.exception)


# --- help and version ------------------------------------------------------------------------------------

def test_help_shows_defaults_and_flags_as_flags():
    chat = " ".join(invoke("chat", "--help").output.split())
    assert "[default: 1.0]" in chat and "[default: medium]" in chat  # not eaten as Rich markup
    assert "--show-reasoning Stream" in chat  # a flag takes no value: no "<bool>"
    assert "<bool>" not in chat
    plan = " ".join(invoke("plan", "--help").output.split())
    assert "[default: the model's, 131072]" in plan


def test_version_on_the_root_command():
    import mlx.core as mx

    import mlx_gptoss

    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"gptoss-mac {mlx_gptoss.__version__} (mlx {mx.__version__})"


# --- doctor -------------------------------------------------------------------------------------------

def test_doctor_reports_the_machine_and_passes_the_smoke_test():
    result = invoke("doctor")
    assert result.exit_code == 0, result.output
    out = result.output
    for word in ("OS", "chip", "MLX", "backend", "memory", "GPU working set", "Metal kernels", "harmony",
                 "cached models", "smoke test", "KV caches match an uncached forward", "everything works"):
        assert word in out, word
    if sys.platform == "linux":
        assert "BLAS" in out and "GFLOP/s" in out


def test_doctor_without_smoke_test():
    result = invoke("doctor", "--no-smoke")
    assert result.exit_code == 0
    assert "smoke test" not in result.output


def test_doctor_exits_nonzero_when_cached_decoding_is_broken(monkeypatch):
    from mlx_lm.models.cache import RotatingKVCache

    # A cache bug: every layer keeps only the last 4 tokens (the window is 8) -> cached logits diverge.
    monkeypatch.setattr(Transformer, "make_cache", lambda self: [RotatingKVCache(4) for _ in self.model.layers])
    result = invoke("doctor")
    assert result.exit_code == 1
    assert "FAIL" in result.output and "broken: smoke test" in result.output


def test_doctor_lists_cached_models(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snap = tmp_path / "models--openai--gpt-oss-20b" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    blob = tmp_path / "models--openai--gpt-oss-20b" / "blobs" / "b1"
    blob.parent.mkdir()
    blob.write_text(json.dumps(hub_config()))
    (snap / "config.json").symlink_to(blob)
    (tmp_path / "models--openai--gpt-oss-20b" / "refs").mkdir()
    (tmp_path / "models--openai--gpt-oss-20b" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    result = invoke("doctor", "--no-smoke")
    assert result.exit_code == 0
    assert "openai/gpt-oss-20b" in result.output


def test_doctor_finds_a_corrupt_harmony_vocabulary(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "gptoss-mac").mkdir()
    (tmp_path / "gptoss-mac" / "o200k_base.tiktoken").write_text("not the vocabulary")
    result = invoke("doctor", "--no-smoke")
    assert result.exit_code == 1
    assert "wrong sha256" in result.output and "broken: harmony" in result.output


def test_smoke_test_passes_and_is_deterministic():
    a, b = smoke.run(seed=1), smoke.run(seed=1)
    assert a.ok and b.ok
    assert [c[:2] for c in a.checks] == [c[:2] for c in b.checks]
    assert len(a.checks) == 3


# --- download: in-process ------------------------------------------------------------------------------

def test_download_refuses_when_the_disk_is_too_small(monkeypatch, tmp_path):
    plan = hub.DownloadPlan(REPO, [hub.RemoteFile("config.json", 100, True),
                                   hub.RemoteFile("model-00000-of-00002.safetensors", 13 * 10**9, False)],
                            tmp_path, free=2 * 10**9)
    monkeypatch.setattr(hub, "cached", lambda repo: None)
    monkeypatch.setattr(hub, "plan_download", lambda repo: plan)
    monkeypatch.setattr(hub, "snapshot", lambda *a, **k: pytest.fail("downloaded although the disk is too small"))
    result = invoke("download", REPO)
    assert result.exit_code != 0
    msg = error_text(result)
    assert "needs 13.0 GB more on disk but only 2.0 GB is free" in msg and "HF_HOME" in msg


def test_download_of_a_local_folder_does_nothing(tiny_ckpt):
    result = invoke("download", str(tiny_ckpt))
    assert result.exit_code == 0
    assert "is a local folder; nothing to download" in result.output
    assert "warning" not in result.output


def test_download_of_a_missing_path_is_one_clear_error():
    result = invoke("download", "./no/such/folder")
    assert result.exit_code != 0
    assert "no such folder, and not a Hugging Face repo id" in error_text(result)


@pytest.mark.parametrize("command", ["download", "chat"])
def test_an_invalid_repo_id_is_one_clear_error(command):
    args = [command, "a/b c"] if command == "download" else [command, "--model", "a/b..c"]
    result = invoke(*args, input="hi\n")
    assert result.exit_code != 0
    assert "not a valid Hugging Face repo id" in error_text(result)


def test_download_offline_and_not_cached(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("download", REPO)
    assert result.exit_code != 0
    assert "HF_HUB_OFFLINE is set" in error_text(result)


# --- download: real processes against a fake hub -------------------------------------------------------

def hub_files() -> dict[str, bytes]:
    return {
        "config.json": json.dumps(hub_config()).encode(), "tokenizer.json": b"{}",
        "model-00000-of-00001.safetensors": os.urandom(2_000_000),
        "model.safetensors.index.json": b'{"weight_map": {}}',
        "original/model.safetensors": b"x" * 1000, "metal/model.bin": b"y" * 100, "README.md": b"# hi",
    }


def gptoss(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_gptoss.cli.app", *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def hub_env(tmp_path):
    files = hub_files()
    with FakeHub(REPO, files) as fake:
        env = dict(os.environ, HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
                   HF_HUB_DISABLE_TELEMETRY="1", COLUMNS="200", HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
        yield fake, env, files


def test_download_fetches_only_the_root_model_files_then_needs_no_network(hub_env):
    fake, env, files = hub_env
    r = gptoss(env, "download")
    assert r.returncode == 0, r.stderr
    folder = r.stdout.strip()
    assert sorted(fake.fetched()) == ["config.json", "model-00000-of-00001.safetensors",
                                      "model.safetensors.index.json", "tokenizer.json"]
    assert open(os.path.join(folder, "model-00000-of-00001.safetensors"), "rb").read() == \
        files["model-00000-of-00001.safetensors"]
    assert "4 files, 2.0 MB to download" in r.stderr and "Traceback" not in r.stderr

    fake.log.clear()
    again = gptoss(env, "download", REPO)
    assert again.returncode == 0 and again.stdout.strip() == folder
    assert "already downloaded" in again.stderr
    assert fake.log == []  # cached: not a single request

    offline = gptoss(dict(env, HF_HUB_OFFLINE="1"), "download")
    assert offline.returncode == 0 and offline.stdout.strip() == folder


def test_interrupted_download_fails_clearly_then_resumes(hub_env):
    fake, env, files = hub_env
    fake.cut_after["model-00000-of-00001.safetensors"] = 500_000  # the connection drops, every retry too
    r = gptoss(env, "download")
    assert r.returncode == 1
    err = " ".join(r.stderr.split())
    assert "download failed" in err and "run the same command again to resume" in err
    assert "Traceback" not in r.stderr

    fake.cut_after.clear()
    fake.log.clear()
    r = gptoss(env, "download")
    assert r.returncode == 0, r.stderr
    assert fake.fetched() == ["model-00000-of-00001.safetensors"]  # the finished files were kept
    assert open(os.path.join(r.stdout.strip(), "model-00000-of-00001.safetensors"), "rb").read() == \
        files["model-00000-of-00001.safetensors"]


def test_download_of_an_unknown_repo(hub_env):
    fake, env, _ = hub_env
    r = gptoss(env, "download", "openai/no-such-model")
    assert r.returncode == 1
    assert "no such model on the Hugging Face hub" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [["download"], ["chat"]])
def test_without_network_a_first_run_is_one_sentence_naming_the_local_folder_way(tmp_path, command):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path), HF_HUB_OFFLINE="0",
               HF_HUB_CACHE=str(tmp_path / "hub"), COLUMNS="300")
    r = subprocess.run([sys.executable, "-m", "mlx_gptoss.cli.app", *command], input="hi\n", env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: openai/gpt-oss-20b: cannot reach the Hugging Face hub; check the internet connection and try again, "
        "or run a model folder you already have: --model PATH"]


# --- chat: options and bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--ctx", "0"], ["--ctx", "must be a positive number of tokens", "got 0"]),
    (["--max-tokens", "-5"], ["--max-tokens", "must be a positive number of tokens"]),
    (["--effort", "extreme"], ["--effort", "must be low, medium or high", "extreme"]),
    (["--temperature", "-1"], ["--temperature", "must be 0 (greedy) or a finite number", "-1"]),
    (["--temperature", "nan"], ["--temperature", "must be 0 (greedy) or a finite number", "nan"]),
    (["--temperature", "inf"], ["--temperature", "must be 0 (greedy) or a finite number", "inf"]),
    (["--top-p", "0"], ["--top-p", "must be in (0, 1]"]),
    (["--top-p", "1.5"], ["--top-p", "must be in (0, 1]"]),
    (["--top-p", "nan"], ["--top-p", "must be in (0, 1]", "nan"]),
    (["--seed", "abc"], ["--seed", "valid integer"]),
    (["--seed", "-1"], ["--seed", "must be a whole number from 0 to", "got -1"]),
    (["--seed", str(2**64)], ["--seed", "must be a whole number from 0 to", str(2**64)]),
    (["--memory", "lots"], ["--memory", "not a size", "16GB", "lots"]),
    (["--dtype", "int8"], ["--dtype", "must be bfloat16, float16 or float32", "int8"]),
])
def test_chat_rejects_bad_options_in_one_sentence(args, words):
    result = invoke("chat", "--model", "./never-loaded", *args)
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    for w in words:
        assert w in out, (w, out)
    assert "Traceback" not in result.output


def test_chat_unknown_model_path():
    result = invoke("chat", "--model", "./no/such/model", input="hi\n")
    assert result.exit_code != 0
    assert "./no/such/model: no such folder" in error_text(result)


def test_chat_folder_that_is_not_a_gpt_oss_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = invoke("chat", "--model", str(tmp_path), input="hi\n")
    assert result.exit_code != 0
    assert "not 'gpt_oss'" in error_text(result)


def test_chat_empty_folder(tmp_path):
    result = invoke("chat", "--model", str(tmp_path), input="hi\n")
    assert result.exit_code != 0
    assert "no config.json here" in error_text(result)


def test_chat_repo_not_downloaded_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("chat", "--model", "openai/gpt-oss-120b", input="hi\n")
    assert result.exit_code != 0
    assert "HF_HUB_OFFLINE is set" in error_text(result)


def test_main_prints_one_line_and_no_traceback(tmp_path):
    env = dict(os.environ, COLUMNS="300")
    r = subprocess.run([sys.executable, "-m", "mlx_gptoss.cli.app", "chat", "--model", str(tmp_path)],
                       input="hi\n", env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path}/config.json: no config.json here; "
                                             "is this a gpt-oss model folder?"]


# --- chat on scripted checkpoints (the real engine: load, harmony, Session, prompt cache) -------------------

@pytest.fixture
def state(tmp_path, monkeypatch):
    """Autosaves and history go to a temporary folder."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "gptoss-mac"


def chat_piped(model, *args, input: str):
    from scripted_checkpoint import scripted_path

    return invoke("chat", "--model", str(scripted_path(model)), "--temperature", "0", *args, input=input,
                  env={"COLUMNS": "200", "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"]})


def saved(state) -> dict:
    return json.loads((state / "autosave.json").read_text())


def test_piped_chat_prints_only_the_final_answers(state):
    result = chat_piped("reason", "--show-reasoning", input="Say hi\n\nSay hi\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello there!\nHello there!\n"  # no reasoning, no stats, no colours
    assert "\x1b[" not in result.output
    assert "memory plan:" in result.stderr and "context of 131,072 tokens" in result.stderr
    msgs = saved(state)["session"]["messages"]
    assert [(m["role"], m.get("content")) for m in msgs] == [
        ("user", "Say hi"), ("assistant", "Hello there!"), ("user", "Say hi"), ("assistant", "Hello there!")]


def test_chat_options_reach_the_session(state):
    result = chat_piped("reason", "--effort", "low", "--developer", "Answer briefly.", "--seed", "3",
                        "--top-p", "0.9", "--ctx", "4096", "--memory", "64GB", "--dtype", "bfloat16",
                        input="Say hi\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello there!\n"
    assert "context of 4,096 tokens" in result.stderr and "(--memory 64GB)" in result.stderr
    assert "bfloat16 activations" in result.stderr
    session = saved(state)["session"]
    assert session["reasoning_effort"] == "low" and session["developer"] == "Answer briefly."


def test_chat_max_tokens_stops_the_reply_and_says_so(state):
    result = chat_piped("reason", "--max-tokens", "3", input="Say hi\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # three tokens of chain-of-thought: no answer yet
    assert "(the reply stopped at --max-tokens 3)" in result.stderr


def test_piped_slash_commands(state, tmp_path):
    file = tmp_path / "talk.json"
    result = chat_piped("final", input=f"Say hi\n/effort high\n/developer Be kind.\n/save {file}\n/reset\n"
                                       f"/stats\n/load {file}\n/bogus\n/effort extreme\n/exit\nSay hi\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Just the answer.\n"  # stdout: only the answers; nothing is read after /exit
    out = result.stderr  # the slash commands' output
    assert "reasoning effort: high" in out and "developer instructions set." in out
    assert f"saved to {file}" in out and "new conversation." in out
    assert "0 messages in the conversation" in out  # after /reset
    assert f"loaded 2 messages from {file}" in out
    assert ("unknown command /bogus; commands: /help /reset /effort /reasoning /developer /save /load /stats "
            "/exit") in out
    assert "usage: /effort low|medium|high (now high)" in out
    data = json.loads(file.read_text())
    assert data["session"]["reasoning_effort"] == "high" and data["session"]["developer"] == "Be kind."


def test_load_of_a_bad_file_is_an_error_not_a_crash(state, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = chat_piped("final", input=f"/load {bad}\n/load {tmp_path / 'missing.json'}\nSay hi\n")
    assert result.exit_code == 0
    assert "not a saved chat" in result.stderr and "no such file" in result.stderr
    assert result.stdout.strip().endswith("Just the answer.")


def test_a_crash_saves_the_conversation(state, monkeypatch):
    from mlx_gptoss import chat as engine

    real_send, calls = engine.Session.send, []

    def send(self, text, **kw):
        calls.append(text)
        if len(calls) == 2:
            raise RuntimeError("Metal ran out of memory")
        return real_send(self, text, **kw)

    monkeypatch.setattr(engine.Session, "send", send)
    result = chat_piped("final", input="Say hi\nSay hi\n")
    assert result.exit_code == 1
    assert "RuntimeError: Metal ran out of memory" in result.stderr
    crash = sorted(state.glob("crash-*.json"))
    assert len(crash) == 1 and str(crash[0]) in " ".join(result.stderr.split())
    msgs = json.loads(crash[0].read_text())["session"]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]


def test_chat_downloads_the_model_on_first_use_when_piped(tmp_path):
    from scripted_checkpoint import scripted_path

    files = {p.name: p.read_bytes() for p in scripted_path("final").iterdir() if p.is_file()}
    with FakeHub(REPO, files) as fake:
        env = dict(os.environ, HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
                   HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), XDG_STATE_HOME=str(tmp_path / "state"),
                   COLUMNS="200")
        r = subprocess.run([sys.executable, "-m", "mlx_gptoss.cli.app", "chat", "--temperature", "0"],
                           input="Say hi\n", env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "Just the answer.\n"
        assert f"{REPO}: {len(files)} files" in r.stderr and "downloaded openai/gpt-oss-20b" in r.stderr
        assert sorted(fake.fetched()) == sorted(files)


# --- piped mode tells the truth; nothing typed is lost -----------------------------------------------------

def test_non_utf8_piped_input_is_replaced_said_once_and_every_line_is_answered(state):
    result = chat_piped("final", input=b"caf\xe9\nSay hi\n\xff\xfe\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Just the answer.") == 3  # the lines after the bad ones are processed too
    assert result.stderr.count("not valid UTF-8") == 1  # said once
    assert "input line 1" in result.stderr and "Traceback" not in result.output
    msgs = saved(state)["session"]["messages"]
    assert msgs[0] == {"role": "user", "content": "caf\ufffd"}
    assert not list(state.glob("crash-*"))


def test_a_failed_prompt_makes_piped_mode_exit_1_and_the_others_are_answered(state):
    long = "word " * 3000  # more than a context of 1024 tokens
    result = chat_piped("final", "--ctx", "1024", input=f"Say hi\n{long}\nSay hi\n")
    assert result.exit_code == 1, result.output
    assert result.stdout == "Just the answer.\nJust the answer.\n"
    err = " ".join(result.stderr.split())
    assert "input line 2 was not answered" in err and "1 of the prompts got no reply" in err
    # the conversation on disk holds both turns: the refused message never cost the turn before it
    msgs = saved(state)["session"]["messages"]
    assert [m["content"] for m in msgs] == ["Say hi", "Just the answer."] * 2


def test_ctx_1_fails_every_prompt_with_exit_1(state):
    result = chat_piped("final", "--ctx", "1", input="Say hi\n")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "input line 1 was not answered" in " ".join(result.stderr.split())


def test_a_tool_call_in_piped_mode_is_a_note_on_stderr(state):
    result = chat_piped("tool", input="Say hi\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "note: the model called a tool, functions.get_weather({\"city\": \"Paris\"}), but this chat has no " \
           "tools" in " ".join(result.stderr.split())
    # the reply (a tool call, no answer) is saved in the engine's own shape, and loads again
    result = chat_piped("tool", input=f"/load {state / 'autosave.json'}\n/stats\n")
    assert f"loaded 2 messages from {state / 'autosave.json'}" in result.stderr, result.stderr


def test_dropped_turns_are_said_and_kept_in_the_saved_conversation(state):
    # 3 turns of ~1000 tokens each in a 2048-token context: the session drops the oldest to make room
    big = ["Say hi " + "word " * 900 + str(i) for i in range(3)]
    result = chat_piped("final", "--ctx", "2048", "--max-tokens", "16", input="\n".join(big) + "\n")
    import re

    assert re.search(r'the context was full: the model no longer sees the \d oldest turns? \(\d messages, "Say hi word',
                     " ".join(result.stderr.split())), result.stderr
    msgs = saved(state)["session"]["messages"]
    assert [m["content"] for m in msgs if m["role"] == "user"] == big  # every message the user typed


def test_a_full_context_drops_turns_once_in_a_while_not_every_turn(state):
    """`--ctx 200` and ten short prompts: dropping frees half the context, so it happens a few times, and each
    time says which turns went."""
    result = chat_piped("final", "--ctx", "200", input="".join(f"Say hi {i}\n" for i in range(10)))
    assert result.exit_code == 0, result.output
    assert result.stdout == "Just the answer.\n" * 10
    notes = [line for line in result.stderr.splitlines() if "the context was full" in line]
    assert 1 <= len(notes) <= 3, result.stderr
    assert 'oldest turns (' in notes[0] and '"Say hi 0" to "Say hi' in notes[0] and "half of the context" in notes[0]
    msgs = saved(state)["session"]["messages"]
    assert [m["content"] for m in msgs if m["role"] == "user"] == [f"Say hi {i}" for i in range(10)]


@pytest.mark.parametrize("show", [[], ["--show-reasoning"]])
def test_malformed_output_is_shown_on_stderr_when_piped_never_as_an_answer(state, show):
    result = chat_piped("no_header", *show, input="Say hi\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # not an answer
    err = " ".join(result.stderr.split())
    assert ("(the model's output did not follow the chat format: the model's output never opened a message (no "
            "<|message|>); what it wrote outside a message (not an answer): 'hello world')") in err, err
    assert "shown as it came" not in err


def test_a_new_conversation_never_overwrites_the_previous_autosave(state):
    assert chat_piped("final", input="Say hi\n").exit_code == 0
    first = saved(state)
    assert chat_piped("final", input="Say hi\n/reset\nSay hi\n").exit_code == 0
    previous = json.loads((state / "autosave.previous.json").read_text())
    assert len(previous["session"]["messages"]) == 2 and len(saved(state)["session"]["messages"]) == 2
    assert first["session"]["messages"] == previous["session"]["messages"]


def test_ctrl_c_in_a_piped_chat_ends_it_on_stderr_with_status_130(state, monkeypatch):
    from mlx_gptoss.cli import render

    real_event, seen = render.ReplyView.event, []

    def event(self, ev):  # Ctrl-C after the third token
        real_event(self, ev)
        seen.append(ev)
        if len(seen) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(render.ReplyView, "event", event)
    result = chat_piped("loop", input="Say hi\nSay hi\n")
    assert result.exit_code == 130
    assert result.stdout == ""  # stdout holds only answers
    assert f"stopped; the conversation, with the answer so far, is autosaved in {state / 'autosave.json'}" in \
        " ".join(result.stderr.split())
    assert len(seen) == 3  # the second line is not read: Ctrl-C ends a piped run
    assert [m["role"] for m in saved(state)["session"]["messages"]] == ["user"]  # only reasoning so far


# --- the chat's files ----------------------------------------------------------------------------------------

def test_save_writes_valid_json_even_for_text_that_is_not_unicode(tmp_path):
    from mlx_gptoss.cli import saved as files

    path = files.write(tmp_path / "new" / "folder" / "c.json", {"text": "caf\udce9"})  # a missing folder: made
    assert json.loads(path.read_text(encoding="utf-8")) == {"text": "caf\ufffd"}
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]


def test_a_failed_save_leaves_no_empty_temporary_file(tmp_path, monkeypatch):
    from mlx_gptoss.cli import saved as files

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="cannot write .*c.json: No space left on device"):
        files.write(tmp_path / "c.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_a_crash_whose_save_fails_says_so(tmp_path, monkeypatch):
    from mlx_gptoss import chat as engine

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the state folder cannot be created: XDG_STATE_HOME is a file
    monkeypatch.setenv("XDG_STATE_HOME", str(blocker))
    monkeypatch.setattr(engine.Session, "send", lambda self, text, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    result = chat_piped("final", input="Say hi\n")
    assert result.exit_code == 1
    err = " ".join(result.stderr.split())
    assert "RuntimeError: boom" in err and "the conversation could not be saved: cannot create the folder" in err


def test_save_to_a_place_that_cannot_be_written_is_one_line(state, tmp_path):
    (tmp_path / "file").write_text("")
    result = chat_piped("final", input=f"Say hi\n/save {tmp_path / 'file' / 'c.json'}\n/save {tmp_path}\nSay hi\n")
    assert result.exit_code == 0
    err = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 2 and "cannot create the folder" in err[0] and "is a folder; give a file name" in err[1]
    assert "Errno" not in result.stderr
    assert result.stdout == "Just the answer.\nJust the answer.\n"


def saved_chat(**session) -> dict:
    return {"format": "gptoss-mac chat", "version": 1, "model": "x",
            "session": {"reasoning_effort": "low", "developer": None, "messages": [], **session}}


@pytest.mark.parametrize("data, words", [
    ({**saved_chat(), "version": 99}, ["saved chat version 99", "reads version 1 only"]),
    ({"format": "other"}, ["not a saved chat"]),
    ([1, 2], ["not a saved chat"]),
    (saved_chat(messages=[{"role": "user"}]), ["message 1", "needs its \"content\""]),
    (saved_chat(messages=[{"role": "user", "content": None}]), ["message 1", "'content' must be a string"]),
    (saved_chat(messages=[{"role": "robot", "content": "hi"}]), ["message 1", "role 'robot'"]),
    (saved_chat(messages=["hi"]), ["message 1", "must be an object"]),
    (saved_chat(messages={"role": "user"}), ["\"messages\" must be a list"]),
    (saved_chat(colour="red"), ["unknown session field 'colour'"]),
    (saved_chat(reasoning_effort="max"), ["reasoning_effort 'max'"]),
    (saved_chat(messages=[{"role": "assistant", "tool_calls": [{"name": 1}]}]), ["\"tool_calls\" must be"]),
])
def test_load_refuses_a_bad_saved_chat_in_one_line_and_keeps_the_conversation(state, tmp_path, data, words):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    result = chat_piped("final", input=f"Say hi\n/load {bad}\n/stats\n")
    assert result.exit_code == 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert "the current conversation is kept" in errors[0]
    assert "2 messages in the conversation" in result.stderr  # the conversation before /load is still there
    assert "Warning" not in result.stderr and "unexpected keyword" not in result.stderr


def test_the_live_line_moves_while_the_model_prefills_and_thinks():
    """The spinner turns and the elapsed time and token count show, at least every 0.2 s, also while the main
    thread is busy (Rich's refresh thread draws it)."""
    import io
    import re
    import time

    from rich.console import Console

    from mlx_gptoss.chat import Event
    from mlx_gptoss.cli.render import ReplyView

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100, color_system=None)
    with ReplyView(console, show_reasoning=False, plain=False) as view:
        time.sleep(1.0)  # prefill: no event yet
        for _ in range(5):
            view.event(Event("reasoning", "x", channel="analysis"))
            time.sleep(0.2)
    frames = re.findall(r"(\S) thinking…(?: (\d+) tokens?)? · ([0-9.]+) s", screen.getvalue())
    spinners = {f[0] for f in frames}
    times = [float(f[2]) for f in frames]
    assert len(spinners) >= 4, frames  # the spinner turns
    assert len(set(times)) >= 5, times  # redrawn 12 times a second (Live's refresh rate): the time moves
    assert {f[1] for f in frames} >= {"", "1", "5"}  # the token count shows as the reasoning streams
