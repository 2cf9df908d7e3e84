"""`gptoss-mac download [MODEL]`: fetch a model's root files into the Hugging Face cache, with a progress bar.

The library (mlx_gptoss.hub) decides what to fetch and checks the disk; this module only renders.
Already cached: answered from the cache alone, no network. Interrupted: run it again, it resumes.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from mlx_gptoss import hub
from mlx_gptoss.config import GptOssConfig
from mlx_gptoss.errors import GptOssError

console = Console(stderr=True)


def download(
    model: str = typer.Argument(hub.DEFAULT_MODEL, help="Hugging Face repo id (openai/gpt-oss-20b, "
                                "openai/gpt-oss-120b, ...) or a local folder."),
) -> None:
    """Download a model's weights (only the files that run it) into the Hugging Face cache.

    Honours HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE. Run it again after an interruption to resume."""
    path = Path(model).expanduser()
    if path.exists() or hub.looks_like_path(model):
        folder = hub.resolve(model, allow_download=False)
        console.print(f"{folder} is a local folder; nothing to download.")
        _warn_if_not_gpt_oss(folder)
        return
    folder = hub.cached(model)
    if folder is not None:
        console.print(f"{model} is already downloaded ({hub.gb(folder_size(folder))}) in {folder}")
    else:
        folder = fetch(hub.plan_download(model))
    print(folder)  # stdout: the snapshot path alone, for scripts
    _warn_if_not_gpt_oss(folder)


def fetch(plan: hub.DownloadPlan) -> Path:
    """Check the disk, then download what plan says is missing, with a Rich progress bar."""
    have = plan.total - plan.needed
    resumed = f"; {hub.gb(have)} already here" if have else ""
    console.print(f"{plan.repo_id}: {len(plan.files)} files, {hub.gb(plan.needed)} to download into "
                  f"{plan.cache}{resumed}")
    plan.check_disk()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    before = hub.partial_files(plan.repo_id)
    result: dict = {}

    def run(bar, task):
        try:
            result["folder"] = Path(hub.snapshot(plan.repo_id, progress=lambda n: bar.advance(task, n)))
        except BaseException as e:  # handed to the main thread
            result["error"] = e

    # The try starts before the bar: a Ctrl-C as soon as the bar shows is an interrupted download too.
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(plan.repo_id, total=plan.needed or None)
            # The download runs in a thread so Ctrl-C answers at once: huggingface_hub's worker pool
            # would otherwise finish every file in flight (gigabytes) before the interrupt got through.
            worker = threading.Thread(target=run, args=(bar, task), daemon=True)
            worker.start()
            while worker.is_alive():
                worker.join(0.2)
            if "error" not in result:
                bar.update(task, completed=plan.needed)
    except KeyboardInterrupt:
        for f in hub.partial_files(plan.repo_id) - before:  # this run's unfinished files: never reused
            f.unlink(missing_ok=True)
        msg = "download interrupted; finished files are kept: run the same command again to continue\n"
        sys.stdout.flush()
        os.write(2, msg.encode())  # unbuffered: os._exit flushes nothing
        os._exit(130)  # not sys.exit: that would wait for the pool's threads
    if "error" in result:
        raise result["error"]
    folder = result["folder"]
    console.print(f"downloaded {plan.repo_id} to {folder}")
    return folder


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())  # follows the cache symlinks


def _warn_if_not_gpt_oss(folder: Path) -> None:
    try:
        GptOssConfig.from_file(folder / "config.json")
    except GptOssError as e:
        console.print(f"[yellow]warning:[/] {e}", highlight=False)
