"""How legible an autoencoder keeps text: OCR of original renders and of their encode/decode round trips.

Both sides are read by the same OCR scorer and pooled as the benchmarks pool them (`lit_ovis.scoring.metrics`),
so the originals' accuracy is the ceiling the reconstructions are compared with.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lit_ovis.models.vae import FluxVAE
from lit_ovis.scoring.metrics import WordScores, pool_words, word_scores


@torch.no_grad()
def round_trip(vae: FluxVAE, images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> reconstructions in [0, 1] through the normalised latents the transformer sees."""
    x = images.float() / 127.5 - 1.0
    return (vae.decode(vae.encode(x)).float().clamp(-1, 1) + 1) / 2


def measure_reconstructions(vae: FluxVAE, manifest: str, ocr, batch_size: int = 32, limit: int | None = None,
                            examples: int = 0) -> dict:
    """OCR word accuracy / NED of a manifest's images (rows with path, target_text, language) and of their
    reconstructions, plus PSNR; `examples` > 0 also returns that many (original, reconstruction) pairs."""
    from data_modules.records import load_image_grouped, records_from_manifest

    records = records_from_manifest(manifest)
    records = records[:limit] if limit else records
    multiple = 2 * 2 ** (len(vae.vae.config.block_out_channels) - 1)
    grouped, skipped = load_image_grouped(records, multiple)
    by_size = {size: [(pixels, r.target_text, r.language) for r, pixels in items] for size, items in grouped.items()}
    originals: list[WordScores] = []
    recons: list[WordScores] = []
    squared, pixels, pairs = 0.0, 0, []
    for items in by_size.values():
        for i in range(0, len(items), batch_size):
            chunk = items[i: i + batch_size]
            batch = torch.from_numpy(np.stack([a for a, _, _ in chunk])).permute(0, 3, 1, 2)
            rec = round_trip(vae, batch)
            orig = batch.float() / 255
            squared += float(((rec - orig) ** 2).sum())
            pixels += orig.numel()
            for text, (_, target, language) in zip(ocr.read(orig), chunk):
                originals.append(word_scores(text, target, language))
            for text, (_, target, language) in zip(ocr.read(rec), chunk):
                recons.append(word_scores(text, target, language))
            pairs += [(o, r) for o, r in zip(orig, rec)][: max(examples - len(pairs), 0)]
    mse = squared / max(pixels, 1)
    out = {"images": len(originals), "skipped": skipped, "original": pool_words(originals), "reconstruction": pool_words(recons),
           "psnr_db": round(10 * math.log10(1.0 / mse), 2) if mse > 0 else float("inf")}
    if examples:
        out["examples"] = pairs
    return out
