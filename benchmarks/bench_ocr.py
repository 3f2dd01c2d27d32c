"""OCR accuracy and speed on text rendered by our synthetic engine, English and Chinese separately.

Engines: PP-OCRv4 via rapidocr-onnxruntime as the `ocr` scorer reads (with its space recovery) and, when
installed, Tesseract 5 (Debian tesseract-ocr with eng / chi_sim data). Same images, same metrics, one run.
Metrics as the benchmarks aggregate them (`lit_ovis.scoring.metrics`): CVTG-2K word accuracy and NED pooled
over every target word (characters for ZH), LongText-Bench text accuracy pooled over words / characters.

    python benchmarks/bench_ocr.py --per-language 200 --out benchmarks/results_ocr.md

`--word-task N` instead reads N held-out images of the CPU-scale word task (small single-line renders,
data_modules/synthetic/word_task.py) with both reading paths of the `ocr` scorer on the same images, in the
same process, interleaved: detection + recognition (`mode="detect"`) and batched recognition without detection
(`mode="recognize"`, the GRPO reward path):

    python benchmarks/bench_ocr.py --word-task 256 --out benchmarks/results_ocr_words.md
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


def word_task_paths(n: int, batch_size: int, rounds: int, out: str) -> None:
    """Both OCR paths on the same word-task images: accuracy once, speed as the median of interleaved rounds."""
    from data_modules.synthetic.word_task import WordTask, WordTaskConfig
    from lit_ovis.scoring import build_scorer

    task = WordTask(WordTaskConfig(heldout_samples=n))
    samples = [(spec, s) for spec, s in task.samples("heldout")]
    images = [s.image for _, s in samples]
    paths = {"detect": build_scorer("ocr", mode="detect", batch_size=batch_size),
             "recognize": build_scorer("ocr", mode="recognize", batch_size=batch_size)}
    texts, speed = {}, {name: [] for name in paths}
    for scorer in paths.values():
        scorer.read(images[:2])  # ONNX sessions warmed up outside the timing
    for r in range(rounds):
        for name, scorer in paths.items():
            start = time.perf_counter()
            texts[name] = [t for i in range(0, len(images), batch_size) for t in scorer.read(images[i: i + batch_size])]
            speed[name].append(len(images) / (time.perf_counter() - start))
            print(f"round {r} {name}: {speed[name][-1]:.2f} images/s", flush=True)
    rows = []
    for name in paths:
        for language in ("all", "en", "zh"):
            pick = [k for k, (spec, _) in enumerate(samples) if language in ("all", spec.language)]
            words = [word_scores(texts[name][k], samples[k][0].text, samples[k][0].language) for k in pick]
            pooled = pool_words(words)
            rows.append((name, language, len(pick), pooled["word_accuracy"], pooled["ned"]))
    median = {name: float(np.median(v)) for name, v in speed.items()}
    sizes = sorted({spec.size for spec, _ in samples})
    lines = [
        "# OCR reading paths on the word task (CPU, 2 shared cores)", "",
        f"{len(images)} held-out images of the word task (`WordTaskConfig()` defaults: sizes {sizes}, one upper-case English word "
        "or two Chinese characters per image). Both paths of the `ocr` scorer read the same images in one process, "
        f"interleaved over {rounds} rounds (median images/s; batches of {batch_size}; ONNX Runtime's default threads). The machine "
        "was shared with other jobs, so the ratio is the robust number.", "",
        "| path | images/s (median) | speed-up |", "| --- | --- | --- |",
        *[f"| {name} | {median[name]:.2f} | {median[name] / median['detect']:.1f}x |" for name in paths], "",
        "| path | language | images | word accuracy (CVTG-2K, pooled over words) | NED |", "| --- | --- | --- | --- | --- |",
        *[f"| {n} | {lang} | {k} | {a:.3f} | {e:.3f} |" for n, lang, k, a, e in rows],
    ]
    Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-language", type=int, default=200)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--out", default=None, help="default: benchmarks/results_ocr.md (benchmarks/results_ocr_words.md with --word-task)")
    p.add_argument("--word-task", type=int, default=0, metavar="N", help="compare the two reading paths on N word-task images")
    p.add_argument("--batch-size", type=int, default=32, help="--word-task: images per scorer call")
    p.add_argument("--rounds", type=int, default=3, help="--word-task: interleaved timing rounds")
    args = p.parse_args()
    if args.word_task:
        word_task_paths(args.word_task, args.batch_size, args.rounds, args.out or "benchmarks/results_ocr_words.md")
        return
    args.out = args.out or "benchmarks/results_ocr.md"
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
