"""`lit-ovis make-pairs`: score normalisation, winner/loser selection with a margin, LitData output, streaming
through the records, and resuming a killed run without redoing finished prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.layout import work_dir
from data_modules.make_pairs import PairsConfig, make_pairs, parse_weights, select_pairs
from lit_ovis.scoring.ensemble import combine as combine_scores, normalise as normalise_scores


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


SPECS = [("white_a", 255, "a white square"), ("white_b", 250, "a bright card"), ("black_a", 0, "a black square"),
         ("black_b", 5, "a dark card"), ("tie_a", 128, "tie grey"), ("tie_b", 120, "tie grey two")]


def _pool(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    # white references beat a random model's output on brightness, black ones lose, 'tie' ones are dropped
    for name, value, caption in SPECS:
        Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(pool / f"{name}.png")
        (pool / f"{name}.txt").write_text(caption)
    return pool


def _models():
    from lit_ovis.models.backbone import build_backbone
    from lit_ovis.models.text_encoder import build_text_encoder
    from lit_ovis.models.vae import build_vae

    torch.manual_seed(0)
    return build_backbone("tiny").eval(), build_text_encoder("tiny", 8), build_vae("tiny")


def _cfg(out, batch_size=4):
    return PairsConfig(output_dir=str(out), resolution=32, steps=2, guidance_scale=1.0, batch_size=batch_size,
                       scorers="bright=1.0", normalise="none", min_margin=0.05, store_prompt_embeds=True,
                       storage_dtype="float32", device="cpu", max_sequence_length=8)


def _items(root):
    from litdata import StreamingDataset

    ds = StreamingDataset(str(root / "32" / "32x32"))
    return {it["id"]: it for it in (ds[i] for i in range(len(ds)))}


def test_make_pairs_end_to_end(tmp_path, one_thread):
    from data_modules.records import records_from_folder

    pool = _pool(tmp_path)
    models = _models()
    cfg = _cfg(tmp_path / "pairs")
    report = make_pairs(records_from_folder(pool), cfg, scorers={"bright": brightness}, models=models, progress=False)
    specs = SPECS
    assert report["prompts"] == 6 and report["pairs"] == 4 and report["dropped_small_margin"] == 2
    assert report["reference_wins"] == 2 and report["generated_wins"] == 2
    assert json.loads((tmp_path / "pairs" / "32" / "report.json").read_text())["buckets"] == {"32x32": 4}
    assert json.loads((tmp_path / "pairs" / "report.json").read_text())["buckets"] == {"32/32x32": 4}  # root: every resolution
    assert not work_dir(tmp_path / "pairs", cfg.resolution).exists()  # work shards are removed after a finished run
    items = _items(tmp_path / "pairs")
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


def test_scorers_come_from_the_scoring_ensemble():
    from data_modules.make_pairs import build_ensemble
    from lit_ovis.errors import ConfigError
    from lit_ovis.scoring import ScorerEnsemble

    ens = build_ensemble(PairsConfig(output_dir="unused", scorers="brightness=2.0,contrast=1", normalise="zscore"))
    assert isinstance(ens, ScorerEnsemble) and ens.weights == {"brightness": 2.0, "contrast": 1.0}
    images = torch.stack([torch.ones(3, 16, 16), torch.zeros(3, 16, 16)])
    raw, _ = ens.components(images, ["a", "b"], [{}, {}])
    assert raw["brightness"][0] > raw["brightness"][1]
    # the pool-level combination is the ensemble's own
    torch.testing.assert_close(ens.combine(raw), combine_scores(raw, ens.weights, "zscore"))
    with pytest.raises(ConfigError, match="scorer"):
        build_ensemble(PairsConfig(output_dir="unused", scorers="no_such_scorer=1"))


def test_make_pairs_streams_records(tmp_path, one_thread):
    """The pool is consumed lazily: the first batch is generated and scored before later records are read."""
    from data_modules.records import records_from_folder

    records = records_from_folder(_pool(tmp_path))
    read = []

    def lazy():
        for r in records:
            read.append(r.id)
            yield r

    seen_at_first_score = []

    def scorer(images, prompts, metadata):
        seen_at_first_score.append(len(read))
        return brightness(images, prompts, metadata)

    make_pairs(lazy(), _cfg(tmp_path / "pairs", batch_size=2), scorers={"bright": scorer}, models=_models(), progress=False)
    assert seen_at_first_score[0] == 2 and len(read) == len(SPECS)


def test_make_pairs_resumes_after_a_kill(tmp_path, one_thread):
    from data_modules.records import records_from_folder

    pool = _pool(tmp_path)
    models = _models()
    reference = make_pairs(records_from_folder(pool), _cfg(tmp_path / "full", 2), scorers={"bright": brightness},
                           models=models, progress=False)
    scored: list[str] = []

    def killed_after_two_batches(images, prompts, metadata):
        if len(scored) >= 4:  # two batches of two prompts are finished, then the process "dies"
            raise KeyboardInterrupt
        scored.extend(prompts[: len(prompts) // 2])
        return brightness(images, prompts, metadata)

    out = tmp_path / "pairs"
    with pytest.raises(KeyboardInterrupt):
        make_pairs(records_from_folder(pool), _cfg(out, 2), scorers={"bright": killed_after_two_batches}, models=models, progress=False)
    assert len(list(work_dir(out, 32).glob("shard-*.pt"))) == 2 and not (out / "report.json").exists()

    resumed: list[str] = []

    def counting(images, prompts, metadata):
        resumed.extend(prompts[: len(prompts) // 2])
        return brightness(images, prompts, metadata)

    report = make_pairs(records_from_folder(pool), _cfg(out, 2), scorers={"bright": counting}, models=models, progress=False)
    assert len(resumed) == 2 and not set(resumed) & set(scored)  # only the unfinished prompts were redone
    assert report["resumed_prompts"] == 4 and report["prompts"] == 6
    for key in ("pairs", "dropped_small_margin", "reference_wins", "generated_wins", "buckets"):
        assert report[key] == reference[key], key
    full, part = _items(tmp_path / "full"), _items(out)
    assert set(full) == set(part)
    for k in full:
        assert full[k]["winner"] == part[k]["winner"]
        torch.testing.assert_close(full[k]["latents_w"], part[k]["latents_w"])
    # settings that change the shards refuse to mix with an unfinished run
    from lit_ovis.errors import ConfigError

    with pytest.raises(KeyboardInterrupt):
        scored.clear()
        make_pairs(records_from_folder(pool), _cfg(tmp_path / "p3", 2), scorers={"bright": killed_after_two_batches},
                   models=models, progress=False)
    changed = _cfg(tmp_path / "p3", 2)
    changed.steps = 3
    with pytest.raises(ConfigError, match="other settings \\(steps\\)"):
        make_pairs(records_from_folder(pool), changed, scorers={"bright": brightness}, models=models, progress=False)
