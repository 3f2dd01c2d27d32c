"""One option moves a run: `--trainer.default_root_dir` relocates its logs, sample grids and checkpoints, and
rerunning the same command resumes from the moved checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from helpers import ROOT, torch_threads

# Output locations a shipped config must leave to default_root_dir.
OUTPUT_KEYS = ("dirpath", "save_dir", "output_dir", "log_dir", "path")


def _output_paths(node, where=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in OUTPUT_KEYS and isinstance(v, str):
                yield f"{where}.{k}", v
            yield from _output_paths(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _output_paths(v, f"{where}[{i}]")


def test_shipped_configs_name_no_output_path_but_default_root_dir():
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer") or {}
        assert not list(_output_paths(trainer)), f"{config.name}: {list(_output_paths(trainer))}"


def test_default_root_dir_moves_logs_grids_and_checkpoints_and_the_rerun_resumes(tmp_path, monkeypatch):
    """The shipped demo config, moved by one option; everything relative would land in the working directory."""
    from lit_ovis.cli.lightning_cli import run
    from lit_ovis.resume import resolve_ckpt_path

    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "elsewhere" / "demo"
    with torch_threads(1):
        cli = run(["fit", "--config", str(ROOT / "configs" / "smoke.yaml"), f"--trainer.default_root_dir={moved}",
                   "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                   "--model.sampling.steps=1", "--model.sampling.height=32", "--model.sampling.width=32",
                   "--model.encoders.max_sequence_length=8", f"--data.root={tmp_path / 'data'}", "--data.synthetic_samples=4",
                   "--data.synthetic_resolution=32", "--data.batch_size=2", "--data.num_workers=0",
                   "--data.val_samples_per_bucket=0"])
    last = moved / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    assert list((moved / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (moved / "tb" / "samples").glob("*.png")) == ["step_0000000.png", "step_0000002.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "elsewhere"]  # nothing in runs/smoke or lightning_logs
    # What rerunning the same command does before it trains (`OvisCLI._resolve_ckpt_path`): resume from there,
    # logging into the same, unversioned TensorBoard folder.
    assert resolve_ckpt_path(cli.trainer) == str(last)
    assert Path(cli.trainer.logger.log_dir) == moved / "tb"
