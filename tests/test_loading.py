"""`lit_ovis.load_module`: a training checkpoint, a sharded checkpoint directory or a diffusers pipeline folder
becomes a module that is ready to `sample()`; a folder's scheduler decides the sampling shift; a module without a
backbone, a scheduler our sampler cannot reproduce and a mistyped path are each one line."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from diffusers import OvisImagePipeline

import lit_ovis
from helpers import LatentSet, loader, tiny_flow_module, tiny_trainer, torch_threads
from lit_ovis.errors import CheckpointError, ConfigError

SHIFTS = {"base_shift": 0.9, "max_shift": 1.6, "base_image_seq_len": 64, "max_image_seq_len": 1024}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(module, .ckpt, sharded directory, exported folder whose scheduler has non-default shifts)."""
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

    from lit_ovis.cli.export import export_checkpoint

    root = tmp_path_factory.mktemp("loading")
    with torch_threads(1):
        L.seed_everything(0)
        module = tiny_flow_module()
        trainer = tiny_trainer(2, default_root_dir=root)
        trainer.fit(module, loader(LatentSet(n=2), batch_size=2))
        trainer.save_checkpoint(root / "run.ckpt")
        # Lightning's sharded layout (DCP shards + meta.pt), written by one process
        checkpoint = torch.load(root / "run.ckpt", map_location="cpu", weights_only=False)
        _distributed_checkpoint_save({"state_dict": checkpoint.pop("state_dict")}, root / "sharded")
        checkpoint.pop("optimizer_states", None)
        torch.save(checkpoint, root / "sharded" / "meta.pt")
        folder = export_checkpoint(str(root / "run.ckpt"), str(root / "exported"))
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), **SHIFTS}))
    return module, root / "run.ckpt", root / "sharded", folder


def test_a_module_without_a_backbone_says_how_to_get_one():
    module = tiny_flow_module(configure=False)
    with pytest.raises(ConfigError) as err:
        module.sample(["a sign"])
    assert "configure_model" in str(err.value) and "lit_ovis.load_module" in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_and_sharded_directory_load_ready_to_sample(trained):
    module, ckpt, sharded, _ = trained
    with torch_threads(1):
        expected = module.sample(["a sign that says OPEN"], seed=5)
        for path in (ckpt, sharded):
            loaded = lit_ovis.load_module(path)
            assert not loaded.training and loaded.sampling_cfg == module.sampling_cfg
            torch.testing.assert_close(loaded.sample(["a sign that says OPEN"], seed=5), expected)


def test_pipeline_folder_samples_with_its_own_scheduler(trained):
    """The folder's shifts differ from SamplingConfig's defaults: the loaded module must use the folder's, as
    OvisImagePipeline does on the same folder."""
    _, _, _, folder = trained
    with torch_threads(1):
        loaded = lit_ovis.load_module(folder, max_sequence_length=8)
        sampling = loaded.sampling_cfg
        assert (sampling.base_shift, sampling.max_shift, sampling.base_seq_len, sampling.max_seq_len) == tuple(SHIFTS.values())
        ours = loaded.sample(["a sign"], seed=3, steps=4, guidance_scale=3.0, height=32, width=32)
        pipe = OvisImagePipeline.from_pretrained(folder)
        ref = pipe(["a sign"], height=32, width=32, num_inference_steps=4, guidance_scale=3.0, output_type="pt",
                   generator=torch.Generator().manual_seed(3), max_sequence_length=8).images
    assert (ours - ref).abs().max().item() < 1e-4


def test_a_scheduler_we_would_not_reproduce_is_refused(trained, tmp_path):
    import shutil

    from lit_ovis.preflight import check_model

    _, _, _, folder = trained
    # training from the folder with other shifts than its scheduler's: one line naming the options to set
    with pytest.raises(ConfigError) as err:
        check_model({"backbone": {"pretrained": str(folder)}, "sampling": {"base_shift": 0.5}})
    message = str(err.value)
    assert "\n" not in message and "--model.sampling.base_shift" in message and "--model.sampling.max_shift 1.6" in message
    check_model({"backbone": {"pretrained": str(folder)}, "sampling": {"base_shift": 0.9, "max_shift": 1.6, "base_seq_len": 64,
                                                                         "max_seq_len": 1024}})
    # a static shift: our sampler's resolution-dependent shift would give other images
    static = tmp_path / "static"
    shutil.copytree(folder, static)
    config = static / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dynamic_shifting": False, "shift": 3.0}))
    with pytest.raises(CheckpointError) as err:
        lit_ovis.load_module(static)
    assert "use_dynamic_shifting=False" in str(err.value) and "\n" not in str(err.value)


def test_a_mistyped_local_path_is_reported_missing_not_as_a_hub_id(tmp_path):
    from lit_ovis.models.backbone import build_backbone
    from lit_ovis.models.text_encoder import build_text_encoder
    from lit_ovis.models.vae import build_vae

    missing = str(tmp_path / "runs" / "sft" / "exported")
    for load in (lambda p: build_backbone("tiny", p), build_text_encoder, build_vae, lit_ovis.load_module):
        with pytest.raises(CheckpointError) as err:
            load(missing)
        assert "does not exist" in str(err.value) and missing in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError) as err:  # a relative path that looks like a hub id: both readings said
        lit_ovis.load_module("no-such-runs/sft")
    assert "no such local folder" in str(err.value)
    with pytest.raises(ConfigError, match="weights='best'"):
        lit_ovis.load_module(missing, weights="best")
