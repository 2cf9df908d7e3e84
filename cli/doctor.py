"""`gptoss-mac doctor`: what a bug report needs, what is wrong, then a smoke test of the whole model path.

Each check is one row: ok, note (worth knowing, not broken) or FAIL. Any FAIL -> exit status 1.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.table import Table

from mlx_gptoss import machine

console = Console()

OK, NOTE, FAIL, INFO = "ok", "note", "FAIL", ""
STYLE = {OK: "green", NOTE: "yellow", FAIL: "bold red", INFO: ""}
# The reference BLAS of the mlx-cpu wheel does ~6 GFLOP/s here; OpenBLAS ~50x more (DESIGN.md).
FAST_BLAS_GFLOPS = 30


@dataclass
class Row:
    what: str
    status: str
    detail: str


def doctor(
    smoke: bool = typer.Option(True, "--smoke/--no-smoke", help="Run the end-to-end test on a tiny random model."),
) -> None:
    """Show the machine, MLX, memory, Metal kernels and cached models, then run a smoke test."""
    rows: list[Row] = []
    for probe in (system_rows, mlx_rows, memory_rows, kernel_rows, harmony_rows, blas_rows, cache_rows):
        try:
            rows += probe()
        except Exception as e:  # a broken probe is a finding, not a crash
            rows.append(Row(probe.__name__.replace("_rows", ""), FAIL, f"{type(e).__name__}: {e}"))
    if smoke:
        rows += smoke_rows()
    table = Table(title="gptoss-mac doctor", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_column(overflow="fold")
    for r in rows:
        table.add_row(r.what, f"[{STYLE[r.status]}]{r.status}[/]" if r.status else "", r.detail)
    console.print(table)
    failed = [r.what for r in rows if r.status == FAIL]
    if failed:
        console.print(f"[bold red]broken:[/] {', '.join(failed)}", highlight=False)
        raise typer.Exit(1)
    console.print("[green]everything works.[/]")


def system_rows() -> list[Row]:
    import mlx_gptoss

    return [
        Row("gptoss-mac", INFO, f"{mlx_gptoss.__version__} (Python {platform.python_version()})"),
        Row("OS", INFO, machine.os_name()),
        Row("chip", INFO, f"{machine.chip()}, {os.cpu_count()} cores"),
    ]


def mlx_rows() -> list[Row]:
    import mlx.core as mx

    rows = [Row("MLX", INFO, mx.__version__)]
    if mx.metal.is_available():
        rows.append(Row("backend", OK, f"Metal GPU ({mx.device_info().get('device_name', 'Apple GPU')})"))
    elif sys.platform == "darwin":
        rows.append(Row("backend", FAIL, "MLX sees no Metal GPU on this Mac: it runs on the CPU, ~10-50x slower; "
                        "reinstall mlx in a native arm64 Python (not under Rosetta)"))
    else:
        rows.append(Row("backend", NOTE, f"CPU: MLX has no GPU backend on {platform.system()}; "
                        "correct but slow"))
    return rows


def memory_rows() -> list[Row]:
    import mlx.core as mx
    import psutil

    vm = psutil.virtual_memory()
    rows = [Row("memory", INFO, f"{_gb(vm.total)} total, {_gb(vm.available)} available")]
    if mx.metal.is_available():
        info = mx.device_info()
        limit = info.get("max_recommended_working_set_size")
        wired = machine.sysctl("iogpu.wired_limit_mb")
        extra = f"; iogpu.wired_limit_mb={wired}" if wired not in (None, "0") else " (macOS default)"
        rows.append(Row("GPU working set", INFO, f"{_gb(limit) if limit else 'unknown'} recommended{extra}"))
    else:
        rows.append(Row("GPU working set", INFO, "n/a on the CPU backend: the budget is available RAM"))
    return rows


def kernel_rows() -> list[Row]:
    """The custom Metal MoE kernels: self-test results on a Mac, or why they are not used."""
    import mlx.core as mx

    from mlx_gptoss import kernels

    if not mx.metal.is_available():
        return [Row("Metal kernels", INFO, "not used: no Metal GPU; experts run on MLX's built-in mxfp4 ops "
                    "(mx.gather_qmm)")]
    status = getattr(kernels, "self_test", None)
    if status is None:
        return [Row("Metal kernels", NOTE, "this build has no custom kernels; MLX's built-in mxfp4 ops are used")]
    results = status()  # {kernel name: (passed, detail)}
    return [Row(f"kernel {name}", OK if passed else FAIL, detail) for name, (passed, detail) in results.items()]


def harmony_rows() -> list[Row]:
    """openai-harmony and its o200k vocabulary, which chat derives offline from the model's tokenizer.json."""
    import hashlib
    from importlib.metadata import version

    from mlx_gptoss import harmony

    import openai_harmony  # noqa: F401  (a broken install fails here)

    f = harmony.cache_dir() / harmony.VOCAB_FILE
    if f.is_file() and hashlib.sha256(f.read_bytes()).hexdigest() == harmony.VOCAB_SHA256:
        vocab = f"vocabulary verified in {f.parent}"
    elif f.is_file():
        return [Row("harmony", FAIL, f"{f} is corrupt (wrong sha256); delete it, the next chat derives it again")]
    else:
        vocab = "its vocabulary is derived from the model's tokenizer.json on the first chat"
    return [Row("harmony", OK, f"openai-harmony {version('openai-harmony')}; {vocab}")]


def blas_rows() -> list[Row]:
    """On Linux the mlx-cpu wheel links a single-threaded reference BLAS; OpenBLAS preloaded is ~50x faster."""
    if sys.platform != "linux":
        return []
    gflops = _matmul_gflops()
    if gflops >= FAST_BLAS_GFLOPS:
        return [Row("BLAS", OK, f"fp32 matmul {gflops:.0f} GFLOP/s")]
    lib = f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libopenblas.so.0"
    return [Row("BLAS", NOTE, f"fp32 matmul {gflops:.0f} GFLOP/s: the mlx-cpu wheel links a single-threaded "
                f"reference BLAS. ~50x faster: apt install libopenblas0-pthread, then run with LD_PRELOAD={lib}")]


def cache_rows() -> list[Row]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from mlx_gptoss import hub

    try:
        info = scan_cache_dir(hub.cache_dir())
    except CacheNotFound:
        return [Row("cached models", INFO, f"none ({hub.cache_dir()} does not exist)")]
    models = sorted((r for r in info.repos if r.repo_type == "model"), key=lambda r: r.repo_id)
    if not models:
        return [Row("cached models", INFO, f"none in {hub.cache_dir()}")]
    rows = [Row("cached models", INFO, str(hub.cache_dir()))]
    for r in models:
        mark = "" if "gpt-oss" in r.repo_id.lower() else " (not gpt-oss)"
        rows.append(Row("", INFO, f"{r.repo_id}: {r.size_on_disk_str}{mark}"))
    for w in info.warnings:
        rows.append(Row("cache warning", NOTE, str(w)))
    return rows


def smoke_rows() -> list[Row]:
    from mlx_gptoss import smoke

    res = smoke.run()
    rows = [Row("smoke test", OK if passed else FAIL, f"{what}: {detail}" if detail else what)
            for what, passed, detail in res.checks]
    rows.append(Row("", INFO, f"smoke test took {res.seconds:.2f} s"))
    return rows


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _matmul_gflops(n: int = 512, reps: int = 3) -> float:
    import mlx.core as mx

    a = mx.random.normal((n, n))
    mx.eval(a @ a)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ a)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
