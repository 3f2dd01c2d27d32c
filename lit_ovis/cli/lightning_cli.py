"""LightningCLI for every stage: `python main.py fit --config configs/sft.yaml [--any.key value]`.

The stage is chosen by the config's `model.class_path`. A rerun of the same command resumes from the
newest complete checkpoint (`fit --ckpt_path` defaults to `last`; `--ckpt_path null` starts fresh).
Config checks that can fail run before any model is built.
"""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_ovis.errors import UserError

# UserError: ConfigError, DataError, CheckpointError, NonFiniteError. FileNotFoundError: a data path that
# does not exist deserves one line, not a traceback.
USER_ERRORS = (UserError, FileNotFoundError)


class OvisCLI(LightningCLI):
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
        if path and path not in ("last", "best", "hpc", "registry") and "://" not in str(path):
            from lit_ovis.checkpoint_io import check_readable

            check_readable(path)

    def before_instantiate_classes(self) -> None:
        from lit_ovis.preflight import check_config

        sub = self.config.get(self.subcommand) if self.subcommand else self.config
        check_config(sub)

    def _instantiate_trainer(self, config, callbacks):
        # Step-budgeted runs: show `step 120/300` rather than Lightning's `Epoch 9/-2` (max_epochs - 1 of -1).
        from lightning.pytorch.callbacks import ProgressBar

        from callbacks.progress import StepProgressBar

        configured = config.get("callbacks") or []
        given = (configured if isinstance(configured, list) else [configured]) + list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from lit_ovis.checkpoint_io import AtomicCheckpointIO

        # Never lose the last good checkpoint to a kill or a full disk mid-write.
        if type(getattr(trainer.strategy, "checkpoint_io", None)) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
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

    def before_fit(self) -> None:
        self._resolve_ckpt_path()


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


def parse_config(args: list[str]):
    """The resolved config namespace of `main.py <args>` (e.g. ["fit", "--config", ...]): parsed and
    validated exactly as a run would parse it, but nothing is instantiated and no check is run."""
    try:
        with warnings.catch_warnings():  # the caller's own sys.argv is not meant for this parser
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            _ParseOnly(**CLI_KWARGS, args=args)
    except _Parsed as parsed:
        return parsed.config
    raise RuntimeError("LightningCLI returned without reaching before_instantiate_classes")


def run(args: list[str] | None = None) -> OvisCLI | None:
    try:
        return OvisCLI(**CLI_KWARGS, args=args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
