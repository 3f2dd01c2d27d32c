"""Training-step time, TFLOP/s, MFU and peak memory with each speed/memory lever on and off, measured side
by side in one run (each lever changes one thing from the baseline).

GPU (the issue's target: MFU >= 45% of the BF16 peak for the full-width blocks at 1024^2). As-is on a
GPU this runs the full width (3072) at reduced depth (2 double + 4 single blocks), 256/512/1024, bf16:
    python benchmarks/bench_train_step.py
    python benchmarks/bench_train_step.py --double 6 --single 27 --resolutions 1024 --batch 1   # full depth, if it fits
CPU (this repo's CI machines): tiny width, ratios lever / baseline only; GPU-only levers are listed as
skipped with the reason.

Levers: activation checkpointing (full, every 2nd block), activation offloading, regional compilation,
attention backend (PyTorch SDPA's flash / cuDNN kernels, the flash-attn package), foreach instead of fused
AdamW, fp32 instead of bf16 compute, and FSDP2's bf16 parameter cast (MixedPrecisionPolicy on a 1-rank mesh,
what training uses) instead of autocast.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
import warnings
from dataclasses import dataclass, replace

import torch
from diffusers import OvisImageTransformer2DModel

from lit_ovis.models.text_encoder import text_ids
from lit_ovis.models.vae import latent_image_ids
from lit_ovis.parallel.flops import PEAK_BF16_TFLOPS, detect_peak_tflops, train_flops
from lit_ovis.parallel.memory import apply_activation_checkpointing, apply_activation_offloading

MFU_TARGET = 0.45


@dataclass(frozen=True)
class Setting:
    dtype: str = "bf16"  # compute dtype
    cast: str = "autocast"  # "autocast" or "fsdp2" (MixedPrecisionPolicy casts the parameters once per step)
    checkpointing: str = "none"
    offload: bool = False
    compile: bool = False
    attention: str | None = None  # diffusers attention backend; None = PyTorch SDPA's default dispatch
    fused_adamw: bool = True


def levers(base: Setting, cuda: bool) -> list[tuple[str, Setting | None, str]]:
    """(name, setting or None if skipped, reason for skipping)."""
    flash_pkg = importlib.util.find_spec("flash_attn") is not None
    gpu = "" if cuda else "needs CUDA"
    out = [
        ("baseline", base, ""),
        ("activation checkpointing, full", replace(base, checkpointing="full"), ""),
        ("activation checkpointing, every 2nd block", replace(base, checkpointing="selective"), ""),
        ("activation offloading to CPU", replace(base, offload=True), "" if cuda else "moves nothing on a CPU"),
        ("regional compile", replace(base, compile=True), "" if cuda else "GPU lever (inductor on 2 CPU cores compiles for minutes)"),
        ("attention: SDPA flash kernel", replace(base, attention="_native_flash"), gpu),
        ("attention: SDPA cuDNN kernel", replace(base, attention="_native_cudnn"), gpu),
        ("attention: flash-attn package", replace(base, attention="flash"), gpu or ("" if flash_pkg else "flash-attn not installed")),
        ("AdamW foreach (not fused)", replace(base, fused_adamw=False), ""),
        ("fp32 compute" if base.dtype == "bf16" else "bf16 compute (autocast)", replace(base, dtype="fp32" if base.dtype == "bf16" else "bf16"), ""),
        ("bf16 via FSDP2 MixedPrecisionPolicy", replace(base, dtype="bf16", cast="fsdp2"), ""),
    ]
    return [(name, s if not reason else None, reason) for name, s, reason in out]


def build(width: str, double: int, single: int, device: str | None = None) -> tuple[OvisImageTransformer2DModel, dict]:
    """The MMDiT at full (3072 = 24 x 128) or tiny width; `device` initialises it there (a GPU fills 1.5B
    random weights in a second; the CPU takes tens of seconds)."""
    if width == "full":
        cfg = dict(num_layers=double, num_single_layers=single, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=2048, axes_dims_rope=(16, 56, 56))
    else:
        cfg = dict(num_layers=double, num_single_layers=single, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(8, 12, 12))
    cfg.update(in_channels=64, out_channels=64)
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        return OvisImageTransformer2DModel(**cfg), cfg


def one_rank_group(device: str) -> None:
    """A 1-rank process group, so FSDP2's MixedPrecisionPolicy can run in this single process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def prepare(model, setting: Setting, device: str):
    from lit_ovis.parallel.fsdp import ParallelConfig, apply_compile, shard_transformer

    model = model.to(device)
    if setting.attention:
        model.set_attention_backend(setting.attention)
    if setting.checkpointing != "none":
        apply_activation_checkpointing(model, setting.checkpointing, 2)
    if setting.offload:
        apply_activation_offloading(model)
    if setting.compile:
        apply_compile(model)
    if setting.cast == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        one_rank_group(device)
        shard_transformer(model, init_device_mesh(device, (1,)), ParallelConfig(param_dtype="bf16", reduce_dtype="fp32"))
    return model


def make_step(model, cfg, setting: Setting, res: int, batch: int, text: int, device: str):
    """One optimizer step of `model` at `res` (closure), after one warm-up step (and compilation)."""
    h = w = res // 8
    ni = (h // 2) * (w // 2)
    x = torch.randn(batch, ni, 64, device=device)
    ctx = torch.randn(batch, text, cfg["joint_attention_dim"], device=device)
    t = torch.rand(batch, device=device)
    ids_i, ids_t = latent_image_ids(h, w, device=device), text_ids(text, device=device)
    impl = {"fused": True} if setting.fused_adamw else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **impl)
    autocast = setting.dtype == "bf16" and setting.cast == "autocast"

    def one():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            out = model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=ids_i, txt_ids=ids_t, return_dict=False)[0]
            loss = out.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    return one


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", default="full" if cuda else "tiny", choices=["tiny", "full"])
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024] if cuda else [256, 512])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=["fp32", "bf16"], help="the baseline's compute dtype")
    p.add_argument("--peak-tflops", type=float, default=None, help="BF16 peak; detected for known GPUs (H100 SXM 989)")
    p.add_argument("--only", nargs="*", default=None, help="run only the levers whose name contains one of these words")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=not cuda,
                   help="time the levers round-robin (default on CPU, where load drifts; on a GPU each runs alone for its peak memory)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # FSDP2 / autocast notices would break the table
    device = "cuda" if cuda else "cpu"
    peak = args.peak_tflops or (detect_peak_tflops(device) if cuda else None)
    if cuda and peak is None:
        peak = PEAK_BF16_TFLOPS["H100-SXM"]
        print(f"unknown GPU '{torch.cuda.get_device_name()}': MFU against the H100 SXM peak ({peak} TFLOP/s); pass --peak-tflops")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default_backend = _AttentionBackendRegistry._active_backend
    base = Setting(dtype=args.dtype)
    name = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    print(f"device={name} width={args.width} blocks={args.double}+{args.single} batch={args.batch} text={args.text} baseline dtype={args.dtype}")
    print("| resolution | lever | step s | ratio vs baseline | TFLOP/s | MFU | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    skipped: dict[str, str] = {}
    best_1024 = 0.0
    for res in args.resolutions:
        chosen = [(lever, setting, reason) for lever, setting, reason in levers(base, cuda)
                  if args.only is None or lever == "baseline" or any(w in lever for w in args.only)]
        skipped.update({lever: reason for lever, setting, reason in chosen if setting is None})
        chosen = [(lever, setting) for lever, setting, _ in chosen if setting is not None]
        results: dict[str, tuple[list[float], float, dict]] = {}
        if args.interleave:
            # all models side by side, one step each per round: machine-load drift hits every lever alike
            steps = {}
            for lever, setting in chosen:
                model, cfg = build(args.width, args.double, args.single)
                steps[lever] = (make_step(prepare(model, setting, device), cfg, setting, res, args.batch, args.text, device), cfg)
                _AttentionBackendRegistry._active_backend = default_backend
            times = {lever: [] for lever in steps}
            for _ in range(args.repeats):
                for lever, (fn, _) in steps.items():
                    times[lever].append(timed(fn, device))
            results = {lever: (times[lever], float("nan"), steps[lever][1]) for lever in steps}
        else:
            for lever, setting in chosen:
                model, cfg = build(args.width, args.double, args.single)
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    fn = make_step(prepare(model, setting, device), cfg, setting, res, args.batch, args.text, device)
                    times = [timed(fn, device) for _ in range(args.repeats)]
                except Exception as err:  # noqa: BLE001 - a lever unavailable on this machine (kernel, OOM) is reported, not fatal
                    print(f"| {res} | {lever} | failed: {type(err).__name__}: {str(err).splitlines()[0][:120]} | | | | |", flush=True)
                    continue
                finally:
                    _AttentionBackendRegistry._active_backend = default_backend
                    del model
                results[lever] = (times, torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), cfg)
        base_s = statistics.median(results["baseline"][0]) if "baseline" in results else None
        for lever, (times, mem, cfg) in results.items():
            seconds = statistics.median(times)
            tflops = train_flops({**cfg}, (res // 16) ** 2, args.text) * args.batch / seconds / 1e12
            mfu = tflops / peak if peak else float("nan")
            if res == 1024 and mfu == mfu:
                best_1024 = max(best_1024, mfu)
            ratio = f"{seconds / base_s:.2f}" if base_s else "n/a"
            print(f"| {res} | {lever} | {seconds:.4f} | {ratio} | {tflops:.3f} | {mfu:.3f} | {mem:.2f} |", flush=True)
    for lever, reason in skipped.items():
        print(f"skipped: {lever} ({reason})")
    if cuda and 1024 in args.resolutions:
        verdict = "meets" if best_1024 >= MFU_TARGET else "misses"
        print(f"best MFU at 1024^2: {best_1024:.3f} -> {verdict} the {MFU_TARGET:.0%} target")


if __name__ == "__main__":
    main()
