"""Hyper-parameter groups shared by every stage module. Configs (YAML) are the single source of values;
these defaults equal the `tiny` preset so a bare module runs on a CPU."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BackboneConfig:
    """The trainable MMDiT (diffusers' OvisImageTransformer2DModel)."""

    preset: str = "tiny"
    """Architecture preset: "tiny" (tests, demo) or "ovis-image-7b" (the released model)."""
    pretrained: str | None = None
    """Initial weights: a lit-ovis .ckpt or sharded checkpoint directory (the previous stage), a diffusers folder,
    a .safetensors file or a hub id; unset: random init."""

    def __post_init__(self):
        self.pretrained = none_if_null(self.pretrained)


@dataclass
class EncoderConfig:
    """The frozen text encoder and VAE (rebuilt from here, never saved in checkpoints)."""

    text_encoder: str = "tiny"
    """Qwen3 text encoder: preset or a folder / hub id with text_encoder/ and tokenizer/."""
    vae: str = "tiny"
    """FLUX VAE: preset ("tiny", "flux") or a folder / hub id with vae/."""
    max_sequence_length: int = 256
    """Prompt length in tokens (the pipeline's default is 256)."""
    template_cut: str = "pipeline"
    """Template tokens cut from the front of the text encoder's output: "pipeline" (OvisImagePipeline's fixed 28,
    right for Qwen's tokenizer; exports sample alike) or "template" (the tokenizer's own template length, so the
    tokens hold only the caption: for tokenizers that split the system prompt into more tokens, e.g. the tiny
    byte-level one, which otherwise keeps 112 identical system-prompt bytes before every caption)."""
    dtype: str = "fp32"
    """Dtype of the frozen encoders: "fp32", "bf16" (GPUs) or "fp16"."""
    text_encoder_device: str = "auto"
    """Where the text encoder lives: "auto" (the training device) or "cpu" (host memory, for one-GPU runs on data
    with precomputed prompt embeddings: it then only encodes the empty prompt and sample-grid prompts)."""


@dataclass
class OptimizerConfig:
    """AdamW with a linear warm-up, then a constant learning rate."""

    lr: float = 1e-4
    """Learning rate after warm-up."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""


@dataclass
class EMAConfig:
    """Exponential moving average of the backbone weights (kept on each rank's shard)."""

    enabled: bool = False
    """Keep an EMA of the weights (saved in checkpoints under `ema.`)."""
    decay: float = 0.9999
    """EMA decay per update."""
    every_n_steps: int = 1
    """Update the EMA every N optimizer steps."""
    use_for_sampling: bool = True
    """Sample grids, predict, export and the next stage use the EMA weights."""


@dataclass
class LoRAConfig:
    """A LoRA adapter on the backbone instead of full fine-tuning (one GPU), for every stage: only the adapter
    trains and is checkpointed; the frozen base stays in `base_dtype` (or quantised) with no optimizer state, and
    the frozen reference of SDPO and GRPO is the adapter-off base (no second copy)."""

    enabled: bool = False
    """Train a LoRA adapter (diffusers' PeftAdapterMixin on the backbone) instead of all weights."""
    rank: int = 64
    """Adapter rank r."""
    alpha: float = 128.0
    """LoRA scaling alpha: the adapter's update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (must stay 0 for GRPO: rollouts and updates must be the same policy)."""
    targets: str = "attention"
    """Which linear layers get an adapter: "attention" (q, k, v, out of both streams), "attention_mlp" (+ the MLPs)
    or "all_linear" (every linear layer of the backbone, modulation and embedders included)."""
    target_modules: list[str] | None = None
    """Explicit module names or name suffixes (peft's target_modules), e.g. [to_q, to_v]; set: replaces `targets`."""
    base_dtype: str = "bf16"
    """Dtype of the frozen base weights: "bf16" (no fp32 master copy), "fp16" or "fp32"; the adapter stays fp32."""
    quantize_base: str = "none"
    """Weight-only quantisation of the frozen base's linear layers (torchao): "none", "int8", or "float8" (GPUs with
    compute capability >= 8.9); one device only (not under FSDP)."""


@dataclass
class TimestepConfig:
    """Training timesteps and their loss weight, shared by the flow-matching and SDPO stages (`lit_ovis.flow`)."""

    timestep_sampling: str = "logit_normal"
    """"uniform" or "logit_normal" (sigmoid of a normal, SD3)."""
    logit_mean: float = 0.0
    """Mean of the normal under "logit_normal"."""
    logit_std: float = 1.0
    """Standard deviation of the normal under "logit_normal"."""
    timestep_shift: str = "dynamic"
    """"none", "static" (SD3, by `shift`) or "dynamic" (FLUX, by the image token count, like the sampler)."""
    shift: float = 3.0
    """Shift factor for timestep_shift "static"."""
    loss_weighting: str = "none"
    """Per-sample loss weight w(t): "none", "cosmap" (SD3) or "sigma_sqrt"."""


@dataclass
class FlowConfig(TimestepConfig):
    """Flow-matching loss settings (pretraining, SFT): the timestep settings plus CFG training and logging."""

    caption_dropout: float = 0.1
    """Probability of replacing a caption by the empty prompt (trains CFG's unconditional branch)."""
    loss_buckets: int = 4
    """Log the loss per timestep range in this many equal ranges (0 or 1: off)."""


def none_if_null(value):
    """Command-line `null` can arrive as the string "None"/"null"; it means no path."""
    return None if isinstance(value, str) and value.strip().lower() in ("", "none", "null") else value

