"""The one Markdown table writer of the benchmarks: columns are data, every row is one line."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

_RULES = {"": "---", "left": ":---", "right": "---:", "center": ":---:"}


@dataclass(frozen=True)
class Column:
    """A table column: its header, how a row becomes its cell, and its alignment ("", left, right, center)."""

    header: str
    cell: Callable[[dict], str]
    align: str = ""


def table(columns: Sequence[Column], rows: Sequence[dict]) -> str:
    """A Markdown table of `rows`: a header line, a rule, then exactly one line per row."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join(_RULES[c.align] for c in columns) + "|"]
    lines += ["| " + " | ".join(c.cell(r) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
