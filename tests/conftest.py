"""Shared fixtures (tiny checkpoints in the hub layout, written once per session) and the run's summary of
which C++ compilers the Metal-kernel emulator tests ran with (clang is optional: its half is otherwise absent)."""

from __future__ import annotations

import os
from collections import Counter

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

from tiny_checkpoint import hub_config, random_weights, write_hub_checkpoint  # noqa: E402

EMULATOR_COMPILERS = ("g++", "clang++")  # tests/msl_emu compiles every kernel with each one installed
EMULATOR_MODULES = ("test_kernels_emulated.py", "test_msl_emulator.py")
_compiled_with: Counter = Counter()
_emulator_selected: list[bool] = []


@pytest.fixture(scope="session")
def tiny_cfg() -> dict:
    return hub_config()


@pytest.fixture(scope="session")
def tiny_weights(tiny_cfg) -> dict:
    return random_weights(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_cfg, tiny_weights):
    """A 4-layer, 8-expert MXFP4 checkpoint (sliding window 8) in the hub layout, two shards + index."""
    return write_hub_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", tiny_cfg, tiny_weights)


def pytest_collection_modifyitems(items):
    _emulator_selected[:] = [any(item.path.name in EMULATOR_MODULES for item in items)]


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed and "[" in report.nodeid:
        cxx = report.nodeid.rsplit("[", 1)[1].rstrip("]").split("-")
        for c in EMULATOR_COMPILERS:
            if c in cxx:
                _compiled_with[c] += 1


def pytest_terminal_summary(terminalreporter):
    """One line: which compilers the kernel-emulator tests passed with, and what a missing one means."""
    import shutil

    if not any(_emulator_selected):
        return  # no emulator test was selected
    ran = ", ".join(f"{c} ({n} test{'s' if n != 1 else ''})" for c, n in _compiled_with.items()) or "none"
    missing = [c for c in EMULATOR_COMPILERS if not shutil.which(c)]
    line = f"Metal-kernel emulator tests passed with: {ran}"
    if missing:
        line += (f"; {' and '.join(missing)} not installed, so those tests did not run "
                 "(apt-get install g++ clang, as .ci/run does)")
    terminalreporter.write_sep("-", line, yellow=bool(missing), green=not missing)
