"""LightningCLI for every stage: `python main.py fit --config configs/sft.yaml [--any.key value]`.

The stage is chosen by the config's `model.class_path`. A rerun of the same command resumes from the
newest complete checkpoint (`fit --ckpt_path` defaults to `last`; `--ckpt_path null` starts fresh), and a
restored checkpoint's backbone architecture is the one built. `--trainer.default_root_dir` holds all of a run's
outputs: `logger: true` is TensorBoard in `<root>/tb` (sample grids in `<root>/tb/samples`), and a
ModelCheckpoint without `dirpath` writes `<root>/checkpoints`.
Config checks that can fail run before any model is built. Every config dataclass field's docstring is its
`--help` text, and `--help` after a `--config` also lists the options of the model and data classes it selects.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_ovis.errors import CommandLineError, UserError, user_message
from lit_ovis.files import is_remote

# UserError: ConfigError, DataError, CheckpointError, NonFiniteError, CommandLineError. FileNotFoundError: a
# data path that does not exist deserves one line, not a traceback.
USER_ERRORS = (UserError, FileNotFoundError)
HELP_FLAGS = ("-h", "--help")

# The string literal under a dataclass field is its --help text (as litgpt's and torchtitan's configs do).
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class ParseFailure(Exception):
    """jsonargparse's error for a command line, raised instead of printing the usage and exiting; `run`
    turns it into one line (lit_ovis.cli.parse_errors)."""

    def __init__(self, message: str, parser):
        super().__init__(message)
        self.message, self.parser = message, parser


class OvisArgumentParser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None):
        # jsonargparse also calls error() inside its own attempts (exit_on_error off) and catches what it
        # raises there; only the final, user-facing error becomes a ParseFailure.
        if not self.exit_on_error:
            return super().error(message, ex)
        raise ParseFailure(message, getattr(ex, "subcommand_parser", None) or self)


class OvisCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_class", OvisArgumentParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.precision": "32-true"})

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        # `ckpt_path` is added here (after add_arguments_to_parser), so its default can only be set here. A
        # default of "last" (not None) is what tells "the user said nothing" apart from `--ckpt_path null`.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.set_defaults({"ckpt_path": "last"})
        return parser

    def _parse_ckpt_path(self) -> None:
        """Check an explicit --ckpt_path right after parsing (one line if missing or corrupt), and do not
        merge its hyper-parameters into the config as LightningCLI would: that reads the whole file
        (a full-state single-file checkpoint, tens of GB, on every rank) and silently overrides the config
        and command line, unlike a rerun's default `last`. The config is the single source of settings."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path and path not in ("last", "best", "hpc", "registry") and not is_remote(str(path)):
            from lit_ovis.checkpoints import check_readable

            check_readable(path)

    def before_instantiate_classes(self) -> None:
        from lit_ovis.preflight import check_config

        sub = self.config.get(self.subcommand) if self.subcommand else self.config
        check_config(sub, subcommand=self.subcommand)

    def _instantiate_trainer(self, config, callbacks):
        # Step-budgeted runs: show `step 120/300` rather than Lightning's `Epoch 9/-2` (max_epochs - 1 of -1), as a
        # rich bar on a terminal and as plain lines when stdout is a file (redirected logs, SLURM), where a live
        # bar prints nothing until the run ends.
        from lightning.pytorch.callbacks import ProgressBar

        from callbacks.progress import progress_for_stdout

        configured = config.get("callbacks") or []
        given = (configured if isinstance(configured, list) else [configured]) + list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, progress_for_stdout()]
        if config.get("logger") in (None, True):
            config = {**config, "logger": run_logger(run_root(config))}
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from lit_ovis.checkpoint_io import AtomicCheckpointIO

        # Never lose the last good checkpoint to a kill or a full disk mid-write.
        if type(getattr(trainer.strategy, "checkpoint_io", None)) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        place_checkpoints(trainer)
        if any(getattr(cb, "save_last", False) for cb in trainer.checkpoint_callbacks):
            from callbacks.final_checkpoint import FinalCheckpoint

            trainer.callbacks.append(FinalCheckpoint())  # `last` holds the final step, whatever max_steps is
        return trainer

    def _resolve_ckpt_path(self) -> None:
        """`last` -> the newest complete checkpoint of this run (or None: fresh start).

        LightningCLI passes `self.config_init[subcommand]` (not `self.config`) to `trainer.fit`, so the
        resolved path goes there. `self.config` keeps `last`, so the config.yaml saved with the run still
        resumes from the newest checkpoint when it is rerun."""
        from lit_ovis.resume import resolve_ckpt_path

        sub = self.config_init.get(self.subcommand) if self.subcommand else None
        if sub is not None and sub.get("ckpt_path") == "last":
            path = resolve_ckpt_path(self.trainer)
            rank_zero_info(f"resuming from {path}" if path else "no checkpoint to resume from: starting fresh")
            sub["ckpt_path"] = path

    def _use_checkpoint_architecture(self) -> None:
        """The checkpoint this run restores decides the backbone's shape (one line if the weights disagree)."""
        sub = self.config_init.get(self.subcommand) if self.subcommand else None
        path = sub.get("ckpt_path") if sub is not None else None
        if (path and path not in ("last", "best", "hpc", "registry") and not is_remote(str(path)) and os.path.exists(path)
                and hasattr(self.model, "use_architecture_of")):
            self.model.use_architecture_of(str(path))

    def before_fit(self) -> None:
        self._resolve_ckpt_path()
        self._use_checkpoint_architecture()

    def before_validate(self) -> None:
        self._use_checkpoint_architecture()

    def before_test(self) -> None:
        self._use_checkpoint_architecture()

    def before_predict(self) -> None:
        self._use_checkpoint_architecture()


def run_root(trainer_config: dict) -> str:
    """The run's output root, as the Trainer resolves it (`default_root_dir`, else the working directory)."""
    return str(trainer_config.get("default_root_dir") or os.getcwd())


def run_logger(root: str):
    """`logger: true`: TensorBoard in `<root>/tb`, one unversioned folder, so a resumed run appends to its own
    curves (Lightning's default would start `lightning_logs/version_N` on every rerun)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=root, name="tb", version="")


def place_checkpoints(trainer) -> None:
    """A ModelCheckpoint without `dirpath` writes `<default_root_dir>/checkpoints` (Lightning's default would
    nest it in the logger's version folder, where a rerun's resume does not look before the run has started)."""
    from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem

    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None) is None:
            dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
            if _is_local_file_protocol(dirpath):
                dirpath = os.path.realpath(os.path.expanduser(dirpath))
            callback.dirpath, callback._fs = dirpath, get_filesystem(dirpath)


CLI_KWARGS = dict(subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


class _Parsed(Exception):
    def __init__(self, config):
        super().__init__("parsed")
        self.config = config


class _ParseOnly(OvisCLI):
    def _set_seed(self) -> None:  # parsing only: leave the caller's RNGs alone
        pass

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config.get(self.subcommand) if self.subcommand else self.config)


def _help_hint(parser, argv: list[str]) -> str:
    prog = (getattr(parser, "prog", "") or "main.py").replace(" [options]", "")
    sub = next((a for a in argv if not a.startswith("-")), None)
    if sub in ("fit", "validate", "test", "predict") and not prog.endswith(sub):
        prog = f"{prog} {sub}"
    return f"see all options: {'python ' if prog.split()[0].endswith('.py') else ''}{prog} --help"


def _known_keys(parser, argv: list[str], bad: str) -> list[str]:
    """Every option of the failing parser, plus the model/data init arguments of the classes the rest of
    the command line selects (for `did you mean`)."""
    keys = [s for action in getattr(parser, "_actions", []) for s in action.option_strings if s.startswith("--")]
    rest, skip = [], False
    for k, arg in enumerate(argv):  # the command line without the unknown option (and its value)
        if skip:
            skip = False
            continue
        if arg == bad or arg.startswith(bad + "="):
            skip = arg == bad and k + 1 < len(argv) and not argv[k + 1].startswith("--")
            continue
        rest.append(arg)
    try:
        cfg = _parse(rest)
    except (ParseFailure, SystemExit):
        return keys

    def flatten(node, prefix):
        if hasattr(node, "as_dict"):
            node = node.as_dict()
        if isinstance(node, dict):
            if "init_args" in node:
                keys.append(prefix)
                node = node["init_args"] or {}
            for key, value in node.items():
                flatten(value, f"{prefix}.{key}")
        else:
            keys.append(prefix)

    for section in ("model", "data", "trainer"):
        if cfg.get(section) is not None:
            flatten(cfg.get(section), f"--{section}")
    return keys


def command_line_error(failure: ParseFailure, argv: list[str]) -> CommandLineError:
    from lit_ovis.cli.parse_errors import summarise

    return CommandLineError(summarise(failure.message, argv, lambda bad: _known_keys(failure.parser, argv, bad)),
                            _help_hint(failure.parser, argv))


def _parse(args: list[str]):
    try:
        with warnings.catch_warnings():  # the caller's own sys.argv is not meant for this parser
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            _ParseOnly(**CLI_KWARGS, args=args)
    except _Parsed as parsed:
        return parsed.config
    raise RuntimeError("LightningCLI returned without reaching before_instantiate_classes")


def parse_config(args: list[str]):
    """The resolved config namespace of `main.py <args>` (e.g. ["fit", "--config", ...]): parsed and
    validated exactly as a run would parse it, but nothing is instantiated and no check is run. A command
    line that does not parse raises a one-line CommandLineError."""
    try:
        return _parse(args)
    except ParseFailure as failure:
        raise command_line_error(failure, list(args)) from None


def selected_classes(args: list[str]) -> dict[str, str]:
    """{"model": class_path, "data": class_path} that the `--config` files (later ones win) and `--model` /
    `--data` arguments of `args` select."""
    import yaml

    found: dict[str, str] = {}
    for i, arg in enumerate(args):
        value = args[i + 1] if i + 1 < len(args) else ""
        if arg.startswith("--config="):
            arg, value = "--config", arg.split("=", 1)[1]
        if arg == "--config":
            try:
                cfg = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                continue  # the parser itself reports an unreadable config
            found.update({k: cfg[k]["class_path"] for k in ("model", "data") if isinstance(cfg.get(k), dict) and cfg[k].get("class_path")})
        elif arg in ("--model", "--data") and "." in value and not value.endswith((".yaml", ".yml")):
            found[arg[2:]] = value
    return found


def print_help(args: list[str]) -> None:
    """LightningCLI's help, then the options of the model and data classes the configs select (LightningCLI
    alone lists them only for `--model.help CLASS`)."""
    with warnings.catch_warnings():  # sys.argv is what these args were read from
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            OvisCLI(**CLI_KWARGS, args=args)
        except SystemExit as done:
            if done.code not in (0, None):
                raise
        subcommand = next((a for a in args if not a.startswith("-")), None)
        for key, class_path in selected_classes(args).items():
            print(f"\nOptions of --{key} {class_path} (selected by the config):\n")
            try:
                OvisCLI(**CLI_KWARGS, args=[subcommand, f"--{key}.help", class_path] if subcommand else [f"--{key}.help", class_path])
            except SystemExit:
                pass


def run(args: list[str] | None = None) -> OvisCLI | None:
    """LightningCLI with every user mistake as one `error:` line (exit 2): a command line that does not
    parse (plus the closest valid key and how to see --help), a config that cannot work, bad data or
    checkpoints, Lightning's own refusals, and the same raised inside constructors or data-loader workers."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if any(a in HELP_FLAGS for a in argv) and selected_classes(argv):
            print_help(argv)
            raise SystemExit(0)
        return OvisCLI(**CLI_KWARGS, args=args)
    except ParseFailure as failure:
        err = command_line_error(failure, argv)
        print(f"error: {err}\n{err.help_hint}", file=sys.stderr)
        raise SystemExit(2) from None
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:  # noqa: BLE001 - bugs are re-raised below with their traceback
        message = user_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
