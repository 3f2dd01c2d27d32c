"""A run started from a custom-shaped diffusers folder (no preset has its shape) exports, evals, makes pairs,
consolidates and is restored without anyone naming a preset: its checkpoints carry the architecture it trained."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import OvisImagePipeline, OvisImageTransformer2DModel
from PIL import Image

from helpers import LatentSet, loader, tiny_flow_module, tiny_trainer, torch_threads
from lit_ovis.checkpoints import ARCHITECTURE_KEY
from lit_ovis.errors import CheckpointError
from lit_ovis.modules.config import BackboneConfig

# Smaller than the `tiny` preset in every block count and head size (its text width stays the tiny encoder's).
CUSTOM = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
SHAPE = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads")


def _shape(config) -> dict:
    return {k: config[k] for k in SHAPE}


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """(module, checkpoint path, custom folder): 2 steps of SFT from the folder, with the config's preset left at
    its default ("tiny", another shape)."""
    root = tmp_path_factory.mktemp("custom")
    with torch_threads(1):
        torch.manual_seed(1)
        OvisImageTransformer2DModel(**CUSTOM).save_pretrained(root / "custom")
        L.seed_everything(0)
        module = tiny_flow_module(backbone=BackboneConfig(pretrained=str(root / "custom")))
        trainer = tiny_trainer(2, default_root_dir=root)
        trainer.fit(module, loader(LatentSet(n=2), batch_size=2))
        trainer.save_checkpoint(root / "run.ckpt")
    return module, root / "run.ckpt", root / "custom"


def test_checkpoint_carries_the_architecture_it_trained(custom_run):
    _, ckpt, _ = custom_run
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)[ARCHITECTURE_KEY]
    assert _shape(stored) == _shape(CUSTOM)


def test_export_eval_make_pairs_and_consolidate_without_a_preset(custom_run, tmp_path):
    from data_modules.make_pairs import PairsConfig, load_models, make_pairs
    from data_modules.records import records_from_folder
    from lit_ovis.cli.consolidate import consolidate
    from lit_ovis.cli.eval import main as eval_main
    from lit_ovis.cli.export import export_checkpoint

    module, ckpt, _ = custom_run
    trained = module.backbone.state_dict()
    with torch_threads(1):
        # export: the pipeline's transformer has the run's shape and weights, and samples as the module does
        pipe = OvisImagePipeline.from_pretrained(export_checkpoint(str(ckpt), str(tmp_path / "exported")))
        assert _shape(pipe.transformer.config) == _shape(CUSTOM)
        assert all(torch.equal(v, trained[k]) for k, v in pipe.transformer.state_dict().items())
        # consolidate: a diffusers transformer folder of the same shape
        consolidate(str(ckpt), str(tmp_path / "w.safetensors"), diffusers_dir=str(tmp_path / "transformer"))
        assert _shape(OvisImageTransformer2DModel.load_config(tmp_path / "transformer")) == _shape(CUSTOM)
        # eval straight from the checkpoint
        prompts = tmp_path / "p.txt"
        prompts.write_text("a red sign\n")
        assert eval_main([str(ckpt), str(prompts), "--output-dir", str(tmp_path / "eval"), "--scorers", "brightness",
                          "--steps", "2", "--height", "32", "--width", "32"]) == 0
        assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["aggregate"]["samples"] == 1
        # make-pairs from the checkpoint: its own backbone shape, encoders and sampling shift
        cfg = PairsConfig(output_dir=str(tmp_path / "pairs"), resolution=32, checkpoint=str(ckpt), steps=2,
                          guidance_scale=1.0, batch_size=2, scorers="bright=1.0", normalise="none", min_margin=0.0,
                          device="cpu", max_sequence_length=8)
        (backbone, _, _), sampling = load_models(cfg, torch.device("cpu"))
        assert _shape(backbone.config) == _shape(CUSTOM) and sampling == module.sampling_cfg
        pool = tmp_path / "pool"
        pool.mkdir()
        for name, value in (("white", 255), ("black", 0)):
            Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(pool / f"{name}.png")
            (pool / f"{name}.txt").write_text(f"a {name} square")
        brightness = lambda images, prompts, metadata: images.float().mean(dim=(1, 2, 3))  # noqa: E731
        report = make_pairs(records_from_folder(pool), cfg, scorers={"bright": brightness}, progress=False)
        assert report["prompts"] == 2 and report["pairs"] == 2


def test_checkpoints_written_before_the_architecture_was_saved_use_their_runs_folder(custom_run, tmp_path):
    from lit_ovis.cli.export import export_checkpoint

    _, ckpt, _ = custom_run
    old = torch.load(ckpt, map_location="cpu", weights_only=False)
    del old[ARCHITECTURE_KEY]
    torch.save(old, tmp_path / "old.ckpt")
    with torch_threads(1):
        pipe = OvisImagePipeline.from_pretrained(export_checkpoint(str(tmp_path / "old.ckpt"), str(tmp_path / "out")))
    assert _shape(pipe.transformer.config) == _shape(CUSTOM)


def test_restoring_a_checkpoint_builds_its_architecture_or_says_why_not_in_one_line(custom_run, tmp_path):
    """What the CLI does before validate / predict / a resumed fit (`OvisCLI._use_checkpoint_architecture`)."""
    module, ckpt, _ = custom_run
    fresh = tiny_flow_module(configure=False)  # preset "tiny", no pretrained: the config alone names another shape
    fresh.use_architecture_of(str(ckpt))
    fresh.configure_model()
    assert _shape(fresh.backbone.config) == _shape(CUSTOM)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    fresh.load_state_dict(state)
    assert all(torch.equal(v, module.backbone.state_dict()[k]) for k, v in fresh.backbone.state_dict().items())

    other = tmp_path / "other"
    OvisImageTransformer2DModel(**{**CUSTOM, "num_single_layers": 2}).save_pretrained(other)
    wrong = tiny_flow_module(configure=False, backbone=BackboneConfig(pretrained=str(other)))
    with pytest.raises(CheckpointError) as err:
        wrong.use_architecture_of(str(ckpt))
    message = str(err.value)
    assert "\n" not in message and "num_single_layers 1 vs 2" in message and "--model.backbone.pretrained" in message


def test_a_dpo_reference_takes_the_policys_architecture(custom_run, tmp_path):
    """The reference is the policy's starting point: a folder of the policy's custom shape builds (a preset is
    not consulted), one of another shape is one line."""
    from lit_ovis.modules.config import EncoderConfig
    from lit_ovis.modules.sdpo import SDPOConfig, SDPOModule

    _, ckpt, folder = custom_run
    policy = dict(encoders=EncoderConfig(max_sequence_length=8), backbone=BackboneConfig(pretrained=str(ckpt)))
    module = SDPOModule(**policy, sdpo=SDPOConfig(reference_pretrained=str(folder)))
    module.configure_model()
    assert _shape(module.reference.config) == _shape(CUSTOM)
    other = tmp_path / "other"
    OvisImageTransformer2DModel(**{**CUSTOM, "num_layers": 2}).save_pretrained(other)
    with pytest.raises(CheckpointError) as err:
        SDPOModule(**policy, sdpo=SDPOConfig(reference_pretrained=str(other))).configure_model()
    assert "num_layers 2 vs 1" in str(err.value) and "\n" not in str(err.value)
