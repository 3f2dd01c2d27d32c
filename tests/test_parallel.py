"""FSDP2 / HSDP through Lightning on CPU with 2 gloo processes: same losses and weights as one process,
sharded checkpoints that resume at another world size, consolidation, and memory levers that do not
change gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist" / "fsdp_train.py"
pytestmark = pytest.mark.distributed
FSDP_LEVERS = ("--checkpointing", "full", "--ema", "0.5")


def train(out: Path, devices: int, mode: str, steps: int = 2, save: Path | None = None, resume: Path | None = None, *extra: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--devices", str(devices), "--mode", mode, "--steps", str(steps), "--out", str(out)]
    cmd += ["--save", str(save)] if save else []
    cmd += ["--resume", str(resume)] if resume else []
    cmd += list(extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("parallel")
    return {
        "dir": d,
        "single": train(d / "single.pt", 1, "single", steps=3),
        # FSDP2 with full activation checkpointing and an EMA (decay 0.5) against a plain single process
        "fsdp": train(d / "fsdp.pt", 2, "fsdp", 2, d / "ckpt", None, "--save-faults", *FSDP_LEVERS),
    }


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _relative_update_diff(a: dict, b: dict) -> float:
    """‖w_a − w_b‖ / ‖w_a − w_init‖ over all weights: how far apart two runs' updates are."""
    diff = sum(((a["state"][k] - b["state"][k]) ** 2).sum() for k in a["state"]) ** 0.5
    update = sum(((a["state"][k] - a["init_state"][k]) ** 2).sum() for k in a["state"]) ** 0.5
    return float(diff / update)


def _update_cosine(a: dict, b: dict) -> float:
    ua = torch.cat([(a["state"][k] - a["init_state"][k]).flatten() for k in a["state"]])
    ub = torch.cat([(b["state"][k] - b["init_state"][k]).flatten() for k in a["state"]])
    return float(torch.nn.functional.cosine_similarity(ua, ub, dim=0))


def test_fsdp2_matches_single_process(runs):
    single, fsdp = runs["single"], runs["fsdp"]
    assert fsdp["losses"] == pytest.approx(single["losses"][:2], rel=1e-6)
    # after 2 steps the weights agree (single has one more step: compare with a 2-step single run)
    two = train(runs["dir"] / "single2.pt", 1, "single", steps=2)
    assert _max_diff(two["init_state"], fsdp["init_state"]) == 0.0
    # Reduce-scatter sums gradients in another order, and Adam divides by sqrt(v): a gradient within
    # rounding of zero can move its weight by a visible fraction of the LR. So the whole update must agree
    # to 1e-3 relative, and no single weight may differ by more than 5% of the two steps' summed LR (1e-3).
    assert _relative_update_diff(two, fsdp) < 1e-3
    assert _max_diff(two["state"], fsdp["state"]) < 5e-5


def test_hsdp_1x2_mesh_matches_single_process(runs):
    hsdp = train(runs["dir"] / "hsdp.pt", 2, "hsdp", steps=2)
    assert hsdp["losses"] == pytest.approx(runs["single"]["losses"][:2], rel=1e-6)
    assert _max_diff(runs["fsdp"]["state"], hsdp["state"]) < 1e-6


@pytest.mark.parametrize("devices", [1, 2])
def test_sharded_checkpoint_resumes_at_another_world_size(runs, devices):
    ckpt = runs["dir"] / "ckpt"
    assert (ckpt / ".metadata").exists() and not (runs["dir"] / ".ckpt.tmp").exists()
    resumed = train(runs["dir"] / f"resume{devices}.pt", devices, "fsdp", 3, None, ckpt, *FSDP_LEVERS)
    assert resumed["losses"] == pytest.approx(runs["single"]["losses"][2:], rel=1e-5)
    # the EMA resumed too (resharded to this world size): one more update from the saved shadow
    expected = {k: 0.5 * v + 0.5 * resumed["states"][-1][k] for k, v in runs["fsdp"]["ema"]["full"].items()}
    assert _max_diff(expected, resumed["ema"]["full"]) < 1e-6


def test_sharded_save_survives_stale_old_and_a_failing_rank(runs):
    faults = runs["fsdp"]["save_faults"]
    # a `.ckpt.old` left by a save killed while deleting it used to make the next rename fail (ENOTEMPTY)
    assert faults["stale_old_save_ok"]
    # a disk-full write on rank 1 reaches every rank as the same one-line CheckpointError (no hang) ...
    first, second = faults["fault_messages"]
    assert first == second and "rank 1" in first and "No space left" in first and "\n" not in first
    # ... and the previous checkpoint is untouched, with no temporary directories left behind
    assert faults["previous_kept"] and faults["leftovers"] == []


def test_checkpointing_under_fsdp2_and_ema_stays_sharded(runs):
    got = runs["fsdp"]  # its losses and weights equal the single process's: test_fsdp2_matches_single_process
    assert got["checkpointed_blocks"] == 4
    ema = got["ema"]
    # each rank holds only its shard of the fp32 EMA
    assert sum(ema["local_numels"]) == ema["numel"] and max(ema["local_numels"]) < ema["numel"]
    expected = dict(got["init_state"])
    for state in got["states"]:  # one update per step with decay 0.5
        expected = {k: 0.5 * expected[k] + 0.5 * state[k] for k in expected}
    assert _max_diff(expected, ema["full"]) < 1e-6


def test_bf16_compute_with_fp32_master_weights_and_reduce_under_fsdp2(runs):
    got = train(runs["dir"] / "bf16.pt", 2, "fsdp", 2, None, None, "--param-dtype", "bf16")
    assert got["param_dtypes"] == ["torch.float32"]  # master weights (what AdamW steps on) stay fp32
    fp32 = runs["fsdp"]["losses"]
    assert got["losses"] != fp32  # the forward really ran in bf16 ...
    assert got["losses"] == pytest.approx(fp32, rel=1e-2)  # ... and trains the same model
    # Adam turns bf16 rounding of tiny gradients into visible update differences; the updates still point
    # the same way (cosine 0.92 measured; unrelated updates would give ~0)
    assert _update_cosine(runs["fsdp"], got) > 0.85


def test_consolidated_weights_load_in_one_process(runs, tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemReader

    from lit_ovis.cli.consolidate import main as consolidate_main
    from lit_ovis.models.backbone import build_backbone

    read: list[str] = []
    original = FileSystemReader.read_data

    def spy(self, plan, planner):
        read.extend(item.storage_index.fqn for item in plan.items)
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", spy)
    out = tmp_path / "backbone.safetensors"
    assert consolidate_main([str(runs["dir"] / "ckpt"), str(out), "--raw", "--diffusers-dir", str(tmp_path / "transformer")]) == 0
    # only the backbone is read from the checkpoint, never the optimizer moments (2x the weights at 7B) or the EMA
    assert read and all(k.startswith("state_dict.backbone.") for k in read)
    read.clear()
    assert consolidate_main([str(runs["dir"] / "ckpt"), str(tmp_path / "ema.safetensors"), "--ema"]) == 0
    assert read and all(k.startswith(("state_dict.backbone.", "state_dict.ema.")) for k in read)
    assert _max_diff(runs["fsdp"]["ema"]["full"], build_backbone("tiny", pretrained=str(tmp_path / "ema.safetensors")).state_dict()) == 0.0
    # by default, the weights the run sampled with: this run kept an EMA and sampled with it
    assert consolidate_main([str(runs["dir"] / "ckpt"), str(tmp_path / "auto.safetensors")]) == 0
    assert _max_diff(runs["fsdp"]["ema"]["full"], build_backbone("tiny", pretrained=str(tmp_path / "auto.safetensors")).state_dict()) == 0.0
    model = build_backbone("tiny", pretrained=str(out))
    state = {k: v.float() for k, v in model.state_dict().items()}
    assert _max_diff(runs["fsdp"]["state"], state) == 0.0
    from diffusers import OvisImageTransformer2DModel

    folder = OvisImageTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert _max_diff(state, {k: v.float() for k, v in folder.state_dict().items()}) == 0.0


@pytest.mark.parametrize("mode", ["full", "selective", "offload"])
def test_memory_levers_keep_gradients(mode):
    from lit_ovis.models.backbone import build_backbone
    from lit_ovis.models.text_encoder import text_ids
    from lit_ovis.models.vae import latent_image_ids
    from lit_ovis.parallel.memory import apply_activation_checkpointing, apply_activation_offloading

    def grads(model):
        g = torch.Generator().manual_seed(0)
        out = model(hidden_states=torch.randn(2, 16, 64, generator=g), encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                    timestep=torch.tensor([0.3, 0.7]), img_ids=latent_image_ids(8, 8), txt_ids=text_ids(8), return_dict=False)[0]
        out.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = grads(build_backbone("tiny"))
    model = build_backbone("tiny")
    if mode == "offload":
        offloader = apply_activation_offloading(model, device_types=("cpu",), min_bytes=0)  # move even on CPU
    else:
        chosen = apply_activation_checkpointing(model, mode, every_n=2)
        assert chosen == ([0, 1, 2, 3] if mode == "full" else [0, 2])
    got = grads(model)
    if mode == "offload":
        assert offloader.moved_tensors > 50  # activations really went through the host copies
    assert set(got) == set(ref) and list(model.state_dict()) == list(build_backbone("tiny").state_dict())
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-6


def test_interrupted_save_leftovers_are_cleared_or_recovered(tmp_path):
    from lit_ovis.parallel.strategy import prepare_sharded_target

    path, old, tmp = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.old", tmp_path / ".last.ckpt.tmp"
    # killed between the two renames: no checkpoint, a complete `.old` -> it is the last good one, restored
    old.mkdir()
    (old / ".metadata").write_bytes(b"m")
    tmp.mkdir()
    prepare_sharded_target(path)
    assert (path / ".metadata").read_bytes() == b"m" and not old.exists() and not tmp.exists()
    # killed while deleting `.old` after a successful swap: the stale `.old` is removed, the checkpoint kept
    old.mkdir()
    (old / "__0_0.distcp").write_bytes(b"partial")
    prepare_sharded_target(path)
    assert not old.exists() and (path / ".metadata").exists()


def test_fsdp1_config_turns_our_levers_off():
    import yaml

    cmd = [sys.executable, str(ROOT / "main.py"), "fit", "--config", "configs/sft.yaml", "--config", "configs/strategy/fsdp1_hybrid.yaml", "--print_config"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = yaml.safe_load(proc.stdout)["model"]["init_args"]
    parallel = model["parallel"]
    # sft.yaml asks for full checkpointing, compile and bf16: FSDP1 does its own checkpointing and precision
    assert (parallel["activation_checkpointing"], parallel["compile"], parallel["param_dtype"]) == ("none", False, "fp32")
    assert parallel["attention_backend"] == "_native_flash" and model["ema"]["enabled"] is False
