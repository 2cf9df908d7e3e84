"""`gptoss-mac doctor`: the Metal kernel rows with their measured speeds, the BLAS row saying only what it
measured, and `--report FILE`, one JSON file with everything a kernel or speed bug report needs."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from mlx_gptoss import metal_selftest
from mlx_gptoss.cli import doctor
from mlx_gptoss.cli.app import app
from mlx_gptoss.errors import GptOssError


def invoke(*args):
    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    if r.exception is not None and not isinstance(r.exception, (SystemExit, GptOssError)):
        raise r.exception
    return r


def test_kernel_rows_show_verdict_and_measured_speeds(monkeypatch):
    """On a Mac: enabled -> ok, correct but slower -> note, failed -> FAIL (doctor exits 1); timings shown."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    timed = {"T=1": {"metal_s": 0.0004, "builtin_s": 0.0006}}
    monkeypatch.setattr(metal_selftest, "kernel_status", lambda dtypes=None: [
        {"kernel": "moe_gate_up_swiglu", "dtype": "bfloat16", "passed": True, "enabled": True,
         "detail": "matches; faster (1.50x at T=1): used by auto", "timings": timed, "cached": True},
        {"kernel": "moe_down", "dtype": "bfloat16", "passed": True, "enabled": False,
         "detail": "matches; not faster (0.90x at T=1)", "timings": timed, "cached": False},
        {"kernel": "moe_down", "dtype": "float16", "passed": False, "enabled": False,
         "detail": "RuntimeError: compile error: unknown type 'bfloat'", "timings": {}, "cached": False}])
    rows = doctor.kernel_rows()
    assert [(r.what, r.status) for r in rows] == [("kernel moe_gate_up_swiglu (bfloat16)", doctor.OK),
                                                  ("kernel moe_down (bfloat16)", doctor.NOTE),
                                                  ("kernel moe_down (float16)", doctor.FAIL)]
    assert "T=1: metal 0.400 ms, MLX 0.600 ms per layer" in rows[0].detail and "(cached)" in rows[0].detail
    assert rows[1].detail.endswith("(tested now)")
    assert "compile error" in rows[2].detail


def test_kernel_rows_without_metal_say_why():
    if mx.metal.is_available():
        pytest.skip("this machine has Metal")
    (row,) = doctor.kernel_rows()
    assert row.what == "Metal kernels" and "no Metal GPU" in row.detail


@pytest.mark.skipif(doctor.sys.platform != "linux", reason="the BLAS probe is for MLX's Linux CPU wheel")
def test_blas_row_reports_what_it_measured(monkeypatch, tmp_path):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(doctor, "_matmul_gflops", lambda: 6.0)
    lib = tmp_path / "libopenblas.so.0"
    monkeypatch.setattr(doctor, "OPENBLAS", str(lib))
    (row,) = doctor.blas_rows()  # not installed: says so, claims nothing
    assert "6.0 GFLOP/s" in row.detail and not re.search(r"\d\s*x\b", row.detail)  # no speed-up claimed
    assert "run doctor again to measure" in row.detail
    lib.write_bytes(b"")
    monkeypatch.setattr(doctor, "_preloaded_gflops", lambda path: 186.0 if path == str(lib) else None)
    (row,) = doctor.blas_rows()
    assert row.status == doctor.NOTE
    assert "6.0 GFLOP/s bundled, 186.0 GFLOP/s with OpenBLAS preloaded, 31.0x on this matmul (measured now)" in row.detail
    assert "50x" not in row.detail and "gptoss-mac bench" in row.detail
    monkeypatch.setattr(doctor, "_preloaded_gflops", lambda path: 6.3)
    (row,) = doctor.blas_rows()  # no gain measured: no advice to preload
    assert row.status == doctor.OK and "1.1x on this matmul" in row.detail and "LD_PRELOAD=" not in row.detail
    monkeypatch.setenv("LD_PRELOAD", "/opt/libopenblas.so")
    (row,) = doctor.blas_rows()
    assert row.status == doctor.OK and "with LD_PRELOAD=/opt/libopenblas.so" in row.detail


@pytest.mark.skipif(doctor.sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_preloaded_probe_runs_in_a_fresh_process(tmp_path):
    """The real probe: a new Python with LD_PRELOAD set (an empty file: ld.so ignores it) measures the matmul."""
    empty = tmp_path / "libnothing.so"
    empty.write_bytes(b"")
    assert doctor._preloaded_gflops(str(empty)) > 0


def test_report_is_one_json_file_with_everything(tiny_ckpt, tmp_path):
    out = tmp_path / "report.json"
    r = invoke("doctor", "--no-smoke", "--report", str(out), "--model", str(tiny_ckpt), "--bench-prompt", "16",
               "--bench-gen", "4", "--bench-repetitions", "1", "--bandwidth-bytes", str(1 << 22))
    assert r.exit_code == 0, r.output
    assert f"written to {out}" in r.output
    data = json.loads(out.read_text())
    assert {"gptoss_mac", "created", "machine", "metal", "doctor", "kernels", "bench"} <= set(data)
    assert data["machine"]["mlx_version"] == mx.__version__ and data["machine"]["chip"]
    assert any(row["what"] == "BLAS" for row in data["doctor"]) or doctor.sys.platform != "linux"
    kernels = data["kernels"]["results"]
    assert {(k["kernel"], k["dtype"]) for k in kernels} == {
        (kernel, dtype) for kernel in ("moe_gate_up_swiglu", "moe_down") for dtype in ("float32", "float16", "bfloat16")}
    bench = data["bench"]
    tests = [(x["test"], x["kernels"]) for x in bench["results"]]
    if mx.metal.is_available():
        assert tests == [("pp16", "metal"), ("tg4", "metal"), ("pp16", "builtin"), ("tg4", "builtin")]
        assert [c["test"] for c in bench["comparison"]] == ["pp16", "tg4"]
    else:
        assert tests == [("pp16", "builtin"), ("tg4", "builtin")]
        assert all(not k["enabled"] and "no Metal GPU" in k["detail"] for k in kernels)
        assert "no Metal GPU" in bench["notes"][0]


def test_report_without_the_model_says_the_bench_was_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "r.json"
    r = invoke("doctor", "--no-smoke", "--report", str(out), "--model", str(tmp_path / "no-such-model"))
    assert r.exit_code == 0, r.output
    assert "no-such-model" in json.loads(out.read_text())["bench"]["skipped"]


@pytest.mark.parametrize("where,message", [("dir", "is a folder"), ("missing/x.json", "does not exist")])
def test_report_path_errors_are_one_line(tmp_path, where, message):
    target = tmp_path if where == "dir" else tmp_path / where
    r = invoke("doctor", "--no-smoke", "--report", str(target))
    assert r.exit_code != 0 and isinstance(r.exception, GptOssError) and message in str(r.exception)


@pytest.mark.skipif(not doctor.sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_an_unwritable_report_path_is_one_line_before_anything_runs():
    """/proc lets nobody create files, not even root, whom os.access() says yes to: the path is tried."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mlx_gptoss.cli.app", "doctor", "--report", "/proc/r.json"],
                       capture_output=True, text=True, timeout=120, env={**doctor.os.environ, "COLUMNS": "300"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: --report /proc/r.json: cannot write there (No such file or directory); choose another file"]
    assert r.stdout == ""  # nothing ran: no table, no smoke test


def test_doctor_m_fails_on_a_checkpoint_with_nan_weights(tmp_path):
    """chat's NaN error sends the user to `doctor -m MODEL`: it must find what chat found, and exit 1."""
    from scripted_checkpoint import random_real_vocab_model

    gpt = random_real_vocab_model(tmp_path / "nan", layers=2, seed=4, nan="model.norm.weight")
    r = invoke("doctor", "--no-smoke", "-m", str(gpt.path))
    assert r.exit_code == 1, r.output
    out = " ".join(r.output.split())
    assert "model check FAIL weights: no NaN or infinity: 1 tensor with NaN or infinity: model.norm.weight" in out
    assert "model check FAIL forward pass: finite logits: the logits hold NaN" in out
    assert "broken: model check" in out and "everything works" not in out


def test_doctor_m_passes_a_good_checkpoint(tiny_ckpt):
    r = invoke("doctor", "--no-smoke", "-m", str(tiny_ckpt))
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "model check ok weights: no NaN or infinity: every tensor checked" in out
    assert "model check ok forward pass: finite logits: 16 tokens" in out and "everything works" in out
