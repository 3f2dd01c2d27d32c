"""Dependencies point down: library code (lit_ovis outside cli/, data_modules, callbacks) never imports the
command-line verbs in lit_ovis/cli/, not even inside a function. The tools call the library, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [p for pkg in ("lit_ovis", "data_modules", "callbacks") for p in sorted((ROOT / pkg).rglob("*.py"))
           if "cli" not in p.relative_to(ROOT).parts[1:-1] and p.relative_to(ROOT).parts[:2] != ("lit_ovis", "cli")]


def cli_imports(path: Path) -> list[str]:
    """Every `import lit_ovis.cli...` / `from lit_ovis.cli... import` / `from lit_ovis import cli` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if is_cli(node.module) else [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found += [f"{path.name}:{node.lineno}: {n}" for n in names if is_cli(n)]
    return found


def is_cli(module: str) -> bool:
    return module == "lit_ovis.cli" or module.startswith("lit_ovis.cli.")


def test_library_never_imports_the_cli():
    assert len(LIBRARY) > 50 and ROOT / "lit_ovis" / "checkpoints.py" in LIBRARY
    assert not any(p.relative_to(ROOT).parts[:2] == ("lit_ovis", "cli") for p in LIBRARY)
    offenders = [line for path in LIBRARY for line in cli_imports(path)]
    assert offenders == [], "library modules importing lit_ovis.cli (move the code into the library):\n" + "\n".join(offenders)


def test_the_scan_finds_cli_imports(tmp_path):
    """The scan itself sees top-level, function-local and package-style imports."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom lit_ovis.cli.eval import evaluate\nfrom lit_ovis.scoring import cli_like\n"
                     "def f():\n    from lit_ovis import cli\n    import lit_ovis.cli.export\n")
    assert sorted(line.split(": ", 1)[1] for line in cli_imports(probe)) == ["lit_ovis.cli", "lit_ovis.cli.eval", "lit_ovis.cli.export"]
