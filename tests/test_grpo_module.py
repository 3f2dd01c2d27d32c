"""GRPOModule: on-policy consistency, LoRA reference, the config under the tiny overlay, and learning a reward."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from helpers import StageModuleTester, run_main, tiny_stage_args, tiny_trainer
from lit_ovis.errors import ConfigError
from lit_ovis.losses.window import WindowConfig
from lit_ovis.modules.config import EncoderConfig, LoRAConfig, OptimizerConfig
from lit_ovis.modules.grpo import GRPOConfig, GRPOModule, RolloutConfig, UpdateConfig
from lit_ovis.render import reward_grid
from lit_ovis.sampling.generate import SamplingConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grpo.yaml"


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


def prompt_loader(n_prompts=2, batch_size=2, repeats=500):
    items = [{"prompts": f"sign {i}", "target_texts": f"T{i}", "languages": "en"} for i in range(n_prompts)]
    return DataLoader(items * repeats, batch_size=batch_size)


def tiny_grpo(lr=1e-3, lora=False, rollout=None, update=None, window=None, **grpo):
    """A tiny GRPO module; `rollout`, `update` and `window` override those groups' tiny settings."""
    cfg = GRPOConfig(
        rollout=RolloutConfig(**{**dict(group_size=4, steps=4, height=32, width=32, guidance_scale=1.0, batch_size=8), **(rollout or {})}),
        update=UpdateConfig(**{**dict(batch_size=8, clip_range=0.2, kl_beta=0.01), **(update or {})}),
        window=WindowConfig(**{**dict(size=2), **(window or {})}),
        **{"log_images_every_n_steps": 0, **grpo})
    m = GRPOModule(encoders=EncoderConfig(max_sequence_length=8), optimizer=OptimizerConfig(lr=lr),
                   sampling=SamplingConfig(steps=4, guidance_scale=1.0, height=32, width=32),
                   grpo=cfg, lora=LoRAConfig(enabled=lora, rank=4, alpha=8))
    m.configure_model()
    m.reward_fns = {"brightness": brightness}
    return m


class Recorder(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(module, steps, loader=None, **trainer_kw):
    rec = Recorder()
    tiny_trainer(steps, callbacks=[rec], **trainer_kw).fit(module, loader or prompt_loader())
    return rec.rows


def test_first_update_is_on_policy_and_reference_stays_frozen():
    L.seed_everything(0)
    m = tiny_grpo(window=dict(mode="all"))
    ref_before = {k: v.clone() for k, v in m.reference.state_dict().items()}
    rows = fit(m, 2)
    # log-probs recomputed in the update equal the rollout's: the ratio is exactly 1 before the optimizer step
    for row in rows:
        assert abs(row["train/ratio_min"] - 1) < 1e-5 and abs(row["train/ratio_max"] - 1) < 1e-5
        assert row["train/clip_frac"] == 0.0
        assert row["window/start"] == 0 and row["window/end"] == 3  # CPS: the step to t = 0 is deterministic
    assert rows[0]["train/kl"] == pytest.approx(0.0, abs=1e-10)  # policy == reference at the first step
    assert rows[1]["train/kl"] > 0
    for k, v in m.reference.state_dict().items():
        assert torch.equal(v, ref_before[k])
    assert not any(k.startswith("reference") for k in m.state_dict())  # the reference is not checkpointed


def test_lora_trains_only_the_adapter_and_uses_base_as_reference():
    L.seed_everything(0)
    m = tiny_grpo(lora=True, lr=1e-2)
    assert m.reference is None
    trainable = [n for n, p in m.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    base = {n: p.clone() for n, p in m.backbone.named_parameters() if "lora" not in n}
    rows = fit(m, 3)
    assert all(torch.equal(p, base[n]) for n, p in m.backbone.named_parameters() if "lora" not in n)
    assert rows[-1]["train/kl"] > 0  # policy (adapter on) has left the reference (adapter off)
    # reference velocity is the base model's: disabling the adapter gives the untouched weights' output
    x = torch.randn(2, 4, 64)
    from lit_ovis.models.text_encoder import text_ids
    from lit_ovis.models.vae import latent_image_ids
    emb = torch.randn(2, 8, m.backbone.config.joint_attention_dim)
    txt, img = text_ids(8), latent_image_ids(4, 4)
    with torch.no_grad():
        v_ref = m.reference_velocity(x, torch.tensor(0.5), emb, txt, img, None)
        v_pol = m.predict_velocity(m.backbone, x, torch.full((2,), 0.5), dict(encoder_hidden_states=emb, txt_ids=txt, img_ids=img))
        m.backbone.delete_adapters("default")
        v_base = m.predict_velocity(m.backbone, x, torch.full((2,), 0.5), dict(encoder_hidden_states=emb, txt_ids=txt, img_ids=img))
    torch.testing.assert_close(v_ref, v_base)
    assert not torch.allclose(v_pol, v_base)


def test_logp_change_window_scores_only_trained_steps():
    L.seed_everything(0)
    m = tiny_grpo(window=dict(signal="logp_change", explore=0.0), update=dict(inner_epochs=2, batch_size=4))
    fit(m, 4)  # 1 iteration = 2 epochs x 2 mini-batches = 4 optimizer steps
    rows_window = m.step_scores
    trained = rows_window > 0
    assert trained.sum() == 2 and rows_window[3] == 0  # the 2-step window was scored; the deterministic step never
    start = int(torch.nonzero(trained).flatten()[0])
    assert bool(trained[start + 1])


def test_update_samples_trains_on_informative_rollouts_only():
    """update.samples < rollouts: a group whose images all score the same (advantage 0) is skipped, the update
    trains on the other group's rollouts, and each iteration still takes the configured optimizer steps."""
    L.seed_everything(0)

    def half_unanimous(images, prompts, metadata):  # "sign 0" always scores 0.5; "sign 1" its brightness
        return torch.where(torch.tensor([p == "sign 0" for p in prompts]), 0.5, images.mean(dim=(1, 2, 3)))

    m = tiny_grpo(update=dict(samples=4, batch_size=2))  # 2 prompts x group 4 = 8 rollouts, 4 trained
    m.reward_fns = {"half": half_unanimous}
    seen = []
    update = m._update
    m._update = lambda ro, traj, adv, window, opt, sched, trained: (
        seen.append([ro["prompts"][i] for i in trained.tolist()]) or update(ro, traj, adv, window, opt, sched, trained))
    rows = fit(m, 3)
    assert seen == [["sign 1"] * 4] * 3
    assert all(r["adv/informative_frac"] == 0.5 and r["adv/trained_informative_frac"] == 1.0 for r in rows)
    assert m.global_step == 3  # 2 mini-batches of the 4 kept rollouts accumulate into 1 optimizer step
    with pytest.raises(ConfigError, match="update.samples"):
        tiny_grpo(update=dict(samples=-1))


def test_optimizer_steps_per_epoch_is_capped_at_the_mini_batch_count():
    """8 rollouts in mini-batches of 4 make 2 mini-batches: asking for 4 steps per epoch takes 2, and says so."""
    m = tiny_grpo(update=dict(batch_size=4, inner_epochs=3, optimizer_steps_per_epoch=2))
    assert m._opt_steps_per_iter(8) == 6
    m = tiny_grpo(update=dict(batch_size=4, inner_epochs=3, optimizer_steps_per_epoch=4))
    with pytest.warns(UserWarning, match="optimizer_steps_per_epoch=4 is more than the 2 mini-batches"):
        assert m._opt_steps_per_iter(8) == 6


def header_command() -> list[str]:
    """The tiny CPU command documented in configs/grpo.yaml's header, as arguments after `python main.py`."""
    import shlex

    lines = CONFIG.read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if "python main.py fit --config configs/grpo.yaml --config configs/tiny.yaml" in l)
    command = []
    for line in lines[start:]:
        command.append(line.lstrip("#").strip().rstrip("\\"))
        if not line.rstrip().endswith("\\"):
            break
    return shlex.split(" ".join(command))[2:]


def test_config_runs_on_cpu_with_the_tiny_overlay(tmp_path):
    from lit_ovis.cli.lightning_cli import run

    shipped = yaml.safe_load(CONFIG.read_text())
    assert shipped["model"]["class_path"] == "lit_ovis.modules.grpo.GRPOModule"
    args = shipped["model"]["init_args"]  # the 7B recipe: CPS rollouts with fewer steps than evaluation, a KL term
    assert args["grpo"]["rollout"]["sampler"] == "cps" and args["grpo"]["rollout"]["steps"] < args["sampling"]["steps"]
    command = header_command()
    assert command[:5] == tiny_stage_args("grpo")[:1] + ["--config", "configs/grpo.yaml", "--config", "configs/tiny.yaml"]
    L.seed_everything(0)
    cli = run(tiny_stage_args("grpo", *command[5:], "--trainer.max_steps", "2", f"--trainer.default_root_dir={tmp_path}"))
    m = cli.model
    assert m.grpo.rollout.sampler == "cps" and m.grpo.update.kl_beta > 0
    assert (m.rollout_cfg.height, m.rollout_cfg.width, m.rollout_cfg.steps) == (32, 32, 4)  # model.sampling's size
    assert list(m.build_rewards().scorers) == ["brightness"]  # the real scorer registry: lit_ovis.scoring's "brightness"
    last = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert cli.trainer.global_step == 2
    for key in ("reward/mean", "reward/brightness_mean", "adv/std", "train/kl", "train/clip_frac", "train/ratio_mean",
                "window/start", "window/end", "train/grad_norm"):
        assert key in last and torch.isfinite(torch.tensor(last[key])), key
    assert last["window/end"] - last["window/start"] == 2


def test_reward_grid_stamps_rewards():
    imgs = torch.full((3, 3, 32, 32), 0.5)
    grid = reward_grid(imgs, torch.tensor([0.1, 0.2, 0.3]), nrow=2)
    assert grid.shape == (3, 2 * 34, 2 * 34)
    assert grid[:, :34, :34].std() > 0  # the stamp changed pixels of a flat image


def test_tensorboard_grid_logged(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0)
    m = tiny_grpo(log_images_every_n_steps=1)
    tiny_trainer(1, logger=TensorBoardLogger(tmp_path, name="tb"), log_every_n_steps=1).fit(m, prompt_loader())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(tmp_path.rglob("events.out.*")).parent))
    acc.Reload()
    assert "rollouts" in acc.Tags()["images"]
    assert "reward/brightness_mean" in acc.Tags()["scalars"]


@pytest.mark.slow
def test_grpo_raises_brightness_reward():
    """Mean rollout reward (image brightness) rises by many times its initial within-group spread."""
    L.seed_everything(0)
    m = tiny_grpo(lr=3e-3, rollout=dict(group_size=8, batch_size=16, steps=4), update=dict(batch_size=16), window=dict(size=2))
    rows = fit(m, 60)
    rewards = [r["reward/mean"] for r in rows]
    spread = rows[0]["reward/std"]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last - first > 5 * spread, (first, last, spread, rewards)


def test_grpo_config_runs_through_the_cli_with_the_tiny_overlay(tmp_path):
    """The header's `python main.py fit --config configs/grpo.yaml --config configs/tiny.yaml ...`: CLI, prompt
    DataModule (synthetic EN/ZH prompts), the scorer registry and a checkpoint, end to end on CPU."""
    args = header_command() + ["--trainer.max_steps", "2", f"--trainer.default_root_dir={tmp_path}",
                               "--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={tmp_path}/ckpt"]
    proc = run_main(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["grpo_state"]["step_scores"] is not None


def test_sliding_window_follows_the_iteration_count():
    L.seed_everything(0)
    m = tiny_grpo(window=dict(mode="sliding", size=1, shift_every=1, stride=1), rollout=dict(steps=4))
    rows = fit(m, 4)
    assert [r["window/start"] for r in rows] == [0, 1, 2, 2]  # 3 stochastic steps (the last is deterministic)


class TestGRPOStage(StageModuleTester):
    def make_module(self):
        return GRPOModule(encoders=EncoderConfig(max_sequence_length=8), sampling=SamplingConfig(steps=2, height=32, width=32),
                          grpo=GRPOConfig(rollout=RolloutConfig(group_size=2, steps=2, batch_size=4), update=UpdateConfig(kl_beta=0.01)))


def test_kl_scale_defaults_to_the_published_recipe_and_refuses_unknown_values():
    assert UpdateConfig().kl_scale == "recipe"  # published kl_beta values (Flow-GRPO, FlowCPS) port unchanged
    assert "kl_scale" not in yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["grpo"]["update"]  # the config keeps it
    with pytest.raises(ConfigError, match="grpo.update.kl_scale must be one of"):
        GRPOModule(grpo=GRPOConfig(update=UpdateConfig(kl_scale="paper")))
