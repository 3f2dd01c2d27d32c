"""EMA keyed by canonical parameter names: wrappers added after it (checkpoint wrappers, torch.compile)
do not break it; FSDP1 (flat-sharded parameters) is refused with one line naming the option."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from lit_ovis.ema import EMA, canonical_name
from lit_ovis.errors import ConfigError
from lit_ovis.models.backbone import build_backbone


def test_canonical_name_strips_wrapper_prefixes():
    name = "transformer_blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.to_q.weight"
    assert canonical_name(name) == "transformer_blocks.0.attn.to_q.weight"
    assert canonical_name("_orig_mod.proj_out.weight") == "proj_out.weight"


def test_ema_tracks_a_model_wrapped_after_it_was_made():
    model = build_backbone("tiny")
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, decay=0.5)
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)  # what FSDPStrategy's activation_checkpointing_policy does
    compiled = torch.compile(model)  # not run: only adds the `_orig_mod.` prefix
    names = [n for n, _ in compiled.named_parameters()]
    assert all(n.startswith("_orig_mod.") for n in names) and any("_checkpoint_wrapped_module" in n for n in names)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(compiled)
    shadow = ema.shadow_state_dict()
    assert set(shadow) == set(init)  # canonical names = the diffusers keys the checkpoint and export use
    assert all(torch.allclose(shadow[k], init[k] + 0.5) for k in init)
    live = {canonical_name(n): p for n, p in compiled.named_parameters()}
    with ema.swapped_into(compiled):
        assert all(torch.equal(live[k], shadow[k]) for k in shadow)
    assert all(torch.equal(live[k], init[k] + 1.0) for k in shadow)


def test_fsdp1_strategy_refuses_ema():
    from lit_ovis.modules.config import EMAConfig
    from lit_ovis.parallel.strategy import OvisFSDPStrategy

    from helpers import tiny_flow_module

    strategy = OvisFSDPStrategy()
    strategy._lightning_module = tiny_flow_module(ema=EMAConfig(enabled=True))
    with pytest.raises(ConfigError, match="model.ema.enabled") as err:
        strategy.setup(trainer=None)
    assert "\n" not in str(err.value) and "fsdp2.yaml" in str(err.value)
