"""Data preparation at cluster scale: WebDataset tars and Parquet files as inputs (written by the `webdataset` and
`pyarrow` libraries), metadata filters, the storage plan, and sharded prepare (1 vs 2 processes, a killed shard)."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.prepare import PrepareConfig, main as prepare_main, prepare
from data_modules.records import ReaderOptions
from data_modules.sources import ParquetSource, SyntheticSource, TarSource
from data_modules.metadata_filters import parse_filters
from data_modules.streaming import discover_buckets


def _png(seed: int, size=(48, 40)) -> bytes:
    """A distinct structured picture (distinct perceptual hashes), PNG-encoded."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    a, b, c = rng.uniform(0.5, 6.0, 3)
    pixels = np.stack([(x * a) % 256, (y * b) % 256, ((x * c + y) * 2) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _items(root: Path) -> dict[str, dict]:
    from litdata import StreamingDataset

    out = {}
    for d in discover_buckets(str(root)):
        ds = StreamingDataset(d)
        for i in range(len(ds)):
            item = ds[i]
            assert item["id"] not in out  # nothing duplicated
            out[item["id"]] = {**item, "bucket": Path(d).name}
    return out


def _write_tars(folder: Path) -> list[Path]:
    """Two tars by webdataset's TarWriter: good samples (caption in .txt or in .json), a corrupt image, a sample
    without an image, metadata failing a filter; the second tar is damaged in its middle and cut short."""
    import webdataset as wds

    folder.mkdir()
    paths = [folder / "shard-000.tar", folder / "shard-001.tar"]
    with wds.TarWriter(str(paths[0])) as sink:
        sink.write({"__key__": "a0", "png": _png(0), "txt": "a red gradient", "json": json.dumps({"aesthetic": 6.0}).encode()})
        sink.write({"__key__": "a1", "png": _png(1), "json": json.dumps({"aesthetic": 5.5, "caption": "from the json"}).encode()})
        sink.write({"__key__": "a2", "png": b"\x89PNG not really", "txt": "corrupt image", "json": b'{"aesthetic": 7}'})
        sink.write({"__key__": "a3", "txt": "no image here", "json": b'{"aesthetic": 7}'})
        sink.write({"__key__": "a4", "png": _png(4), "txt": "ugly", "json": b'{"aesthetic": 2.0}'})
    with wds.TarWriter(str(paths[1])) as sink:
        for k in range(5):
            sink.write({"__key__": f"b{k}", "png": _png(10 + k), "txt": f"picture b{k}", "json": b'{"aesthetic": 9}'})
    data = bytearray(paths[1].read_bytes())
    import tarfile

    with tarfile.open(paths[1]) as tar:
        members = tar.getmembers()
    b1 = next(m for m in members if m.name == "b1.png")
    # Destroy b1's png header but not the pax header webdataset writes before it (for the float mtime): tarfile alone
    # gives up on the whole stream there; the reader skips the region and resumes at the next valid header.
    data[b1.offset_data - 512 : b1.offset_data] = b"\xff" * 512
    last = next(m for m in members if m.name.startswith("b4."))
    paths[1].write_bytes(bytes(data[: last.offset_data + 100]))  # cut inside b4's first member
    return paths


def test_webdataset_tars_are_read_with_damage_skipped_and_counted(tmp_path, tiny_vae):
    _write_tars(tmp_path / "tars")
    cfg = PrepareConfig(output_dir=str(tmp_path / "out"), resolution=32, min_side=32, num_workers=1, shard_size=2,
                        metadata_filters="aesthetic>=5")
    source = TarSource(str(tmp_path / "tars" / "shard-{000..001}.tar"), ReaderOptions(filters=tuple(parse_filters(cfg.metadata_filters))))
    report = prepare(source, cfg, progress=False)
    items = _items(tmp_path / "out")
    tar0, tar1 = (str(tmp_path / "tars" / f"shard-00{k}.tar") for k in range(2))
    captions = {k: v["caption"] for k, v in items.items()}
    assert captions == {f"{tar0}#a0": "a red gradient", f"{tar0}#a1": "from the json",
                        f"{tar1}#b0": "picture b0", f"{tar1}#b2": "picture b2", f"{tar1}#b3": "picture b3"}
    # b1: its png header is destroyed, so its remaining members (txt, json) form a sample without an image.
    assert report["skipped"] == {"corrupt": 1, "missing_image": 2, "filter_aesthetic": 1, "tar_corrupt": 1, "tar_truncated": 1}
    assert report["kept"] == 5 and report["inputs"] == 11  # tar 1: b0, [damage], b1 (no image), b2, b3, [cut inside b4]
    # The decoded picture is the one in the tar: its latent equals the latent of the same picture from a file.
    Path(tmp_path / "a0.png").write_bytes(_png(0))
    from data_modules.records import Record

    ref = prepare([Record(id="a0", caption="x", path=str(tmp_path / "a0.png"))],
                  PrepareConfig(output_dir=str(tmp_path / "ref"), resolution=32, min_side=32, num_workers=1), progress=False)
    assert ref["kept"] == 1
    ref_latents = next(iter(_items(tmp_path / "ref").values()))["latents"]
    assert torch.allclose(items[f"{tar0}#a0"]["latents"].float(), ref_latents.float(), atol=2e-3)  # batch of 2 vs 1


def test_parquet_files_are_read_with_damage_skipped_and_counted(tmp_path, tiny_vae):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    (folder / "on_disk.png").write_bytes(_png(30))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face's Image feature
    table = pa.table({
        "image": pa.array([{"bytes": _png(20), "path": None}, {"bytes": _png(21), "path": None},
                           {"bytes": None, "path": "on_disk.png"}, {"bytes": b"garbage", "path": None},
                           None, {"bytes": _png(22), "path": None}], type=image_type),
        "text": ["first", "second", "third from a path", "corrupt", "no image", None],
        "width": [512, 512, 1024, 512, 512, 512],
    })
    pq.write_table(table, folder / "part-0.parquet", row_group_size=4)  # two row groups: 4 + 2 rows
    (folder / "part-1.parquet").write_bytes(b"PAR1 this is not a parquet file")
    opts = ReaderOptions(caption_field="text", image_field="image", filters=tuple(parse_filters("width>=256")))
    source = ParquetSource(str(folder / "part-*.parquet"), opts)
    assert source.count() == (7, "exact") and len(list(source.units(2))) == 3  # row groups of file 0 + file 1
    cfg = PrepareConfig(output_dir=str(tmp_path / "out"), resolution=32, min_side=32, num_workers=1, caption_field="text")
    report = prepare(source, cfg, progress=False)
    pq0 = str(folder / "part-0.parquet")
    assert {k: v["caption"] for k, v in _items(tmp_path / "out").items()} == {
        f"{pq0}#0:0": "first", f"{pq0}#0:1": "second", f"{pq0}#0:2": "third from a path"}
    assert report["skipped"] == {"corrupt": 1, "missing_image": 1, "missing_caption": 1, "parquet_unreadable": 1}
    assert report["inputs"] == 7


def test_metadata_filters_parse_and_reject_bad_terms():
    from lit_ovis.errors import ConfigError

    f = parse_filters("aesthetic>=5, punsafe<0.5,status==success")
    from data_modules.metadata_filters import filter_reason

    assert filter_reason(f, {"aesthetic": 5, "punsafe": 0.1, "status": "success"}) is None
    assert filter_reason(f, {"aesthetic": 4.9, "punsafe": 0.1, "status": "success"}) == "filter_aesthetic"
    assert filter_reason(f, {"aesthetic": 6, "status": "success"}) == "missing_punsafe"
    assert filter_reason(f, {"aesthetic": 6, "punsafe": float("nan"), "status": "success"}) == "missing_punsafe"
    with pytest.raises(ConfigError, match="--metadata-filters"):
        parse_filters("aesthetic>>5")
    with pytest.raises(ConfigError, match="not a number"):
        parse_filters("aesthetic>=high")


# ------------------------------------------------------------------------------------------ storage plan
def test_storage_plan_is_printed_and_a_prepare_that_does_not_fit_is_refused(tmp_path, capsys, monkeypatch):
    from data_modules import storage_plan

    out = str(tmp_path / "out")
    assert prepare_main(["--synthetic", "1000000", "--output-dir", out, "--resolution", "1024", "--plan-only", "true",
                         "--text-encoder", "ovis2.5-2b"]) == 0
    line = next(t for t in capsys.readouterr().err.splitlines() if t.startswith("prepare 1024:"))
    # 1024^2 bucket latents: 16 x 128 x 128 fp16 = 512 KiB; Qwen3 embeddings 256 x 2048 fp16 = 1 MiB per sample.
    assert "1,000,000 inputs (exact)" in line and "latents 488.3 GiB" in line and "text embeddings 976.6 GiB" in line
    monkeypatch.setattr(storage_plan, "free_bytes", lambda path: 10 << 30)
    assert prepare_main(["--synthetic", "100000", "--output-dir", out, "--resolution", "1024", "--text-encoder", "ovis2.5-2b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --output-dir {out}: this prepare needs up to") and "--text-storage tokens" in err[-1]
    assert not Path(out, "_work", "1024").exists() or not any(Path(out, "_work", "1024").iterdir())  # refused before any work


# ------------------------------------------------------------------------------------------ sharded prepare
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forked(argv: list[str], **env: str):
    """`lit-ovis prepare argv` in a forked child with `env` added: a real separate process (its own gloo rank, killable)
    without a fresh interpreter's start-up (torch and diffusers are imported already), as DataLoader workers do."""
    import multiprocessing

    def run() -> None:
        torch.set_num_threads(1)  # the parent's OpenMP thread team does not survive a fork: never start one here
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_ARRAY_TASK_ID"):
            os.environ.pop(key, None)
        os.environ.update(env)
        sys.exit(prepare_main(argv))

    proc = multiprocessing.get_context("fork").Process(target=run)
    proc.start()
    return proc


def _picture_folder(folder: Path) -> None:
    """Six distinct pictures and a copy of the first one at the end: with two records per unit the copy is in the
    last unit, which the other rank owns, so removing it needs the global (cross-shard) dedup."""
    folder.mkdir()
    for k in range(6):
        (folder / f"a{k}.png").write_bytes(_png(40 + k, size=(48 + 8 * (k % 3), 40)))
        (folder / f"a{k}.txt").write_text(f"picture {k}")
    (folder / "z_copy.png").write_bytes(_png(40))
    (folder / "z_copy.txt").write_text("a copy of picture 0")


def test_two_process_prepare_equals_one_process(tmp_path):
    _picture_folder(tmp_path / "imgs")
    common = ["--image-dir", str(tmp_path / "imgs"), "--resolution", "32", "--min-side", "32", "--num-workers", "1",
              "--shard-size", "2", "--min-aspect", "0.5", "--max-aspect", "2"]
    port = str(_free_port())
    procs = [_forked([*common, "--output-dir", str(tmp_path / "two")], RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port) for r in range(2)]
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert prepare_main([*common, "--output-dir", str(tmp_path / "one")]) == 0
    one, two = _items(tmp_path / "one"), _items(tmp_path / "two")
    assert len(one) == 6 and set(one) == set(two)  # the copy of picture 0 is dropped in both
    for key, item in one.items():
        assert item["bucket"] == two[key]["bucket"] and item["caption"] == two[key]["caption"]
        assert torch.equal(item["latents"], two[key]["latents"])
    reports = [json.loads((tmp_path / d / "32" / "report.json").read_text()) for d in ("one", "two")]
    assert reports[0]["skipped"] == reports[1]["skipped"] == {"duplicate": 1} and reports[1]["ranks"] == 2
    assert reports[0]["buckets"] == reports[1]["buckets"]
    geometry = [(r["latent_channels"], r["latent_scale"]) for r in reports]  # what the data module checks shapes against
    assert geometry[0] == geometry[1] and geometry[0][0] == one[next(iter(one))]["latents"].shape[0]
    # Both ranks wrote chunks; LitData's merge joined their indexes.
    assert {f.name.split("-")[1] for f in (tmp_path / "two" / "32").glob("*/chunk-*.bin")} == {"0", "1"}


def test_a_shard_killed_mid_way_and_rerun_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "out"
    args = ["--synthetic", "12", "--output-dir", str(out), "--resolution", "32", "--min-side", "16", "--num-workers", "1",
            "--shard-size", "1", "--num-shards", "2"]
    work = out / "_work" / "32"
    proc = _forked([*args, "--shard-index", "0"])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("*.pt"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    done_before = len(list(work.glob("*.pt")))
    assert 2 <= done_before < 6  # killed mid-way through its 6 units
    rerun = prepare(SyntheticSource(12), PrepareConfig(**_cfg(out), num_shards=2, shard_index=0), progress=False)
    assert rerun["reused_shards"] == done_before and rerun["processed_this_run"] == 6 - done_before
    assert prepare_main([*args, "--shard-index", "1"]) == 0
    assert prepare_main([*args, "--merge", "true"]) == 0
    ids = sorted(_items(out))
    assert ids == [f"syn-{i:08d}" for i in range(12)]  # every sample once
    report = json.loads((out / "32" / "report.json").read_text())
    assert report["inputs"] == report["kept"] == 12


def _cfg(out: Path) -> dict:
    return dict(output_dir=str(out), resolution=32, min_side=16, num_workers=1, shard_size=1)


# ------------------------------------------------------------------------------------------ caption tokens
def test_caption_tokens_are_stored_and_encoded_online_like_the_captions(tmp_path):
    from types import SimpleNamespace

    from data_modules.streaming import collate
    from lit_ovis.models.text_encoder import build_text_encoder
    from lit_ovis.modules.base import OvisBaseModule

    out = tmp_path / "out"
    report = prepare(SyntheticSource(3), PrepareConfig(**_cfg(out), text_encoder="tiny", text_storage="tokens", max_sequence_length=32),
                     progress=False)
    items = list(_items(out).values())
    assert report["text_storage"] == "tokens" and not report["has_prompt_embeds"]
    assert all("prompt_embeds" not in x and x["prompt_token_ids"].dtype == torch.int32 for x in items)
    batch = collate([{k: v for k, v in x.items() if k != "latents"} for x in items])  # several buckets: no latents
    encoder = build_text_encoder("tiny", 32)
    module = SimpleNamespace(encoders_cfg=SimpleNamespace(max_sequence_length=32), text_encoder=encoder,
                             device=torch.device("cpu"), compute_dtype=torch.float32)
    online = OvisBaseModule.embed_prompts(module, batch)
    assert online.shape == (3, 32, encoder.model.config.hidden_size)
    assert torch.allclose(online, encoder.encode(batch["captions"]), atol=1e-5)  # the same as encoding the captions


@pytest.mark.timeout(120)
def test_rank0_build_inside_a_launched_job_prepares_alone(tmp_path, monkeypatch):
    """A training job's rank 0 builds its synthetic set while the other ranks wait (data_modules/rank0.py). The
    launcher's variables (srun / torchrun) must not turn that build into a shard of a prepare group: it would wait
    for ranks that are not preparing (a 2-task SLURM job hung in setup that way)."""
    from data_modules.streaming import ensure_synthetic_dataset

    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    start = time.monotonic()
    report = ensure_synthetic_dataset(str(tmp_path / "data"), samples=8, resolution=32)
    assert time.monotonic() - start < 90
    assert discover_buckets(str(tmp_path / "data")) and report["kept"] == 8 and report["ranks"] == 1, report
