"""Run by tests/test_grpo_fsdp.py: two GRPO iterations of the tiny GRPOModule under FSDP2 (2 gloo processes,
the same prompt on both ranks so its group spans them), dumping what each rank saw."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


class Recorder(L.Callback):
    def __init__(self):
        self.rows, self.advantages = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    args = p.parse_args()

    import lit_ovis.modules.grpo as grpo_mod
    from lit_ovis.modules.config import EncoderConfig, OptimizerConfig
    from lit_ovis.losses.window import WindowConfig
    from lit_ovis.modules.grpo import GRPOConfig, GRPOModule, RolloutConfig, UpdateConfig
    from lit_ovis.parallel.fsdp import ParallelConfig
    from lit_ovis.parallel.strategy import AtomicModelParallelStrategy
    from lit_ovis.sampling.generate import SamplingConfig

    L.seed_everything(0)
    module = GRPOModule(
        encoders=EncoderConfig(max_sequence_length=8), optimizer=OptimizerConfig(lr=1e-3),
        sampling=SamplingConfig(steps=4, guidance_scale=1.0, height=32, width=32), parallel=ParallelConfig(),
        grpo=GRPOConfig(rollout=RolloutConfig(group_size=2, steps=4, height=32, width=32, guidance_scale=1.0, batch_size=2),
                        update=UpdateConfig(batch_size=2, clip_range=0.2, kl_beta=0.01), window=WindowConfig(size=2),
                        log_images_every_n_steps=0),
    )
    module.reward_fns = {"brightness": lambda images, prompts, metadata: images.mean(dim=(1, 2, 3))}
    recorder = Recorder()
    seen = recorder.advantages
    original = grpo_mod.global_group_advantages

    def spy(rewards, keys, *a, **kw):  # what each rank's advantages were computed from
        adv = original(rewards, keys, *a, **kw)
        seen.append({"rewards": rewards.detach().cpu(), "adv": adv.detach().cpu()})
        return adv

    grpo_mod.global_group_advantages = spy
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder], default_root_dir=str(Path(args.out).parent),
        strategy=AtomicModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
    )
    state = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            state["policy0"] = {n: p.detach().to_local().clone() for n, p in pl_module.backbone.named_parameters()}
            state["ref0"] = {n: p.detach().to_local().clone() for n, p in pl_module.reference.named_parameters()}

    trainer.callbacks.append(Snapshot())
    items = [{"prompts": "a sign that says OPEN", "target_texts": "OPEN", "languages": "en"}] * 8
    trainer.fit(module, DataLoader(items, batch_size=1))
    opt = trainer.optimizers[0]
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    out = {
        "rows": recorder.rows, "advantages": seen,
        "ref_is_sharded": all(hasattr(p, "device_mesh") for p in module.reference.parameters()),
        "ref_in_optimizer": any(id(p) in optimized for p in module.reference.parameters()),
        "ref_requires_grad": any(p.requires_grad for p in module.reference.parameters()),
        "ref_unchanged": all(torch.equal(p.detach().to_local(), state["ref0"][n]) for n, p in module.reference.named_parameters()),
        "policy_changed": any(not torch.equal(p.detach().to_local(), state["policy0"][n]) for n, p in module.backbone.named_parameters()),
        "optimizer_state_tensors": len(opt.state),
        "trainable": sum(1 for p in module.backbone.parameters() if p.requires_grad),
    }
    torch.save(out, f"{args.out}.rank{trainer.global_rank}")


if __name__ == "__main__":
    main()
