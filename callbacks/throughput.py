"""Throughput on the progress bar and in the logs: samples/s, image tokens/s and (with a FLOP model)
TFLOP/s and MFU. Timed between batch boundaries with no device synchronisation inside the step."""

from __future__ import annotations

import time

import lightning as L
import torch


class ThroughputLogger(L.Callback):
    def __init__(self, window: int = 20, peak_tflops: float | None = None):
        self.window = window
        self.peak_tflops = peak_tflops
        self._t0: float | None = None
        self._samples = 0
        self._tokens = 0
        self._steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        latents = batch.get("latents") if isinstance(batch, dict) else None
        if latents is None:
            return
        b, _, h, w = latents.shape
        self._samples += b
        self._tokens += b * (h // 2) * (w // 2)
        self._steps += 1
        if self._steps < self.window:
            return
        dt = time.perf_counter() - self._t0
        world = trainer.world_size
        metrics = {
            "perf/samples_per_s": self._samples * world / dt,
            "perf/image_tokens_per_s": self._tokens * world / dt,
            "perf/step_time_s": dt / self._steps,
        }
        flops_fn = getattr(pl_module, "train_flops_per_sample", None)
        if flops_fn is not None:
            tflops = flops_fn(h, w) * self._samples / dt / 1e12
            metrics["perf/tflops_per_device"] = tflops
            if self.peak_tflops:
                metrics["perf/mfu"] = tflops / self.peak_tflops
        pl_module.log_dict(metrics, on_step=True, prog_bar=False, rank_zero_only=True)
        pl_module.log("samples/s", metrics["perf/samples_per_s"], on_step=True, prog_bar=True, logger=False, rank_zero_only=True)
        self._t0, self._samples, self._tokens, self._steps = time.perf_counter(), 0, 0, 0
