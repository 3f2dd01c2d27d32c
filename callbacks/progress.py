"""The progress bar for step-budgeted runs: `step 120/300` instead of Lightning's `Epoch 9/-2` (its rich bar
prints max_epochs - 1, i.e. -2, when only `max_steps` bounds the run), with the logged metrics beside it."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}" if len(self.validation_description) > len(description) else description

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        if trainer.max_steps and trainer.max_steps > 0:
            metrics = {"step": f"{trainer.global_step}/{trainer.max_steps}", **metrics}
        return metrics
