"""Errors that are the user's to fix: the CLI prints their message, without a traceback."""


class WarpRayError(Exception):
    """Bad input: the message names what is wrong (file, key, tensor) and what is allowed."""


class ConfigError(WarpRayError):
    """An invalid configuration value or an unknown key."""


class MergeError(WarpRayError):
    """Merge inputs that do not fit together (keys, shapes, dtypes) or invalid merge weights."""


class CheckpointError(WarpRayError):
    """A model folder that is missing, not a Hugging Face folder, or has unreadable weights."""
