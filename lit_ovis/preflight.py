"""Checks that fail in seconds, with a one-line message naming the option and the fix, before any model
is built, any process is launched or any GPU work starts (the CLI runs them on the parsed config, and
`lit-ovis submit` runs them before calling sbatch).

Every option with a valid range is listed in `RANGES` / `CHOICES` (value checks), then come the checks
that relate several options or the files they name: paths that must exist (data, prompt files, weights),
the batch against the prepared buckets, the mesh against the world size, and the hardware the trainer
asks for (only where the job will run: `this_machine=False` for `lit-ovis submit` on a login node).

Batch sizes here are per rank (every rank draws its own batches), so no batch size has to divide the
mesh; what must fit the world size (trainer.num_nodes x trainer.devices) is the mesh itself
(replicas x shards, data x tensor parallel) and the data: every rank needs at least one batch per epoch.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, NamedTuple

from lit_ovis.errors import ConfigError
from lit_ovis.files import could_be_hub_id, is_remote
from lit_ovis.models.presets import TEXT_ENCODER_PRESETS, TRANSFORMER_PRESETS, VAE_PRESETS

# Paths a data module builds itself when asked for a synthetic set; the others must always exist.
BUILT_PATHS = ("root", "data_dir", "path")
USER_PATHS = ("prompt_file", "val_root")


class Range(NamedTuple):
    """`low <= value <= high` (a bound of None is open-ended; `low_open`/`high_open` make it strict)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"must be in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"must be {'>' if self.low_open else '>='} {self.low:g}"
        return f"must be {'<' if self.high_open else '<='} {self.high:g}"


POSITIVE, AT_LEAST_1, NON_NEGATIVE, FRACTION = Range(0, low_open=True), Range(1), Range(0), Range(0, 1)

# Keys below the sub-command config; the option is `--` + the key without `init_args.`.
RANGES: dict[str, Range] = {
    "model.init_args.optimizer.lr": POSITIVE,
    "model.init_args.optimizer.weight_decay": NON_NEGATIVE,
    "model.init_args.optimizer.eps": POSITIVE,
    "model.init_args.optimizer.warmup_steps": NON_NEGATIVE,
    "model.init_args.optimizer.grad_clip": Range(0, note="; 0 disables clipping"),
    "model.init_args.ema.decay": Range(0, 1, high_open=True, note="; 0.999-0.9999 is typical, 1 would never move"),
    "model.init_args.ema.every_n_steps": AT_LEAST_1,
    "model.init_args.encoders.max_sequence_length": AT_LEAST_1,
    "model.init_args.sampling.steps": AT_LEAST_1,
    "model.init_args.sampling.guidance_scale": NON_NEGATIVE,
    "model.init_args.sampling.height": Range(16),
    "model.init_args.sampling.width": Range(16),
    "model.init_args.flow_matching.caption_dropout": FRACTION,
    "model.init_args.flow_matching.logit_std": POSITIVE,
    "model.init_args.flow_matching.shift": POSITIVE,
    "model.init_args.flow_matching.loss_buckets": AT_LEAST_1,
    "model.init_args.sdpo.logit_std": POSITIVE,
    "model.init_args.sdpo.shift": POSITIVE,
    "model.init_args.parallel.checkpoint_every_n_blocks": AT_LEAST_1,
    "model.init_args.lora.rank": AT_LEAST_1,
    "model.init_args.lora.alpha": POSITIVE,
    "model.init_args.grpo.update.kl_beta": NON_NEGATIVE,
    "model.init_args.grpo.update.clip_range": POSITIVE,
    "model.init_args.grpo.window.size": AT_LEAST_1,
    "model.init_args.grpo.window.ema": FRACTION,
    "model.init_args.grpo.window.explore": FRACTION,
    "data.init_args.num_workers": NON_NEGATIVE,
    "data.init_args.val_samples_per_bucket": NON_NEGATIVE,
    "data.init_args.val_batch_size": AT_LEAST_1,
    "data.init_args.synthetic_samples": NON_NEGATIVE,
    "data.init_args.synthetic_pairs": NON_NEGATIVE,
    "data.init_args.synthetic_prompts": NON_NEGATIVE,
    "data.init_args.zh_fraction": FRACTION,
    "data.init_args.limit": AT_LEAST_1,
    "data.init_args.build_timeout_s": POSITIVE,
    "data.init_args.worker_timeout_s": Range(0, note="; 0 waits forever"),
    "trainer.max_steps": Range(-1, note="; -1 means no limit"),
    "trainer.min_steps": Range(-1),
    "trainer.max_epochs": Range(-1, note="; -1 means no limit"),
    "trainer.min_epochs": NON_NEGATIVE,
    "trainer.accumulate_grad_batches": AT_LEAST_1,
    "trainer.log_every_n_steps": NON_NEGATIVE,
    "trainer.check_val_every_n_epoch": AT_LEAST_1,
    "trainer.num_sanity_val_steps": Range(-1),
    "trainer.gradient_clip_val": NON_NEGATIVE,
    "trainer.num_nodes": AT_LEAST_1,
    "trainer.val_check_interval": NON_NEGATIVE,
    "trainer.limit_train_batches": NON_NEGATIVE,
    "trainer.limit_val_batches": NON_NEGATIVE,
    "trainer.limit_predict_batches": NON_NEGATIVE,
}


# Our callbacks' ranged arguments, by class name (their option is `--trainer.callbacks.<arg>`).
CALLBACK_RANGES: dict[str, dict[str, Range]] = {
    "SampleGridLogger": {"every_n_steps": AT_LEAST_1, "steps": AT_LEAST_1, "guidance_scale": NON_NEGATIVE},
    "EvalCallback": {"every_n_steps": NON_NEGATIVE, "steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "limit": AT_LEAST_1,
                     "guidance_scale": NON_NEGATIVE},
    "NanGuard": {"max_consecutive": AT_LEAST_1, "check_every_n_steps": AT_LEAST_1},
    "StepLog": {"every_n_steps": AT_LEAST_1, "flush_every_n_steps": AT_LEAST_1},
    "RequeueOnSignal": {"check_every_n_steps": AT_LEAST_1},
    "ThroughputLogger": {"window": AT_LEAST_1, "peak_tflops": POSITIVE},
}
SIZED_CALLBACKS = ("SampleGridLogger", "EvalCallback")  # height/width: multiples of 16

FRACTION_OR_COUNT = ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches",
                     "trainer.limit_predict_batches", "trainer.val_check_interval", "trainer.overfit_batches")


def _choices() -> dict[str, tuple]:
    from lit_ovis.flow import LOSS_WEIGHTINGS, TIMESTEP_SAMPLINGS, TIMESTEP_SHIFTS
    from lit_ovis.losses.dpo import SAFEGUARD_RULES
    from lit_ovis.dtypes import DTYPES
    from lit_ovis.losses.grpo import KL_SCALES
    from lit_ovis.losses.window import MODES, SIGNALS

    flow = {"timestep_sampling": TIMESTEP_SAMPLINGS, "timestep_shift": TIMESTEP_SHIFTS, "loss_weighting": LOSS_WEIGHTINGS}
    choices = {f"model.init_args.{group}.{key}": values for group in ("flow_matching", "sdpo") for key, values in flow.items()}
    choices.update({
        "model.init_args.sdpo.safeguard.rule": SAFEGUARD_RULES,
        "model.init_args.encoders.dtype": tuple(DTYPES),
        "model.init_args.parallel.param_dtype": tuple(DTYPES),
        "model.init_args.parallel.reduce_dtype": tuple(DTYPES),
        "model.init_args.parallel.activation_checkpointing": ("none", "full", "selective"),  # lit_ovis.parallel.memory
        "model.init_args.grpo.window.mode": MODES,
        "model.init_args.grpo.window.signal": SIGNALS,
        "model.init_args.grpo.rollout.log_prob_reduce": ("mean", "sum"),
        "model.init_args.grpo.update.kl_scale": KL_SCALES,
    })
    return choices


def _get(cfg: Any, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        if isinstance(node, Mapping) or hasattr(node, "get"):
            try:
                node = node.get(part, None)
            except TypeError:
                node = getattr(node, part, None)
        else:
            node = getattr(node, part, None)
    return default if node is None else node


def option_name(key: str) -> str:
    return "--" + key.replace(".init_args.", ".")


def check_values(cfg: Any) -> None:
    """Every present option with a range or a fixed set of values (RANGES, CHOICES)."""
    for key, allowed in RANGES.items():
        value = _get(cfg, key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # absent for this stage, or a non-number (e.g. max_steps: null) that jsonargparse typed
        if not allowed.holds(value):
            raise ConfigError(f"{option_name(key)} {allowed.describe()} (got {value}){allowed.note}")
    betas = _get(cfg, "model.init_args.optimizer.betas")
    if betas is not None and not all(Range(0, 1, high_open=True).holds(float(b)) for b in betas):
        raise ConfigError(f"--model.optimizer.betas must both be in [0, 1) (got {list(betas)})")
    for key in FRACTION_OR_COUNT:  # Lightning: a float is a fraction of the batches, an int a number of them
        value = _get(cfg, key)
        if isinstance(value, float) and not 0 <= value <= 1:
            raise ConfigError(f"{option_name(key)}={value:g}: a fraction of the batches must be in [0, 1]; give a whole number for a count of batches")
    for key, values in _choices().items():
        value = _get(cfg, key)
        if value is not None and value not in values:
            raise ConfigError(f"{option_name(key)}: '{value}' is not one of {', '.join(values)}")


def _callbacks(cfg: Any) -> list[tuple[str, Any]]:
    """(class name, init args) of each configured callback."""
    configured = _get(cfg, "trainer.callbacks") or []
    out = []
    for cb in configured if isinstance(configured, (list, tuple)) else [configured]:
        path = _get(cb, "class_path")
        if isinstance(path, str):
            out.append((path.rsplit(".", 1)[-1], _get(cb, "init_args") or {}))
    return out


def built_by_data(cfg: Any) -> str | None:
    """The folder the data module builds on first use (WordTaskDataModule's task, autoencoder and latents):
    paths inside it may not exist yet when the command starts."""
    if str(_get(cfg, "data.class_path") or "").endswith("WordTaskDataModule"):
        return str(_get(cfg, "data.init_args.task_root") or "data/demo")
    return None


def _inside(path: Any, folder: str | None) -> bool:
    if not isinstance(path, str) or not folder:
        return False
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder + os.sep)


def check_callbacks(cfg: Any) -> None:
    for name, args in _callbacks(cfg):
        for key, allowed in CALLBACK_RANGES.get(name, {}).items():
            value = _get(args, key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not allowed.holds(value):
                raise ConfigError(f"--trainer.callbacks.{key} of {name} {allowed.describe()} (got {value})")
        if name in SIZED_CALLBACKS:
            for key in ("height", "width"):
                _check_side(_get(args, key), f"--trainer.callbacks.{key} of {name}")
        prompt_file = _get(args, "prompt_file")
        if name == "EvalCallback" and _local_path_missing(prompt_file) and not _inside(prompt_file, built_by_data(cfg)):
            raise ConfigError(f"--trainer.callbacks.prompt_file of EvalCallback: '{prompt_file}' does not exist; fix the path")


def check_resolution(height: int, width: int, option: str) -> None:
    if height % 16 or width % 16:
        raise ConfigError(f"{option}: {height}x{width} is not a multiple of 16 px (VAE /8 then 2x2 patches); use e.g. {height // 16 * 16}x{width // 16 * 16}")


def world_size(trainer: Any) -> int | None:
    """trainer.num_nodes x trainer.devices, or None when devices is left to auto-detection."""
    devices = _get(trainer, "devices")
    if isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else (int(devices) if devices.strip().isdigit() else None)
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    if not isinstance(devices, int) or devices <= 0:
        return None
    return devices * int(_get(trainer, "num_nodes", 1) or 1)


def _local_path_missing(path: Any) -> bool:
    return isinstance(path, str) and bool(path) and not is_remote(path) and not os.path.exists(path)


def check_weights_source(value: Any, option: str, presets: Mapping) -> None:
    """A preset name, an existing local file/folder, or a hub id; a missing local path fails now rather than
    after the trainer started (or after the data was built)."""
    if not isinstance(value, str) or value.strip().lower() in ("", "none", "null") or value in presets or not _local_path_missing(value):
        return
    if could_be_hub_id(value):
        return  # `org/name`: resolved by the hub cache at load time
    raise ConfigError(f"{option}: '{value}' does not exist (not a local file or folder, nor a hub id such as AIDC-AI/Ovis-Image-7B); fix the path or train that stage first")


def check_model(args: Any, built: str | None = None) -> None:
    """built: a folder the data module builds on first use (`built_by_data`); weights inside it may not exist yet."""
    preset = _get(args, "backbone.preset")
    if preset is not None and preset not in TRANSFORMER_PRESETS and not _get(args, "backbone.pretrained"):
        raise ConfigError(f"--model.backbone.preset: unknown preset '{preset}'; choose one of {sorted(TRANSFORMER_PRESETS)}")
    check_weights_source(_get(args, "backbone.pretrained"), "--model.backbone.pretrained", {})
    check_pretrained_scheduler(args)
    check_weights_source(_get(args, "sdpo.reference_pretrained"), "--model.sdpo.reference_pretrained", {})
    check_weights_source(_get(args, "encoders.text_encoder"), "--model.encoders.text_encoder", TEXT_ENCODER_PRESETS)
    if not _inside(_get(args, "encoders.vae"), built):
        check_weights_source(_get(args, "encoders.vae"), "--model.encoders.vae", VAE_PRESETS)
    height, width = _get(args, "sampling.height"), _get(args, "sampling.width")
    if height is not None and width is not None:
        check_resolution(int(height), int(width), "--model.sampling.height/width")
    grpo = _get(args, "grpo")
    if grpo is not None:
        # GRPO slices rollouts and updates with these as range() steps: 0 would crash after the first rollout.
        for key in ("rollout.group_size", "rollout.batch_size", "update.batch_size", "update.inner_epochs",
                    "update.optimizer_steps_per_epoch"):
            value = _get(grpo, key)
            if value is not None and int(value) < 1:
                raise ConfigError(f"--model.grpo.{key} must be >= 1 (got {value})")
        steps, cps = _get(grpo, "rollout.steps"), _get(grpo, "rollout.sampler", "cps") == "cps"
        if steps is not None and int(steps) < (2 if cps else 1):
            raise ConfigError(f"--model.grpo.rollout.steps must be >= {2 if cps else 1} (got {steps})"
                              + ("; the CPS step to t = 0 is deterministic and leaves nothing to train" if cps else ""))
        gh, gw = _get(grpo, "rollout.height", height), _get(grpo, "rollout.width", width)  # unset: model.sampling's
        if gh is not None and gw is not None:
            check_resolution(int(gh), int(gw), "--model.grpo.rollout.height/width")


def check_pretrained_scheduler(args: Any) -> None:
    """Training from a pipeline folder: its `scheduler/` must sample as `model.sampling` does (else the grids,
    eval and the exported folder would use another shift than the folder's own pipeline), and be one our sampler
    reproduces."""
    pretrained = _get(args, "backbone.pretrained")
    if not isinstance(pretrained, str) or not os.path.isdir(pretrained):
        return
    import dataclasses

    from lit_ovis.sampling.generate import SamplingConfig
    from lit_ovis.sampling.scheduler import read_scheduler_config, sampling_from_scheduler, scheduler_mismatch

    config = read_scheduler_config(pretrained)
    if config is None:
        return
    sampling_from_scheduler(config, f"--model.backbone.pretrained {pretrained}")
    ours = SamplingConfig(**{f.name: _get(args, f"sampling.{f.name}") for f in dataclasses.fields(SamplingConfig)
                             if _get(args, f"sampling.{f.name}") is not None})
    differ = scheduler_mismatch(config, ours)
    if differ:
        field, mine, theirs = differ[0]
        fix = " ".join(f"--model.sampling.{f} {t}" for f, _, t in differ)
        raise ConfigError(f"--model.sampling.{field} is {mine} but the scheduler of --model.backbone.pretrained {pretrained} "
                          f"says {theirs} ({len(differ)} shift setting(s) differ); set {fix}")


def _check_side(value: Any, option: str) -> None:
    if value is not None and (int(value) < 16 or int(value) % 16):
        raise ConfigError(f"{option}: {value} is not a positive multiple of 16 px; use {max(16, int(value) // 16 * 16)}")


def prepared_buckets(root: str, resolutions: list[int] | None) -> dict[str, int] | None:
    """{`<res>/<WxH>`: samples} from a local prepared root's report.json, or None when there is none."""
    if not isinstance(root, str) or not root or is_remote(root):
        return None
    try:
        with open(os.path.join(root, "report.json"), encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    buckets = report.get("buckets") if isinstance(report, dict) else None
    if not isinstance(buckets, dict):
        return None
    wanted = {str(int(r)) for r in resolutions} if resolutions else None
    return {k: int(n) for k, n in buckets.items() if wanted is None or k.split("/")[0] in wanted}


def check_batch_fits_buckets(data: Any, world: int | None) -> None:
    """Every batch comes from one bucket: a batch larger than every prepared bucket can never be drawn."""
    batch = int(_get(data, "batch_size", 0) or 0)
    buckets = prepared_buckets(_get(data, "root"), _get(data, "resolutions"))
    if batch < 1 or not buckets:
        return
    held = int(_get(data, "val_samples_per_bucket", 0) or 0)
    train = {k: max(n - held, 0) for k, n in buckets.items()}
    full = sum(n // batch for n in train.values())
    ranks = world or 1
    if full >= ranks:
        return
    largest = max(train, key=train.get)
    after = f" after holding out {held} per bucket for validation" if held else ""
    if full == 0:
        raise ConfigError(f"--data.batch_size={batch} is larger than every bucket of {_get(data, 'root')}{after} (largest: "
                          f"{train[largest]} samples in {largest}); use --data.batch_size {max(train[largest], 1)} or less, or prepare more data")
    raise ConfigError(f"--data.batch_size={batch}: {_get(data, 'root')} has {full} full batches{after}, fewer than {ranks} ranks; "
                      "lower the batch size or prepare more data")


def check_data(data: Any, world: int | None, subcommand: str | None = "fit") -> None:
    synthetic = {k: int(_get(data, k, 0) or 0) for k in ("synthetic_samples", "synthetic_pairs")}
    if _get(data, "prompt_file") is not None or _get(data, "synthetic_prompts") is not None or _get(data, "zh_fraction") is not None:
        from data_modules.prompts import default_synthetic_prompts  # a PromptDataModule: its default depends on prompt_file

        synthetic["synthetic_prompts"] = default_synthetic_prompts(_get(data, "prompt_file"), _get(data, "synthetic_prompts"))
    builds_own = any(synthetic.values())
    for key in USER_PATHS + (() if builds_own else BUILT_PATHS):
        path = _get(data, key)
        if _local_path_missing(path):
            fix = "fix the path" if key in USER_PATHS else "run `lit-ovis prepare` first or fix the path"
            raise ConfigError(f"--data.{key}: '{path}' does not exist; {fix}")
    resolution = _get(data, "resolution")
    if resolution is not None and int(resolution) % 16:
        raise ConfigError(f"--data.resolution: {resolution} is not a multiple of 16 px; use {int(resolution) // 16 * 16}")
    _check_side(_get(data, "synthetic_resolution"), "--data.synthetic_resolution")
    for res in _get(data, "resolutions") or []:
        _check_side(res, "--data.resolutions")
    if _get(data, "val_samples_per_bucket") and _get(data, "val_root"):
        raise ConfigError("set one of --data.val_samples_per_bucket (held out of root) and --data.val_root (a separate dataset), not both")
    batch = _get(data, "batch_size")
    if batch is not None and int(batch) <= 0:
        raise ConfigError(f"--data.batch_size must be >= 1 (got {batch})")
    if not builds_own and subcommand in (None, "fit"):
        check_batch_fits_buckets(data, world)
    if batch is None or world is None:
        return
    # A synthetic-only set has a known size: fewer samples than one batch per rank can never train.
    need = int(batch) * world
    for key, n in synthetic.items():
        only_source = key != "synthetic_prompts" or not _get(data, "prompt_file")
        if 0 < n < need and only_source:
            raise ConfigError(f"--data.{key}={n} is fewer than --data.batch_size={batch} x {world} ranks; use at least {need} or a smaller batch")


def check_mesh(cfg: Any, args: Any, world: int | None) -> None:
    if world is None:
        return
    strategy = _get(cfg, "trainer.strategy.init_args") or {}
    tp = _get(strategy, "tensor_parallel_size")
    dp = _get(strategy, "data_parallel_size")
    tp = int(tp) if isinstance(tp, int) or (isinstance(tp, str) and tp.isdigit()) else 1
    if tp > 1 and world % tp:
        raise ConfigError(f"--trainer.strategy.tensor_parallel_size={tp} does not divide world size {world}; use a divisor of it")
    if isinstance(dp, int) or (isinstance(dp, str) and dp.isdigit()):
        if int(dp) * tp != world:
            raise ConfigError(f"--trainer.strategy.data_parallel_size={dp} x tensor_parallel_size={tp} != world size {world}; set data_parallel_size to auto")
    data_parallel = world // tp
    replicate = _get(args, "parallel.data_parallel_replicate")
    if replicate is not None and int(replicate) < 1:
        raise ConfigError(f"--model.parallel.data_parallel_replicate must be >= 1 (got {replicate})")
    if replicate is not None and int(replicate) > 1 and data_parallel % int(replicate):
        nodes = int(_get(cfg, "trainer.num_nodes", 1) or 1)
        raise ConfigError(
            f"--model.parallel.data_parallel_replicate={replicate} does not divide world size {data_parallel} "
            f"(trainer.num_nodes={nodes} x trainer.devices={world // nodes}); set it to the number of nodes ({nodes})"
        )


def check_hardware(trainer: Any) -> None:
    """The accelerator and device count the trainer asks for exist on this machine."""
    import torch

    accelerator = str(_get(trainer, "accelerator", "auto") or "auto").lower()
    devices = _get(trainer, "devices")
    if accelerator in ("gpu", "cuda"):
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            raise ConfigError(f"--trainer.accelerator={accelerator} but no GPU is visible (torch.cuda.is_available() is False); "
                              "use --trainer.accelerator cpu or run on a GPU machine")
        wanted = world_size({"devices": devices})
        if isinstance(devices, (int, str)) and wanted is not None and wanted > visible and not isinstance(devices, list):
            raise ConfigError(f"--trainer.devices={devices} but only {visible} GPU(s) are visible; use --trainer.devices {visible} or fewer")
    if accelerator == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("--trainer.accelerator=mps but MPS is not available here; use --trainer.accelerator cpu")


def check_config(cfg: Any, subcommand: str | None = "fit", this_machine: bool = True) -> None:
    """`cfg`: the parsed LightningCLI sub-command config (namespace or dict). `this_machine`: also check the
    hardware the trainer asks for (False where the job runs elsewhere, e.g. `lit-ovis submit`)."""
    args = _get(cfg, "model.init_args") or {}
    world = world_size(_get(cfg, "trainer") or {})
    check_values(cfg)
    check_callbacks(cfg)
    check_data(_get(cfg, "data.init_args") or {}, world, subcommand)
    check_model(args, built_by_data(cfg))
    check_mesh(cfg, args, world)
    if this_machine:
        check_hardware(_get(cfg, "trainer") or {})
