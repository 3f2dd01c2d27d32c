"""LightningCLI for every stage: `python main.py fit --config configs/sft.yaml [--any.key value]`.

The stage is chosen by the config's `model.class_path`. A rerun of the same command resumes from the
newest complete checkpoint (`--ckpt_path last` is the default when one exists; `--ckpt_path null` starts
fresh). Config checks that can fail run before any model is built.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from lit_ovis.errors import CheckpointError, ConfigError, DataError

# FileNotFoundError: a --ckpt_path or data path that does not exist deserves one line, not a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError)


class OvisCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.precision": "32-true"})

    def before_instantiate_classes(self) -> None:
        from lit_ovis.preflight import check_config

        sub = self.config.get(self.subcommand) if self.subcommand else self.config
        check_config(sub)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from lit_ovis.checkpoint_io import AtomicCheckpointIO

        # Never lose the last good checkpoint to a kill or a full disk mid-write.
        if type(getattr(trainer.strategy, "checkpoint_io", None)) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _resume_default(self) -> None:
        """Default `ckpt_path` to the newest complete checkpoint of this run, so reruns resume."""
        sub = self.config.get(self.subcommand)
        if self.subcommand != "fit" or sub is None or sub.get("ckpt_path") not in (None, "last"):
            return
        from lit_ovis.resume import resolve_ckpt_path

        sub["ckpt_path"] = resolve_ckpt_path(self.trainer)

    def before_fit(self) -> None:
        self._resume_default()


def run(args: list[str] | None = None) -> OvisCLI | None:
    try:
        return OvisCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
