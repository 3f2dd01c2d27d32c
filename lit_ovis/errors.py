"""Errors with one-line messages that name the offending file or option and the fix.

Every class here is a `UserError`: the CLI prints its message as one `error:` line and exits 2 instead of
showing a traceback (lit_ovis.cli.lightning_cli.USER_ERRORS). `user_message` finds that line in the
wrappers other libraries put around it (jsonargparse, DataLoader workers, Lightning's own refusals), and
`OneLineArgumentParser` gives the argparse-based tools the same one-line errors."""

from __future__ import annotations

import argparse
import difflib
import sys


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


class CommandLineError(UserError):
    """A command line that does not parse: `message` is one line naming the option, `help_hint` says where
    the valid options are listed."""

    def __init__(self, message: str, help_hint: str = ""):
        super().__init__(message)
        self.help_hint = help_hint


WORKER_TRACEBACK = "Original Traceback (most recent call last)"
DATALOADER_TIMEOUT = "DataLoader timed out after"


def _last_line_of_worker_error(message: str) -> str:
    """A DataLoader worker's exception arrives as `Caught X in DataLoader worker process 0.\\nOriginal
    Traceback ...\\nmodule.X: <message>`: the user's line is the last one, without its class prefix."""
    last = message.strip().splitlines()[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and "Error" in head and " " not in head else last


def user_message(err: BaseException) -> str | None:
    """The one line to show for `err`, or None when it is a bug (let its traceback through).

    Recognises: a UserError anywhere in the cause/context chain (jsonargparse wraps errors raised in the
    data/model constructors in its own ValueError), the same raised in a DataLoader worker (re-raised with
    the worker's traceback in the message), Lightning's MisconfigurationException and a DataLoader worker
    timeout (`--data.worker_timeout_s`)."""
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, UserError):
            text = str(node)
            return _last_line_of_worker_error(text) if WORKER_TRACEBACK in text else text
        node = node.__cause__ or node.__context__
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # pragma: no cover - lightning is a hard dependency
        MisconfigurationException = ()  # noqa: N806
    first = (str(err).strip().splitlines() or [type(err).__name__])[0].strip()
    if MisconfigurationException and isinstance(err, MisconfigurationException):
        return f"{_trainer_option(first)}: Lightning refused the configuration: {first}"
    if isinstance(err, (ValueError, TypeError)) and _raised_in_lightning(err) and _trainer_option(first) != "--trainer":
        # Lightning checks some Trainer arguments only once the data is known (e.g. val_check_interval).
        return f"{_trainer_option(first)}: Lightning refused the configuration: {first}"
    if isinstance(err, RuntimeError) and str(err).startswith(DATALOADER_TIMEOUT):
        seconds = str(err)[len(DATALOADER_TIMEOUT):].split()[0]
        seconds = f"{float(seconds):g}" if seconds.replace(".", "", 1).isdigit() else seconds
        return (f"a data-loader worker produced no batch for {seconds} s (--data.worker_timeout_s); check that the "
                "dataset's storage is reachable, or raise the timeout")
    return None


def _raised_in_lightning(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "/lightning/" in tb.tb_frame.f_code.co_filename.replace("\\", "/")


def _trainer_option(message: str) -> str:
    """`--trainer.<arg>` for the first Trainer argument Lightning names in `message` (quoted like `max_steps`
    first, else a bare snake_case name like limit_train_batches), else `--trainer`."""
    import inspect
    import re

    from lightning.pytorch import Trainer

    params = inspect.signature(Trainer.__init__).parameters
    quoted = [w for w in re.findall(r"`(\w+)", message) if w in params]
    named = quoted or [w for w in re.findall(r"\b[a-z]+(?:_[a-z]+)+\b", message) if w in params]
    return f"--trainer.{named[0]}" if named else "--trainer"


def closest(word: str, choices, cutoff: float = 0.6) -> str | None:
    """The choice most similar to `word` (for `did you mean ...?`), or None."""
    match = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=cutoff)
    return match[0] if match else None


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse for the `lit-ovis` tools: a bad command line prints `error: ...` (with the closest valid
    option for a typo) and how to see --help, instead of the whole usage; exits 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()
            flag = next((a.split("=")[0] for a in unknown if a.startswith("-")), unknown[0] if unknown else "")
            options = [s for action in self._actions for s in action.option_strings]
            guess = closest(flag, options)
            message = f"{flag}: no such option" + (f" (did you mean {guess}?)" if guess else "")
        sys.stderr.write(f"error: {message}\nsee all options: {self.prog} --help\n")
        raise SystemExit(2)
