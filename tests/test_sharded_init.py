"""Sharded runs from pretrained weights build the backbone on the meta device and fill the FSDP2 shards from
rank 0's single read of the weights (2 gloo processes): the weights equal the file, for the policy and for its
frozen reference copy, and a file that does not match fails on every rank with one line instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def run(weights: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "dist" / "lazy_init.py"), "--weights", str(weights), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from lit_ovis.models.backbone import build_backbone

    g = torch.Generator().manual_seed(5)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in build_backbone("tiny").state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "pretrained.safetensors"
    save_file(state, str(path))
    return path, state


def test_shards_hold_the_pretrained_weights_read_once(weights, tmp_path):
    path, state = weights
    proc = run(path, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(f"{tmp_path / 'out'}.rank{r}", weights_only=False) for r in (0, 1)]
    for r in ranks:
        assert r["sharded"] and r["full_builds"] == 0  # no rank built the full model on the host
    gathered = ranks[0]  # full state dicts are gathered on rank 0 from both ranks' shards
    assert set(gathered["policy"]) == set(state) == set(gathered["reference"])
    for key, value in state.items():
        assert torch.equal(gathered["policy"][key], value) and torch.equal(gathered["reference"][key], value), key
    assert [r["reads"] for r in ranks] == [1, 0]  # only rank 0 read the file


def test_mismatched_weights_fail_on_every_rank_in_one_line(weights, tmp_path):
    path, state = weights
    bad = tmp_path / "bad.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("proj_out")}, str(bad))
    proc = run(bad, tmp_path / "out")
    assert proc.returncode != 0
    assert "missing keys" in proc.stderr and "proj_out" in proc.stderr
