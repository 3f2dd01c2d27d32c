"""OCR accuracy and speed on text rendered by our synthetic engine, English and Chinese separately.

Engines: PP-OCRv4 via rapidocr-onnxruntime as the `ocr` scorer reads (with its space recovery) and, when
installed, Tesseract 5 (Debian tesseract-ocr with eng / chi_sim data). Same images, same metrics, one run.
Metrics as the benchmarks aggregate them (`lit_ovis.scoring.metrics`): CVTG-2K word accuracy and NED pooled
over every target word (characters for ZH), LongText-Bench text accuracy pooled over words / characters.

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
from lit_ovis.scoring.metrics import pool_words, text_match, word_scores


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
    from lit_ovis.scoring import build_scorer

    ocr = build_scorer("ocr")
    engine = TextRenderingEngine(seed=2024, base_size=args.size)
    engines = {"PP-OCRv4 (rapidocr-onnxruntime)": lambda im, lang: ocr.read([im])[0]}
    if shutil.which("tesseract"):
        engines["Tesseract 5 (Debian)"] = tesseract_read
    rows = []
    for language in ("en", "zh"):
        samples = [engine.render(i if language == "en" else 100000 + i, language=language) for i in range(args.per_language)]
        for name, read in engines.items():
            start = time.perf_counter()
            texts = [read(s.image, language) for s in samples]
            seconds = time.perf_counter() - start
            words = [word_scores(t, s.text, language) for t, s in zip(texts, samples)]
            pooled = pool_words(words)
            matches = [text_match(t, s.text, language) for t, s in zip(texts, samples)]
            text_acc = sum(m for m, _ in matches) / sum(n for _, n in matches)
            exact = float(np.mean([w.correct == w.total for w in words]))
            rows.append((language, name, len(samples), pooled["word_accuracy"], pooled["ned"], text_acc, exact, len(samples) / seconds))
            print(rows[-1], flush=True)
    lines = [
        "# OCR scorer benchmark (CPU, this machine: 2 cores)", "",
        f"Images: {args.per_language} per language rendered by `data_modules.synthetic.engine` (seed 2024, base side {args.size} px, "
        "all layouts, backgrounds and aspect ratios). Metrics from `lit_ovis.scoring.metrics`, pooled as the benchmarks pool them: "
        "word accuracy and NED over every target word (CVTG-2K definition; Chinese characters as words), text accuracy over "
        "words / characters (LongText-Bench). Speed: one process, sequential reads, `nice`d on a CPU shared with other jobs.", "",
        "| language | engine | images | word accuracy (CVTG-2K) | NED (CVTG-2K) | text accuracy (LongText) | images fully correct | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {l} | {n} | {k} | {a:.3f} | {s:.3f} | {t:.3f} | {e:.3f} | {r:.2f} |" for l, n, k, a, s, t, e, r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
