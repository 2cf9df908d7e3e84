"""`gptoss-mac chat` in a real pseudo-terminal (pexpect): what a person at the keyboard sees and does."""

from __future__ import annotations

import json
import os
import sys
import time

import pexpect
import pytest

from fake_hub import FakeHub

PTY_ENV = {"PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}


def spawn(args: list[str], env: dict, timeout: float = 60, rows: int = 40) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "mlx_gptoss.cli.app", *args],
                          env={**os.environ, **PTY_ENV, "LINES": str(rows), **env}, encoding="utf-8", timeout=timeout,
                          dimensions=(rows, 120))
    return child


def test_chat_asks_before_downloading_on_a_tty(tiny_ckpt, tmp_path):
    files = {p.name: p.read_bytes() for p in tiny_ckpt.iterdir()}
    with FakeHub("openai/gpt-oss-20b", files) as fake:
        env = {"HF_ENDPOINT": fake.url, "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"),
               "HF_HUB_OFFLINE": "0", "XDG_STATE_HOME": str(tmp_path / "state")}
        child = spawn(["chat"], env)
        child.expect(r"openai/gpt-oss-20b is not downloaded yet: fetch [0-9.]+ MB now\? \[Y/n\]")
        child.sendline("n")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 1
        assert fake.fetched() == []


@pytest.fixture
def chat_env(tmp_path):
    from scripted_checkpoint import offline_harmony

    offline_harmony()  # sets XDG_CACHE_HOME to where the harmony vocabulary was derived: the child inherits it
    return {"XDG_STATE_HOME": str(tmp_path / "state"), "HF_HUB_OFFLINE": "1"}


def chat(model: str, env: dict, *args, rows: int = 40) -> pexpect.spawn:
    from scripted_checkpoint import scripted_path

    child = spawn(["chat", "--model", str(scripted_path(model)), "--temperature", "0", *args], env, rows=rows)
    child.expect("/help for commands")
    child.expect("›")
    return child


def test_interactive_chat_streams_saves_loads_and_exits_0(chat_env, tmp_path):
    file = tmp_path / "talk.json"
    child = chat("reason", chat_env)
    child.send("Say hi\r")
    child.expect("Hello there!")
    # the stats line; the first turn prefills the whole prompt
    child.expect(r"(\d+) tokens \(\d+ thinking\) · first token [0-9.]+ s · [0-9.]+ tok/s · "
                 r"prompt (\d+) tokens \((\d+) new\)")
    first_prompt, first_new = int(child.match.group(2)), int(child.match.group(3))
    assert first_new == first_prompt
    child.expect("›")

    child.send("Say hi\r")
    child.expect("Hello there!")
    child.expect(r"prompt (\d+) tokens \((\d+) new\)")
    prompt, new = int(child.match.group(1)), int(child.match.group(2))
    assert new == prompt - first_prompt < first_prompt  # the prompt cache: only what the first turn did not have
    child.expect("›")

    child.send(f"/save {file}\r")
    child.expect("saved to")
    child.send("/reset\r")
    child.expect("new conversation")
    child.send(f"/load {file}\r")
    child.expect("loaded 4 messages")
    child.send("/reasoning on\r")
    child.expect("chain-of-thought shown")
    child.send("Say hi\r")
    child.expect("The user greets.")  # the chain-of-thought, shown on request
    child.expect("Hello there!")
    child.expect("tok/s")
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = json.loads(file.read_text())["session"]["messages"]
    assert [m.get("content") for m in saved] == ["Say hi", "Hello there!"] * 2
    autosaved = json.loads((tmp_path / "state" / "gptoss-mac" / "autosave.json").read_text())
    assert len(autosaved["session"]["messages"]) == 6  # the loaded 4 + the last turn


def test_ctrl_c_stops_a_reply_and_keeps_the_session(chat_env):
    child = chat("loop", chat_env)  # its chain-of-thought never ends: " again and again and ..."
    child.send("Say hi\r")
    child.expect(r"thinking… (\d+) tokens · ([0-9.]+) s")
    seen, times = {int(child.match.group(1))}, {child.match.group(2)}
    while len(seen) < 3 or len(times) < 3:  # the count and the elapsed time move: the reply is streaming
        child.expect(r"thinking… (\d+) tokens · ([0-9.]+) s")
        seen.add(int(child.match.group(1)))
        times.add(child.match.group(2))
    child.sendintr()
    child.expect("stopped; the conversation is kept")
    child.expect("›")
    child.send("/stats\r")
    child.expect(r"1 replies, (\d+) tokens generated")  # the interrupted reply counts
    assert int(child.match.group(1)) >= max(seen)
    child.expect("1 messages in the conversation")  # the user's message; nothing was lost or corrupted
    child.expect("›")

    child.send("some half-typed line")
    child.sendintr()  # Ctrl-C at the prompt clears the line, the session goes on
    child.send("/stats\r")
    child.expect("1 messages in the conversation")
    child.expect("›")
    child.sendeof()  # Ctrl-D quits with status 0
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_help_and_multiline_input(chat_env, tmp_path):
    file = tmp_path / "multi.json"
    child = chat("final", chat_env)
    child.send("/help\r")
    child.expect("Esc then Enter, or a trailing")
    child.expect("›")
    child.send("first line\\\r")  # a trailing backslash continues the message on a new line
    child.send("second line")
    child.send("\x1b\r")  # Esc then Enter: another new line
    child.send("third line\r")
    child.expect("Just the answer.")
    child.expect("tok/s")
    child.expect("›")
    child.send("\x1b[A")  # Up: the last message comes back from the history...
    time.sleep(0.3)
    child.send("\r")  # ...and Enter sends it again
    child.expect("Just the answer.")
    child.expect("tok/s")
    child.send(f"/save {file}\r")
    child.expect("saved to")
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    msgs = json.loads(file.read_text())["session"]["messages"]
    message = {"role": "user", "content": "first line\nsecond line\nthird line"}
    assert msgs[0] == message and msgs[2] == message and len(msgs) == 4
    history = (tmp_path / "state" / "gptoss-mac" / "history").read_text()
    assert "+first line\n+second line\n+third line" in history  # prompt_toolkit's history file, kept for next time


def test_ctrl_c_stops_a_download_at_once_and_it_resumes(tmp_path):
    files = {"config.json": b'{"model_type": "gpt_oss"}', "tokenizer.json": b"{}",
             "model-00000-of-00001.safetensors": os.urandom(8_000_000)}
    with FakeHub("openai/gpt-oss-20b", files) as fake:
        fake.slow.add("model-00000-of-00001.safetensors")  # ~6 s to send
        env = {"HF_ENDPOINT": fake.url, "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"),
               "HF_HUB_OFFLINE": "0"}
        child = spawn(["download"], env)
        child.expect("to download into")
        child.expect("MB")  # the progress bar is moving
        child.sendintr()
        child.expect("download interrupted; finished files are kept: run the same command again to continue",
                     timeout=3)  # at once, not after the file in flight
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 130
        blobs = tmp_path / "hub" / "models--openai--gpt-oss-20b" / "blobs"
        assert not list(blobs.glob("*.incomplete"))  # no half file left in the cache

        fake.slow.clear()
        fake.log.clear()
        child = spawn(["download"], env)
        child.expect("downloaded openai/gpt-oss-20b")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        assert "model-00000-of-00001.safetensors" in fake.fetched()


def test_a_message_too_long_for_the_context_is_refused_and_comes_back_with_up(chat_env):
    child = chat("final", chat_env, "--ctx", "1024")
    child.send("Say hi\r")
    child.expect("Just the answer.")
    child.expect("›")
    long = " ".join(f"w{i}" for i in range(700))  # more than the 1024-token context
    child.send(long + "\r")
    child.expect("your message is kept in the history: press Up to edit it")
    child.expect("›")
    child.send("/stats\r")
    child.expect("2 messages in the conversation")  # the conversation exactly as it was
    child.expect("›")
    child.send("\x1b[A")  # Up: /stats; Up again: the refused message is back on the line, to shorten it
    time.sleep(0.3)
    child.send("\x1b[A")
    child.expect("w699")
    child.send("\x15")  # Ctrl-U: clear it
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def screen_text(raw: str, columns: int = 120, lines: int = 40) -> str:
    """What the terminal shows, scrollback included, after `raw` (pyte, a VT100 emulator)."""
    import pyte

    screen = pyte.HistoryScreen(columns, lines, history=10_000)
    pyte.Stream(screen).feed(raw.replace("\r\n", "\n").replace("\n", "\r\n"))
    top = ["".join(line[x].data for x in range(columns)).rstrip() for line in screen.history.top]
    return "\n".join(top + [line.rstrip() for line in screen.display])


def test_long_shown_reasoning_is_drawn_once(chat_env):
    """/reasoning on with forty lines of chain-of-thought in a 24-line terminal: every line appears once on the
    screen and in its scrollback (a live view taller than the screen used to be redrawn below itself)."""
    import io

    child = chat("long_reasoning", chat_env, rows=24)
    child.send("/reasoning on\r")
    child.expect("chain-of-thought shown")
    child.expect("›")
    raw = io.StringIO()
    child.logfile_read = raw
    child.send("Say hi\r")
    child.expect("Done thinking.", timeout=180)
    child.expect("tok/s")
    child.expect("›")
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    text = screen_text(raw.getvalue(), lines=24)
    counts = {i: text.count(f"Step {i} of the plan.") for i in range(1, 41)}
    assert set(counts.values()) == {1}, {i: n for i, n in counts.items() if n != 1}
    assert text.count("Done thinking.") == 1
    assert text.index("Step 40 of the plan.") < text.index("Done thinking.")


def test_malformed_output_is_shown_dimmed_and_said(chat_env):
    """Text the model wrote outside any message: shown (dimmed), with or without /reasoning on, and the note
    says where it is."""
    import io

    child = chat("no_header", chat_env)
    raw = io.StringIO()
    child.logfile_read = raw
    for command in ("", "/reasoning on"):
        if command:
            child.send(command + "\r")
            child.expect("chain-of-thought shown")
            child.expect("›")
        child.send("Say hi\r")
        child.expect("did not follow the chat format")
        child.expect("what it wrote outside a message is shown dimmed above")
        child.expect("tok/s")
        child.expect("›")
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    text = screen_text(raw.getvalue())
    assert text.count("hello world") == 2, text  # once per reply
    assert "shown as it came" not in text
