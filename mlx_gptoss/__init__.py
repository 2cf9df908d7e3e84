"""gpt-oss-20b / gpt-oss-120b on Apple silicon with MLX."""

from .api import GptOss, load
from .chat import Event, Session, Stats
from .harmony import Tool, tool_spec
from .config import GptOssConfig
from .errors import CheckpointError, ConfigError, GptOssError

__all__ = ["GptOss", "GptOssConfig", "load", "Session", "Event", "Stats", "Tool", "tool_spec", "GptOssError", "ConfigError", "CheckpointError"]
__version__ = "0.1.0"
