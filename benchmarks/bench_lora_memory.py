"""Check `lit-ovis estimate-memory`'s LoRA model against memory measured on CPU: the Ovis-Image-7B backbone at
full width (3072, 24 heads x 128) and reduced depth (1 double- + 1 single-stream block), a rank-64 adapter on
attention + MLP, the frozen base in bf16 (or weight-only int8 through torchao), bf16 compute (autocast).

Method (tracked tensor bytes, not RSS, which a shared machine makes noisy): after one forward, backward and AdamW
step, the bytes of every distinct storage held by the model (base weights; quantised weights counted by their
int8 data + scales), the adapter's gradients and optimizer state, plus the bytes of the distinct storages autograd
saved for backward in the forward (saved_tensors_hooks, parameters excluded). CPU attention (SDPA's math kernel)
saves the N x N attention probabilities, which a GPU's fused flash kernel never stores and the estimator does not
model: saved tensors whose last two dims are N x N are reported apart and left out of the comparison. The text
encoder (precomputed embeddings), VAE and CUDA context are not in either number.

    PYTHONPATH=. python benchmarks/bench_lora_memory.py [--quantize int8] [--height 256 --width 256 --text-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from lit_ovis.cli.estimate_memory import GIB, LoRASetting, StageSetting, estimate
from lit_ovis.models.lora import add_lora, target_module_names
from lit_ovis.models.quantize import stored_bytes as tensor_bytes
from lit_ovis.models.presets import TRANSFORMER_PRESETS
from lit_ovis.models.text_encoder import text_ids
from lit_ovis.models.vae import latent_image_ids


def storage_pointers(t: torch.Tensor) -> set[int]:
    """Data pointers of a tensor's storages, through tensor subclasses (quantised weights) to their inner data."""
    inner = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__"):
        names, _ = inner.__tensor_flatten__()
        return set().union(*(storage_pointers(getattr(inner, n)) for n in names))
    return {inner.untyped_storage().data_ptr()}


def reduced_config(double: int, single: int) -> dict:
    return {**TRANSFORMER_PRESETS["ovis-image-7b"], "num_layers": double, "num_single_layers": single}


def build(cfg: dict, rank: int, targets: str, quantize: str) -> torch.nn.Module:
    from diffusers import OvisImageTransformer2DModel

    from lit_ovis.models.quantize import quantize_frozen_base

    with torch.device("meta"):
        model = OvisImageTransformer2DModel(**cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    add_lora(model, rank, float(rank), 0.0, target_module_names(model, targets))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)  # a trained adapter (B = 0 would make some gradients exactly zero)
    quantize_frozen_base(model, quantize)
    return model


def measure(model, cfg: dict, height: int, width: int, text_tokens: int, batch: int) -> dict[str, float]:
    lh, lw = height // 8, width // 8
    n_img = (lh // 2) * (lw // 2)
    n = n_img + text_tokens
    params = {ptr for p in model.parameters() for ptr in storage_pointers(p)}
    saved: dict[int, tuple[int, bool]] = {}

    def pack(t):
        if type(t) is torch.Tensor and t.untyped_storage().data_ptr() not in params:
            ptr = t.untyped_storage().data_ptr()
            square = t.dim() >= 2 and tuple(t.shape[-2:]) == (n, n)
            saved[ptr] = (max(saved.get(ptr, (0, False))[0], t.untyped_storage().nbytes()), square)
        return t

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n_img, cfg["in_channels"], generator=g)
    emb = torch.randn(batch, text_tokens, cfg["joint_attention_dim"], generator=g)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(hidden_states=x, encoder_hidden_states=emb, timestep=torch.full((batch,), 0.5), img_ids=latent_image_ids(lh, lw),
                    txt_ids=text_ids(text_tokens), return_dict=False)[0]
    out.float().square().mean().backward()
    opt.step()
    seconds = time.perf_counter() - start
    base = sum(tensor_bytes(p) for p in model.parameters() if not p.requires_grad)
    adapter = sum(tensor_bytes(p) for p in trainable)
    grads = sum(tensor_bytes(p.grad) for p in trainable)
    states = sum(tensor_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"base": base, "adapter_states": adapter + grads + states, "activations": sum(b for b, sq in saved.values() if not sq),
            "attention_matrices": sum(b for b, sq in saved.values() if sq), "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=1)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--targets", default="attention_mlp")
    ap.add_argument("--quantize", default="none", choices=["none", "int8"])
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = reduced_config(args.double, args.single)
    model = build(cfg, args.rank, args.targets, args.quantize)
    got = measure(model, cfg, args.height, args.width, args.text_tokens, args.batch)
    est = estimate("ovis-image-7b", 1, 1, args.height, args.width, args.batch, args.text_tokens, "bf16", "none",
                   text_encoder="precomputed", lora=LoRASetting(args.rank, args.targets, "bf16", args.quantize),
                   stage=StageSetting("sft"), config=cfg)
    rows = dict(est.rows)
    predicted = {"base": next(v for k, v in rows.items() if k.startswith("frozen base")),
                 "adapter_states": next(v for k, v in rows.items() if k.startswith("LoRA r=")),
                 "activations": next(v for k, v in rows.items() if k.startswith("activations"))}
    print(f"{args.double}+{args.single} blocks at full width, LoRA r={args.rank} {args.targets}, base {args.quantize if args.quantize != 'none' else 'bf16'}, "
          f"{args.height}x{args.width} + {args.text_tokens} text tokens, batch {args.batch} (forward+backward+step {got['seconds']:.0f} s)")
    for k in predicted:
        print(f"  {k:<15} measured {got[k] / 2**20:10.1f} MiB   estimated {predicted[k] / 2**20:10.1f} MiB   ratio {predicted[k] / got[k]:.3f}")
    total_m, total_e = sum(got[k] for k in predicted), sum(predicted.values())
    print(f"  {'total':<15} measured {total_m / 2**20:10.1f} MiB   estimated {total_e / 2**20:10.1f} MiB   ratio {total_e / total_m:.3f}")
    print(f"  (CPU attention matrices, not modelled: {got['attention_matrices'] / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
