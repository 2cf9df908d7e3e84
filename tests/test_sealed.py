"""The sealed reasoning blob: exact tokens round-trip, anything not made with this machine's secret is refused,
and the secret lives in the state folder with mode 0600 and survives a restart (a new process)."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys

import pytest

from mlx_gptoss.server import sealed


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "gptoss-mac"


def test_round_trip_exact_tokens(state):
    tokens = [0, 1, 200005, 200008, 201087, 42] * 50
    blob = sealed.seal(tokens)
    assert blob.startswith("gm1.") and all(c.isalnum() or c in "-_." for c in blob)
    assert sealed.unseal(blob) == tokens
    assert sealed.unseal(sealed.seal([])) == []


def test_secret_file_is_private_and_created_once(state):
    blob = sealed.seal([5, 6, 7])
    key = state / sealed.SECRET_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    # another process (a restarted server) reads the same secret and trusts the blob
    code = "import sys; from mlx_gptoss.server import sealed; print(sealed.unseal(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, blob], capture_output=True, text=True, env=os.environ,
                         check=True).stdout
    assert out.strip() == "[5, 6, 7]"


@pytest.mark.parametrize("mangle", [
    lambda b: b[:-1] + ("A" if b[-1] != "A" else "B"),  # flipped MAC
    lambda b: b[:6] + ("A" if b[6] != "A" else "B") + b[7:],  # flipped token bytes
    lambda b: b[4:],  # no prefix
    lambda b: "gm1.",  # empty
    lambda b: "gm1.!!!!",  # not base64
    lambda b: "gm1." + base64.urlsafe_b64encode(b"\x02" + b"\0" * 36).decode(),  # another version
    lambda b: b + "AAAA",  # extra bytes
])
def test_tampered_or_malformed_is_none(mangle):
    blob = sealed.seal([1, 2, 3, 4])
    assert sealed.unseal(mangle(blob)) is None


def test_foreign_secret_and_non_strings_are_none(state, tmp_path, monkeypatch):
    blob = sealed.seal([9, 9])
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "other"))  # another machine's key
    assert sealed.unseal(blob) is None
    for junk in (None, 12, ["gm1."], {"a": 1}, "", "plain reasoning text"):
        assert sealed.unseal(junk) is None
