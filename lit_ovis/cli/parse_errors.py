"""One line for a command line that jsonargparse refuses: the option, what is wrong with it and, for a
typo, the closest valid key (instead of the ~45-line usage and nested `Does not validate against any of
the Union subtypes` blocks).

`summarise(message, argv, known_keys)` maps jsonargparse's message (pinned jsonargparse 4.x wording; an
unknown shape falls back to its first informative line) to that line; `known_keys(option)` (the valid
keys of the command line without the unknown `option`) is only called for unknown options.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable

from lit_ovis.errors import closest

_PARSER_KEY = re.compile(r'Parser key "([^"]+)":')
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_EXPECTED = re.compile(r"Expected a (?:<class '([\w.]+)'>|(typing\.Literal\[.*\]))(?:\. Got value: (.*))?")
_GIVEN = re.compile(r"Given value: (.*)")
_NESTED_VALUE = re.compile(r"NestedArg\(key='[^']*', val=(.*)\)$")
_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


def closest_key(option: str, keys: Iterable[str]) -> str | None:
    """The valid key a typo meant: compare leaf names among the siblings (`--data.bogus` must not match
    `--data.seed` for their shared `--data.`), else whole keys strictly (a misspelt parent)."""
    keys = set(keys)
    parent, _, leaf = option.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent} if parent else {}
    guess = closest(leaf, siblings) if siblings else None
    return siblings[guess] if guess else closest(option, keys, cutoff=0.85)


def _unknown(option: str, known_keys: Callable[[str], Iterable[str]]) -> str:
    guess = closest_key(option, known_keys(option))
    return f"{option}: no such option" + (f" (did you mean {guess}?)" if guess and guess != option else "")


def _given(message: str) -> str | None:
    match = _GIVEN.search(message)
    if not match:
        return None
    value = match.group(1).strip()
    nested = _NESTED_VALUE.match(value)
    return nested.group(1).strip("'\"") if nested else value


def _expected(block: str, given: str | None) -> str | None:
    """`expected int, got 'abc'` / `expected one of 64, 32, '16-true', ..., got '17'` from the Expected lines."""
    types, literals, got = [], [], given
    for match in _EXPECTED.finditer(block):
        name, literal, value = match.groups()
        if literal:
            literals += [v.strip() for v in literal[len("typing.Literal["):-1].split(",")]
        elif name and name != "NoneType":
            types.append(name.rsplit(".", 1)[-1])
        if value is not None:
            got = value.strip()
    if not types and not literals:
        return None
    want = f"one of {', '.join(dict.fromkeys(literals))}" if literals else " or ".join(dict.fromkeys(types))
    return f"expected {want}" + (f", got '{got}'" if got is not None else "")


def _detail(block: str, given: str | None) -> str:
    expected = _expected(block, given)
    if expected:
        return expected
    for line in block.splitlines():
        line = line.strip().lstrip("- ").strip()
        if line and not line.startswith(("Does not validate", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")):
            return line
    return block.strip().splitlines()[0] if block.strip() else "invalid value"


def _yaml_file_error(argv: list[str]) -> str | None:
    """The first --config file that is not valid YAML, with the line and problem."""
    import yaml

    for k, arg in enumerate(argv):
        path = argv[k + 1] if arg in ("--config", "-c") and k + 1 < len(argv) else arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if not path or not Path(path).is_file():
            continue
        try:
            yaml.safe_load(Path(path).read_text(encoding="utf-8", errors="replace"))
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            return f"--config {path}: not valid YAML ({where}{err.problem})"
        except yaml.YAMLError as err:
            return f"--config {path}: not valid YAML ({str(err).splitlines()[0]})"
    return None


def _missing_value(argv: list[str], prefix: str) -> str | None:
    """The `--prefix...` option of argv that has no value (argparse takes `-1e-3` for an option)."""
    for k, arg in enumerate(argv):
        if (arg == prefix or arg.startswith(prefix + ".")) and "=" not in arg:
            nxt = argv[k + 1] if k + 1 < len(argv) else None
            if nxt is None or nxt.startswith("-"):
                if nxt is not None and re.fullmatch(r"-[\d.][\w.+-]*", nxt):
                    return f"{arg}: the value {nxt} looks like an option; attach it with '=': {arg}={nxt}"
                return f"{arg}: no value given; write {arg} VALUE or {arg}=VALUE"
    return None


def summarise(message: str, argv: list[str], known_keys: Callable[[str], Iterable[str]]) -> str:
    """One line (no newline) for jsonargparse's error `message` about `argv`."""
    if message.startswith("Problems parsing config"):
        return _yaml_file_error(argv) or "a --config file or value is not valid YAML: " + " ".join(message.split("\n")[0:2])
    choice = _CHOICE.search(message)
    if choice:
        bad, options = choice.group(1), [o.strip(" '") for o in choice.group(2).split(",")]
        guess = closest(bad, options)
        return f"'{bad}' is not a subcommand" + (f" (did you mean '{guess}'?)" if guess else "") + f"; choose from {', '.join(options)}"
    missing = re.match(r"argument (--?[\w.-]+): expected one argument", message)
    if missing:
        return _missing_value(argv, missing.group(1)) or f"{missing.group(1)}: no value given"
    unknown = _UNRECOGNIZED.match(message)
    if unknown:
        return _unknown(unknown.group(1).split("=")[0], known_keys)
    outer = _PARSER_KEY.match(message)
    if not outer:
        return message.strip().splitlines()[0]
    option, rest = "--" + outer.group(1), message[outer.end():]
    if outer.group(1) == "config":  # the path as the user gave it, not jsonargparse's absolute one
        return f"--config: {rest.strip().splitlines()[0]}".replace(f"'{os.getcwd()}{os.sep}", "'")
    problem = _CLASS_PROBLEM.search(rest)
    if problem:
        class_path, first = problem.group(1), problem.group(2).strip()
        inner_unknown = _UNRECOGNIZED.match(first) or _NOT_ACCEPTED.match(first)
        if inner_unknown:
            return _unknown(f"{option}.{inner_unknown.group(1).lstrip('-').split('=')[0]}", known_keys)
        inner = _PARSER_KEY.match(first)
        if inner:
            block = rest[problem.start(2) + inner.end():]
            block = block.split("\n    - ", 1)[0]  # only this class's problem, not the other Union members
            return f"{option}.{inner.group(1)}: {_detail(block, _given(rest))}"
        if "has no attribute" in first or "No module named" in first or "not accessible" in first:
            return f"{option}: cannot import '{class_path}' ({first})"
        return f"{option}: {first} (class {class_path})"
    return f"{option}: {_detail(rest, _given(rest))}"
