"""Data throughput on this machine, side by side in one run:
1. `prepare` (synthetic engine -> decode/validate/hash/bucket -> VAE encode -> LitData), images/s;
2. the streaming loader at 512^2 and 1024^2 latent shapes (with Ovis-size text embeddings), samples/s;
3. what training consumes: a tiny-model step measured here, and the 7B model at 45% MFU on an H100 from
   the FLOP model, so the loader's headroom is explicit.

    python benchmarks/bench_data.py --out benchmarks/results_data.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def write_fake(root: Path, side: int, n: int, text_tokens: int = 200, dim: int = 2048) -> None:
    from litdata.streaming.writer import BinaryWriter

    out = root / str(side) / f"{side}x{side}"
    w = BinaryWriter(str(out), chunk_bytes="64MB")
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        w[i] = {"id": f"s{i}", "caption": f"caption {i}", "language": "en", "target_text": "",
                "latents": torch.randn(16, side // 8, side // 8, generator=g).half(),
                "prompt_embeds": torch.randn(text_tokens, dim, generator=g).half()}
    w.done()
    w.merge()


def loader_rate(root: Path, batch: int, workers: int, epochs: int = 1) -> float:
    from data_modules.streaming import LatentDataModule

    dm = LatentDataModule(root=str(root), batch_size=batch, num_workers=workers)
    dm.setup("fit")
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        for b in dm.train_dataloader():
            n += b["latents"].shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prepare-images", type=int, default=128)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results_data.md")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    rows = []
    from data_modules.prepare import PrepareConfig, prepare, synthetic_records

    load_before = os.getloadavg()[0]
    for res in (256, 512):  # both resolutions into one root, as the multi-resolution config expects
        cfg = PrepareConfig(output_dir=str(tmp / "prep"), resolution=res, num_workers=args.workers, text_encoder="tiny")
        start = time.perf_counter()
        report = prepare(synthetic_records(args.prepare_images), cfg, progress=False)
        rate = report["kept"] / (time.perf_counter() - start)
        rows.append(f"| prepare, synthetic -> tiny VAE + tiny text encoder, {res}^2 | {rate:.1f} images/s |")
        start = time.perf_counter()
        again = prepare(synthetic_records(args.prepare_images), cfg, progress=False)
        assert again["processed_this_run"] == 0
        rows.append(f"| prepare rerun with unchanged inputs and settings, {res}^2 (fingerprint hit, no work) | {time.perf_counter() - start:.2f} s |")
    for side in (512, 1024):
        root = tmp / f"fake{side}"
        write_fake(root, side, args.samples)
        rate = loader_rate(root, batch=4, workers=args.workers)
        rows.append(f"| loader, {side}^2 latents (16x{side // 8}x{side // 8} fp16) + 200x2048 text embeddings, batch 4, {args.workers} workers | {rate:.1f} samples/s |")

    # What a training step consumes.
    import lightning as L

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import LatentSet, loader, tiny_flow_module

    module = tiny_flow_module()
    trainer = L.Trainer(max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp))
    data = LatentSet(n=64, latent_hw=(64, 64), seq_len=8)
    start = time.perf_counter()
    trainer.fit(module, loader(data, batch_size=4))
    rate = 20 * 4 / (time.perf_counter() - start)
    rows.append(f"| training consumes: tiny model (2.2M params) at 512^2, CPU | {rate:.1f} samples/s |")
    from lit_ovis.models.presets import TRANSFORMER_PRESETS
    from lit_ovis.parallel.flops import train_flops

    for side in (512, 1024):
        need = 989e12 * 0.45 / train_flops(TRANSFORMER_PRESETS["ovis-image-7b"], (side // 16) ** 2, 256)
        rows.append(f"| training consumes: 7B at {side}^2, one H100 at 45% MFU (FLOP model) | {need:.2f} samples/s per GPU |")
    shutil.rmtree(tmp, ignore_errors=True)
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (the 2 cores are shared)"
    text = f"# Data pipeline throughput (CPU, 2 cores, one run; {load})\n\n| what | rate |\n| --- | --- |\n" + "\n".join(rows) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
