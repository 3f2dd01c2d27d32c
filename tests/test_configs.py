"""Every shipped config (and strategy overlay) resolves through the CLI, and the 7B stage configs are what the
report trains with: sharded FSDP2, bf16 compute on fp32 master weights, the released architecture."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["demo", "smoke", "pretrain_256", "pretrain_multires", "sft", "dpo", "grpo"]


def resolved(*configs: str) -> dict:
    from lit_ovis.cli.lightning_cli import run

    args = ["fit"] + [a for c in configs for a in ("--config", str(ROOT / "configs" / f"{c}.yaml"))] + ["--print_config"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        run(args)
    assert exit_.value.code in (0, None), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("stage", STAGES)
def test_stage_config_resolves(stage):
    cfg = resolved(stage)
    assert cfg["model"]["class_path"].startswith("lit_ovis.modules.")
    if stage not in ("demo", "smoke"):  # the 7B stages: sharded by default, bf16 compute, fp32 masters and reduction
        args = cfg["model"]["init_args"]
        assert args["backbone"]["preset"] == "ovis-image-7b"
        assert cfg["trainer"]["strategy"]["class_path"] == "lit_ovis.parallel.strategy.AtomicModelParallelStrategy"
        assert cfg["trainer"]["precision"] == "32-true"
        assert (args["parallel"]["param_dtype"], args["parallel"]["reduce_dtype"]) == ("bf16", "fp32")


@pytest.mark.parametrize("overlay", ["fsdp2", "hsdp", "fsdp1_hybrid"])
def test_strategy_overlays_resolve_on_a_stage(overlay):
    cfg = resolved("sft", f"strategy/{overlay}")
    assert cfg["trainer"]["strategy"]["class_path"].startswith("lit_ovis.parallel.strategy.")


STAGE_MODULES = ["lit_ovis.modules.flow_matching.FlowMatchingModule", "lit_ovis.modules.sdpo.SDPOModule",
                 "lit_ovis.modules.grpo.GRPOModule"]


def option_help(class_path: str) -> dict[str, str]:
    """{option: help text} of every init option of a stage module, as LightningCLI builds them (nested config
    dataclasses included), without the config-file options of the groups."""
    import importlib

    from jsonargparse import ArgumentParser, ActionConfigFile

    from lit_ovis.cli.lightning_cli import HELP_FLAGS  # importing the CLI turns on field docstrings as help

    assert HELP_FLAGS

    module, name = class_path.rsplit(".", 1)
    parser = ArgumentParser()
    parser.add_class_arguments(getattr(importlib.import_module(module), name), "model")
    return {a.dest: (a.help or "").strip() for a in parser._actions
            if a.dest.startswith("model.") and not isinstance(a, ActionConfigFile) and "CONFIG" not in (a.metavar or "")}


@pytest.mark.parametrize("class_path", STAGE_MODULES)
def test_every_config_field_of_every_stage_has_help(class_path):
    options = option_help(class_path)
    assert len(options) > 40 and "model.optimizer.lr" in options and "model.parallel.compile" in options
    undocumented = sorted(k for k, text in options.items() if not text)
    assert undocumented == [], f"config fields without a docstring (add one on the line after the field): {undocumented}"


def test_the_help_check_sees_a_missing_docstring(tmp_path, monkeypatch):
    (tmp_path / "undocumented_stage.py").write_text(
        "from dataclasses import dataclass\n\n@dataclass\nclass Knobs:\n    a: int = 1\n    \"\"\"documented\"\"\"\n    b: int = 2\n\n"
        "class Stage:\n    def __init__(self, knobs: Knobs = Knobs()):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    options = option_help("undocumented_stage.Stage")
    assert options["model.knobs.a"] == "documented" and options["model.knobs.b"] == ""


def test_help_after_a_stage_config_describes_every_option(capsys):
    """`python main.py fit --config configs/grpo.yaml --help` shows every GRPO option with its description."""
    from lit_ovis.cli.lightning_cli import run

    with pytest.raises(SystemExit) as exit_:
        run(["fit", "--config", str(ROOT / "configs" / "grpo.yaml"), "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # help wraps lines
    options = option_help("lit_ovis.modules.grpo.GRPOModule")
    grpo = {k: v for k, v in options.items() if k.startswith("model.grpo.")}
    assert len(grpo) >= 30 and "--trainer.max_steps" in out  # the trainer's options are still there
    for option, text in grpo.items():
        assert f"--{option} " in out and " ".join(text.split()) in out, option


@pytest.mark.parametrize("stage", ["sft_lora", "dpo_lora", "grpo_lora"])
def test_lora_configs_train_an_adapter_on_one_gpu(stage):
    cfg = resolved(stage)
    args = cfg["model"]["init_args"]
    assert (cfg["trainer"]["devices"], cfg["trainer"]["strategy"]) == (1, "auto")
    assert args["backbone"]["preset"] == "ovis-image-7b" and args["parallel"]["param_dtype"] == "bf16"
    assert args["lora"]["enabled"] and args["lora"]["base_dtype"] == "bf16" and args["lora"]["rank"] == 64
    if stage == "sft_lora":  # the small-scale overlay keeps the adapter (the header's tiny command; ran by hand)
        tiny = resolved(stage, "tiny")["model"]["init_args"]
        assert tiny["lora"]["enabled"] and tiny["backbone"]["preset"] == "tiny"


def test_word_task_sft_config_resolves_with_its_autoencoder_and_text_length():
    cfg = resolved("words_sft")
    encoders = cfg["model"]["init_args"]["encoders"]
    assert (encoders["vae"], encoders["text_encoder"], encoders["max_sequence_length"], encoders["template_cut"]) == (
        "data/words/autoencoder", "tiny", 104, "template")
    assert cfg["data"]["init_args"]["root"] == "data/words/latents" and cfg["trainer"]["accelerator"] == "cpu"
