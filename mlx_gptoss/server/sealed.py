"""Sealed reasoning: an opaque blob holding exactly the token ids the model generated for one analysis message.

A stateless client (Codex sends `store: false` + `include: ["reasoning.encrypted_content"]`; Claude Code sends
thinking blocks back with their `signature`) returns the blob with its history. Unsealed, the turn re-renders
to the very tokens the model produced, so the prompt matches the KV cache byte for byte even after a restart
or in another slot; re-tokenizing the text could split it differently and miss the cache.

The blob is `gm1.` + base64url(version byte, the ids as little-endian uint32, HMAC-SHA256 of both). The HMAC
secret is 32 random bytes in the user's state folder ($XDG_STATE_HOME/gptoss-mac, else
~/.local/state/gptoss-mac), created once with mode 0600, so blobs survive restarts. Token ids are not secret
(the text is shown beside them); the HMAC only makes sure a client cannot make us trust tokens we never
generated. Anything that fails the check (tampered, another machine's, malformed) unseals to None and the
caller uses the item's text as plain text.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import struct
import threading
from pathlib import Path

log = logging.getLogger("gptoss_mac.server")

PREFIX = "gm1."
VERSION = 1
SECRET_FILE = "reasoning-seal.key"
SECRET_BYTES = 32
MAC_BYTES = 32
MAX_TOKENS = 1 << 22  # a blob claiming more ids than any context holds is not ours

_lock = threading.Lock()
_secrets: dict[Path, bytes] = {}  # per state folder, read once per process


def state_dir() -> Path:
    """The user's state folder: $XDG_STATE_HOME/gptoss-mac, else ~/.local/state/gptoss-mac (as the chat CLI's)."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "gptoss-mac"


def _secret() -> bytes:
    path = state_dir() / SECRET_FILE
    with _lock:
        if path not in _secrets:
            _secrets[path] = _load_or_create(path)
        return _secrets[path]


def _load_or_create(path: Path) -> bytes:
    try:
        key = path.read_bytes()
        if len(key) == SECRET_BYTES:
            return key
        log.warning("%s is not a %d-byte key; writing a new one (older reasoning blobs become plain text)",
                    path, SECRET_BYTES)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot read %s (%s); reasoning blobs will not survive a restart", path, e)
        return secrets.token_bytes(SECRET_BYTES)
    key = secrets.token_bytes(SECRET_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        try:
            os.link(tmp, path)  # atomic create-if-absent: two servers starting at once agree on one key
        except FileExistsError:
            os.unlink(tmp)
            return _load_or_create(path)
        except OSError:  # a filesystem without hard links
            os.replace(tmp, path)
        else:
            os.unlink(tmp)
    except OSError as e:
        log.warning("cannot write %s (%s); reasoning blobs will not survive a restart", path, e)
    return key


def _mac(body: bytes) -> bytes:
    return hmac.new(_secret(), body, hashlib.sha256).digest()


def seal(tokens: list[int]) -> str:
    body = bytes([VERSION]) + struct.pack(f"<{len(tokens)}I", *tokens)
    return PREFIX + base64.urlsafe_b64encode(body + _mac(body)).decode().rstrip("=")


def unseal(blob: object) -> list[int] | None:
    """The token ids sealed in blob, or None if it is not a blob this machine's secret made."""
    if not isinstance(blob, str) or not blob.startswith(PREFIX) or len(blob) > 8 * MAX_TOKENS:
        return None
    text = blob[len(PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        return None
    if base64.urlsafe_b64encode(raw).decode().rstrip("=") != text:
        return None  # only the one canonical spelling: no stray characters or padding bits
    body, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    if len(raw) < 1 + MAC_BYTES or (len(body) - 1) % 4 or body[0] != VERSION:
        return None
    if not hmac.compare_digest(mac, _mac(body)):
        return None
    return list(struct.unpack(f"<{(len(body) - 1) // 4}I", body[1:]))
