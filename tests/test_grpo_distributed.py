"""Group advantages when a prompt's group is split across ranks (2 gloo processes)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_ovis.losses.grpo import group_advantages
from lit_ovis.modules.grpo import prompt_keys
from lit_ovis.parallel.collectives import global_group_advantages

PROMPTS = ["a red poster", "OPEN 24 HOURS", "欢迎光临"]


def _full_batch():
    g = torch.Generator().manual_seed(0)
    # rank 0 holds 4 images of each prompt, rank 1 another 2 (unequal counts exercise the padded gather)
    r0 = [(p, float(torch.rand(1, generator=g)) * (i + 1)) for i, p in enumerate(PROMPTS) for _ in range(4)]
    r1 = [(p, float(torch.rand(1, generator=g)) * (i + 1) + 0.5) for i, p in enumerate(PROMPTS) for _ in range(2)]
    return r0, r1


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        local = _full_batch()[rank]
        rewards = torch.tensor([r for _, r in local])
        keys = prompt_keys([p for p, _ in local])
        adv = global_group_advantages(rewards, keys, eps=0.0)
        torch.save(adv, os.path.join(out_dir, f"adv{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_group_spanning_two_ranks_uses_the_full_group(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = _full_batch()
    got = torch.cat([torch.load(tmp_path / "adv0.pt"), torch.load(tmp_path / "adv1.pt")])
    everything = r0 + r1
    keys = prompt_keys([p for p, _ in everything])
    expect = group_advantages(torch.tensor([r for _, r in everything]), keys, eps=0.0)
    torch.testing.assert_close(got, expect)
    # and it differs from what each rank would compute alone (the groups really span ranks)
    alone = group_advantages(torch.tensor([r for _, r in r0]), prompt_keys([p for p, _ in r0]), eps=0.0)
    assert not torch.allclose(got[: len(r0)], alone, atol=1e-3)
    # per full group: zero mean, unit std
    for p in PROMPTS:
        a = got[torch.tensor([q == p for q, _ in everything])]
        assert abs(a.mean().item()) < 1e-5 and abs(a.std(unbiased=False).item() - 1) < 1e-5


def test_prompt_keys_are_stable_and_distinct():
    k = prompt_keys(PROMPTS + PROMPTS[:1])
    assert k.dtype == torch.int64 and k[0] == k[3] and len(set(k[:3].tolist())) == 3
    assert prompt_keys(["a red poster"]).item() == prompt_keys(["a red poster"]).item()
