"""`EncoderConfig.template_cut`: the tiny byte-level tokenizer spells the Ovis template in 140 tokens, not Qwen's 28.

"pipeline" (the default) keeps OvisImagePipeline's fixed cut; "template" cuts the tokenizer's own template length, so
the text tokens start at the caption. Prepare, the data module, the stage modules and `load_module` agree on it.
"""

from __future__ import annotations

import pytest
import torch

from lit_ovis.errors import ConfigError, DataError
from lit_ovis.models.text_encoder import (OVIS_PREFIX_TOKENS, build_text_encoder, format_prompts, load_tokenizer,
                                          prefix_tokens_for, prompt_token_ids, template_prefix_tokens)

CAPTION = '"BEST" on a poster in black letters on a white solid background'


def test_template_length_is_measured_on_the_tokenizer():
    tokenizer = load_tokenizer("tiny")
    ids = tokenizer(format_prompts(tokenizer, [CAPTION]), add_special_tokens=False)["input_ids"][0]
    n = template_prefix_tokens(tokenizer)
    assert n == 140  # "<|im_start|>user\n" (1 + 5 bytes) + the 134-byte system prompt
    assert tokenizer.decode(ids[n:n + len(CAPTION)]) == CAPTION
    assert prefix_tokens_for(tokenizer, "pipeline") == OVIS_PREFIX_TOKENS
    with pytest.raises(ConfigError, match="template_cut"):
        prefix_tokens_for(tokenizer, "none")


def test_template_cut_keeps_the_pipeline_states_from_the_caption_on():
    """Qwen3 is causal: cutting 112 more positions gives the same hidden states as the pipeline cut, shifted."""
    pipeline = build_text_encoder("tiny", 216)
    caption_only = build_text_encoder("tiny", 104, template_cut="template")
    assert caption_only.prefix_tokens == 140
    full, cut = pipeline.encode([CAPTION, "x"]), caption_only.encode([CAPTION, "x"])
    assert cut.shape == (2, 104, full.shape[-1])
    torch.testing.assert_close(cut, full[:, 112:216], rtol=1e-5, atol=1e-5)
    # stored tokens (prepare --text-storage tokens) encode to the same embeddings
    ids = prompt_token_ids(caption_only.tokenizer, [CAPTION], 104, caption_only.prefix_tokens)
    tokens = torch.tensor(ids, dtype=torch.int32)
    torch.testing.assert_close(caption_only.encode_tokens(tokens, torch.tensor([len(ids[0])])), cut[:1])


def _prepare(root, cut: str):
    from data_modules.prepare import PrepareConfig, prepare
    from data_modules.ranks import ShardSpec
    from data_modules.records import synthetic_records

    cfg = PrepareConfig(output_dir=str(root), resolution=64, min_side=64, text_encoder="tiny", vae="tiny",
                        max_sequence_length=96, template_cut=cut, num_workers=1, shard_size=8)
    return prepare(synthetic_records(4), cfg, progress=False, shard=ShardSpec())


def test_prepared_embeddings_follow_the_cut_and_training_refuses_a_mismatch(tmp_path):
    from data_modules.streaming import LatentDataModule
    from lit_ovis.modules.config import EncoderConfig
    from lit_ovis.modules.flow_matching import FlowMatchingModule

    _prepare(tmp_path / "cut", "template")
    module = FlowMatchingModule(encoders=EncoderConfig(max_sequence_length=96, template_cut="template"))
    dm = LatentDataModule(root=str(tmp_path / "cut"), batch_size=1, num_workers=0, resolutions=[64], val_samples_per_bucket=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.build_frozen()
    expected = module.text_encoder.encode(batch["captions"])
    stored = module.embed_prompts(batch)
    torch.testing.assert_close(stored, expected, rtol=2e-3, atol=2e-3)  # float16 on disk

    class _Trainer:  # the data module asks its model for the encoders
        lightning_module = FlowMatchingModule(encoders=EncoderConfig(max_sequence_length=96))
    dm.trainer = _Trainer()
    buckets = sorted(str(p) for p in (tmp_path / "cut" / "64").iterdir() if p.is_dir())
    with pytest.raises(DataError, match="template_cut=template but the model uses pipeline"):
        dm._check_template_cut(buckets)  # what setup() runs first when a model is attached


def test_prepare_cache_keys_of_the_default_are_unchanged(tmp_path):
    """Adding the option must not invalidate every dataset prepared before it (the default adds no key)."""
    from data_modules.prepare import PrepareConfig, _record_fields

    base = dict(output_dir=str(tmp_path), text_encoder="tiny")
    assert "template_cut" not in _record_fields(PrepareConfig(**base))
    assert _record_fields(PrepareConfig(**base, template_cut="template"))["template_cut"] == "template"
    with pytest.raises(ConfigError, match="--template-cut"):
        PrepareConfig(**base, template_cut="all").check()
