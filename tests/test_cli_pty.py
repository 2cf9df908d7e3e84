"""`gptoss-mac chat` in a real pseudo-terminal (pexpect): what a person at the keyboard sees and does."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest

from fake_hub import FakeHub

PTY_ENV = {"PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}


def spawn(args: list[str], env: dict, timeout: float = 60) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "mlx_gptoss.cli.app", *args], env={**os.environ, **PTY_ENV, **env},
                          encoding="utf-8", timeout=timeout, dimensions=(40, 120))
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
