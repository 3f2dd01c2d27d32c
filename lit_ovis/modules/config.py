"""Hyper-parameter groups shared by every stage module. Configs (YAML) are the single source of values;
these defaults equal the `tiny` preset so a bare module runs on a CPU."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BackboneConfig:
    preset: str = "tiny"  # "tiny" or "ovis-image-7b"
    pretrained: str | None = None  # diffusers folder, .safetensors file or hub id; None = random init

    def __post_init__(self):
        self.pretrained = none_if_null(self.pretrained)


@dataclass
class EncoderConfig:
    text_encoder: str = "tiny"  # preset or a folder / hub id with text_encoder/ and tokenizer/
    vae: str = "tiny"  # preset ("tiny", "flux") or a folder / hub id with vae/
    max_sequence_length: int = 256
    dtype: str = "fp32"  # frozen encoders' dtype: "bf16" on GPUs


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up, then constant
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9999
    every_n_steps: int = 1
    use_for_sampling: bool = True  # sample grids and export use the EMA weights


@dataclass
class FlowConfig:
    timestep_sampling: str = "logit_normal"  # "uniform" | "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_shift: str = "dynamic"  # "none" | "static" | "dynamic" (by image token count)
    shift: float = 3.0  # for "static"
    loss_weighting: str = "none"  # "none" | "cosmap" | "sigma_sqrt"
    caption_dropout: float = 0.1  # probability of the empty prompt (trains CFG's unconditional branch)
    loss_buckets: int = 4  # log the loss per timestep range


def none_if_null(value):
    """Command-line `null` can arrive as the string "None"/"null"; it means no path."""
    return None if isinstance(value, str) and value.strip().lower() in ("", "none", "null") else value


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
