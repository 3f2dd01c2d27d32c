"""Parallelism applied to a stage module, kept apart from the model (torchtitan style).

Order: attention backend -> activation checkpointing/offloading -> regional compile -> FSDP2
`fully_shard` per double- and single-stream block, then at the backbone root (without a device mesh:
autocast to `param_dtype` instead of sharding). With
`data_parallel_replicate > 1` the mesh is 2-D (replicate x shard), i.e. HSDP: replicate across nodes,
shard within a node. Mixed precision keeps FP32 master weights (the optimizer steps on them) and
computes in `param_dtype`, reducing gradients in `reduce_dtype`. Frozen models (text encoder, DPO/GRPO
reference) are sharded the same way but never reach an optimizer; the small VAE is replicated.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lit_ovis.dtypes import DTYPES
from lit_ovis.errors import ConfigError
from lit_ovis.parallel.memory import apply_activation_checkpointing, apply_activation_offloading

@dataclass
class ParallelConfig:
    """Speed and memory levers, applied to the module without editing the model (`parallelize_module`)."""

    data_parallel_replicate: int = 1
    """HSDP replicas (usually the number of nodes); 1 = plain FSDP over all ranks."""
    hsdp: bool = False
    """Force a 2-D (replicate, shard) mesh even with one replica (on whenever data_parallel_replicate > 1)."""
    reshard_after_forward: bool = True
    """ZeRO-3 style; false keeps the gathered parameters until backward (faster, more memory)."""
    param_dtype: str = "fp32"
    """Compute dtype ("bf16" on GPUs); the master weights the optimizer steps on stay fp32."""
    reduce_dtype: str = "fp32"
    """Dtype of the gradient all-reduce / reduce-scatter."""
    activation_checkpointing: str = "none"
    """"none", "full" (every block) or "selective" (every checkpoint_every_n_blocks-th block)."""
    checkpoint_every_n_blocks: int = 2
    """Selective checkpointing: checkpoint one block in this many."""
    activation_offloading: bool = False
    """Move saved activations to pinned CPU memory (parameters stay on the GPU)."""
    compile: bool = False
    """Regional compilation: torch.compile each repeated block."""
    attention_backend: str | None = None
    """diffusers attention backend: "flash", "_flash_3", "_native_cudnn", "native", ...; unset: diffusers' default."""
    cpu_offload: bool = False
    """FSDP2 parameter/gradient offload to CPU (the optimizer steps on CPU)."""
    shard_frozen: bool = True
    """Shard the text encoder and reference model too (else replicate them)."""


def blocks_of(backbone: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an OvisImageTransformer2DModel: double-stream first, then single-stream."""
    return list(backbone.transformer_blocks) + list(backbone.single_transformer_blocks)


def data_parallel_mesh(device_mesh, replicate: int, hsdp: bool = False):
    """1-D shard mesh (FSDP) or 2-D (replicate, shard) mesh (HSDP) over the data-parallel ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    dp = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    world = dp.size()
    if replicate <= 1 and not hsdp:
        return dp
    replicate = max(replicate, 1)
    if world % replicate:
        raise ConfigError(
            f"model.parallel.data_parallel_replicate={replicate} does not divide the {world} data-parallel ranks; "
            "set it to the number of nodes (or a divisor of nodes x GPUs)"
        )
    return init_device_mesh(dp.device_type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def mixed_precision(cfg: ParallelConfig):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype])


def shard_transformer(backbone: nn.Module, mesh, cfg: ParallelConfig) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    kwargs = dict(
        mesh=mesh,
        mp_policy=mixed_precision(cfg),
        offload_policy=CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
    )
    blocks = blocks_of(backbone)
    for i, block in enumerate(blocks):
        # The last block's params are needed again first in backward: keep them gathered.
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward and i < len(blocks) - 1, **kwargs)
    fully_shard(backbone, reshard_after_forward=cfg.reshard_after_forward, **kwargs)


def shard_frozen(model: nn.Module, mesh, cfg: ParallelConfig) -> None:
    """Shard a frozen model by its repeated layers (Qwen3 decoder layers or MMDiT blocks)."""
    from torch.distributed.fsdp import fully_shard

    layers = blocks_of(model) if hasattr(model, "single_transformer_blocks") else list(getattr(model, "layers", []))
    mp = mixed_precision(cfg)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # No backward follows a frozen model's forward, so FSDP2 would leave the root's parameters gathered
    # after each call; reshard after every forward to keep the memory sharded.
    model.register_forward_hook(lambda mod, args, out: mod.reshard() or None)


RECOMPILE_LIMIT = 64


def apply_compile(backbone: nn.Module, backend: str = "inductor") -> None:
    """Regional compilation: each repeated block compiled once and reused (fast warm-up, same speed).

    `dynamic=None` compiles the first shape statically (single-resolution runs keep static-shape kernels)
    and marks a dimension dynamic the first time it changes, so multi-resolution buckets cost one extra
    compile instead of one per bucket. Every block type still needs several cache entries (grad on/off in
    training vs sampling, the first block's contiguous input vs later blocks' strided ones, batch 1 vs B),
    which can exceed dynamo's default limit of 8 and silently fall back to eager: raise it.
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks_of(backbone):
        block.compile(backend=backend, fullgraph=False, dynamic=None)


def apply_autocast(backbone: nn.Module, dtype: torch.dtype) -> None:
    """Without FSDP2's MixedPrecisionPolicy (no device mesh) compute in `dtype` under autocast; the
    parameters (the optimizer's master weights) stay fp32."""
    if getattr(backbone, "_lit_ovis_autocast", None) is not None:
        return
    forward = backbone.forward

    @functools.wraps(forward)
    def run(*args, **kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        device_type = x.device.type if isinstance(x, torch.Tensor) else "cuda"
        with torch.autocast(device_type=device_type, dtype=dtype):
            return forward(*args, **kwargs)

    backbone.forward = run
    backbone._lit_ovis_autocast = dtype


def _classic_fsdp(module) -> bool:
    """True when the module trains under Lightning's FSDPStrategy (FSDP1), which checkpoints blocks and
    handles precision itself."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return False
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def parallelize_module(module, device_mesh, cfg: ParallelConfig) -> None:
    """Apply the configured levers to `module.backbone` (+ frozen models) in place.

    Without a device mesh (one device, or Lightning's classic FSDPStrategy) nothing is sharded: the
    attention backend, checkpointing, offloading, compilation and (through autocast) the compute dtype
    still apply. Under FSDP1 the strategy owns checkpointing (its wrappers) and precision, and compiling
    FSDP1's flat parameters is unsupported, so those levers are skipped with a warning.
    """
    backbone = module.backbone
    if cfg.attention_backend:
        backbone.set_attention_backend(cfg.attention_backend)
    checkpointing, compile_, param_dtype = cfg.activation_checkpointing, cfg.compile, cfg.param_dtype
    if device_mesh is None and _classic_fsdp(module):
        skipped = [f"{k}={v}" for k, v in (("activation_checkpointing", checkpointing), ("compile", compile_), ("param_dtype", param_dtype))
                   if v not in ("none", False, "fp32")]
        if skipped:
            warnings.warn(f"model.parallel: {', '.join(skipped)} ignored under the classic FSDPStrategy (FSDP1), which checkpoints "
                          "blocks and sets precision itself; use configs/strategy/fsdp1_hybrid.yaml's values", stacklevel=2)
        checkpointing, compile_, param_dtype = "none", False, "fp32"
    if checkpointing != "none":
        apply_activation_checkpointing(backbone, checkpointing, cfg.checkpoint_every_n_blocks)
    if cfg.activation_offloading:
        apply_activation_offloading(backbone)
    if compile_:
        apply_compile(backbone)
    reference = getattr(module, "reference", None)
    if device_mesh is None:
        for model in (backbone, reference):
            if model is None:
                continue
            if model is reference and cfg.attention_backend:
                reference.set_attention_backend(cfg.attention_backend)
            if param_dtype != "fp32":  # the reference computes like the policy, as under FSDP2
                apply_autocast(model, DTYPES[param_dtype])
        return
    mesh = data_parallel_mesh(device_mesh, cfg.data_parallel_replicate, cfg.hsdp)
    shard_transformer(backbone, mesh, cfg)
    if reference is not None:
        if cfg.attention_backend:
            reference.set_attention_backend(cfg.attention_backend)
        shard_frozen(reference, mesh, cfg)
    text_encoder = getattr(module, "text_encoder", None)
    if cfg.shard_frozen and text_encoder is not None:
        shard_frozen(text_encoder.model, mesh, cfg)
