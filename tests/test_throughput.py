"""ThroughputLogger's numbers with a fake clock: per-batch FLOPs at each bucket's resolution, DPO pairs,
TFLOP/s and MFU in the logs (not as prog_bar metrics, which Lightning reads on the host every step), windows
that end on logging steps, and the BF16 peak detected from the GPU's name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import callbacks.throughput as throughput
from callbacks.throughput import ThroughputLogger
from lit_ovis.parallel.flops import dpo_train_flops, forward_flops, peak_bf16_tflops, train_flops


class FakeClock:
    def __init__(self, times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


class FakeModule:
    """Logs into dicts; FLOPs per sample = 1e12 x latent pixels, per pair = 3e12 x latent pixels."""

    def __init__(self):
        self.logged: dict[str, float] = {}
        self.bar: dict[str, float] = {}

    def train_flops_per_sample(self, h, w):
        return int(1e12) * h * w

    def train_flops_per_pair(self, h, w):
        return int(3e12) * h * w

    def log_dict(self, metrics, prog_bar=False, **kwargs):
        (self.bar if prog_bar else self.logged).update(metrics)


def run(batches, times, peak=None, world=2):
    cb = ThroughputLogger(window=len(batches), peak_tflops=peak, clock=FakeClock(times))
    module = FakeModule()
    trainer = SimpleNamespace(world_size=world, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    cb.setup(trainer, module, "fit")
    for i, batch in enumerate(batches):
        cb.on_train_batch_start(trainer, module, batch, i)
        cb.on_train_batch_end(trainer, module, None, batch, i)
    return module


def test_flops_are_counted_at_each_batch_resolution():
    batches = [{"latents": torch.zeros(2, 16, 4, 4)}, {"latents": torch.zeros(2, 16, 8, 8)}]
    module = run(batches, [10.0, 14.0], peak=100.0)  # window starts at 10 s and ends at 14 s
    flops = 2 * 16e12 + 2 * 64e12  # not 4 x 64e12 (the last bucket's resolution for every sample)
    assert module.logged["perf/tflops_per_device"] == pytest.approx(flops / 4 / 1e12)
    assert module.logged["perf/mfu"] == pytest.approx(flops / 4 / 1e12 / 100.0)
    assert module.logged["perf/samples_per_s"] == pytest.approx(4 * 2 / 4)  # two ranks
    assert module.logged["perf/image_tokens_per_s"] == pytest.approx((2 * 4 + 2 * 16) * 2 / 4)
    assert module.logged["perf/step_time_s"] == pytest.approx(2.0)
    assert module.bar == {}  # the progress display reads perf/* at logging steps (callbacks.progress.DISPLAY)


def test_dpo_pairs_count_two_images_and_the_modules_pair_flops():
    module = run([{"latents_w": torch.zeros(3, 16, 4, 4), "latents_l": torch.zeros(3, 16, 4, 4)}], [0.0, 2.0], world=1)
    assert module.logged["perf/samples_per_s"] == pytest.approx(3 / 2)  # pairs
    assert module.logged["perf/images_per_s"] == pytest.approx(6 / 2)
    assert module.logged["perf/image_tokens_per_s"] == pytest.approx(6 * 4 / 2)
    assert module.logged["perf/tflops_per_device"] == pytest.approx(3 * 3 * 16 / 2)
    assert "perf/mfu" not in module.logged  # CPU: no peak known, none given


def test_no_flops_when_the_module_has_no_flop_model():
    class Bare(FakeModule):
        train_flops_per_pair = None

    cb = ThroughputLogger(window=1, clock=FakeClock([0.0, 1.0]))
    module = Bare()
    trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    cb.setup(trainer, module, "fit")
    batch = {"latents_w": torch.zeros(1, 16, 4, 4)}
    cb.on_train_batch_start(trainer, module, batch, 0)
    cb.on_train_batch_end(trainer, module, None, batch, 0)
    assert "perf/tflops_per_device" not in module.logged and "perf/samples_per_s" in module.logged


def test_default_window_ends_on_the_logging_steps():
    cb = ThroughputLogger(clock=FakeClock([0.0, 5.0, 7.0]))
    module = FakeModule()
    trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace(root_device=torch.device("cpu")), log_every_n_steps=5,
                              global_step=0)
    cb.setup(trainer, module, "fit")
    batch = {"latents": torch.zeros(2, 16, 4, 4)}
    for step in range(1, 8):
        cb.on_train_batch_start(trainer, module, batch, step - 1)
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, batch, step - 1)
        if step < 5:
            assert module.logged == {}  # nothing logged (nor read) between logging steps
        if step == 5:
            assert module.logged["perf/samples_per_s"] == pytest.approx(5 * 2 / 5.0)
            assert module.logged["perf/step_time_s"] == pytest.approx(1.0)


def test_peak_detected_from_the_gpu_name(monkeypatch):
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("Some Unknown GPU") is None
    monkeypatch.setattr(throughput, "detect_peak_tflops", lambda device: 989.0)
    module = run([{"latents": torch.zeros(1, 16, 4, 4)}], [0.0, 1.0], world=1)
    assert module.logged["perf/mfu"] == pytest.approx(16 / 989.0)


def test_dpo_flops_model():
    cfg = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 64, "out_channels": 64, "joint_attention_dim": 32,
           "num_layers": 1, "num_single_layers": 1}
    f, t = forward_flops(cfg, 16, 8), train_flops(cfg, 16, 8)
    assert dpo_train_flops(cfg, 16, 8) == 2 * t + 2 * f and dpo_train_flops(cfg, 16, 8, reference=False) == 2 * t
