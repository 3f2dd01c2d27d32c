"""The stage ladder (benchmarks/bench_ladder.py) chains SFT -> make-pairs -> DPO variants -> GRPO variants exactly as a
user runs them (`main.py fit` with the shipped configs and overlays, `lit-ovis make-pairs`, `lit-ovis eval`), each
stage starting from the previous stage's checkpoint. Tiny sizes: this checks the chaining, not the learning
(benchmarks/RESULTS.md has the CPU-scale numbers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

FAST = "--trainer.limit_val_batches=0 --trainer.val_check_interval=null --trainer.logger=true"


def test_ladder_chains_every_stage_from_the_previous_checkpoint(tmp_path):
    from data_modules.synthetic.word_task import WordTaskConfig
    from data_modules.word_data import ensure_word_data
    from lit_ovis.models.autoencoder_training import AutoencoderConfig

    task = WordTaskConfig(en_words=2, zh_words=1, unseen_en_words=1, unseen_zh_words=1, train_samples=16,
                          heldout_samples=6, unseen_samples=3, aspect_ratios=(1.0,))
    ae = AutoencoderConfig(block_out_channels=(8, 8, 8), norm_num_groups=4, steps=2, batch_size=4, stats_images=8)
    data = ensure_word_data(tmp_path / "words", task, ae, log=None)
    run = tmp_path / "ladder"
    cmd = [sys.executable, "benchmarks/bench_ladder.py", "--task-root", str(data.root), "--run", str(run),
           "--sft-steps", "2", "--dpo-steps", "2", "--grpo-steps", "1", "--pairs", "8", "--val-pairs", "4",
           "--heldout", "3", "--unseen", "0", "--sampling-steps", "2", "--dpo-variants", "report",
           "--grpo-variants", "group_std", "--seed", "3",
           "--sft-overrides", f"--data.batch_size=4 --data.val_samples_per_bucket=0 --model.init_args.sampling.steps=2 {FAST}",
           "--dpo-overrides", f"--data.batch_size=2 --model.init_args.sampling.steps=2 {FAST}",
           "--grpo-overrides", "--model.init_args.grpo.rollout.group_size=2 --model.init_args.grpo.rollout.steps=2 "
                               "--model.init_args.grpo.window.size=1 --model.init_args.grpo.update.batch_size=2 --data.batch_size=1 "
                               "--model.init_args.sampling.height=96 --model.init_args.sampling.width=96"]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run / "ladder.json").read_text())
    stages = results["stages"]
    assert list(stages) == ["sft", "dpo_report", "grpo_group_std"]
    for name, stage in stages.items():
        assert stage["heldout"]["images"] == 3 and 0.0 <= stage["heldout"]["brightness"] <= 1.0, name
    # each stage started from the previous one: DPO from the SFT checkpoint, GRPO from the chosen DPO variant
    for name in ("dpo_report",):
        hparams = torch.load(stages[name]["checkpoint"], map_location="cpu", weights_only=False)["hyper_parameters"]
        assert str(hparams["backbone"]["pretrained"] if isinstance(hparams["backbone"], dict) else hparams["backbone"].pretrained) \
            == stages["sft"]["checkpoint"]
    grpo = torch.load(stages["grpo_group_std"]["checkpoint"], map_location="cpu", weights_only=False)["hyper_parameters"]
    backbone = grpo["backbone"] if isinstance(grpo["backbone"], dict) else vars(grpo["backbone"])
    assert backbone["pretrained"] == stages[f"dpo_{results['dpo_chosen']}"]["checkpoint"]
    assert "gain_over_sft" in stages["dpo_report"] and "gain_over_dpo" in stages["grpo_group_std"]
    assert "| sft |" in (run / "ladder.md").read_text()
    for name in stages:  # --seed reaches every stage's run (LightningCLI saves the config it ran)
        assert "seed_everything: 3" in (run / name / "tb" / "config.yaml").read_text(), name
    # a rerun finds every stage done and redoes no training
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    assert again.returncode == 0 and "main.py fit" not in again.stdout and "lit_ovis eval" not in again.stdout


def test_demo_preset_builds_the_demos_task_with_a_larger_heldout_split(tmp_path, monkeypatch):
    import yaml

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_ladder
    import data_modules.word_data as word_data

    seen = {}
    monkeypatch.setattr(word_data, "ensure_word_data", lambda root, task, ae, **kw: seen.update(root=root, task=task, ae=ae, **kw))
    bench_ladder.build_demo_task(tmp_path / "t")
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    want = demo["data"]["init_args"]["task"]
    task = seen["task"]
    assert (task.en_words, task.zh_words, list(task.colours), list(task.aspect_ratios)) == (
        want["en_words"], want["zh_words"], want["colours"], want["aspect_ratios"])
    assert (task.heldout_samples, task.unseen_samples, task.train_samples) == (256, 32, want["train_samples"])
    assert seen["ae"].steps == demo["data"]["init_args"]["autoencoder"]["steps"]
    assert seen["max_sequence_length"] == demo["model"]["init_args"]["encoders"]["max_sequence_length"]
