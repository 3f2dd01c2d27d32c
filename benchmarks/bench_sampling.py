"""Sampling latency: our sampler vs diffusers' OvisImagePipeline on the same weights, same prompt, same
noise, side by side in one run (interleaved, so load drift hits both alike). Both decode with the same
VAE; ours batches CFG's two branches into one forward.

GPU, as-is: the 7B architecture at 1024x1024, 50 steps, CFG 5, bf16 (the issue's target: faster than
the report's 13.74 s on an H100). Without --weights the weights are random (same ones for both sides,
timing only: the text encoder is Ovis2.5-2B's architecture with a byte-level tokenizer); with
--weights /path/to/Ovis-Image-7B the released ones.
    python benchmarks/bench_sampling.py [--weights /path/to/Ovis-Image-7B] [--compile]
CPU: the tiny preset (defaults 512x512, 50 steps) and the ratio ours / pipeline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

REPORT_H100_SECONDS = 13.74


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def build_models(preset: str, weights: str | None, dtype, device):
    from lit_ovis.models.backbone import build_backbone
    from lit_ovis.models.presets import MODEL_PRESETS, TEXT_ENCODER_PRESETS
    from lit_ovis.models.text_encoder import OvisTextEncoder, build_text_encoder
    from lit_ovis.models.vae import build_vae

    if weights:
        transformer = build_backbone(preset, pretrained=weights, dtype=dtype).to(device).eval()
    else:  # random weights initialised on the device (7B on a CPU takes minutes)
        with torch.device(device):
            transformer = build_backbone(preset, dtype=dtype).eval()
    parts = MODEL_PRESETS[preset]
    if weights:
        encoder, vae = build_text_encoder(weights, dtype=dtype), build_vae(weights, dtype=dtype)
    elif parts["text_encoder"] == "tiny":
        encoder, vae = build_text_encoder("tiny", dtype=dtype), build_vae("tiny", dtype=dtype)
    else:  # random full-size encoder: no tokenizer ships offline, the byte-level one feeds it the same way
        from transformers import Qwen3Config, Qwen3Model

        from lit_ovis.models.tokenizer import build_byte_tokenizer

        torch.manual_seed(0)
        with torch.device(device):
            qwen = Qwen3Model(Qwen3Config(**TEXT_ENCODER_PRESETS[parts["text_encoder"]])).to(dtype)
        encoder, vae = OvisTextEncoder(qwen, build_byte_tokenizer()), build_vae(parts["vae"], dtype=dtype)
    return transformer, encoder.to(device), vae.to(device)


def sampling_runners(transformer, encoder, vae, cfg, prompt: list[str], device: str, attention_backend: str | None = None):
    """(ours, theirs): one CFG sample of `prompt` with our sampler and with OvisImagePipeline on the same
    modules, weights, noise seed and settings (`cfg`, a SamplingConfig)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from lit_ovis.cli.export import build_pipeline
    from lit_ovis.sampling.generate import SamplingConfig, generate_images

    pipe = build_pipeline(transformer, encoder, vae, SamplingConfig())
    pipe.set_progress_bar_config(disable=True)
    default_backend = _AttentionBackendRegistry._active_backend

    def ours():
        if attention_backend:  # our side only: the pipeline keeps the default dispatch
            transformer.set_attention_backend(attention_backend)
        try:
            generate_images(transformer, encoder, vae, prompt, cfg, seed=0)
        finally:
            if attention_backend:
                transformer.reset_attention_backend()
                _AttentionBackendRegistry._active_backend = default_backend

    def theirs():
        pipe(prompt, negative_prompt="", guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width,
             num_inference_steps=cfg.steps, generator=torch.Generator(device).manual_seed(0), output_type="pt")

    return ours, theirs


def time_side_by_side(ours, theirs, repeats: int, warmup=None) -> tuple[list[float], list[float]]:
    """Warm-up (and compilation) of both, then `repeats` interleaved timed runs of each. `warmup`: a cheaper
    (ours, theirs) pair on the same modules and shapes (e.g. 2 steps instead of 50) to warm up with."""
    warm_ours, warm_theirs = warmup or (ours, theirs)
    warm_ours(), warm_theirs()
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours.append(timed(ours))
        t_theirs.append(timed(theirs))
    return t_ours, t_theirs


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ovis-image-7b" if cuda else "tiny")
    p.add_argument("--weights", default=None, help="diffusers folder with transformer/, text_encoder/, tokenizer/, vae/")
    p.add_argument("--height", type=int, default=1024 if cuda else 512)
    p.add_argument("--width", type=int, default=1024 if cuda else 512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="regional compilation of the shared transformer's blocks (both sides)")
    p.add_argument("--attention-backend", default=None, help="diffusers backend for our side, e.g. _native_flash, _native_cudnn")
    args = p.parse_args()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    from lit_ovis.sampling.generate import SamplingConfig

    transformer, encoder, vae = build_models(args.preset, args.weights, dtype, device)
    cfg = SamplingConfig(steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width)
    prompt = ['A poster with the text "LIT OVIS" in bold letters']
    ours, theirs = sampling_runners(transformer, encoder, vae, cfg, prompt, device, args.attention_backend)
    if args.compile:
        from lit_ovis.parallel.fsdp import apply_compile

        # the pipeline calls the same module, so both sides run the compiled blocks (a second 7B copy would
        # not fit beside the first); the ratio then compares the samplers (our batched CFG forward)
        apply_compile(transformer)
    t_ours, t_theirs = time_side_by_side(ours, theirs, args.repeats)
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    source = args.weights or "random weights"
    print(f"device={name} preset={args.preset} ({source}) {args.height}x{args.width} steps={args.steps} cfg={args.guidance} "
          f"dtype={args.dtype} compile={args.compile} attention={args.attention_backend or 'default'} repeats={args.repeats}")
    print(f"ours median {mo:.3f}s  pipeline median {mt:.3f}s  ratio ours/pipeline {mo / mt:.3f}")
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        if args.preset == "ovis-image-7b" and (args.height, args.width, args.steps) == (1024, 1024, 50):
            verdict = "faster" if mo < REPORT_H100_SECONDS else "slower"
            print(f"ours {mo:.2f}s is {verdict} than the report's {REPORT_H100_SECONDS}s (H100)")


if __name__ == "__main__":
    main()
