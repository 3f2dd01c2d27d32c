"""Synthetic preference pairs: same layout, correct vs misspelled text, one bucket per batch."""

from __future__ import annotations

import json

from data_modules.preference import PreferenceDataModule, build_synthetic_pairs
from data_modules.synthetic.engine import TextRenderingEngine


def test_corrupted_text_keeps_layout_and_differs():
    engine = TextRenderingEngine(seed=0)
    good = engine.render(3)
    bad_text = engine.corrupt(good.text, 1)
    bad = engine.render(3, language=good.language, text=bad_text)
    assert bad_text != good.text
    assert (bad.layout, bad.background, bad.image.size) == (good.layout, good.background, good.image.size)
    assert bad.image.tobytes() != good.image.tobytes()


def test_pair_batches(tmp_path):
    build_synthetic_pairs(str(tmp_path), 16, resolution=64, progress=False)
    # Same layout and reports as `prepare`: per-resolution report plus the root listing every resolution.
    per_res = json.loads((tmp_path / "64" / "report.json").read_text())
    root = json.loads((tmp_path / "report.json").read_text())
    assert sum(per_res["buckets"].values()) == 16 and root["resolutions"]["64"]["buckets"] == per_res["buckets"]
    dm = PreferenceDataModule(root=str(tmp_path), batch_size=2, num_workers=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert batches
    for b in batches:
        assert b["latents_w"].shape == b["latents_l"].shape and b["latents_w"].shape[0] == 2
        assert not (b["latents_w"] == b["latents_l"]).all()
        assert b["prompt_embeds"].shape[0] == 2
        assert all(f'"{t}"' in c for t, c in zip(b["target_texts"], b["captions"]))
