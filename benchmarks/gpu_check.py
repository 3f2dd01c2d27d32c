"""One GPU check, run once unattended on a fresh H100/H200 in under 8 minutes: `bash benchmarks/gpu_check.sh [OUT]`.

It measures, each measurement guarded (a missing kernel or an OOM is recorded and the rest go on) and all of
them within one time budget (`--budget-s`; what no longer fits is recorded as skipped, never run half):
1. host syncs per training step of configs/smoke.yaml's flow-matching training on the device
   (`callbacks.host_reads.HostReadCounter`: `aten::_local_scalar_dense` calls and every operation CUDA's
   sync-debug mode flags), by step class: plain steps should show 0;
2. training MFU of full-width blocks (2 double + 4 single, 3072 wide = 24 heads x 128) at 256/512/1024 with
   the batch per GPU of the stage configs (32/8/4), bf16 through FSDP2's MixedPrecisionPolicy on a 1-rank mesh
   (what training runs), fused AdamW: eager with each diffusers attention backend that is installed
   (native, _native_flash, _native_cudnn, _native_efficient, flash, _flash_3), and with regional compile
   (1024 first, static; 256 and 512 then on the shape-dynamic graphs, as multi-resolution training runs them)
   (`benchmarks/bench_train_step.py` builds and steps the model; FLOPs from `lit_ovis/parallel/flops.py`);
3. peak memory of those training steps vs `lit-ovis estimate-memory`'s model for the same model and batch
   (weights, gradients, moments, gathered block, activations; `lit_ovis/cli/estimate_memory.py`);
4. 1024^2 x 50-step CFG-5 sampling of the 7B architecture (random weights), ours vs `OvisImagePipeline`
   on the same modules, eager then compiled (`benchmarks/bench_sampling.py`).
It writes OUT/gpu_check.json after every measurement (a kill keeps what was measured) and OUT/gpu_check.md.

    python benchmarks/gpu_check.py --out-dir runs/gpu_check            # GPU
    python benchmarks/gpu_check.py --smoke --out-dir /tmp/gpu_check    # CPU smoke: tiny sizes, few steps
    python benchmarks/gpu_check.py --render runs/gpu_check/gpu_check.json   # the Markdown again
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(HERE), str(ROOT)):  # the sibling benchmark scripts and the repo's packages
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

PROCESS_START = time.monotonic()  # the budget counts imports and CUDA start-up too
GIB = 2**30
BACKENDS = ("native", "_native_flash", "_native_cudnn", "_native_efficient", "flash", "_flash_3")
BATCH = {256: 32, 512: 8, 1024: 4}  # per GPU, as configs/pretrain_256.yaml, pretrain_multires.yaml, sft.yaml
REPORT_H100_SECONDS = 13.74


# ------------------------------------------------------------------------------------------ guarded runs
class MeasurementTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float | None):
    """Raise MeasurementTimeout in the main thread after `seconds` (Python code only; the outer `timeout` of
    gpu_check.sh covers a hang inside a kernel)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise MeasurementTimeout(f"stopped after {seconds:.0f} s (time budget)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sig(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant digits (tiny smoke-mode TFLOP/s must not round to 0)."""
    return float(f"{value:.{digits}g}")


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Check:
    """Runs measurements one at a time within a time budget; each result (ok, failed with its error, or
    skipped with the reason) is written to the JSON before the next measurement starts."""

    def __init__(self, out_dir: Path, budget_s: float, meta: dict, clock=time.monotonic, start: float | None = None):
        self.out_dir = Path(out_dir)
        self.budget_s = budget_s
        self.meta = meta
        self.clock = clock
        self.start = clock() if start is None else start
        self.results: list[dict] = []
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (self.clock() - self.start)

    def skip(self, part: str, name: str, reason: str, **info) -> None:
        self._record({"part": part, "name": name, **info, "status": "skipped", "reason": reason})

    def run(self, part: str, name: str, fn, need_s: float, **info):
        """fn() -> dict of metrics, run if at least `need_s` seconds of the budget are left; None unless ok."""
        left = self.left()
        if left < need_s:
            self.skip(part, name, f"time budget: {max(left, 0):.0f} s left, needs ~{need_s:.0f} s", **info)
            return None
        entry = {"part": part, "name": name, **info}
        t0 = self.clock()
        print(f"[gpu_check] {part}: {name} ...", flush=True)
        metrics = None
        try:
            with time_limit(left):
                metrics = fn()
            entry.update(status="ok", metrics=metrics)
        except KeyboardInterrupt:  # gpu_check.sh's outer time limit: record, then stop
            entry.update(status="interrupted", error="stopped by the outer time limit")
            raise
        except Exception as err:  # noqa: BLE001 - one failed measurement (missing kernel, OOM) must not stop the rest
            traceback.print_exc()
            lines = str(err).strip().splitlines() or [""]
            entry.update(status="failed", error=f"{type(err).__name__}: {lines[0][:300]}")
        finally:
            entry["seconds"] = round(self.clock() - t0, 2)
            free_device_memory()
            self._record(entry)
        return metrics

    def _record(self, entry: dict) -> None:
        self.results.append(entry)
        print(f"[gpu_check] {entry['part']}: {entry['name']}: {entry['status']} {entry.get('error') or entry.get('reason') or ''}",
              flush=True)
        self.write()

    def data(self) -> dict:
        return {**self.meta, "elapsed_s": round(self.clock() - self.start, 1), "budget_s": self.budget_s, "results": self.results}

    def write(self) -> None:
        data = self.data()
        for name, text in (("gpu_check.json", json.dumps(data, indent=1)), ("gpu_check.md", render_markdown(data))):
            tmp = self.out_dir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out_dir / name)


# ------------------------------------------------------------------------------------------ environment
def meta(args, cuda: bool) -> dict:
    import diffusers
    import lightning

    from lit_ovis.parallel.flops import detect_peak_tflops

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": "smoke" if args.smoke else "gpu",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "peak_bf16_tflops": detect_peak_tflops("cuda") if cuda else None,
        "commit": commit or None,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                     "lightning": lightning.__version__},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_unavailable(name: str, cuda: bool) -> str | None:
    """Why a diffusers attention backend cannot run here (None: try it; an unknown name then fails loudly)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    if name == "native" or name not in {b.value for b in AttentionBackendName}:
        return None
    if not cuda:
        return "needs CUDA"
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as err:
        return str(err).splitlines()[0][:200]
    return None


@contextmanager
def attention_backend(model, name: str):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    model.set_attention_backend(name)
    try:
        yield
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry._active_backend = default


# ------------------------------------------------------------------------------------------ 1. host syncs
def demo_config_in(root: Path, **data_overrides) -> Path:
    """configs/smoke.yaml with its output paths and data under `root` (the config hard-codes runs/smoke)."""
    import yaml

    text = (ROOT / "configs" / "smoke.yaml").read_text().replace("runs/smoke", str(root / "run"))
    config = yaml.safe_load(text)
    config["data"]["init_args"].update({"root": str(root / "data"), **data_overrides})
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def host_syncs(args, cuda: bool) -> dict:
    from lit_ovis.cli.lightning_cli import run

    steps, every = (12, 5) if args.smoke else (40, 10)
    data = dict(synthetic_samples=16, synthetic_resolution=32, batch_size=4) if args.smoke else {}
    with tempfile.TemporaryDirectory() as tmp:
        config = demo_config_in(Path(tmp), **data)
        cli = run(["fit", "--config", str(config), "--ckpt_path", "null", "--trainer.accelerator", "gpu" if cuda else "cpu",
                   "--trainer.devices", "1", "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", str(every),
                   "--trainer.callbacks+=callbacks.host_reads.HostReadCounter", "--trainer.callbacks.report=false"])
    counter = next(c for c in cli.trainer.callbacks if type(c).__name__ == "HostReadCounter")
    plain = [s for s in counter.steps() if counter.kind(s) == "plain"]
    return {
        "steps": cli.trainer.global_step, "log_every_n_steps": every, "plain_steps": len(plain),
        "max_reads_per_plain_step": max((counter.reads.get(s, 0) for s in plain), default=None),
        "max_syncs_per_plain_step": max((counter.syncs.get(s, 0) for s in plain), default=None) if cuda else None,
        "by_class": counter.summary(),
    }


# ------------------------------------------------------------------------------------------ 2./3. training
def estimate_gib(cfg: dict, res: int, batch: int, text: int) -> float:
    """estimate-memory's rows for what the benchmark holds: weights, gradients, moments, gathered block,
    activations (no text encoder, VAE or CUDA context), one unsharded rank."""
    from lit_ovis.cli.estimate_memory import estimate

    est = estimate("tiny", 1, 1, res, res, batch, text, "bf16", text_encoder="precomputed", config=cfg)
    held = [v for name, v in est.rows if not name.startswith(("text encoder", "VAE", "CUDA context"))]
    return sum(held) / GIB


def train_measure(model, cfg: dict, res: int, batch: int, text: int, device: str, repeats: int, peak: float | None) -> dict:
    from bench_train_step import Setting, make_step, timed

    from lit_ovis.parallel.flops import train_flops

    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step = make_step(model, cfg, Setting(cast="fsdp2"), res, batch, text, device)  # includes one warm-up step
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    seconds = statistics.median(timed(step, device) for _ in range(repeats))
    tflops = train_flops(cfg, (res // 16) ** 2, text) * batch / seconds / 1e12
    out = {"batch": batch, "step_s": sig(seconds), "first_step_s": sig(first), "samples_per_s": sig(batch / seconds),
           "tflops": sig(tflops), "mfu": sig(tflops / peak) if peak else None, "estimate_gib": sig(estimate_gib(cfg, res, batch, text))}
    if cuda:
        out["peak_gib"] = sig(torch.cuda.max_memory_allocated() / GIB)
        out["peak_over_estimate"] = sig(out["peak_gib"] / out["estimate_gib"], 3)
    return out


def training(check: Check, args, cuda: bool, peak: float | None) -> None:
    from bench_train_step import Setting, build, one_rank_group, prepare

    device = "cuda" if cuda else "cpu"
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    width, text, repeats = ("tiny", 16, 2) if args.smoke else ("full", 256, 5)
    resolutions = [64, 128] if args.smoke else [256, 512, 1024]
    batch = {64: 2, 128: 1} if args.smoke else BATCH
    build_s, compile_s = (10.0, 0.0) if args.smoke else (20.0, 45.0)  # budget estimates: build, compilation per shape
    need = {res: (10.0 if args.smoke else 25.0 if res == 1024 else 15.0) for res in resolutions}
    backends = args.backends or list(BACKENDS)
    one_rank_group(device)

    def measure_all(compile_: bool, names: list[str]) -> None:
        """Build one model (eager or compiled) and time it at every resolution with each attention backend."""
        mode = "compiled" if compile_ else "eager"
        runnable = []
        for name in names:
            reason = backend_unavailable(name, cuda)
            if reason is None and compile_ and not cuda:
                reason = "compile is measured on the GPU (inductor on a small CPU compiles for minutes)"
            for res in resolutions if reason else []:
                check.skip("training", f"{res}² {name} {mode}", reason, resolution=res, attention=name, compile=compile_)
            if reason is None:
                runnable.append(name)
        if not runnable:
            return
        held = {}

        def setup():
            t0 = time.perf_counter()
            held["model"], held["cfg"] = build(width, 2, 4, device)
            held["model"] = prepare(held["model"], Setting(cast="fsdp2", compile=compile_), device)
            return {"build_s": round(time.perf_counter() - t0, 2)}

        if check.run("training", f"build the {mode} model", setup, build_s + need[resolutions[0]] + compile_s, compile=compile_) is None:
            return
        # compiled: the largest size first, statically (the MFU target); the others then run on the shape-dynamic
        # graphs that regional compilation switches to when the shape changes, as multi-resolution training does
        for res in sorted(resolutions, reverse=True) if compile_ else resolutions:
            for name in runnable:
                def measure(name=name, res=res):
                    with attention_backend(held["model"], name):
                        return train_measure(held["model"], held["cfg"], res, batch[res], text, device, repeats, peak)

                check.run("training", f"{res}² {name} {mode}", measure, need[res] + compile_s, resolution=res, attention=name,
                          compile=compile_)
        held.clear()
        if compile_:
            import torch._dynamo

            torch._dynamo.reset()  # compiled graphs hold references to the model's parameters
        free_device_memory()

    measure_all(False, ["native"] if "native" in backends else [])  # the reference point first
    measure_all(True, ["native"] if "native" in backends else [])  # what `parallel.compile: true` gives by default
    measure_all(False, [b for b in backends if b != "native"])


# ------------------------------------------------------------------------------------------ 4. sampling
def sampling(check: Check, args, cuda: bool) -> None:
    from bench_sampling import build_models, sampling_runners, time_side_by_side

    from lit_ovis.sampling.generate import SamplingConfig

    device = "cuda" if cuda else "cpu"
    preset, size, steps = ("tiny", 64, 3) if args.smoke else ("ovis-image-7b", 1024, 50)
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = SamplingConfig(steps=steps, guidance_scale=5.0, height=size, width=size)
    info = dict(preset=preset, size=size, steps=steps, guidance=5.0)
    models = {}

    def setup():
        t0 = time.perf_counter()
        models["m"] = build_models(preset, None, dtype, device)
        return {"build_s": round(time.perf_counter() - t0, 2)}

    if check.run("sampling", "build models (random weights)", setup, 10 if args.smoke else 45, **info) is None:
        check.skip("sampling", "eager", "the models could not be built", **info)
        check.skip("sampling", "compiled", "the models could not be built", **info)
        return
    transformer, encoder, vae = models.pop("m")
    prompt = ['A poster with the text "LIT OVIS" in bold letters']
    ours, theirs = sampling_runners(transformer, encoder, vae, cfg, prompt, device)
    # warm-up (and compilation) at the same shapes with 2 steps: the 50-step runs are then all steady state
    warmup = sampling_runners(transformer, encoder, vae, SamplingConfig(steps=2, guidance_scale=5.0, height=size, width=size),
                              prompt, device)

    def measure():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        t_ours, t_theirs = time_side_by_side(ours, theirs, 1, warmup)
        mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
        out = {"ours_s": sig(mo), "pipeline_s": sig(mt), "ours_over_pipeline": sig(mo / mt, 3), "total_s": sig(time.perf_counter() - t0)}
        if cuda:
            out["peak_gib"] = sig(torch.cuda.max_memory_allocated() / GIB)
            out["report_h100_s"] = REPORT_H100_SECONDS
        return out

    check.run("sampling", "eager", measure, 15 if args.smoke else 45, **info)
    if not cuda:
        check.skip("sampling", "compiled", "compile is measured on the GPU (inductor on a small CPU compiles for minutes)", **info)
    else:
        from lit_ovis.parallel.fsdp import apply_compile

        def compiled():
            apply_compile(transformer)  # both sides call the same module, so both run the compiled blocks
            return measure()

        check.run("sampling", "compiled", compiled, 110, **info)
    del transformer, encoder, vae, ours, theirs, warmup
    free_device_memory()


# ------------------------------------------------------------------------------------------ report
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def render_markdown(data: dict) -> str:
    results = data.get("results", [])
    versions = ", ".join(f"{k} {v}" for k, v in (data.get("versions") or {}).items())
    lines = [f"# GPU check: {data.get('device')} ({data.get('mode')})", "",
             f"{data.get('date')}, commit {data.get('commit')}, {versions}; {data.get('elapsed_s')} s of a {data.get('budget_s')} s "
             f"budget; BF16 peak {_fmt(data.get('peak_bf16_tflops'))} TFLOP/s.", ""]
    ok = [r for r in results if r["status"] == "ok"]
    sync = [r for r in ok if r["part"] == "host_syncs"]
    lines += ["## Host syncs per training step (configs/smoke.yaml)", ""]
    for r in sync:
        m = r["metrics"]
        lines += [f"{m['steps']} steps, logs every {m['log_every_n_steps']}: at most {_fmt(m['max_reads_per_plain_step'])} "
                  f"`_local_scalar_dense` reads and {_fmt(m['max_syncs_per_plain_step'])} CUDA syncs per plain step.", "",
                  "| step class | steps | reads | max reads/step | CUDA syncs | max syncs/step |", "| --- | --- | --- | --- | --- | --- |"]
        for kind, row in m["by_class"].items():
            lines.append(f"| {kind} | {row['steps']} | {row['reads']} | {row['max_reads']} | {row['syncs']} | {row['max_syncs']} |")
        lines.append("")
    train = [r for r in ok if r["part"] == "training" and "resolution" in r]
    lines += ["## Training: 2 double + 4 single blocks, FSDP2 bf16 params (1-rank mesh), fused AdamW", "",
              "Compiled: the largest size is compiled first (static shapes), the others run on the shape-dynamic graphs; "
              "'first step s' is the warm-up step (compilation included). MFU = model FLOPs (lit_ovis/parallel/flops.py) "
              "/ step time / BF16 peak; 'estimate GiB' is estimate-memory's weights + gradients + moments + gathered block + "
              "activations for the same model and batch.", "",
              "| resolution | batch | attention | compile | step s | first step s | samples/s | TFLOP/s | MFU | peak GiB | estimate GiB | peak / estimate |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(train, key=lambda r: (r["resolution"], r["compile"], r["attention"])):
        m = r["metrics"]
        lines.append(f"| {r['resolution']} | {m['batch']} | {r['attention']} | {'yes' if r['compile'] else 'no'} | {_fmt(m['step_s'], 4)} | "
                     f"{_fmt(m['first_step_s'])} | {_fmt(m['samples_per_s'])} | {_fmt(m['tflops'])} | {_fmt(m['mfu'])} | "
                     f"{_fmt(m.get('peak_gib'))} | {_fmt(m['estimate_gib'])} | {_fmt(m.get('peak_over_estimate'))} |")
    lines += ["", "## Sampling: ours vs OvisImagePipeline, random weights, CFG 5", "",
              "| mode | preset | size | steps | ours s | pipeline s | ours / pipeline | peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in (r for r in ok if r["part"] == "sampling" and r["name"] in ("eager", "compiled")):
        m = r["metrics"]
        lines.append(f"| {r['name']} | {r['preset']} | {r['size']}² | {r['steps']} | {_fmt(m['ours_s'], 4)} | {_fmt(m['pipeline_s'], 4)} | "
                     f"{_fmt(m['ours_over_pipeline'])} | {_fmt(m.get('peak_gib'))} |")
    other = [r for r in results if r["status"] != "ok"]
    if other:
        lines += ["", "## Not measured", ""]
        lines += [f"- {r['part']}: {r['name']}: {r['status']}: {r.get('error') or r.get('reason')}" for r in other]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "gpu_check"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (CPU): checks that every part runs")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run, start-up included (default 420 on a GPU, 300 in smoke mode)")
    p.add_argument("--parts", nargs="*", default=["host_syncs", "training", "sampling"])
    p.add_argument("--backends", nargs="*", default=None, help=f"attention backends to train with (default {', '.join(BACKENDS)})")
    p.add_argument("--render", default=None, help="only rewrite the Markdown of an existing gpu_check.json")
    args = p.parse_args(argv)
    if args.render:
        path = Path(args.render)
        (path.parent / "gpu_check.md").write_text(render_markdown(json.loads(path.read_text())))
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    budget = args.budget_s if args.budget_s is not None else (300.0 if args.smoke else 420.0)
    info = meta(args, cuda)
    check = Check(Path(args.out_dir), budget, info, start=PROCESS_START)
    parts = {
        "host_syncs": lambda: check.run("host_syncs", "configs/smoke.yaml training", lambda: host_syncs(args, cuda), 30 if args.smoke else 50),
        "training": lambda: training(check, args, cuda, info["peak_bf16_tflops"]),
        "sampling": lambda: sampling(check, args, cuda),
    }
    try:
        for name in args.parts:
            try:
                parts[name]()
            except Exception as err:  # noqa: BLE001 - a part's own set-up failed: record it, run the next part
                traceback.print_exc()
                check.skip(name, "part", f"set-up failed: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
    except KeyboardInterrupt:  # gpu_check.sh's outer time limit: what was measured is already written
        return 130
    check.write()
    print(f"[gpu_check] wrote {check.out_dir / 'gpu_check.json'} and gpu_check.md in {check.data()['elapsed_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
