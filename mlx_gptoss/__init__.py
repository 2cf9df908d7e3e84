"""gpt-oss-20b / gpt-oss-120b on Apple silicon with MLX."""

from .api import GptOss, load
from .config import GptOssConfig
from .errors import CheckpointError, ConfigError, GptOssError

__all__ = ["GptOss", "GptOssConfig", "load", "GptOssError", "ConfigError", "CheckpointError"]
__version__ = "0.1.0"
