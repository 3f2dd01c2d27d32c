"""Sampling latency: our sampler vs diffusers' OvisImagePipeline on the same weights, same prompt, same
noise, side by side in one run. Both decode with the same VAE; ours batches CFG's two branches into one
forward. On a GPU (the real question: 1024x1024, 50 steps, CFG 5 on the 7B model) run

    python benchmarks/bench_sampling.py --preset ovis-image-7b --weights /path/to/Ovis-Image-7B --height 1024 --width 1024 --steps 50 --dtype bf16

On CPU it runs the tiny preset and reports the ratio (ours / pipeline).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--weights", default=None, help="diffusers folder with transformer/, text_encoder/, tokenizer/, vae/")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="regional compilation of our blocks")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    from lit_ovis.cli.export import build_pipeline
    from lit_ovis.models.backbone import build_backbone
    from lit_ovis.models.text_encoder import build_text_encoder
    from lit_ovis.models.vae import build_vae
    from lit_ovis.sampling.generate import SamplingConfig, generate_images

    source = args.weights
    transformer = build_backbone(args.preset, pretrained=source, dtype=dtype).to(device).eval()
    encoder = build_text_encoder(source or "tiny", dtype=dtype).to(device)
    vae = build_vae(source or "tiny", dtype=dtype).to(device)
    pipe = build_pipeline(transformer, encoder, vae, SamplingConfig())
    cfg = SamplingConfig(steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width)
    prompt = ['A poster with the text "LIT OVIS" in bold letters']

    def ours():
        generate_images(transformer, encoder, vae, prompt, cfg, seed=0)

    def theirs():
        pipe(prompt, negative_prompt="", guidance_scale=args.guidance, height=args.height, width=args.width,
             num_inference_steps=args.steps, generator=torch.Generator(device).manual_seed(0), output_type="pt")

    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        from lit_ovis.parallel.fsdp import apply_compile

        apply_compile(transformer)
    ours(), theirs()  # warm-up (and compilation)
    # Interleave so drift of machine load affects both alike.
    t_ours, t_theirs = [], []
    for _ in range(args.repeats):
        t_ours += timed(ours, 1)
        t_theirs += timed(theirs, 1)
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    print(f"device={device} preset={args.preset} {args.height}x{args.width} steps={args.steps} cfg={args.guidance} dtype={args.dtype}")
    print(f"ours median {mo:.3f}s  pipeline median {mt:.3f}s  ratio ours/pipeline {mo / mt:.3f}")
    if device == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
