"""`lit-ovis estimate-memory`: per-GPU memory of a training configuration before launching it.

    lit-ovis estimate-memory --preset ovis-image-7b --world-size 32 --replicate 4 --height 1024 --width 1024 \\
        --batch-size 2 --checkpointing full

Model (bytes per GPU; P = parameters, S = ranks a parameter is sharded over = world / replicate):
- master weights fp32 4P/S, gradients fp32 4P/S, AdamW moments 8P/S (FSDP2 shards all three);
- gathered compute copies: two blocks' parameters in the compute dtype (current + prefetched);
- frozen text encoder (2.03B for Ovis2.5-2B's LLM) in bf16, sharded unless embeddings are precomputed;
  frozen VAE (84M) replicated; DPO/GRPO reference model in bf16, sharded;
- EMA (model.ema.enabled): an fp32 shadow of the trainable weights, sharded like them, 4P/S;
- activations saved for backward: per sample, N = image + text tokens, width d, element size e:
  N d e (32.3 per double-stream block + 29.2 per single-stream block + 3.3 outside the blocks).
  The coefficients were measured from the bytes of tensors autograd saves (CPU, SDPA) and are checked
  in tests; full checkpointing keeps ~1 N d per block plus one block's activations for recompute.
- activation offloading moves everything autograd saves except parameters, their gathered/cast copies
  and tiny tensors: measured on CPU with the same hooks, the moved bytes are 0.9-1.1x the saved
  activation bytes (tests/test_memory.py), so no fraction of the offloaded activations stays. What
  stays on the GPU is the inputs of checkpointed blocks (kept by checkpointing, outside the hooks) and
  one block's activations at a time (produced in forward before their copy, brought back in backward);
  the offloaded bytes fill pinned host memory instead (printed below the total).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from lit_ovis.errors import OneLineArgumentParser
from lit_ovis.models.presets import TEXT_ENCODER_PRESETS, TRANSFORMER_PRESETS, lookup
from lit_ovis.parallel.memory import checkpointed_block_indices

DOUBLE_BLOCK, SINGLE_BLOCK, OUTSIDE = 32.3, 29.2, 3.3
GIB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def transformer_params(cfg: dict) -> int:
    from lit_ovis.models.backbone import count_parameters
    import torch
    from diffusers import OvisImageTransformer2DModel

    with torch.device("meta"):
        return count_parameters(OvisImageTransformer2DModel(**cfg))


def block_params(cfg: dict) -> int:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    double = 2 * (6 * d * d + 4 * d * d + 8 * d * d + 4 * d * d)  # modulation, qkv/out, SwiGLU up, down (per stream)
    return double


def activation_bytes(cfg: dict, image_tokens: int, text_tokens: int, batch: int, element: int, checkpointing: str = "none", every_n: int = 2,
                     offload: bool = False) -> float:
    """Bytes of activations held on the GPU for backward (see the module docstring)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n = image_tokens + text_tokens
    blocks = [DOUBLE_BLOCK] * cfg["num_layers"] + [SINGLE_BLOCK] * cfg["num_single_layers"]
    checkpointed = set(checkpointed_block_indices(len(blocks), checkpointing, every_n))
    # a checkpointed block keeps only its input (~1 N d), outside autograd's saved tensors, so offloading
    # leaves it on the GPU; everything else autograd saves moves to the host when offloading
    kept = [1.0 if i in checkpointed else (0.0 if offload else c) for i, c in enumerate(blocks)]
    outside = 0.0 if offload else OUTSIDE
    # one block's activations are live at a time while they are recomputed (checkpointing) or produced
    # before their copy to the host / brought back for backward (offloading)
    working = max(blocks) if checkpointed or offload else 0.0
    return batch * n * d * element * (sum(kept) + working + outside)


def host_activation_bytes(cfg: dict, image_tokens: int, text_tokens: int, batch: int, element: int, checkpointing: str = "none",
                          every_n: int = 2) -> float:
    """Pinned host memory per GPU that offloading fills: the saved activations of the blocks that are not
    checkpointed and of the layers outside the blocks."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    blocks = [DOUBLE_BLOCK] * cfg["num_layers"] + [SINGLE_BLOCK] * cfg["num_single_layers"]
    checkpointed = set(checkpointed_block_indices(len(blocks), checkpointing, every_n))
    moved = sum(c for i, c in enumerate(blocks) if i not in checkpointed) + OUTSIDE
    return batch * (image_tokens + text_tokens) * d * element * moved


@dataclass
class Estimate:
    rows: list[tuple[str, float]]
    host_rows: list[tuple[str, float]] = field(default_factory=list)  # host memory, not in the GPU total

    @property
    def total(self) -> float:
        return sum(v for _, v in self.rows)


def estimate(preset: str, world_size: int, replicate: int, height: int, width: int, batch: int, text_tokens: int = 256,
             compute_dtype: str = "bf16", checkpointing: str = "none", every_n: int = 2, offload_activations: bool = False,
             text_encoder: str = "sharded", reference: bool = False, ema: bool = False, config: dict | None = None) -> Estimate:
    """`config`: a transformer config to estimate instead of the preset's (e.g. a reduced-depth benchmark model)."""
    cfg = config or lookup(TRANSFORMER_PRESETS, preset, "backbone")
    p = transformer_params(cfg)
    shard = max(world_size // max(replicate, 1), 1)
    e = BYTES[compute_dtype]
    image_tokens = (height // 16) * (width // 16)
    rows = [
        ("master weights (fp32, sharded)", 4 * p / shard),
        ("gradients (fp32, sharded)", 4 * p / shard),
        ("AdamW moments (fp32, sharded)", 8 * p / shard),
        *([("EMA (fp32, sharded)", 4 * p / shard)] if ema else []),
        ("gathered compute params (2 blocks)", 2 * block_params(cfg) * e),
    ]
    te = TEXT_ENCODER_PRESETS["ovis2.5-2b" if preset != "tiny" else "tiny"]
    te_params = te["vocab_size"] * te["hidden_size"] + te["num_hidden_layers"] * (
        te["hidden_size"] * (te["num_attention_heads"] + 2 * te["num_key_value_heads"]) * te["head_dim"]
        + te["num_attention_heads"] * te["head_dim"] * te["hidden_size"] + 3 * te["hidden_size"] * te["intermediate_size"])
    if text_encoder != "precomputed":
        rows.append((f"text encoder (bf16, {text_encoder})", 2 * te_params / (shard if text_encoder == "sharded" else 1)))
    rows.append(("VAE (bf16, replicated)", 2 * 83_819_683))
    if reference:
        rows.append(("reference model (bf16, sharded)", 2 * p / shard))
    act = activation_bytes(cfg, image_tokens, text_tokens, batch, e, checkpointing, every_n, offload_activations)
    rows.append((f"activations ({checkpointing} checkpointing{', offloaded to CPU' if offload_activations else ''})", act))
    rows.append(("CUDA context + allocator slack", 2.5 * GIB))
    host = []
    if offload_activations:
        host.append(("offloaded activations (pinned host memory per GPU)", host_activation_bytes(cfg, image_tokens, text_tokens, batch, e, checkpointing, every_n)))
    return Estimate(rows, host)


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="lit-ovis estimate-memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ovis-image-7b")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--replicate", type=int, default=1, help="HSDP replicas (nodes); 1 = plain FSDP")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1, help="per GPU")
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--compute-dtype", default="bf16", choices=sorted(BYTES))
    p.add_argument("--checkpointing", default="none", choices=["none", "full", "selective"])
    p.add_argument("--every-n", type=int, default=2)
    p.add_argument("--offload-activations", action="store_true")
    p.add_argument("--text-encoder", default="sharded", choices=["sharded", "replicated", "precomputed"])
    p.add_argument("--reference", action="store_true", help="DPO / GRPO: a frozen reference copy")
    p.add_argument("--ema", action="store_true", help="model.ema.enabled: an fp32 EMA copy of the weights")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    args = p.parse_args(argv)
    est = estimate(args.preset, args.world_size, args.replicate, args.height, args.width, args.batch_size, args.text_tokens,
                   args.compute_dtype, args.checkpointing, args.every_n, args.offload_activations, args.text_encoder, args.reference, args.ema)
    width = max(len(n) for n, _ in est.rows)
    print(f"{args.preset}: world {args.world_size} (replicate {args.replicate}), {args.height}x{args.width}, batch {args.batch_size}/GPU")
    for name, value in est.rows:
        print(f"  {name:<{width}}  {value / GIB:8.2f} GiB")
    verdict = "fits" if est.total <= args.gpu_memory_gib * GIB else "does NOT fit"
    print(f"  {'total per GPU':<{width}}  {est.total / GIB:8.2f} GiB  -> {verdict} in {args.gpu_memory_gib:.0f} GiB")
    for name, value in est.host_rows:
        print(f"  {name}: {value / GIB:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
