"""Every shipped config (and strategy overlay) resolves through the CLI, and the 7B stage configs are what the
report trains with: sharded FSDP2, bf16 compute on fp32 master weights, the released architecture."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["demo", "pretrain_256", "pretrain_multires", "sft", "dpo", "grpo"]


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
    if stage != "demo":  # the 7B stages: sharded by default, bf16 compute, fp32 masters and reduction
        args = cfg["model"]["init_args"]
        assert args["backbone"]["preset"] == "ovis-image-7b"
        assert cfg["trainer"]["strategy"]["class_path"] == "lit_ovis.parallel.strategy.AtomicModelParallelStrategy"
        assert cfg["trainer"]["precision"] == "32-true"
        assert (args["parallel"]["param_dtype"], args["parallel"]["reduce_dtype"]) == ("bf16", "fp32")


@pytest.mark.parametrize("overlay", ["fsdp2", "hsdp", "fsdp1_hybrid"])
def test_strategy_overlays_resolve_on_a_stage(overlay):
    cfg = resolved("sft", f"strategy/{overlay}")
    assert cfg["trainer"]["strategy"]["class_path"].startswith("lit_ovis.parallel.strategy.")
