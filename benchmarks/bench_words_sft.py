"""SFT prototype on the CPU-scale word task: held-out OCR word accuracy against training steps and time.

1. `data_modules.word_data.ensure_word_data` renders the task, trains (or reuses) its autoencoder and prepares
   the training latents (each step cached);
2. trains exactly as a user would: `python main.py fit --config configs/words_sft.yaml` (+ overrides), niced,
   saving a checkpoint every `--every` steps; while it runs, the training process tree's CPU time is read from
   /proc at each new checkpoint (wall time on a shared machine says little; CPU time says what it cost);
3. scores every checkpoint with `lit-ovis eval`'s `evaluate` on the held-out split (training words, new
   seeds/colours/layouts) and the unseen-words split, each prompt at its own size, OCR fast path;
4. writes the curve to `--out` (markdown) and `<run>/curve.json`.

    python benchmarks/bench_words_sft.py --run runs/words_sft --max-steps 1500 --every 250
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_modules.word_data import ensure_word_data  # noqa: E402
from lit_ovis.scoring.metrics import WordScores, pool_words, word_accuracy_interval  # noqa: E402

STEP = re.compile(r"step=(\d+)")
CONFIG = "configs/words_sft.yaml"


def tree_cpu_seconds(pid: int) -> float | None:
    """utime + stime of `pid` and all its descendants (Linux /proc), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    if pid not in stats:
        return None
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += stats[p][1]
        todo += [c for c, (ppid, _) in stats.items() if ppid == p]
    return total / tick


def train(run: Path, overrides: list[str], every: int, poll: float = 5.0) -> list[dict]:
    """Run the fit command; returns one {step, wall_s, cpu_s, path} per checkpoint as it appeared."""
    ckpts = run / "checkpoints"
    # The shipped config with its run folder moved to `run` (a list element such as the checkpoint callback's
    # dirpath cannot be overridden on the command line).
    run.mkdir(parents=True, exist_ok=True)
    config = run / "words_sft.yaml"
    config.write_text((ROOT / CONFIG).read_text(encoding="utf-8").replace("runs/words_sft", str(run))
                      .replace("every_n_train_steps: 250", f"every_n_train_steps: {every}"), encoding="utf-8")
    cmd = ["nice", "-n", "10", sys.executable, "main.py", "fit", "--config", str(config), "--trainer.enable_progress_bar=false",
           *overrides]
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seen: dict[str, dict] = {}
    cpu = 0.0
    while True:
        done = proc.poll() is not None
        if not done:
            cpu = tree_cpu_seconds(proc.pid) or cpu
        for path in sorted(ckpts.glob("*step=*.ckpt")) if ckpts.exists() else []:
            if path.name not in seen:
                seen[path.name] = {"step": int(STEP.search(path.name).group(1)), "wall_s": round(time.perf_counter() - start, 1),
                                   "cpu_s": round(cpu, 1), "path": str(path)}
                print(f"checkpoint {path.name}: {seen[path.name]['wall_s']} s wall, {seen[path.name]['cpu_s']} s CPU", flush=True)
        if done:
            break
        time.sleep(poll)
    if proc.returncode:
        raise SystemExit(f"training failed with exit code {proc.returncode}")
    return sorted(seen.values(), key=lambda c: c["step"])


def score(checkpoint: str, manifest: Path, out: Path, limit: int | None, steps: int | None, generator=None) -> dict:
    from lit_ovis.cli.eval import evaluate
    from lit_ovis.loading import load_module
    from lit_ovis.scoring import ScorerEnsemble
    from lit_ovis.scoring.prompt_sets import read_prompt_set

    items = read_prompt_set(manifest, limit)
    ensemble = ScorerEnsemble.from_weights({"ocr": 1.0}, {"ocr": {"mode": "recognize", "batch_size": 32}})
    report = evaluate(generator or load_module(checkpoint), items, str(out), ensemble, batch_size=16, steps=steps, progress=False,
                      model_id=checkpoint)
    words = [WordScores(r["ocr"]["word_total"], r["ocr"]["word_correct"], r["ocr"]["word_ned"]) for r in report["samples"]]
    low, high = word_accuracy_interval(words)
    agg = report["aggregate"]
    return {"images": len(words), **pool_words(words), "ci95": [round(low, 3), round(high, 3)],
            "en": agg.get("en", {}).get("word_accuracy"), "zh": agg.get("zh", {}).get("word_accuracy")}


def caption_use(checkpoint: str, latents_root: Path, batches: int = 6, batch_size: int = 16, module_class=None) -> dict:
    """Does the model read its caption? Flow loss on training latents with their own prompt embeddings vs the
    empty prompt's, same noise and timesteps (t uniform in [0.1, 0.9]); a model that ignores the text scores
    both the same. Raw (not EMA) weights."""
    import torch

    from data_modules.streaming import LatentDataModule
    from lit_ovis.modules.flow_matching import FlowMatchingModule

    module = (module_class or FlowMatchingModule).load_from_checkpoint(checkpoint, map_location="cpu").eval()
    data = LatentDataModule(root=str(latents_root), batch_size=batch_size, num_workers=0, seed=1)
    data.setup("fit")
    caption, empty = [], []
    for i, batch in zip(range(batches), data.train_dataloader()):
        batch = data.on_after_batch_transfer(batch, 0)
        gen = torch.Generator().manual_seed(i)
        n = batch["latents"].shape[0]
        batch["timesteps"] = torch.rand(n, generator=gen) * 0.8 + 0.1
        batch["noise"] = torch.randn(batch["latents"].shape, generator=gen)
        with torch.no_grad():
            caption.append(module.flow_loss(batch)[0].item())
            empty.append(module.flow_loss({**batch, "prompt_embeds": module.empty_embed.expand(n, -1, -1)})[0].item())
    c, e = sum(caption) / len(caption), sum(empty) / len(empty)
    return {"loss_caption": round(c, 4), "loss_empty": round(e, 4), "gain": round((e - c) / e, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/words", help="word-task data folder (built on first use)")
    p.add_argument("--task-root", default=None,
                   help="train on another task folder built beforehand (`lit-ovis word-task` with other settings, "
                        "`lit-ovis prepare` into <task-root>/latents with --root's autoencoder) instead of --root's")
    p.add_argument("--run", default="runs/words_sft")
    p.add_argument("--max-steps", type=int, default=1500)
    p.add_argument("--every", type=int, default=250, help="checkpoint (and score) every this many steps")
    p.add_argument("--heldout-limit", type=int, default=256)
    p.add_argument("--unseen-limit", type=int, default=64)
    p.add_argument("--sampling-steps", type=int, default=None, help="default: the config's sampling.steps")
    p.add_argument("--skip-train", action="store_true", help="only score the checkpoints already in --run")
    p.add_argument("--score-steps", type=lambda v: {int(x) for x in v.split(",")}, default=None,
                   help="comma-separated steps whose checkpoints are scored (default: all; a checkpoint costs ~1.3 CPU s per prompt)")
    p.add_argument("--out", default="benchmarks/results_words_sft.md")
    p.add_argument("overrides", nargs="*", help="extra `main.py fit` overrides, e.g. --model.optimizer.lr=2e-3")
    args = p.parse_args()
    if args.task_root:  # built beforehand: nothing to render, train or prepare here
        from lit_ovis.models.autoencoder_training import read_report

        ae = read_report(ROOT / args.root / "autoencoder") or {}
        task_root = ROOT / args.task_root
        manifests = {split: task_root / f"{split}.jsonl" for split in ("heldout", "unseen")}
        missing = [str(p) for p in [*manifests.values(), task_root / "latents" / "report.json"] if not p.exists()]
        if missing:
            raise SystemExit(f"--task-root {args.task_root}: missing {', '.join(missing)} (build it with lit-ovis word-task and prepare)")
        latents = task_root / "latents"
        args.overrides = [f"--data.root={latents}", *args.overrides]
    else:
        data = ensure_word_data(ROOT / args.root)
        ae, manifests, latents = data.reports["autoencoder"], data.manifests, data.latents
    run = ROOT / args.run
    if args.skip_train:
        checkpoints = json.loads((run / "curve.json").read_text())["checkpoints"]
    else:
        config_text = (ROOT / CONFIG).read_text(encoding="utf-8")
        if "every_n_train_steps: 250" not in config_text:
            raise SystemExit(f"{CONFIG}: expected the checkpoint callback's every_n_train_steps: 250 to set --every")
        checkpoints = train(run, [f"--trainer.max_steps={args.max_steps}", *args.overrides], every=args.every)
        (run / "curve.json").write_text(json.dumps({"checkpoints": checkpoints, "args": vars(args)}, indent=1))  # --skip-train reads it
    for c in [c for c in checkpoints if not args.score_steps or c["step"] in args.score_steps]:
        if args.skip_train and "heldout" in c and c.get("limits") == [args.heldout_limit, args.unseen_limit]:
            continue  # scored before with the same limits
        c["limits"] = [args.heldout_limit, args.unseen_limit]
        name = f"step-{c['step']}"
        c["caption_use"] = caption_use(c["path"], latents)
        c["heldout"] = score(c["path"], manifests["heldout"], run / "eval" / name / "heldout", args.heldout_limit, args.sampling_steps)
        c["unseen"] = score(c["path"], manifests["unseen"], run / "eval" / name / "unseen", args.unseen_limit, args.sampling_steps)
        print(json.dumps({k: c[k] for k in ("step", "wall_s", "cpu_s", "caption_use", "heldout", "unseen")}), flush=True)
        (run / "curve.json").write_text(json.dumps({"checkpoints": checkpoints, "args": vars(args)}, indent=1))
    rows = [f"| {c['step']} | {c['wall_s']:.0f} | {c['cpu_s']:.0f} | {c['heldout']['word_accuracy']:.3f} "
            f"[{c['heldout']['ci95'][0]:.3f}, {c['heldout']['ci95'][1]:.3f}] | {c['heldout']['ned']:.3f} | "
            f"{c['heldout']['en'] or 0:.3f} / {c['heldout']['zh'] or 0:.3f} | {c['unseen']['word_accuracy']:.3f} | "
            f"{c['caption_use']['loss_caption']:.4f} / {c['caption_use']['loss_empty']:.4f} |" for c in checkpoints if "caption_use" in c]
    lines = [
        "# SFT prototype on the word task (CPU, 2 shared cores)", "",
        f"`python benchmarks/bench_words_sft.py --max-steps {args.max_steps} --every {args.every} {' '.join(args.overrides)}`"
        f"{' on ' + args.task_root if args.task_root else ''}: "
        "`configs/words_sft.yaml` (tiny MMDiT, tiny random Qwen3, the task's own 4x autoencoder), held-out split "
        f"({args.heldout_limit} prompts: training words, new seeds/colours/layouts, each at its own size) and unseen words "
        f"({args.unseen_limit} prompts), OCR fast path. Autoencoder: {ae.get('parameters')} parameters, trained in "
        f"{ae.get('train_seconds')} s wall / {ae.get('train_cpu_seconds')} s CPU (cached, not part of these times).", "",
        "Wall time is that of a machine shared with other jobs (niced); CPU time is the training process tree's.", "",
        "Flow loss with caption / empty prompt: the same training latents, noise and timesteps with their own prompt "
        "embeddings and with the empty prompt's; equal losses mean the model does not read its caption.", "",
        "| step | wall s | CPU s | held-out word accuracy [95% CI] | NED | EN / ZH | unseen words accuracy | flow loss caption / empty |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows,
    ]
    Path(ROOT / args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
