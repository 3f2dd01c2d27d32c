"""When a callback may read device values on the host: at the steps where Lightning writes logs.

Every read of a device value (`.item()`, `float(t)`, `.tolist()`) waits for the GPU to finish all queued work,
so callbacks read metrics only on the steps where the loggers flush anyway (`trainer.log_every_n_steps`)."""

from __future__ import annotations


def is_logging_step(trainer) -> bool:
    """Whether Lightning writes the logged metrics at the end of the current training batch (asked in
    `on_train_batch_end`)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None:
        return bool(connector.should_update_logs)
    every = getattr(trainer, "log_every_n_steps", 0)
    return bool(every) and trainer.global_step % every == 0
