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
        """Parse schema.json text; raises ValueError naming the offending key and value.

        Types are strict: ``temporal: "false"`` is an error, not true; unknown keys are errors."""
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ValueError("top level must be an object")
        unknown = sorted(set(body) - TOP_KEYS)
        if unknown:
            raise ValueError(f"unknown key '{unknown[0]}' (known: {', '.join(sorted(TOP_KEYS))})")
        for key in ("name", "temporal", "history_max", "fields"):
            if key not in body:
                raise ValueError(f"missing key '{key}'")
        if body.get("format", FORMAT) != FORMAT:
            raise ValueError(f"key 'format': {body['format']!r} is not format {FORMAT}")
        _expect(body["name"], str, "name")
        _expect(body["temporal"], bool, "temporal")
        history_max = _positive(body["history_max"], "history_max")
        _expect(body["fields"], list, "fields")
        fields = []
        for i, raw in enumerate(body["fields"]):
            _expect(raw, dict, f"fields[{i}]")
            unknown = sorted(set(raw) - FIELD_KEYS)
            if unknown:
                raise ValueError(f"fields[{i}]: unknown key '{unknown[0]}' (known: {', '.join(sorted(FIELD_KEYS))})")
            for key in ("name", "side", "vocab"):
                if key not in raw:
                    raise ValueError(f"fields[{i}]: missing key '{key}'")
            where = f"fields[{i}] '{raw['name']}'"
            _expect(raw["name"], str, f"fields[{i}].name")
            if raw["side"] not in ("user", "item"):
                raise ValueError(f"{where}: side {raw['side']!r} is not 'user' or 'item'")
            if raw.get("table") not in (None, "users", "items", "candidates"):
                raise ValueError(f"{where}: table {raw['table']!r} is unknown")
            _positive(raw["vocab"], f"fields[{i}].vocab")
            _expect(raw.get("multi", False), bool, f"fields[{i}].multi")
            _positive(raw.get("max_len", 1), f"fields[{i}].max_len")
            fields.append(Field(**raw))
        names = [f.name for f in fields]
        for key in ("user_id", "item_id"):
            if key not in names:
                raise ValueError(f"fields: no '{key}' field")
        if len(set(names)) != len(names):
            raise ValueError("fields: a field name is repeated")
        quotas = body.get("quotas")
        if quotas is not None:
            _expect(quotas, dict, "quotas")
            if set(quotas) - set(QUOTA_NAMES):
                raise ValueError(f"quotas: unknown stages {sorted(set(quotas) - set(QUOTA_NAMES))}")
            for k, v in quotas.items():
                _positive(v, f"quotas.{k}")
        protocol = body.get("protocol", {})
        _expect(protocol, dict, "protocol")
        return Schema(
            name=body["name"],
            features=FeatureSpec(tuple(fields)),
            temporal=body["temporal"],
            history_max=history_max,
            quotas=None if quotas is None else {k: quotas[k] for k in QUOTA_NAMES if k in quotas},
            protocol=protocol,
        )

    @staticmethod
    def read(directory: Path) -> "Schema":
        path = Path(directory) / SCHEMA_FILE
        if path.is_dir():
            raise ValueError("is a directory, not a file")
        try:
            text = path.read_text()
        except UnicodeDecodeError as e:
            raise ValueError(f"not UTF-8 text: {e}") from None
        return Schema.from_json(text)


TOP_KEYS = {"format", "name", "temporal", "history_max", "quotas", "fields", "protocol"}
FIELD_KEYS = {"name", "side", "vocab", "multi", "max_len", "table"}
TYPE_NAMES = {str: "a string", bool: "true or false", list: "a list", dict: "an object", int: "a whole number"}


def _expect(value: Any, typ: type, key: str) -> None:
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"key '{key}': {value!r} is not {TYPE_NAMES[typ]}")


def _positive(value: Any, key: str) -> int:
    _expect(value, int, key)
    if value < 1:
        raise ValueError(f"key '{key}': {value!r} is not a positive whole number")
    return value
