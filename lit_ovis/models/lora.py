"""LoRA on the one backbone, through diffusers' `PeftAdapterMixin` (`add_adapter`, `disable_adapters`), never a
fork: which layers get an adapter, adding it to a frozen base, switching it off for the reference model, its
weights in `save_lora_adapter` layout, and merging it into base weights (the pure `merge_adapter`).

Key layouts: inside a module the adapter of layer `L` is `L.lora_A.default.weight` (peft's adapter name) and
the base weight moves to `L.base_layer.weight`; `save_lora_adapter` (and `load_lora_adapter`) use
`L.lora_A.weight` / `L.lora_B.weight`, which is the layout `adapter_weights` returns.
"""

from __future__ import annotations

import contextlib
import json
import re

import torch
from torch import nn

from lit_ovis.errors import ConfigError

ADAPTER_NAME = "default"  # peft's name for the one adapter diffusers' add_adapter creates
TARGETS = ("attention", "attention_mlp", "all_linear")
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
# Layer-name suffixes inside the MMDiT blocks (OvisImageTransformer2DModel's double- and single-stream blocks).
ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out")
MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
_PEFT_KEY = re.compile(rf"\.(lora_[AB])\.{ADAPTER_NAME}\.")


def target_module_names(backbone: nn.Module, targets: str = "attention", explicit: list[str] | None = None) -> list[str]:
    """Full names of the linear layers that get an adapter: a preset (`TARGETS`) or an explicit list of names or
    name suffixes (peft's matching: equal, or ending in "." + name)."""
    linear = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n]
    if explicit:
        wanted = [str(t) for t in explicit]
        chosen = [n for n in linear if any(n == t or n.endswith("." + t) for t in wanted)]
        if not chosen:
            raise ConfigError(f"--model.lora.target_modules {wanted} matched no linear layer of the backbone "
                              f"(e.g. {', '.join(ATTENTION[:4])}, {', '.join(MLP[:2])})")
        return chosen
    if targets not in TARGETS:
        raise ConfigError(f"--model.lora.targets must be one of {', '.join(TARGETS)} (got {targets!r})")
    if targets == "all_linear":
        return linear
    suffixes = ATTENTION + (MLP if targets == "attention_mlp" else ())
    return [n for n in linear if n.startswith(BLOCK_PREFIXES) and n.split(".", 2)[2] in suffixes]


def add_lora(backbone: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> None:
    """Freeze the backbone and add one trainable adapter (B = 0 at start, so the model is unchanged), kept in fp32
    beside a bf16/fp16 base: the optimizer steps on fp32 weights (peft creates it in the base's dtype)."""
    from peft import LoraConfig

    backbone.requires_grad_(False)
    backbone.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                                    init_lora_weights="gaussian"), adapter_name=ADAPTER_NAME)
    for p in backbone.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def has_adapter(backbone: nn.Module) -> bool:
    return bool(getattr(backbone, "_hf_peft_config_loaded", False))


@contextlib.contextmanager
def adapter_disabled(backbone: nn.Module):
    """The backbone with its adapter switched off: the frozen base, i.e. the reference model of SDPO and GRPO."""
    backbone.disable_adapters()
    try:
        yield backbone
    finally:
        backbone.enable_adapters()


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_weights(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors of a backbone state dict (peft layout, `.lora_A.default.weight`) in `save_lora_adapter`
    layout (`.lora_A.weight`)."""
    return {_PEFT_KEY.sub(r".\1.", k): v for k, v in module_state.items() if is_adapter_key(k)}


def adapter_config(backbone: nn.Module) -> dict:
    """The adapter's peft LoraConfig as the JSON-able dict `save_lora_adapter` writes into the file's metadata."""
    config = backbone.peft_config[ADAPTER_NAME].to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def lora_scaling(config: dict) -> float:
    """alpha / r, the factor peft applies to B @ A (rank-stabilised LoRA divides by sqrt(r) instead)."""
    r = config["r"]
    return config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)


def merge_adapter(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scaling: float,
                  scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Base weights (diffusers layout) with the adapter merged in: W + scale * scaling * B @ A for every adapted
    layer (computed in fp32, stored in the base weight's dtype). `adapter` is in `save_lora_adapter` layout."""
    merged = dict(base)
    layers = sorted({k[: -len(".lora_A.weight")] for k in adapter if k.endswith(".lora_A.weight")})
    for layer in layers:
        a, b = adapter[f"{layer}.lora_A.weight"].float(), adapter[f"{layer}.lora_B.weight"].float()
        key = f"{layer}.weight"
        if key not in merged:
            raise KeyError(f"adapter layer {layer} is not a layer of the base weights")
        w = merged[key]
        merged[key] = (w.float() + (scale * scaling) * (b @ a)).to(w.dtype)
    return merged


def scaled_adapter(adapter: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The adapter with its update scaled by `scale` (B scaled; A unchanged), for a file loaded at weight 1."""
    return {k: (v * scale if ".lora_B." in k else v) for k, v in adapter.items()} if scale != 1.0 else dict(adapter)


def checkpoint_entry(backbone: nn.Module, preset: str, base: str | None) -> dict:
    """What a LoRA run's checkpoint records (`lit_ovis.checkpoints.LORA_ENTRY`): the base it applies to (a local
    path made absolute, so export can merge from anywhere; a hub id as given; None = the preset's seeded random
    init) and the adapter's peft config."""
    from pathlib import Path

    if base and Path(base).exists():
        base = str(Path(base).resolve())
    return {"format": 1, "preset": preset, "base": base, "adapter_config": adapter_config(backbone)}


def merged_base_weights(entry: dict, adapter: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The base a LoRA checkpoint applies to (read from `entry["base"]`) with its adapter merged in, in
    diffusers key layout: what export's merged folder, eval and the next stage use."""
    from lit_ovis.errors import CheckpointError
    from lit_ovis.models.backbone import build_backbone, pretrained_state_dict

    preset, base = entry["preset"], entry.get("base")
    try:
        weights = pretrained_state_dict(preset, base) if base else build_backbone(preset).state_dict()
    except CheckpointError as err:
        raise CheckpointError(f"the base weights this LoRA adapter applies to could not be read: {err}") from None
    try:
        return merge_adapter(weights, adapter, lora_scaling(entry["adapter_config"]), scale)
    except KeyError as err:
        raise CheckpointError(f"LoRA adapter does not fit its base {base or preset!r}: {err.args[0]}") from None


ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # save_lora_adapter's default file name


def save_adapter(entry: dict, adapter: dict[str, torch.Tensor], out_dir, scale: float = 1.0, architecture: dict | None = None) -> None:
    """Write a LoRA checkpoint's adapter with diffusers' own `save_lora_adapter` (weights + the peft config in the
    file's metadata), so `pipe.transformer.load_lora_adapter(out_dir, prefix=None, use_safetensors=True)` loads it
    (diffusers 0.42 looks for a .bin file unless told safetensors). The backbone it is attached to for saving
    lives on the meta device: no base weights are read or allocated."""
    from lit_ovis.models.backbone import backbone_skeleton

    config = entry["adapter_config"]
    target = config["target_modules"]
    skeleton = backbone_skeleton(entry["preset"], None, architecture)  # the shape it trained (None: the preset's)
    add_lora(skeleton, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
             sorted(target) if isinstance(target, (list, set, tuple)) else target)
    peft_keys = {_layout_to_peft(k): v.float() for k, v in scaled_adapter(adapter, scale).items()}
    missing = [k for k, p in skeleton.named_parameters() if p.requires_grad and k not in peft_keys]
    if missing:
        from lit_ovis.errors import CheckpointError

        raise CheckpointError(f"the checkpoint's LoRA adapter lacks {len(missing)} of its layers' tensors (e.g. {missing[:2]}); "
                              "use an earlier checkpoint")
    skeleton.load_state_dict(peft_keys, strict=False, assign=True)
    skeleton.save_lora_adapter(str(out_dir), adapter_name=ADAPTER_NAME, weight_name=ADAPTER_FILE)


def _layout_to_peft(key: str) -> str:
    """`L.lora_A.weight` (save_lora_adapter layout) -> `L.lora_A.default.weight` (inside the module)."""
    return re.sub(r"\.(lora_[AB])\.", rf".\1.{ADAPTER_NAME}.", key)
