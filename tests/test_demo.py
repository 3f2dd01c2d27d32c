"""The demo (configs/demo.yaml, scripts/demo.sh) at a tiny size: the word-task data module builds the task, its
autoencoder and the latents on first use, training runs in that latent space, and the last line printed is the
OCR word accuracy of samples for the held-out prompts. Tiny sizes check the wiring; the demo's own numbers
(0.844 after 500 steps) are in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, run_main


def tiny_demo_config(tmp_path: Path) -> Path:
    """configs/demo.yaml with its data and outputs under tmp_path and every size cut down to seconds."""
    text = (ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8")
    cfg = yaml.safe_load(text.replace("data/demo", str(tmp_path / "data")).replace("runs/demo", str(tmp_path / "run")))
    cfg["trainer"].update(max_steps=2, val_check_interval=2, log_every_n_steps=1)
    task = cfg["data"]["init_args"]["task"]
    task.update(en_words=2, zh_words=1, train_samples=24, heldout_samples=6, unseen_samples=3)
    cfg["data"]["init_args"]["autoencoder"] = {"block_out_channels": [8, 8, 8], "norm_num_groups": 4, "steps": 2,
                                               "batch_size": 4, "stats_images": 8, "threads": 1}
    cfg["data"]["init_args"].update(batch_size=4, val_samples_per_bucket=2)
    cfg["model"]["init_args"]["sampling"]["steps"] = 2
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("SampleGridLogger"):
            cb["init_args"]["every_n_steps"] = 2
        if cb["class_path"].endswith("EvalCallback"):
            cb["init_args"]["limit"] = 3
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def test_demo_builds_its_decodable_space_trains_and_prints_ocr_accuracy_last(tmp_path):
    proc = run_main("fit", "--config", str(tiny_demo_config(tmp_path)), "--trainer.enable_progress_bar=false",
                    timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = tmp_path / "data"
    task = json.loads((data / "task.json").read_text())
    assert task["config"]["colours"] == ["black", "white"] and task["sizes"] == [[128, 32]]
    assert (data / "autoencoder" / "config.json").exists() and (data / "latents" / "64" / "128x32").is_dir()
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("eval at step 2: OCR word accuracy "), proc.stdout[-2000:]
    assert "(3 samples" in last and "heldout.jsonl" in last
    assert (tmp_path / "run" / "tb" / "samples" / "step_0000002.png").exists()
    # a rerun finds the data built and the run finished: nothing is trained again
    again = run_main("fit", "--config", str(tmp_path / "demo.yaml"), "--trainer.enable_progress_bar=false",
                     timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0 and "autoencoder step" not in again.stdout + again.stderr


def test_word_task_data_module_refuses_a_model_that_decodes_with_another_vae(tmp_path):
    from data_modules.word_data import WordTaskDataModule
    from lit_ovis.errors import ConfigError

    dm = WordTaskDataModule(task_root=str(tmp_path / "task"))
    with pytest.raises(ConfigError, match=r"--model.encoders.vae=.*task/autoencoder"):
        dm.synthetic_builder()  # no trainer: the model's encoders are the defaults (the tiny random VAE)


def test_preflight_lets_the_demo_start_before_its_data_exists_but_not_other_missing_files(tmp_path):
    from lit_ovis.preflight import check_config

    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8").replace("data/demo", str(tmp_path / "d")))
    check_config(cfg, this_machine=False)  # the VAE and the held-out prompts are built by the data module
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("EvalCallback"):
            cb["init_args"]["prompt_file"] = str(tmp_path / "elsewhere.jsonl")
    with pytest.raises(Exception, match="elsewhere.jsonl' does not exist"):
        check_config(cfg, this_machine=False)
