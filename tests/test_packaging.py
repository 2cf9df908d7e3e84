"""The installed distribution: one package, with cli/ and metal/ inside it, and the console script."""

from __future__ import annotations

import importlib.resources
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path


def test_cli_and_metal_install_inside_the_package():
    assert importlib.util.find_spec("mlx_gptoss.cli.app") is not None
    assert importlib.util.find_spec("cli") is None, "a generic top-level `cli` module was installed"
    assert importlib.util.find_spec("metal") is None, "a generic top-level `metal` module was installed"
    metal = importlib.resources.files("mlx_gptoss.metal")
    assert metal.is_dir()


def test_console_script_runs():
    # the script installed beside this interpreter (the venv may not be activated)
    exe = shutil.which("gptoss-mac", path=str(Path(sys.executable).parent))
    assert exe, "the gptoss-mac console script is not on PATH"
    out = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("gptoss-mac "), out.stderr


def test_every_subpackage_is_in_the_distribution():
    """pyproject lists the packages by hand (cli/ and metal/ are mapped): a new subpackage left out of that
    list would work from a checkout and be missing from a real install."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"mlx_gptoss." + ".".join(d.relative_to(root / "mlx_gptoss").parts)
             for d in (root / "mlx_gptoss").rglob("*") if (d / "__init__.py").is_file()}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
