"""The report's stage ladder at CPU scale (issue #12): SFT -> make-pairs -> Diffusion-DPO / SDPO -> Flow-GRPO.

Every stage runs as a user chains them, one command each, each starting from the previous stage's checkpoint:

1. SFT:        python main.py fit --config configs/words_sft.yaml
2. pairs:      lit-ovis make-pairs (training references vs SFT samples, ranked by the OCR reader), plus held-out
               pairs for the winner error
3. DPO:        python main.py fit --config configs/dpo.yaml --config configs/words_dpo.yaml, once per variant on
               the same pairs: plain Diffusion-DPO, Eq. 3 of the report ("report" rule) and the Diffusion-SDPO
               release's rule ("paper": lambda = 1 where the winner and loser gradients do not conflict)
4. GRPO:       python main.py fit --config configs/grpo.yaml --config configs/words_grpo.yaml from the best DPO
               variant, with per-group and with global reward std

After each stage `lit-ovis eval` samples the held-out prompts (the training words in unseen seeds, colours and
layouts, each at its own size) and reads them with the OCR fast path: word accuracy with a 95% bootstrap
interval, NED, the paired gain over the previous rung with its interval, and mean brightness / RMS contrast of
the samples (the `brightness` / `contrast` scorers: OCR-driven RL is known to darken or blur images). The unseen-word split is reported, not targeted.

Resumable: a finished stage (its `done.json`) is skipped, a killed `fit` resumes from its last checkpoint
(`ckpt_path: last`), eval reuses finished samples. Results: `<run>/ladder.json` and `--out` (Markdown).

    python benchmarks/bench_ladder.py --task-root data/words --run runs/ladder
    python benchmarks/bench_ladder.py --sft-checkpoint runs/words_sft/checkpoints/last.ckpt   # reuse an SFT run
    python benchmarks/bench_ladder.py --task demo --run runs/ladder_demo   # the demo's six-word task, ~34 min
    python benchmarks/bench_ladder.py --task demo --run runs/ladder_demo_s1 --seed 1   # the same with another seed

`--task demo` builds its own task first (under --task-root, default data/ladder_demo): the six words, sizes,
colours and autoencoder of configs/demo.yaml with 256 held-out and 32 unseen renders, then runs every stage at
the sizes in DEMO_PRESET (SFT 400 steps, 48 text tokens, 128x32 samples). Options given explicitly win.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_ovis.scoring.metrics import (WordScores, pool_words, word_accuracy_gain_interval,  # noqa: E402
                                      word_accuracy_interval)

DPO_VARIANTS = {
    "plain": ["--model.init_args.sdpo.safeguard.enabled=false"],
    "report": ["--model.init_args.sdpo.safeguard.rule=report"],  # mu: the config's (0.5)
    "paper": ["--model.init_args.sdpo.safeguard.rule=paper", "--model.init_args.sdpo.safeguard.mu=0.6"],
}
GRPO_VARIANTS = {
    "group_std": [],
    "global_std": ["--model.init_args.grpo.advantages.global_std=true"],
}
# `--task demo`: the ladder's defaults and per-stage overrides on the demo's task (benchmarks/RESULTS.md)
DEMO_SIZES = ("--model.init_args.encoders.max_sequence_length=48 --model.init_args.sampling.height=32 "
              "--model.init_args.sampling.width=128")
DEMO_PRESET = {
    "task_root": "data/ladder_demo", "sft_steps": 400, "dpo_steps": 150, "grpo_steps": 120, "pairs": 256, "val_pairs": 32,
    "heldout": 256, "unseen": 32, "resolution": 64,
    "sft_overrides": f"{DEMO_SIZES} --data.resolutions=[64] --model.init_args.optimizer.lr=3e-3 "
                     "--model.init_args.optimizer.warmup_steps=50 --model.init_args.ema.decay=0.99 --trainer.val_check_interval=200 "
                     "--data.num_workers=0",
    "dpo_overrides": DEMO_SIZES,
    # two PPO epochs of two minibatches per rollout batch (4 optimizer steps per iteration, 30 iterations) at lr 5e-5
    # with KL beta 0.04: of the settings tried, the one that lost no words (seeds 0 / 1 / 2: +0.041 / +0.021 / -0.003,
    # only seed 0's interval above zero); lr 1e-4 with beta 0.01 gave +0.038 and -0.176 (benchmarks/RESULTS.md)
    "grpo_overrides": f"{DEMO_SIZES} --data.batch_size=4 --model.init_args.optimizer.lr=5e-5 "
                      "--model.init_args.grpo.update.kl_beta=0.04 "
                      "--model.init_args.grpo.update.inner_epochs=2 --model.init_args.grpo.update.optimizer_steps_per_epoch=2",
}
WORDS_DEFAULTS = {"task_root": "data/words", "sft_steps": 3000, "dpo_steps": 300, "grpo_steps": 60, "pairs": 512, "val_pairs": 64,
                  "heldout": 256, "unseen": 64, "resolution": 96, "sft_overrides": "", "dpo_overrides": "", "grpo_overrides": ""}
PAIR_KEYS = ("prompts", "pairs", "dropped_small_margin", "reference_wins")
OCR_KWARGS = json.dumps({"ocr": {"mode": "recognize", "batch_size": 32}})


def log(msg: str) -> None:
    print(f"[ladder {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], what: str) -> float:
    """Run one user-facing command; returns its wall seconds; a failure stops the ladder naming the stage."""
    log(f"{what}: {' '.join(cmd)}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"ladder stage '{what}' failed (exit code {proc.returncode}); rerun the same command to resume")
    return round(time.perf_counter() - start, 1)


def fit(stage_dir: Path, configs: list[str], overrides: list[str], what: str) -> dict:
    """`main.py fit` into `stage_dir` (its default_root_dir) unless it finished before; returns its record."""
    done = stage_dir / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    cmd = [sys.executable, "main.py", "fit", *[a for c in configs for a in ("--config", c)],
           f"--trainer.default_root_dir={stage_dir}", "--trainer.enable_progress_bar=false", *overrides]
    record = {"checkpoint": str(stage_dir / "checkpoints" / "last.ckpt"), "wall_s": run(cmd, what), "command": cmd[1:]}
    record["curves"] = tensorboard_curves(stage_dir / "tb")
    done.write_text(json.dumps(record, indent=1))
    return record


def tensorboard_curves(tb: Path, points: int = 6) -> dict[str, list]:
    """Each scalar the run logged, averaged over `points` equal spans of its steps: [(last step, mean), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list] = {}
    for events in sorted(tb.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(("train/", "val/", "reward/", "time/", "adv/")):
                curves.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    out = {}
    for tag, values in curves.items():
        values.sort()
        n = max(1, len(values) // points)
        spans = [values[i:i + n] for i in range(0, len(values), n)]
        out[tag] = [(span[-1][0], round(sum(v for _, v in span) / len(span), 5)) for span in spans]
    return out


def evaluate(checkpoint: str, manifest: Path, out: Path, limit: int, steps: int | None) -> dict:
    """`lit-ovis eval` of one checkpoint on one split; returns the pooled metrics and per-image word scores."""
    metrics, summary = out / "metrics.json", out / "ladder_eval.json"
    stat = Path(checkpoint).stat()
    key = {"checkpoint": checkpoint, "mtime_ns": stat.st_mtime_ns, "size": stat.st_size, "limit": limit, "steps": steps}
    if summary.exists() and json.loads(summary.read_text()).get("key") == key:  # scored before: nothing to run
        return json.loads(summary.read_text())["result"]
    cmd = [sys.executable, "-m", "lit_ovis", "eval", checkpoint, str(manifest), "--output-dir", str(out), "--scorers", "ocr,brightness,contrast",
           "--scorer-kwargs", OCR_KWARGS, "--limit", str(limit), "--batch-size", "16"]
    if steps:
        cmd += ["--steps", str(steps)]
    wall = run(cmd, f"eval {out.parent.name}/{out.name}")
    report = json.loads(metrics.read_text())
    samples = report["samples"]
    words = [WordScores(s["ocr"]["word_total"], s["ocr"]["word_correct"], s["ocr"]["word_ned"]) for s in samples]
    low, high = word_accuracy_interval(words)
    agg = report["aggregate"]
    result = {"images": len(samples), **{k: round(v, 4) if isinstance(v, float) else v for k, v in pool_words(words).items()},
            "ci95": [round(low, 4), round(high, 4)], "en": agg.get("en", {}).get("word_accuracy"),
            "zh": agg.get("zh", {}).get("word_accuracy"), "wall_s": wall,
            # mean luminance and its std over pixels (lit_ovis.scoring's scorers), averaged over the images
            **{k: round(agg["all"][k], 4) for k in ("brightness", "contrast")},
            "_words": [[w.total, w.correct] for w in words]}
    summary.write_text(json.dumps({"key": key, "result": result}))
    return result


def sample_grid(eval_dir: Path, out: Path, n: int = 18, per_row: int = 6) -> Path:
    """The first `n` samples of an eval (the same prompts and seeds at every stage), OCR text under each image."""
    from PIL import Image, ImageDraw

    from lit_ovis.render import load_font

    samples = json.loads((eval_dir / "metrics.json").read_text())["samples"][:n]
    cell_w, cell_h, label = 192, 96, 18
    rows = -(-len(samples) // per_row)
    grid = Image.new("RGB", (per_row * cell_w, rows * (cell_h + label)), "white")
    draw = ImageDraw.Draw(grid)
    font = load_font(12, "中")  # a CJK-capable font: labels hold Chinese OCR text
    for i, s in enumerate(samples):
        img = Image.open(eval_dir / s["image"]).convert("RGB")
        img.thumbnail((cell_w, cell_h))
        x, y = (i % per_row) * cell_w, (i // per_row) * (cell_h + label)
        grid.paste(img, (x + (cell_w - img.width) // 2, y + (cell_h - img.height) // 2))
        mark = "ok" if s["ocr"]["word_correct"] == s["ocr"]["word_total"] else "x"
        draw.text((x + 4, y + cell_h + 2), f"{s['target_text']} -> {s['ocr_text'] or '-'} [{mark}]", fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def gain(before: dict, after: dict) -> dict:
    g, low, high = word_accuracy_gain_interval([WordScores(*w) for w in before["_words"]], [WordScores(*w) for w in after["_words"]])
    return {"gain": round(g, 4), "ci95": [round(low, 4), round(high, 4)], "significant": bool(low > 0)}


def subset_manifest(manifest: Path, out: Path, n: int) -> Path:
    lines = [line for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    out.parent.mkdir(parents=True, exist_ok=True)
    # references are resolved against the manifest's folder: absolute paths keep them valid from `out`'s
    rows = []
    for line in lines:
        row = json.loads(line)
        if "path" in row and not Path(row["path"]).is_absolute():
            row["path"] = str((manifest.parent / row["path"]).resolve())
        rows.append(json.dumps(row, ensure_ascii=False))
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def make_pairs(checkpoint: str, manifest: Path, out: Path, n: int, resolution: int, steps: int) -> dict:
    report = out / "report.json"
    if not report.exists():
        subset = subset_manifest(manifest, out.parent / f"{out.name}.jsonl", n)
        cmd = [sys.executable, "-m", "lit_ovis", "make-pairs", "--manifest", str(subset), "--output-dir", str(out),
               "--resolution", str(resolution), "--checkpoint", checkpoint, "--scorers", "ocr=1.0",
               "--scorer-kwargs", OCR_KWARGS, "--steps", str(steps), "--guidance-scale", "4.0", "--batch-size", "16"]
        run(cmd, f"make-pairs {out.name}")
    return json.loads((out / str(resolution) / "report.json").read_text())  # the resolution's: counts and winners


def winner_error(record: dict) -> dict:
    """Held-out winner error of a DPO run vs its reference, from its last validation (lower = better)."""
    curves = record.get("curves", {})
    if "val/policy_loss_w" not in curves:
        return {}
    last = lambda tag: curves[tag][-1][1]  # noqa: E731
    return {"policy_loss_w": last("val/policy_loss_w"), "ref_loss_w": last("val/ref_loss_w"),
            "delta_w": round(last("val/policy_loss_w") - last("val/ref_loss_w"), 5),
            "implicit_acc": last("val/implicit_acc") if "val/implicit_acc" in curves else None}


def build_demo_task(root: Path) -> None:
    """The demo's task (configs/demo.yaml: words, sizes, colours, autoencoder) with 256 held-out and 32 unseen renders,
    its autoencoder and latents under `root`, as the demo's data module builds them (cached)."""
    import yaml

    from data_modules.synthetic.word_task import WordTaskConfig
    from data_modules.word_data import ensure_word_data
    from lit_ovis.models.autoencoder_training import AutoencoderConfig

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    data, encoders = demo["data"]["init_args"], demo["model"]["init_args"]["encoders"]
    task = {k: tuple(v) if isinstance(v, list) else v for k, v in data["task"].items()}
    ensure_word_data(root, WordTaskConfig(**{**task, "heldout_samples": 256, "unseen_samples": 32}),
                     AutoencoderConfig(**data["autoencoder"]), text_encoder=encoders["text_encoder"],
                     max_sequence_length=encoders["max_sequence_length"], template_cut=encoders["template_cut"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="words", choices=["words", "demo"],
                   help="words: a task built beforehand in --task-root; demo: build the demo's six-word task and use DEMO_PRESET")
    p.add_argument("--task-root", default=None, help="word task with autoencoder/ and latents/ (data_modules.word_data); "
                   "default data/words, or data/ladder_demo with --task demo")
    p.add_argument("--run", default="runs/ladder")
    p.add_argument("--sft-checkpoint", default=None, help="reuse this SFT checkpoint instead of training one")
    p.add_argument("--sft-steps", type=int, default=None, help="default 3000 (demo 400)")
    p.add_argument("--dpo-steps", type=int, default=None, help="default 300 (demo 150)")
    p.add_argument("--grpo-steps", type=int, default=None, help="optimizer steps (iterations x inner epochs x steps per "
                   "epoch); default 60 (demo 120 = 30 iterations x 2 x 2)")
    p.add_argument("--pairs", type=int, default=None, help="training prompts made into pairs (default 512, demo 256)")
    p.add_argument("--val-pairs", type=int, default=None, help="held-out prompts made into pairs for the winner error (default 64, demo 32)")
    p.add_argument("--heldout", type=int, default=None, help="held-out prompts scored after each stage (default 256)")
    p.add_argument("--unseen", type=int, default=None, help="unseen-word prompts scored after each stage (default 64, demo 32)")
    p.add_argument("--resolution", type=int, default=None, help="prepare's resolution of the task (default 96, demo 64)")
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--dpo-variants", default="plain,report,paper")
    p.add_argument("--grpo-variants", default="group_std,global_std")
    for stage in ("sft", "dpo", "grpo"):
        p.add_argument(f"--{stage}-overrides", default=None, help=f"extra `main.py fit` arguments of the {stage.upper()} runs (one string)")
    p.add_argument("--seed", type=int, default=None, help="seed_everything of every training stage (default: the "
                   "configs' 0); the held-out prompts keep their own seeds, so stages of different runs stay paired")
    p.add_argument("--out", default=None, help="Markdown results file (default: <run>/ladder.md)")
    args = p.parse_args()
    for key, value in (DEMO_PRESET if args.task == "demo" else WORDS_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.task == "demo":
        build_demo_task((ROOT / args.task_root).resolve())

    task, run_dir = (ROOT / args.task_root).resolve(), (ROOT / args.run).resolve()
    manifests = {s: task / f"{s}.jsonl" for s in ("train", "heldout", "unseen")}
    missing = [str(x) for x in [*manifests.values(), task / "autoencoder", task / "latents" / "report.json"] if not x.exists()]
    if missing:
        raise SystemExit(f"--task-root {args.task_root}: missing {', '.join(missing)}; build it with "
                         "data_modules.word_data.ensure_word_data or the commands in configs/words_sft.yaml")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    encoders = [f"--model.init_args.encoders.vae={task / 'autoencoder'}"]
    extra = {stage: shlex.split(getattr(args, f"{stage}_overrides")) for stage in ("sft", "dpo", "grpo")}
    if args.seed is not None:
        for stage_extra in extra.values():
            stage_extra.append(f"--seed_everything={args.seed}")
    results: dict = {"args": vars(args), "stages": {}}
    stages = results["stages"]

    def score(name: str, checkpoint: str) -> dict:
        out = {"heldout": evaluate(checkpoint, manifests["heldout"], run_dir / "eval" / name / "heldout", args.heldout, args.sampling_steps)}
        out["grid"] = str(sample_grid(run_dir / "eval" / name / "heldout", run_dir / "grids" / f"{name}.png"))
        if args.unseen:
            out["unseen"] = evaluate(checkpoint, manifests["unseen"], run_dir / "eval" / name / "unseen", args.unseen, args.sampling_steps)
        return out

    def save() -> None:
        results["wall_s"] = round(time.perf_counter() - started, 1)
        (run_dir / "ladder.json").write_text(json.dumps(results, indent=1))
        Path(args.out or run_dir / "ladder.md").write_text(markdown(results), encoding="utf-8")

    # 1. SFT
    if args.sft_checkpoint:
        sft = {"checkpoint": str(Path(args.sft_checkpoint).resolve()), "wall_s": None, "reused": True}
    else:
        sft = fit(run_dir / "sft", ["configs/words_sft.yaml"],
                  [f"--data.root={task / 'latents'}", f"--trainer.max_steps={args.sft_steps}", *encoders, *extra["sft"]], "SFT")
    stages["sft"] = {**sft, **score("sft", sft["checkpoint"])}
    save()

    # 2. pairs from the SFT model
    pairs = make_pairs(sft["checkpoint"], manifests["train"], run_dir / "pairs", args.pairs, args.resolution, args.sampling_steps)
    val_pairs = make_pairs(sft["checkpoint"], manifests["heldout"], run_dir / "val_pairs", args.val_pairs, args.resolution,
                           args.sampling_steps)
    results["pairs"] = {k: pairs.get(k) for k in PAIR_KEYS if k in pairs}
    results["val_pairs"] = {k: val_pairs.get(k) for k in PAIR_KEYS if k in val_pairs}
    save()

    # 3. DPO variants on the same pairs
    dpo = {}
    for name in [v for v in args.dpo_variants.split(",") if v]:
        record = fit(run_dir / f"dpo_{name}", ["configs/dpo.yaml", "configs/words_dpo.yaml"],
                     [f"--model.init_args.backbone.pretrained={sft['checkpoint']}", f"--data.root={run_dir / 'pairs'}",
                      f"--data.val_root={run_dir / 'val_pairs'}", f"--trainer.max_steps={args.dpo_steps}", *encoders,
                      *DPO_VARIANTS[name], *extra["dpo"]], f"DPO ({name})")
        dpo[name] = {**record, "winner_error": winner_error(record), **score(f"dpo_{name}", record["checkpoint"])}
        dpo[name]["gain_over_sft"] = gain(stages["sft"]["heldout"], dpo[name]["heldout"])
        stages[f"dpo_{name}"] = dpo[name]
        save()
    best = max(dpo, key=lambda n: (dpo[n]["heldout"]["word_accuracy"] or 0.0, -(dpo[n]["winner_error"].get("delta_w") or 0.0)))
    results["dpo_chosen"] = best

    # 4. GRPO variants from the chosen DPO model
    for name in [v for v in args.grpo_variants.split(",") if v]:
        record = fit(run_dir / f"grpo_{name}", ["configs/grpo.yaml", "configs/words_grpo.yaml"],
                     [f"--model.init_args.backbone.pretrained={dpo[best]['checkpoint']}", f"--data.prompt_file={manifests['train']}",
                      f"--trainer.max_steps={args.grpo_steps}", *encoders, *GRPO_VARIANTS[name], *extra["grpo"]], f"GRPO ({name})")
        scores = score(f"grpo_{name}", record["checkpoint"])
        stages[f"grpo_{name}"] = {**record, **scores, "gain_over_dpo": gain(dpo[best]["heldout"], scores["heldout"])}
        save()
    save()
    log(f"done in {results['wall_s']} s: {run_dir / 'ladder.json'}")
    print(markdown(results))


def markdown(results: dict) -> str:
    rows = ["| stage | held-out word acc. [95% CI] | gain over previous rung [95% CI] | NED | EN / ZH | unseen words acc. | "
            "brightness | contrast | winner error Δ (held-out pairs) | fit wall s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, st in results["stages"].items():
        h = st.get("heldout", {})
        g = st.get("gain_over_sft") or st.get("gain_over_dpo")
        gtxt = f"{g['gain']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]" if g else ""
        u = st.get("unseen", {})
        we = st.get("winner_error") or {}
        en, zh = h.get("en"), h.get("zh")
        rows.append(f"| {name} | {h.get('word_accuracy', 0):.3f} [{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}] | {gtxt} | "
                    f"{h.get('ned', 0):.3f} | {en if en is None else round(en, 3)} / {zh if zh is None else round(zh, 3)} | "
                    f"{u.get('word_accuracy', '')} | {h.get('brightness')} | {h.get('contrast')} | "
                    f"{we.get('delta_w', '')} | {st.get('wall_s')} |" if h else f"| {name} | | | | | | | | | |")
    extra = [f"\nDPO variant chosen for GRPO: {results.get('dpo_chosen')}; pairs: {results.get('pairs')}; "
             f"held-out pairs: {results.get('val_pairs')}; ladder wall: {results.get('wall_s')} s"]
    return "\n".join(rows + extra) + "\n"


if __name__ == "__main__":
    main()
