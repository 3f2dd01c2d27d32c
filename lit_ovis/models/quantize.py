"""Weight-only quantisation of a LoRA run's frozen base (torchao), so the 7B backbone fits a 24 GB card.

Only the base's linear layers are quantised (`lora_A` / `lora_B` stay fp32 and trainable); activations keep
the compute dtype, and gradients still flow through the quantised layers to the adapters before them. torchao
is imported only when asked for: it is an optional speed/memory lever, never needed to read a checkpoint
(checkpoints hold the adapter, never the quantised base).
"""

from __future__ import annotations

import torch
from torch import nn

from lit_ovis.errors import ConfigError

QUANTIZE_MODES = ("none", "int8", "float8")
FLOAT8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and later have float8 matmuls


def check_quantize_mode(mode: str, device: torch.device | None, sharded: bool) -> None:
    """One-line refusals before any weight is touched."""
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"--model.lora.quantize_base must be one of {', '.join(QUANTIZE_MODES)} (got {mode!r})")
    if mode == "none":
        return
    if sharded:
        raise ConfigError("--model.lora.quantize_base is for one device: under FSDP the frozen base is already sharded "
                          "across GPUs; set it to none or train on one GPU")
    if mode == "float8":
        on_gpu = device is not None and device.type == "cuda"
        capability = torch.cuda.get_device_capability(device) if on_gpu else None
        if capability is None or capability < FLOAT8_MIN_CAPABILITY:
            where = f"this GPU has compute capability {capability[0]}.{capability[1]}" if capability else f"the run is on {device or 'cpu'}"
            raise ConfigError(f"--model.lora.quantize_base float8 needs a GPU with compute capability >= 8.9 (Ada, Hopper) and {where}; "
                              "use int8")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ConfigError("--model.lora.quantize_base needs torchao: pip install torchao (see pyproject.toml)") from None


def quantize_frozen_base(backbone: nn.Module, mode: str) -> int:
    """Quantise the frozen linear weights of `backbone` in place (weight-only); returns how many layers."""
    if mode == "none":
        return 0
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()
    chosen: list[str] = []

    def frozen_linear(module: nn.Module, name: str) -> bool:
        take = type(module) is nn.Linear and "lora_" not in name and not module.weight.requires_grad
        if take:
            chosen.append(name)
        return take

    quantize_(backbone, config, filter_fn=frozen_linear)
    return len(chosen)


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, through tensor subclasses (torchao's quantised weights: int8/float8 data + scales)."""
    inner = t.data if isinstance(t, nn.Parameter) else t
    if type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__"):
        names, _ = inner.__tensor_flatten__()
        return sum(stored_bytes(getattr(inner, n)) for n in names)
    return inner.untyped_storage().nbytes()
