"""How many rollouts one GRPO step needs: the policy gradient's signal-to-noise ratio, per reward.

A GRPO update follows g = mean over rollouts i and trained steps k of A_i * grad log p(x_{k+1} | x_k) (the
clipped surrogate's gradient at the rollout policy, where every ratio is 1). Its expectation mu is the
direction that raises the reward; one batch of N rollouts sees mu plus noise of trace-variance v / N. From B
independent batches of rollouts (fresh noise, same prompts and checkpoint) this script estimates both:
- |mu|^2 as the mean dot product of two different batches' gradients (unbiased: their noises are independent);
- v / N as the mean squared norm of one batch's gradient minus that.
It reports the mean cosine between two batches' gradients (1 would be a clean direction, 0 pure noise), with a
jackknife standard error over batches, and the rollouts per optimizer step at which the expected cosine to mu
reaches 0.7 (signal and noise of equal norm: N * (v / N) / |mu|^2). The rewards share the same rollouts: the OCR reading's word-similarity F1 (`metric:
reward`), the recogniser's per-character likelihood of the target (`metric: likelihood`), and brightness
(the easy reward of the unit tests), plus a control whose advantages are shuffled within each group, so it has
the same magnitudes and no signal.

    python benchmarks/bench_grpo_gradient.py runs/ladder_demo/dpo_report/checkpoints/last.ckpt \
        --prompt-file data/ladder_demo/train.jsonl --height 32 --width 128 --max-sequence-length 48 \
        --out benchmarks/results_grpo_gradient.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lit_ovis.loading import load_module
from lit_ovis.losses.grpo import group_advantages
from lit_ovis.models.text_encoder import text_ids
from lit_ovis.models.vae import latent_image_ids, latent_size, unpack_latents
from lit_ovis.sampling.generate import initial_noise, latent_channels_of
from lit_ovis.sampling.ode import sigma_schedule, velocity
from lit_ovis.sampling.sde import sampler_step, sde_sample
from lit_ovis.scoring import build_scorer
from lit_ovis.scoring.prompt_sets import read_prompt_set

REWARDS = ("ocr reward", "ocr likelihood", "brightness", "shuffled (control)")


def unique_prompts(path: str, limit: int) -> list[dict]:
    """The first `limit` distinct prompts of a prompt file (any format `read_prompt_set` reads)."""
    rows, seen = [], set()
    for item in read_prompt_set(path):
        if item["prompt"] not in seen:
            seen.add(item["prompt"])
            rows.append(item)
    return rows[:limit]


def rollouts(module, prompts: list[str], args, seed: int):
    """G CPS rollouts per prompt (the GRPO stage's sampler, CFG and schedule) and their decoded images."""
    s = module.sampling_cfg
    embeds = module.text_encoder.encode(prompts).float().repeat_interleave(args.group_size, 0)
    negative = module.text_encoder.encode([""]).float().expand(embeds.shape[0], -1, -1)
    lh, lw = latent_size(args.height, args.width, module.vae.scale_factor)
    img = latent_image_ids(lh, lw, dtype=embeds.dtype)
    txt = text_ids(embeds.shape[1], dtype=embeds.dtype)
    gen = torch.Generator().manual_seed(seed)
    noise = initial_noise(embeds.shape[0], args.height, args.width, gen, dtype=embeds.dtype,
                          channels=latent_channels_of(module.backbone), scale=module.vae.scale_factor)
    sigmas = sigma_schedule(args.steps, noise.shape[1], s.base_seq_len, s.max_seq_len, s.base_shift, s.max_shift)
    traj = sde_sample(module.backbone, noise, embeds, txt, img, sigmas, "cps", args.noise_level, negative,
                      s.guidance_scale, gen, "mean")
    with torch.no_grad():
        images = (module.vae.decode(unpack_latents(traj.latents[:, -1], lh, lw)).float() / 2 + 0.5).clamp(0, 1)
    return traj, images, dict(embeds=embeds, negative=negative, txt=txt, img=img)


def batch_gradients(module, traj, cond, advantages: dict[str, torch.Tensor], args) -> tuple[dict[str, torch.Tensor], float]:
    """Each reward's surrogate gradient mean_i,k A_i grad log p, flattened; one forward per (mini-batch, step)
    serves every reward. Returns the gradients and the seconds spent."""
    params = [p for p in module.backbone.parameters() if p.requires_grad]
    grads = {name: torch.zeros(sum(p.numel() for p in params)) for name in advantages}
    steps = [k for k in range(traj.std.numel()) if traj.std[k] > 0]
    n = traj.latents.shape[0]
    guidance = module.sampling_cfg.guidance_scale
    names = list(advantages)
    started = time.perf_counter()
    for b in range(0, n, args.update_batch):
        idx = slice(b, b + args.update_batch)
        for k in steps:
            x, x_next = traj.latents[idx, k], traj.latents[idx, k + 1]
            v = velocity(module.backbone, x, traj.sigmas[k], cond["embeds"][idx], cond["txt"], cond["img"],
                         cond["negative"][idx], guidance_scale=guidance)
            log_prob = sampler_step("cps", x, v, traj.sigmas[k], traj.sigmas[k + 1], noise_level=args.noise_level,
                                    prev_sample=x_next, reduce="mean").log_prob
            for j, name in enumerate(names):
                g = torch.autograd.grad((advantages[name][idx] * log_prob).sum() / (n * len(steps)), params,
                                        retain_graph=j < len(names) - 1, allow_unused=True)
                grads[name] += torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(g, params)])
    return grads, time.perf_counter() - started


def snr(batch_grads: list[torch.Tensor], rollouts_per_batch: int) -> dict:
    g = torch.stack([x.double() for x in batch_grads])
    b = g.shape[0]
    dots = g @ g.T
    off = ~torch.eye(b, dtype=torch.bool)
    signal = dots[off].mean().item()  # |mu|^2
    noise = dots.diagonal().mean().item() - signal  # v / N
    norms = dots.diagonal().sqrt()
    both = off & (norms[:, None] > 0) & (norms[None, :] > 0)  # a batch whose groups were all unanimous has no gradient
    cosines = dots / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    cos = cosines[both]
    out = {"cos_mean": cos.mean().item() if cos.numel() else 0.0, "cos_sd": cos.std().item() if cos.numel() > 1 else 0.0,
           "signal": signal, "noise": noise, "cos_se": float("nan")}
    if b >= 3:  # jackknife over batches: pairs that share a batch are not independent
        leave_out = []
        for j in range(b):
            rest = both.clone()
            rest[j, :] = rest[:, j] = False
            if rest.any():
                leave_out.append(cosines[rest].mean())
        if len(leave_out) == b:
            loo = torch.stack(leave_out)
            out["cos_se"] = ((b - 1) / b * ((loo - loo.mean()) ** 2).sum()).sqrt().item()
    out["rollouts_for_cos_0.7"] = rollouts_per_batch * noise / signal if signal > 0 else float("inf")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the policy (e.g. the SDPO checkpoint GRPO starts from)")
    p.add_argument("--prompt-file", required=True, help="prompts with target texts (e.g. the word task's train.jsonl)")
    p.add_argument("--prompts", type=int, default=12, help="distinct prompts per batch")
    p.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (G)")
    p.add_argument("--batches", type=int, default=6, help="independent rollout batches (>= 2)")
    p.add_argument("--steps", type=int, default=10, help="CPS rollout steps")
    p.add_argument("--noise-level", type=float, default=0.7, help="CPS eta")
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--max-sequence-length", type=int, default=48)
    p.add_argument("--update-batch", type=int, default=16, help="rollouts per forward in the gradient pass")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results_grpo_gradient.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    module = load_module(args.checkpoint, max_sequence_length=args.max_sequence_length)
    module.backbone.requires_grad_(True)
    rows = unique_prompts(args.prompt_file, args.prompts)
    prompts = [r["prompt"] for r in rows]
    rollout_prompts = [p for p in prompts for _ in range(args.group_size)]
    metadata = [{"target_text": r["target_text"], "language": r["language"]} for r in rows for _ in range(args.group_size)]
    keys = torch.arange(len(rows)).repeat_interleave(args.group_size)
    ocr = build_scorer("ocr", mode="recognize", metric="likelihood", batch_size=64)
    brightness = build_scorer("brightness", batch_size=len(rows) * args.group_size)
    shuffle = torch.Generator().manual_seed(1)
    per_reward: dict[str, list[torch.Tensor]] = {name: [] for name in REWARDS}
    means: dict[str, list[float]] = {name: [] for name in REWARDS[:3]}
    seconds = {"rollout": 0.0, "gradient": 0.0}
    for batch in range(args.batches):
        started = time.perf_counter()
        traj, images, cond = rollouts(module, prompts, args, seed=10_000 + batch)
        seconds["rollout"] += time.perf_counter() - started
        _, details = ocr.score_with_details(images, rollout_prompts, metadata)
        rewards = {"ocr reward": torch.tensor([d["reward"] for d in details]),
                   "ocr likelihood": torch.tensor([d["likelihood"] for d in details]),
                   "brightness": brightness.score(images, rollout_prompts)}
        adv = {name: group_advantages(r, keys) for name, r in rewards.items()}
        perm = torch.cat([g * args.group_size + torch.randperm(args.group_size, generator=shuffle) for g in range(len(rows))])
        adv["shuffled (control)"] = adv["ocr reward"][perm]
        grads, spent = batch_gradients(module, traj, cond, adv, args)
        seconds["gradient"] += spent
        for name in REWARDS:
            per_reward[name].append(grads[name])
        for name in means:
            means[name].append(rewards[name].mean().item())
        informative = (adv["ocr reward"] != 0).float().mean().item()
        print(f"batch {batch}: rollouts {seconds['rollout']:.0f} s, gradients {seconds['gradient']:.0f} s, "
              f"ocr reward {means['ocr reward'][-1]:.3f}, informative {informative:.2f}", flush=True)

    n = len(rows) * args.group_size
    per_rollout = seconds["gradient"] / (n * args.batches)
    results = {name: snr(per_reward[name], n) for name in REWARDS}
    lines = [
        "# How many rollouts one GRPO step needs (`benchmarks/bench_grpo_gradient.py`)", "",
        f"Policy: `{args.checkpoint}`. {args.batches} independent batches of {len(rows)} prompts x {args.group_size} "
        f"CPS rollouts ({args.steps} steps, eta {args.noise_level}, {args.height}x{args.width}, CFG "
        f"{module.sampling_cfg.guidance_scale}); each batch's surrogate gradient over every stochastic step, per-group "
        f"advantages. Parameters: {sum(p.numel() for p in module.backbone.parameters()):,}. Gradient pass: "
        f"{per_rollout * 1000:.0f} ms per rollout (all steps, forward + backward of every reward, 2 CPU threads).", "",
        "| reward | mean over batches | cosine of two batches' gradients: mean ± standard error (jackknife over batches) | sd over pairs | rollouts per step for cosine 0.7 to the true gradient |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in REWARDS:
        r = results[name]
        mean = f"{sum(means[name]) / len(means[name]):.3f}" if name in means else "–"
        need = "no signal measured" if r["rollouts_for_cos_0.7"] == float("inf") else f"{r['rollouts_for_cos_0.7']:,.0f}"
        lines.append(f"| {name} | {mean} | {r['cos_mean']:+.4f} ± {r['cos_se']:.4f} | {r['cos_sd']:.3f} | {need} |")
    lines += ["", f"Rollouts per batch: {n}. Wall: rollouts {seconds['rollout']:.0f} s, gradients {seconds['gradient']:.0f} s."]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
