"""Throughput in the logs (and so on the progress display): samples/s, image tokens/s, TFLOP/s per device and MFU.

Timed between batch boundaries over a window of steps that ends on a logging step (or every `window` steps),
with no device synchronisation: the work of each batch is read from its shapes (host metadata) when it ends,
and the numbers are logged as plain metrics, not `prog_bar` ones (Lightning would convert those on the host
after every later batch); `callbacks.progress` shows them. FLOPs are added per batch at
that batch's own resolution (multi-resolution buckets differ from step to step) from the module's FLOP
model: `train_flops_per_sample(latent_h, latent_w)` for `latents` batches, `train_flops_per_pair(latent_h,
latent_w)` for preference (`latents_w`/`latents_l`) batches, where a pair is two images. MFU divides by
`peak_tflops`, or when it is not given by the dense BF16 peak of a known GPU (H100, H200, A100, ...).
"""

from __future__ import annotations

import time

import lightning as L

from callbacks.log_interval import is_logging_step
from lit_ovis.parallel.flops import detect_peak_tflops


def batch_work(pl_module, batch) -> tuple[int, int, int, float | None] | None:
    """(items, images, image tokens, model FLOPs or None) of one batch on this rank; None if not a latent batch."""
    if not isinstance(batch, dict):
        return None
    if batch.get("latents") is not None:
        latents, per_item, flops_fn = batch["latents"], 1, getattr(pl_module, "train_flops_per_sample", None)
    elif batch.get("latents_w") is not None:
        latents, per_item, flops_fn = batch["latents_w"], 2, getattr(pl_module, "train_flops_per_pair", None)
    else:
        return None
    b, _, h, w = latents.shape
    images = b * per_item
    flops = float(b * flops_fn(h, w)) if flops_fn is not None else None
    return b, images, images * (h // 2) * (w // 2), flops


class ThroughputLogger(L.Callback):
    def __init__(self, window: int | None = None, peak_tflops: float | None = None, clock=time.perf_counter):
        """window: steps per measurement; None ends each one on the trainer's logging steps, so every value
        reaches the loggers. peak_tflops: the device's dense BF16 peak for MFU (None: detected from the GPU)."""
        self.window = window
        self.peak_tflops = peak_tflops
        self.clock = clock
        self._peak: float | None = peak_tflops
        self._reset(None)

    def _reset(self, t0: float | None) -> None:
        self._t0 = t0
        self._items = self._images = self._tokens = self._steps = 0
        self._flops: float | None = 0.0

    def setup(self, trainer, pl_module, stage: str) -> None:
        # the strategy knows the device before the module is moved there
        self._peak = self.peak_tflops if self.peak_tflops else detect_peak_tflops(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        work = batch_work(pl_module, batch)
        if work is None:
            return
        items, images, tokens, flops = work
        self._items += items
        self._images += images
        self._tokens += tokens
        self._flops = None if flops is None or self._flops is None else self._flops + flops
        self._steps += 1
        if (self._steps < self.window) if self.window else not is_logging_step(trainer):
            return
        now = self.clock()
        dt = now - self._t0
        world = trainer.world_size
        metrics = {
            "perf/samples_per_s": self._items * world / dt,
            "perf/images_per_s": self._images * world / dt,
            "perf/image_tokens_per_s": self._tokens * world / dt,
            "perf/step_time_s": dt / self._steps,
        }
        if self._flops is not None:
            tflops = self._flops / dt / 1e12
            metrics["perf/tflops_per_device"] = tflops
            if self._peak:
                metrics["perf/mfu"] = tflops / self._peak
        pl_module.log_dict(metrics, on_step=True, prog_bar=False, rank_zero_only=True)
        self._reset(now)
