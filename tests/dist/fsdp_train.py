"""Run by tests/test_parallel.py: a few deterministic training steps of the tiny FlowMatchingModule under
FSDP2/HSDP (ModelParallelStrategy, gloo on CPU) or a single process, then dump losses and full weights."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


class FixedNoiseSet(Dataset):
    """Latents, embeddings, noise and timesteps all fixed: every run sees identical inputs."""

    def __init__(self, n: int = 4):
        from helpers import LatentSet

        base = LatentSet(n=n)
        g = torch.Generator().manual_seed(99)
        self.items = [
            {**base[i], "noise": torch.randn(16, 4, 4, generator=g), "timesteps": torch.rand((), generator=g) * 0.9 + 0.05}
            for i in range(n)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []
        self.init_state: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.init_state = full_state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses.append(float(loss))


def full_state(module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if torch.distributed.is_initialized():
        sd = get_model_state_dict(module.backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = module.backbone.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--mode", default="single", choices=["single", "fsdp", "hsdp"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--save", default=None, help="save a checkpoint here at the end")
    p.add_argument("--resume", default=None)
    p.add_argument("--checkpointing", default="none")
    args = p.parse_args()

    from helpers import tiny_flow_module
    from lit_ovis.parallel.fsdp import ParallelConfig

    L.seed_everything(0)
    parallel = ParallelConfig(hsdp=args.mode == "hsdp", activation_checkpointing=args.checkpointing)
    module = tiny_flow_module(parallel=parallel)
    module.backbone = None  # built again in configure_model (under the strategy)
    per_rank = 4 // args.devices
    loader = DataLoader(FixedNoiseSet(4), batch_size=per_rank, shuffle=False)
    if args.mode == "single":
        strategy = "auto"
    else:
        from lit_ovis.parallel.strategy import AtomicModelParallelStrategy

        strategy = AtomicModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
        default_root_dir=str(Path(args.out).parent),
    )
    trainer.fit(module, loader, ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)
    state = full_state(module)
    if trainer.global_rank == 0:
        torch.save({"losses": recorder.losses, "state": state, "init_state": recorder.init_state}, args.out)


if __name__ == "__main__":
    main()
