"""`lit-ovis make-pairs`: build Diffusion-DPO preference pairs (report Sec. 3.3).

For every prompt of the pool: take its high-quality reference image (cropped to its aspect-ratio bucket) as
one candidate, generate a second with the current (SFT) model under the same prompt at the same size, score
both with a weighted scorer ensemble (`lit_ovis.scoring.build_scorer`), and keep the pair as
(winner, loser) when the combined scores differ by at least `--min-margin`.

Scores are normalised per scorer over the *whole* pool (both candidates of every prompt) before weighting,
so scorers on different scales (OCR accuracy in [0, 1], CLIP similarity, ...) contribute as their weights say.
Both candidates are VAE-encoded from their pixels (the generated one is decoded first), so the training pair
never differs by encoder-versus-sampler latent statistics, only by content.

Output (same layout as `lit-ovis prepare`, read by `data_modules.preference`): `<out>/<resolution>/<WxH>/`
LitData datasets with items {id, caption, language, target_text, latents_w, latents_l, [prompt_embeds],
score_w, score_l, margin, winner} (winner: "reference" or "generated") and `<out>/report.json`.

Example:
  lit-ovis make-pairs --manifest pool.jsonl --output-dir data/pairs --resolution 1024 \
      --backbone-preset ovis-image-7b --checkpoint runs/sft/checkpoints/last.ckpt \
      --text-encoder AIDC-AI/Ovis-Image-7B --vae AIDC-AI/Ovis-Image-7B \
      --scorers ocr=1.0,clip=0.5 --min-margin 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lit_ovis.errors import CheckpointError, ConfigError, DataError

REPORT = "report.json"
ScoreFn = Callable[[torch.Tensor, list, list], torch.Tensor]


@dataclass
class PairsConfig:
    output_dir: str
    resolution: int = 1024  # bucket target side (area ~ resolution^2), as in `lit-ovis prepare`
    min_aspect: float = 0.25
    max_aspect: float = 4.0
    backbone_preset: str = "ovis-image-7b"
    checkpoint: str | None = None  # SFT weights: lit-ovis .ckpt, .safetensors or diffusers folder
    text_encoder: str = "AIDC-AI/Ovis-Image-7B"
    vae: str = "AIDC-AI/Ovis-Image-7B"
    max_sequence_length: int = 256
    steps: int = 50
    guidance_scale: float = 5.0
    seed: int = 0
    batch_size: int = 4
    scorers: str = "ocr=1.0"  # comma-separated name=weight
    scorer_kwargs: str = "{}"  # JSON: {"name": {...}} passed to build_scorer
    normalise: str = "zscore"  # "zscore" | "minmax" | "rank" | "none" (per scorer, over the whole pool)
    min_margin: float = 0.1  # in combined (normalised, weighted) score units
    store_prompt_embeds: bool = False
    storage_dtype: str = "float16"
    device: str = "auto"


def parse_weights(spec: str) -> dict[str, float]:
    """'ocr=1,clip=0.5' -> {'ocr': 1.0, 'clip': 0.5}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition("=")
        try:
            out[name.strip()] = float(w) if w else 1.0
        except ValueError:
            raise ConfigError(f"--scorers: bad weight in '{part}'; use name=weight, e.g. ocr=1.0,clip=0.5") from None
    if not out:
        raise ConfigError("--scorers is empty; name at least one scorer, e.g. --scorers ocr=1.0")
    return out


def normalise_scores(x: torch.Tensor, method: str) -> torch.Tensor:
    """Per-scorer normalisation over the whole pool: `lit_ovis.scoring.normalise` modes (none, zscore, minmax)
    or `rank` (rank in [0, 1]; robust to a scorer's outliers)."""
    x = x.float()
    if method == "rank":
        ranks = torch.empty_like(x)
        ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
        return ranks / max(len(x) - 1, 1)
    from lit_ovis.scoring import normalise

    return normalise(x, method)


def combine_scores(raw: dict[str, torch.Tensor], weights: dict[str, float], method: str) -> torch.Tensor:
    """Weighted sum of per-scorer normalised scores -> [N]."""
    total = None
    for name, w in weights.items():
        part = w * normalise_scores(raw[name], method)
        total = part if total is None else total + part
    return total


def select_pairs(score_ref: torch.Tensor, score_gen: torch.Tensor, min_margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep mask, reference_wins mask): keep pairs whose combined scores differ by >= min_margin."""
    diff = score_ref - score_gen
    return diff.abs() >= min_margin, diff > 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_models(cfg: PairsConfig, device: torch.device):
    from lit_ovis.models.backbone import build_backbone
    from lit_ovis.models.text_encoder import build_text_encoder
    from lit_ovis.models.vae import build_vae

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backbone = build_backbone(cfg.backbone_preset, cfg.checkpoint).to(device, dtype).eval()
    text_encoder = build_text_encoder(cfg.text_encoder, cfg.max_sequence_length, dtype=dtype).to(device)
    vae = build_vae(cfg.vae, dtype=dtype).to(device)
    return backbone, text_encoder, vae


def build_scorers(cfg: PairsConfig) -> dict[str, ScoreFn]:
    from lit_ovis.scoring import build_scorer

    try:
        kwargs = json.loads(cfg.scorer_kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--scorer-kwargs is not valid JSON ({err.msg}); e.g. '{{\"clip\": {{\"model\": \"...\"}}}}'") from None
    return {name: build_scorer(name, **kwargs.get(name, {})).score for name in parse_weights(cfg.scorers)}


def load_pool(records, cfg: PairsConfig) -> list[dict]:
    """Reference images cropped to their buckets, as uint8 arrays, with caption / language / target text."""
    from data_modules.buckets import assign_bucket, make_buckets, resize_to_bucket
    from data_modules.records import Skip, check_caption, load_image

    buckets = make_buckets(cfg.resolution, cfg.min_aspect, cfg.max_aspect)
    engine = None
    pool, skipped = [], 0
    for rec in records:
        try:
            if rec.synthetic_index is not None:
                if engine is None:
                    from data_modules.synthetic.engine import TextRenderingEngine

                    engine = TextRenderingEngine(seed=cfg.seed, base_size=cfg.resolution)
                r = engine.render(rec.synthetic_index)
                image, caption, language, target = r.image, r.caption, r.language, r.text
            else:
                image = load_image(rec.path)
                caption, language, target = rec.caption, rec.language, rec.target_text
            caption = check_caption(caption, 2000)
        except (Skip, DataError):
            skipped += 1
            continue
        bucket = assign_bucket(image.width, image.height, buckets)
        arr = np.asarray(resize_to_bucket(image.convert("RGB"), bucket), dtype=np.uint8)
        pool.append({"id": rec.id, "caption": caption, "language": language, "target_text": target,
                     "bucket": bucket, "pixels": arr})
    if not pool:
        raise DataError(f"no usable prompts/images in the pool ({skipped} skipped); check the manifest or folder")
    return pool


@torch.no_grad()
def make_pairs(
    records,
    cfg: PairsConfig,
    scorers: dict[str, ScoreFn] | None = None,
    models: tuple | None = None,
    progress: bool = True,
) -> dict:
    """Generate, score and write preference pairs. `scorers` / `models` (backbone, text_encoder, vae) may be
    given directly (tests, notebooks); otherwise they are built from `cfg`."""
    from data_modules.buckets import bucket_name
    from lit_ovis.sampling.generate import SamplingConfig, generate_images

    weights = parse_weights(cfg.scorers)
    device = _device(cfg.device)
    backbone, text_encoder, vae = models if models is not None else load_models(cfg, device)
    scorers = scorers if scorers is not None else build_scorers(cfg)
    missing = set(weights) - set(scorers)
    if missing:
        raise ConfigError(f"--scorers names {sorted(missing)} but no such scorer was built")
    sampling = SamplingConfig(steps=cfg.steps, guidance_scale=cfg.guidance_scale)
    storage = getattr(torch, cfg.storage_dtype)
    vae_param = next(vae.parameters())

    pool = load_pool(records, cfg)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, item in enumerate(pool):
        by_bucket.setdefault(item["bucket"], []).append(i)

    raw_ref: dict[str, list[torch.Tensor]] = {n: [] for n in weights}
    raw_gen: dict[str, list[torch.Tensor]] = {n: [] for n in weights}
    order: list[int] = []
    done = 0
    for (bw, bh), idx in sorted(by_bucket.items()):
        for start in range(0, len(idx), cfg.batch_size):
            chunk = idx[start: start + cfg.batch_size]
            items = [pool[i] for i in chunk]
            prompts = [it["caption"] for it in items]
            meta = [{"target_text": it["target_text"], "language": it["language"]} for it in items]
            ref_images = torch.from_numpy(np.stack([it["pixels"] for it in items])).permute(0, 3, 1, 2).float() / 255.0
            seeds = [cfg.seed * 1_000_003 + i for i in chunk]  # per-prompt seed: independent of batching
            gen_images = generate_images(backbone, text_encoder, vae, prompts, sampling, seed=seeds, height=bh, width=bw).float().cpu()
            both = torch.cat([ref_images, gen_images])
            for name in weights:
                s = torch.as_tensor(scorers[name](both, prompts + prompts, meta + meta), dtype=torch.float32).reshape(-1).cpu()
                raw_ref[name].append(s[: len(items)])
                raw_gen[name].append(s[len(items):])
            latents = vae.encode((both * 2 - 1).to(vae_param.device, vae_param.dtype)).to("cpu", storage)
            embeds = text_encoder.encode(prompts).float().cpu() if cfg.store_prompt_embeds else None
            for k, (i, it) in enumerate(zip(chunk, items)):
                it["latents_ref"], it["latents_gen"] = latents[k], latents[len(items) + k]
                if embeds is not None:
                    e = embeds[k]
                    nz = (e.abs().sum(-1) > 0).nonzero()
                    it["prompt_embeds"] = e[: int(nz.max()) + 1 if len(nz) else 0].to(storage)  # valid prefix only
                del it["pixels"]
            order.extend(chunk)
            done += len(items)
            if progress:
                print(f"make-pairs: {done}/{len(pool)}", file=sys.stderr)

    ref_raw = {n: torch.cat(v) for n, v in raw_ref.items()}
    gen_raw = {n: torch.cat(v) for n, v in raw_gen.items()}
    n = len(order)
    combined = combine_scores({k: torch.cat([ref_raw[k], gen_raw[k]]) for k in weights}, weights, cfg.normalise)
    score_ref, score_gen = combined[:n], combined[n:]
    keep, ref_wins = select_pairs(score_ref, score_gen, cfg.min_margin)

    pairs = []
    for j, i in enumerate(order):
        if not keep[j]:
            continue
        it = pool[i]
        rw = bool(ref_wins[j])
        pair = {
            "id": it["id"], "caption": it["caption"], "language": it["language"], "target_text": it["target_text"],
            "latents_w": it["latents_ref"] if rw else it["latents_gen"],
            "latents_l": it["latents_gen"] if rw else it["latents_ref"],
            "score_w": float(max(score_ref[j], score_gen[j])), "score_l": float(min(score_ref[j], score_gen[j])),
            "margin": float((score_ref[j] - score_gen[j]).abs()), "winner": "reference" if rw else "generated",
            "bucket": it["bucket"],
        }
        if "prompt_embeds" in it:
            pair["prompt_embeds"] = it["prompt_embeds"]
        pairs.append(pair)

    sizes = write_pairs(Path(cfg.output_dir), pairs, cfg.resolution, bucket_name)
    report = {
        "prompts": len(pool),
        "pairs": len(pairs),
        "dropped_small_margin": int((~keep).sum()),
        "reference_wins": int(sum(p["winner"] == "reference" for p in pairs)),
        "generated_wins": int(sum(p["winner"] == "generated" for p in pairs)),
        "buckets": sizes,
        "resolution": cfg.resolution,
        "has_prompt_embeds": bool(cfg.store_prompt_embeds),
        "scorers": {name: {"weight": weights[name],
                           "reference_mean": float(ref_raw[name].mean()), "generated_mean": float(gen_raw[name].mean())}
                    for name in weights},
        "config": asdict(cfg),
    }
    out = Path(cfg.output_dir)
    tmp = out / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out / REPORT)
    return report


def write_pairs(out: Path, pairs: list[dict], resolution: int, bucket_name) -> dict[str, int]:
    """One LitData dataset per bucket under <out>/<resolution>/<WxH>/, swapped in atomically."""
    from litdata.streaming.writer import BinaryWriter

    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = {}
    for p in pairs:
        groups.setdefault(bucket_name(p["bucket"]), []).append(p)
    root, tmp_root = out / str(resolution), out / f".{resolution}.tmp"
    shutil.rmtree(tmp_root, ignore_errors=True)
    sizes = {}
    for name, group in sorted(groups.items()):
        writer = BinaryWriter(str(tmp_root / name), chunk_bytes="64MB")
        for i, p in enumerate(group):
            writer[i] = {k: v for k, v in p.items() if k != "bucket"}
        writer.done()
        writer.merge()
        sizes[name] = len(group)
    shutil.rmtree(root, ignore_errors=True)
    if tmp_root.exists():
        os.replace(tmp_root, root)
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lit-ovis make-pairs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-dir", help="folder of reference images with sidecar .txt captions")
    src.add_argument("--manifest", help="JSONL or CSV with path, caption[, language, target_text]")
    src.add_argument("--synthetic", type=int, metavar="N", help="use N samples of the synthetic text engine as the pool")
    p.add_argument("--output-dir", required=True)
    for name, default in asdict(PairsConfig(output_dir="")).items():
        if name == "output_dir":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=default)
        else:
            p.add_argument(flag, type=type(default) if default is not None else str, default=default)
    args = p.parse_args(argv)
    values = vars(args)
    cfg = PairsConfig(**{k: values[k] for k in asdict(PairsConfig(output_dir="")) if k in values})
    try:
        from data_modules.prepare import synthetic_records
        from data_modules.records import records_from_folder, records_from_manifest

        if args.synthetic is not None:
            records = synthetic_records(args.synthetic)
        elif args.image_dir:
            records = records_from_folder(args.image_dir)
        else:
            records = records_from_manifest(args.manifest)
        report = make_pairs(records, cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("prompts", "pairs", "dropped_small_margin", "reference_wins", "buckets")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
