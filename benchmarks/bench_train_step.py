"""Training-step time and MFU with each speed/memory lever on and off, measured side by side in one run.

GPU (the real question; full width 3072, reduced depth fits one GPU):
    python benchmarks/bench_train_step.py --width full --double 2 --single 4 --resolutions 256 512 1024 --dtype bf16
CPU (this repo's CI machines): tiny width, ratios lever-on / lever-off only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import OvisImageTransformer2DModel

from lit_ovis.models.text_encoder import text_ids
from lit_ovis.models.vae import latent_image_ids
from lit_ovis.parallel.flops import PEAK_BF16_TFLOPS, train_flops
from lit_ovis.parallel.memory import apply_activation_checkpointing, apply_activation_offloading


def build(width: str, double: int, single: int, dtype) -> tuple[OvisImageTransformer2DModel, dict]:
    if width == "full":
        cfg = dict(num_layers=double, num_single_layers=single, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=2048, axes_dims_rope=(16, 56, 56))
    else:
        cfg = dict(num_layers=double, num_single_layers=single, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(8, 12, 12))
    cfg.update(in_channels=64, out_channels=64)
    torch.manual_seed(0)
    return OvisImageTransformer2DModel(**cfg), cfg


def step_time(model, cfg, res: int, batch: int, text: int, device, dtype, repeats: int) -> float:
    h = w = res // 8
    ni = (h // 2) * (w // 2)
    x = torch.randn(batch, ni, 64, device=device)
    ctx = torch.randn(batch, text, cfg["joint_attention_dim"], device=device)
    t = torch.rand(batch, device=device)
    ids_i, ids_t = latent_image_ids(h, w, device=device), text_ids(text, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")

    def one():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            out = model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=ids_i, txt_ids=ids_t, return_dict=False)[0]
            loss = out.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        one()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", default="tiny", choices=["tiny", "full"])
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS["H100-SXM"])
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    levers = ["baseline", "checkpoint_full", "checkpoint_selective", "offload_activations"] + (["compile"] if device == "cuda" else [])
    print(f"device={device} width={args.width} blocks={args.double}+{args.single} batch={args.batch} text={args.text} dtype={args.dtype}")
    print("| resolution | lever | step s | ratio vs baseline | TFLOP/s | MFU | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for res in args.resolutions:
        base = None
        for lever in levers:
            model, cfg = build(args.width, args.double, args.single, dtype)
            model = model.to(device)
            if lever == "checkpoint_full":
                apply_activation_checkpointing(model, "full")
            elif lever == "checkpoint_selective":
                apply_activation_checkpointing(model, "selective", 2)
            elif lever == "offload_activations":
                apply_activation_offloading(model)
            elif lever == "compile":
                from lit_ovis.parallel.fsdp import apply_compile

                apply_compile(model)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = step_time(model, cfg, res, args.batch, args.text, device, dtype, args.repeats)
            base = base or seconds
            tokens = (res // 16) ** 2
            tflops = train_flops({**cfg}, tokens, args.text) * args.batch / seconds / 1e12
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            mfu = tflops / args.peak_tflops if device == "cuda" else float("nan")
            print(f"| {res} | {lever} | {seconds:.4f} | {seconds / base:.2f} | {tflops:.3f} | {mfu:.3f} | {peak:.2f} |", flush=True)
            del model


if __name__ == "__main__":
    main()
