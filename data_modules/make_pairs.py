"""`lit-ovis make-pairs`: build Diffusion-DPO preference pairs (report Sec. 3.3).

For every prompt of the pool: take its high-quality reference image (cropped to its aspect-ratio bucket) as
one candidate, generate a second with the current (SFT) model under the same prompt at the same size, score
both with a weighted scorer ensemble (`lit_ovis.scoring.build_scorer`), and keep the pair as
(winner, loser) when the combined scores differ by at least `--min-margin`.

Scoring is `lit_ovis.scoring.ScorerEnsemble` (the same ensemble eval and GRPO use): raw scores per scorer are
normalised over the *whole* pool (both candidates of every prompt) before weighting, so scorers on different
scales (OCR accuracy in [0, 1], CLIPScore, ...) contribute as their weights say. Both candidates are
VAE-encoded from their pixels (the generated one is decoded first), so the training pair never differs by
encoder-versus-sampler latent statistics, only by content.

Streaming and resumable: records are read one at a time and grouped per resolution bucket; every
`--batch-size` prompts of a bucket are generated, scored and saved atomically as one work shard
(`<out>/_work/<resolution>/shard-<first record>.pt` + a `.json` with its ids and raw scores, the restart cache
layout of `prepare`). A killed run skips every
prompt with a finished shard; changed generation or scorer settings refuse to mix with the old shards. The
final pass reads only the raw scores to choose winners, then streams the shards one at a time into the
per-bucket LitData writers, so neither the pool nor the pairs are ever all in memory.

Output (written by the same bucketed writer as `lit-ovis prepare`, `data_modules.writer`; read by
`data_modules.preference`): `<out>/<resolution>/<WxH>/` LitData datasets with items {id, caption, language, target_text, latents_w, latents_l, [prompt_embeds],
score_w, score_l, margin, winner} (winner: "reference" or "generated"), `<out>/<resolution>/report.json` and the
root `<out>/report.json` listing every resolution (`data_modules.layout`).

The generating model is `--checkpoint`: a training checkpoint or an exported folder brings its own architecture,
text encoder, VAE and sampling shift (`lit_ovis.load_module`), so no preset needs naming; `--text-encoder` / `--vae`
replace its encoders, and `--backbone-preset` shapes a bare `.safetensors` file or a random init.

Example:
  lit-ovis make-pairs --manifest pool.jsonl --output-dir data/pairs --resolution 1024 \
      --checkpoint runs/sft/checkpoints/last.ckpt \
      --scorers ocr=1.0,clip=0.5 --scorer-kwargs '{"clip": {"model_path": "/models/clip-vit-large-patch14"}}' \
      --min-margin 0.1
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from data_modules.layout import work_dir
from data_modules.records import add_source_options, records_from_options
from data_modules.writer import BucketedWriter, trim_embeddings
from lit_ovis.errors import CheckpointError, ConfigError, DataError, OneLineArgumentParser
from lit_ovis.files import atomic_write
from lit_ovis.options import add_options, from_options
from lit_ovis.scoring.ensemble import ScorerEnsemble, build_ensemble as ensemble_from_options, parse_weights
from lit_ovis.seeds import mix_seed

ScoreFn = Callable[[torch.Tensor, list, list], torch.Tensor]


@dataclass
class PairsConfig:
    """Settings of `lit-ovis make-pairs` (each field is a --kebab-case option)."""

    output_dir: str
    """Root of the pair datasets; each resolution goes to <output_dir>/<resolution>/."""
    resolution: int = 1024
    """Bucket target side in px (area ~ resolution^2), as in `lit-ovis prepare`."""
    min_aspect: float = 0.25
    """Narrowest bucket (width / height)."""
    max_aspect: float = 4.0
    """Widest bucket (width / height)."""
    backbone_preset: str = "ovis-image-7b"
    """Backbone preset for a random init or a .safetensors --checkpoint (a training checkpoint or folder has its own)."""
    checkpoint: str | None = None
    """SFT weights: a lit-ovis .ckpt or sharded directory, an exported pipeline folder, a transformer folder or
    .safetensors file (unset: random init)."""
    text_encoder: str | None = None
    """Text encoder preset, folder or hub id; unset: the --checkpoint's own (AIDC-AI/Ovis-Image-7B when it has none)."""
    vae: str | None = None
    """VAE preset, folder or hub id; unset: the --checkpoint's own (AIDC-AI/Ovis-Image-7B when it has none)."""
    max_sequence_length: int | None = None
    """Text-encoder length; unset: the --checkpoint's own (256 when it has none)."""
    steps: int = 50
    """Denoising steps of the generated candidate."""
    guidance_scale: float = 5.0
    """CFG scale of the generated candidate."""
    seed: int = 0
    """Generation seed; each record's seed derives from it and the record's index (independent of batching)."""
    batch_size: int = 4
    """Prompts per generate / score / encode batch (and per restart-cache shard)."""
    scorers: str = "ocr=1.0"
    """Comma-separated name=weight of `lit_ovis.scoring` scorers."""
    scorer_kwargs: str = "{}"
    """JSON {"name": {...}} passed to the scorers, e.g. {"clip": {"model_path": "/models/clip"}}."""
    normalise: str = "zscore"
    """Per-scorer normalisation over the whole pool: zscore, minmax, rank or none."""
    min_margin: float = 0.1
    """Keep a pair when the combined (normalised, weighted) scores differ by at least this much."""
    store_prompt_embeds: bool = False
    """Store the prompts' text embeddings with the pairs (else captions only)."""
    storage_dtype: str = "float16"
    """torch dtype name of the latents / embeddings on disk."""
    device: str = "auto"
    """Device: "auto" (a GPU when present), "cpu", "cuda:0", ..."""


# Settings that change what a finished shard holds: a resumed run must match them.
SHARD_FIELDS = ("resolution", "min_aspect", "max_aspect", "backbone_preset", "checkpoint", "text_encoder", "vae",
                "max_sequence_length", "steps", "guidance_scale", "seed", "scorer_kwargs", "store_prompt_embeds", "storage_dtype")


def select_pairs(score_ref: torch.Tensor, score_gen: torch.Tensor, min_margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep mask, reference_wins mask): keep pairs whose combined scores differ by >= min_margin."""
    diff = score_ref - score_gen
    return diff.abs() >= min_margin, diff > 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DEFAULT_ENCODERS = "AIDC-AI/Ovis-Image-7B"


def brings_its_own_model(checkpoint: str | None) -> bool:
    """A training checkpoint or a pipeline folder: architecture, encoders and sampling shift included."""
    from lit_ovis.checkpoints import is_training_checkpoint
    from lit_ovis.loading import PIPELINE_INDEX

    return bool(checkpoint) and (is_training_checkpoint(checkpoint) or (Path(checkpoint) / PIPELINE_INDEX).is_file())


def load_models(cfg: PairsConfig, device: torch.device):
    """((backbone, text_encoder, vae), the sampling settings the model came with)."""
    from lit_ovis.models.backbone import build_backbone
    from lit_ovis.models.text_encoder import build_text_encoder
    from lit_ovis.models.vae import build_vae
    from lit_ovis.sampling.generate import SamplingConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cut = "pipeline"  # a bare transformer file or random init: the pipeline's template cut
    if brings_its_own_model(cfg.checkpoint):
        from lit_ovis.loading import load_module

        module = load_module(cfg.checkpoint, max_sequence_length=cfg.max_sequence_length)
        backbone, text_encoder, vae, sampling = module.backbone, module.text_encoder, module.vae, module.sampling_cfg
        cut = module.encoders_cfg.template_cut
    else:
        backbone, text_encoder, vae, sampling = build_backbone(cfg.backbone_preset, cfg.checkpoint), None, None, SamplingConfig()
    if cfg.text_encoder or text_encoder is None:
        text_encoder = build_text_encoder(cfg.text_encoder or DEFAULT_ENCODERS, cfg.max_sequence_length or 256, dtype=dtype,
                                          template_cut=cut)
    if cfg.vae or vae is None:
        vae = build_vae(cfg.vae or DEFAULT_ENCODERS, dtype=dtype)
    return (backbone.to(device, dtype).eval(), text_encoder.to(device, dtype), vae.to(device, dtype)), sampling


def build_ensemble(cfg: PairsConfig, scorers: dict[str, ScoreFn] | None = None) -> ScorerEnsemble:
    """The scorer ensemble of `--scorers` (name=weight) with `--scorer-kwargs`; `scorers` given by a caller
    (tests, notebooks) stand in for the registry and must cover every name."""
    if scorers is not None:
        missing = set(parse_weights(cfg.scorers)) - set(scorers)
        if missing:
            raise ConfigError(f"--scorers names {sorted(missing)} but no such scorer was given")
        scorers = {n: scorers[n] for n in parse_weights(cfg.scorers)}
    return ensemble_from_options(cfg.scorers, cfg.scorer_kwargs, cfg.normalise, scorers=scorers)


def _load_item(rec, cfg: PairsConfig, buckets, engine_box: list):
    """A reference image cropped to its bucket (uint8 array) with caption / language / target text."""
    from data_modules.buckets import assign_bucket, resize_to_bucket
    from data_modules.records import Skip, check_caption, load_image

    if rec.skip:  # a bad manifest row or undecodable caption, found while reading the inputs
        raise Skip(rec.skip)
    if rec.synthetic_index is not None:
        if not engine_box:
            from data_modules.synthetic.engine import TextRenderingEngine

            engine_box.append(TextRenderingEngine(seed=cfg.seed, base_size=cfg.resolution))
        r = engine_box[0].render(rec.synthetic_index)
        image, caption, language, target = r.image, r.caption, r.language, r.text
    else:
        image = load_image(rec.path)
        caption, language, target = rec.caption, rec.language, rec.target_text
    caption = check_caption(caption, 2000)
    bucket = assign_bucket(image.width, image.height, buckets)
    return {"id": rec.id, "caption": caption, "language": language, "target_text": target, "bucket": bucket,
            "pixels": np.asarray(resize_to_bucket(image.convert("RGB"), bucket), dtype=np.uint8)}


def _key(index: int, rec_id: str) -> str:
    return f"{index}:{rec_id}"


def _open_work(out: Path, cfg: PairsConfig, names: list[str]) -> tuple[Path, dict[str, dict]]:
    """The work folder of this output and the sidecars of its finished shards (refusing foreign settings)."""
    work = work_dir(out, cfg.resolution)
    work.mkdir(parents=True, exist_ok=True)
    settings = {**{k: getattr(cfg, k) for k in SHARD_FIELDS}, "scorer_names": sorted(names)}
    cfg_path = work / "settings.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            raise ConfigError(f"{out}: holds an unfinished make-pairs run with other settings ({', '.join(changed)}); "
                              f"rerun with those settings, use another --output-dir, or delete {work}")
    else:
        atomic_write(cfg_path, json.dumps(settings, indent=1))
    shards = {}
    for side in sorted(work.glob("shard-*.json")):
        if side.with_suffix(".pt").exists():
            shards[side.stem] = json.loads(side.read_text(encoding="utf-8"))
    return work, shards


@torch.no_grad()
def _process_chunk(chunk: list[tuple[int, dict]], cfg: PairsConfig, ensemble: ScorerEnsemble, models, sampling, work: Path) -> None:
    """Generate, score and VAE-encode one bucket batch; save it as an atomic work shard."""
    from lit_ovis.sampling.generate import generate_images

    backbone, text_encoder, vae = models
    vae_param = next(vae.parameters())
    storage = getattr(torch, cfg.storage_dtype)
    items = [it for _, it in chunk]
    bw, bh = items[0]["bucket"]
    prompts = [it["caption"] for it in items]
    meta = [{"target_text": it["target_text"], "language": it["language"]} for it in items]
    ref_images = torch.from_numpy(np.stack([it["pixels"] for it in items])).permute(0, 3, 1, 2).float() / 255.0
    seeds = [mix_seed(cfg.seed, index=i) for i, _ in chunk]  # per-record seed: independent of batching and resumes
    gen_images = generate_images(backbone, text_encoder, vae, prompts, sampling, seed=seeds, height=bh, width=bw).float().cpu()
    both = torch.cat([ref_images, gen_images])
    raw, _ = ensemble.components(both, prompts + prompts, meta + meta)
    latents = vae.encode((both * 2 - 1).to(vae_param.device, vae_param.dtype)).to("cpu", storage)
    embeds = text_encoder.encode(prompts).float().cpu() if cfg.store_prompt_embeds else None
    n = len(items)
    rows = []
    for k, it in enumerate(items):
        row = {key: it[key] for key in ("id", "caption", "language", "target_text")}
        row.update(latents_ref=latents[k].clone(), latents_gen=latents[n + k].clone())
        if embeds is not None:
            row["prompt_embeds"] = trim_embeddings(embeds[k]).to(storage).clone()
        rows.append(row)
    name = f"shard-{chunk[0][0]:09d}"
    buf = io.BytesIO()
    torch.save(rows, buf)
    atomic_write(work / f"{name}.pt", buf.getvalue())
    side = {"keys": [_key(i, it["id"]) for i, it in chunk], "bucket": [bw, bh],
            "ref": {s: raw[s][:n].tolist() for s in raw}, "gen": {s: raw[s][n:].tolist() for s in raw}}
    atomic_write(work / f"{name}.json", json.dumps(side))  # written last: the shard counts as finished


@torch.no_grad()
def make_pairs(
    records: Iterable,
    cfg: PairsConfig,
    scorers: dict[str, ScoreFn] | None = None,
    models: tuple | None = None,
    progress: bool = True,
) -> dict:
    """Generate, score and write preference pairs. `scorers` / `models` (backbone, text_encoder, vae) may be
    given directly (tests, notebooks); otherwise they are built from `cfg`. `records` is consumed lazily."""
    from data_modules.buckets import make_buckets
    from data_modules.records import Skip
    from lit_ovis.sampling.generate import SamplingConfig

    ensemble = build_ensemble(cfg, scorers)
    names = list(ensemble.scorers)
    out = Path(cfg.output_dir)
    work, shards = _open_work(out, cfg, names)
    done = {k for side in shards.values() for k in side["keys"]}
    resumed = len(done)
    sampling = SamplingConfig(steps=cfg.steps, guidance_scale=cfg.guidance_scale)  # shift: the loaded model's (below)
    buckets = make_buckets(cfg.resolution, cfg.min_aspect, cfg.max_aspect)
    engine_box: list = []
    queues: dict[tuple[int, int], list[tuple[int, dict]]] = {}
    skipped = new = 0

    def flush(bucket) -> None:
        nonlocal models, new, sampling
        chunk = queues.pop(bucket)
        if models is None:  # loaded only when there is work left
            models, base = load_models(cfg, _device(cfg.device))
            sampling = replace(base, steps=cfg.steps, guidance_scale=cfg.guidance_scale)
        _process_chunk(chunk, cfg, ensemble, models, sampling, work)
        new += len(chunk)
        if progress:
            print(f"make-pairs: {resumed + new} prompts done ({resumed} from an earlier run), {skipped} skipped", file=sys.stderr)

    for index, rec in enumerate(records):
        if _key(index, rec.id) in done:
            continue
        try:
            item = _load_item(rec, cfg, buckets, engine_box)
        except (Skip, DataError):
            skipped += 1
            continue
        queues.setdefault(item["bucket"], []).append((index, item))
        if len(queues[item["bucket"]]) >= cfg.batch_size:
            flush(item["bucket"])
    for bucket in sorted(queues):
        flush(bucket)

    _, shards = _open_work(out, cfg, names)
    if not shards:
        raise DataError(f"no usable prompts/images in the pool ({skipped} skipped); check the manifest or folder")
    report = _finish(out, work, shards, ensemble, cfg, skipped, resumed)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _finish(out: Path, work: Path, shards: dict[str, dict], ensemble: ScorerEnsemble, cfg: PairsConfig, skipped: int, resumed: int) -> dict:
    """Choose winners from the pool-normalised scores, then stream the shards into per-bucket LitData datasets."""
    from data_modules.buckets import bucket_name

    order = sorted(shards)
    ref = {s: torch.tensor([v for n in order for v in shards[n]["ref"][s]]) for s in ensemble.weights}
    gen = {s: torch.tensor([v for n in order for v in shards[n]["gen"][s]]) for s in ensemble.weights}
    total = len(next(iter(ref.values())))
    combined = ensemble.combine({s: torch.cat([ref[s], gen[s]]) for s in ensemble.weights})
    score_ref, score_gen = combined[:total], combined[total:]
    keep, ref_wins = select_pairs(score_ref, score_gen, cfg.min_margin)

    writer = BucketedWriter(out, cfg.resolution)
    wins = {"reference": 0, "generated": 0}
    j = 0
    for name in order:
        bucket = bucket_name(tuple(shards[name]["bucket"]))
        for row in torch.load(work / f"{name}.pt", weights_only=True):
            if keep[j]:
                rw = bool(ref_wins[j])
                pair = {key: row[key] for key in ("id", "caption", "language", "target_text")}
                pair.update(latents_w=row["latents_ref"] if rw else row["latents_gen"],
                            latents_l=row["latents_gen"] if rw else row["latents_ref"],
                            score_w=float(max(score_ref[j], score_gen[j])), score_l=float(min(score_ref[j], score_gen[j])),
                            margin=float((score_ref[j] - score_gen[j]).abs()), winner="reference" if rw else "generated")
                if "prompt_embeds" in row:
                    pair["prompt_embeds"] = row["prompt_embeds"]
                writer.add(bucket, pair)
                wins[pair["winner"]] += 1
            j += 1
    report = {
        "prompts": total,
        "inputs": total,
        "kept": int(keep.sum()),
        "pairs": int(keep.sum()),
        "dropped_small_margin": int((~keep).sum()),
        "reference_wins": wins["reference"],
        "generated_wins": wins["generated"],
        "skipped": skipped,
        "resumed_prompts": resumed,
        "has_prompt_embeds": bool(cfg.store_prompt_embeds),
        "scorers": {s: {"weight": ensemble.weights[s], "reference_mean": float(ref[s].mean()), "generated_mean": float(gen[s].mean())}
                    for s in ensemble.weights},
        "config": asdict(cfg),
    }
    # Same layout as `prepare`: this resolution's report travels inside its dataset swap, and the root report
    # lists every resolution, so several pair resolutions can share one root.
    return writer.finish(report)


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="lit-ovis make-pairs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_options(p)
    add_options(p, PairsConfig)
    args = p.parse_args(argv)
    cfg = from_options(PairsConfig, args)
    try:
        report = make_pairs(records_from_options(args), cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("prompts", "pairs", "dropped_small_margin", "reference_wins", "buckets")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
