"""Preference pairs for Diffusion-DPO / SDPO: (prompt, winner latents, loser latents), bucketed and
streamed exactly like the flow-matching latents (same layout `<root>/<res>/<WxH>/`, same resumable
batch plan). Produced by `lit-ovis make-pairs` (scored real/generated pairs) or here, synthetically:
winner = the text rendered correctly, loser = the same layout with the text misspelled.

    python -m data_modules.preference --synthetic 512 --output-dir data/pairs --resolution 256
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_modules.buckets import assign_bucket, make_buckets, resize_to_bucket
from data_modules.layout import REPORT, read_json
from data_modules.streaming import LatentDataModule
from data_modules.writer import BucketedWriter, trim_embeddings
from lit_ovis.errors import OneLineArgumentParser
from lit_ovis.seeds import mix_seed


class PreferenceDataModule(LatentDataModule):
    """Batches with `latents_w`, `latents_l` [B,16,h,w] (one bucket), `prompt_embeds` or `captions`.

    Args:
        synthetic_pairs: > 0 builds that many synthetic (correct text, misspelt text) pairs in root on first use.
        build_timeout_s: how long the other ranks wait for rank 0 to build the synthetic pairs before they
            fail with one line.
        worker_timeout_s: a DataLoader worker that produces no batch for this long fails the run with one
            line; 0 waits forever.

    The other arguments are LatentDataModule's.
    """

    def __init__(self, root: str = "data/pairs", batch_size: int = 4, num_workers: int = 2, seed: int = 0,
                 resolutions: list[int] | None = None, synthetic_pairs: int = 0, synthetic_resolution: int = 64,
                 val_samples_per_bucket: int = 0, val_root: str | None = None, val_batch_size: int | None = None,
                 build_timeout_s: float = 3600.0, worker_timeout_s: float = 600.0):
        super().__init__(root, batch_size, num_workers, seed, resolutions, 0, synthetic_resolution,
                         val_samples_per_bucket, val_root, val_batch_size, build_timeout_s, worker_timeout_s)
        self.synthetic_pairs = synthetic_pairs

    def _resolutions(self) -> list[int] | None:
        return self.resolutions or ([self.synthetic["resolution"]] if self.synthetic_pairs > 0 else None)

    def synthetic_builder(self):
        if self.synthetic_pairs > 0:
            enc = self.encoders()  # the model's (model.encoders), read now: the builder may run later
            return lambda: ensure_synthetic_pairs(self.root, self.synthetic_pairs, self.synthetic["resolution"], enc["text_encoder"],
                                                  enc["vae"], enc["max_sequence_length"])
        return None


@torch.no_grad()
def build_synthetic_pairs(root: str, n: int, resolution: int = 64, text_encoder: str | None = "tiny", vae: str = "tiny",
                          max_sequence_length: int = 256, seed: int = 0, progress: bool = True) -> dict:
    from data_modules.synthetic.engine import TextRenderingEngine
    from lit_ovis.models.text_encoder import build_text_encoder
    from lit_ovis.models.vae import build_vae

    engine = TextRenderingEngine(seed=seed, base_size=max(resolution, 128))
    buckets = make_buckets(resolution)
    vae_model = build_vae(vae)
    encoder = build_text_encoder(text_encoder, max_sequence_length) if text_encoder else None
    writer = BucketedWriter(root, resolution)
    for i in tqdm(range(n), desc="pairs", disable=not progress):
        good = engine.render(i)
        bad = engine.render(i, language=good.language, text=engine.corrupt(good.text, mix_seed(seed, index=i)))
        bucket = assign_bucket(*good.image.size, buckets)
        pix = [np.asarray(resize_to_bucket(im, bucket), dtype=np.float32) / 127.5 - 1 for im in (good.image, bad.image)]
        lat = vae_model.encode(torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2))
        item = {"id": f"pair-{i:08d}", "caption": good.caption, "language": good.language, "target_text": good.text,
                "latents_w": lat[0].half(), "latents_l": lat[1].half()}
        if encoder is not None:
            item["prompt_embeds"] = trim_embeddings(encoder.encode([good.caption])[0]).half()
        writer.add(bucket, item)
    return writer.finish({"inputs": n, "kept": n, "has_prompt_embeds": encoder is not None, "kind": "synthetic_pairs",
                          "fingerprint": _pairs_fingerprint(n, resolution, text_encoder, vae, max_sequence_length, seed)})


def _pairs_fingerprint(*settings) -> str:
    return "synthetic_pairs:" + json.dumps(settings)


def ensure_synthetic_pairs(root: str, n: int, resolution: int = 64, text_encoder: str | None = "tiny", vae: str = "tiny", max_sequence_length: int = 256) -> dict:
    report = read_json(Path(root) / str(resolution) / REPORT)
    if report and report.get("fingerprint") == _pairs_fingerprint(n, resolution, text_encoder, vae, max_sequence_length, 0):
        return report
    Path(root).mkdir(parents=True, exist_ok=True)
    return build_synthetic_pairs(root, n, resolution, text_encoder, vae, max_sequence_length)


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="python -m data_modules.preference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=int, required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--text-encoder", default="tiny")
    p.add_argument("--vae", default="tiny")
    p.add_argument("--max-sequence-length", type=int, default=256)
    args = p.parse_args(argv)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    print(json.dumps(build_synthetic_pairs(args.output_dir, args.synthetic, args.resolution, args.text_encoder, args.vae, args.max_sequence_length)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
