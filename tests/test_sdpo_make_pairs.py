"""`lit-ovis make-pairs`: score normalisation, winner/loser selection with a margin, LitData output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lit_ovis.cli.make_pairs import PairsConfig, combine_scores, make_pairs, normalise_scores, parse_weights, select_pairs


def test_score_helpers_hand_values():
    assert parse_weights("ocr=1,clip=0.5") == {"ocr": 1.0, "clip": 0.5}
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(normalise_scores(x, "zscore"), (x - 2.5) / x.std(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normalise_scores(torch.tensor([3.0, 1.0, 2.0]), "rank"), torch.tensor([1.0, 0.0, 0.5]))
    # scorer "a" on a scale of thousands, "b" in [0, 1]: after z-scoring both count by their weights
    raw = {"a": torch.tensor([1000.0, 3000.0]), "b": torch.tensor([1.0, 0.0])}
    z = 0.5 / torch.tensor([0.0, 1.0]).std()  # unbiased z-score of a two-element pool: +-0.7071
    expected = torch.tensor([-z + 2.0 * z, z - 2.0 * z])
    torch.testing.assert_close(combine_scores(raw, {"a": 1.0, "b": 2.0}, "zscore"), expected, rtol=1e-5, atol=1e-5)
    keep, ref_wins = select_pairs(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.45]), min_margin=0.1)
    assert keep.tolist() == [True, True, False] and ref_wins.tolist()[:2] == [True, False]


def brightness(images, prompts, metadata):
    """Test scorer: mean brightness, except a constant for prompts marked 'tie' (no preference)."""
    s = images.float().mean(dim=(1, 2, 3))
    tie = torch.tensor(["tie" in p for p in prompts])
    return torch.where(tie, torch.full_like(s, 0.5), s)


def test_make_pairs_end_to_end(tmp_path):
    from data_modules.records import records_from_folder
    from lit_ovis.models.backbone import build_backbone
    from lit_ovis.models.text_encoder import build_text_encoder
    from lit_ovis.models.vae import build_vae

    pool = tmp_path / "pool"
    pool.mkdir()
    # white references beat a random model's output on brightness, black ones lose, 'tie' ones are dropped
    specs = [("white_a", 255, "a white square"), ("white_b", 250, "a bright card"), ("black_a", 0, "a black square"),
             ("black_b", 5, "a dark card"), ("tie_a", 128, "tie grey"), ("tie_b", 120, "tie grey two")]
    for name, value, caption in specs:
        Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(pool / f"{name}.png")
        (pool / f"{name}.txt").write_text(caption)
    torch.manual_seed(0)
    models = (build_backbone("tiny").eval(), build_text_encoder("tiny", 8), build_vae("tiny"))
    cfg = PairsConfig(output_dir=str(tmp_path / "pairs"), resolution=32, steps=2, guidance_scale=1.0, batch_size=4,
                      scorers="bright=1.0", normalise="none", min_margin=0.05, store_prompt_embeds=True,
                      storage_dtype="float32", device="cpu", max_sequence_length=8)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = make_pairs(records_from_folder(pool), cfg, scorers={"bright": brightness}, models=models, progress=False)
    finally:
        torch.set_num_threads(n)
    assert report["prompts"] == 6 and report["pairs"] == 4 and report["dropped_small_margin"] == 2
    assert report["reference_wins"] == 2 and report["generated_wins"] == 2
    assert json.loads((tmp_path / "pairs" / "report.json").read_text())["buckets"] == {"32x32": 4}

    from litdata import StreamingDataset

    ds = StreamingDataset(str(tmp_path / "pairs" / "32" / "32x32"))
    items = {it["id"]: it for it in (ds[i] for i in range(len(ds)))}
    assert set(items) == {"white_a.png", "white_b.png", "black_a.png", "black_b.png"}
    vae = models[2]
    for name, value, caption in specs[:4]:
        it = items[f"{name}.png"]
        assert it["latents_w"].shape == it["latents_l"].shape == (16, 4, 4)
        assert it["caption"] == caption and it["prompt_embeds"].ndim == 2
        assert it["score_w"] - it["score_l"] == pytest.approx(it["margin"]) and it["margin"] >= 0.05
        # the reference image's own latents sit on the side the scorer prefers
        ref_latents = vae.encode(torch.full((1, 3, 32, 32), value / 255.0) * 2 - 1)[0]
        side = "latents_w" if value > 128 else "latents_l"
        assert it["winner"] == ("reference" if value > 128 else "generated")
        torch.testing.assert_close(it[side], ref_latents, atol=1e-4, rtol=1e-4)


def test_scorers_come_from_the_scoring_registry():
    from lit_ovis.cli.make_pairs import build_scorers
    from lit_ovis.errors import ConfigError

    fns = build_scorers(PairsConfig(output_dir="unused", scorers="brightness=1.0"))
    images = torch.stack([torch.ones(3, 16, 16), torch.zeros(3, 16, 16)])
    s = fns["brightness"](images, ["a", "b"], [{}, {}])
    assert s[0] > s[1]
    with pytest.raises(ConfigError, match="scorer"):
        build_scorers(PairsConfig(output_dir="unused", scorers="no_such_scorer=1"))
