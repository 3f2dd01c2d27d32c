"""A training checkpoint exports to a diffusers folder that OvisImagePipeline opens and that generates the
same image as our sampler."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers import OvisImagePipeline

from helpers import LatentSet, loader, tiny_flow_module, tiny_trainer
from lit_ovis.cli.export import export_checkpoint, main as export_main


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    L.seed_everything(0)
    module = tiny_flow_module()
    trainer = tiny_trainer(5, default_root_dir=root)
    trainer.fit(module, loader(LatentSet(n=4)))
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    return module, path


def test_export_round_trips_through_pipeline(trained_checkpoint, tmp_path):
    module, ckpt = trained_checkpoint
    out = export_checkpoint(str(ckpt), str(tmp_path / "exported"))
    assert not list(tmp_path.glob(".exported.tmp-*"))  # temp folder renamed away
    pipe = OvisImagePipeline.from_pretrained(out)
    trained = dict(module.backbone.state_dict())
    assert all(torch.equal(v, trained[k]) for k, v in pipe.transformer.state_dict().items())
    ref = pipe(
        ["a sign that says OPEN"], height=32, width=32, num_inference_steps=4, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(7), output_type="pt", max_sequence_length=8,
    ).images
    ours = module.sample(["a sign that says OPEN"], seed=7)
    assert (ours - ref).abs().max().item() < 1e-4


def test_export_of_an_ema_run_generates_what_its_sample_grids_showed(tmp_path):
    """With EMA on, `sample()` (grids, eval) uses the EMA weights; the default export must match it."""
    from lit_ovis.modules.config import EMAConfig

    L.seed_everything(0)
    module = tiny_flow_module(ema=EMAConfig(enabled=True, decay=0.5))
    trainer = tiny_trainer(4, default_root_dir=tmp_path)
    trainer.fit(module, loader(LatentSet(n=4)))
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    pipe = OvisImagePipeline.from_pretrained(export_checkpoint(str(tmp_path / "ema.ckpt"), str(tmp_path / "out")))
    kwargs = dict(height=32, width=32, num_inference_steps=4, guidance_scale=3.0, output_type="pt", max_sequence_length=8)
    ref = pipe(["a sign"], generator=torch.Generator().manual_seed(3), **kwargs).images
    assert (module.sample(["a sign"], seed=3) - ref).abs().max().item() < 1e-4
    raw = OvisImagePipeline.from_pretrained(export_checkpoint(str(tmp_path / "ema.ckpt"), str(tmp_path / "raw"), use_ema=False))
    assert (raw(["a sign"], generator=torch.Generator().manual_seed(3), **kwargs).images - ref).abs().max().item() > 1e-4


def test_checkpoint_has_no_frozen_encoders(trained_checkpoint):
    _, ckpt = trained_checkpoint
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("backbone.") for k in state)
    assert not any(k.startswith(("text_encoder", "vae", "_frozen")) for k in state)


def test_missing_and_corrupt_checkpoint_give_one_line_errors(tmp_path, capsys):
    assert export_main([str(tmp_path / "nope.ckpt"), str(tmp_path / "out")]) == 2
    assert "checkpoint not found" in capsys.readouterr().out
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage")
    assert export_main([str(bad), str(tmp_path / "out")]) == 2
    out = capsys.readouterr().out
    assert "corrupt checkpoint" in out and len(out.strip().splitlines()) == 1
