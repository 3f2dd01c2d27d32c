"""The diffusers scheduler <-> `SamplingConfig`: what an exported folder's `scheduler/` says and what we write.

`OvisImagePipeline` samples with `FlowMatchEulerDiscreteScheduler`: sigmas linspace(1, 1/N, N), then the
resolution-dependent (FLUX) exponential shift whose mu runs from `base_shift` at `base_image_seq_len` image
tokens to `max_shift` at `max_image_seq_len`. Our sampler (`lit_ovis.sampling.ode`) implements exactly that,
so those four numbers are read from a folder; a scheduler set to anything else (a static shift, Karras /
exponential / beta sigmas, a terminal shift, ...) would sample differently, and is refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler

from lit_ovis.errors import CheckpointError
from lit_ovis.sampling.generate import SamplingConfig

SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# scheduler config key -> SamplingConfig field
SHIFT_FIELDS = {"base_shift": "base_shift", "max_shift": "max_shift", "base_image_seq_len": "base_seq_len",
                "max_image_seq_len": "max_seq_len"}
# Settings our sampler does not implement: the value it assumes for each.
ASSUMED = {"num_train_timesteps": 1000, "use_dynamic_shifting": True, "time_shift_type": "exponential", "shift_terminal": None, "invert_sigmas": False,
           "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False}


def scheduler_for(sampling: SamplingConfig) -> FlowMatchEulerDiscreteScheduler:
    """The pipeline scheduler that samples as `sampling` does (what `lit-ovis export` writes)."""
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=sampling.base_shift,
        max_shift=sampling.max_shift,
        base_image_seq_len=sampling.base_seq_len,
        max_image_seq_len=sampling.max_seq_len,
    )


def sampling_from_scheduler(config: dict[str, Any], source: str, base: SamplingConfig | None = None) -> SamplingConfig:
    """`base` (default: the pipeline's defaults) with the scheduler's shift settings; one line for a scheduler
    our sampler would not reproduce."""
    name = config.get("_class_name", SCHEDULER_CLASS)
    if name != SCHEDULER_CLASS:
        raise CheckpointError(f"{source}: scheduler is {name}; lit-ovis samples like {SCHEDULER_CLASS} only "
                              "(re-export the folder with lit-ovis export, or sample it with its diffusers pipeline)")
    for key, assumed in ASSUMED.items():
        value = config.get(key, assumed)
        if value != assumed and not (assumed is None and not value):
            raise CheckpointError(f"{source}: scheduler sets {key}={value!r}; lit-ovis samples with {key}={assumed!r} "
                                  "only (the pipeline's resolution-dependent shift), so its images would differ: sample "
                                  "this folder with its diffusers pipeline, or set the scheduler back")
    values = {field: config[key] for key, field in SHIFT_FIELDS.items() if config.get(key) is not None}
    return replace(base or SamplingConfig(), **values)


def read_scheduler_config(folder: str) -> dict[str, Any] | None:
    """`<folder>/scheduler/scheduler_config.json` of a local pipeline folder, or None when it has none."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable scheduler config ({type(err).__name__}); re-export the folder") from None


def scheduler_mismatch(config: dict[str, Any], sampling: SamplingConfig) -> list[tuple[str, Any, Any]]:
    """(SamplingConfig field, our value, the scheduler's) for every shift setting on which they disagree."""
    return [(field, getattr(sampling, field), config[key]) for key, field in SHIFT_FIELDS.items()
            if config.get(key) is not None and float(config[key]) != float(getattr(sampling, field))]
