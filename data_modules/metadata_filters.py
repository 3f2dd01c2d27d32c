"""Filters on the metadata a record carries (a tar sample's .json, a Parquet row's other columns, a manifest row's
other keys), as pure functions: `--metadata-filters "aesthetic>=5,punsafe<0.5,width>=512,status==success"`.

A record whose value fails a filter is skipped as `filter_<key>`; one that lacks the key, or whose value cannot be
compared (not a number for an ordering, NaN), is skipped as `missing_<key>`. Filters are checked before an image
is decoded, so filtering on scores and sizes carried in the metadata costs no decoding.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any

from lit_ovis.errors import ConfigError

OPERATORS = {">=": operator.ge, "<=": operator.le, "!=": operator.ne, "==": operator.eq, ">": operator.gt, "<": operator.lt}
_FILTER = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|!=|==|>|<)\s*(.+?)\s*$")
EXAMPLE = '"aesthetic>=5,punsafe<0.5,width>=512"'


@dataclass(frozen=True)
class MetadataFilter:
    key: str
    op: str
    value: float | str

    def reason(self, meta: dict[str, Any] | None) -> str | None:
        """Why a record with this metadata is skipped, or None when it passes."""
        value = (meta or {}).get(self.key)
        if isinstance(self.value, str):  # equality on text
            if value is None:
                return f"missing_{self.key}"
            return None if OPERATORS[self.op](str(value), self.value) else f"filter_{self.key}"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return f"missing_{self.key}"
        try:
            number = float(value)
        except ValueError:
            return f"missing_{self.key}"
        if math.isnan(number):
            return f"missing_{self.key}"
        return None if OPERATORS[self.op](number, self.value) else f"filter_{self.key}"


def parse_filters(text: str | None) -> list[MetadataFilter]:
    """`key<op>value` terms separated by commas; a number compares numerically, anything else only with == or !=."""
    filters = []
    for term in (text or "").split(","):
        if not term.strip():
            continue
        m = _FILTER.match(term)
        if not m:
            raise ConfigError(f"--metadata-filters: cannot read '{term.strip()}'; write key<op>value terms separated by commas "
                              f"(op one of >= <= > < == !=), e.g. {EXAMPLE}")
        key, op, raw = m.groups()
        try:
            value: float | str = float(raw)
        except ValueError:
            if op not in ("==", "!="):
                raise ConfigError(f"--metadata-filters: '{term.strip()}' orders by a value that is not a number; "
                                  f"use a number, or == / != for text, e.g. {EXAMPLE}") from None
            value = raw.strip("\"'")
        filters.append(MetadataFilter(key, op, value))
    return filters


def filter_reason(filters: list[MetadataFilter], meta: dict[str, Any] | None) -> str | None:
    """The skip reason of the first filter the metadata fails, or None when it passes them all."""
    for f in filters:
        reason = f.reason(meta)
        if reason:
            return reason
    return None


def filter_keys(filters: list[MetadataFilter]) -> list[str]:
    return sorted({f.key for f in filters})
