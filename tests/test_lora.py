"""LoRA for every stage (flow matching, SDPO, GRPO; GRPO's reference also in test_grpo_module.py): only the adapter
trains and the loss falls (GRPO: the reward rises), the SDPO/GRPO reference is the adapter-off base, checkpoints
hold the adapter only and resume step-exact, and the exported adapter (diffusers' save_lora_adapter format) and
merged folder sample like our `sample()`."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import LatentSet, loader, tiny_flow_module, tiny_trainer
from lit_ovis.modules.config import LoRAConfig, OptimizerConfig

LORA = dict(enabled=True, rank=4, alpha=8.0)


def base_and_adapter(backbone) -> tuple[dict, dict]:
    named = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    return ({n: v for n, v in named.items() if "lora_" not in n}, {n: v for n, v in named.items() if "lora_" in n})


def tiny_lora_sdpo(**lora):
    from lit_ovis.losses.dpo import SafeguardConfig
    from lit_ovis.modules.config import EncoderConfig
    from lit_ovis.modules.sdpo import SDPOConfig, SDPOModule
    from lit_ovis.sampling.generate import SamplingConfig

    module = SDPOModule(encoders=EncoderConfig(max_sequence_length=8), optimizer=OptimizerConfig(lr=1e-2, grad_clip=1.0),
                        sampling=SamplingConfig(steps=4, guidance_scale=3.0, height=32, width=32),
                        sdpo=SDPOConfig(beta=200.0, timestep_shift="none", timestep_sampling="uniform", safeguard=SafeguardConfig()),
                        lora=LoRAConfig(**{**LORA, **lora}))
    module.configure_model()
    return module


def test_flow_matching_lora_trains_only_the_adapter_and_its_loss_falls(tmp_path, one_thread):
    L.seed_everything(0)
    module = tiny_flow_module(optimizer=OptimizerConfig(lr=2e-2), lora=LoRAConfig(**LORA, targets="attention_mlp"))
    assert next(p for n, p in module.backbone.named_parameters() if "lora_" not in n).dtype == torch.bfloat16  # lean base
    assert all(p.dtype == torch.float32 for n, p in module.backbone.named_parameters() if "lora_" in n)
    base, adapter = base_and_adapter(module.backbone)
    assert set(module.trainable_parameters()) == {p for n, p in module.backbone.named_parameters() if "lora_" in n}
    batch = next(iter(loader(LatentSet(n=4))))
    batch["timesteps"], batch["noise"] = torch.rand(4, generator=torch.Generator().manual_seed(1)), torch.randn_like(batch["latents"])

    def fixed_loss():
        with torch.no_grad():
            return module.flow_loss(batch)[0].item()

    before = fixed_loss()
    tiny_trainer(30, default_root_dir=tmp_path).fit(module, loader(LatentSet(n=4)))
    after = fixed_loss()
    assert after < 0.9 * before, (before, after)
    base_after, adapter_after = base_and_adapter(module.backbone)
    assert all(torch.equal(v, base_after[n]) for n, v in base.items())  # the frozen base never moves
    assert all(not torch.equal(v, adapter_after[n]) for n, v in adapter.items() if ".lora_B." in n)
    optimizer = module.trainer.optimizers[0]
    assert {id(p) for p in optimizer.state} == {id(p) for p in module.trainable_parameters()}  # no state for the base


def test_sdpo_lora_reference_is_the_adapter_off_base_and_the_dpo_loss_falls(tmp_path, one_thread):
    from test_sdpo_module import PairSet

    L.seed_everything(0)
    module = tiny_lora_sdpo()
    assert module.reference is None and "reference" not in module._frozen  # no second copy of the model
    batch = next(iter(DataLoader(PairSet(), batch_size=8)))

    def stats():
        with torch.no_grad():
            return {k: float(v) for k, v in module.pair_loss(batch, generator=torch.Generator().manual_seed(0))[1].items()}

    first = stats()
    assert first["policy_loss_w"] == first["ref_loss_w"]  # B = 0 at start: the adapter-on policy equals the base
    base, _ = base_and_adapter(module.backbone)
    tiny_trainer(10, default_root_dir=tmp_path).fit(module, DataLoader(PairSet(), batch_size=4))
    last = stats()
    assert last["ref_loss_w"] == pytest.approx(first["ref_loss_w"], rel=1e-6)  # the reference still is the base
    assert last["reward_margin"] > first["reward_margin"] + 1e-3 and last["implicit_acc"] >= 0.75, (first, last)
    base_after, _ = base_and_adapter(module.backbone)
    assert all(torch.equal(v, base_after[n]) for n, v in base.items())


@pytest.mark.slow
def test_grpo_lora_raises_brightness_reward(one_thread):
    """A GRPO LoRA run raises the mean rollout reward (image brightness) by many times its initial spread, and the
    deterministic ODE samples of held-out seeds get brighter too, while only the adapter changes.
    Measured (seed 0 / seed 1, 40 steps): rollout reward +12.4x / +9.6x the initial spread, held-out +0.032 / +0.043.
    Settings: LoRA needs ~10x the full fine-tune's lr (3e-3 there); the "all_linear" preset reaches the output
    projection, which brightness depends on most directly ("attention" reached ~5x in 40 steps at lr 3e-2, too
    close to the bar); an fp32 base because bf16 matmuls on CPU are ~3.5x slower (the bf16 path is exercised by
    test_grpo_module.py::test_lora_trains_only_the_adapter_and_uses_base_as_reference)."""
    from test_grpo_module import brightness, fit, prompt_loader

    from lit_ovis.losses.window import WindowConfig
    from lit_ovis.modules.config import EncoderConfig
    from lit_ovis.modules.grpo import GRPOConfig, GRPOModule, RolloutConfig, UpdateConfig
    from lit_ovis.sampling.generate import SamplingConfig

    L.seed_everything(0)
    grpo = GRPOConfig(rollout=RolloutConfig(group_size=8, steps=4, height=32, width=32, guidance_scale=1.0, batch_size=16),
                      update=UpdateConfig(batch_size=16, clip_range=0.2, kl_beta=0.01), window=WindowConfig(size=2),
                      log_images_every_n_steps=0)
    module = GRPOModule(encoders=EncoderConfig(max_sequence_length=8), optimizer=OptimizerConfig(lr=1e-2, grad_clip=1.0),
                        sampling=SamplingConfig(steps=4, guidance_scale=1.0, height=32, width=32), grpo=grpo,
                        lora=LoRAConfig(**LORA, targets="all_linear", base_dtype="fp32"))
    module.configure_model()
    module.reward_fns = {"brightness": brightness}
    base, adapter = base_and_adapter(module.backbone)
    held_out = dict(prompts=["sign 0", "sign 1"] * 4, seed=list(range(100, 108)))  # seeds no rollout uses

    def held_out_brightness():
        with torch.no_grad():
            return module.sample(held_out["prompts"], seed=held_out["seed"]).mean().item()

    before = held_out_brightness()
    rows = fit(module, 40, prompt_loader())
    after = held_out_brightness()
    rewards = [r["reward/mean"] for r in rows]
    spread = rows[0]["reward/std"]  # the first iteration's spread of rewards (16 images, 2 prompts)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last - first > 5 * spread, (first, last, spread, rewards)  # the full fine-tune test's bar
    assert after - before > 5 * spread, (before, after, spread)
    assert rows[-1]["train/kl"] > 0  # the policy left its reference, the adapter-off base
    base_after, adapter_after = base_and_adapter(module.backbone)
    assert all(torch.equal(v, base_after[n]) for n, v in base.items())  # the frozen base never moves
    assert all(not torch.equal(v, adapter_after[n]) for n, v in adapter.items() if ".lora_B." in n)
    optimizer = module.trainer.optimizers[0]
    assert {id(p) for p in optimizer.state} == {id(p) for p in module.trainable_parameters()}


def test_lora_settings_refuse_with_one_line():
    from lit_ovis.errors import ConfigError

    for bad, option in [(dict(rank=0), "rank"), (dict(targets="mlp_only"), "targets"), (dict(quantize_base="int4"), "quantize_base"),
                        (dict(base_dtype="fp8"), "base_dtype")]:
        with pytest.raises(ConfigError, match=f"--model.lora.{option}"):
            tiny_flow_module(configure=False, lora=LoRAConfig(**{**LORA, **bad}))
    with pytest.raises(ConfigError, match="target_modules"):
        tiny_flow_module(lora=LoRAConfig(**LORA, target_modules=["no_such_layer"]))


def test_target_presets_choose_the_layers():
    from lit_ovis.models.backbone import build_backbone
    from lit_ovis.models.lora import target_module_names

    backbone = build_backbone("tiny")
    attention = target_module_names(backbone, "attention")
    with_mlp = target_module_names(backbone, "attention_mlp")
    every = target_module_names(backbone, "all_linear")
    assert set(attention) < set(with_mlp) < set(every)
    assert all(n.split(".")[-1] in ("to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out") for n in attention)
    assert "transformer_blocks.0.ff.net.2" in with_mlp and "x_embedder" in every and "x_embedder" not in with_mlp
    assert target_module_names(backbone, explicit=["to_q"]) == [n for n in attention if n.endswith(".to_q")]


class _Losses(L.Callback):
    def __init__(self, crash_at: int | None = None):
        self.losses, self.crash_at = {}, crash_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        if trainer.global_step == self.crash_at:
            raise RuntimeError("killed")


def _lora_run(root, steps: int, callback: _Losses, ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.rng_state import RNGState
    from lit_ovis.modules.config import EMAConfig

    L.seed_everything(0)
    module = tiny_flow_module(optimizer=OptimizerConfig(lr=1e-2, warmup_steps=3), ema=EMAConfig(enabled=True, decay=0.5),
                              lora=LoRAConfig(**LORA, base_dtype="fp32"))
    saver = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=2, save_last=True, save_top_k=-1)
    trainer = tiny_trainer(steps, default_root_dir=root, callbacks=[callback, saver, RNGState()], enable_checkpointing=True)
    # every batch holds the same samples: a plain DataLoader restarts its epoch on resume (the shipped data modules
    # are stateful and continue it), so only the weights, optimizer, schedule and step can make the losses match
    trainer.fit(module, loader(torch.utils.data.ConcatDataset([LatentSet(n=4)] * 8), batch_size=4), ckpt_path=ckpt_path)
    return module


def test_lora_checkpoint_holds_the_adapter_only_and_a_killed_run_resumes_step_exact(tmp_path, one_thread):
    from lit_ovis.checkpoints import LORA_ENTRY, adapter_state_dict

    whole = _Losses()
    _lora_run(tmp_path / "whole", 6, whole)
    crashed = _Losses(crash_at=5)
    with pytest.raises(RuntimeError, match="killed"):
        _lora_run(tmp_path / "killed", 6, crashed)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    # the adapter (and its EMA) only, the base it applies to, and optimizer state for the adapter only
    assert ckpt[LORA_ENTRY]["preset"] == "tiny" and ckpt[LORA_ENTRY]["adapter_config"]["r"] == 4
    keys = [k for k in ckpt["state_dict"] if not k.startswith("bucket_loss")]
    backbone = [k for k in keys if k.startswith("backbone.")]
    assert backbone and all(".lora_A." in k or ".lora_B." in k for k in backbone)
    assert all(k.startswith("ema.") and "__lora_" in k for k in keys if k not in backbone)
    assert len(ckpt["optimizer_states"][0]["state"]) == len(adapter_state_dict(ckpt)) == len(backbone)
    resumed = _Losses()
    _lora_run(tmp_path / "killed", 6, resumed, ckpt_path=str(last))
    assert sorted(resumed.losses) == [5, 6]  # continued after the checkpoint's step
    for step in (5, 6):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-6, abs=1e-7), (step, resumed.losses, whole.losses)
    assert crashed.losses[5] == pytest.approx(whole.losses[5], rel=1e-6)


def test_resuming_a_lora_checkpoint_without_lora_names_the_fix(tmp_path, one_thread):
    from lit_ovis.errors import CheckpointError

    module = tiny_flow_module(lora=LoRAConfig(**LORA, base_dtype="fp32"))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="--model.lora.enabled true"):
        tiny_flow_module().on_load_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    """A base diffusers folder (the stand-in for released weights), a LoRA run trained from it, its checkpoint."""
    from lit_ovis.cli.export import build_pipeline
    from lit_ovis.models.backbone import build_backbone
    from lit_ovis.models.text_encoder import build_text_encoder
    from lit_ovis.models.vae import build_vae
    from lit_ovis.modules.config import BackboneConfig
    from lit_ovis.sampling.generate import SamplingConfig

    root = tmp_path_factory.mktemp("lora_export")
    base = root / "base"
    build_pipeline(build_backbone("tiny"), build_text_encoder("tiny", 8), build_vae("tiny"), SamplingConfig()).save_pretrained(base)
    L.seed_everything(0)
    module = tiny_flow_module(backbone=BackboneConfig(pretrained=str(base)), optimizer=OptimizerConfig(lr=2e-2),
                              lora=LoRAConfig(**LORA, base_dtype="fp32", targets="attention_mlp"))
    trainer = tiny_trainer(3, default_root_dir=root)
    trainer.fit(module, loader(LatentSet(n=4)))
    trainer.save_checkpoint(root / "lora.ckpt")
    return module, root / "lora.ckpt", base


PIPE_KW = dict(height=32, width=32, num_inference_steps=4, guidance_scale=3.0, output_type="pt", max_sequence_length=8)


def test_exported_adapter_and_merged_folder_sample_like_our_sampler(lora_checkpoint, tmp_path, one_thread):
    from diffusers import OvisImagePipeline

    from lit_ovis.cli.export import main as export_main

    module, ckpt, base = lora_checkpoint
    ours = module.sample(["a sign that says OPEN"], seed=7)
    assert export_main([str(ckpt), str(tmp_path / "adapter"), "--lora", "adapter"]) == 0
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["pytorch_lora_weights.safetensors"]  # megabytes, no base
    pipe = OvisImagePipeline.from_pretrained(base)
    without = pipe(["a sign that says OPEN"], generator=torch.Generator().manual_seed(7), **PIPE_KW).images
    assert (ours - without).abs().max().item() > 1e-3  # the adapter changed the images ...
    pipe.transformer.load_lora_adapter(str(tmp_path / "adapter"), prefix=None, use_safetensors=True)
    adapted = pipe(["a sign that says OPEN"], generator=torch.Generator().manual_seed(7), **PIPE_KW).images
    assert (ours - adapted).abs().max().item() < 1e-4  # ... and the loaded adapter reproduces them
    assert export_main([str(ckpt), str(tmp_path / "merged")]) == 0  # default: merged into the recorded base
    merged = OvisImagePipeline.from_pretrained(tmp_path / "merged")
    images = merged(["a sign that says OPEN"], generator=torch.Generator().manual_seed(7), **PIPE_KW).images
    assert (ours - images).abs().max().item() < 1e-4


def test_lora_scale_scales_the_update(lora_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from lit_ovis.checkpoints import adapter_state_dict, backbone_state_dict, load_training_checkpoint
    from lit_ovis.cli.export import export_checkpoint
    from lit_ovis.models.backbone import pretrained_state_dict

    _, ckpt, base = lora_checkpoint
    checkpoint = load_training_checkpoint(ckpt)
    base_weights = pretrained_state_dict("tiny", str(base))
    full, half = backbone_state_dict(checkpoint, lora_scale=1.0), backbone_state_dict(checkpoint, lora_scale=0.5)
    key = "transformer_blocks.0.attn.to_q.weight"
    torch.testing.assert_close(half[key] - base_weights[key], 0.5 * (full[key] - base_weights[key]))
    assert not torch.equal(full[key], base_weights[key])
    export_checkpoint(str(ckpt), str(tmp_path / "half"), lora="adapter", lora_scale=0.5)
    written = load_file(tmp_path / "half" / "pytorch_lora_weights.safetensors")
    adapter = adapter_state_dict(checkpoint)
    assert set(written) == set(adapter)
    assert torch.equal(written[f"{key[:-7]}.lora_B.weight"], 0.5 * adapter[f"{key[:-7]}.lora_B.weight"])


def test_int8_quantised_base_trains_the_adapter_on_cpu(tmp_path, one_thread):
    from lit_ovis.errors import ConfigError

    L.seed_everything(0)
    module = tiny_flow_module(optimizer=OptimizerConfig(lr=2e-2), lora=LoRAConfig(**LORA, quantize_base="int8"))
    quantised = [n for n, m in module.backbone.named_modules() if type(getattr(m, "weight", None)).__name__ == "Int8Tensor"]
    assert len(quantised) > 20 and not any("lora_" in n for n in quantised)
    batch = next(iter(loader(LatentSet(n=4))))
    batch["timesteps"], batch["noise"] = torch.full((4,), 0.5), torch.randn_like(batch["latents"])
    with torch.no_grad():
        before = module.flow_loss(batch)[0].item()
    tiny_trainer(8, default_root_dir=tmp_path).fit(module, loader(LatentSet(n=4)))
    with torch.no_grad():
        after = module.flow_loss(batch)[0].item()
    assert after < before and all(p.grad is None or torch.isfinite(p.grad).all() for p in module.trainable_parameters())
    with pytest.raises(ConfigError, match="float8 needs a GPU"):
        tiny_flow_module(lora=LoRAConfig(**LORA, quantize_base="float8"))


# ---------------------------------------------------------------------------------------------- FSDP2
def _fsdp_lora_worker(rank: int, world: int, port: int, root: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    from test_sdpo_module import PairSet

    L.seed_everything(0)
    module = SDPOLoRA()
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, process_group_backend="gloo")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=world, strategy=strategy, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    snapshot: dict[str, torch.Tensor] = {}

    class Snap(L.Callback):
        def on_train_start(self, trainer, pl_module):
            snapshot.update({n: p.full_tensor().clone() for n, p in pl_module.backbone.named_parameters()})

    trainer.callbacks.append(Snap())
    trainer.fit(module, DataLoader(PairSet(n=8, seed=rank), batch_size=2))
    trainer.save_checkpoint(f"{root}/sharded")
    backbone, opt = module.backbone, trainer.optimizers[0]
    adapter = {n for n, p in backbone.named_parameters() if p.requires_grad}
    full = {n: p.full_tensor() for n, p in backbone.named_parameters()}
    result = {
        "sharded": all(isinstance(p, DTensor) for p in backbone.parameters()),
        "no_reference_copy": module.reference is None,
        "adapter_only_trainable": bool(adapter) and all(".lora_" in n for n in adapter),
        "base_unchanged": all(torch.equal(full[n], snapshot[n]) for n in full if n not in adapter),
        "adapter_moved": any(not torch.equal(full[n], snapshot[n]) for n in adapter if ".lora_B." in n),
        "optimizer_state_is_adapter": len(opt.state) == len(adapter),
        "bf16_base": all(p.dtype == torch.bfloat16 for n, p in backbone.named_parameters() if n not in adapter),
    }
    torch.save(result, f"{root}/rank{rank}.pt")


class SDPOLoRA:
    """Picklable factory for the spawned workers (a tiny SDPO LoRA module, not configured)."""

    def __new__(cls):
        from lit_ovis.losses.dpo import SafeguardConfig
        from lit_ovis.modules.config import EncoderConfig
        from lit_ovis.modules.sdpo import SDPOConfig, SDPOModule

        return SDPOModule(encoders=EncoderConfig(max_sequence_length=8), optimizer=OptimizerConfig(lr=1e-2),
                          sdpo=SDPOConfig(beta=200.0, timestep_shift="none", timestep_sampling="uniform", safeguard=SafeguardConfig()),
                          lora=LoRAConfig(**LORA))


@pytest.mark.distributed
def test_fsdp2_lora_shards_the_bf16_base_trains_the_adapter_and_saves_it_alone(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from lit_ovis.checkpoints import LORA_ENTRY, adapter_state_dict, load_training_checkpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_fsdp_lora_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert all(result.values()), (rank, result)
    checkpoint = load_training_checkpoint(tmp_path / "sharded")
    assert checkpoint[LORA_ENTRY]["adapter_config"]["r"] == 4
    assert all(".lora_" in k for k in checkpoint["state_dict"]) and len(adapter_state_dict(checkpoint)) > 20
