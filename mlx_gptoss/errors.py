"""One error type per thing a user can get wrong; each message names the file, tensor or value at fault."""


class GptOssError(Exception):
    """Base class: the CLI prints these as one sentence, never as a traceback."""


class ConfigError(GptOssError):
    """config.json is missing, unreadable, of another model type, or has an invalid field."""


class CheckpointError(GptOssError):
    """A safetensors file or tensor is missing, truncated, corrupt, or of the wrong shape or dtype."""
