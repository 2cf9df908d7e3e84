"""Where a model lives: a local folder, or a Hugging Face repo id fetched into the hub cache.

Only the files that run the model are fetched: the root config, generation config, tokenizer files and
safetensors shards with their index. The repos' `original/` and `metal/` folders hold the same weights
again in other layouts, so everything below the root is excluded.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def snapshot(repo_id: str, *, local_only: bool = False, progress: Callable[[int], None] | None = None,
             **kwargs) -> str:
    """The local snapshot folder of repo_id, downloading what is missing (an interrupted download resumes).

    progress(n) is called with each batch of bytes written to disk, for a progress bar."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    check_repo_id(repo_id)
    if progress is not None:
        kwargs["tqdm_class"] = _progress_bar_class(progress)
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
            "connect to the internet, or run a model folder you already have: --model PATH"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise GptOssError(f"{repo_id}: download failed ({e}); run the same command again to resume") from None
    except Exception as e:  # the HTTP client's own errors (connection dropped mid-file, ...)
        raise GptOssError(f"{repo_id}: download failed ({type(e).__name__}: {e}); "
                          "run the same command again to resume") from None


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise GptOssError(f"{repo_id}: not a valid Hugging Face repo id ({e}); pass one like {DEFAULT_MODEL} "
                          "or a local folder") from None


def cached(repo_id: str) -> Path | None:
    """The complete cached snapshot of repo_id, or None; never touches the network."""
    try:
        return Path(snapshot(repo_id, local_only=True))
    except GptOssError:
        return None


def cache_dir() -> Path:
    """The hub cache folder (HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds folder (or would hold it: its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


@dataclass
class RemoteFile:
    name: str
    size: int
    cached: bool


@dataclass
class DownloadPlan:
    """What fetching repo_id involves: its files (root model files only), what is missing, the free disk."""

    repo_id: str
    files: list[RemoteFile]
    cache: Path
    free: int

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def needed(self) -> int:
        return sum(f.size for f in self.files if not f.cached)

    def check_disk(self, margin: int = 1 << 30) -> None:
        """Refuse before downloading anything when the missing files (+ margin) do not fit on the disk."""
        if self.needed + margin > self.free:
            raise GptOssError(
                f"{self.repo_id}: needs {gb(self.needed)} more on disk but only {gb(self.free)} is free in "
                f"{self.cache}; free some space or set HF_HOME to a folder on a larger disk"
            )


def plan_download(repo_id: str) -> DownloadPlan:
    """Ask the hub which files a download of repo_id fetches, their sizes and which are cached (a dry run)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import DryRunError, OfflineModeIsEnabled, RepositoryNotFoundError

    check_repo_id(repo_id)
    try:
        infos = snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS,
                                  dry_run=True, tqdm_class=_progress_bar_class(lambda n: None))
    except RepositoryNotFoundError:
        raise GptOssError(f"{repo_id}: no such model on the Hugging Face hub (or it is private)") from None
    except DryRunError as e:
        cause = e.__cause__
        if isinstance(cause, RepositoryNotFoundError):
            raise GptOssError(f"{repo_id}: no such model on the Hugging Face hub (or it is private)") from None
        if isinstance(cause, OfflineModeIsEnabled) or _offline():
            raise GptOssError(f"{repo_id}: not in the local cache and HF_HUB_OFFLINE is set; "
                              "unset HF_HUB_OFFLINE to download it") from None
        raise GptOssError(f"{repo_id}: cannot reach the Hugging Face hub; check the internet connection "
                          "and try again, or run a model folder you already have: --model PATH") from None
    except OSError as e:
        raise GptOssError(f"{repo_id}: cannot list the files on the Hugging Face hub ({e})") from None
    files = [RemoteFile(i.filename, i.file_size or 0, not i.will_download) for i in infos]
    cache = cache_dir()
    return DownloadPlan(repo_id, sorted(files, key=lambda f: f.name), cache, free_bytes(cache))


def partial_files(repo_id: str) -> set[Path]:
    """The unfinished downloads (`*.incomplete` blobs) of repo_id in the cache."""
    from huggingface_hub.file_download import repo_folder_name

    return set((cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs").glob("*.incomplete"))


def gb(n: int) -> str:
    """Bytes for people: 12.8 GB, 3.0 MB, 12 kB."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _progress_bar_class(progress: Callable[[int], None]):
    """A tqdm stand-in for snapshot_download(tqdm_class=) that reports written bytes to progress(n).

    snapshot_download makes three bars from it: files fetched, bytes received and bytes written
    ("Reconstructing"); only the last one counts, so resumed bytes (its `initial`) count too."""

    class Bar:
        def __init__(self, *args, desc: str = "", total=None, initial=0, **kwargs):
            self.counts = str(desc).startswith("Reconstructing") and kwargs.get("unit") == "B"
            self.n, self.total, self.format_dict = initial, total, {}

        def update(self, n=1):
            n = int(n or 0)
            self.n += n
            if self.counts and n:
                progress(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def refresh(self, *a, **k):
            pass

        close = set_description = set_description_str = set_postfix_str = refresh

    return Bar
