"""Where a model lives: a local folder, or a Hugging Face repo id fetched into the hub cache.

Only the files that run the model are fetched: the root config, generation config, tokenizer files and
safetensors shards with their index. The repos' `original/` and `metal/` folders hold the same weights
again in other layouts, so everything below the root is excluded.
"""

from __future__ import annotations

from pathlib import Path

from .errors import GptOssError

DEFAULT_MODEL = "openai/gpt-oss-20b"
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt"]
IGNORE_PATTERNS = ["*/*"]  # nothing below the root: original/, metal/


def looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") != 1


def resolve(model: str, *, allow_download: bool = True) -> Path:
    """A local folder holding the checkpoint; downloads a repo id unless it is already cached."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise GptOssError(f"{p}: is a file; pass the folder that holds config.json and the *.safetensors")
        return p
    if looks_like_path(model):
        raise GptOssError(f"{model}: no such folder, and not a Hugging Face repo id (like {DEFAULT_MODEL})")
    return Path(snapshot(model, local_only=not allow_download))


def snapshot(repo_id: str, *, local_only: bool = False, **kwargs) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS,
                                 local_files_only=local_only, **kwargs)
    except RepositoryNotFoundError:
        raise GptOssError(f"{repo_id}: no such model on the Hugging Face hub (or it is private)") from None
    except LocalEntryNotFoundError:
        if local_only:
            raise GptOssError(f"{repo_id}: not downloaded yet; run `gptoss-mac download {repo_id}`") from None
        raise GptOssError(
            f"{repo_id}: cannot reach the Hugging Face hub and the model is not in the local cache; "
            "connect to the internet or pass a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise GptOssError(f"{repo_id}: download failed ({e})") from None
