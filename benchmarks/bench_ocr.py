"""OCR accuracy and speed on text rendered by our synthetic engine, English and Chinese separately.

Engines: PP-OCRv4 via rapidocr-onnxruntime (the default scorer) and, when installed, Tesseract 5
(Debian tesseract-ocr with eng / chi_sim data). Same images, same metrics, one run.

    python benchmarks/bench_ocr.py --per-language 200 --out benchmarks/results_ocr.md
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from data_modules.synthetic.engine import TextRenderingEngine
from lit_ovis.scoring.metrics import ned, word_accuracy
from lit_ovis.scoring.ocr import reading_order


def tesseract_read(image, language: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        image.save(f.name)
        lang = "chi_sim" if language == "zh" else "eng"
        out = subprocess.run(["tesseract", f.name, "-", "-l", lang, "--psm", "6"], capture_output=True, text=True)
    return " ".join(out.stdout.split())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-language", type=int, default=200)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--out", default="benchmarks/results_ocr.md")
    args = p.parse_args()
    from rapidocr_onnxruntime import RapidOCR

    rapid = RapidOCR()
    engine = TextRenderingEngine(seed=2024, base_size=args.size)
    engines = {"PP-OCRv4 (rapidocr-onnxruntime)": lambda im, lang: reading_order([r for r in (rapid(np.asarray(im))[0] or []) if r[2] >= 0.3])}
    if shutil.which("tesseract"):
        engines["Tesseract 5 (Debian)"] = tesseract_read
    rows = []
    for language in ("en", "zh"):
        samples = [engine.render(i if language == "en" else 100000 + i, language=language) for i in range(args.per_language)]
        for name, read in engines.items():
            start = time.perf_counter()
            texts = [read(s.image, language) for s in samples]
            seconds = time.perf_counter() - start
            acc = float(np.mean([word_accuracy(t, s.text, language) for t, s in zip(texts, samples)]))
            similarity = float(np.mean([ned(t, s.text, language) for t, s in zip(texts, samples)]))
            exact = float(np.mean([word_accuracy(t, s.text, language) == 1.0 for t, s in zip(texts, samples)]))
            rows.append((language, name, len(samples), acc, similarity, exact, len(samples) / seconds))
            print(rows[-1], flush=True)
    lines = [
        "# OCR scorer benchmark (CPU, this machine: 2 cores)", "",
        f"Images: {args.per_language} per language rendered by `data_modules.synthetic.engine` (seed 2024, base side {args.size} px, "
        "all layouts, backgrounds and aspect ratios). Metrics from `lit_ovis.scoring.metrics`.", "",
        "| language | engine | images | word accuracy | NED | images fully correct | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {l} | {n} | {k} | {a:.3f} | {s:.3f} | {e:.3f} | {r:.2f} |" for l, n, k, a, s, e, r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
