"""Skip optimizer steps whose loss or gradients are NaN/Inf, count them, and stop with a clear message
after too many in a row (a diverged run should not burn a cluster allocation).

A skipped step changes nothing that training carries forward: the fused optimizer is handed a `found_inf`
flag and leaves weights, Adam moments and its step count alone, the EMA is not updated, and the LR
schedulers Lightning (or a manual-optimization stage) stepped anyway are rewound. The batch is still
consumed: the data position moves on, so a resume neither repeats nor skips it.

All of that is decided on the device: the finiteness flag (all-reduced across ranks, so every rank skips the
same step) gates the optimizer and the EMA without a host read, and the host reads the counters only every
`check_every_n_steps` (default: the trainer's `log_every_n_steps`), at the end of training and before a
checkpoint is written. So on the other steps the guard adds no device->host sync, and what the host sees is up
to one interval late: `skipped_total`, the `train/nonfinite_skipped` log, the stop after `max_consecutive`
skipped steps in a row (the error names the step where the limit was reached), and the LR schedule, which is
rewound at the next check (until then a skipped step advances the LR of the following steps by one step; with
`check_every_n_steps: 1` the schedule is exact at every step, at one host read per step). An optimizer that
cannot skip on the device (not one of torch's fused kernels) is checked on the host at every step instead.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_ovis.errors import ConfigError, NonFiniteError
from lit_ovis.parallel.optim import skips_on_device

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


def _clear_found_inf(optimizer, args, kwargs) -> None:
    optimizer.__dict__.pop("found_inf", None)  # the flag belongs to one step only


class NanGuard(L.Callback):
    def __init__(self, max_consecutive: int = 10, check_every_n_steps: int | None = None):
        """max_consecutive: stop after this many skipped optimizer steps in a row.
        check_every_n_steps: optimizer steps between host reads of the device counters (None: the trainer's
        `log_every_n_steps`; 1: every step, the exact pre-device behaviour at one sync per step)."""
        if max_consecutive < 1:
            raise ConfigError(f"NanGuard.max_consecutive must be >= 1 (got {max_consecutive})")
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ConfigError(f"NanGuard.check_every_n_steps must be >= 1 or null (got {check_every_n_steps})")
        self.max_consecutive = max_consecutive
        self.check_every_n_steps = check_every_n_steps
        self.consecutive = 0  # host view, as of the last check
        self.skipped_total = 0
        self._loss_ok: torch.Tensor | None = None  # finiteness of this step's micro-batch losses, on device
        self._device: dict[str, torch.Tensor] | None = None  # counters on the device since the last check
        self._applied_in_batch: torch.Tensor | None = None  # 1 if an optimizer step of this batch was applied
        self._checked_at_step = 0
        self._sched_epochs: list[int] | None = None  # schedulers' positions at the last check
        self._hooked: set[int] = set()
        self._warned_sched = False

    # --------------------------------------------------------------------------------------- on device
    def _counters(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._device is None:  # torch.full is a fill kernel: no host->device copy
            self._device = {
                "consecutive": torch.full((), self.consecutive, dtype=torch.int64, device=device),
                "skipped": torch.zeros((), dtype=torch.int64, device=device),
                "limit_step": torch.full((), -1, dtype=torch.int64, device=device),  # step where the limit was hit
            }
        return self._device

    def on_train_start(self, trainer, pl_module) -> None:
        self._checked_at_step = trainer.global_step
        self._sched_epochs = [c.scheduler.last_epoch for c in trainer.lr_scheduler_configs]

    def on_before_backward(self, trainer, pl_module, loss) -> None:
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
        # Sharded gradients: if any rank sees a bad shard or loss, every rank must skip the same step.
        finite = torch.stack(checks).all().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if skips_on_device(optimizer):
            if id(optimizer) not in self._hooked:
                optimizer.register_step_post_hook(_clear_found_inf)
                self._hooked.add(id(optimizer))
            optimizer.found_inf = 1.0 - finite  # the fused kernel turns the whole step into a no-op on the device
        elif not bool(finite):  # no on-device skip: decide on the host (one read per optimizer step)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # optimizers skip parameters without gradients: the step becomes a no-op
        c = self._counters(device)
        skipped = (finite == 0).long()
        c["consecutive"] = (c["consecutive"] + 1) * skipped
        c["skipped"] = c["skipped"] + skipped
        reached = (c["consecutive"] >= self.max_consecutive) & (c["limit_step"] < 0)
        c["limit_step"] = torch.where(reached, trainer.global_step, c["limit_step"])
        self._applied_in_batch = finite if self._applied_in_batch is None else torch.maximum(self._applied_in_batch, finite)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Runs after Lightning's scheduler step and before the module's hook (EMA) and ModelCheckpoint.
        if self._applied_in_batch is not None and hasattr(pl_module, "gate_ema_update"):
            pl_module.gate_ema_update(self._applied_in_batch)  # the weights did not move: neither may the EMA
        self._applied_in_batch = None
        every = self.check_every_n_steps or max(1, trainer.log_every_n_steps)
        if trainer.global_step // every != self._checked_at_step // every:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, None)

    # --------------------------------------------------------------------------------------- on host
    def check(self, trainer, pl_module=None, stop: bool = True) -> None:
        """Read the device counters (the guard's only host sync), rewind the LR schedule by the steps skipped
        since the last check, log the total, and stop if `max_consecutive` skipped steps came in a row."""
        self._checked_at_step = trainer.global_step
        if self._device is None:
            return
        c = self._device
        consecutive, skipped, limit_step = torch.stack([c["consecutive"], c["skipped"], c["limit_step"]]).tolist()
        self.consecutive = consecutive
        c["skipped"] = torch.zeros_like(c["skipped"])
        if skipped:
            self.skipped_total += skipped
            self._rewind(trainer, skipped)
            if pl_module is not None:
                pl_module.log("train/nonfinite_skipped", float(self.skipped_total), on_step=True, rank_zero_only=True)
        self._sched_epochs = [cfg.scheduler.last_epoch for cfg in trainer.lr_scheduler_configs]
        if stop and limit_step >= 0:
            raise NonFiniteError(
                f"stopping: {self.max_consecutive} consecutive steps with NaN/Inf loss or gradients (last at step "
                f"{limit_step}); lower --model.optimizer.lr, check the data, and resume from the last checkpoint"
            )

    def _rewind(self, trainer, skipped: int) -> None:
        """Per-step schedulers advanced once per optimizer step, skipped ones included: take those back."""
        for config, before in zip(trainer.lr_scheduler_configs, self._sched_epochs or []):
            if config.interval != "step":
                continue
            steps = min(skipped, config.scheduler.last_epoch - before)
            if not rewind_scheduler(config.scheduler, steps) and not self._warned_sched:
                self._warned_sched = True
                rank_zero_warn(f"NanGuard cannot rewind {type(config.scheduler).__name__}: skipped steps advance its schedule")

    def state_dict(self) -> dict:
        # Called while a checkpoint is assembled, before the schedulers' states are read: bring the host view
        # (and the LR schedule) up to date so the checkpoint holds exact counts. A run past its limit stops here
        # rather than writing a checkpoint.
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and self._device is not None:
            self.check(trainer)
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
        self._device = None
