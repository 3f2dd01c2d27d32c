"""Skip optimizer steps whose loss or gradients are NaN/Inf, count them, and stop with a clear message
after too many in a row (a diverged run should not burn a cluster allocation).

A skipped step changes nothing that training carries forward: the gradients are dropped before the
update (AdamW leaves parameters without a gradient alone: no weight, moment or step-count change), the
LR schedulers Lightning (or a manual-optimization stage) stepped anyway are rewound, and the EMA is not
updated. The batch is still consumed: the data position moves on, so a resume neither repeats nor skips it.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_ovis.errors import ConfigError, NonFiniteError

__all__ = ["NanGuard", "NonFiniteError", "rewind_scheduler"]


def rewind_scheduler(scheduler, steps: int) -> bool:
    """Undo the last `steps` steps of a closed-form LR scheduler (LambdaLR and the schedulers torch gives a
    closed form); False when the scheduler's LR depends on its history and cannot be rewound."""
    if steps <= 0:
        return True
    closed_form = getattr(scheduler, "_get_closed_form_lr", None)
    is_lambda = isinstance(scheduler, (torch.optim.lr_scheduler.LambdaLR,))
    if not is_lambda and closed_form is None:
        return False
    scheduler.last_epoch -= steps
    if is_lambda:
        lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    else:
        lrs = closed_form()
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
    return True


class NanGuard(L.Callback):
    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 1:
            raise ConfigError(f"NanGuard.max_consecutive must be >= 1 (got {max_consecutive})")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped_total = 0
        self._loss_ok: torch.Tensor | None = None  # finiteness of this step's micro-batch losses, on device
        self._skipped_in_batch = 0
        self._stepped_in_batch = 0
        self._sched_epochs: list[int] | None = None
        self._warned_sched = False

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # Kept on the device: no host sync here; read together with the gradients' check below.
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        device = trainer.strategy.root_device
        checks = [torch.isfinite(g).all().to(device) for g in local]
        if self._loss_ok is not None:
            checks.append(self._loss_ok.to(device))
        self._loss_ok = None
        if not checks:
            return
        # The only host sync this guard adds: one all-reduce of one scalar and one read per optimizer step
        # (the price of never applying a poisoned update). Sharded gradients: if any rank sees a bad shard
        # or loss, every rank must skip the same step.
        finite = torch.stack(checks).all().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if bool(finite):
            self.consecutive = 0
            self._stepped_in_batch += 1
            return
        self.consecutive += 1
        self.skipped_total += 1
        if self._skipped_in_batch == 0:
            self._sched_epochs = [c.scheduler.last_epoch for c in trainer.lr_scheduler_configs]
        self._skipped_in_batch += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # AdamW skips parameters without gradients: the step becomes a no-op
        pl_module.log("train/nonfinite_skipped", float(self.skipped_total), on_step=True, rank_zero_only=True)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"stopping: {self.consecutive} consecutive steps with NaN/Inf loss or gradients (last at step "
                f"{trainer.global_step}); lower --model.optimizer.lr, check the data, and resume from the last checkpoint"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Runs after Lightning's scheduler step and before the module's hook (EMA) and ModelCheckpoint.
        if self._skipped_in_batch:
            for config, before in zip(trainer.lr_scheduler_configs, self._sched_epochs or []):
                # automatic optimization: Lightning stepped the scheduler 0 or 1 time after the skip;
                # manual (GRPO): the stage steps it once per optimizer step, skipped ones included
                steps = min(self._skipped_in_batch, config.scheduler.last_epoch - before)
                if not rewind_scheduler(config.scheduler, steps) and not self._warned_sched:
                    self._warned_sched = True
                    rank_zero_warn(f"NanGuard cannot rewind {type(config.scheduler).__name__}: skipped steps advance its schedule")
            if not self._stepped_in_batch and hasattr(pl_module, "skip_ema_update"):
                pl_module.skip_ema_update()  # global_step moved but the weights did not
        self._skipped_in_batch = self._stepped_in_batch = 0
        self._sched_epochs = None

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
