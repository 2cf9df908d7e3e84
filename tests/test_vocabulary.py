"""A checkpoint whose vocabulary cannot hold the harmony tokens (ids up to 200012): its raw forward pass works,
chatting with it is one clear error (never an out-of-bounds embedding read, which can segfault)."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import pytest

import mlx_gptoss
from mlx_gptoss.errors import GptOssError
from tiny_checkpoint import hub_config, random_weights, write_hub_checkpoint


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    from scripted_checkpoint import offline_harmony

    tok = offline_harmony()  # the harmony vocabulary is available: prompts would reach ids 200006+
    cfg = hub_config(vocab_size=8192, num_hidden_layers=2)
    folder = write_hub_checkpoint(tmp_path_factory.mktemp("v") / "ckpt", cfg, random_weights(cfg, seed=1), shards=1)
    (folder / "tokenizer.json").symlink_to(tok / "tokenizer.json")
    return folder


def test_the_raw_forward_pass_still_loads_and_runs(small_vocab):
    gpt = mlx_gptoss.load(small_vocab, allow_download=False)
    assert gpt.model(mx.array([[1, 2, 8191]])).shape == (1, 3, 8192)


@pytest.mark.parametrize("use", ["session", "Session", "chat", "generate", "encode_chat"])
def test_chat_on_a_small_vocabulary_is_one_clear_error(small_vocab, use):
    gpt = mlx_gptoss.load(small_vocab, allow_download=False)
    msgs = [{"role": "user", "content": "hi"}]
    calls = {"session": lambda: gpt.session(), "Session": lambda: mlx_gptoss.Session(gpt), "chat": lambda: next(gpt.chat(msgs)),
             "generate": lambda: gpt.generate("hi"), "encode_chat": lambda: gpt.encode_chat(msgs)}
    with pytest.raises(GptOssError, match=r"vocab_size 8,192 cannot hold the harmony chat tokens \(ids up to 200,012"):
        calls[use]()


def test_load_for_chat_refuses_before_reading_weights(small_vocab):
    with pytest.raises(GptOssError, match="config.json: vocab_size 8,192 cannot hold the harmony chat tokens"):
        mlx_gptoss.load(small_vocab, allow_download=False, for_chat=True)


def test_cli_chat_on_a_small_vocabulary_is_one_line(small_vocab, tmp_path):
    env = dict(os.environ, COLUMNS="300", XDG_STATE_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "mlx_gptoss.cli.app", "chat", "--model", str(small_vocab)],
                       input="Say hi\n", env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr)  # not -11 (SIGSEGV), not 0 with garbage
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {small_vocab}/config.json: vocab_size 8,192 cannot "
                                                   "hold the harmony chat tokens"), lines
