"""The chat's JSON files (/save, /load, autosave, crash saves): writing them safely, reading them strictly.

A file is {"format": "gptoss-mac chat", "version": 1, "model": ..., "session": {"reasoning_effort",
"developer", "date", "messages"}}. Writing never leaves a half or empty file and never fails on text that
is not valid Unicode (lone surrogates become U+FFFD); reading checks every field and message and names the
first thing wrong, so a bad file is one clear line and the current conversation is kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlx_gptoss.errors import GptOssError

FORMAT = "gptoss-mac chat"
VERSION = 1
EFFORTS = ("low", "medium", "high")
SESSION_KEYS = {"reasoning_effort", "developer", "date", "messages"}
ROLES = ("user", "assistant", "tool", "developer", "system")
PART_KEYS = ("channel", "content", "recipient", "content_type", "id")  # mlx_gptoss.chat's assistant "parts"


def clean(text: str) -> tuple[str, bool]:
    """text with every lone surrogate (undecodable input bytes, surrogateescape) replaced by U+FFFD;
    and whether anything was replaced."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), True


def write(path: Path, data: dict) -> Path:
    """Write data as JSON to path atomically (a temporary file, then a rename). Raises OSError with the
    path named; on any failure the temporary file is removed."""
    path = Path(path).expanduser()
    raw = clean(json.dumps(data, indent=2, ensure_ascii=False))[0].encode("utf-8")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name, like {path / 'chat.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the folder {path.parent}: {e.strerror or e}") from None
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def read(path: Path) -> dict:
    """The session dict of a saved chat (keys among SESSION_KEYS), checked; GptOssError naming the fault."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise GptOssError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GptOssError(f"{path}: is a folder, not a saved chat") from None
    except OSError as e:
        raise GptOssError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptOssError(f"{path}: not a saved chat (not valid JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GptOssError(f"{path}: not a saved chat (no \"format\": \"{FORMAT}\"); save one with /save")
    if data.get("version") != VERSION:
        raise GptOssError(f"{path}: saved chat version {data.get('version')!r}; this gptoss-mac reads version "
                          f"{VERSION} only (a newer gptoss-mac may have written it)")
    session = data.get("session")
    if not isinstance(session, dict):
        raise GptOssError(f"{path}: \"session\" must be an object")
    unknown = sorted(set(session) - SESSION_KEYS)
    if unknown:
        raise GptOssError(f"{path}: unknown session field {unknown[0]!r} (known: {', '.join(sorted(SESSION_KEYS))})")
    if session.get("reasoning_effort", "medium") not in EFFORTS:
        raise GptOssError(f"{path}: reasoning_effort {session['reasoning_effort']!r}: must be low, medium or high")
    for key in ("developer", "date"):
        if session.get(key) is not None and not isinstance(session[key], str):
            raise GptOssError(f"{path}: {key!r} must be a string or null")
    messages = session.get("messages")
    if not isinstance(messages, list):
        raise GptOssError(f"{path}: \"messages\" must be a list")
    for i, m in enumerate(messages, 1):
        why = _bad_message(m)
        if why:
            raise GptOssError(f"{path}: message {i}: {why}")
    return session


def _bad_message(m) -> str | None:
    """Why m is not a message the chat engine writes (None if it is one; see mlx_gptoss.chat's docstring)."""
    if not isinstance(m, dict):
        return "must be an object with a \"role\""
    role = m.get("role")
    if role not in ROLES:
        return f"role {role!r}: must be one of {', '.join(ROLES)}"
    for key in ("content", "reasoning", "name", "tool_call_id"):
        if key in m and not isinstance(m[key], str):
            return f"{key!r} must be a string"
    calls, parts = m.get("tool_calls"), m.get("parts")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments"), str)
                for c in calls):
            return "\"tool_calls\" must be a list of {\"name\", \"arguments\"} strings, on an assistant message"
    if parts is not None:
        if role != "assistant" or not isinstance(parts, list) or not all(
                isinstance(p, dict) and isinstance(p.get("content"), str)
                and all(p.get(k) is None or isinstance(p[k], str) for k in PART_KEYS) for p in parts):
            return "\"parts\" must be a list of {\"channel\", \"content\", ...} strings, on an assistant message"
    if "content" not in m and not (role == "assistant" and (calls or parts)):
        return f"a {role} message needs its \"content\""
    if role == "tool" and not m.get("name"):
        return "a tool message needs the \"name\" of the tool it answers"
    return None
