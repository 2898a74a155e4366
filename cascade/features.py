"""Feature spec: every categorical field a model can embed, with its side and vocabulary.

Ids of every field run 1..vocab; 0 is padding or unknown. A multi-valued field (genres, tags)
is stored padded to ``max_len`` with zeros. ``table`` says where the values live: the users or
items table (one value per entity), or the candidates table (one value per (request, item),
for statistics that differ per sample such as out-of-fold mean ratings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Side = Literal["user", "item"]
Table = Literal["users", "items", "candidates"]


@dataclass(frozen=True)
class Field:
    name: str
    side: Side
    vocab: int
    multi: bool = False
    max_len: int = 1
    table: Table | None = None  # default: users for the user side, items for the item side

    @property
    def source(self) -> Table:
        return self.table or ("users" if self.side == "user" else "items")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.table is None:
            del out["table"]
        if not self.multi:
            del out["max_len"]
        return out


@dataclass(frozen=True)
class FeatureSpec:
    fields: tuple[Field, ...]

    def side(self, side: Side) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.side == side)

    def in_table(self, table: Table) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.source == table)

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

