"""Test helpers: tiny in-memory latent datasets and module factories."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader, Dataset


class LatentSet(Dataset):
    """`n` fixed latent/embedding pairs, structured (not white noise) so a model can fit them."""

    def __init__(self, n: int = 4, latent_hw: tuple[int, int] = (4, 4), seq_len: int = 8, dim: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        h, w = latent_hw
        base = torch.randn(n, 16, 1, 1, generator=g)
        ramp = torch.linspace(-1, 1, h * w).reshape(1, 1, h, w)
        self.latents = base * ramp + 0.1 * torch.randn(n, 16, h, w, generator=g)
        self.embeds = torch.randn(n, seq_len, dim, generator=g)
        self.captions = [f"sample {i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int):
        return {"latents": self.latents[i], "prompt_embeds": self.embeds[i], "captions": self.captions[i], "ids": i}


def loader(ds: Dataset, batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=0)


def tiny_flow_module(configure: bool = True, **overrides):
    from lit_ovis.modules.config import EncoderConfig, FlowConfig, OptimizerConfig
    from lit_ovis.modules.flow_matching import FlowMatchingModule
    from lit_ovis.sampling.generate import SamplingConfig

    kwargs = dict(
        encoders=EncoderConfig(max_sequence_length=8),
        optimizer=OptimizerConfig(lr=2e-3, warmup_steps=5),
        sampling=SamplingConfig(steps=4, guidance_scale=3.0, height=32, width=32),
        flow_matching=FlowConfig(caption_dropout=0.0, timestep_shift="none"),
    )
    kwargs.update(overrides)
    module = FlowMatchingModule(**kwargs)
    if configure:
        module.configure_model()
    return module


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block on `n` torch threads (tiny models are dominated by thread overhead on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def mounted_tmpfs(path, size: str):
    """A real, small file system at `path` that fills up (full-disk tests); skips where mounting is not allowed."""
    import subprocess

    import pytest

    path.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


# ------------------------------------------------------------------------------------------ running stages
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TRAINER_QUIET = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)


def tiny_trainer(steps: int, **kw):
    """A CPU Trainer for tiny modules: no logger, checkpoints, progress bar or summary unless `kw` says otherwise."""
    import lightning as L

    return L.Trainer(max_steps=steps, **{**TRAINER_QUIET, **kw})


def run_main(*args: str, timeout: int = 300, env: dict | None = None):
    """`python main.py <args>` in the repository root, in a fresh process that imports this checkout."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def tiny_stage_args(stage, *extra: str) -> list[str]:
    """`fit` arguments of a stage config (a shipped one by name, or a path) under the small-scale overlay
    configs/tiny.yaml, then `extra`."""
    config = ROOT / "configs" / f"{stage}.yaml" if isinstance(stage, str) and "/" not in stage else stage
    return ["fit", "--config", str(config), "--config", str(ROOT / "configs" / "tiny.yaml"), *extra]


# ------------------------------------------------------------------------------------------ stage tester mixin
class StageModuleTester:
    """The checks every stage module must pass (as diffusers' ModelTesterMixin runs on every model): a subclass
    named Test<Stage> sets `make_module()` to return a tiny, unconfigured stage module."""

    def make_module(self):
        raise NotImplementedError

    def configured(self):
        import lightning as L

        L.seed_everything(0)
        module = self.make_module()
        module.configure_model()
        return module

    def test_configure_model_runs_once(self):
        module = self.configured()
        backbone = module.backbone
        module.configure_model()  # Lightning may call it again
        assert module.backbone is backbone

    def test_checkpoint_holds_only_the_backbone(self):
        from lit_ovis.checkpoints import BACKBONE_PREFIX, EMA_PREFIX, backbone_state_dict

        module = self.configured()
        state = module.state_dict()
        weights = [k for k in state if not k.startswith("bucket_loss")]  # torchmetrics' running means
        assert weights and all(k.startswith((BACKBONE_PREFIX, EMA_PREFIX)) for k in weights), sorted(weights)[:5]
        read = backbone_state_dict({"state_dict": state})  # what export / eval / the next stage read back
        assert set(read) == set(module.backbone.state_dict())
        assert all(torch.equal(read[k], v) for k, v in module.backbone.state_dict().items())

    def test_frozen_models_never_reach_the_optimizer(self):
        module = self.configured()
        optimizer = module.configure_optimizers()["optimizer"]
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert optimized == {id(p) for p in module.trainable_parameters()} and optimized
        for name, frozen in module._frozen.items():
            params = list(frozen.parameters())
            assert params and not any(p.requires_grad for p in params), name
            assert not optimized & {id(p) for p in params}, name

    def test_sample_gives_reproducible_images_in_unit_range(self):
        module = self.configured()
        images = module.sample(["a sign that says OPEN", "标签"], seed=3, steps=2, height=32, width=32)
        assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
        again = module.sample(["a sign that says OPEN", "标签"], seed=3, steps=2, height=32, width=32)
        other = module.sample(["a sign that says OPEN", "标签"], seed=4, steps=2, height=32, width=32)
        assert torch.equal(images, again) and not torch.equal(images, other)

    def test_config_sections_are_saved_and_read_back(self):
        import dataclasses

        from lit_ovis.checkpoints import config_section

        module = self.configured()
        checkpoint = {"hyper_parameters": dict(module.hparams)}
        for name, value in module.hparams.items():
            assert dataclasses.is_dataclass(value), name  # every init argument is a documented config group
            assert config_section(checkpoint, name, type(value)) == value
            assert config_section({"hyper_parameters": {name: dataclasses.asdict(value)}}, name, type(value)) == value
def demo_config_in(tmp_path, **data_overrides):
    """configs/smoke.yaml with every output path (logs, checkpoints, grids, data) moved under `tmp_path`, the
    rest unchanged, written to `tmp_path/demo.yaml` (the demo config hard-codes runs/smoke)."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    text = (root / "configs" / "smoke.yaml").read_text().replace("runs/smoke", str(tmp_path / "run"))
    config = yaml.safe_load(text)
    config["data"]["init_args"].update({"root": str(tmp_path / "data"), **data_overrides})
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
