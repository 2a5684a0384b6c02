"""Errors that are the user's to fix: the CLI prints their message, without a traceback."""


class WarpRayError(Exception):
    """Bad input: the message names what is wrong (file, key, tensor) and what is allowed."""


class ConfigError(WarpRayError):
    """An invalid configuration value or an unknown key."""


class MergeError(WarpRayError):
    """Merge inputs that do not fit together (keys, shapes, dtypes) or invalid merge weights."""


class CheckpointError(WarpRayError):
    """A model folder that is missing, not a Hugging Face folder, or has unreadable weights."""


class StartupError(WarpRayError):
    """A component that failed to start in a way a retry would repeat (an engine that refuses its
    config, a model that does not load): the message names the component, the cause and its log."""


class TooFewLearners(WarpRayError):
    """Fewer learners than learners.min could be placed on the cluster, or ended an iteration with
    a usable policy."""


class NonFiniteError(Exception):
    """NaN or Inf in a learner's rewards or weights: that learner's policy is left out of the merge."""
