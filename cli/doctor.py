"""`gptoss-mac doctor`: what a bug report needs, what is wrong, then a smoke test of the whole model path.

Each check is one row: ok, note (worth knowing, not broken) or FAIL. Any FAIL -> exit status 1.
`-m MODEL` also checks that checkpoint (mlx_gptoss.smoke.check_model): its weights and logits are finite.
`--report FILE` writes everything a kernel or speed bug report needs as one JSON file: the machine, every
row, the Metal kernels' self-test with its timings for every activation dtype, and a bench (pp512, tg128)
of a downloaded model with each MoE backend this machine has.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mlx_gptoss import machine

from . import options

console = Console()

OK, NOTE, FAIL, INFO = "ok", "note", "FAIL", ""
STYLE = {OK: "green", NOTE: "yellow", FAIL: "bold red", INFO: ""}
# Where Debian/Ubuntu's libopenblas0-pthread puts OpenBLAS (the README's LD_PRELOAD line).
OPENBLAS = f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libopenblas.so.0"
MATMUL_N = 512  # the BLAS probe: one fp32 MATMUL_N x MATMUL_N matmul, best of a few


@dataclass
class Row:
    what: str
    status: str
    detail: str


def doctor(
    smoke: bool = typer.Option(True, "--smoke/--no-smoke", help="Run the end-to-end test on a tiny random model."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write everything a kernel or speed bug "
                                          "report needs to this JSON file (self-test timings in every dtype, "
                                          "a bench of --model with each MoE backend)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Also check this model (a folder or a "
                                        "downloaded repo id): load it, scan its weights, one forward pass, every "
                                        "value finite. With --report: the model to bench [default: "
                                        "openai/gpt-oss-20b, skipped and said so when it is not on this machine]."),
    bench_prompt: int = typer.Option(512, "--bench-prompt", callback=options.positive("512"),
                                     help="With --report: prompt tokens of the bench (ppN)."),
    bench_gen: int = typer.Option(128, "--bench-gen", callback=options.positive("128"),
                                  help="With --report: generated tokens of the bench (tgN)."),
    bench_repetitions: int = typer.Option(3, "--bench-repetitions", callback=options.count("3"),
                                          help="With --report: timed repetitions."),
    bandwidth_bytes: int = typer.Option(1 << 30, "--bandwidth-bytes", hidden=True,
                                        help="With --report: buffer size of the bench's bandwidth measurement."),
) -> None:
    """Show the machine, MLX, memory, Metal kernels and cached models, then run a smoke test (and with -m,
    check a model's weights and logits)."""
    if report is not None:
        _check_writable(report)
    kernel_dtypes = _all_dtypes() if report is not None else None
    rows: list[Row] = []
    for probe in (system_rows, mlx_rows, memory_rows, lambda: kernel_rows(kernel_dtypes), harmony_rows, blas_rows,
                  cache_rows):
        try:
            rows += probe()
        except Exception as e:  # a broken probe is a finding, not a crash
            name = getattr(probe, "__name__", "probe").replace("_rows", "").replace("<lambda>", "kernels")
            rows.append(Row(name, FAIL, f"{type(e).__name__}: {e}"))
    if smoke:
        rows += smoke_rows()
    if model is not None:
        with console.status(f"checking {model}"):
            rows += model_rows(model)
    if report is not None:
        with console.status("writing the report (benchmarks take a while)"):
            data = build_report(rows, kernel_dtypes, model or "openai/gpt-oss-20b", bench_prompt, bench_gen,
                                bench_repetitions, bandwidth_bytes)
        report.write_text(json.dumps(data, indent=1, default=str))
        rows.append(Row("report", OK, f"written to {report}: attach it to the bug report"))
    table = Table(title="gptoss-mac doctor", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_column(overflow="fold")
    for r in rows:
        table.add_row(r.what, f"[{STYLE[r.status]}]{r.status}[/]" if r.status else "", r.detail)
    console.print(table)
    failed = list(dict.fromkeys(r.what for r in rows if r.status == FAIL))
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


def kernel_rows(dtypes=None) -> list[Row]:
    """The custom Metal MoE kernels: self-test (correct? faster?) with its timings on a Mac, or why not used."""
    import mlx.core as mx

    if not mx.metal.is_available():
        return [Row("Metal kernels", INFO, "not used: no Metal GPU; experts run on MLX's built-in mxfp4 ops "
                    "(mx.gather_qmm)")]
    from mlx_gptoss import metal_selftest

    rows = []
    for r in metal_selftest.kernel_status(dtypes):  # a test not yet run runs now, in a child process
        status = OK if r["enabled"] else NOTE if r["passed"] or r.get("busy") else FAIL
        speeds = "; ".join(f"{t}: metal {v['metal_s'] * 1e3:.3f} ms, MLX {v['builtin_s'] * 1e3:.3f} ms per layer"
                           for t, v in r["timings"].items())
        when = " (cached)" if r["cached"] else "" if r.get("busy") else " (tested now)"
        rows.append(Row(f"kernel {r['kernel']} ({r['dtype']})", status,
                        r["detail"] + (f" [{speeds}]" if speeds else "") + when))
    return rows


def _all_dtypes():
    from mlx_gptoss import metal_selftest

    return metal_selftest.DTYPES


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
    """On Linux the mlx-cpu wheel links a single-threaded reference BLAS: measure a matmul with it and, when
    OpenBLAS is installed, with OpenBLAS preloaded too, and say exactly that (no fixed speed-up claim)."""
    if sys.platform != "linux":
        return []
    here = _matmul_gflops()
    probe = f"fp32 {MATMUL_N}x{MATMUL_N} matmul"
    preload = os.environ.get("LD_PRELOAD", "")
    if "blas" in preload.lower():
        return [Row("BLAS", OK, f"{probe}: {here:.1f} GFLOP/s with LD_PRELOAD={preload}")]
    if not Path(OPENBLAS).is_file():
        return [Row("BLAS", NOTE, f"{probe}: {here:.1f} GFLOP/s with the mlx-cpu wheel's bundled reference BLAS. "
                    "OpenBLAS may speed up the float matmuls (attention, unembedding; not the mxfp4 experts): "
                    "apt install libopenblas0-pthread, then run doctor again to measure it here")]
    there = _preloaded_gflops(OPENBLAS)
    if there is None:
        return [Row("BLAS", NOTE, f"{probe}: {here:.1f} GFLOP/s bundled; the same with LD_PRELOAD={OPENBLAS} "
                    "could not be measured (the probe process failed)")]
    ratio = there / here
    advice = (f"; to use it, run with LD_PRELOAD={OPENBLAS} and measure the model itself with "
              "gptoss-mac bench, with and without it (only attention and unembedding use this BLAS)"
              if ratio > 1.2 else "")
    return [Row("BLAS", NOTE if ratio > 1.2 else OK,
                f"{probe}: {here:.1f} GFLOP/s bundled, {there:.1f} GFLOP/s with OpenBLAS preloaded, "
                f"{ratio:.1f}x on this matmul (measured now){advice}")]


def _preloaded_gflops(lib: str) -> float | None:
    """The same matmul probe in a fresh process with lib preloaded."""
    code = "from mlx_gptoss.cli.doctor import _matmul_gflops; print(_matmul_gflops())"
    try:
        p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, LD_PRELOAD=lib), capture_output=True,
                           text=True, timeout=300)
        return float(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


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


def model_rows(model: str) -> list[Row]:
    """`doctor -m MODEL`: the checkpoint itself (smoke.check_model), what chat's NaN error sends the user here for."""
    from mlx_gptoss import hub, smoke
    from mlx_gptoss.errors import GptOssError

    try:
        hub.resolve(model, allow_download=False)
    except GptOssError as e:  # not on this machine: nothing to check (--report's bench says it was skipped too)
        return [Row("model check", NOTE, f"not checked: {e}")]
    res = smoke.check_model(model)
    rows = [Row("model check", OK if passed else FAIL, f"{what}: {detail}" if detail else what)
            for what, passed, detail in res.checks]
    rows.append(Row("", INFO, f"model check took {res.seconds:.2f} s"))
    return rows


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _matmul_gflops(n: int = MATMUL_N, reps: int = 3) -> float:
    """Best of reps: the shared machine's noise only ever slows a run down."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    mx.eval(a @ a)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(a @ a)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# ---- --report --------------------------------------------------------------------------------------------

def _check_writable(path: Path) -> None:
    """Before anything runs: the report can be written there (tried, not guessed: root passes os.access
    checks on /proc, a read-only disk passes them too)."""
    from mlx_gptoss.errors import GptOssError

    if path.is_dir():
        raise GptOssError(f"--report {path}: is a folder; give a file name, e.g. {path / 'gptoss-report.json'}")
    if not path.parent.is_dir():
        raise GptOssError(f"--report {path}: the folder {path.parent} does not exist")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise GptOssError(f"--report {path}: cannot write there ({e.strerror}); choose another file") from None
    if not existed:
        path.unlink(missing_ok=True)


def build_report(rows: list[Row], kernel_dtypes, model: str, n_prompt: int, n_gen: int, repetitions: int,
                 bandwidth_bytes: int = 1 << 30) -> dict:
    """One JSON-ready dict: machine, doctor rows, kernel self-tests, bench with each backend."""
    import mlx.core as mx

    import mlx_gptoss
    from mlx_gptoss import bench, metal_selftest, selftest_record

    data = {"gptoss_mac": mlx_gptoss.__version__, "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(sys.argv), "machine": bench.machine_info(),
            "metal": {"available": mx.metal.is_available(),
                      "device_info": mx.device_info() if mx.metal.is_available() else None},
            "doctor": [asdict(r) for r in rows]}
    try:
        data["kernels"] = {"selftest_file": str(selftest_record.cache_file()),
                           "setup": metal_selftest.setup_key(),
                           "results": metal_selftest.kernel_status(kernel_dtypes)}
    except Exception as e:
        data["kernels"] = {"error": f"{type(e).__name__}: {e}"}
    data["bench"] = _report_bench(model, n_prompt, n_gen, repetitions, bandwidth_bytes)
    return data


def _report_bench(model: str, n_prompt: int, n_gen: int, repetitions: int, bandwidth_bytes: int) -> dict:
    """bench ppN/tgN with metal and builtin (builtin only, said so, without Metal); skipped without the model."""
    from mlx_gptoss import bench, hub

    try:
        hub.resolve(model, allow_download=False)  # a missing model is said at once, before any measurement
        return bench.run(model, n_prompt=str(n_prompt), n_gen=str(n_gen), repetitions=repetitions,
                         kernels="metal,builtin", bandwidth_bytes=bandwidth_bytes)
    except Exception as e:  # the model not downloaded, too big for this machine, ...
        return {"skipped": f"{type(e).__name__}: {e}"}
