"""Errors with one-line messages that name the offending file or option and the fix.

Every class here is a `UserError`: the CLI prints its message as one `error:` line and exits 2 instead of
showing a traceback (lit_ovis.cli.lightning_cli.USER_ERRORS)."""


class UserError(Exception):
    """Base of the errors a user can fix from the message alone."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot work (raised before any GPU work)."""


class DataError(UserError, ValueError):
    """Input data that cannot be read."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or weight file that is missing, corrupt, does not match the model, or cannot be written."""


class NonFiniteError(UserError, RuntimeError):
    """Training stopped after too many consecutive steps with a NaN/Inf loss or gradient."""
