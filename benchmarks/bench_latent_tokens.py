"""What the autoencoder's downsampling factor costs the diffusion model on a CPU: one training step (forward,
backward, AdamW) of a transformer preset on the word task's image sizes, with the latents of an 8x and of a 4x
autoencoder (16 channels, 2x2 packing: 8x gives H*W/256 image tokens, 4x gives H*W/64), beside the text
tokens the config uses. Process CPU time, interleaved rounds, median (robust on a shared machine).

    python benchmarks/bench_latent_tokens.py --preset tiny --text-tokens 216 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lit_ovis.models.backbone import build_backbone
from lit_ovis.models.text_encoder import text_ids
from lit_ovis.models.vae import latent_image_ids, latent_size, pack_latents


def step_cpu_seconds(model, opt, batch: int, text_tokens: int, height: int, width: int, scale: int, dim: int) -> float:
    h, w = latent_size(height, width, scale)
    x = pack_latents(torch.randn(batch, model.config.in_channels // 4, h, w))
    start = time.process_time()
    out = model(hidden_states=x, encoder_hidden_states=torch.randn(batch, text_tokens, dim), timestep=torch.rand(batch),
                img_ids=latent_image_ids(h, w), txt_ids=text_ids(text_tokens), return_dict=False)[0]
    loss = out.pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.process_time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--text-tokens", type=int, default=216)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sizes", default="96x96,144x64,192x48", help="WxH image sizes (the word task's buckets)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_backbone(args.preset)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    dim = model.config.joint_attention_dim
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    times: dict[int, list[float]] = {8: [], 4: []}
    for _ in range(args.rounds):
        for scale in times:
            times[scale].append(sum(step_cpu_seconds(model, opt, args.batch, args.text_tokens, h, w, scale, dim) for w, h in sizes) / len(sizes))
    tokens = {s: sum(latent_size(h, w, s)[0] * latent_size(h, w, s)[1] // 4 for w, h in sizes) / len(sizes) for s in times}
    med = {s: statistics.median(v[1:] if len(v) > 1 else v) for s, v in times.items()}
    print(f"preset {args.preset}, batch {args.batch}, {args.text_tokens} text tokens, sizes {args.sizes}, torch threads {torch.get_num_threads()}")
    for s in times:
        print(f"{s}x: {tokens[s]:.0f} image tokens, {med[s]:.3f} CPU s per step ({med[s] / med[8]:.2f}x the 8x step)")


if __name__ == "__main__":
    main()
