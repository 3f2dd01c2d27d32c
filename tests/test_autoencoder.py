"""The project's own small AutoencoderKL (lit_ovis.models.autoencoder_training) at a tiny size: round-trip
shapes at 8x, scaling/shift measured from the data and applied as the pipeline applies them, a short training
lowers the reconstruction loss, the fingerprinted cache is reused / refused / rebuilt, the folder loads through
`build_vae` and, with a tiny transformer, in `OvisImagePipeline` (same images as our sampler)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lit_ovis.errors import ConfigError
from lit_ovis.models.autoencoder_training import (
    AutoencoderConfig, ImageSet, batch_order, ensure_autoencoder, latent_statistics, load_manifest_images, read_report,
    to_unit_range, train_autoencoder,
)
from lit_ovis.models.vae import FluxVAE, build_vae

# 4 levels (8x, as FLUX and the pipeline's default) with 16 latent channels (the tiny transformer's 64 / 4).
TINY = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=16, batch_size=4, crop_size=0,
            warmup_steps=2, lr=3e-3, stats_images=16, threads=1)


def _write_manifest(folder, n: int = 12) -> str:
    """Small two-size image set with sharp bars (text-like edges) and a JSONL manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        w, h = (32, 16) if i % 3 else (16, 16)
        arr = np.full((h, w, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        x = int(rng.integers(0, w - 6))
        arr[3:h - 3, x: x + 3] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"{i}.png")
        rows.append(json.dumps({"path": f"{i}.png", "caption": f"bar {i}", "target_text": "", "language": "en"}))
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    return str(folder / "train.jsonl")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return _write_manifest(tmp_path_factory.mktemp("ae") / "images")


@pytest.fixture(scope="module")
def trained(manifest, tmp_path_factory):
    cfg = AutoencoderConfig(**TINY, steps=40)
    out = tmp_path_factory.mktemp("ae_out") / "vae"
    folder, report = ensure_autoencoder(cfg, manifest, out, log=None, log_every=10)
    return cfg, folder, report


def test_round_trip_shapes_at_8x_and_grouped_loading(manifest):
    images = load_manifest_images(manifest, multiple=16)
    assert sorted(tuple(g.shape[2:]) for g in images.groups) == [(16, 16), (16, 32)]
    assert len(images) == 12 and len(images.identity) == 12
    cfg = AutoencoderConfig(**TINY)
    assert cfg.scale_factor == 8
    from diffusers import AutoencoderKL

    vae = FluxVAE(AutoencoderKL(**cfg.diffusers_kwargs()))
    x = to_unit_range(images.groups[1][:2])
    z = vae.encode(x)
    assert z.shape == (2, 16, 2, 4)
    assert vae.decode(z).shape == x.shape


def test_batches_keep_one_size_and_visit_every_image():
    order = batch_order([5, 3], batch_size=2, steps=40, seed=0)
    assert all(len(idx) == 2 and max(idx) < (5 if g == 0 else 3) for g, idx in order)
    assert {(g, i) for g, idx in order for i in idx} == {(0, i) for i in range(5)} | {(1, i) for i in range(3)}


def test_short_training_lowers_the_loss_and_sets_scaling_from_the_data(trained, manifest):
    cfg, folder, report = trained
    curve = [c["reconstruction_loss"] for c in report["curve"]]
    assert curve[-1] < 0.8 * curve[0], curve  # a trainer that does not update stays flat (ratio ~1)
    vae = build_vae(str(folder))
    # The pipeline decodes z / scaling_factor + shift_factor: our FluxVAE applies exactly that, with the
    # factors measured on the training images, so their normalised latents have mean 0 and std 1.
    assert vae.scaling_factor == pytest.approx(report["scaling_factor"]) == pytest.approx(1 / report["latent_std"])
    assert vae.shift_factor == pytest.approx(report["shift_factor"])
    images = load_manifest_images(manifest, multiple=16)
    z = torch.cat([vae.encode(to_unit_range(g)).flatten() for g in images.groups])
    assert abs(z.mean().item()) < 1e-3 and z.std().item() == pytest.approx(1.0, abs=1e-2)
    raw = vae.vae.encode(to_unit_range(images.groups[0])).latent_dist.mode()
    torch.testing.assert_close(vae.encode(to_unit_range(images.groups[0])), (raw - vae.shift_factor) * vae.scaling_factor)


def test_statistics_are_mean_and_std_of_the_latent_means():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**AutoencoderConfig(**TINY).diffusers_kwargs())
    images = ImageSet([torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8)], [])
    stats = latent_statistics(vae, images, max_images=6, batch_size=4)
    z = vae.encode(to_unit_range(images.groups[0])).latent_dist.mean
    assert stats["latent_mean"] == pytest.approx(z.mean().item(), abs=1e-6)
    assert stats["latent_std"] == pytest.approx(z.std(unbiased=False).item(), rel=1e-5)


def test_cache_is_reused_refused_and_rebuilt(trained, manifest):
    cfg, folder, report = trained
    weights = folder / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    again, rep = ensure_autoencoder(cfg, manifest, folder, log=None)
    assert again == folder and rep["trained_this_run"] is False and rep["fingerprint"] == report["fingerprint"]
    assert weights.stat().st_mtime_ns == before
    other = AutoencoderConfig(**{**TINY, "steps": 3})
    with pytest.raises(ConfigError, match="--overwrite"):
        ensure_autoencoder(other, manifest, folder, log=None)
    assert read_report(folder)["fingerprint"] == report["fingerprint"]  # refused: the old one is untouched
    copy = folder.parent / "copy"
    _, rebuilt = ensure_autoencoder(other, manifest, copy, log=None)
    assert rebuilt["trained_this_run"] and rebuilt["fingerprint"] != report["fingerprint"]
    _, over = ensure_autoencoder(cfg, manifest, copy, overwrite=True, log=None)
    assert over["trained_this_run"] and read_report(copy)["fingerprint"] == report["fingerprint"]
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_changed_training_images_change_the_fingerprint(tmp_path):
    path = _write_manifest(tmp_path / "imgs", n=6)
    cfg = AutoencoderConfig(**TINY, steps=2)
    from lit_ovis.models.autoencoder_training import fingerprint

    first = fingerprint(cfg, load_manifest_images(path, 16))
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "imgs" / "0.png")
    assert fingerprint(cfg, load_manifest_images(path, 16)) != first
    assert fingerprint(AutoencoderConfig(**{**TINY, "threads": 2}, steps=2), load_manifest_images(path, 16)) == \
        fingerprint(AutoencoderConfig(**TINY, steps=2), load_manifest_images(path, 16))  # threads: speed only


def test_bad_settings_are_one_line_errors(manifest, tmp_path):
    with pytest.raises(ConfigError, match="norm-num-groups"):
        AutoencoderConfig(block_out_channels=(8, 12), norm_num_groups=8).check()
    with pytest.raises(ConfigError, match="crop-size"):
        AutoencoderConfig(**{**TINY, "crop_size": 20}).check()
    from lit_ovis.errors import DataError

    (tmp_path / "empty.jsonl").write_text(json.dumps({"path": "missing.png", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match="no usable images"):
        load_manifest_images(tmp_path / "empty.jsonl", 16)


def _random_folder(path, levels: int):
    """An untrained autoencoder with non-trivial scaling/shift, saved the way training saves it."""
    from diffusers import AutoencoderKL

    from lit_ovis.models.autoencoder_training import save_autoencoder

    cfg = AutoencoderConfig(**{**TINY, "block_out_channels": (8,) * levels})
    torch.manual_seed(levels)
    vae = AutoencoderKL(**cfg.diffusers_kwargs())
    vae.register_to_config(scaling_factor=0.7, shift_factor=0.1)
    return save_autoencoder(vae, {"fingerprint": "test"}, path)


# 4x only: the pipeline's default 8x geometry is covered by test_export / test_sampler_parity (FLUX-shaped VAE).
@pytest.mark.parametrize("levels,scale", [(3, 4)])
def test_folder_opens_in_ovis_pipeline_with_a_matching_tiny_transformer(levels, scale, tiny_backbone, tiny_text_encoder, tmp_path):
    from diffusers import OvisImagePipeline

    from lit_ovis.cli.export import build_pipeline
    from lit_ovis.sampling.generate import SamplingConfig, generate_images

    vae = build_vae(str(_random_folder(tmp_path / "vae", levels)))
    assert vae.scale_factor == scale and tiny_backbone.config.in_channels == 4 * vae.latent_channels
    build_pipeline(tiny_backbone, tiny_text_encoder, vae, SamplingConfig()).save_pretrained(tmp_path / "pipe")
    pipe = OvisImagePipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.vae_scale_factor == scale
    assert pipe.vae.config.scaling_factor == pytest.approx(0.7) and pipe.vae.config.shift_factor == pytest.approx(0.1)
    prompt = ['a label reading "TEA"']
    ref = pipe(prompt, height=32, width=48, num_inference_steps=3, guidance_scale=3.0, output_type="pt",
               generator=torch.Generator().manual_seed(5), max_sequence_length=32).images
    ours = generate_images(tiny_backbone, tiny_text_encoder, vae, prompt, SamplingConfig(steps=3, guidance_scale=3.0), seed=5,
                           height=32, width=48)
    assert ours.shape == ref.shape == (1, 3, 32, 48)
    assert (ours - ref).abs().max().item() < 1e-4


def test_a_4x_latent_space_flows_through_prepare_the_data_module_and_sampling(manifest, tmp_path):
    from data_modules.prepare import PrepareConfig, prepare
    from data_modules.records import records_from_manifest
    from data_modules.streaming import LatentDataModule
    from helpers import tiny_flow_module
    from lit_ovis.modules.config import EncoderConfig

    folder = _random_folder(tmp_path / "vae", levels=3)
    report = prepare(records_from_manifest(manifest), PrepareConfig(output_dir=str(tmp_path / "lat"), resolution=32, min_side=16,
                                                                     dedup=False, vae=str(folder), num_workers=1), progress=False)
    assert (report["latent_channels"], report["latent_scale"]) == (16, 4)
    dm = LatentDataModule(root=str(tmp_path / "lat"), batch_size=2, num_workers=0)  # geometry from the prepare report
    dm.setup("fit")
    batches = [dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]
    shapes = {tuple(b["latents"].shape[1:]) for b in batches}
    from data_modules.buckets import make_buckets

    assert shapes and shapes <= {(16, h // 4, w // 4) for w, h in make_buckets(32)}
    assert dm.corrupt_skipped == 0  # 4x latents are not mistaken for corrupt 8x ones
    module = tiny_flow_module(encoders=EncoderConfig(max_sequence_length=8, vae=str(folder)))
    module.flow_loss(batches[0])  # trains on 4x latents
    images = module.sample(["hi"], height=32, width=48)
    assert images.shape == (1, 3, 32, 48)


def test_prepare_cache_follows_an_autoencoder_retrained_in_place(manifest, tmp_path):
    from data_modules.prepare import PrepareConfig, model_files_identity, shard_keys
    from data_modules.records import records_from_manifest

    folder = _random_folder(tmp_path / "vae", levels=3)
    records = records_from_manifest(manifest)
    cfg = PrepareConfig(output_dir=str(tmp_path / "lat"), resolution=32, vae=str(folder))
    before = shard_keys(records, cfg)
    assert shard_keys(records, cfg) == before
    _random_folder(tmp_path / "vae", levels=3)  # same path, new weights (train-autoencoder --overwrite)
    assert shard_keys(records, cfg) != before
    assert model_files_identity("tiny") is None  # presets and hub ids keep the keys they always had


def test_cli_trains_reuses_and_reports_reconstruction_ocr(manifest, tmp_path, capsys):
    from lit_ovis.__main__ import main

    args = ["train-autoencoder", "--manifest", manifest, "--output-dir", str(tmp_path / "ae"), "--block-out-channels", "8,8,8",
            "--norm-num-groups", "4", "--steps", "2", "--batch-size", "2", "--stats-images", "4", "--log-every", "1",
            "--eval-manifest", manifest, "--eval-limit", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"): out.rindex("}") + 1])
    assert summary["trained_this_run"] and summary["scale_factor"] == 4
    assert set(summary["eval"]["train"]) >= {"original", "reconstruction", "psnr_db"}  # OCR of both sides
    assert "eval" in read_report(tmp_path / "ae")
    cached = args[:-4]  # the reuse and the refusal need no second OCR pass
    assert main(cached) == 0 and '"trained_this_run": false' in capsys.readouterr().out
    assert main([*cached, "--steps", "3"]) == 2 and "--overwrite" in capsys.readouterr().err
