"""One call from a path to a module that is ready to `sample()`: notebooks, scripts, `eval` and `make-pairs`.

    import lit_ovis
    module = lit_ovis.load_module("runs/sft/checkpoints/last.ckpt")   # or a sharded checkpoint directory,
    images = module.sample(['a poster that says "OPEN"'], seed=0)     # an exported folder, a hub id

A training checkpoint gives its run's backbone (in the architecture it trained, with the weights its sample
grids used unless `weights` says otherwise), encoders and sampling settings; a diffusers pipeline folder (what
`lit-ovis export` writes, or a hub id such as AIDC-AI/Ovis-Image-7B) gives its transformer, text encoder, VAE
and the shift settings of its `scheduler/`. Every stage samples the same way, so the module is a
`FlowMatchingModule` whichever stage wrote the checkpoint; `Trainer.fit` can fine-tune it further.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from lit_ovis.checkpoints import (
    WEIGHTS, backbone_state_dict, config_section, is_training_checkpoint, load_training_checkpoint,
)
from lit_ovis.errors import CheckpointError, ConfigError
from lit_ovis.files import check_weights_source, hub_load_failure
from lit_ovis.models.backbone import checkpoint_architecture, load_checked
from lit_ovis.modules.config import BackboneConfig, EMAConfig, EncoderConfig, FlowConfig, OptimizerConfig
from lit_ovis.modules.flow_matching import FlowMatchingModule
from lit_ovis.sampling.generate import SamplingConfig
from lit_ovis.sampling.scheduler import read_scheduler_config, sampling_from_scheduler

PIPELINE_INDEX = "model_index.json"
ACCEPTED = "a .ckpt file, a sharded checkpoint directory, a diffusers pipeline folder (lit-ovis export) or a hub id"


def load_module(
    path: str | os.PathLike,
    weights: str = "auto",
    device: str | torch.device | None = None,
    max_sequence_length: int | None = None,
) -> FlowMatchingModule:
    """A module with its backbone, text encoder and VAE built and loaded, in eval mode, ready to `sample()`.

    `weights` (training checkpoints): "auto" = the EMA weights when the run sampled with them, else the raw
    ones; "ema" or "raw" to choose. `device`: where to put it (default CPU). `max_sequence_length`: the
    prompt length in tokens (default: the run's, or 256 for a folder). Every mistake is one CheckpointError line.
    """
    if weights not in WEIGHTS:
        raise ConfigError(f"weights='{weights}': choose one of {sorted(WEIGHTS)}")
    source = str(path)
    if is_training_checkpoint(source):
        module = _from_checkpoint(source, WEIGHTS[weights], max_sequence_length)
    else:
        module = _from_pipeline(source, max_sequence_length)
    module.eval()
    return module if device is None else module.to(device)


def _from_checkpoint(path: str, use_ema: bool | None, max_sequence_length: int | None) -> FlowMatchingModule:
    checkpoint = load_training_checkpoint(path, ema=use_ema is not False)
    encoders = config_section(checkpoint, "encoders", EncoderConfig)
    module = FlowMatchingModule(
        # The weights come from this checkpoint, not from whatever the run itself started from.
        backbone=replace(config_section(checkpoint, "backbone", BackboneConfig), pretrained=None),
        encoders=replace(encoders, max_sequence_length=max_sequence_length or encoders.max_sequence_length),
        optimizer=config_section(checkpoint, "optimizer", OptimizerConfig),
        ema=EMAConfig(enabled=False),  # `weights` already chose between the raw and the EMA weights
        sampling=config_section(checkpoint, "sampling", SamplingConfig),
        flow_matching=config_section(checkpoint, "flow_matching", FlowConfig),
    )
    module.backbone_architecture = checkpoint_architecture(checkpoint)
    module.configure_model()
    load_checked(module.backbone, backbone_state_dict(checkpoint, use_ema=use_ema), path)
    return module


def _from_pipeline(source: str, max_sequence_length: int | None) -> FlowMatchingModule:
    local = check_weights_source(source, "model")  # a mistyped path says so, not "malformed repo id"
    if local:
        folder = Path(source)
        if not folder.is_dir():
            raise CheckpointError(f"{source}: a weight file alone has no text encoder, VAE or scheduler; pass {ACCEPTED}")
        if not (folder / PIPELINE_INDEX).is_file():
            what = "a transformer folder without the rest of the pipeline" if (folder / "config.json").is_file() else "not a model"
            raise CheckpointError(f"{source}: {what} (no {PIPELINE_INDEX}); pass {ACCEPTED}")
        scheduler = read_scheduler_config(source)
        if scheduler is None:
            raise CheckpointError(f"{source}: pipeline folder without scheduler/scheduler_config.json; re-export it with lit-ovis export")
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler

        try:
            scheduler = FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler")
        except OSError as err:
            raise CheckpointError(f"{source}: could not load the pipeline ({hub_load_failure(source, err)}); pass {ACCEPTED}") from None
    module = FlowMatchingModule(
        backbone=BackboneConfig(pretrained=source),
        encoders=EncoderConfig(text_encoder=source, vae=source, max_sequence_length=max_sequence_length or 256),
        sampling=sampling_from_scheduler(dict(scheduler), source),
    )
    module.configure_model()
    return module
