"""Prompt-set readers. Every item: {id, prompt, target_text, target_texts, language, benchmark, regions, subset, tag}
(plus width/height when the entry gives its image size).

Formats (checked against the benchmarks' public files):
- our JSONL / JSON list: {"prompt", "target_text" (or text / texts / words / target / gt_text), "language"?, "id"?};
- CVTG-2K (TextCrafter): `CVTG[-Style]/<N>.json` = {"data_list": [{"index", "prompt", "carrier_list",
  "sentence_list"}]} with N = number of text regions (2-5), and `<N>_combined.json` = {"<index>": prompt}. The
  texts to render are the single-quoted spans of the prompt (what the CVTG-2K scorer reads), else those of
  `sentence_list`. A CVTG-2K root folder reads all of its `<N>.json` files;
- LongText-Bench (X-Omni `textbench/text_prompts[_zh].jsonl`): {"prompt_id", "prompt", "text": [...], "category",
  "length", "text_length"}; the id is `prompt_id`;
- GenEval `evaluation_metadata.jsonl`: {"tag", "include", "exclude"?, "prompt"} (no text to render);
- `.txt`: one prompt per line.
Lines that are not JSON and entries without a prompt are skipped and counted (one line on stderr).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from lit_ovis.errors import DataError
from lit_ovis.scoring.metrics import language_of, quoted_spans

TEXT_KEYS = ("target_text", "text", "texts", "words", "target", "gt_text", "sentence_list")
_REGIONS_FILE = re.compile(r"^(\d+)(_combined)?\.json$")


def _texts(value) -> list[str]:
    if not value:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _targets(entry: dict[str, Any]) -> list[str]:
    for key in TEXT_KEYS:
        texts = _texts(entry.get(key))
        if texts:
            if key == "sentence_list":  # CVTG-2K region descriptions: the quoted span is the text
                return [q for s in texts for q in (quoted_spans(s) or [s])]
            return texts
    return []


def _item(entry: dict[str, Any], default_id: str, benchmark: str, targets: list[str], **extra) -> dict[str, Any]:
    prompt = entry.get("prompt") or entry.get("caption")
    target = " ".join(targets)
    language = entry.get("language") or entry.get("lang") or language_of(target or prompt)
    item = {"id": str(entry.get("id", default_id)), "prompt": prompt, "target_text": target, "target_texts": targets,
            "language": language, "benchmark": benchmark, "regions": extra.pop("regions", None),
            "subset": extra.pop("subset", ""), "tag": entry.get("tag", "")}
    for key in ("width", "height"):  # the image size this prompt is meant for (e.g. the word task's buckets)
        if isinstance(entry.get(key), int) and entry[key] > 0:
            item[key] = entry[key]
    item.update(extra)
    return item


class _Reader:
    def __init__(self, path: Path):
        self.path = path
        self.skipped: list[str] = []

    def cvtg_file(self, path: Path, data: Any = None) -> list[dict[str, Any]]:
        m = _REGIONS_FILE.match(path.name)
        regions = int(m.group(1)) if m else None
        subset = path.parent.name
        data = json.loads(path.read_text(encoding="utf-8")) if data is None else data
        if isinstance(data, dict) and "data_list" in data:
            rows = data["data_list"]
        elif isinstance(data, dict):  # <N>_combined.json: {"index": prompt}
            rows = [{"index": k, "prompt": v} for k, v in data.items()]
        else:
            raise DataError(f"{path}: not a CVTG-2K file (expected {{'data_list': [...]}} or {{index: prompt}})")
        out = []
        for n, row in enumerate(rows):
            if not isinstance(row, dict) or not row.get("prompt"):
                self.skipped.append(f"{path.name} entry {n} has no prompt")
                continue
            targets = quoted_spans(row["prompt"]) or _targets(row)
            index = row.get("index", n)
            out.append(_item(row, f"{subset}_{regions}_{index}", "cvtg", targets,
                             regions=regions or len(targets) or None, subset=subset))
        return out

    def load_json(self) -> Any:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{self.path}: not valid JSON ({err.msg} at line {err.lineno})") from None

    def entries(self, data: Any = None) -> list[tuple[str, dict[str, Any]]]:
        """(location, raw entry) pairs of a JSON (already parsed: `data`) or JSONL file."""
        text = self.path.read_text(encoding="utf-8") if data is None else ""
        if data is not None or text.lstrip().startswith("["):
            data = self.load_json() if data is None else data
            if isinstance(data, dict):  # {"data": [...]} or {"id": {...} | "prompt"}
                data = data.get("data") or [{"id": k, **v} if isinstance(v, dict) else {"id": k, "prompt": v} for k, v in data.items()]
            return [(f"entry {i}", e) for i, e in enumerate(data)]
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError:
                self.skipped.append(f"line {n} is not JSON")
        return out

    def read(self) -> list[dict[str, Any]]:
        p = self.path
        if p.is_dir():  # a CVTG-2K root: CVTG/<N>.json and CVTG-Style/<N>.json
            files = sorted(f for f in p.glob("*/*.json") if _REGIONS_FILE.match(f.name) and "_combined" not in f.name)
            if not files:
                raise DataError(f"{p}: a folder must be a CVTG-2K root with CVTG/<N>.json files; else pass a prompt file")
            return [it for f in files for it in self.cvtg_file(f)]
        if p.suffix == ".txt":
            return [_item({"prompt": line.strip()}, str(i), "txt", []) for i, line in
                    enumerate(x for x in p.read_text(encoding="utf-8").splitlines() if x.strip())]
        data = self.load_json() if p.suffix == ".json" else None
        if isinstance(data, dict) and ("data_list" in data or (_REGIONS_FILE.match(p.name) and data
                                                               and all(isinstance(v, str) for v in data.values()))):
            return self.cvtg_file(p, data)
        items = []
        for i, (where, e) in enumerate(self.entries(data)):
            if not isinstance(e, dict) or not (e.get("prompt") or e.get("caption")):
                self.skipped.append(f"{where} has no 'prompt'")
                continue
            if "prompt_id" in e and isinstance(e.get("text"), list):  # LongText-Bench
                items.append(_item(e, str(e["prompt_id"]), "longtext", _texts(e["text"]), category=e.get("category", ""),
                                   length=e.get("length", "")))
            elif "include" in e and "tag" in e:  # GenEval
                items.append(_item(e, str(i), "geneval", [], include=e["include"], exclude=e.get("exclude", [])))
            else:
                items.append(_item(e, str(i), "jsonl", _targets(e)))
        return items


def read_prompt_set(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: prompt file not found; pass a JSONL with 'prompt' (and 'target_text', 'language')")
    reader = _Reader(path)
    items = reader.read()
    if reader.skipped:
        print(f"{path}: skipped {len(reader.skipped)} unusable entries ({'; '.join(reader.skipped[:3])}"
              f"{'; ...' if len(reader.skipped) > 3 else ''})", file=sys.stderr)
    if not items:
        raise DataError(f"{path}: no usable prompts ({len(reader.skipped)} entries skipped); each needs a 'prompt'")
    return items[:limit] if limit else items
