"""Everything a CPU-scale run on the word task trains from, in one folder, each step cached:

    <root>/task.json, images/, train.jsonl, heldout.jsonl, unseen.jsonl   `lit-ovis word-task`
    <root>/autoencoder/                                                  `lit-ovis train-autoencoder`
    <root>/latents/<resolution>/<WxH>/                                   `lit-ovis prepare --manifest train.jsonl`

`ensure_word_data` runs the three steps as the commands would; a rerun with the same settings does no work.
`WordTaskDataModule` runs it on first use and trains from the result (the demo, configs/demo.yaml).
The root belongs to this flow: when the task's settings change, its autoencoder is retrained in place
(`overwrite`) and the latents are prepared again (prepare's cache key includes the autoencoder's files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data_modules.ranks import ShardSpec
from data_modules.streaming import LatentDataModule
from data_modules.synthetic.word_task import WordTaskConfig, build_word_task
from lit_ovis.errors import ConfigError
from lit_ovis.models.autoencoder_training import AutoencoderConfig, ensure_autoencoder


@dataclass
class WordData:
    root: Path
    autoencoder: Path
    latents: Path
    manifests: dict[str, Path] = field(default_factory=dict)
    reports: dict[str, dict] = field(default_factory=dict)


def ensure_word_data(root: str | Path, task: WordTaskConfig | None = None, autoencoder: AutoencoderConfig | None = None,
                     text_encoder: str = "tiny", max_sequence_length: int = 104, template_cut: str = "template", log: Callable[[str], None] | None = print) -> WordData:
    """Render the task, train (or reuse) its autoencoder and prepare the training split's latents with text
    embeddings, under `root`. Returns the paths a config needs (`--model.encoders.vae`, `--data.root`, ...)."""
    from data_modules.prepare import PrepareConfig, prepare
    from data_modules.records import records_from_manifest

    task = task or WordTaskConfig()
    autoencoder = autoencoder or AutoencoderConfig()
    root = Path(root)
    task_report = build_word_task(task, root, progress=log is not None)
    manifests = {split: root / f"{split}.jsonl" for split in ("train", "heldout", "unseen")}
    ae_folder, ae_report = ensure_autoencoder(autoencoder, manifests["train"], root / "autoencoder", overwrite=True, log=log)
    min_side = min(min(size) for size in task_report["sizes"])
    cfg = PrepareConfig(output_dir=str(root / "latents"), resolution=task.resolution, min_side=min_side, dedup=False,
                        vae=str(ae_folder), text_encoder=text_encoder, max_sequence_length=max_sequence_length,
                        template_cut=template_cut, num_workers=min(2, os.cpu_count() or 1), shard_size=256)
    latents_report = prepare(records_from_manifest(manifests["train"]), cfg, progress=log is not None, shard=ShardSpec())  # one process, whatever the launcher
    return WordData(root, ae_folder, root / "latents", manifests,
                    {"task": task_report, "autoencoder": ae_report, "latents": latents_report})


class WordTaskDataModule(LatentDataModule):
    """The word task as a training set that builds itself (the demo's data): on first use global rank 0 renders
    the task, trains its autoencoder and prepares the training split's latents under `task_root`, each step
    cached (`ensure_word_data`), then batches are read from `<task_root>/latents` as `LatentDataModule` reads
    them. The model must encode and decode with that autoencoder: `--model.encoders.vae <task_root>/autoencoder`.

    Args:
        task_root: folder of the task, its autoencoder and its latents (built on first use, reused after).
        task: the word task's settings (vocabulary, sizes, layouts, colours, captions).
        autoencoder: the settings its autoencoder is trained with.
        batch_size: samples per batch and rank; every batch holds one aspect-ratio bucket.
        num_workers: DataLoader worker processes per rank (0 reads in the training process: the demo's data is
            a few MiB, and a worker would compete with training for 2 CPU cores).
        seed: seed of the batch plan (shuffle, validation hold-out).
        val_samples_per_bucket: samples per bucket held out of training for validation.
        build_timeout_s: how long the other ranks wait for rank 0 to build the task.
        worker_timeout_s: a DataLoader worker that produces no batch for this long fails the run with one line.
    """

    def __init__(self, task_root: str = "data/demo", task: WordTaskConfig = WordTaskConfig(),
                 autoencoder: AutoencoderConfig = AutoencoderConfig(), batch_size: int = 16, num_workers: int = 0,
                 seed: int = 0, val_samples_per_bucket: int = 0, build_timeout_s: float = 3600.0, worker_timeout_s: float = 600.0):
        task.check()
        autoencoder.check()
        super().__init__(root=str(Path(task_root) / "latents"), batch_size=batch_size, num_workers=num_workers, seed=seed,
                         resolutions=[task.resolution], val_samples_per_bucket=val_samples_per_bucket,
                         build_timeout_s=build_timeout_s, worker_timeout_s=worker_timeout_s)
        self.task_root, self.task, self.autoencoder_cfg = Path(task_root), task, autoencoder

    def synthetic_builder(self) -> Callable[[], WordData]:
        enc = self.encoders()
        want = self.task_root / "autoencoder"
        if enc["vae"] is None or os.path.abspath(str(enc["vae"])) != os.path.abspath(want):
            raise ConfigError(f"--data.task_root {self.task_root} trains its own autoencoder in {want}, but the model decodes "
                              f"with {enc['vae']!r}: set --model.encoders.vae={want}")
        return lambda: ensure_word_data(self.task_root, self.task, self.autoencoder_cfg, text_encoder=enc["text_encoder"],
                                        max_sequence_length=enc["max_sequence_length"], template_cut=enc["template_cut"])
