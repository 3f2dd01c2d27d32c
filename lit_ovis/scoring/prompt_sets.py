"""Prompt-set readers: generic JSONL, CVTG-2K-style and LongText-Bench-style entries (prompt + the text
to render), GenEval metadata (prompt + tag). Each yields dicts with prompt, language, target_text, id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lit_ovis.errors import DataError
from lit_ovis.scoring.metrics import language_of

TEXT_KEYS = ("target_text", "text", "words", "target", "texts", "gt_text")


def _target(entry: dict[str, Any]) -> str:
    for key in TEXT_KEYS:
        value = entry.get(key)
        if value:
            return " ".join(value) if isinstance(value, (list, tuple)) else str(value)
    return ""


def _entries(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and path.suffix == ".json"):
        data = json.loads(text)
        if isinstance(data, dict):  # {"id": {...}} or {"data": [...]}
            data = data.get("data") or [{"id": k, **v} if isinstance(v, dict) else {"id": k, "prompt": v} for k, v in data.items()]
        return list(data)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n}: not valid JSON; each line must be an object with a 'prompt'") from None
    return out


def read_prompt_set(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: prompt file not found; pass a JSONL with 'prompt' (and 'target_text', 'language')")
    if path.suffix == ".txt":
        raw = [{"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raw = _entries(path)
    items = []
    for i, entry in enumerate(raw[:limit] if limit else raw):
        prompt = entry.get("prompt") or entry.get("caption")
        if not prompt:
            raise DataError(f"{path}: entry {i} has no 'prompt'")
        target = _target(entry)
        language = entry.get("language") or entry.get("lang") or language_of(target or prompt)
        items.append({"id": str(entry.get("id", i)), "prompt": prompt, "target_text": target, "language": language, "tag": entry.get("tag", "")})
    return items
