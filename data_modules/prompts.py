"""Prompt datasets for GRPO rollouts, `predict` and evaluation: EN + ZH text-rendering prompts with the
target text as metadata, from the synthetic engine (no rendering needed) and/or user files (JSONL with
prompt / target_text / language, CVTG-2K / LongText-Bench JSON, GenEval metadata, or .txt).

Batches: `{"prompts": [...], "target_texts": [...], "languages": [...], "ids": [...]}`; sharded over ranks
and resumable mid-epoch with the same batch-plan machinery as the latent datasets.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

from torch.utils.data import DataLoader, Dataset

from data_modules.streaming import VAL_EPOCH, BucketBatchSampler, FixedBatchSampler, LatentDataModule, lockstep_batches, plan_digest
from lit_ovis.errors import DataError


def synthetic_prompts(n: int, seed: int = 0, zh_fraction: float = 0.4) -> list[dict[str, Any]]:
    """Text-rendering prompts quoting a target text, drawn like the synthetic engine draws its captions."""
    from data_modules.synthetic.engine import LAYOUTS, TextRenderingEngine

    engine = TextRenderingEngine.__new__(TextRenderingEngine)  # text and captions only: no fonts needed
    out = []
    for i in range(n):
        rng = random.Random(f"prompt-{seed}-{i}")
        language = "zh" if rng.random() < zh_fraction else "en"
        layout = rng.choice(LAYOUTS)
        text = TextRenderingEngine._text(engine, rng, language, layout)
        from data_modules.synthetic.vocab import COLOURS

        fg, bg = rng.sample(sorted(COLOURS), 2)
        caption = TextRenderingEngine.caption(rng, text, language, layout, rng.choice(["solid", "gradient", "noise", "texture"]), fg, bg)
        out.append({"id": f"prompt-{i:07d}", "prompt": caption, "target_text": text, "language": language})
    return out


class PromptList(Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        epoch, consumed, steps, _, i = key
        item = dict(self.items[i])
        if epoch != VAL_EPOCH:  # training progress travels with the batch; predict batches carry none
            item["_progress"] = (epoch, consumed, steps)
        return item


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    out = {
        "prompts": [x["prompt"] for x in items], "target_texts": [x.get("target_text", "") for x in items],
        "languages": [x.get("language", "en") for x in items], "ids": [x.get("id", "") for x in items],
        "seeds": [zlib.crc32(str(x.get("id", "")).encode()) % (2**31) for x in items],  # stable across processes
    }
    if "_progress" in items[0]:
        out["_progress"] = items[0]["_progress"]
    return out


def default_synthetic_prompts(prompt_file: str | None, synthetic_prompts: int | None) -> int:
    """Unset: 256 synthetic EN/ZH prompts without a prompt file, none beside one (a user's file is the
    prompt set, e.g. for `predict`); an explicit number adds that many in both cases."""
    if synthetic_prompts is not None:
        return int(synthetic_prompts)
    return 0 if prompt_file else 256


class PromptDataModule(LatentDataModule):
    def __init__(self, prompt_file: str | None = None, synthetic_prompts: int | None = None, batch_size: int = 1, num_workers: int = 0,
                 seed: int = 0, zh_fraction: float = 0.4, limit: int | None = None):
        super().__init__(root="", batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.prompt_file, self.zh_fraction, self.limit = prompt_file, zh_fraction, limit
        self.n_synthetic = default_synthetic_prompts(prompt_file, synthetic_prompts)

    def load_items(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        if self.prompt_file:
            from lit_ovis.scoring.prompt_sets import read_prompt_set

            items += read_prompt_set(self.prompt_file, self.limit)
        if self.n_synthetic:
            items += synthetic_prompts(self.n_synthetic, self.seed, self.zh_fraction)
        if not items:
            raise DataError("no prompts: set --data.prompt_file or --data.synthetic_prompts > 0")
        return items

    def setup(self, stage: str) -> None:
        items = self.load_items()
        rank, world = self._rank_world()
        self.dataset = PromptList(items)
        self.sampler = BucketBatchSampler([len(items)], self.batch_size, self.seed, rank, world)
        self.plan_id = plan_digest(["prompts"], self.sampler.pools, self.batch_size, self.seed)
        if stage == "fit" and not len(self.sampler):
            raise DataError(f"{len(items)} prompts are fewer than --data.batch_size={self.batch_size} x {world} ranks")
        self._apply_resume(self._resume if self._resume is not None else self.consumed)

    def _loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers, collate_fn=collate_prompts)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        # Every prompt exactly once, in file order, and the same number of batches on every rank.
        rank, world = self._rank_world()
        sampler = FixedBatchSampler(lockstep_batches([len(self.dataset)], self.batch_size, world), rank, world)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate_prompts)
