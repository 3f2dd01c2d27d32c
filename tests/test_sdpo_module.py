"""SDPOModule: frozen reference (also under FSDP2), batched winner/loser forward, learning on synthetic pairs."""

from __future__ import annotations

import os
import socket

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset


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


def tiny_sdpo(**dpo):
    from lit_ovis.modules.config import EncoderConfig, OptimizerConfig
    from lit_ovis.modules.sdpo import DPOConfig, SDPOModule
    from lit_ovis.sampling.generate import SamplingConfig

    cfg = dict(beta=200.0, timestep_shift="none", timestep_sampling="uniform")
    cfg.update(dpo)
    module = SDPOModule(
        encoders=EncoderConfig(max_sequence_length=8),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0),
        sampling=SamplingConfig(steps=4, guidance_scale=3.0, height=32, width=32),
        dpo=DPOConfig(**cfg),
    )
    return module


def trainer(tmp_path, steps: int, **kw):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)


@pytest.fixture
def one_thread():
    # Tiny models are dominated by thread overhead on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fixed_stats(module, batch, seed: int = 0) -> dict[str, float]:
    module.eval()
    with torch.no_grad():
        _, st = module.dpo_loss(batch, generator=torch.Generator().manual_seed(seed))
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

    with pytest.raises(ConfigError, match="dpo.beta"):
        tiny_sdpo(beta=0.0)
    with pytest.raises(ConfigError, match="dpo.mu"):
        tiny_sdpo(safeguard_rule="paper", mu=2.0)
    with pytest.raises(ConfigError, match="safeguard_rule"):
        tiny_sdpo(safeguard_rule="bogus")


class AccuracyCurve(L.Callback):
    """Implicit accuracy / reward margin on fixed pairs (fixed noise and timesteps) every `every` steps, and
    the logged lambda_safe statistics of each training step."""

    def __init__(self, batch, every: int = 25):
        self.batch, self.every = batch, every
        self.curve: list[tuple[int, float, float, float, float]] = []
        self.lambdas: list[tuple[float, float, float]] = []

    def _eval(self, module, step):
        rows = [fixed_stats(module, self.batch, seed) for seed in range(4)]  # several noise/timestep draws
        mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
        self.curve.append((step, mean("implicit_acc"), mean("reward_margin"),
                           mean("policy_loss_w") - mean("ref_loss_w"), mean("policy_loss_l") - mean("ref_loss_l")))

    def on_train_start(self, trainer, module):
        self._eval(module, 0)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        if "train/lambda_mean" in m:
            self.lambdas.append((float(m["train/lambda_mean"]), float(m["train/lambda_min"]), float(m["train/lambda_max"])))
        step = trainer.global_step
        if step % self.every == 0 or (step < self.every and step % 2 == 0):  # finer early on
            self._eval(module, step)


def train_on_pairs(tmp_path, steps: int = 100, every: int = 10, **dpo):
    L.seed_everything(0)
    module = tiny_sdpo(**dpo)
    data = PairSet(n=8)
    fixed = next(iter(DataLoader(data, batch_size=8)))
    curve = AccuracyCurve(fixed, every)
    trainer(tmp_path, steps, callbacks=[curve], log_every_n_steps=1).fit(module, DataLoader(data, batch_size=4, shuffle=True))
    return module, curve


@pytest.mark.slow
@pytest.mark.parametrize("safeguard", [True, False], ids=["sdpo", "plain_dpo"])
def test_tiny_model_learns_synthetic_preferences(tmp_path, one_thread, safeguard):
    module, curve = train_on_pairs(tmp_path, safeguard=safeguard)
    steps, accs, margins, dw, dl = zip(*curve.curve)
    print(f"\nsafeguard={safeguard} step, implicit_acc, reward_margin, dL_w, dL_l (policy - reference):")
    for row in curve.curve:
        print("  %4d  %.3f  %8.3f  %+.4f  %+.4f" % row)
    assert accs[0] <= 0.75  # policy == reference at the start (up to kernel round-off)
    assert max(accs[-2:]) >= 0.85, curve.curve
    assert margins[-1] > 0
    if safeguard:
        lam = torch.tensor(curve.lambdas)
        print("  lambda_safe per step: mean %.3f, min %.3f, max %.3f" % (lam[:, 0].mean(), lam[:, 1].min(), lam[:, 2].max()))
        # active and within the clip interval: conflicting loser gradients are damped below 1
        assert (lam[:, 1] >= 0).all() and (lam[:, 2] <= 1.0 + 1e-6).all() and lam[:, 0].mean() < 1.0
        assert dw[-1] < 0  # winner-preserving: the winner's error ends below the reference's
    else:
        assert not curve.lambdas


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
