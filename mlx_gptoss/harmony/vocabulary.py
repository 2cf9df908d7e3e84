"""The harmony vocabulary: its special token ids and the o200k_base.tiktoken file openai-harmony needs, derived
offline from the model snapshot's tokenizer.json (the same byte-level BPE ranks) and checked by its sha256;
TIKTOKEN_ENCODINGS_BASE points openai-harmony at our cache folder, so chat works with no network."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from ..errors import ConfigError, GptOssError

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
N_ORDINARY = 199998  # o200k_base's BPE ranks 0..199997; the rest of the 201088 ids are special tokens

START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = 200006, 200007, 200008, 200005, 200003, 200002, 200012
STOP_TOKENS = {RETURN: "return", CALL: "call"}


def cache_dir() -> Path:
    """gptoss-mac's own cache folder ($XDG_CACHE_HOME/gptoss-mac, else ~/.cache/gptoss-mac)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptoss-mac"


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character standing for each byte, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def tiktoken_from_tokenizer_json(tokenizer_json: Path) -> bytes:
    """The o200k_base.tiktoken text (base64 token, space, rank per line) from a gpt-oss tokenizer.json."""
    try:
        data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise GptOssError(f"{tokenizer_json}: not a readable tokenizer.json ({type(e).__name__}: {e}); "
                          "download the model folder again") from None
    dec = _byte_decoder()
    by_rank: dict[int, bytes] = {}
    for text, rank in vocab.items():
        if isinstance(rank, int) and 0 <= rank < N_ORDINARY:
            try:
                by_rank[rank] = bytes(dec[ch] for ch in text)
            except KeyError:
                raise GptOssError(f"{tokenizer_json}: token {text!r} is not byte-level BPE; "
                                  "is this a gpt-oss tokenizer?") from None
    if len(by_rank) != N_ORDINARY:
        raise GptOssError(f"{tokenizer_json}: holds {len(by_rank)} of the {N_ORDINARY} o200k tokens; "
                          "is this a gpt-oss tokenizer? download the model folder again")
    return b"".join(base64.b64encode(by_rank[r]) + b" %d\n" % r for r in range(N_ORDINARY))


def ensure_vocab(model_path: Path | None = None) -> Path:
    """The folder holding a verified o200k_base.tiktoken, deriving it from model_path/tokenizer.json if needed;
    sets TIKTOKEN_ENCODINGS_BASE to it (before openai-harmony first loads its encoding)."""
    env = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    candidates = ([Path(env)] if env else []) + [cache_dir()]
    for folder in candidates:
        f = folder / VOCAB_FILE
        if f.is_file() and hashlib.sha256(f.read_bytes()).hexdigest() == VOCAB_SHA256:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
            return folder
    src = Path(model_path) / "tokenizer.json" if model_path is not None else None
    if src is None or not src.is_file():
        where = f"{src}" if src is not None else "no model folder given"
        raise GptOssError(f"the harmony vocabulary {VOCAB_FILE} is not in {cache_dir()} and cannot be derived: "
                          f"{where} is missing; download the model with its tokenizer.json "
                          "(gptoss-mac download) or put a verified o200k_base.tiktoken there")
    text = tiktoken_from_tokenizer_json(src)
    digest = hashlib.sha256(text).hexdigest()
    if digest != VOCAB_SHA256:
        raise GptOssError(f"{src}: the vocabulary derived from it has sha256 {digest}, not o200k_base's "
                          f"{VOCAB_SHA256}; this is not gpt-oss's tokenizer, download the model folder again")
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{VOCAB_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(text)
    tmp.replace(folder / VOCAB_FILE)  # atomic: a concurrent reader never sees half a file
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    return folder


def check_vocabulary(vocab_size: int, where) -> None:
    """Refuse a model whose vocabulary cannot hold the harmony chat tokens: their ids (up to 200012) would
    index past its embedding, which reads out of bounds (garbage, or a segmentation fault)."""
    highest = max(START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
    if vocab_size <= highest:
        raise ConfigError(f"{where}: vocab_size {vocab_size:,} cannot hold the harmony chat tokens (ids up to "
                          f"{highest:,}; gpt-oss has 201,088), so this model cannot chat; its raw forward pass "
                          "(gpt.model) still works")


_ENCODING = None


def encoding(model_path: Path | None = None):
    """openai-harmony's HarmonyEncoding for gpt-oss, loaded once per process from the offline vocabulary."""
    global _ENCODING
    if _ENCODING is None:
        ensure_vocab(model_path)
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding

        try:
            _ENCODING = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        except Exception as e:  # its Rust errors are plain exceptions
            raise GptOssError(f"openai-harmony could not load its encoding from "
                              f"{os.environ.get('TIKTOKEN_ENCODINGS_BASE')}: {e}") from None
    return _ENCODING


_TOKEN_BYTES: list[bytes] | None = None


def token_bytes() -> list[bytes]:
    """The bytes of every ordinary token (rank order), read once from the verified o200k_base.tiktoken."""
    global _TOKEN_BYTES
    if _TOKEN_BYTES is None:
        encoding()  # makes sure the verified file is in place
        path = Path(os.environ["TIKTOKEN_ENCODINGS_BASE"]) / VOCAB_FILE
        table = [b""] * N_ORDINARY
        for line in path.read_bytes().splitlines():
            tok, rank = line.split()
            table[int(rank)] = base64.b64decode(tok)
        _TOKEN_BYTES = table
    return _TOKEN_BYTES
