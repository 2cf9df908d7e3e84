"""benchmarks/RESULTS_offload.md: one section per offload benchmark script, each rewritten by its script."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS_offload.md"
HEAD = ("# Running where it does not fit: measured\n\n"
        "Written by benchmarks/offload_speed.py and benchmarks/offload_accuracy.py; each rewrites its own section.\n")
TITLES = {"speed": "Speed: resident vs expert streaming", "accuracy": "Accuracy of the 8-bit levers"}


def write_section(name: str, body: str, raw: str | None = None) -> None:
    text = RESULTS.read_text() if RESULTS.is_file() else HEAD
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n## {TITLES[name]}\n\n{body}\n{end}"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    if raw is not None:
        (RESULTS.parent / f"results_offload_{name}.json").write_text(raw + "\n")
