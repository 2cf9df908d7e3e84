"""The test run says which compilers the Metal-kernel emulator tests ran with (conftest.py), so a machine
without clang does not silently skip the clang half."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def emulator_run(path: str) -> str:
    r = subprocess.run([sys.executable, "-m", "pytest", str(TESTS / "test_msl_emulator.py"), "-q",
                        "-p", "no:cacheprovider", "-k", "half_and_bfloat"],
                       env=dict(os.environ, PATH=path, COLUMNS="200"), capture_output=True, text=True, timeout=300,
                       cwd=TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.skipif(not (shutil.which("g++") and shutil.which("clang++")), reason="needs g++ and clang++")
def test_the_run_reports_both_compilers():
    assert "Metal-kernel emulator tests passed with: g++ (1 test), clang++ (1 test)" in emulator_run(os.environ["PATH"])


@pytest.mark.skipif(not shutil.which("g++"), reason="needs g++")
def test_a_missing_clang_is_reported(tmp_path):
    """PATH without clang: the clang half does not run, and the summary says so and what to install."""
    for folder in os.environ["PATH"].split(os.pathsep):
        for f in Path(folder).glob("*") if Path(folder).is_dir() else ():
            if "clang" not in f.name and not (tmp_path / f.name).exists():
                (tmp_path / f.name).symlink_to(f)
    out = " ".join(emulator_run(str(tmp_path)).split())
    assert "Metal-kernel emulator tests passed with: g++ (1 test); clang++ not installed, so those tests did not " \
           "run (apt-get install g++ clang, as .ci/run does)" in out
