"""What machine this is, in the words a bug report or a benchmark table needs (doctor and bench share it)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys


@functools.lru_cache(maxsize=None)  # one subprocess per name per process: nothing asked here changes while running
def sysctl(name: str) -> str | None:
    """macOS `sysctl -n NAME`, or None (not a Mac, unknown name)."""
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def chip(device_name: str | None = None) -> str:
    """'Apple M1 Pro' (with MLX's GPU name when it adds something), or the CPU's model name."""
    if sys.platform == "darwin":
        name = sysctl("machdep.cpu.brand_string") or "Apple silicon"
        return f"{name} ({device_name})" if device_name and device_name not in name else name
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def os_name() -> str:
    """'macOS 15.1 arm64' or 'Debian GNU/Linux 12 (bookworm), Linux 6.1.0 x86_64'."""
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]} {platform.machine()}"
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                pretty = line.split("=", 1)[1].strip().strip('"')
                return f"{pretty}, Linux {platform.release()} {platform.machine()}"
    except OSError:
        pass
    return f"{platform.system()} {platform.release()} {platform.machine()}"


def blas() -> str:
    """On Linux, whether a faster BLAS is preloaded into MLX's CPU backend (see the README)."""
    if sys.platform == "darwin":
        return "Accelerate"
    pre = os.environ.get("LD_PRELOAD", "")
    return f"LD_PRELOAD={pre}" if "blas" in pre.lower() else "bundled reference BLAS"
