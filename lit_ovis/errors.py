"""Errors with one-line messages that name the offending file or option and the fix."""


class ConfigError(ValueError):
    """A configuration that cannot work (raised before any GPU work)."""


class DataError(ValueError):
    """Input data that cannot be read."""


class CheckpointError(RuntimeError):
    """A checkpoint or weight file that is missing, corrupt or does not match the model."""
