"""Reward curve of Flow-GRPO on the tiny model with a computable reward (mean image brightness), for
benchmarks/results_grpo.md. CPU-sized by default (~2.5 min for 500 iterations with one thread):

    OMP_NUM_THREADS=1 python benchmarks/bench_grpo_curve.py --sampler cps --steps 500 --window adaptive
    python benchmarks/bench_grpo_curve.py --sampler sde --steps 200
    python benchmarks/bench_grpo_curve.py --sampler cps --steps 200 --window fixed
    python benchmarks/bench_grpo_curve.py --sampler cps --steps 200 --window sliding --shift-every 50

Each iteration: 2 prompts x G = 8 rollouts, 6 rollout steps, CFG off, a 3-step window, one optimizer step
(so the update is exactly on-policy). "ODE reward" is the brightness of 16 images from the deterministic
pipeline sampler (`module.sample`, fixed seeds) before and after training: whether the gain carries over
from stochastic rollouts to ordinary sampling. Writes the per-iteration rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lit_ovis.modules.config import EncoderConfig, OptimizerConfig  # noqa: E402
from lit_ovis.losses.window import WindowConfig  # noqa: E402
from lit_ovis.modules.grpo import GRPOConfig, GRPOModule, RolloutConfig, UpdateConfig  # noqa: E402
from lit_ovis.sampling.generate import SamplingConfig  # noqa: E402

KEEP = ("reward/mean", "reward/std", "train/kl", "train/clip_frac", "train/ratio_max", "window/start", "window/end")


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


class Rows(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows.append({k: float(m[k]) for k in KEEP if k in m})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sampler", default="cps", choices=["cps", "sde"])
    p.add_argument("--steps", type=int, default=500, help="GRPO iterations (= optimizer steps here)")
    p.add_argument("--window", default="adaptive", choices=["adaptive", "sliding", "fixed", "all"])
    p.add_argument("--shift-every", type=int, default=50, help="window=sliding: iterations per one-step shift")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default=None, help="JSON output (default /tmp/grpo_curve_<sampler>_<window>_<steps>.json)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    L.seed_everything(0)
    module = GRPOModule(
        encoders=EncoderConfig(max_sequence_length=8), optimizer=OptimizerConfig(lr=args.lr),
        sampling=SamplingConfig(steps=6, guidance_scale=1.0, height=32, width=32),
        grpo=GRPOConfig(rollout=RolloutConfig(group_size=8, steps=6, sampler=args.sampler, noise_level=0.7, batch_size=16),
                        update=UpdateConfig(batch_size=16, clip_range=0.2, kl_beta=0.01,
                                            kl_scale="exact"),  # the form the recorded curves were measured with
                        window=WindowConfig(mode=args.window, size=3, start=0, shift_every=args.shift_every),
                        log_images_every_n_steps=0),
    )
    module.configure_model()
    module.reward_fns = {"brightness": brightness}
    prompts = [f"sign {i}" for i in range(2)] * 8

    def ode_reward() -> float:
        return float(brightness(module.sample(prompts, seed=1234, steps=6), None, None).mean())

    before = ode_reward()
    rows = Rows()
    items = [{"prompts": f"sign {i}", "target_texts": f"T{i}", "languages": "en"} for i in range(2)] * args.steps
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rows])
    start = time.perf_counter()
    trainer.fit(module, DataLoader(items, batch_size=2))
    wall = time.perf_counter() - start
    after = ode_reward()
    rewards = [r["reward/mean"] for r in rows.rows]
    summary = dict(sampler=args.sampler, window=args.window, steps=args.steps, wall_s=round(wall, 1),
                   rollout_reward_first10=sum(rewards[:10]) / 10, rollout_reward_last10=sum(rewards[-10:]) / 10,
                   initial_group_std=rows.rows[0]["reward/std"], ode_reward_before=before, ode_reward_after=after,
                   step_scores=[round(float(x), 4) for x in module.step_scores] if module.step_scores is not None else None)
    out = Path(args.out or f"/tmp/grpo_curve_{args.sampler}_{args.window}_{args.steps}.json")
    out.write_text(json.dumps({**summary, "rows": rows.rows}))
    print(json.dumps(summary, indent=1))
    per25 = [sum(rewards[i:i + 25]) / len(rewards[i:i + 25]) for i in range(0, len(rewards), 25)]
    print("mean rollout reward per 25 iterations:", ", ".join(f"{r:.4f}" for r in per25))


if __name__ == "__main__":
    main()
