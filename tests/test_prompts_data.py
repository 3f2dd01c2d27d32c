"""Prompt DataModule for GRPO / predict: EN+ZH prompts quoting their target text, sharded, resumable."""

from __future__ import annotations

import json

from data_modules.prompts import PromptDataModule, synthetic_prompts


def test_synthetic_prompts_quote_target_and_mix_languages():
    items = synthetic_prompts(40)
    assert {it["language"] for it in items} == {"en", "zh"}
    assert all(f'"{it["target_text"]}"' in it["prompt"] for it in items)
    assert synthetic_prompts(40) == items  # deterministic


def test_file_prompts_shard_and_resume(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f'sign "{w}"', "target_text": w}) for w in "ABCDEFGH"))
    dm = PromptDataModule(prompt_file=str(f), synthetic_prompts=0, batch_size=2)
    dm.setup("fit")
    full = [b["prompts"] for b in dm.train_dataloader()]
    assert sorted(sum(full, [])) == sorted(f'sign "{w}"' for w in "ABCDEFGH")
    dm = PromptDataModule(prompt_file=str(f), synthetic_prompts=0, batch_size=2)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    first = dm.on_after_batch_transfer(next(it), 0)
    state = dm.state_dict()
    resumed = PromptDataModule(prompt_file=str(f), synthetic_prompts=0, batch_size=2)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    assert [first["prompts"]] + [b["prompts"] for b in resumed.train_dataloader()] == full


def test_predict_loader_keeps_every_prompt(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(f"prompt {i}" for i in range(5)))
    dm = PromptDataModule(prompt_file=str(f), synthetic_prompts=0, batch_size=2)
    dm.setup("predict")
    got = sum((b["prompts"] for b in dm.predict_dataloader()), [])
    assert sorted(got) == [f"prompt {i}" for i in range(5)]


def test_predict_batches_are_in_lockstep_across_ranks(tmp_path):
    from types import SimpleNamespace

    f = tmp_path / "p.txt"
    f.write_text("\n".join(f"prompt {i}" for i in range(5)))
    per_rank = []
    for rank in range(2):  # 5 prompts, batch 2 -> 3 batches; one is split so both ranks run 2 predict steps
        dm = PromptDataModule(prompt_file=str(f), synthetic_prompts=0, batch_size=2)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
        dm.setup("predict")
        per_rank.append([b["prompts"] for b in dm.predict_dataloader()])
    assert [len(r) for r in per_rank] == [2, 2]
    assert sorted(p for r in per_rank for b in r for p in b) == [f"prompt {i}" for i in range(5)]


def test_a_prompt_file_alone_is_the_prompt_set(tmp_path):
    """Unset synthetic_prompts: 256 synthetic prompts without a file, none beside one; explicit numbers add."""
    from data_modules.prompts import default_synthetic_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a sign that says OPEN", "target_text": "OPEN"}\n', encoding="utf-8")
    items = PromptDataModule(prompt_file=str(path)).load_items()
    assert len(items) == 1 and items[0]["prompt"] == "a sign that says OPEN" and items[0]["target_text"] == "OPEN"
    assert len(PromptDataModule().load_items()) == 256
    assert len(PromptDataModule(prompt_file=str(path), synthetic_prompts=3).load_items()) == 4
    assert default_synthetic_prompts(None, 0) == 0
