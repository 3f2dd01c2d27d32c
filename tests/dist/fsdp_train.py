"""Run by tests/test_parallel.py: a few deterministic training steps of the tiny FlowMatchingModule under
FSDP2/HSDP (ModelParallelStrategy, gloo on CPU) or a single process, then dump losses and full weights
(with --ema: the full weights after every step and the EMA, full and per-rank local sizes; with
--save-faults: how a save behaves after a stale `.old` and with a write failing on the last rank)."""

from __future__ import annotations

import argparse
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
    def __init__(self, every_state: bool = False):
        self.losses = []
        self.init_state: dict[str, torch.Tensor] = {}
        self.every_state = every_state
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self.init_state = full_state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses.append(float(loss))
        if self.every_state:
            self.states.append(full_state(pl_module))


def full_state(module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if torch.distributed.is_initialized():
        sd = get_model_state_dict(module.backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = module.backbone.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


def ema_summary(module) -> dict:
    """The EMA gathered to full tensors, and how many elements this rank holds locally vs in total."""
    shadows = module.ema.shadow_state_dict()
    local = sum((t.to_local() if hasattr(t, "to_local") else t).numel() for t in shadows.values())
    full = {k: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu() for k, t in shadows.items()}
    return {"full": full, "local_numel": local, "numel": sum(t.numel() for t in full.values())}


def tree_fingerprint(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def save_faults(trainer, path: Path) -> dict:
    """(1) a stale `.old` from a save killed during its deletion must not break the next save; (2) a write
    failing on the last rank must raise CheckpointError on every rank and keep the previous checkpoint."""
    import errno

    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from lit_ovis.errors import CheckpointError

    result: dict = {}
    stale = path.with_name(f".{path.name}.old")
    if trainer.is_global_zero:
        stale.mkdir()
        (stale / "__0_0.distcp").write_bytes(b"partial")
    trainer.strategy.barrier()
    trainer.save_checkpoint(path)
    result["stale_old_save_ok"] = (path / ".metadata").exists() and not stale.exists()
    before = tree_fingerprint(path) if trainer.is_global_zero else None
    original = FileSystemWriter.write_data

    def disk_full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")

    if trainer.global_rank == trainer.world_size - 1:
        FileSystemWriter.write_data = disk_full
    try:
        trainer.save_checkpoint(path)
        message = None
    except CheckpointError as err:
        message = str(err)
    finally:
        FileSystemWriter.write_data = original
    messages = [None] * trainer.world_size
    torch.distributed.all_gather_object(messages, message)
    result["fault_messages"] = messages
    if trainer.is_global_zero:
        result["previous_kept"] = tree_fingerprint(path) == before
        result["leftovers"] = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--mode", default="single", choices=["single", "fsdp", "hsdp"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--save", default=None, help="save a checkpoint here at the end")
    p.add_argument("--resume", default=None)
    p.add_argument("--checkpointing", default="none")
    p.add_argument("--param-dtype", default="fp32")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay (0: no EMA)")
    p.add_argument("--save-faults", action="store_true")
    args = p.parse_args()

    from helpers import tiny_flow_module
    from lit_ovis.modules.config import EMAConfig
    from lit_ovis.parallel.fsdp import ParallelConfig, blocks_of

    L.seed_everything(0)
    parallel = ParallelConfig(hsdp=args.mode == "hsdp", activation_checkpointing=args.checkpointing, param_dtype=args.param_dtype)
    module = tiny_flow_module(parallel=parallel, ema=EMAConfig(enabled=args.ema > 0, decay=args.ema or 0.9999))
    module.backbone, module.ema = None, None  # built again in configure_model (under the strategy)
    per_rank = 4 // args.devices
    loader = DataLoader(FixedNoiseSet(4), batch_size=per_rank, shuffle=False)
    if args.mode == "single":
        strategy = "auto"
    else:
        from lit_ovis.parallel.strategy import AtomicModelParallelStrategy

        strategy = AtomicModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    recorder = LossRecorder(every_state=args.ema > 0)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
        default_root_dir=str(Path(args.out).parent),
    )
    trainer.fit(module, loader, ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)
    out = {"losses": recorder.losses, "state": full_state(module), "init_state": recorder.init_state, "states": recorder.states,
           "param_dtypes": sorted({str(p.dtype) for p in module.backbone.parameters()}),
           "checkpointed_blocks": sum(bool(getattr(b, "_lit_ovis_checkpointed", False)) for b in blocks_of(module.backbone))}
    if args.ema > 0:
        summary = ema_summary(module)
        local_numels = [summary["local_numel"]]
        if trainer.world_size > 1:
            local_numels = [None] * trainer.world_size
            torch.distributed.all_gather_object(local_numels, summary["local_numel"])
        out["ema"] = {**summary, "local_numels": local_numels}
    if args.save and args.save_faults:
        out["save_faults"] = save_faults(trainer, Path(args.save))
    if trainer.global_rank == 0:
        torch.save(out, args.out)


if __name__ == "__main__":
    main()
