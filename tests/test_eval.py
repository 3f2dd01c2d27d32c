"""`lit-ovis eval` and the training callback: JSON + HTML reports, fingerprinted resume (a changed prompt or
model regenerates only what it affects, an added scorer scores without regenerating), one OCR read per image,
benchmark-style pooled metrics with the CVTG-2K region breakdown, and eval on optimizer steps only."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from helpers import LatentSet, loader, tiny_flow_module, tiny_trainer, torch_threads
from lit_ovis.cli.eval import evaluate, main as eval_main
from lit_ovis.scoring.metrics import aggregate
from lit_ovis.loading import load_module
from lit_ovis.scoring import build_scorer
from lit_ovis.scoring.metrics import word_scores
from lit_ovis.scoring.prompt_sets import read_prompt_set


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalckpt")
    module = tiny_flow_module()
    trainer = tiny_trainer(1, default_root_dir=root)
    trainer.fit(module, loader(LatentSet(n=4)))
    trainer.save_checkpoint(root / "m.ckpt")
    return module, root / "m.ckpt"


def test_generator_from_checkpoint_matches_module(checkpoint):
    module, path = checkpoint
    gen = load_module(path)
    torch.testing.assert_close(gen.sample(["hi"], seed=3), module.sample(["hi"], seed=3))


class CountingGenerator:
    def __init__(self, inner):
        self.inner, self.prompts = inner, []

    @property
    def calls(self) -> int:
        return len(self.prompts)

    def sample(self, prompts, **kw):
        self.prompts += list(prompts)
        return self.inner.sample(prompts, **kw)


class CountingScorer:
    """Wraps a scorer and counts the images it scores."""

    def __init__(self, inner):
        self.inner, self.seen = inner, 0

    def score_with_details(self, images, prompts, metadata=None):
        self.seen += len(images)
        return self.inner.score_with_details(images, prompts, metadata)


PROMPTS = [
    {"prompt": 'a sign that says "OPEN"', "target_text": "OPEN"},
    {"prompt": '海报写着"你好"', "target_text": "你好", "language": "zh"},
    {"prompt": "a cat"},
]


def _write_prompts(path, rows):
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in rows), encoding="utf-8")
    return path


def test_eval_writes_reports_and_resumes(checkpoint, tmp_path):
    _, path = checkpoint
    prompts = _write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "eval"
    assert eval_main([str(path), str(prompts), "--output-dir", str(out), "--scorers", "brightness", "--batch-size", "2"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["aggregate"]["samples"] == 3 and 0 <= report["aggregate"]["all"]["brightness"] <= 1
    assert (out / "gallery.html").read_text().count("data:image/png;base64,") == 3
    # "kill" after generating one image: remove the others and a record, rerun, count generations
    for i in (1, 2):
        next((out / "images").glob(f"{i:06d}-*.png")).unlink()
    (out / "records" / "000000.json").unlink()
    gen = CountingGenerator(load_module(path))
    from lit_ovis.cli.eval import model_identity

    again = evaluate(gen, read_prompt_set(prompts), str(out), {"brightness": build_scorer("brightness")}, batch_size=2,
                     progress=False, model_id=model_identity(str(path), weights="auto", max_sequence_length=None))
    assert gen.calls == 2  # only the missing images were generated
    assert again["aggregate"]["all"]["brightness"] == pytest.approx(report["aggregate"]["all"]["brightness"], abs=1e-6)


def test_eval_fingerprint_regenerates_only_changed_samples(checkpoint, tmp_path):
    _, path = checkpoint
    inner = load_module(path)
    out = str(tmp_path / "eval")
    items = read_prompt_set(_write_prompts(tmp_path / "p.jsonl", PROMPTS))
    gen = CountingGenerator(inner)
    evaluate(gen, items, out, {"brightness": build_scorer("brightness")}, progress=False, model_id="ckpt-A")
    assert gen.calls == 3
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "eval" / "images").glob("*.png")}

    # a changed prompt file: only the changed prompt is regenerated (and its stale image removed)
    rows = [dict(r) for r in PROMPTS]
    rows[1]["prompt"] = '海报写着"再见"'
    rows[1]["target_text"] = "再见"
    changed = read_prompt_set(_write_prompts(tmp_path / "p2.jsonl", rows))
    gen = CountingGenerator(inner)
    report = evaluate(gen, changed, out, {"brightness": build_scorer("brightness")}, progress=False, model_id="ckpt-A")
    assert gen.prompts == ['海报写着"再见"']
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "eval" / "images").glob("*.png")}
    assert len(after) == 3 and sum(name in before and before[name] == t for name, t in after.items()) == 2
    assert report["samples"][1]["target_text"] == "再见"

    # an added scorer is computed on the existing images: nothing regenerated, the old scorer not rerun
    bright = CountingScorer(build_scorer("brightness"))
    gen = CountingGenerator(inner)
    report = evaluate(gen, changed, out, {"brightness": bright, "contrast": build_scorer("contrast")}, progress=False, model_id="ckpt-A")
    assert gen.calls == 0 and bright.seen == 0
    assert all(set(r["scores"]) >= {"brightness", "contrast"} for r in report["samples"])

    # another checkpoint (or sampling setting) regenerates everything
    gen = CountingGenerator(inner)
    evaluate(gen, changed, out, {"brightness": build_scorer("brightness")}, progress=False, model_id="ckpt-B")
    assert gen.calls == 3
    gen = CountingGenerator(inner)
    evaluate(gen, changed, out, {"brightness": build_scorer("brightness")}, progress=False, model_id="ckpt-B", steps=2)
    assert gen.calls == 3


class RenderGenerator:
    """'Generates' exactly the requested text: OCR should read it back."""

    def sample(self, prompts, seed=0, **kw):
        from PIL import Image, ImageDraw

        from lit_ovis.render import load_font

        out = []
        for p in prompts:
            text = " ".join(a or b for a, b in re.findall(r"'(.*?)'|\"(.*?)\"", p))
            im = Image.new("RGB", (480, 96), "white")
            ImageDraw.Draw(im).text((10, 20), text, fill="black", font=load_font(40, text))
            out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
        return torch.stack(out)


def test_eval_reads_each_image_once_and_pools_metrics(tmp_path):
    ocr = build_scorer("ocr")
    engine, calls = ocr.engine, []
    ocr.engine = lambda img: calls.append(1) or engine(img)
    root = tmp_path / "CVTG"
    root.mkdir()
    (root / "2.json").write_text(json.dumps({"data_list": [
        {"index": 0, "prompt": "A sign that reads 'HELLO WORLD' and 'GO'", "carrier_list": [], "sentence_list": []}]}))
    items = read_prompt_set(root / "2.json") + [
        {"id": "z", "prompt": 'say "你好"', "target_text": "你好", "target_texts": ["你好"], "language": "zh", "benchmark": "jsonl",
         "regions": None, "subset": "", "tag": ""}]
    gen = RenderGenerator()
    report = evaluate(gen, items, str(tmp_path / "e"), {"ocr": ocr}, progress=False)
    assert len(calls) == 2  # one OCR read per image gave the score and every text metric
    s0 = report["samples"][0]
    assert s0["ocr"]["word_total"] == 3 and s0["scores"]["ocr"] == pytest.approx(s0["ocr"]["reward"])
    agg = report["aggregate"]
    assert agg["en"]["word_accuracy"] == 1.0 and agg["en"]["ned"] == pytest.approx(1.0) and agg["en"]["text_accuracy"] == 1.0
    assert agg["zh"]["word_accuracy"] == 1.0 and agg["zh"]["words"] == 2
    assert set(agg["cvtg_by_regions"]) == {"2"} and agg["cvtg_by_regions"]["2"]["words"] == 3
    assert s0["ocr_text"].upper().replace(" ", "").startswith("HELLOWORLD")


def _record(pred, target, language="en", regions=None):
    ws = word_scores(pred, target, language)
    from lit_ovis.scoring.ocr import text_metrics

    return {"language": language, "benchmark": "cvtg" if regions else "jsonl", "regions": regions, "scores": {},
            "ocr": text_metrics(pred, target, language), "ws": ws}


def test_aggregate_pools_words_and_breaks_down_regions():
    records = [_record("open cafe", "open daily", regions=2), _record("fresh bread today", "fresh bread today", regions=3),
               _record("本地", "本地烘焙", "zh")]
    agg = aggregate(records, [])
    assert agg["en"]["word_accuracy"] == pytest.approx(4 / 5)  # pooled over words; per-image mean: 0.75
    assert agg["en"]["ned"] == pytest.approx((sum(records[0]["ws"].ned) + sum(records[1]["ws"].ned)) / 5)
    assert agg["zh"]["text_accuracy"] == pytest.approx(2 / 4) and agg["zh"]["word_accuracy"] == pytest.approx(2 / 4)
    assert agg["all"]["words"] == 9
    assert agg["cvtg_by_regions"]["2"]["word_accuracy"] == pytest.approx(0.5)
    assert agg["cvtg_by_regions"]["3"]["word_accuracy"] == 1.0


def test_eval_callback_logs_metrics_with_one_ocr_read(checkpoint):
    from callbacks.eval import DEFAULT_SET, EvalCallback

    module, _ = checkpoint

    class Recorder:
        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step):
            self.logged.append((step, metrics))

    class FakeTrainer:
        global_step = 7
        loggers = [Recorder()]

    cb = EvalCallback(scorers=["brightness", "ocr"], batch_size=2)
    ocr = cb.ensemble.scorers["ocr"]
    engine, calls = ocr.engine, []
    ocr.engine = lambda img: calls.append(1) or engine(img)
    metrics = cb.run(FakeTrainer, module)
    assert len(calls) == len(DEFAULT_SET)
    assert set(metrics) >= {"eval/brightness", "eval/ocr", "eval/en_word_accuracy", "eval/zh_ned", "eval/text_accuracy"}
    assert FakeTrainer.loggers[0].logged[0][0] == 7
    assert 0 <= metrics["eval/en_word_accuracy"] <= 1


def test_eval_callback_fires_on_optimizer_steps_under_accumulation(tmp_path):
    from callbacks.eval import EvalCallback

    class Spy(EvalCallback):
        def __init__(self):
            super().__init__(every_n_steps=1, scorers=[])
            self.steps = []

        def run(self, trainer, pl_module):
            self.steps.append(trainer.global_step)

    spy = Spy()
    with torch_threads(1):
        trainer = tiny_trainer(3, accumulate_grad_batches=2, default_root_dir=tmp_path, callbacks=[spy])
        trainer.fit(tiny_flow_module(), loader(LatentSet(n=8), batch_size=1))
    assert trainer.global_step == 3
    assert spy.steps == [1, 2, 3]  # once per optimizer step, not once per micro-batch (6 micro-batches)


def test_records_with_their_own_size_are_sampled_at_it_unless_the_command_sets_one(checkpoint, tmp_path):
    from PIL import Image

    module, _ = checkpoint
    calls = []

    class Recording:
        def sample(self, prompts, seed, steps, guidance_scale, height, width):
            calls.append((len(prompts), height, width))
            return module.sample(prompts, seed=seed, steps=2, height=height, width=width)

    items = [{"prompt": p, "target_text": p.upper(), "language": "en", **size} for p, size in
             [("a", {"width": 48, "height": 16}), ("b", {"width": 32, "height": 32}), ("c", {"width": 48, "height": 16})]]
    scorers = {"brightness": build_scorer("brightness")}
    report = evaluate(Recording(), items, str(tmp_path / "own"), scorers, batch_size=4, progress=False)
    assert sorted(calls) == [(1, 32, 32), (2, 16, 48)]
    assert [Image.open(tmp_path / "own" / r["image"]).size for r in report["samples"]] == [(48, 16), (32, 32), (48, 16)]
    calls.clear()
    evaluate(Recording(), items, str(tmp_path / "fixed"), scorers, batch_size=4, height=32, width=32, progress=False)
    assert calls == [(3, 32, 32)]
