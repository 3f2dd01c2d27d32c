"""Run by tests/test_sharded_init.py: a GRPO module (policy + frozen reference) with pretrained weights under
FSDP2 on 2 gloo processes; dumps each rank's gathered weights and how often it read the weight file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import lit_ovis.models.backbone as backbone_mod
    from lit_ovis.modules.config import BackboneConfig, EncoderConfig
    from lit_ovis.losses.window import WindowConfig
    from lit_ovis.modules.grpo import GRPOConfig, GRPOModule, RolloutConfig, UpdateConfig
    from lit_ovis.parallel.strategy import AtomicModelParallelStrategy
    from lit_ovis.sampling.generate import SamplingConfig

    reads = []
    original = backbone_mod.pretrained_state_dict
    backbone_mod.pretrained_state_dict = lambda *a, **kw: reads.append(1) or original(*a, **kw)
    builds = []
    original_build = backbone_mod.build_backbone
    backbone_mod.build_backbone = lambda *a, **kw: builds.append(1) or original_build(*a, **kw)
    import lit_ovis.modules.base as base_mod
    base_mod.build_backbone = backbone_mod.build_backbone

    module = GRPOModule(
        backbone=BackboneConfig(preset="tiny", pretrained=args.weights), encoders=EncoderConfig(max_sequence_length=8),
        sampling=SamplingConfig(steps=2, guidance_scale=1.0, height=32, width=32),
        grpo=GRPOConfig(rollout=RolloutConfig(group_size=2, steps=2, height=32, width=32, guidance_scale=1.0),
                        update=UpdateConfig(kl_beta=0.01), window=WindowConfig(size=1), log_images_every_n_steps=0),
    )
    result = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            result["policy"] = {k: v.clone() for k, v in get_model_state_dict(pl_module.backbone, options=opts).items()}
            result["reference"] = {k: v.clone() for k, v in get_model_state_dict(pl_module.reference, options=opts).items()}
            result["sharded"] = all(hasattr(p, "device_mesh") for p in pl_module.backbone.parameters())
            trainer.should_stop = True

    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Capture()],
                        strategy=AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        default_root_dir=str(Path(args.out).parent))
    module.reward_fns = {"b": lambda images, prompts, metadata: images.mean(dim=(1, 2, 3))}
    trainer.fit(module, DataLoader([{"prompts": "x", "target_texts": "x", "languages": "en"}] * 4, batch_size=1))
    result.update(reads=len(reads), full_builds=len(builds))
    torch.save(result, f"{args.out}.rank{trainer.global_rank}")


if __name__ == "__main__":
    main()
