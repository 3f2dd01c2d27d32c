"""Data pipeline: synthetic engine, buckets, prepare (validation, dedup, restart) and the streaming
DataModule (one shape per batch, exact sharding over ranks x workers, mid-epoch resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.buckets import aspect_error, assign_bucket, make_buckets, resize_to_bucket
from data_modules.prepare import PrepareConfig, prepare, synthetic_records
from data_modules.records import records_from_folder
from data_modules.streaming import BucketBatchSampler, BucketedLatents, LatentDataModule, bucket_sizes, collate, discover_buckets
from data_modules.synthetic.engine import TextRenderingEngine


def test_engine_is_deterministic_and_captions_quote_the_text():
    a, b = TextRenderingEngine(seed=7), TextRenderingEngine(seed=7)
    langs = set()
    for i in range(12):
        x, y = a.render(i), b.render(i)
        assert x.image.tobytes() == y.image.tobytes() and x.caption == y.caption
        assert f'"{x.text}"' in x.caption
        langs.add(x.language)
    assert langs == {"en", "zh"}
    assert TextRenderingEngine(seed=8).render(0).image.tobytes() != a.render(0).image.tobytes()


@pytest.mark.parametrize("side,tolerance", [(256, 0.14), (512, 0.07), (1024, 0.035)])
def test_buckets_cover_aspect_range_within_tolerance(side, tolerance):
    buckets = make_buckets(side)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert all(0.25 <= w / h <= 4.0 for w, h in buckets)
    assert all(0.85 * side * side <= w * h <= side * side for w, h in buckets)
    for ar in np.linspace(0.25, 4.0, 400):
        w, h = int(2000 * math.sqrt(ar)), int(2000 / math.sqrt(ar))
        assert aspect_error(w, h, assign_bucket(w, h, buckets)) <= tolerance
    img = Image.new("RGB", (300, 100))
    assert resize_to_bucket(img, (384, 128)).size == (384, 128)


def _write_odd_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))

    def save(name, image, caption="a caption", **kw):
        image.save(folder / name, **kw)
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")

    save("good.png", good, 'a sign that says "OK"')
    save("dup.png", good, "the same picture again")  # perceptual duplicate
    save("cmyk.jpg", Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).convert("CMYK"))
    save("alpha.png", Image.fromarray(rng.integers(0, 255, (96, 96, 4), dtype=np.uint8), "RGBA"))
    save("palette.gif", Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).convert("P"))
    save("deep.png", Image.fromarray((rng.integers(0, 65535, (96, 96))).astype(np.uint16)))
    save("tiny.png", Image.new("RGB", (20, 20), "red"))
    save("wide.png", Image.new("RGB", (600, 100), "blue"))  # aspect 6 > 4
    save("nocap.png", Image.new("RGB", (96, 96), "green"), caption=None)
    save("empty.png", Image.new("RGB", (96, 96), "yellow"), caption="   ")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "corrupt.txt").write_text("broken")
    buf = folder / "trunc.jpg"
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, quality=90)
    buf.write_bytes(buf.read_bytes()[:300])
    (folder / "trunc.txt").write_text("truncated")


def test_prepare_skips_and_counts_bad_inputs(tmp_path):
    _write_odd_images(tmp_path / "imgs")
    cfg = PrepareConfig(output_dir=str(tmp_path / "out"), resolution=64, min_side=32, num_workers=1, shard_size=4)
    report = prepare(records_from_folder(tmp_path / "imgs"), cfg, progress=False)
    assert report["inputs"] == 12
    assert report["skipped"] == {
        "aspect_ratio": 1, "corrupt": 2, "duplicate": 1, "empty_caption": 1, "missing_caption": 1, "too_small": 1,
    }
    assert report["kept"] == 5  # good, cmyk, alpha, palette, 16-bit: converted, and nothing crashed
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["kept"] == 5 and sum(saved["buckets"].values()) == 5


def test_prepare_restarts_without_redoing_or_duplicating(tmp_path):
    out = tmp_path / "out"
    cfg = PrepareConfig(output_dir=str(out), resolution=64, num_workers=1, shard_size=8, text_encoder="tiny", max_sequence_length=256)
    first = prepare(synthetic_records(24), cfg, progress=False)
    assert first["processed_this_run"] == 24
    # Simulate a kill after two of three shards: the last shard's output never landed.
    (out / "_work" / "shard-000002.pt").unlink()
    second = prepare(synthetic_records(24), cfg, progress=False)
    assert second["processed_this_run"] == 8 and second["kept"] == first["kept"] == 24
    ids = [s["id"] for d in discover_buckets(str(out)) for s in _iterate(d)]
    assert sorted(ids) == sorted(f"syn-{i:08d}" for i in range(24))


def _iterate(d):
    from litdata import StreamingDataset

    ds = StreamingDataset(d)
    return [ds[i] for i in range(len(ds))]


def test_prepared_latents_and_embeddings(tmp_path, tiny_vae):
    out = tmp_path / "out"
    prepare(synthetic_records(6), PrepareConfig(output_dir=str(out), resolution=64, num_workers=1, text_encoder="tiny", max_sequence_length=256), progress=False)
    for d in discover_buckets(str(out)):
        w, h = map(int, d.split("/")[-1].split("x"))
        for s in _iterate(d):
            assert s["latents"].shape == (16, h // 8, w // 8)
            assert tiny_vae.decode(s["latents"][None].float()).shape == (1, 3, h, w)
            assert s["prompt_embeds"].ndim == 2 and s["prompt_embeds"].shape[1] == 32
            assert s["target_text"] in s["caption"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare(synthetic_records(96), PrepareConfig(output_dir=str(out), resolution=64, num_workers=1, shard_size=48), progress=False)
    return str(out)


def _ids_for_rank(dirs, sizes, rank, world, workers, batch_size=4, start=None):
    sampler = BucketBatchSampler(sizes, batch_size, seed=3, rank=rank, world_size=world)
    if start is not None:
        sampler.epoch, sampler.start = start
    loader = torch.utils.data.DataLoader(BucketedLatents(dirs), batch_sampler=sampler, num_workers=workers, collate_fn=collate)
    batches = list(loader)
    return batches


def test_every_batch_has_one_shape_and_ranks_x_workers_see_each_sample_once(prepared):
    dirs = discover_buckets(prepared)
    sizes = bucket_sizes(dirs)
    seen = []
    for rank in range(2):
        for batch in _ids_for_rank(dirs, sizes, rank, world=2, workers=2):
            assert batch["latents"].ndim == 4 and len({tuple(x.shape) for x in batch["latents"]}) == 1
            seen += batch["ids"]
    expected_batches = sum(n // 4 for n in sizes) // 2 * 2
    assert len(seen) == len(set(seen)) == expected_batches * 4
    # Whole buckets are covered except the remainder that does not fill a batch.
    assert len(seen) >= sum(sizes) - 3 * len(sizes) - 4


def test_mid_epoch_resume_yields_exactly_the_remaining_batches(prepared, tmp_path):
    dm = LatentDataModule(root=prepared, batch_size=4, num_workers=2, seed=3)
    dm.setup("fit")
    full = [b["ids"] for b in dm.train_dataloader()]
    dm = LatentDataModule(root=prepared, batch_size=4, num_workers=2, seed=3)
    dm.setup("fit")
    consumed = []
    for batch in dm.train_dataloader():
        batch = dm.on_after_batch_transfer(batch, 0)
        consumed.append(batch["ids"])
        if len(consumed) == 5:
            state = dm.state_dict()
            break  # "killed" after 5 batches
    resumed = LatentDataModule(root=prepared, batch_size=4, num_workers=2, seed=3)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    rest = [b["ids"] for b in resumed.train_dataloader()]
    assert consumed + rest == full
    # next epoch: a fresh permutation (the per-bucket remainder that does not fill a batch rotates)
    second = sum([b["ids"] for b in resumed.train_dataloader()], [])
    assert len(second) == len(set(second)) == len(sum(full, [])) and second != sum(full, [])
