"""The base LightningModule every stage shares: owns the trainable MMDiT backbone, the frozen text
encoder and VAE, the optimizer and schedule, EMA, sharding hooks and `sample()`.

Frozen models live outside the module tree (see `_frozen`): they never enter the optimizer and are never
saved in training checkpoints (they are rebuilt from their config source), so a checkpoint holds the
backbone in diffusers key layout under `backbone.` and export is a rename, not a conversion. Every checkpoint
also holds the backbone's architecture (`lit_ovis.checkpoints.ARCHITECTURE_KEY`), which its readers build.

Outside a Trainer, `lit_ovis.load_module(path)` returns a module that is ready to `sample()`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from lit_ovis.checkpoints import ARCHITECTURE_KEY, BACKBONE_PREFIX, LORA_ENTRY, lora_entry, read_meta, stored_architecture
from lit_ovis.ema import EMA
from lit_ovis.errors import CheckpointError, ConfigError
from lit_ovis.models import lora as lora_lib
from lit_ovis.models.backbone import (
    architecture_of, backbone_skeleton, build_backbone, checkpoint_architecture, describe_difference, resolve_architecture,
)
from lit_ovis.models.quantize import QUANTIZE_MODES, check_quantize_mode, quantize_frozen_base
from lit_ovis.models.text_encoder import build_text_encoder, text_ids
from lit_ovis.models.vae import build_vae, latent_image_ids
from lit_ovis.dtypes import DTYPES
from lit_ovis.modules.config import BackboneConfig, EMAConfig, EncoderConfig, LoRAConfig, OptimizerConfig
from lit_ovis.parallel.fsdp import ParallelConfig, parallelize_module
from lit_ovis.parallel.optim import make_adamw
from lit_ovis.sampling.generate import SamplingConfig, generate_images
from lit_ovis.seeds import mix_seed, run_seed


class OvisBaseModule(L.LightningModule):
    def __init__(
        self,
        backbone: BackboneConfig = BackboneConfig(),
        encoders: EncoderConfig = EncoderConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        ema: EMAConfig = EMAConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        parallel: ParallelConfig = ParallelConfig(),
        lora: LoRAConfig = LoRAConfig(),
    ):
        super().__init__()
        self.save_hyperparameters()
        # Sharded checkpoints store these dataclasses in meta.pt, which Lightning reads with weights_only=True.
        torch.serialization.add_safe_globals([type(v) for v in self.hparams.values() if dataclasses.is_dataclass(v)])
        self.backbone_cfg = backbone
        self.encoders_cfg = encoders
        self.optim_cfg = optimizer
        self.ema_cfg = ema
        self.sampling_cfg = sampling
        self.parallel = parallel
        self.lora_cfg = lora
        check_lora_config(lora)
        self.backbone: torch.nn.Module | None = None
        # The shape `configure_model` must build when a checkpoint will be restored into it (`use_architecture_of`);
        # None: the pretrained weights' or the preset's.
        self.backbone_architecture: dict[str, Any] | None = None
        self.ema: EMA | None = None
        self._frozen: dict[str, torch.nn.Module] = {}
        self._empty_embed: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------- models
    @property
    def text_encoder(self):
        return self._frozen.get("text_encoder")

    @property
    def vae(self):
        return self._frozen.get("vae")

    @property
    def reference(self):
        """The frozen reference copy of the backbone (SDPO, GRPO's KL), sharded like the policy; None when the
        stage needs none or with LoRA, whose reference is the adapter-off backbone (see `reference_model`)."""
        return self._frozen.get("reference")

    def needs_reference(self) -> bool:
        """Whether the stage compares against a frozen reference model (SDPO: always; GRPO: with a KL term)."""
        return False

    def build_reference(self) -> torch.nn.Module:
        """The frozen reference when it is a copy (no LoRA): the backbone as built from its initial weights."""
        return copy.deepcopy(self.backbone)

    @contextlib.contextmanager
    def reference_model(self):
        """The model to run as the frozen reference: with LoRA the backbone with its adapter off (the base it was
        trained from, no second copy), else the reference copy."""
        if self.lora_cfg.enabled:
            with lora_lib.adapter_disabled(self.backbone) as base:
                yield base
        else:
            yield self.reference

    def build_frozen(self) -> None:
        """Text encoder and VAE (frozen), and the reference copy when the stage needs one and trains no LoRA."""
        dtype = DTYPES[self.encoders_cfg.dtype]
        self._frozen["text_encoder"] = build_text_encoder(
            self.encoders_cfg.text_encoder, self.encoders_cfg.max_sequence_length, dtype=dtype,
            template_cut=self.encoders_cfg.template_cut,
        )
        self._frozen["vae"] = build_vae(self.encoders_cfg.vae, dtype=dtype)
        if self.needs_reference() and not self.lora_cfg.enabled:
            reference = self.build_reference().eval()
            reference.requires_grad_(False)
            self._frozen["reference"] = reference

    def configure_model(self) -> None:
        if self.backbone is not None:  # Lightning may call this more than once
            return
        cfg, mesh = self.backbone_cfg, self.device_mesh
        if self.encoders_cfg.text_encoder_device not in ("auto", "cpu") or (mesh is not None and self.encoders_cfg.text_encoder_device == "cpu"):
            raise ConfigError(f"--model.encoders.text_encoder_device must be auto or cpu (cpu: one device only), got "
                              f"{self.encoders_cfg.text_encoder_device!r}")
        # Sharded runs from pretrained weights build on the meta device and fill the shards from one rank's
        # copy (lit_ovis.parallel.init); everything else builds the full model here.
        lazy = mesh is not None and cfg.pretrained is not None and self.supports_sharded_init()
        arch = self.backbone_architecture
        if lazy:
            self.backbone = backbone_skeleton(cfg.preset, cfg.pretrained, arch)
        elif self.lora_cfg.enabled:
            self.backbone = self.build_lora_backbone(sharded=mesh is not None)
        else:
            self.backbone = build_backbone(cfg.preset, cfg.pretrained, architecture=arch)
        self.build_frozen()
        self.place_frozen()
        # Every lever applies with or without a mesh (attention backend, checkpointing, offloading, compile);
        # sharding only when ModelParallelStrategy provides a device mesh.
        parallelize_module(self, mesh, self.levers(mesh))
        if lazy:
            self.materialize_sharded_backbones()
        if getattr(self, "reference", None) is not None:
            self.match_policy_code_path()
        if self.ema_cfg.enabled:
            self.ema = EMA(self.backbone, self.ema_cfg.decay)

    def use_architecture_of(self, checkpoint_path: str) -> None:
        """Build the backbone in the architecture `checkpoint_path` was trained with, as a run that restores it
        must (fit resume, validate, predict): with no pretrained weights that shape replaces the preset; pretrained
        weights of another shape are one line now, not a size-mismatch traceback after the model is built.
        Checkpoints written before the architecture was saved are left to the config."""
        meta = read_meta(checkpoint_path)
        if stored_architecture(meta) is None:
            return
        arch = checkpoint_architecture(meta)
        cfg = self.backbone_cfg
        if cfg.pretrained is not None:
            own = resolve_architecture(cfg.preset, cfg.pretrained)
            if own != arch:
                raise CheckpointError(
                    f"{checkpoint_path}: trained a backbone of another architecture than --model.backbone.pretrained "
                    f"{cfg.pretrained} ({describe_difference(arch, own)}); set --model.backbone.pretrained to the weights that run "
                    "started from, or restore a checkpoint of this model")
        self.backbone_architecture = arch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Readers (export, eval, make-pairs, the next stage) build this shape, whatever preset the config named.
        if self.backbone is not None:
            checkpoint[ARCHITECTURE_KEY] = architecture_of(self.backbone)
        if self.lora_cfg.enabled:  # says the checkpoint holds an adapter, and which base it applies to
            checkpoint[LORA_ENTRY] = lora_lib.checkpoint_entry(self.backbone, self.backbone_cfg.preset, self.backbone_cfg.pretrained)

    def levers(self, mesh) -> ParallelConfig:
        """`model.parallel` as applied: on one device a LoRA run whose frozen base is bf16/fp16 computes in that
        dtype (autocast) even when fp32 compute is configured, since an fp32 input cannot meet a bf16 weight."""
        base = self.lora_cfg.base_dtype
        if mesh is None and self.lora_cfg.enabled and base != "fp32" and self.parallel.param_dtype == "fp32":
            return dataclasses.replace(self.parallel, param_dtype=base)
        return self.parallel

    def match_policy_code_path(self) -> None:
        """Give the frozen reference model (DPO, GRPO's KL) the policy's attention kernels and compiled blocks,
        read from the policy as `parallelize_module` left it (whatever it decided, e.g. no compile under FSDP1,
        holds for both), so policy == reference gives identical outputs.
        `nn.Module.compile` compiles `_call_impl` with its hooks, so compiling after FSDP2 sharding traces the
        same hook-wrapped forward as the policy's compile-then-shard order. Activation checkpointing and
        offloading are left out: they only act in a backward pass, which the reference never runs."""
        from lit_ovis.parallel.fsdp import apply_compile, blocks_of

        ref, pol = self.reference, self.backbone
        pol_attn = {n: m.processor for n, m in pol.named_modules() if getattr(m, "processor", None) is not None}
        for name, m in ref.named_modules():
            if name in pol_attn and hasattr(pol_attn[name], "_attention_backend") and hasattr(m.processor, "_attention_backend"):
                m.processor._attention_backend = pol_attn[name]._attention_backend
        compiled = [getattr(b, "_compiled_call_impl", None) is not None for b in blocks_of(pol)]
        if all(compiled) and not any(getattr(b, "_compiled_call_impl", None) is not None for b in blocks_of(ref)):
            apply_compile(ref)

    def supports_sharded_init(self) -> bool:
        """Whether every meta module left by `build_frozen` is a copy of the pretrained backbone (a LoRA adapter's
        layers are initialised by peft, not by the pretrained weights: LoRA runs build the full model instead)."""
        return not self.lora_cfg.enabled

    def build_lora_backbone(self, sharded: bool) -> torch.nn.Module:
        """The frozen base in `lora.base_dtype` (no fp32 master copy), optionally weight-quantised, with one
        trainable fp32 adapter on the chosen layers."""
        cfg, lcfg = self.backbone_cfg, self.lora_cfg
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        check_quantize_mode(lcfg.quantize_base, device, sharded)
        backbone = build_backbone(cfg.preset, cfg.pretrained, dtype=DTYPES[lcfg.base_dtype], architecture=self.backbone_architecture)
        targets = lora_lib.target_module_names(backbone, lcfg.targets, lcfg.target_modules)
        lora_lib.add_lora(backbone, lcfg.rank, lcfg.alpha, lcfg.dropout, targets)
        if lcfg.quantize_base != "none":
            if device is not None:  # quantise where the run computes (torchao picks that device's kernels)
                backbone.to(device)
            quantize_frozen_base(backbone, lcfg.quantize_base)
        return backbone

    def materialize_sharded_backbones(self) -> None:
        """Fill the sharded meta backbone (and frozen copies of it, e.g. a reference model) from rank 0's weights."""
        from lit_ovis.models.backbone import pretrained_state_dict
        from lit_ovis.parallel.init import is_meta, materialize_from_rank0, read_on_rank0

        cfg = self.backbone_cfg
        state = read_on_rank0(lambda: pretrained_state_dict(cfg.preset, cfg.pretrained))
        device = self.trainer.strategy.root_device
        for module in [self.backbone, *self._frozen.values()]:
            if is_meta(module):
                materialize_from_rank0(module, state, device)

    @property
    def device_mesh(self):
        try:
            return super().device_mesh
        except (AttributeError, RuntimeError):
            return None

    def place_frozen(self) -> None:
        """Move frozen models to this module's device (Lightning only moves registered submodules); the text encoder
        stays on the CPU with `encoders.text_encoder_device: cpu`."""
        device = self.device
        for name, module in self._frozen.items():
            if name == "text_encoder" and self.encoders_cfg.text_encoder_device == "cpu":
                continue  # stays in host memory (precomputed embeddings); `encode` outputs are moved to the device
            p = next(module.parameters(), None)
            if p is not None and not hasattr(p, "device_mesh") and not p.is_meta and p.device != device:
                module.to(device)

    def on_fit_start(self) -> None:
        self.place_frozen()

    def on_predict_start(self) -> None:
        self.place_frozen()

    def on_validation_start(self) -> None:
        self.place_frozen()

    # ------------------------------------------------------------------------------------ text / ids
    def embed_prompts(self, batch: dict[str, Any]) -> torch.Tensor:
        """Prompt embeddings [B, L, D]: precomputed ones zero-padded to the encoder length, else encoded now (from
        stored caption tokens, else from the captions)."""
        length = self.encoders_cfg.max_sequence_length
        embeds = batch.get("prompt_embeds")
        if embeds is None and batch.get("prompt_token_ids") is not None:  # caption tokens stored by prepare: encode online
            return self.text_encoder.encode_tokens(batch["prompt_token_ids"], batch["prompt_token_lengths"]).to(self.device, self.compute_dtype)
        if embeds is None:
            return self.text_encoder.encode(batch["captions"]).to(self.device, self.compute_dtype)
        embeds = embeds[:, :length]
        if embeds.shape[1] < length:  # padding positions are exactly zero in the pipeline too
            embeds = F.pad(embeds, (0, 0, 0, length - embeds.shape[1]))
        return embeds.to(self.device, self.compute_dtype)

    @property
    def empty_embed(self) -> torch.Tensor:
        """Embedding of the empty prompt (the CFG unconditional branch), computed once."""
        if self._empty_embed is None or self._empty_embed.device != self.device:
            self._empty_embed = self.text_encoder.encode([""]).to(self.device, self.compute_dtype)
        return self._empty_embed

    def step_generator(self, batch_idx: int = 0) -> torch.Generator:
        """A generator seeded from (run seed, rank, step, micro-batch): noise differs across ranks, and a
        resumed run draws exactly what the uninterrupted run drew, with no RNG state to checkpoint."""
        rank = self.global_rank if self._trainer is not None else 0
        step = self.global_step if self._trainer is not None else 0
        return torch.Generator(device=self.device).manual_seed(mix_seed(run_seed(), rank, step, batch_idx))

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self, *args, **kwargs):
        """With LoRA only the adapter (and its EMA) is saved: the frozen base is rebuilt from
        `backbone.pretrained` on resume, so a checkpoint is megabytes, not the model."""
        state = super().state_dict(*args, **kwargs)
        if self.lora_cfg.enabled:
            for key in [k for k in state if k.startswith(BACKBONE_PREFIX) and not lora_lib.is_adapter_key(k)]:
                del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """LoRA: strict over the adapter-only keys `state_dict()` gives (the base is not in checkpoints)."""
        if not self.lora_cfg.enabled:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise CheckpointError(f"checkpoint does not hold this run's LoRA adapter: {len(missing)} adapter keys missing "
                                  f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); resume with "
                                  "the lora settings it was trained with, or start fresh with --ckpt_path null")
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        return type(result)([k for k in result.missing_keys if k in expected], result.unexpected_keys)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        held = lora_entry(checkpoint) is not None
        if held != self.lora_cfg.enabled:
            what = "a LoRA adapter" if held else "full backbone weights"
            fix = ("resume with --model.lora.enabled true, or start a new run from it with --model.backbone.pretrained "
                   "<checkpoint> --ckpt_path null" if held else "resume with --model.lora.enabled false, or start a LoRA run "
                   "from it with --model.backbone.pretrained <checkpoint> --ckpt_path null")
            raise CheckpointError(f"the checkpoint holds {what} but this run has lora.enabled={self.lora_cfg.enabled}; {fix}")

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32  # autocast / FSDP mixed precision cast inside the backbone

    def conditioning(self, latent_h: int, latent_w: int, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Text embeddings plus the position ids the backbone expects for this bucket's latent shape."""
        return dict(
            encoder_hidden_states=embeds,
            img_ids=latent_image_ids(latent_h, latent_w, device=embeds.device, dtype=embeds.dtype),
            txt_ids=text_ids(embeds.shape[1], device=embeds.device, dtype=embeds.dtype),
        )

    @staticmethod
    def predict_velocity(model, x_t_packed: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity for packed latents at timesteps t in [0, 1] (the backbone scales t by 1000 itself)."""
        return model(hidden_states=x_t_packed, timestep=t.to(x_t_packed.dtype), return_dict=False, **cond)[0]

    # ------------------------------------------------------------------------------------ optimizer
    def trainable_parameters(self):
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def configure_optimizers(self):
        cfg = self.optim_cfg
        opt = make_adamw(self.trainable_parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
        warmup = max(int(cfg.warmup_steps), 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_factor(step, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def clip_grad_norm(self, max_norm: float | None = None) -> torch.Tensor | None:
        """Clip the trainable parameters' global gradient norm to `max_norm` (default: optimizer.grad_clip;
        0 disables) and return the norm before clipping (the full norm also under FSDP2), or None when disabled.
        Lightning calls it through `configure_gradient_clipping`; manual-optimisation stages (GRPO) call it."""
        max_norm = max_norm or self.optim_cfg.grad_clip
        if not max_norm or max_norm <= 0:
            return None
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        norm = self.clip_grad_norm(gradient_clip_val)
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True, prog_bar=False)

    def on_train_start(self) -> None:
        self._ema_seen_step = self.global_step
        self._ema_gate: torch.Tensor | None = None
        if self.text_encoder is not None:
            _ = self.empty_embed  # encode the empty prompt now, not inside the first training step

    def gate_ema_update(self, applied: torch.Tensor) -> None:
        """A device flag for this batch's EMA update: 1 when an optimizer step of the batch changed the weights,
        0 when every one was skipped (NanGuard); the EMA then stays put, decided on the device (no host read)."""
        self._ema_gate = applied

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # EMA follows optimizer steps, not micro-batches: under gradient accumulation (or a manual-optimization
        # stage with several micro-batches) global_step only moves when the optimizer stepped.
        gate, self._ema_gate = getattr(self, "_ema_gate", None), None
        if self.ema is None or self.global_step == getattr(self, "_ema_seen_step", None):
            return
        self._ema_seen_step = self.global_step
        if self.global_step % self.ema_cfg.every_n_steps == 0:
            self.ema.update(self.backbone, gate=gate)

    def train_flops_per_sample(self, latent_h: int, latent_w: int) -> int:
        """Model FLOPs of one training sample (forward + backward) for the throughput/MFU logger."""
        from lit_ovis.parallel.flops import train_flops

        tokens = (latent_h // 2) * (latent_w // 2)
        return train_flops(dict(self.backbone.config), tokens, self.encoders_cfg.max_sequence_length)

    # ------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        seed: int | list[int] = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Prompts -> images [B, 3, H, W] in [0, 1] (EMA weights when enabled); same as OvisImagePipeline."""
        if self.backbone is None:
            raise ConfigError(f"{type(self).__name__} has no backbone yet: a Trainer builds it (configure_model); in a "
                              "notebook or script load a ready module with lit_ovis.load_module(path), or call "
                              "module.configure_model() first")
        cfg = SamplingConfig(**{**vars(self.sampling_cfg)})
        if steps is not None:
            cfg.steps = steps
        if guidance_scale is not None:
            cfg.guidance_scale = guidance_scale
        self.place_frozen()
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            if self.ema is not None and self.ema_cfg.use_for_sampling:
                with self.ema.swapped_into(self.backbone):
                    return generate_images(self.backbone, self.text_encoder, self.vae, prompts, cfg, seed, height, width)
            return generate_images(self.backbone, self.text_encoder, self.vae, prompts, cfg, seed, height, width)
        finally:
            self.backbone.train(was_training)

    def predict_step(self, batch: dict[str, Any], batch_idx: int):
        prompts = batch["prompts"]
        seeds = batch.get("seeds")
        images = self.sample(list(prompts), seed=[int(s) for s in seeds] if seeds is not None else batch_idx * 1000)
        return {"images": images.cpu(), "prompts": list(prompts), "ids": batch.get("ids")}


def check_lora_config(cfg: LoRAConfig) -> None:
    """One-line refusals of LoRA settings that cannot work, before any model is built."""
    if not cfg.enabled:
        return
    if cfg.rank < 1 or cfg.alpha <= 0:
        raise ConfigError(f"--model.lora.rank must be >= 1 and --model.lora.alpha > 0 (got rank {cfg.rank}, alpha {cfg.alpha})")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"--model.lora.dropout must be in [0, 1) (got {cfg.dropout})")
    if cfg.targets not in lora_lib.TARGETS:
        raise ConfigError(f"--model.lora.targets must be one of {', '.join(lora_lib.TARGETS)} (got {cfg.targets!r})")
    if cfg.base_dtype not in DTYPES:
        raise ConfigError(f"--model.lora.base_dtype must be one of {', '.join(DTYPES)} (got {cfg.base_dtype!r})")
    if cfg.quantize_base not in QUANTIZE_MODES:
        raise ConfigError(f"--model.lora.quantize_base must be one of {', '.join(QUANTIZE_MODES)} (got {cfg.quantize_base!r})")


def warmup_factor(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
