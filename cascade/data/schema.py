"""The cascade log schema: ``schema.json`` and the four parquet tables beside it.

Stage codes in ``candidates.stage`` name the last quota an item survived in the logged cascade.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.features import Field, FeatureSpec

FORMAT = 1
SPLITS = ("train", "valid", "test")
STAGES = {0: "recalled", 1: "passed pre-rank", 2: "passed rank", 3: "exposed"}
EXPOSED = 3
QUOTA_NAMES = ("recall", "prerank", "rank", "exposed")

SCHEMA_FILE = "schema.json"
TABLE_FILES = {
    "users": "users.parquet",
    "items": "items.parquet",
    "requests": "requests.parquet",
    "candidates": "candidates.parquet",
}


@dataclass(frozen=True)
class Schema:
    """What ``schema.json`` holds.

    temporal: ``ts`` orders events and every ``history_ts`` precedes its request's ``ts``.
    quotas: the logged cascade's quota per stage (recall, prerank, rank, exposed), if known.
    protocol: how the data was made, with its counts (free-form, written by the producer).
    """

    name: str
    features: FeatureSpec
    temporal: bool
    history_max: int
    quotas: dict[str, int] | None = None
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        body = {
            "format": FORMAT,
            "name": self.name,
            "temporal": self.temporal,
            "history_max": self.history_max,
            "quotas": self.quotas,
            "fields": [f.to_json() for f in self.features.fields],
            "protocol": self.protocol,
        }
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str) -> "Schema":
        """Parse schema.json text; raises ValueError naming the offending key."""
        body = json.loads(text)
        if not isinstance(body, dict):
            raise ValueError("top level must be an object")
        for key in ("name", "temporal", "history_max", "fields"):
            if key not in body:
                raise ValueError(f"missing key '{key}'")
        if body.get("format", FORMAT) != FORMAT:
            raise ValueError(f"key 'format': {body['format']!r} is not format {FORMAT}")
        fields = []
        for i, raw in enumerate(body["fields"]):
            try:
                f = Field(**raw)
            except TypeError as e:
                raise ValueError(f"fields[{i}]: {e}") from None
            if f.side not in ("user", "item"):
                raise ValueError(f"fields[{i}] '{f.name}': side {f.side!r} is not 'user' or 'item'")
            if not isinstance(f.vocab, int) or f.vocab < 1:
                raise ValueError(f"fields[{i}] '{f.name}': vocab {f.vocab!r} is not a positive integer")
            if f.table not in (None, "users", "items", "candidates"):
                raise ValueError(f"fields[{i}] '{f.name}': table {f.table!r} is unknown")
            fields.append(f)
        names = [f.name for f in fields]
        for key in ("user_id", "item_id"):
            if key not in names:
                raise ValueError(f"fields: no '{key}' field")
        if len(set(names)) != len(names):
            raise ValueError("fields: a field name is repeated")
        quotas = body.get("quotas")
        if quotas is not None and (set(quotas) - set(QUOTA_NAMES)):
            raise ValueError(f"quotas: unknown stages {sorted(set(quotas) - set(QUOTA_NAMES))}")
        return Schema(
            name=str(body["name"]),
            features=FeatureSpec(tuple(fields)),
            temporal=bool(body["temporal"]),
            history_max=int(body["history_max"]),
            quotas=None if quotas is None else {k: int(quotas[k]) for k in QUOTA_NAMES if k in quotas},
            protocol=body.get("protocol", {}),
        )

    @staticmethod
    def read(directory: Path) -> "Schema":
        return Schema.from_json((Path(directory) / SCHEMA_FILE).read_text())
