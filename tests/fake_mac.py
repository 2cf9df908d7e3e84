"""A simulated Mac: this process (and every Python process it starts) looks like Apple silicon to gptoss-mac,
so the code paths only a Mac takes run, and are timed, on Linux. The compute still happens on MLX's CPU.

What it patches: mx.metal.is_available / mx.is_available(mx.gpu) -> True, mx.default_device() -> mx.gpu,
mx.device_info() / mx.metal.device_info() -> an M3 Max's fields, mx.set_wired_limit (MLX's CPU backend has
no wired memory), sys.platform -> "darwin", platform.mac_ver() / platform.machine(), and a `sysctl`
executable first on PATH that answers like macOS (the real subprocess still runs, so it can be counted).
mx.fast.metal_kernel becomes one of KERNELS:
  "emulator"  tests/msl_emu runs the shipped Metal source (results, slow);
  "standin"   the same outputs computed with MLX's own ops (decode at CPU speed: timing the host side);
  "oneop"     each launch is one MLX op of the output's shape (zeros): the graph-building cost of a kernel
              call, for host-time benchmarks (wrong results: never for a test of results);
  "broken"    every launch fails like a Metal compile error;
  "abort"     every launch kills the process (a GPU fault on MLX < 0.32);
  "hang"      every launch sleeps (a kernel that never ends).
timings=(metal_s, builtin_s) replaces the self-test's clock with those seconds per layer (delay_s: each
measurement also sleeps, to hold a test open); case= the self-test's case (a small one by default).

Subprocesses cannot inherit monkeypatches: install() puts a sitecustomize.py on PYTHONPATH that installs the
same simulation in every Python the process starts (the CLI under test, the self-test's child), from the
spec in $GPTOSS_FAKE_MAC. Use `with simulated_mac(...)` or the `fake_mac` fixture (conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import mlx.core as mx

from mlx_gptoss import kernels, machine, metal_selftest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ENV = "GPTOSS_FAKE_MAC"
KERNELS = ("emulator", "standin", "oneop", "broken", "abort", "hang")
# mx.device_info() of an Apple M3 Max with 36 GB (the GPU working set is macOS's default, 3/4 of the memory).
M3_MAX = {"architecture": "applegpu_g15s", "device_name": "Apple M3 Max", "memory_size": 38654705664,
          "max_buffer_length": 28991029248, "max_recommended_working_set_size": 28991029248,
          "resource_limit": 499000}
SYSCTL = {"machdep.cpu.brand_string": "Apple M3 Max", "kern.osversion": "24A335", "hw.memsize": "38654705664",
          "iogpu.wired_limit_mb": "0", "hw.optional.arm64": "1"}
MACOS = ("15.0", ("", "", ""), "arm64")
# The self-test's case, small enough for the emulator and a CPU: gpt-oss's k = 4 at T = 1 and 4, 2 layers.
SMALL_CASE = {"hidden": 64, "intermediate": 32, "experts": 8, "experts_per_token": 4, "tokens": (1, 4), "seed": 1,
              "rounds": 2}


LAUNCHES: Counter = Counter()  # stand-in launches by kernel name, in this process
_REAL_MEASURE = metal_selftest.measure  # as shipped, before any simulation or test replaces it


def standin_kernel(name, input_names, output_names, source, header="", **_):
    """mx.fast.metal_kernel for the two shipped kernels, computing the same outputs with MLX's ops."""
    def launch(inputs, output_shapes, output_dtypes, **_):
        LAUNCHES[name] += 1
        if name == kernels.GATE_UP.name:
            x, w, scales, bias, ids, params = inputs
            limit, alpha = params.tolist()
            out = kernels._builtin_gate_up_swiglu(x, w, scales, bias, ids, limit, alpha)
        elif name == kernels.DOWN.name:
            h, w, scales, bias, ids, weights = inputs
            out = kernels._builtin_down(h, w, scales, bias, ids, weights)
        else:
            raise RuntimeError(f"[metal_kernel] the stand-in knows no kernel {name!r}")
        return [out.astype(output_dtypes[0]).reshape(output_shapes[0])]

    return launch


def _failing_kernel(how: str):
    def factory(**_):
        def launch(**__):
            if how == "abort":
                os.abort()
            if how == "hang":
                time.sleep(3600)
            raise RuntimeError("[metal::Device] Unable to build metal library from source\n"
                               "program_source:12:5: error: use of undeclared identifier 'acc'")
        return launch
    return factory


def _kernel_factory(kind: str):
    if kind == "emulator":
        from msl_emu import emulator

        return emulator.metal_kernel
    if kind == "standin":
        return standin_kernel
    if kind == "oneop":
        return lambda **_: lambda output_shapes, output_dtypes, **__: [mx.zeros(output_shapes[0], output_dtypes[0])]
    return _failing_kernel(kind)


def fake_clock(metal_s: float, builtin_s: float, delay_s: float = 0.0, log: str | None = None):
    """metal_selftest.measure replaced: fixed seconds, after checking it gets both backends' graph builders;
    each call also sleeps delay_s and appends a line to the file `log` (to count tests across processes)."""
    seen = []

    def measure(calls):
        assert set(calls) == {"metal", "builtin"}
        seen.append(calls)
        time.sleep(delay_s)
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
        return {"metal": metal_s, "builtin": builtin_s}

    measure.seen = seen
    return measure


def _sitecustomize_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"gptoss_fake_mac_{os.getuid()}"
    d.mkdir(exist_ok=True)
    text = ("import os\nif os.environ.get('GPTOSS_FAKE_MAC'):\n    import fake_mac\n    fake_mac.install_from_env()\n")
    f = d / "sitecustomize.py"
    if not f.is_file() or f.read_text() != text:
        tmp = d / f"sitecustomize.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, f)
    return d


def _sysctl_dir(answers: dict) -> Path:
    """A folder holding a `sysctl` that answers `sysctl -n NAME` like macOS (exit 1 for an unknown name)."""
    d = Path(tempfile.mkdtemp(prefix="fake_sysctl_"))
    cases = "".join(f"  {k}) echo '{v}' ;;\n" for k, v in answers.items())
    (d / "sysctl").write_text(f'#!/bin/sh\n[ "$1" = -n ] && shift\ncase "$1" in\n{cases}'
                              f'  *) echo "sysctl: unknown oid \'$1\'" >&2; exit 1 ;;\nesac\n')
    (d / "sysctl").chmod(0o755)
    return d


def _patches(spec: dict) -> list:
    info = dict(spec["device_info"])
    sysconfig.get_config_vars()  # read once under the real sys.platform (it names a Linux module), then cached
    import numpy.testing  # noqa: F401  (imports sysconfig's answers at import time)
    import psutil  # noqa: F401  (picks its platform module at import: Linux's, which is the one that works)
    import urllib.request  # noqa: F401  (imports macOS's _scproxy when first imported under sys.platform darwin)

    real_is_available = mx.is_available
    patches = [
        mock.patch.object(mx.metal, "is_available", lambda: True),
        mock.patch.object(mx, "is_available", lambda d=None: True if d is None or d == mx.gpu
                          else real_is_available(d)),
        mock.patch.object(mx, "default_device", lambda: mx.gpu),
        mock.patch.object(mx, "device_info", lambda *a: dict(info)),
        mock.patch.object(mx.metal, "device_info", lambda *a: dict(info)),
        mock.patch.object(mx, "set_wired_limit", lambda n: 0),
        mock.patch.object(mx.fast, "metal_kernel", _kernel_factory(spec["kernels"])),
        mock.patch.object(sys, "platform", "darwin"),
        mock.patch.object(platform, "mac_ver", lambda *a: MACOS),
        mock.patch.object(platform, "machine", lambda: "arm64"),
        mock.patch.object(metal_selftest, "CASE", dict(spec["case"], tokens=tuple(spec["case"]["tokens"]))),
    ]
    clock = fake_clock(*spec["timings"]) if spec.get("timings") else _REAL_MEASURE
    patches.append(mock.patch.object(metal_selftest, "measure", clock))
    if "timeout_s" in spec:
        patches.append(mock.patch.object(metal_selftest, "TIMEOUT_S", spec["timeout_s"]))
    machine.sysctl.cache_clear()
    kernels._built.clear()
    return patches


def _reset_state() -> None:
    metal_selftest.clear()
    machine.sysctl.cache_clear()
    kernels._built.clear()


@contextlib.contextmanager
def simulated_mac(kernels: str = "standin", timings: tuple | None = (1.0, 1.5), case: dict | None = None,
                  device_info: dict | None = None, sysctl: dict | None = None, timeout_s: float | None = None):
    """This process and the Python processes it starts run as on a Mac (module docstring). timings=None keeps
    the self-test's real clock."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    spec = {"kernels": kernels, "timings": list(timings) if timings else None, "case": case or SMALL_CASE,
            "device_info": device_info or M3_MAX}
    if timeout_s is not None:
        spec["timeout_s"] = timeout_s
    sysctl_bin = _sysctl_dir(sysctl or SYSCTL)
    env = {ENV: json.dumps(spec), "PATH": f"{sysctl_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(_sitecustomize_dir()), str(TESTS), str(ROOT),
                                          os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, sysctl_bin, ignore_errors=True)
        stack.enter_context(mock.patch.dict(os.environ, env))
        for p in _patches(spec):
            stack.enter_context(p)
        _reset_state()
        stack.callback(_reset_state)
        yield spec


def install_from_env() -> None:
    """sitecustomize's side: install the simulation described in $GPTOSS_FAKE_MAC for this whole process."""
    spec = json.loads(os.environ[ENV])
    for p in _patches(spec):
        p.start()
    _reset_state()


try:
    import pytest
except ImportError:  # a subprocess started without pytest installed needs only install_from_env
    pytest = None
else:
    @pytest.fixture
    def fake_mac(tmp_path, monkeypatch):
        """A simulated Mac (stand-in kernels 1.5x faster than MLX's ops by the self-test's clock, the small
        case) with its self-test cache in tmp_path; yields tmp_path. Import it into a test module to use it."""
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.setenv("MSL_EMU_CACHE", str(Path(tempfile.gettempdir()) / f"msl_emu_{os.getuid()}"))
        with simulated_mac():
            yield tmp_path
