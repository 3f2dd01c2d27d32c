"""`lit-ovis eval`: generates, scores, writes JSON + HTML, and resumes without regenerating."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from helpers import LatentSet, loader, tiny_flow_module
from lit_ovis.cli.eval import evaluate, main as eval_main
from lit_ovis.generator import load_generator
from lit_ovis.scoring import build_scorer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalckpt")
    module = tiny_flow_module()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, loader(LatentSet(n=4)))
    trainer.save_checkpoint(root / "m.ckpt")
    return module, root / "m.ckpt"


def test_generator_from_checkpoint_matches_module(checkpoint):
    module, path = checkpoint
    gen = load_generator(str(path))
    torch.testing.assert_close(gen.sample(["hi"], seed=3), module.sample(["hi"], seed=3))


class CountingGenerator:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def sample(self, prompts, **kw):
        self.calls += len(prompts)
        return self.inner.sample(prompts, **kw)


def test_eval_writes_reports_and_resumes(checkpoint, tmp_path):
    _, path = checkpoint
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in [
        {"prompt": 'a sign that says "OPEN"', "target_text": "OPEN"},
        {"prompt": '海报写着"你好"', "target_text": "你好", "language": "zh"},
        {"prompt": "a cat"},
    ]), encoding="utf-8")
    out = tmp_path / "eval"
    assert eval_main([str(path), str(prompts), "--output-dir", str(out), "--scorers", "brightness", "--batch-size", "2"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["aggregate"]["samples"] == 3 and 0 <= report["aggregate"]["all"]["brightness"] <= 1
    assert (out / "gallery.html").read_text().count("data:image/png;base64,") == 3
    # "kill" after generation of one image: remove the others and a record, rerun, count generations
    for i in (1, 2):
        (out / "images" / f"{i:06d}.png").unlink()
    (out / "records" / "000000.json").unlink()
    gen = CountingGenerator(load_generator(str(path)))
    from lit_ovis.scoring.prompt_sets import read_prompt_set

    again = evaluate(gen, read_prompt_set(prompts), str(out), {"brightness": build_scorer("brightness")}, batch_size=2, progress=False)
    assert gen.calls == 2  # only the missing images were generated
    assert again["aggregate"]["all"]["brightness"] == pytest.approx(report["aggregate"]["all"]["brightness"], abs=1e-6)


def test_eval_with_ocr_computes_word_accuracy(tmp_path):
    from PIL import Image, ImageDraw

    from lit_ovis.render import load_font

    class RenderGenerator:  # "generates" exactly the requested text: OCR should read it back
        def sample(self, prompts, seed=0, **kw):
            out = []
            for p in prompts:
                im = Image.new("RGB", (320, 96), "white")
                ImageDraw.Draw(im).text((10, 20), p.split('"')[1], fill="black", font=load_font(40))
                out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
            return torch.stack(out)

    items = [{"id": "0", "prompt": 'say "HELLO WORLD"', "target_text": "HELLO WORLD", "language": "en", "tag": ""}]
    report = evaluate(RenderGenerator(), items, str(tmp_path / "e"), {"ocr": build_scorer("ocr")}, progress=False)
    assert report["aggregate"]["en"]["word_accuracy"] == 1.0 and report["aggregate"]["en"]["ned"] == 1.0
    assert report["samples"][0]["ocr_text"].upper().replace(" ", "") == "HELLOWORLD"


def test_eval_callback_logs_metrics(checkpoint):
    from callbacks.eval import EvalCallback

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
    metrics = cb.run(FakeTrainer, module)
    assert set(metrics) >= {"eval/brightness", "eval/ocr", "eval/en_word_accuracy", "eval/zh_ned"}
    assert FakeTrainer.loggers[0].logged[0][0] == 7
    assert 0 <= metrics["eval/en_word_accuracy"] <= 1
