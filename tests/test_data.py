"""Data pipeline: synthetic engine, buckets, prepare (validation, EXIF, near-duplicates, cache keyed by
inputs and settings, several resolutions in one root, streaming final write, restart) and the streaming
DataModule (one shape per batch, exact sharding over ranks x workers, mid-epoch resume at the same and at
another world size, corrupt records replaced and counted, validation split)."""

from __future__ import annotations

import io
import json
import math
import shutil
import weakref
from types import SimpleNamespace

import imagehash
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from data_modules.buckets import aspect_error, assign_bucket, make_buckets, resize_to_bucket
from data_modules.dedup import NearDuplicateIndex, hamming
from data_modules.prepare import PrepareConfig, prepare, shard_keys, synthetic_records
from data_modules.records import Record, load_image, load_image_grouped, records_from_folder
from data_modules.streaming import (
    BucketBatchSampler, BucketedLatents, LatentDataModule, batch_plan, bucket_sizes, collate, discover_buckets,
)
from data_modules.synthetic.engine import TextRenderingEngine
from lit_ovis.errors import DataError


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


def _iterate(d):
    from litdata import StreamingDataset

    ds = StreamingDataset(d)
    return [ds[i] for i in range(len(ds))]


def test_prepare_skips_and_counts_bad_inputs(tmp_path):
    _write_odd_images(tmp_path / "imgs")
    cfg = PrepareConfig(output_dir=str(tmp_path / "out"), resolution=64, min_side=32, num_workers=1, shard_size=4)
    report = prepare(records_from_folder(tmp_path / "imgs"), cfg, progress=False)
    assert report["inputs"] == 12
    assert report["skipped"] == {
        "aspect_ratio": 1, "corrupt": 2, "duplicate": 1, "empty_caption": 1, "missing_caption": 1, "too_small": 1,
    }
    assert report["kept"] == 5  # good, cmyk, alpha, palette, 16-bit: converted, and nothing crashed
    saved = json.loads((tmp_path / "out" / "64" / "report.json").read_text())
    assert saved["kept"] == 5 and sum(saved["buckets"].values()) == 5 and saved["skipped"] == report["skipped"]
    root = json.loads((tmp_path / "out" / "report.json").read_text())
    assert root["resolutions"]["64"]["kept"] == 5 and sum(root["buckets"].values()) == 5


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)  # stored left half red, right half blue
    pixels[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write portrait photos
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(str(tmp_path / "phone.jpg"))
    assert image.size == (32, 64)  # displayed portrait
    top, bottom = image.getpixel((16, 8)), image.getpixel((16, 56))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # the left edge is now on top


def test_images_for_a_vae_are_centre_cropped_grouped_and_skips_counted(tmp_path):
    pixels = np.zeros((20, 37, 3), np.uint8)
    pixels[2:18, 2:34] = 255  # a white box centred in a 37x20 picture: the 32x16 centre crop is all white
    Image.fromarray(pixels).save(tmp_path / "odd.png")
    Image.new("RGB", (64, 32)).save(tmp_path / "wide.png")
    Image.new("RGB", (5, 40)).save(tmp_path / "thin.png")  # narrower than the multiple
    names = ["odd.png", "wide.png", "thin.png", "missing.png", "wide.png"]
    records = [Record(id=str(i), caption="c", path=str(tmp_path / n)) for i, n in enumerate(names)]
    groups, skipped = load_image_grouped(records, multiple=8)
    assert skipped == 2
    assert sorted(groups) == [(32, 16), (64, 32)]
    assert [r.id for r, _ in groups[(64, 32)]] == ["1", "4"]
    (record, crop), = groups[(32, 16)]
    assert record.id == "0" and crop.shape == (16, 32, 3) and crop.dtype == np.uint8 and (crop == 255).all()


def _picture(seed: int) -> Image.Image:
    """A structured picture (gradient + shapes): perceptual hashes of such images are stable under resizing."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:96, 0:128]
    a, b = rng.uniform(0.5, 3.0, 2)
    img = Image.fromarray(np.stack([(x * a) % 256, (y * b) % 256, ((x + y) * 1.5) % 256], -1).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.integers(0, 90), rng.integers(0, 60)
        draw.ellipse((x0, y0, x0 + 40, y0 + 35), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def test_near_duplicates_are_removed_distinct_images_kept(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    original = _picture(1)
    original.save(folder / "a.png")
    buf = io.BytesIO()
    original.resize((90, 68), Image.LANCZOS).save(buf, "JPEG", quality=50)  # resized + recompressed copy
    (folder / "b_copy.jpg").write_bytes(buf.getvalue())
    distance = imagehash.phash(original) - imagehash.phash(Image.open(folder / "b_copy.jpg").convert("RGB"))
    assert 0 < distance <= 4  # a near-duplicate, not an identical hash
    _picture(2).save(folder / "c.png")
    for name in ("a", "b_copy", "c"):
        (folder / f"{name}.txt").write_text(f"picture {name}")
    records = records_from_folder(folder)
    near = prepare(records, PrepareConfig(output_dir=str(tmp_path / "near"), resolution=64, min_side=32, num_workers=1, dedup_threshold=4), progress=False)
    kept = sorted(s["id"] for d in discover_buckets(str(tmp_path / "near")) for s in _iterate(d))
    assert kept == ["a.png", "c.png"] and near["skipped"] == {"duplicate": 1}  # the first copy wins
    exact = prepare(records, PrepareConfig(output_dir=str(tmp_path / "exact"), resolution=64, min_side=32, num_workers=1, dedup_threshold=0), progress=False)
    assert exact["kept"] == 3  # identical-hash matching would keep the copy


def test_near_duplicate_index_is_exact_within_threshold_and_not_all_pairs():
    rng = np.random.default_rng(0)
    hashes = [int(h) for h in rng.integers(0, 2**63, 3000, dtype=np.int64)]
    index = NearDuplicateIndex(threshold=4)
    assert all(index.add(h) for h in hashes)  # random 64-bit hashes are ~32 bits apart
    bits = rng.permutation(64)
    assert not index.add(hashes[7] ^ sum(1 << int(b) for b in bits[:4]))  # 4 bits away: duplicate
    assert index.add(hashes[7] ^ sum(1 << int(b) for b in bits[:5])) or min(hamming(hashes[7] ^ sum(1 << int(b) for b in bits[:5]), h) for h in hashes) <= 4
    assert index.comparisons < 0.01 * len(hashes) ** 2 / 2  # banded: a tiny fraction of all pairs


@pytest.fixture(scope="module")
def two_resolutions(tmp_path_factory):
    out = tmp_path_factory.mktemp("multires")
    reports = {res: prepare(synthetic_records(6), PrepareConfig(output_dir=str(out), resolution=res, min_side=32, num_workers=1, shard_size=4), progress=False)
               for res in (32, 64)}
    return out, reports


def test_two_resolutions_live_in_one_root(two_resolutions):
    out, reports = two_resolutions
    assert reports[64]["processed_this_run"] == 6  # not served from the 32 px run's shards
    for res in (32, 64):
        dirs = discover_buckets(str(out), [res])
        assert sum(len(_iterate(d)) for d in dirs) == 6
        for d in dirs:
            w, h = map(int, d.split("/")[-1].split("x"))
            assert (w, h) in make_buckets(res) and (res == 32 or w * h > 32 * 32)  # this resolution's buckets
            assert all(s["latents"].shape == (16, h // 8, w // 8) for s in _iterate(d))
    root = json.loads((out / "report.json").read_text())
    assert set(root["resolutions"]) == {"32", "64"}
    assert all(sum(root["resolutions"][r]["buckets"].values()) == 6 for r in ("32", "64"))
    assert discover_buckets(str(out)) == discover_buckets(str(out), [32]) + discover_buckets(str(out), [64])
    again = prepare(synthetic_records(6), PrepareConfig(output_dir=str(out), resolution=32, min_side=32, num_workers=1, shard_size=4), progress=False)
    assert again["processed_this_run"] == 0 and again["fingerprint"] == reports[32]["fingerprint"]


def test_remote_discovery_reads_every_resolution_from_the_root_report(two_resolutions, monkeypatch):
    import fsspec

    out, _ = two_resolutions
    real_open = fsspec.open
    monkeypatch.setattr(fsspec, "open", lambda url, mode="r", **kw: real_open(str(out / url.removeprefix("s3://bucket/data/")), mode, **kw))
    local = discover_buckets(str(out))
    assert discover_buckets("s3://bucket/data") == [d.replace(str(out), "s3://bucket/data") for d in local]
    assert discover_buckets("s3://bucket/data", [64]) == [d.replace(str(out), "s3://bucket/data") for d in discover_buckets(str(out), [64])]
    with pytest.raises(DataError, match="128"):
        discover_buckets("s3://bucket/data", [128])


def test_discovery_ignores_hidden_and_temporary_dirs(two_resolutions):
    out, _ = two_resolutions
    before = discover_buckets(str(out))
    real = before[0]
    shutil.copytree(real, out / ".64.tmp" / real.split("/")[-1])  # what a killed final write leaves behind
    shutil.copytree(real, out / "64" / ".partial")
    try:
        assert discover_buckets(str(out)) == before
    finally:
        shutil.rmtree(out / ".64.tmp")
        shutil.rmtree(out / "64" / ".partial")


def _write_images(folder, names, captions=None):
    folder.mkdir(exist_ok=True)
    for k, name in enumerate(names):
        Image.fromarray(np.random.default_rng(100 + ord(name[0])).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text((captions or {}).get(name, f"caption {name}"))


def _prepared_captions(out):
    return {s["id"]: s["caption"] for d in discover_buckets(str(out)) for s in _iterate(d)}


def test_changed_inputs_or_settings_redo_the_work(tmp_path):
    folder, out = tmp_path / "imgs", tmp_path / "out"
    cfg = PrepareConfig(output_dir=str(out), resolution=64, min_side=32, num_workers=1, shard_size=2)
    _write_images(folder, "abcde")
    assert prepare(records_from_folder(folder), cfg, progress=False)["processed_this_run"] == 5
    _write_images(folder, "cf", {"c": "a new caption for c"})  # one caption edited, one image added
    second = prepare(records_from_folder(folder), cfg, progress=False)
    assert second["processed_this_run"] == 4 and second["reused_shards"] == 1  # [c,d] and [e,f] redone, [a,b] reused
    captions = _prepared_captions(out)
    assert sorted(captions) == [f"{n}.png" for n in "abcdef"] and captions["c.png"] == "a new caption for c"
    resharded = prepare(records_from_folder(folder), PrepareConfig(**{**cfg.__dict__, "shard_size": 4}), progress=False)
    # Shards are keyed by content: [a,b,c,d] is new work, [e,f] is the same shard as before; no duplicates.
    assert resharded["processed_this_run"] == 4 and resharded["reused_shards"] == 1 and _prepared_captions(out) == captions
    assert sorted(p.name for p in (out / "_work" / "64").glob("*.pt")) == sorted(f"{k}.pt" for k in shard_keys(records_from_folder(folder), PrepareConfig(**{**cfg.__dict__, "shard_size": 4})))


def test_prepare_restarts_without_redoing_or_duplicating(tmp_path):
    out = tmp_path / "out"
    cfg = PrepareConfig(output_dir=str(out), resolution=64, num_workers=1, shard_size=8, text_encoder="tiny", max_sequence_length=256)
    records = synthetic_records(24)
    first = prepare(records, cfg, progress=False)
    assert first["processed_this_run"] == 24
    # Simulate a kill after two of three shards: the last shard and the final datasets never landed,
    # and the interrupted write left a temp directory behind.
    (out / "_work" / "64" / f"{shard_keys(records, cfg)[2]}.pt").unlink()
    shutil.move(out / "64", out / ".64.tmp")
    second = prepare(records, cfg, progress=False)
    assert second["processed_this_run"] == 8 and second["kept"] == first["kept"] == 24
    ids = [s["id"] for d in discover_buckets(str(out)) for s in _iterate(d)]
    assert sorted(ids) == sorted(f"syn-{i:08d}" for i in range(24))


def test_final_write_streams_one_shard_at_a_time(tmp_path, monkeypatch):
    real_load = torch.load
    alive: list[list[weakref.ref]] = []
    held_at_load: list[int] = []

    def tracking_load(*args, **kwargs):
        held_at_load.append(sum(any(r() is not None for r in refs) for refs in alive))
        shard = real_load(*args, **kwargs)
        alive.append([weakref.ref(s["latents"]) for s in shard["samples"]])
        return shard

    monkeypatch.setattr(torch, "load", tracking_load)
    report = prepare(synthetic_records(12), PrepareConfig(output_dir=str(tmp_path), resolution=32, min_side=32, num_workers=1, shard_size=4), progress=False)
    assert report["kept"] == 12 and len(held_at_load) == 6  # two passes: hashes (global dedup), then the write
    assert held_at_load == [0] * 6  # no earlier shard is still in memory when the next one loads


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
    dirs = discover_buckets(str(out))
    ids = {(b, i): s["id"] for b, d in enumerate(dirs) for i, s in enumerate(_iterate(d))}
    return SimpleNamespace(root=str(out), dirs=dirs, sizes=bucket_sizes(dirs), ids=ids)


def _plan_ids(prepared, batches) -> list[str]:
    return [prepared.ids[b, i] for batch in batches for b, i in batch]


def _loader_batches(prepared, rank, world, workers, batch_size=4):
    sampler = BucketBatchSampler(prepared.sizes, batch_size, seed=3, rank=rank, world_size=world)
    return list(torch.utils.data.DataLoader(BucketedLatents(prepared.dirs), batch_sampler=sampler, num_workers=workers, collate_fn=collate))


def test_every_batch_has_one_shape_and_ranks_x_workers_see_each_sample_exactly_once(prepared):
    seen = []
    for rank in range(2):
        for batch in _loader_batches(prepared, rank, world=2, workers=2):
            assert batch["latents"].shape[0] == 4 and len({tuple(x.shape) for x in batch["latents"]}) == 1
            seen += batch["ids"]
    # Left out by design: each bucket's shuffled remainder (n % 4) and the plan's cut to a multiple of 2 ranks.
    plan = batch_plan(prepared.sizes, 4, seed=3, epoch=0)
    assert len(plan) == sum(n // 4 for n in prepared.sizes)
    planned = plan[: len(plan) - len(plan) % 2]
    assert sorted(seen) == sorted(_plan_ids(prepared, planned))  # exactly the planned samples, each once
    assert len(seen) == len(set(seen)) == 4 * len(planned)
    for b, n in enumerate(prepared.sizes):  # per bucket, only the remainder (and at most the cut batch) is missing
        got = sum(prepared.ids[b, i] in set(seen) for i in range(n))
        assert n - n % 4 - 4 * (len(plan) % 2) <= got <= n - n % 4


def test_mid_epoch_resume_yields_exactly_the_remaining_batches(prepared):
    dm = LatentDataModule(root=prepared.root, batch_size=4, num_workers=2, seed=3)
    dm.setup("fit")
    full = [b["ids"] for b in dm.train_dataloader()]
    dm = LatentDataModule(root=prepared.root, batch_size=4, num_workers=2, seed=3)
    dm.setup("fit")
    consumed = []
    for batch in dm.train_dataloader():
        batch = dm.on_after_batch_transfer(batch, 0)
        consumed.append(batch["ids"])
        if len(consumed) == 5:
            state = dm.state_dict()
            break  # "killed" after 5 batches
    assert state["consumed"] == 5 and state["world_size"] == 1
    resumed = LatentDataModule(root=prepared.root, batch_size=4, num_workers=2, seed=3)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    rest = [b["ids"] for b in resumed.train_dataloader()]
    assert consumed + rest == full
    # next epoch: a fresh permutation (the per-bucket remainder that does not fill a batch rotates)
    second = sum([b["ids"] for b in resumed.train_dataloader()], [])
    assert len(second) == len(set(second)) == len(sum(full, [])) and second != sum(full, [])


def _simulated_rank(root, rank, world, **kw):
    dm = LatentDataModule(root=root, batch_size=4, num_workers=0, seed=3, **kw)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    return dm


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_at_another_world_size_sees_every_sample_once(prepared, new_world):
    k, seen, states = 3, [], []
    for rank in range(2):  # world size 2, both ranks killed after k steps
        dm = _simulated_rank(prepared.root, rank, 2)
        dm.setup("fit")
        for step, batch in enumerate(dm.train_dataloader()):
            seen += dm.on_after_batch_transfer(batch, 0)["ids"]
            if step + 1 == k:
                break
        states.append(dm.state_dict())
    assert states[0] == states[1] and states[0]["consumed"] == 2 * k and states[0]["world_size"] == 2
    lengths = []
    for rank in range(new_world):
        dm = _simulated_rank(prepared.root, rank, new_world)
        dm.load_state_dict(states[0])
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        lengths.append(len(batches))
        seen += [i for b in batches for i in b["ids"]]
    assert len(set(lengths)) == 1  # ranks stay in lockstep
    plan = batch_plan(prepared.sizes, 4, seed=3, epoch=0)
    rest = len(plan) - 2 * k
    usable = rest - rest % new_world  # the new world size's cut: at most new_world - 1 batches
    assert len(seen) == len(set(seen)) == 4 * (2 * k + usable)
    assert sorted(seen) == sorted(_plan_ids(prepared, plan[: 2 * k + usable]))


def test_lightning_resume_at_another_world_size_keeps_every_epoch_whole(two_resolutions, tmp_path):
    """Through Lightning's own loops, which count an epoch's batches across a restart and stop reading at
    len(): a run killed at world size 2 resumes at world size 1 with exactly the rest of the epoch, then
    whole, freshly shuffled epochs."""
    import lightning as L

    from helpers import tiny_flow_module

    out, _ = two_resolutions
    dirs = discover_buckets(str(out), [32])
    sizes = bucket_sizes(dirs)
    id_of = {(b, i): s["id"] for b, d in enumerate(dirs) for i, s in enumerate(_iterate(d))}
    seen: list[list[str]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(list(batch["ids"]))

    common = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    data = dict(root=str(out), resolutions=[32], batch_size=1, num_workers=0, seed=3)
    first = LatentDataModule(**data)
    rank_world = first._rank_world
    first._rank_world = lambda: (rank_world(), (0, 2))[1]  # rank 0 of 2
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    L.Trainer(max_steps=1, callbacks=[ckpt, Record()], **common).fit(tiny_flow_module(), datamodule=first)
    plans = [batch_plan(sizes, 1, seed=3, epoch=e) for e in range(3)]
    ids = lambda batches: [[id_of[b, i] for b, i in batch] for batch in batches]  # noqa: E731
    assert len(plans[0]) == 6 and seen == ids(plans[0][:1])  # rank 0's share of the first 2 global batches
    seen.clear()
    steps = 4 + 6 + 1  # the rest of epoch 0, all of epoch 1, the first batch of epoch 2
    L.Trainer(max_steps=1 + steps, callbacks=[Record()], **common).fit(
        tiny_flow_module(), datamodule=LatentDataModule(**data), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert seen == ids(plans[0][2:] + plans[1] + plans[2][:1])


def _write_bucket(root, records, chunk_size=2):
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(root / "32" / "32x32"), chunk_size=chunk_size)
    for i, z in enumerate(records):
        writer[i] = {"id": f"s{i}", "caption": f"caption {i}", "language": "en", "target_text": "", "latents": z.half()}
    writer.done()
    writer.merge()


def test_a_batch_of_only_corrupt_records_is_replaced_and_counted(tmp_path):
    plan = batch_plan([8], 4, seed=5, epoch=0)
    bad = sorted(i for _, i in plan[0])
    latents = [torch.randn(16, 4, 4) for _ in range(8)]
    latents[bad[0]] = torch.randn(16, 2, 2)  # wrong shape for the bucket
    latents[bad[1]] = torch.full((16, 4, 4), float("nan"))  # non-finite
    latents[bad[2]] = torch.randn(16, 4, 8)
    _write_bucket(tmp_path, latents)
    dm = LatentDataModule(root=str(tmp_path), batch_size=4, num_workers=0, seed=5)
    dm.setup("fit")
    inner = dm.dataset._open()[0]

    class Unreadable:  # the fourth record's bytes cannot be decoded
        def __len__(self):
            return len(inner)

        def __getitem__(self, i):
            if i == bad[3]:
                raise OSError("corrupt chunk")
            return inner[i]

    dm.dataset._datasets = [Unreadable()]
    batches = [dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert len(batches) == 2  # the plan, and so every rank's step count, is unchanged
    for batch in batches:
        assert batch["latents"].shape == (4, 16, 4, 4) and torch.isfinite(batch["latents"]).all()
    assert dm.corrupt_skipped == 4
    good = {f"s{i}" for i in range(8) if i not in bad}
    assert set(batches[0]["ids"]) <= good and sorted(batches[1]["ids"]) == sorted(good)


def test_validation_split_is_held_out_fixed_every_sample_once_and_validate_runs(prepared):
    import lightning as L

    from helpers import tiny_flow_module

    dm = LatentDataModule(root=prepared.root, batch_size=4, num_workers=0, seed=3, val_samples_per_bucket=2)
    dm.setup("fit")
    train = {prepared.ids[b, i] for b, pool in enumerate(dm.sampler.pools) for i in pool}
    val = [i for b in dm.val_dataloader() for i in b["ids"]]
    assert val == [i for b in dm.val_dataloader() for i in b["ids"]]  # fixed order, no shuffling
    assert len(val) == len(set(val)) == sum(min(2, n) for n in prepared.sizes)
    assert not train & set(val) and train | set(val) == set(prepared.ids.values())
    assert not {i for b in dm.train_dataloader() for i in b["ids"]} & set(val)
    per_rank = []
    for rank in range(3):  # 3 simulated ranks: same number of validation steps, every sample once
        sim = _simulated_rank(prepared.root, rank, 3, val_samples_per_bucket=2)
        sim.setup("validate")
        per_rank.append([b["ids"] for b in sim.val_dataloader()])
    assert len({len(r) for r in per_rank}) == 1
    assert sorted(i for r in per_rank for b in r for i in b) == sorted(val)

    counted = []

    class Count(L.Callback):
        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
            counted.append(batch["latents"].shape[0])

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Count()])
    result = trainer.validate(tiny_flow_module(), datamodule=LatentDataModule(root=prepared.root, batch_size=4, num_workers=0, seed=3, val_samples_per_bucket=2))
    assert sum(counted) == len(val) and math.isfinite(result[0]["val/loss"]) and result[0]["val/loss"] > 0
