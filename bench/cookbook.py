"""The queries of docs/sql.md, for the tests that run them and the schema bench that times them.

Each ``### N. Question`` heading owns the next ```` ```sql ```` block (the query) and, where the
query reads a rollup, a ```` ```sql raw ```` block (the same answer from the raw tables).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "sql.md"
_HEADING = re.compile(r"^### (\d+)\. (.+)$", re.M)
_BLOCK = re.compile(r"^```sql( raw)?\n(.*?)^```", re.M | re.S)


@dataclass
class Recipe:
    number: int
    question: str
    sql: str
    raw: str | None  # the raw-table equivalent of a rollup query

    def tables(self) -> set[str]:
        return set(re.findall(r"\bhdrlog\.(\w+)", self.sql + (self.raw or "")))


def recipes(path: Path = DOC) -> list[Recipe]:
    text = path.read_text()
    heads = list(_HEADING.finditer(text))
    out = []
    for i, h in enumerate(heads):
        body = text[h.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        main = raw = None
        for b in _BLOCK.finditer(body):
            if b.group(1):
                raw = b.group(2).strip()
            elif main is None:
                main = b.group(2).strip()
        if main is None:
            raise ValueError(f"docs/sql.md: question {h.group(1)} has no ```sql block")
        out.append(Recipe(int(h.group(1)), h.group(2).strip(), main, raw))
    return out
