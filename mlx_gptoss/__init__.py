"""gpt-oss-20b / gpt-oss-120b on Apple silicon with MLX."""

from pathlib import Path as _Path

# Installed, cli/ and metal/ live inside this package (mlx_gptoss.cli, mlx_gptoss.metal). In a source
# checkout they sit beside it; when this package is imported from the checkout itself (e.g. `python -m`
# run from the repository root), look for subpackages there too, so both layouts import the same way.
_root = _Path(__file__).resolve().parent.parent
if not _Path(__file__).with_name("cli").is_dir() and (_root / "cli" / "app.py").is_file() \
        and (_root / "pyproject.toml").is_file():
    __path__.append(str(_root))

from .api import GptOss, load
from .chat import Event, Session, Stats
from .harmony import Tool, tool_spec
from .config import GptOssConfig
from .errors import CheckpointError, ConfigError, GptOssError
from .memory import ContextLengthError, Plan
from . import metal_selftest as _metal_selftest  # noqa: F401  (registers the kernels' judge in kernel_gate)

__all__ = ["GptOss", "GptOssConfig", "load", "Session", "Event", "Stats", "Tool", "tool_spec", "GptOssError", "ConfigError", "CheckpointError",
           "ContextLengthError", "Plan"]
__version__ = "0.1.0"
