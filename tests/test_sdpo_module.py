"""SDPOModule: frozen reference (also under FSDP2) on the policy's code path, batched winner/loser forward with
shared per-step noise, and learning on rendered-text preference pairs (with held-out pairs)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from helpers import StageModuleTester, tiny_trainer


class PairSet(Dataset):
    """Synthetic preference pairs at 32 px (4x4 latents): the winner is a smooth structured latent, the loser
    the same latent spatially scrambled plus noise — distinguishable, and equal in scale."""

    def __init__(self, n: int = 8, seq_len: int = 8, dim: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(n, 16, 1, 1, generator=g)
        ramp = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
        self.latents_w = base * ramp + 0.1 * torch.randn(n, 16, 4, 4, generator=g)
        perm = torch.randperm(16, generator=g)
        scrambled = self.latents_w.flatten(2)[:, :, perm].reshape(n, 16, 4, 4)
        self.latents_l = scrambled + 0.5 * torch.randn(n, 16, 4, 4, generator=g)
        self.embeds = torch.randn(n, seq_len, dim, generator=g)

    def __len__(self) -> int:
        return len(self.latents_w)

    def __getitem__(self, i: int):
        return {"latents_w": self.latents_w[i], "latents_l": self.latents_l[i], "prompt_embeds": self.embeds[i],
                "captions": f"pair {i}"}


def tiny_sdpo(safeguard: dict | None = None, **sdpo):
    from lit_ovis.losses.dpo import SafeguardConfig
    from lit_ovis.modules.config import EncoderConfig, OptimizerConfig
    from lit_ovis.modules.sdpo import SDPOConfig, SDPOModule
    from lit_ovis.sampling.generate import SamplingConfig

    cfg = dict(beta=200.0, timestep_shift="none", timestep_sampling="uniform", safeguard=SafeguardConfig(**(safeguard or {})))
    cfg.update(sdpo)
    module = SDPOModule(
        encoders=EncoderConfig(max_sequence_length=8),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0),
        sampling=SamplingConfig(steps=4, guidance_scale=3.0, height=32, width=32),
        sdpo=SDPOConfig(**cfg),
    )
    return module


def trainer(tmp_path, steps: int, **kw):
    return tiny_trainer(steps, default_root_dir=tmp_path, **kw)


def fixed_stats(module, batch, seed: int = 0) -> dict[str, float]:
    module.eval()
    with torch.no_grad():
        _, st = module.pair_loss(batch, generator=torch.Generator().manual_seed(seed))
    module.train()
    return {k: float(v) for k, v in st.items()}


def test_reference_is_a_frozen_copy_outside_optimizer_and_checkpoint(tmp_path, one_thread):
    L.seed_everything(0)
    module = tiny_sdpo()
    module.configure_model()
    ref, pol = module.reference, module.backbone
    assert ref is not pol
    for (n1, p1), (n2, p2) in zip(pol.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    trainer(tmp_path, 5).fit(module, DataLoader(PairSet(), batch_size=4))
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(p.grad is None for p in ref.parameters())
    ref_ids = {id(p) for p in ref.parameters()}
    opt = module.trainer.optimizers[0]
    assert not ref_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    assert not ref_ids & {id(p) for p in opt.state}
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(p, before[n]) for n, p in pol.named_parameters())  # the policy moved
    assert not any(k.startswith("reference") or "_frozen" in k for k in module.state_dict())


def test_batched_forward_equals_two_forwards(one_thread):
    L.seed_everything(0)
    a, b = tiny_sdpo(batched_forward=True), tiny_sdpo(batched_forward=False)
    a.configure_model()
    b.configure_model()
    b.backbone.load_state_dict(a.backbone.state_dict())
    b.reference.load_state_dict(a.backbone.state_dict())
    with torch.no_grad():  # make the policy differ from the reference so the loss is informative
        for p in a.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b.backbone.load_state_dict(a.backbone.state_dict())
    batch = next(iter(DataLoader(PairSet(), batch_size=4)))
    sa, sb = fixed_stats(a, batch), fixed_stats(b, batch)
    assert sa["reward_margin"] != 0.0
    for k in ("dpo_loss", "reward_margin", "policy_loss_w", "policy_loss_l", "ref_loss_w", "ref_loss_l", "lambda_mean"):
        assert sa[k] == pytest.approx(sb[k], rel=1e-4, abs=1e-6), k


def test_reference_from_separate_weights(tmp_path, one_thread):
    from safetensors.torch import save_file

    from lit_ovis.models.backbone import build_backbone

    other = build_backbone("tiny")
    with torch.no_grad():  # presets build deterministically: perturb so the weights differ from the policy's
        for q in other.parameters():
            q.add_(torch.randn_like(q))
    path = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    module = tiny_sdpo(reference_pretrained=str(path))
    module.configure_model()
    name, p = next(iter(module.reference.named_parameters()))
    assert torch.equal(p, other.state_dict()[name])
    assert not torch.equal(p, module.backbone.state_dict()[name])


def test_config_errors_name_the_option():
    from lit_ovis.errors import ConfigError

    with pytest.raises(ConfigError, match="sdpo.beta"):
        tiny_sdpo(beta=0.0)
    with pytest.raises(ConfigError, match="sdpo.safeguard.mu"):
        tiny_sdpo(safeguard=dict(rule="paper", mu=2.0))
    with pytest.raises(ConfigError, match="safeguard.rule"):
        tiny_sdpo(safeguard=dict(rule="bogus"))
    with pytest.raises(ConfigError, match="sdpo.safeguard.safety_margin"):
        tiny_sdpo(safeguard=dict(safety_margin=1.5))


def test_winner_and_loser_share_noise_and_timestep_from_the_step_generator(one_thread):
    """training_step draws noise and timesteps from `step_generator(batch_idx)` (per rank/step/micro-batch, so a
    resumed run redraws them exactly); winner and loser get the same ones, and so does the reference."""
    L.seed_everything(0)
    module = tiny_sdpo(timestep_sampling="logit_normal")
    module.configure_model()
    calls, seen = [], {"policy": [], "reference": []}
    original = module.step_generator
    module.step_generator = lambda batch_idx=0: calls.append(batch_idx) or original(batch_idx)
    for name, model in (("policy", module.backbone), ("reference", module.reference)):
        model.register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: seen[name].append((kwargs["hidden_states"].detach().clone(), kwargs["timestep"].detach().clone())),
            with_kwargs=True)
    batch = next(iter(DataLoader(PairSet(), batch_size=4)))
    from lit_ovis.models.vae import pack_latents

    pw, pl = pack_latents(batch["latents_w"]), pack_latents(batch["latents_l"])
    noises = []
    for batch_idx in (3, 3, 4):
        module.training_step(batch, batch_idx)
        x, t = seen["policy"][-1]
        x_ref, t_ref = seen["reference"][-1]
        torch.testing.assert_close(x, x_ref, rtol=0, atol=0)  # the reference sees the policy's exact inputs
        torch.testing.assert_close(t, t_ref, rtol=0, atol=0)
        x_w, x_l = x.chunk(2)
        t_w, t_l = t.chunk(2)
        assert torch.equal(t_w, t_l)  # one timestep per pair
        tt = t_w.reshape(-1, 1, 1)
        noise_w, noise_l = (x_w - (1 - tt) * pw) / tt, (x_l - (1 - tt) * pl) / tt
        torch.testing.assert_close(noise_w, noise_l, rtol=1e-4, atol=1e-4)  # one noise per pair
        noises.append((noise_w, t_w))
    assert calls == [3, 3, 4]
    torch.testing.assert_close(noises[0][0], noises[1][0])  # same step and micro-batch: the same draw (resume)
    assert not torch.allclose(noises[0][0], noises[2][0], atol=1e-3)  # another micro-batch: another draw


def test_reference_runs_the_policy_code_path(one_thread):
    """The reference gets the policy's attention backend and compiled blocks (no mesh here; under FSDP2
    `parallelize_module` shards both with the same mixed-precision policy), and nothing the policy lacks."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from lit_ovis.modules.config import EncoderConfig
    from lit_ovis.modules.sdpo import SDPOConfig, SDPOModule
    from lit_ovis.parallel.fsdp import ParallelConfig, blocks_of

    previous = _AttentionBackendRegistry._active_backend
    module = SDPOModule(encoders=EncoderConfig(max_sequence_length=8), parallel=ParallelConfig(attention_backend="_native_math", compile=True),
                        sdpo=SDPOConfig(beta=200.0))
    try:
        module.configure_model()

        def backends(model):
            return {str(getattr(m.processor, "_attention_backend", None)) for m in model.modules() if hasattr(m, "processor")}

        assert backends(module.reference) == backends(module.backbone) == {"AttentionBackendName._NATIVE_MATH"}
        for pol, ref in zip(blocks_of(module.backbone), blocks_of(module.reference)):
            assert pol._compiled_call_impl is not None and ref._compiled_call_impl is not None
        eager = SDPOModule(encoders=EncoderConfig(max_sequence_length=8), sdpo=SDPOConfig(beta=200.0))
        eager.configure_model()
        assert not any(b._compiled_call_impl is not None for b in blocks_of(eager.reference))
    finally:
        for model in (module.backbone, module.reference):
            if model is not None:
                model.reset_attention_backend()
        _AttentionBackendRegistry._active_backend = previous


# --------------------------------------------------------------------------- learning on rendered-text pairs
SEQ_LEN = 8
SFT_STEPS = 100  # the DPO stage starts from an SFT model (the report's reference), not from random weights
STEPS = 120


@pytest.fixture(scope="module")
def text_pairs(tmp_path_factory):
    """Rendered-text preference pairs from data_modules.preference (winner: the caption's text rendered
    correctly; loser: the same layout with the text misspelled), tiny-VAE latents and tiny text embeddings.
    The first 20 train, the other 12 are held out; plus the tiny MMDiT after SFT on the training winners."""
    from litdata import StreamingDataset

    from data_modules.preference import build_synthetic_pairs

    root = tmp_path_factory.mktemp("textpairs")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_synthetic_pairs(str(root), 32, resolution=64, text_encoder="tiny", vae="tiny", max_sequence_length=SEQ_LEN, progress=False)
        items = {}
        for bucket in sorted(p for p in root.glob("64/*") if p.is_dir()):
            ds = StreamingDataset(str(bucket))
            for i in range(len(ds)):
                it = ds[i]
                items[it["id"]] = {**it, "bucket": bucket.name}
        ids = sorted(items)
        train, heldout = [items[i] for i in ids[:20]], [items[i] for i in ids[20:]]
        return train, heldout, sft_weights(train)
    finally:
        torch.set_num_threads(n)


def sft_weights(train) -> dict:
    """Flow-matching SFT of the tiny MMDiT on the training winners (uniform timesteps, fixed noise)."""
    from lit_ovis import flow
    from lit_ovis.models.vae import pack_latents

    L.seed_everything(0)
    m = tiny_sdpo()
    m.configure_model()
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-3)
    batches = _bucket_batches(train, 4)
    for step in range(SFT_STEPS):
        batch = batches[step % len(batches)]
        x0 = pack_latents(batch["latents_w"])
        cond = m.conditioning(batch["latents_w"].shape[2], batch["latents_w"].shape[3], m.embed_prompts(batch))
        g = torch.Generator().manual_seed(step)
        t, noise = torch.rand(x0.shape[0], generator=g), torch.randn(x0.shape, generator=g)
        loss = (m.predict_velocity(m.backbone, flow.interpolate(x0, noise, t), t, cond) - flow.velocity_target(x0, noise)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in m.backbone.state_dict().items()}


def _collate(items):
    embeds = torch.zeros(len(items), SEQ_LEN, items[0]["prompt_embeds"].shape[-1])
    for k, it in enumerate(items):
        embeds[k, : it["prompt_embeds"].shape[0]] = it["prompt_embeds"].float()
    return {"latents_w": torch.stack([it["latents_w"].float() for it in items]),
            "latents_l": torch.stack([it["latents_l"].float() for it in items]), "prompt_embeds": embeds,
            "captions": [it["caption"] for it in items]}


def _bucket_batches(items, size):
    groups: dict[str, list] = {}
    for it in items:
        groups.setdefault(it["bucket"], []).append(it)
    return [_collate(g[i: i + size]) for _, g in sorted(groups.items()) for i in range(0, len(g), size)]


class BatchList(Dataset):
    """Pre-collated single-bucket batches (a bucket batch sampler in miniature)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def pair_stats(module, batches, draws: int = 2) -> dict[str, float]:
    """Pair-weighted implicit accuracy and policy-minus-reference errors under fixed noise/timestep draws."""
    acc = dw = dl = ref = 0.0
    n = 0
    for b, batch in enumerate(batches):
        k = batch["latents_w"].shape[0]
        for d in range(draws):
            st = fixed_stats(module, batch, seed=100 * b + d)
            acc, n = acc + st["implicit_acc"] * k, n + k
            dw += (st["policy_loss_w"] - st["ref_loss_w"]) * k
            dl += (st["policy_loss_l"] - st["ref_loss_l"]) * k
            ref += st["ref_loss_w"] * k
    return {"acc": acc / n, "dL_w": dw / n, "dL_l": dl / n, "ref_w": ref / n}


class Curve(L.Callback):
    def __init__(self, train, heldout, every):
        self.train, self.heldout, self.every = train, heldout, every
        self.rows, self.lambdas = [], []

    def _eval(self, module, step):
        self.rows.append((step, pair_stats(module, self.train), pair_stats(module, self.heldout)))

    def on_train_start(self, trainer, module):
        self._eval(module, 0)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        if "train/lambda_mean" in m:
            self.lambdas.append(float(m["train/lambda_mean"]))
        if trainer.global_step % self.every == 0:
            self._eval(module, trainer.global_step)


def config_safeguard() -> dict:
    """The safeguard settings of configs/dpo.yaml (the default this test guards)."""
    import yaml

    sdpo = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "dpo.yaml").read_text())["model"]["init_args"]["sdpo"]
    return dict(sdpo["safeguard"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["config_sdpo", "plain_dpo"])
def test_tiny_model_learns_rendered_text_preferences(tmp_path, one_thread, text_pairs, variant):
    train, heldout, sft = text_pairs
    dpo = config_safeguard() if variant == "config_sdpo" else {"enabled": False}
    L.seed_everything(0)
    module = tiny_sdpo(safeguard=dpo)
    module.configure_model()
    module.backbone.load_state_dict(sft)  # policy == reference == the SFT model
    module.reference.load_state_dict(sft)
    train_batches, held_batches = _bucket_batches(train, 4), _bucket_batches(heldout, 16)
    curve = Curve(_bucket_batches(train, 16), held_batches, every=STEPS // 3)
    loader = DataLoader(BatchList(train_batches), batch_size=None, shuffle=True)
    trainer(tmp_path, STEPS, callbacks=[curve], log_every_n_steps=1).fit(module, loader)
    print(f"\n{variant} {dpo}: step, train acc, held-out acc, train dL_w, held-out dL_w, held-out dL_l")
    for step, tr, ho in curve.rows:
        print(f"  {step:4d}  {tr['acc']:.3f}  {ho['acc']:.3f}  {tr['dL_w']:+.4f}  {ho['dL_w']:+.4f}  {ho['dL_l']:+.4f}")
    (_, tr0, ho0), (_, tr, ho) = curve.rows[0], curve.rows[-1]
    assert abs(tr0["acc"] - 0.5) < 0.1 and abs(ho0["acc"] - 0.5) < 0.1  # policy == reference at the start
    assert tr["acc"] >= 0.7, curve.rows  # the training preferences are learned
    # Held-out accuracy is measured and printed; at this scale it stays near 0.5 for every variant (no
    # generalisation from 20 pairs; benchmarks/results_dpo.md), so what is asserted on the held-out pairs is
    # what the safeguard promises there: the winners' error.
    if variant == "config_sdpo":
        lam = torch.tensor(curve.lambdas)
        print(f"  lambda_safe per step: mean {lam.mean():.3f}, min {lam.min():.3f}, max {lam.max():.3f}")
        assert (lam >= 0).all() and (lam <= 1 + 1e-6).all() and lam.mean() < 0.9
        # winner-preserving on the trained pairs and on pairs it never saw (within 2% of the reference error)
        assert tr["dL_w"] <= 0.02 * tr0["ref_w"] and ho["dL_w"] <= 0.02 * ho0["ref_w"], curve.rows
    else:
        assert not curve.lambdas
        assert ho["dL_w"] > 0.5 * ho0["ref_w"], curve.rows  # plain Diffusion-DPO ruins even unseen winners


# ---------------------------------------------------------------------------------------------- FSDP2
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def _fsdp_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    L.seed_everything(0)
    module = tiny_sdpo()
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, process_group_backend="gloo")
    tr = L.Trainer(max_steps=3, accelerator="cpu", devices=world, strategy=strategy, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    snapshot: dict[str, torch.Tensor] = {}

    class Snap(L.Callback):
        def on_train_start(self, trainer, pl_module):
            snapshot.update({n: p.full_tensor().clone() for n, p in pl_module.reference.named_parameters()})
            snapshot.update({"policy." + n: p.full_tensor().clone() for n, p in pl_module.backbone.named_parameters()})

    tr.callbacks.append(Snap())
    tr.fit(module, DataLoader(PairSet(n=8, seed=rank), batch_size=2))
    ref, pol = module.reference, module.backbone
    not_dtensor = [n for n, p in ref.named_parameters() if not isinstance(p, DTensor)]
    if rank == 0 and not_dtensor:
        print("reference params left unsharded:", not_dtensor[:5], len(not_dtensor))
    opt = tr.optimizers[0]
    ref_ids = {id(p) for p in ref.parameters()}
    result = {
        "ref_sharded": all(isinstance(p, DTensor) for p in ref.parameters()),
        "policy_sharded": all(isinstance(p, DTensor) for p in pol.parameters()),
        "ref_frozen": not any(p.requires_grad for p in ref.parameters()) and not ref.training,
        "ref_no_grad": all(p.grad is None for p in ref.parameters()),
        "ref_not_in_optimizer": not ref_ids & {id(p) for g in opt.param_groups for p in g["params"]},
        "ref_no_optimizer_state": not ref_ids & {id(p) for p in opt.state},
        "optimizer_state_is_policy": len(opt.state) == sum(1 for p in pol.parameters() if p.requires_grad),
        "ref_unchanged": all(torch.equal(_full(p), snapshot[n]) for n, p in ref.named_parameters()),
        "policy_moved": any(not torch.equal(p.full_tensor(), snapshot["policy." + n]) for n, p in pol.named_parameters()),
        "ref_equals_initial_policy": all(torch.equal(snapshot[n], snapshot["policy." + n]) for n, _ in ref.named_parameters()),
    }
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_reference_stays_frozen_without_optimizer_state(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.start_processes(_fsdp_worker, args=(world, _free_port(), str(tmp_path), str(tmp_path)), nprocs=world,
                       start_method="spawn", join=True)
    for rank in range(world):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert all(result.values()), (rank, result)


class TestSDPOStage(StageModuleTester):
    def make_module(self):
        return tiny_sdpo()
