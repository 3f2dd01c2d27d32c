"""`predict` output: one PNG per prompt plus an index.jsonl mapping files to prompts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from lit_ovis.files import atomic_path


class ImageWriter(BasePredictionWriter):
    def __init__(self, output_dir: str = "outputs/predict"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def index_path(self, trainer) -> Path:
        return self.output_dir / f"index.rank{trainer.global_rank}.jsonl"

    def on_predict_start(self, trainer, pl_module) -> None:
        # A rerun rewrites its images under the same names; start its index afresh instead of appending twice.
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.index_path(trainer).write_text("", encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        images: torch.Tensor = prediction["images"]
        ids = prediction.get("ids")
        records = []
        for i, (image, prompt) in enumerate(zip(images, prediction["prompts"])):
            name = f"{ids[i]}" if ids is not None else f"r{trainer.global_rank}_b{batch_idx:05d}_{i:03d}"
            path = self.output_dir / f"{name}.png"
            array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            with atomic_path(path) as tmp:  # a killed predict never leaves a truncated PNG behind
                Image.fromarray(array).save(tmp, format="PNG")
            records.append({"file": path.name, "prompt": prompt})
        with open(self.index_path(trainer), "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
