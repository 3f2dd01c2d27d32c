"""Skip optimizer steps whose loss or gradients are NaN/Inf, count them, and stop with a clear message
after too many in a row (a diverged run should not burn a cluster allocation)."""

from __future__ import annotations

import lightning as L
import torch

from lit_ovis.errors import ConfigError


class NonFiniteError(RuntimeError):
    pass


class NanGuard(L.Callback):
    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 1:
            raise ConfigError("NanGuard.max_consecutive must be >= 1")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped_total = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        # One reduction and one host sync per step: the price of never applying a poisoned update.
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        finite = torch.stack([torch.isfinite(g).all() for g in local]).all().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Sharded gradients: if any rank sees a bad shard, every rank must skip the same step.
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if bool(finite):
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped_total += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # AdamW skips parameters without gradients: the step becomes a no-op
        pl_module.log("train/nonfinite_skipped", float(self.skipped_total), on_step=True, rank_zero_only=True)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"stopping: {self.consecutive} consecutive steps with NaN/Inf loss or gradients (last at step "
                f"{trainer.global_step}); lower --model.optimizer.lr, check the data, and resume from the last checkpoint"
            )

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
