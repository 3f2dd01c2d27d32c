"""A corpus of hostile inputs through `lit-ovis prepare` and `python main.py fit`: exit 0, every good record
kept, every bad one skipped or converted and counted by reason (report.json, the training log and the
checkpoint), memory bounded, nothing waits forever; multi-process runs build their data on rank 0 alone."""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _picture(seed: int, size=(96, 80)) -> Image.Image:
    """A structured picture, distinct per seed (perceptual hashes far apart, so near-duplicate removal keeps it)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    a, b = rng.uniform(0.5, 3.0, 2)
    img = Image.fromarray(np.stack([(x * a) % 256, (y * b) % 256, ((x + y) * 1.5 * a) % 256], -1).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 30), rng.integers(0, h - 30)
        draw.rectangle((x0, y0, x0 + 30, y0 + 25), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


# name -> (how the image is written, caption bytes or None): kept as they are, or converted and counted.
GOOD = {
    "utf8.png": 'a sign that says "OPEN"',
    "chinese.png": "一张写着“欢迎”的海报",
    "bom.png": codecs.BOM_UTF8 + "a caption saved with a byte-order mark".encode(),
    "utf16.png": "a caption saved as UTF-16 by Notepad".encode("utf-16"),
    "png_named.jpg": "a PNG file with a .jpg name",
    "jpeg_named.png": "a JPEG file with a .png name",
    "UPPER.PNG": "an upper-case extension",
}
CONVERTED = {"cmyk.jpg": "cmyk", "alpha.png": "alpha", "palette.gif": "palette", "deep.png": "deep_grey",
             "float.tiff": "deep_grey", "bilevel.png": "1", "rotated.jpg": "exif_rotated"}
BAD = {  # name -> the reason it is skipped
    "zero.png": "corrupt", "text.jpg": "corrupt", "truncated.jpg": "corrupt", "bomb.png": "too_large",
    "latin1.png": "caption_encoding", "replaced.png": "caption_replacement_char", "bell.png": "caption_control_chars",
    "nocaption.png": "missing_caption", "blank.png": "empty_caption", "hugecaption.png": "long_caption",
    "fifo.png": "not_a_file", "notes.json": "not_an_image", "tiny.png": "too_small", "wide.png": "aspect_ratio",
    "utf8_copy.png": "duplicate",
}


def _caption(folder: Path, name: str, caption) -> None:
    if caption is not None:
        (folder / name).with_suffix(".txt").write_bytes(caption if isinstance(caption, bytes) else caption.encode("utf-8"))


def write_image_corpus(folder: Path) -> None:
    folder.mkdir()
    seed = iter(range(1000))
    for name, caption in GOOD.items():
        image = _picture(next(seed))
        fmt = {"png_named.jpg": "PNG", "jpeg_named.png": "JPEG"}.get(name)
        image.save(folder / name, format=fmt or ("PNG" if name.lower().endswith(".png") else None))
        _caption(folder, name, caption)
    rng = np.random.default_rng(7)
    _picture(next(seed)).convert("CMYK").save(folder / "cmyk.jpg")
    rgba = _picture(next(seed)).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (80, 96), dtype=np.uint8)))
    rgba.save(folder / "alpha.png")
    _picture(next(seed)).convert("P").save(folder / "palette.gif")
    Image.fromarray((np.asarray(_picture(next(seed)).convert("L"), np.uint16) * 257)).save(folder / "deep.png")
    Image.fromarray(np.asarray(_picture(next(seed)).convert("L"), np.float32) / 7.0).save(folder / "float.tiff")
    _picture(next(seed)).convert("1").save(folder / "bilevel.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    _picture(next(seed)).save(folder / "rotated.jpg", exif=exif.tobytes())
    for name in CONVERTED:
        _caption(folder, name, f"a converted picture: {name}")

    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture")
    _picture(next(seed)).save(folder / "truncated.jpg", quality=95)
    (folder / "truncated.jpg").write_bytes((folder / "truncated.jpg").read_bytes()[:400])
    Image.new("1", (17000, 17000)).save(folder / "bomb.png")  # 289 MP of bits in a 35 kB file
    for name in ("zero.png", "text.jpg", "truncated.jpg", "bomb.png"):
        _caption(folder, name, f"a caption for an unusable file: {name}")
    for name in ("latin1.png", "replaced.png", "bell.png", "nocaption.png", "blank.png", "hugecaption.png"):
        _picture(next(seed)).save(folder / name)
    _caption(folder, "latin1.png", "caf\xe9 cr\xe8me".encode("latin-1"))  # not UTF-8, no byte-order mark
    _caption(folder, "replaced.png", "caf\ufffd already damaged upstream")
    _caption(folder, "bell.png", "a caption with a \x07 bell")
    _caption(folder, "blank.png", "   \n ")
    _caption(folder, "hugecaption.png", b"x" * (2 << 20))
    os.mkfifo(folder / "fifo.png")  # reading it would block forever
    _caption(folder, "fifo.png", "a pipe named like an image")
    (folder / "notes.json").write_text("{}")
    Image.new("RGB", (20, 20), "red").save(folder / "tiny.png")
    _caption(folder, "tiny.png", "too small")
    Image.new("RGB", (600, 100), "blue").save(folder / "wide.png")
    _caption(folder, "wide.png", "too wide")
    shutil.copy(folder / "utf8.png", folder / "utf8_copy.png")  # sorts after the original: the copy is dropped
    _caption(folder, "utf8_copy.png", "the same picture again")
    (folder / ".hidden.png").write_bytes(b"ignored: hidden files are not inputs")


def _prepare(args: list[str]) -> tuple[int, dict, int, str]:
    """`lit-ovis prepare` in a fresh process: (exit code, printed summary, peak RSS in MB, stderr). The peak is
    VmHWM, this process image's own high-water mark: ru_maxrss would carry the forking pytest process's size
    across exec."""
    code = ("import json, re, sys; from lit_ovis.__main__ import main; rc = main(['prepare', *sys.argv[1:]]); "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)); "
            "print(json.dumps({'rc': rc, 'rss_mb': hwm // 1024}))")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) >= 2, proc.stderr[-3000:]
    end = json.loads(lines[-1])
    return end["rc"], json.loads(lines[-2]), end["rss_mb"], proc.stderr


def _stored(out: Path) -> dict[str, str]:
    from litdata import StreamingDataset

    from data_modules.streaming import discover_buckets

    return {s["id"]: s["caption"] for d in discover_buckets(str(out)) for s in (lambda ds: [ds[i] for i in range(len(ds))])(StreamingDataset(d))}


def test_prepare_keeps_every_good_image_and_counts_every_bad_one(tmp_path):
    write_image_corpus(tmp_path / "imgs")
    out = tmp_path / "out"
    start = time.perf_counter()
    rc, summary, rss_mb, _ = _prepare(["--image-dir", str(tmp_path / "imgs"), "--output-dir", str(out), "--resolution", "64",
                                       "--min-side", "32", "--num-workers", "1"])
    assert rc == 0 and time.perf_counter() - start < 300  # the FIFO did not block
    report = json.loads((out / "64" / "report.json").read_text())
    assert report["skipped"] == {reason: sum(r == reason for r in BAD.values()) for reason in set(BAD.values())}
    assert report["converted"] == {kind: list(CONVERTED.values()).count(kind) for kind in set(CONVERTED.values())}
    assert report["inputs"] == len(GOOD) + len(CONVERTED) + len(BAD) and report["kept"] == len(GOOD) + len(CONVERTED)
    assert summary["skipped"] == report["skipped"] and summary["converted"] == report["converted"]
    captions = _stored(out)
    assert sorted(captions) == sorted([*GOOD, *CONVERTED])
    assert captions["chinese.png"] == "一张写着“欢迎”的海报"
    assert captions["bom.png"] == "a caption saved with a byte-order mark"  # no U+FEFF left in the text
    assert captions["utf16.png"] == "a caption saved as UTF-16 by Notepad"
    assert not any("\ufffd" in c for c in captions.values())
    # The bomb was refused before decoding. Measured peak RSS: 1.04 GB as shipped (torch + lightning imports alone
    # take 0.96 GB), 2.39 GB with PIL's bomb check switched off (289 MP decoded, then converted to RGB).
    assert rss_mb < 1600, rss_mb


def test_caption_encoding_is_chosen_not_guessed(tmp_path):
    from data_modules.records import records_from_folder

    folder = tmp_path / "imgs"
    folder.mkdir()
    _picture(1).save(folder / "a.png")
    (folder / "a.txt").write_bytes("一张写着“欢迎”的海报".encode("gb18030"))
    assert records_from_folder(folder)[0].skip == "caption_encoding"
    record = records_from_folder(folder, encoding="gb18030")[0]
    assert record.skip is None and record.caption == "一张写着“欢迎”的海报"


def test_bad_manifest_rows_are_skipped_and_counted(tmp_path):
    from data_modules.prepare import PrepareConfig, prepare
    from data_modules.records import records_from_manifest

    for k in range(4):
        _picture(20 + k).save(tmp_path / f"p{k}.png")
    rows = [
        json.dumps({"path": "p0.png", "caption": "first good row"}).encode(),
        b"",  # blank lines are not rows
        json.dumps({"path": "p1.png", "caption": "caf\u00e9 in UTF-8", "language": "en"}, ensure_ascii=False).encode(),
        b'{"path": "p2.png", "caption": "caf\xe9 in latin-1"}',  # one non-UTF-8 byte
        b'{"path": "p2.png", "caption": ',  # cut short
        b'["p2.png", "a list, not an object"]',
        json.dumps({"path": None, "caption": "null path"}).encode(),
        json.dumps({"caption": "no path at all"}).encode(),
        json.dumps({"path": "p2.png", "caption": 42}).encode(),
        json.dumps({"path": "p2.png", "caption": None}).encode(),
        json.dumps({"path": "p2.png", "caption": "a number as language", "language": 5}).encode(),
        json.dumps({"path": "missing.png", "caption": "the file is not there"}).encode(),
        json.dumps({"path": "p3.png", "caption": "last good row", "language": "zh", "caption_zh": "最后一行"}, ensure_ascii=False).encode(),
    ]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    records = records_from_manifest(tmp_path / "m.jsonl")
    report = prepare(records, PrepareConfig(output_dir=str(tmp_path / "out"), resolution=64, min_side=32, num_workers=1), progress=False)
    assert report["skipped"] == {"manifest_encoding": 1, "manifest_bad_json": 1, "manifest_bad_row": 2, "missing_path": 2,
                                 "caption_not_text": 1, "missing_caption": 1, "missing_file": 1}
    assert sorted(_stored(tmp_path / "out").values()) == ["café in UTF-8", "first good row", "最后一行"]

    csv = tmp_path / "m.csv"
    csv.write_bytes(b"path,caption\np0.png,a good CSV row\np1.png,caf\xe9\np2.png," + b'"' + b"x" * 200_000 + b'"\n,no path\np3.png,"a quoted, good row"\n')
    report = prepare(records_from_manifest(csv), PrepareConfig(output_dir=str(tmp_path / "csv"), resolution=64, min_side=32, num_workers=1), progress=False)
    assert report["skipped"] == {"manifest_encoding": 1, "manifest_bad_row": 1, "missing_path": 1} and report["kept"] == 2


@pytest.mark.parametrize("content,message", [
    (b"path,caption\na.png,x\n", "no line is JSON"),  # a CSV under a .jsonl name
    (b"\xff\xfe" + "{}".encode("utf-16-le") + b"\xff", "re-save it as UTF-8"),
])
def test_a_file_that_cannot_be_a_manifest_is_one_line(tmp_path, content, message):
    from data_modules.records import records_from_manifest
    from lit_ovis.errors import DataError

    (tmp_path / "m.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        records_from_manifest(tmp_path / "m.jsonl")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ damaged training data
BUCKET_A, BUCKET_B = "32x32", "48x16"  # latents [16, 4, 4] and [16, 2, 6]
CORRUPT = {1: "non_finite:latents", 9: "non_finite:latents", 2: "non_finite:prompt_embeds", 3: "non_finite:prompt_embeds",
           5: "wrong_shape:latents", 6: "wrong_shape:prompt_embeds"}


def write_damaged_dataset(root: Path) -> dict:
    """Bucket A: 24 records in chunks of 4 with six corrupt records, chunk 4 cut inside its third record,
    chunk 5 missing; bucket B: 8 records in one chunk cut to zero bytes. Prepared-dataset layout and report."""
    from litdata.streaming.writer import BinaryWriter

    g = torch.Generator().manual_seed(0)

    def record(i: int, latent_shape) -> dict:
        latents, embeds = torch.randn(16, *latent_shape, generator=g), torch.randn(5, 32, generator=g)
        reason = CORRUPT.get(i) if latent_shape == (4, 4) else None
        if reason == "non_finite:latents":
            latents[0, 1, 1] = float("nan") if i == 1 else float("-inf")
        elif reason == "non_finite:prompt_embeds":
            embeds[2, 3] = float("inf") if i == 2 else float("nan")
        elif reason == "wrong_shape:latents":
            latents = torch.randn(16, 2, 2)
        elif reason == "wrong_shape:prompt_embeds":
            embeds = torch.randn(1, 5, 32)
        return {"id": f"{latent_shape}-{i}", "caption": f"record {i}", "language": "en", "target_text": "",
                "latents": latents.half(), "prompt_embeds": embeds.half()}

    for name, n, per_chunk, shape in ((BUCKET_A, 24, 4, (4, 4)), (BUCKET_B, 8, 8, (2, 6))):
        writer = BinaryWriter(str(root / "32" / name), chunk_size=per_chunk)
        for i in range(n):
            writer[i] = record(i, shape)
        writer.done()
        writer.merge()
    chunks_a = json.loads((root / "32" / BUCKET_A / "index.json").read_text())["chunks"]
    cut = root / "32" / BUCKET_A / chunks_a[4]["filename"]
    header = 4 * (4 + 2)
    record_bytes = (chunks_a[4]["chunk_bytes"] - header) // 4
    cut.write_bytes(cut.read_bytes()[: header + 2 * record_bytes + record_bytes // 2])  # records 16, 17 intact
    (root / "32" / BUCKET_A / chunks_a[5]["filename"]).unlink()
    chunk_b = json.loads((root / "32" / BUCKET_B / "index.json").read_text())["chunks"][0]
    (root / "32" / BUCKET_B / chunk_b["filename"]).write_bytes(b"")
    (root / "report.json").write_text(json.dumps({"format": 2, "buckets": {f"32/{BUCKET_A}": 24, f"32/{BUCKET_B}": 8}}))
    good = sorted(f"{(4, 4)}-{i}" for i in range(18) if i not in CORRUPT)
    return {"good": good, "cut": chunks_a[4]["filename"], "missing": chunks_a[5]["filename"], "zero": chunk_b["filename"]}


def test_damaged_chunks_cost_only_their_damaged_records_and_every_tensor_is_checked(tmp_path, caplog):
    from data_modules.streaming import LatentDataModule

    corpus = write_damaged_dataset(tmp_path / "data")
    dm = LatentDataModule(root=str(tmp_path / "data"), batch_size=3, num_workers=0, seed=1)
    with caplog.at_level(logging.WARNING, logger="data_modules.streaming"):
        dm.setup("fit")
    a = [k for k, d in enumerate(dm.dataset.bucket_dirs) if d.endswith(BUCKET_A)][0]
    assert dm.sampler.pools[a] == list(range(18))  # 16, 17 read from the cut chunk; 18-23 left out
    assert dm.damaged_records == 2 + 4 + 8
    damage_lines = [r.getMessage() for r in caplog.records if "re-run `lit-ovis prepare`" in r.getMessage()]
    assert len(damage_lines) == 3
    assert any(f"{corpus['cut']}: " in m and "(truncated); 2 of its 4 records are skipped, 2 intact ones are read" in m for m in damage_lines)
    assert any(f"{corpus['missing']}: missing; 4 of its 4" in m for m in damage_lines)
    assert any(f"{corpus['zero']}: 0 of " in m and "8 of its 8" in m for m in damage_lines)

    start = time.perf_counter()
    seen = []
    for batch in dm.train_dataloader():
        batch = dm.on_after_batch_transfer(batch, 0)
        assert torch.isfinite(batch["latents"]).all() and torch.isfinite(batch["prompt_embeds"]).all()
        assert batch["latents"].shape == (3, 16, 4, 4)
        seen += batch["ids"]
    assert time.perf_counter() - start < 15  # no wait for the short chunk (LitData waits 2 s per read)
    assert sorted(set(seen)) == corpus["good"]  # every good record, the two salvaged ones included
    assert len(seen) == 18 and dm.corrupt_skipped == 6
    assert dict(dm.corrupt_by_reason) == {r: list(CORRUPT.values()).count(r) for r in set(CORRUPT.values())}
    assert dm.state_dict()["corrupt_by_reason"] == dict(dm.corrupt_by_reason)


def test_a_bucket_with_an_unreadable_index_is_left_out_once(tmp_path, caplog):
    from data_modules.streaming import LatentDataModule

    corpus = write_damaged_dataset(tmp_path / "data")
    index = tmp_path / "data" / "32" / BUCKET_B / "index.json"
    index.write_bytes(index.read_bytes()[:40])  # cut short
    dm = LatentDataModule(root=str(tmp_path / "data"), batch_size=3, num_workers=0, seed=1)
    with caplog.at_level(logging.WARNING, logger="data_modules.streaming"):
        dm.setup("fit")
    assert [d.rsplit("/", 1)[-1] for d in dm.dataset.bucket_dirs] == [BUCKET_A]
    assert sum("index.json is unreadable (JSONDecodeError: truncated or corrupt); this bucket is left out" in r.getMessage()
               for r in caplog.records) == 1
    assert sorted({i for b in dm.train_dataloader() for i in b["ids"]}) == corpus["good"]


def test_fit_on_damaged_data_exits_0_and_logs_every_reason(tmp_path):
    corpus = write_damaged_dataset(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "main.py", "fit", "--config", "configs/smoke.yaml", f"--data.root={tmp_path / 'data'}", "--data.synthetic_samples=0",
         "--data.batch_size=3", "--data.num_workers=1", "--data.val_samples_per_bucket=0", "--trainer.max_steps=12",
         f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
         "--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={ckpt}",
         "--trainer.callbacks.every_n_train_steps=12", "--model.sampling.height=32", "--model.sampling.width=32"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    for name in (corpus["cut"], corpus["missing"], corpus["zero"]):  # reported once, not per epoch or read
        assert sum(f"/{name}: " in line for line in log.splitlines()) == 1, log[-3000:]
    for reason in set(CORRUPT.values()):
        assert sum(f"is corrupt ({reason})" in line for line in log.splitlines()) == 1, log[-3000:]
    assert "6 corrupt records replaced so far" not in log and "12 corrupt records replaced so far" in log  # two epochs
    state = torch.load(next(ckpt.glob("*.ckpt")), map_location="cpu", weights_only=False)
    assert state["global_step"] == 12
    assert state["LatentDataModule"]["corrupt_by_reason"] == {r: 2 * list(CORRUPT.values()).count(r) for r in set(CORRUPT.values())}
    # No corrupt tensor reached a batch: without a NaN guard in this run, one would have poisoned the weights.
    assert all(torch.isfinite(v).all() for k, v in state["state_dict"].items() if v.is_floating_point())


# ------------------------------------------------------------------------------------ multi-process runs
@pytest.mark.distributed
def test_two_process_run_builds_its_data_on_rank0_from_an_empty_folder(tmp_path):
    data = tmp_path / "empty"
    proc = subprocess.run(
        [sys.executable, "main.py", "fit", "--config", "configs/smoke.yaml", "--trainer.devices=2", "--trainer.strategy=ddp",
         "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false",
         "--trainer.enable_progress_bar=false", "--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint",
         f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.every_n_train_steps=3", f"--data.root={data}",
         "--data.synthetic_samples=32", "--data.synthetic_resolution=32", "--data.batch_size=4", "--data.num_workers=0",
         "--data.val_samples_per_bucket=0"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("prepare 32: 100%") >= 1  # built once, by rank 0
    report = json.loads((data / "32" / "report.json").read_text())
    assert report["kept"] == 32 and sum(report["buckets"].values()) == 32
    state = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), map_location="cpu", weights_only=False)
    assert state["global_step"] == 3 and state["LatentDataModule"]["world_size"] == 2


@pytest.mark.distributed
def test_rank0_build_failure_or_timeout_reaches_every_rank_as_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "tests/dist/build_on_rank0.py", "--out", str(tmp_path)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["success"] == rank1["success"] == "ok" and rank1["marker_seen_after_success"]
    assert rank0["failure"] == "DataError: data/x: no space left on device"
    assert rank1["failure"] == "DataError: rank 0 could not build the set: data/x: no space left on device"
    assert rank1["timeout"].startswith("DataError: rank 1 waited up to 2 s for rank 0 to build the set and gave up (")
    assert "raise --data.build_timeout_s" in rank1["timeout"] and "\n" not in rank1["timeout"]
    assert 1.5 < rank1["timeout_seconds"] < 7  # gave up at the timeout, not after rank 0's 8 s build
    assert rank0["timeout"].startswith("DataError: rank 0 managed to build the set but the other ranks had stopped waiting")


def test_preflight_refuses_a_batch_larger_than_every_prepared_bucket(tmp_path):
    from lit_ovis.errors import ConfigError
    from lit_ovis.preflight import check_config

    (tmp_path / "report.json").write_text(json.dumps({"format": 2, "buckets": {"256/256x256": 40, "256/384x160": 12, "512/512x512": 900}}))
    cfg = lambda batch, **data: {"trainer": {"devices": 1}, "data": {"init_args": {"root": str(tmp_path), "batch_size": batch, **data}}}  # noqa: E731
    with pytest.raises(ConfigError, match=r"--data.batch_size=41 is larger than every bucket .* \(largest: 40 samples in 256/256x256\); use --data.batch_size 40 or less"):
        check_config(cfg(41, resolutions=[256]))
    with pytest.raises(ConfigError, match="after holding out 2 per bucket"):
        check_config(cfg(39, resolutions=[256], val_samples_per_bucket=2))
    check_config(cfg(38, resolutions=[256], val_samples_per_bucket=2))
    check_config(cfg(41))  # the 512 px buckets are big enough
    check_config(cfg(41, resolutions=[256]), subcommand="validate")  # validation batches are not one bucket each


def test_finite_check_costs_one_sum_not_a_pass_per_element():
    """The reader's non-finite test (a float32 sum) catches NaN, +Inf, -Inf and Inf - Inf in fp16 tensors,
    and fp16's largest values cannot overflow it into a false alarm."""
    big = torch.full((16, 128, 128), 65504.0, dtype=torch.float16)
    assert math.isfinite(big.float().sum().item())
    for bad in (float("nan"), float("inf"), float("-inf")):
        z = torch.zeros(16, 4, 4, dtype=torch.float16)
        z[0, 0, 0] = bad
        assert not torch.isfinite(z.float().sum())


def test_a_stuck_dataloader_worker_ends_the_run_with_one_line(tmp_path, monkeypatch):
    from data_modules.streaming import BucketedLatents, LatentDataModule
    from lit_ovis.errors import user_message

    write_damaged_dataset(tmp_path / "data")
    dm = LatentDataModule(root=str(tmp_path / "data"), batch_size=3, num_workers=1, worker_timeout_s=1)
    dm.setup("fit")
    monkeypatch.setattr(BucketedLatents, "__getitem__", lambda self, key: time.sleep(60))  # storage that never answers
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        next(iter(dm.train_dataloader()))
    assert time.perf_counter() - start < 30
    assert user_message(err.value) == ("a data-loader worker produced no batch for 1 s (--data.worker_timeout_s); "
                                       "check that the dataset's storage is reachable, or raise the timeout")
