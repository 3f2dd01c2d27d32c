"""GRPOModule under FSDP2 with 2 gloo processes: one prompt's group spans both ranks and is normalised as a
whole, both ranks train the same window, the reference is sharded, frozen and outside the optimizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_fsdp") / "result"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "dist" / "grpo_train.py"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in (0, 1)]


def test_group_spanning_ranks_is_normalised_over_all_its_members(ranks):
    for it in range(2):
        rewards = torch.cat([r["advantages"][it]["rewards"] for r in ranks])
        adv = torch.cat([r["advantages"][it]["adv"] for r in ranks])
        assert rewards.numel() == 4  # G = 2 per rank, one prompt: a group of 4 over two ranks
        expected = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-4)
        torch.testing.assert_close(adv, expected.clamp(-5, 5), rtol=1e-5, atol=1e-6)
        assert abs(float(adv.mean())) < 1e-5


def test_ranks_train_the_same_window_and_the_policy_moves(ranks):
    for a, b in zip(ranks[0]["rows"], ranks[1]["rows"]):
        assert (a["window/start"], a["window/end"]) == (b["window/start"], b["window/end"])
        assert torch.isfinite(torch.tensor(a["train/loss"]))
    assert all(r["policy_changed"] for r in ranks)


def test_reference_is_sharded_frozen_and_has_no_optimizer_state(ranks):
    for r in ranks:
        assert r["ref_is_sharded"] and not r["ref_in_optimizer"] and not r["ref_requires_grad"] and r["ref_unchanged"]
        assert r["optimizer_state_tensors"] == r["trainable"]  # AdamW state for the policy's parameters only
