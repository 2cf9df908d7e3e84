"""Install the real agent clients the client tests drive, at pinned versions, into a cache folder.

    python tests/clients/install_clients.py            # all of them; prints where each one is
    python tests/clients/install_clients.py claude     # one

npm packages go to $GPTOSS_CLIENTS_DIR (default ~/.cache/gptoss-mac-test-clients)/NAME-VERSION, one folder per
pinned version, installed once (a folder that holds the client's executable is reused). Python clients
(openai-agents, anthropic) are pinned in pyproject.toml's test extras instead.
The tests call ensure(); without node/npm it returns None and the tests skip with one line saying how to run
them, unless GPTOSS_REQUIRE_CLIENTS=1 (set by .ci/run): then a client that cannot be installed fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# name: (npm package, pinned version, executable). Versions: what npm had that these tests pass with.
NPM = {
    "codex": ("@openai/codex", "0.169.1", "codex"),
    "claude": ("@anthropic-ai/claude-code", "2.1.332", "claude"),
    "opencode": ("opencode-ai", "1.18.33", "opencode"),
}
INSTALL_TIMEOUT = 900  # seconds for one npm install (Claude Code's native binary is ~400 MB)
HOW = ("install Node.js 20+ and npm, then run `python tests/clients/install_clients.py` (or .ci/run, which sets "
       "GPTOSS_REQUIRE_CLIENTS=1 so these tests cannot skip)")


class ClientUnavailable(Exception):
    """A client could not be installed; the message says why and how to get it."""


def required() -> bool:
    return os.environ.get("GPTOSS_REQUIRE_CLIENTS") == "1"


def cache_dir() -> Path:
    return Path(os.environ.get("GPTOSS_CLIENTS_DIR") or Path.home() / ".cache" / "gptoss-mac-test-clients")


def executable(name: str) -> Path:
    package, version, exe = NPM[name]
    return cache_dir() / f"{name}-{version}" / "node_modules" / ".bin" / exe


def ensure(name: str) -> Path:
    """The pinned client's executable, installed on first use. Raises ClientUnavailable."""
    package, version, _ = NPM[name]
    exe = executable(name)
    if exe.exists():
        return exe
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise ClientUnavailable(f"{package} needs node and npm, which are not on PATH: {HOW}")
    prefix = exe.parents[2]
    prefix.mkdir(parents=True, exist_ok=True)
    cmd = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--no-save", "--loglevel=error",
           f"{package}@{version}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                           env=dict(os.environ, npm_config_update_notifier="false"))
    except subprocess.TimeoutExpired:
        raise ClientUnavailable(f"`{' '.join(cmd)}` did not finish within {INSTALL_TIMEOUT} s") from None
    if r.returncode != 0 or not exe.exists():
        raise ClientUnavailable(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {(r.stderr or r.stdout)[-2000:]}")
    return exe


def main(argv: list[str]) -> int:
    names = argv or list(NPM)
    status = 0
    for name in names:
        if name not in NPM:
            print(f"unknown client {name!r}; choose from {', '.join(NPM)}", file=sys.stderr)
            return 2
        try:
            print(f"{name}: {ensure(name)}")
        except ClientUnavailable as e:
            print(f"{name}: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
