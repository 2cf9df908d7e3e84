"""gpt-oss-20b / gpt-oss-120b on Apple silicon with MLX.

The public names below are imported on first use (PEP 562): `import mlx_gptoss` (and so every `gptoss-mac`
command, even `--help`) costs no MLX / mlx-lm / transformers import until a name that needs them is touched.
"""

from importlib import import_module as _import_module
from pathlib import Path as _Path

# Installed, cli/ and metal/ live inside this package (mlx_gptoss.cli, mlx_gptoss.metal). In a source
# checkout they sit beside it; when this package is imported from the checkout itself (e.g. `python -m`
# run from the repository root), look for subpackages there too, so both layouts import the same way.
_root = _Path(__file__).resolve().parent.parent
if not _Path(__file__).with_name("cli").is_dir() and (_root / "cli" / "app.py").is_file() \
        and (_root / "pyproject.toml").is_file():
    __path__.append(str(_root))

from .errors import CheckpointError, ConfigError, GptOssError  # noqa: E402  (light: no MLX)

_LAZY = {"GptOss": "api", "load": "api", "Event": "chat", "Session": "chat", "Stats": "chat", "Tool": "harmony",
         "tool_spec": "harmony", "GptOssConfig": "config", "ContextLengthError": "memory", "Plan": "memory"}

__all__ = ["GptOss", "GptOssConfig", "load", "Session", "Event", "Stats", "Tool", "tool_spec", "GptOssError",
           "ConfigError", "CheckpointError", "ContextLengthError", "Plan"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mlx_gptoss' has no attribute {name!r}")
    value = getattr(_import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
