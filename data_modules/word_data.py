"""Everything a CPU-scale run on the word task trains from, in one folder, each step cached:

    <root>/task.json, images/, train.jsonl, heldout.jsonl, unseen.jsonl   `lit-ovis word-task`
    <root>/autoencoder/                                                  `lit-ovis train-autoencoder`
    <root>/latents/<resolution>/<WxH>/                                   `lit-ovis prepare --manifest train.jsonl`

`ensure_word_data` runs the three steps as the commands would; a rerun with the same settings does no work.
The root belongs to this flow: when the task's settings change, its autoencoder is retrained in place
(`overwrite`) and the latents are prepared again (prepare's cache key includes the autoencoder's files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data_modules.ranks import ShardSpec
from data_modules.synthetic.word_task import WordTaskConfig, build_word_task
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
