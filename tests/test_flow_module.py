"""FlowMatchingModule learns, logs, resumes its EMA, and samples like the pipeline."""

from __future__ import annotations

import lightning as L
import torch

from helpers import LatentSet, StageModuleTester, loader, tiny_flow_module, tiny_trainer


def fixed_loss(module, batch) -> float:
    module.eval()
    with torch.no_grad():
        loss, _, _ = module.flow_loss(batch, generator=torch.Generator().manual_seed(0))
    module.train()
    return loss.item()


def test_tiny_model_overfits_a_few_samples(tmp_path):
    L.seed_everything(0)
    module = tiny_flow_module()
    data = LatentSet(n=4)
    batch = next(iter(loader(data)))
    before = fixed_loss(module, batch)
    trainer = tiny_trainer(150, default_root_dir=tmp_path)
    trainer.fit(module, loader(data, shuffle=True))
    after = fixed_loss(module, batch)
    assert after < 0.5 * before, (before, after)


def test_ema_tracks_weights_and_is_saved(tmp_path):
    from lit_ovis.modules.config import EMAConfig

    L.seed_everything(0)
    module = tiny_flow_module(ema=EMAConfig(enabled=True, decay=0.5))
    trainer = tiny_trainer(3, default_root_dir=tmp_path)
    trainer.fit(module, loader(LatentSet(n=4)))
    shadow = module.ema.shadow_state_dict()
    name = "proj_out.weight"
    live = dict(module.backbone.named_parameters())[name]
    assert not torch.equal(shadow[name], live)  # lags behind the live weights
    sd = module.state_dict()
    assert any(k.startswith("ema.") for k in sd) and not any(k.startswith(("text_encoder", "vae")) for k in sd)


def test_sample_is_deterministic_and_in_range():
    module = tiny_flow_module()
    a = module.sample(["hello", "world"], seed=5)
    b = module.sample(["hello", "world"], seed=5)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    c = module.sample(["world"], seed=6)
    torch.testing.assert_close(c[0], a[1])  # per-sample seeds: batch neighbours don't matter


def test_flow_loss_wiring_equals_a_hand_computed_loss():
    """The module's loss = mean |v_theta(x_t, t) - (noise - x0)|^2 with x_t = (1-t) x0 + t noise, on packed latents."""
    from lit_ovis.models.text_encoder import text_ids
    from lit_ovis.models.vae import latent_image_ids, pack_latents

    module = tiny_flow_module()
    data = LatentSet(n=2)
    batch = next(iter(loader(data, batch_size=2)))
    g = torch.Generator().manual_seed(1)
    batch["noise"] = torch.randn(batch["latents"].shape, generator=g)
    batch["timesteps"] = torch.tensor([0.2, 0.7])
    loss, per_sample, t = module.flow_loss(batch)

    x0, noise = pack_latents(batch["latents"]), pack_latents(batch["noise"])
    tt = batch["timesteps"][:, None, None]
    x_t = (1 - tt) * x0 + tt * noise
    embeds = batch["prompt_embeds"]
    with torch.no_grad():
        pred = module.backbone(
            hidden_states=x_t, timestep=batch["timesteps"], encoder_hidden_states=embeds,
            img_ids=latent_image_ids(4, 4), txt_ids=text_ids(embeds.shape[1]), return_dict=False,
        )[0]
    expected = ((pred - (noise - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(per_sample.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), expected.mean(), rtol=1e-5, atol=1e-6)
    assert torch.equal(t, batch["timesteps"])


def test_ema_updates_once_per_optimizer_step_under_accumulation(tmp_path):
    from lit_ovis.modules.config import EMAConfig

    module = tiny_flow_module(ema=EMAConfig(enabled=True, decay=0.5))
    calls = []
    update = module.ema.update
    module.ema.update = lambda model, decay=None, **kw: (calls.append(1), update(model, decay, **kw))
    trainer = tiny_trainer(2, accumulate_grad_batches=2, default_root_dir=tmp_path)
    trainer.fit(module, loader(LatentSet(n=8), batch_size=2))
    assert trainer.global_step == 2 and len(calls) == 2


def test_predict_writes_one_png_per_prompt_and_reruns_cleanly(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from callbacks.image_writer import ImageWriter
    from data_modules.prompts import PromptDataModule

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "prompt": f'a sign that says "{w}"', "target_text": w} for i, w in enumerate(["OPEN", "SALE", "EXIT"])]
    prompts.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    module = tiny_flow_module()
    out = tmp_path / "pred"
    for _ in range(2):  # a rerun rewrites the same files and index, never duplicates
        data = PromptDataModule(prompt_file=str(prompts), synthetic_prompts=0, batch_size=2)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[ImageWriter(str(out))], default_root_dir=tmp_path)
        trainer.predict(module, datamodule=data, return_predictions=False)
    index = [json.loads(l) for l in (out / "index.rank0.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["file"] for r in index) == ["p0.png", "p1.png", "p2.png"]
    assert {r["prompt"] for r in index} == {r["prompt"] for r in rows}
    # The PNG is what sample() draws for that prompt with the record's stable seed.
    from data_modules.prompts import collate_prompts

    seed = collate_prompts([{**rows[1], "_epoch": 0, "_pos": 0}])["seeds"][0]
    expected = (module.sample([rows[1]["prompt"]], seed=[seed])[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    got = torch.from_numpy(np.array(Image.open(out / "p1.png")))
    assert torch.equal(got, torch.from_numpy(expected))


class TestFlowMatchingStage(StageModuleTester):
    def make_module(self):
        return tiny_flow_module(configure=False)
