"""How much disk a prepare run will fill, before it starts, as pure functions of the settings and the input count.

Per sample (at most; the storage dtype, fp16 by default, sets the bytes per value):
- latents: 16 channels x (W/8) x (H/8) of the largest bucket of the target area (about resolution^2 / 64 values);
- text, by `--text-storage`: `embeddings` stores up to `max_sequence_length` x hidden-size values (trimmed to the
  caption's tokens on disk, so this is the bound, reached by captions of the full length); `tokens` stores up to
  `max_sequence_length` + the template's prefix int32 token ids; `captions` stores the text alone (not counted).
  With tokens or captions, training encodes the text online (`OvisBaseModule.embed_prompts`).
The restart cache (`<root>/_work/`) holds the same tensors until the merge has written the dataset, so a run
needs up to twice the dataset while it works (less what the cache already holds); `--keep-work false` frees the
cache once the dataset is written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from data_modules.buckets import make_buckets

LATENT_CHANNELS = 16
TOKEN_BYTES = 4  # int32 token ids
OVIS_HIDDEN_SIZE = 2048  # Qwen3-1.7B (Ovis2.5-2B's LLM), when a text encoder's config cannot be read


def dtype_bytes(name: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, name)).element_size()


def latent_bytes(resolution: int, min_aspect: float, max_aspect: float, storage_dtype: str) -> int:
    """Bytes of the largest latent any bucket of this resolution stores."""
    w, h = max(make_buckets(resolution, min_aspect, max_aspect), key=lambda b: b[0] * b[1])
    return LATENT_CHANNELS * (w // 8) * (h // 8) * dtype_bytes(storage_dtype)


def text_bytes(text_storage: str, max_sequence_length: int, hidden_size: int, storage_dtype: str) -> int:
    """Bytes of one caption's stored text representation, at most (captions themselves not counted)."""
    if text_storage == "embeddings":
        return max_sequence_length * hidden_size * dtype_bytes(storage_dtype)
    if text_storage == "tokens":
        from lit_ovis.models.text_encoder import OVIS_PREFIX_TOKENS  # the template's prefix is stored with the caption

        return (max_sequence_length + OVIS_PREFIX_TOKENS) * TOKEN_BYTES
    return 0


def text_encoder_hidden_size(source: str | None) -> tuple[int, str]:
    """(hidden size, where it came from) of a text-encoder source, from its config alone (no weights loaded)."""
    from lit_ovis.models.presets import TEXT_ENCODER_PRESETS

    if not source:
        return 0, "none"
    if source in TEXT_ENCODER_PRESETS:
        return int(TEXT_ENCODER_PRESETS[source]["hidden_size"]), f"preset {source}"
    for config in (Path(source) / "text_encoder" / "config.json", Path(source) / "config.json"):
        try:
            return int(json.loads(config.read_text())["hidden_size"]), str(config)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(source, subfolder="text_encoder").hidden_size), f"{source} (hub cache)"
    except Exception:  # noqa: BLE001 - offline, not cached: the projection says what it assumed
        return OVIS_HIDDEN_SIZE, f"assumed {OVIS_HIDDEN_SIZE} (Ovis' Qwen3; {source}'s config not readable here)"


def free_bytes(path: str | Path) -> int:
    """Free space on the filesystem that holds `path` (or would, once created)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


@dataclass(frozen=True)
class StoragePlan:
    samples: int
    counted: str  # "exact" or what the estimate rests on
    latent_bytes: int  # per sample
    text_bytes: int  # per sample
    text_storage: str
    cache_done_fraction: float  # of the restart cache already on disk
    free: int

    @property
    def dataset(self) -> int:
        return self.samples * (self.latent_bytes + self.text_bytes)

    @property
    def needed(self) -> int:
        """Dataset (written beside any older version, then swapped in) + the cache still to be written."""
        return self.dataset + round(self.dataset * (1.0 - self.cache_done_fraction))

    def describe(self, resolution: int) -> str:
        text = {"embeddings": "text embeddings", "tokens": "caption tokens", "captions": "captions only"}[self.text_storage]
        return (f"prepare {resolution}: {self.samples:,} inputs ({self.counted}) -> at most {human(self.dataset)} "
                f"(latents {human(self.samples * self.latent_bytes)} + {text} {human(self.samples * self.text_bytes)}); "
                f"needs {human(self.needed)} with the restart cache, {human(self.free)} free")

    def refusal(self, output_dir: str) -> str | None:
        if self.needed <= self.free:
            return None
        hint = (", or store caption tokens and let training encode them online (--text-storage tokens)"
                if self.text_storage == "embeddings" else "")
        return (f"--output-dir {output_dir}: this prepare needs up to {human(self.needed)} ({human(self.dataset)} dataset + its restart "
                f"cache) but {human(self.free)} is free; free space, choose another --output-dir{hint}")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
