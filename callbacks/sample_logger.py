"""Every N steps, render a fixed grid of prompts with fixed seeds and log it to TensorBoard and to disk.

Fixed prompts and seeds make grids comparable across steps and runs; captions are drawn under each
tile so a grid on disk explains itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from lit_ovis.render import caption_strip, load_font

DEFAULT_PROMPTS = [
    'A poster with the text "OPEN" in bold white letters on a red background',
    'A shop sign that says "CAFE"',
    '一张写着"你好"的海报',
    'A title card with the words "LIT OVIS"',
]


def make_grid(images: torch.Tensor, captions: list[str], columns: int = 4, caption_height: int = 28) -> Image.Image:
    """Images [B, 3, H, W] in [0, 1] -> one PIL grid with a caption strip under each tile."""
    b, _, h, w = images.shape
    columns = max(1, min(columns, b))
    rows = (b + columns - 1) // columns
    tile_w = max(w, 128)
    scale = tile_w / w
    tile_h = int(round(h * scale))
    grid = Image.new("RGB", (columns * tile_w, rows * (tile_h + caption_height)), "white")
    font = load_font(11, text=" ".join(captions))
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, (arr, cap) in enumerate(zip(arrays, captions)):
        tile = Image.fromarray(arr).resize((tile_w, tile_h), Image.NEAREST)
        x, y = (i % columns) * tile_w, (i // columns) * (tile_h + caption_height)
        grid.paste(tile, (x, y))
        grid.paste(caption_strip(cap, tile_w, caption_height, font), (x, y + tile_h))
    return grid


class SampleGridLogger(L.Callback):
    def __init__(
        self,
        prompts: list[str] | None = None,
        every_n_steps: int = 500,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        columns: int = 4,
        on_train_start: bool = True,
        on_train_end: bool = True,
        output_dir: str | None = None,
    ):
        self.prompts = prompts or DEFAULT_PROMPTS
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.kwargs = dict(steps=steps, guidance_scale=guidance_scale, height=height, width=width)
        self.columns = columns
        self.at_start = on_train_start
        self.at_end = on_train_end
        self.output_dir = output_dir
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_start:
            self.log_grid(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self.log_grid(trainer, pl_module)

    def log_grid(self, trainer, pl_module) -> Image.Image | None:
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._last_step = step
        # Every rank samples (sharded models need all ranks in the forward); rank 0 writes.
        images = pl_module.sample(self.prompts, seed=self.seed, **self.kwargs)
        grid = make_grid(images.float().cpu(), self.prompts, self.columns)
        self._write(trainer, grid, step)
        return grid

    @rank_zero_only
    def _write(self, trainer, grid: Image.Image, step: int) -> None:
        out = Path(self.output_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "samples"))
        out.mkdir(parents=True, exist_ok=True)
        grid.save(out / f"step_{step:07d}.png")
        import numpy as np

        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("samples/grid", np.asarray(grid), global_step=step, dataformats="HWC")
                experiment.add_text("samples/prompts", "\n\n".join(f"{i}: {p}" for i, p in enumerate(self.prompts)), global_step=step)
