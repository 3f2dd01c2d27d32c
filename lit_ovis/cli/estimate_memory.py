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

LoRA (`--lora-rank R`, one GPU or FSDP2): the frozen base in its dtype (bf16 2P, or weight-only int8/float8:
1 byte per linear weight plus a bf16 scale per output channel), no gradients or optimizer state for it; the
adapter's fp32 weights, gradients and AdamW moments (16 bytes per adapter parameter); no reference copy (SDPO
and GRPO run the adapter-off base). Autograd saves less through a frozen layer (no input kept for a weight
gradient): per block N d e x (22.3 double / 20.2 single, 1.2 outside) with attention adapters, (27.4 / 25.3 /
1.2) with attention + MLP, (31.4 / 27.3 / 3.6) on all linear layers, measured like the coefficients above.
Attention is modelled as a fused (flash) kernel: no N x N score matrix is held. A quantised base dequantises each
weight per call and autograd keeps that bf16 copy for backward (`dequantised_saved_bytes`), so int8 saves memory
in training only together with activation checkpointing (then one block's copies at a time).
Stages (`--stage`): sdpo adds the winner (x2 batch with --sdpo-batched) and a no-grad reference forward's working
block; grpo takes the larger of a rollout (no grad, `--rollout-batch-size` images, x2 with CFG) and an update
(`--batch-size` samples, x2 with CFG, plus the reference forward), and holds the stored trajectories.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass, field

from lit_ovis.errors import OneLineArgumentParser
from lit_ovis.models.presets import TEXT_ENCODER_PRESETS, TRANSFORMER_PRESETS, lookup
from lit_ovis.parallel.memory import checkpointed_block_indices

DOUBLE_BLOCK, SINGLE_BLOCK, OUTSIDE = 32.3, 29.2, 3.3
# What autograd saves per block with a frozen base and LoRA adapters (N d e units), by `lora.targets`.
LORA_ACTIVATIONS = {"attention": (22.3, 20.2, 1.2), "attention_mlp": (27.4, 25.3, 1.2), "all_linear": (31.4, 27.3, 3.6)}
GIB = 1024**3
GPU_SIZES_GB = (24, 48, 80)
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
STAGES = ("sft", "sdpo", "grpo")


def transformer_params(cfg: dict) -> int:
    return _transformer_params(json.dumps(cfg, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _transformer_params(cfg_json: str) -> int:
    from lit_ovis.models.backbone import count_parameters
    import torch
    from diffusers import OvisImageTransformer2DModel

    with torch.device("meta"):
        return count_parameters(OvisImageTransformer2DModel(**json.loads(cfg_json)))


def block_params(cfg: dict) -> int:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    double = 2 * (6 * d * d + 4 * d * d + 8 * d * d + 4 * d * d)  # modulation, qkv/out, SwiGLU up, down (per stream)
    return double


def activation_bytes(cfg: dict, image_tokens: int, text_tokens: int, batch: int, element: int, checkpointing: str = "none", every_n: int = 2,
                     offload: bool = False, lora_targets: str | None = None) -> float:
    """Bytes of activations held on the GPU for backward (see the module docstring); `lora_targets`: a frozen
    base with adapters on those layers."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n = image_tokens + text_tokens
    double, single, outside_c = LORA_ACTIVATIONS[lora_targets] if lora_targets else (DOUBLE_BLOCK, SINGLE_BLOCK, OUTSIDE)
    blocks = [double] * cfg["num_layers"] + [single] * cfg["num_single_layers"]
    checkpointed = set(checkpointed_block_indices(len(blocks), checkpointing, every_n))
    # a checkpointed block keeps only its input (~1 N d), outside autograd's saved tensors, so offloading
    # leaves it on the GPU; everything else autograd saves moves to the host when offloading
    kept = [1.0 if i in checkpointed else (0.0 if offload else c) for i, c in enumerate(blocks)]
    outside = 0.0 if offload else outside_c
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


@dataclass
class LoRASetting:
    """A LoRA run's memory-relevant settings (`model.lora`)."""

    rank: int = 64
    targets: str = "attention_mlp"
    base_dtype: str = "bf16"
    quantize_base: str = "none"


@dataclass
class StageSetting:
    """What a stage holds besides one training forward/backward: SDPO's pairs and reference forward, GRPO's
    rollouts, CFG and stored trajectories (`model.sdpo`, `model.grpo`)."""

    name: str = "sft"
    sdpo_batched: bool = True
    rollout_batch_size: int = 8
    images_per_iteration: int = 16
    rollout_steps: int = 10
    cfg: bool = True


def linear_layers(cfg: dict, targets: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(in, out) features of every linear layer of the backbone, and of those LoRA `targets` adapts (meta device)."""
    return _linear_layers(json.dumps(cfg, sort_keys=True), targets)


@functools.lru_cache(maxsize=16)  # the plan table asks for the same model many times
def _linear_layers(cfg_json: str, targets: str):
    import torch
    from diffusers import OvisImageTransformer2DModel

    from lit_ovis.models.lora import target_module_names

    with torch.device("meta"):
        model = OvisImageTransformer2DModel(**json.loads(cfg_json))
    linear = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return list(linear.values()), [linear[n] for n in target_module_names(model, targets)]


def dequantised_saved_bytes(cfg: dict, e: int, checkpointing: str, every_n: int) -> float:
    """A weight-only quantised linear layer dequantises its weight per call, and autograd keeps that copy for the
    input's gradient (measured on CPU with torchao 0.18): for every layer on the gradient path (the blocks'
    attention and MLP projections and proj_out; not the modulation or embedding layers, whose inputs need no
    gradient) of a block that is not checkpointed, plus one block's while it is recomputed."""
    per_block = _grad_path_weights(json.dumps(cfg, sort_keys=True))
    checkpointed = set(checkpointed_block_indices(len(per_block) - 1, checkpointing, every_n))
    kept = sum(w for i, w in enumerate(per_block[:-1]) if i not in checkpointed) + per_block[-1]
    return e * (kept + (max(per_block[:-1]) if checkpointed else 0))


@functools.lru_cache(maxsize=16)
def _grad_path_weights(cfg_json: str) -> list[int]:
    """Linear weight elements on the gradient path per block (double-stream first), then outside the blocks."""
    import torch
    from diffusers import OvisImageTransformer2DModel

    cfg = json.loads(cfg_json)
    with torch.device("meta"):
        model = OvisImageTransformer2DModel(**cfg)
    blocks = [0] * (cfg["num_layers"] + cfg["num_single_layers"]) + [0]
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or ".norm" in name or name.startswith(("norm", "time_", "x_embedder", "context_embedder")):
            continue
        parts = name.split(".")
        if parts[0] == "transformer_blocks":
            blocks[int(parts[1])] += m.weight.numel()
        elif parts[0] == "single_transformer_blocks":
            blocks[cfg["num_layers"] + int(parts[1])] += m.weight.numel()
        else:
            blocks[-1] += m.weight.numel()
    return blocks


def frozen_base_bytes(p: int, linear: list[tuple[int, int]], base_dtype: str, quantize: str) -> float:
    """The frozen base: every parameter in `base_dtype`, or weight-only int8/float8 linear weights (1 byte each plus
    one scale per output channel in the base dtype) with the rest (norms, biases) in the base dtype."""
    e = BYTES[base_dtype]
    if quantize == "none":
        return e * p
    weights = sum(i * o for i, o in linear)
    return weights + e * sum(o for _, o in linear) + e * (p - weights)


def estimate(preset: str, world_size: int, replicate: int, height: int, width: int, batch: int, text_tokens: int = 256,
             compute_dtype: str = "bf16", checkpointing: str = "none", every_n: int = 2, offload_activations: bool = False,
             text_encoder: str = "sharded", reference: bool = False, ema: bool = False, lora: LoRASetting | None = None,
             stage: StageSetting | None = None, config: dict | None = None) -> Estimate:
    """Per-GPU bytes by component (see the module docstring); `lora` None: full fine-tuning; `config`: a backbone
    config instead of the preset's (e.g. reduced depth)."""
    cfg = config or lookup(TRANSFORMER_PRESETS, preset, "backbone")
    stage = stage or StageSetting()
    if stage.name not in STAGES:
        raise ValueError(f"unknown stage {stage.name!r}: one of {', '.join(STAGES)}")
    p = transformer_params(cfg)
    shard = max(world_size // max(replicate, 1), 1)
    e = BYTES[compute_dtype]
    image_tokens = (height // 16) * (width // 16)
    sharded = ", sharded" if shard > 1 else ""
    if lora is None:
        rows = [
            ("master weights (fp32, sharded)", 4 * p / shard),
            ("gradients (fp32, sharded)", 4 * p / shard),
            ("AdamW moments (fp32, sharded)", 8 * p / shard),
            *([("EMA (fp32, sharded)", 4 * p / shard)] if ema else []),
            ("gathered compute params (2 blocks)", 2 * block_params(cfg) * e),
        ]
    else:
        linear, adapted = linear_layers(cfg, lora.targets)
        adapter = lora.rank * sum(i + o for i, o in adapted)
        base = lora.quantize_base if lora.quantize_base != "none" else lora.base_dtype
        rows = [(f"frozen base ({base}{sharded}, no grads or optimizer state)", frozen_base_bytes(p, linear, lora.base_dtype, lora.quantize_base) / shard),
                (f"LoRA r={lora.rank} {lora.targets}: {adapter / 1e6:.0f}M fp32 weights + grads + AdamW", 16 * adapter / shard),
                *([("EMA of the adapter (fp32)", 4 * adapter / shard)] if ema else [])]
        if shard > 1:
            rows.append(("gathered compute params (2 blocks)", 2 * block_params(cfg) * e))
        if lora.quantize_base != "none":
            rows.append((f"dequantised weights saved for backward ({checkpointing} checkpointing)",
                         dequantised_saved_bytes(cfg, e, checkpointing, every_n)))
    te = TEXT_ENCODER_PRESETS["ovis2.5-2b" if preset != "tiny" else "tiny"]
    te_params = te["vocab_size"] * te["hidden_size"] + te["num_hidden_layers"] * (
        te["hidden_size"] * (te["num_attention_heads"] + 2 * te["num_key_value_heads"]) * te["head_dim"]
        + te["num_attention_heads"] * te["head_dim"] * te["hidden_size"] + 3 * te["hidden_size"] * te["intermediate_size"])
    if text_encoder != "precomputed":
        rows.append((f"text encoder (bf16, {text_encoder})", 2 * te_params / (shard if text_encoder == "sharded" else 1)))
    rows.append(("VAE (bf16, replicated)", 2 * 83_819_683))
    if lora is None and (reference or stage.name != "sft"):
        rows.append(("reference model (bf16, sharded)", 2 * p / shard))
    rows.extend(stage_activation_rows(cfg, stage, image_tokens, text_tokens, batch, e, checkpointing, every_n, offload_activations,
                                      lora.targets if lora else None))
    rows.append(("CUDA context + allocator slack", 2.5 * GIB))
    host = []
    if offload_activations:
        host.append(("offloaded activations (pinned host memory per GPU)", host_activation_bytes(cfg, image_tokens, text_tokens, batch, e, checkpointing, every_n)))
    return Estimate(rows, host)


def stage_activation_rows(cfg: dict, stage: StageSetting, image_tokens: int, text_tokens: int, batch: int, e: int, checkpointing: str,
                          every_n: int, offload: bool, lora_targets: str | None) -> list[tuple[str, float]]:
    """Activation memory of the stage's peak: SFT one forward/backward; SDPO the policy on the pair plus the
    no-grad reference's working block; GRPO the larger of the update (+ reference) and a rollout forward."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    saved = functools.partial(activation_bytes, cfg, image_tokens, text_tokens, element=e, checkpointing=checkpointing,
                              every_n=every_n, offload=offload, lora_targets=lora_targets)
    how = f"{checkpointing} checkpointing{', offloaded to CPU' if offload else ''}"

    def no_grad_block(samples: int) -> float:  # a forward without grad holds one block's intermediates at a time
        return samples * (image_tokens + text_tokens) * d * e * DOUBLE_BLOCK

    if stage.name == "sft":
        return [(f"activations ({how})", saved(batch=batch))]
    if stage.name == "sdpo":
        samples = 2 * batch if stage.sdpo_batched else batch
        return [(f"activations (policy on {'winner + loser' if stage.sdpo_batched else 'one side'}, {how})", saved(batch=samples)),
                ("reference forward (no grad, one block at a time)", no_grad_block(samples))]
    cfg_x = 2 if stage.cfg else 1
    update = saved(batch=batch * cfg_x) + no_grad_block(batch * cfg_x)
    rollout = no_grad_block(stage.rollout_batch_size * cfg_x)
    trajectories = stage.images_per_iteration * ((stage.rollout_steps + 1) * image_tokens * 64 + text_tokens * cfg["joint_attention_dim"]) * 4
    return [(f"activations (max of update + reference forward and rollout, {how})", max(update, rollout)),
            ("rollout trajectories + prompt embeddings (fp32)", trajectories)]


def fits(total: float) -> str:
    return ", ".join(f"{gb} GB {'yes' if total <= gb * GIB else 'no'}" for gb in GPU_SIZES_GB)


def plan(preset: str, height: int, width: int, batch: int, checkpointing: str, text_encoder: str, stages=STAGES,
         ranks=(16, 64, 128), bases=("bf16", "int8")) -> list[tuple[str, int, str, float]]:
    """One GPU, LoRA: (stage, rank, base, total bytes) over the given settings."""
    rows = []
    for stage in stages:
        for rank in ranks:
            for base in bases:
                lora = LoRASetting(rank=rank, quantize_base=base if base in ("int8", "float8") else "none",
                                   base_dtype=base if base in BYTES else "bf16")
                est = estimate(preset, 1, 1, height, width, batch, checkpointing=checkpointing, text_encoder=text_encoder,
                               lora=lora, stage=StageSetting(name=stage))
                rows.append((stage, rank, base, est.total))
    return rows


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
    p.add_argument("--stage", default="sft", choices=list(STAGES), help="sdpo / grpo: a reference (a copy, or with LoRA the "
                   "adapter-off base), SDPO's pairs, GRPO's rollouts and trajectories")
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: a LoRA run (model.lora.rank); 0: full fine-tuning")
    p.add_argument("--lora-targets", default="attention_mlp", choices=sorted(LORA_ACTIVATIONS))
    p.add_argument("--base-dtype", default="bf16", choices=sorted(BYTES), help="LoRA: dtype of the frozen base")
    p.add_argument("--quantize-base", default="none", choices=["none", "int8", "float8"], help="LoRA: weight-only quantised base")
    p.add_argument("--sdpo-unbatched", action="store_true", help="sdpo: winner and loser in two forwards (sdpo.batched_forward false)")
    p.add_argument("--rollout-batch-size", type=int, default=8, help="grpo: images per rollout forward")
    p.add_argument("--images-per-iteration", type=int, default=16, help="grpo: prompts x group size per GPU")
    p.add_argument("--rollout-steps", type=int, default=10)
    p.add_argument("--no-cfg", action="store_true", help="grpo: guidance scale 1 (one forward per sample instead of two)")
    p.add_argument("--plan", action="store_true", help="one GPU, LoRA: a table of ranks x bf16/int8 base x stages with "
                   "which of 24 / 48 / 80 GB they fit (uses --height/--width/--batch-size/--checkpointing/--text-encoder)")
    args = p.parse_args(argv)
    if args.plan:
        print(f"{args.preset}, one GPU, LoRA on attention + MLP, {args.height}x{args.width}, batch {args.batch_size}, "
              f"{args.checkpointing} checkpointing, text encoder {args.text_encoder}")
        for stage, rank, base, total in plan(args.preset, args.height, args.width, args.batch_size, args.checkpointing, args.text_encoder):
            print(f"  {stage:<5} r={rank:<4} base {base:<5} {total / GIB:7.2f} GiB   fits: {fits(total)}")
        return 0
    lora = LoRASetting(args.lora_rank, args.lora_targets, args.base_dtype, args.quantize_base) if args.lora_rank > 0 else None
    stage = StageSetting(args.stage, not args.sdpo_unbatched, args.rollout_batch_size, args.images_per_iteration, args.rollout_steps,
                         not args.no_cfg)
    est = estimate(args.preset, args.world_size, args.replicate, args.height, args.width, args.batch_size, args.text_tokens,
                   args.compute_dtype, args.checkpointing, args.every_n, args.offload_activations, args.text_encoder, args.reference,
                   args.ema, lora, stage)
    width = max(len(n) for n, _ in est.rows)
    what = f"LoRA r={args.lora_rank}" if lora else "full fine-tuning"
    print(f"{args.preset} {args.stage} ({what}): world {args.world_size} (replicate {args.replicate}), {args.height}x{args.width}, "
          f"batch {args.batch_size}/GPU")
    for name, value in est.rows:
        print(f"  {name:<{width}}  {value / GIB:8.2f} GiB")
    verdict = "fits" if est.total <= args.gpu_memory_gib * GIB else "does NOT fit"
    print(f"  {'total per GPU':<{width}}  {est.total / GIB:8.2f} GiB  -> {verdict} in {args.gpu_memory_gib:.0f} GiB")
    print(f"  fits: {fits(est.total)}")
    for name, value in est.host_rows:
        print(f"  {name}: {value / GIB:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
