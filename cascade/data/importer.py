"""Users' own logs into a checked cascade log directory (``cascade data import``).

Input: an events table (CSV or parquet, one row per user-item event) and optional users and items
tables, with an ``ImportSpec`` (a small YAML, or command-line options) naming the columns:

* ``user``, ``item``: any ids (strings, sparse integers); each becomes 1..V in sorted order of the
  original values, and the vocabulary (id -> original value) is saved as ``vocab/NAME.parquet``;
* ``time``: seconds, milliseconds or microseconds since the epoch, or ISO-8601 text
  (``time_unit``); stored in seconds;
* ``label``: a 0/1 (or boolean) column, or a rule ``COLUMN OP NUMBER`` such as ``rating >= 4``;
* ``request`` (optional): a request id; without one a request is one user's events in one window
  of ``request_window`` seconds (default one UTC day), its ts the first event's time;
* ``stage`` (optional): the logged stage code 0..3; without one every event is an exposure (3).

Users' and items' other columns become features: ``categorical`` (any values -> 1..V, empty -> 0),
``multi`` (text split on a separator, e.g. genres ``"Drama|Crime"``) and ``numeric`` (quantile
buckets: ``{column: buckets}``, the boundaries saved in ``import.json``; empty -> 0). History is
the user's positives strictly before the request, oldest first, at most ``history_max``. The split
is by time (requests after the ``1 - valid - test`` and ``1 - test`` quantiles of request time:
the schema is temporal) or a seeded random one over requests.

Rows without a user, item, time or label are set aside and counted; an item seen twice in one
request keeps its highest label. Every array is a numpy or arrow column: memory grows with the
data, never a Python object per row.
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from cascade.data.history import last_before
from cascade.data.schema import EXPOSED, STAGES, Schema
from cascade.data.store import DataError, Dataset, Problem, ProblemLog, check_output_dir, duplicate_rows, write_dataset
from cascade.features import Field, FeatureSpec
from cascade.yamlfile import read_yaml

RULE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d+)?)\s*$")
OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
TIME_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "iso": None}
SPLITS = ("time", "random")
RESERVED = {"user_id", "item_id"}


@dataclass(frozen=True)
class Fields:
    """Feature columns of one side's table."""

    categorical: tuple[str, ...] = ()
    multi: dict[str, str] = field(default_factory=dict)  # column -> separator
    numeric: dict[str, int] = field(default_factory=dict)  # column -> buckets


@dataclass(frozen=True)
class ImportSpec:
    events: str
    user: str
    item: str
    time: str
    label: str  # a column of 0/1, or a rule "COLUMN OP NUMBER"
    users: str | None = None
    items: str | None = None
    request: str | None = None
    stage: str | None = None
    name: str = "imported"
    time_unit: str = "s"
    request_window: int = 86_400
    history_max: int = 50
    split: str = "time"
    valid: float = 0.1
    test: float = 0.1
    seed: int = 0
    user_fields: Fields = field(default_factory=Fields)
    item_fields: Fields = field(default_factory=Fields)

    def __post_init__(self) -> None:
        if self.time_unit not in TIME_UNITS:
            raise ValueError(f"time_unit: '{self.time_unit}' is not one of {', '.join(TIME_UNITS)}")
        if self.split not in SPLITS:
            raise ValueError(f"split: '{self.split}' is not one of {', '.join(SPLITS)}")
        for key in ("request_window", "history_max"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: {value!r} is not a positive whole number")
        for key in ("valid", "test"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{key}: {value!r} is not a fraction between 0 and 1")
        if self.valid + self.test >= 1:
            raise ValueError(f"valid + test: {self.valid + self.test} leaves no training requests")
        for side in (self.user_fields, self.item_fields):
            for col, buckets in side.numeric.items():
                if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 2:
                    raise ValueError(f"numeric.{col}: {buckets!r} buckets (need a whole number >= 2)")
            for col, sep in side.multi.items():
                if not isinstance(sep, str) or not sep:
                    raise ValueError(f"multi.{col}: separator {sep!r} is not a non-empty string")

    @staticmethod
    def from_dict(raw: Any, where: str, base: Path = Path(".")) -> "ImportSpec":
        """From a mapping (the YAML's); relative file paths resolve against ``base``."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
        raw = dict(raw)
        columns = raw.pop("columns", {}) or {}
        if not isinstance(columns, dict):
            raise ValueError(f"{where}: columns: expected a mapping")
        for key in columns:
            if key not in ("user", "item", "time", "label", "request", "stage"):
                raise ValueError(f"{where}: columns: unknown key '{key}' (known: user, item, time, label, request, stage)")
        raw.update(columns)
        known = {f.name for f in fields(ImportSpec)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key '{unknown[0]}' (known: columns, {', '.join(sorted(known - {'user', 'item', 'time', 'label', 'request', 'stage'}))})")
        for key in ("events", "user", "item", "time", "label"):
            if not raw.get(key):
                raise ValueError(f"{where}: '{key}' is required")
        for key in ("user_fields", "item_fields"):
            side = raw.get(key) or {}
            if not isinstance(side, dict) or set(side) - {"categorical", "multi", "numeric"}:
                raise ValueError(f"{where}: {key}: expected a mapping of categorical, multi, numeric")
            try:
                raw[key] = Fields(tuple(side.get("categorical") or ()), dict(side.get("multi") or {}), dict(side.get("numeric") or {}))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {key}: {e}") from None
        for key in ("events", "users", "items"):
            if raw.get(key) is not None:
                raw[key] = str(base / raw[key])
        try:
            return ImportSpec(**raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    @staticmethod
    def read(path: str | Path, overrides: dict[str, Any] | None = None) -> "ImportSpec":
        path = Path(path)
        body = read_yaml(path)
        columns = body.pop("columns", None) or {}
        if not isinstance(columns, dict):
            raise ValueError(f"{path}: columns: expected a mapping")
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        return ImportSpec.from_dict({**body, "columns": {k: v for k, v in columns.items() if k not in given}, **given}, str(path), path.parent)


# --------------------------------------------------------------------------------------------
# reading files


def read_table(path: str | Path, what: str) -> pa.Table:
    """A CSV (any other suffix) or parquet file as an arrow table, with a progress bar by bytes
    (CSV) or row groups (parquet); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError([Problem(str(path), None, None, None, f"{what} file is missing")])
    try:
        if path.suffix in (".parquet", ".pq"):
            f = pq.ParquetFile(path)
            parts = [f.read_row_group(i) for i in tqdm(range(f.num_row_groups), desc=f"read {path.name}", unit="group", leave=False, disable=None)]
            return pa.concat_tables(parts) if parts else f.schema_arrow.empty_table()
        size = path.stat().st_size
        convert = pacsv.ConvertOptions(strings_can_be_null=True)  # an empty field is missing
        with pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=16 << 20), convert_options=convert) as reader:
            batches = []
            with tqdm(total=size, desc=f"read {path.name}", unit="B", unit_scale=True, leave=False, disable=None) as bar:
                for batch in reader:
                    batches.append(batch)
                    bar.update(min(16 << 20, size - bar.n))
            return pa.Table.from_batches(batches, reader.schema)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError([Problem(str(path), None, None, None, f"cannot be read as {'parquet' if path.suffix in ('.parquet', '.pq') else 'CSV'}: {e}")]) from None


def _column(table: pa.Table, name: str, file: str, role: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DataError([Problem(file, name, None, None, f"column is missing (the {role} column; the file has {', '.join(table.column_names)})")])
    col = table.column(name)
    return col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col


def _refuse_rows(file: str, column: str, bad: np.ndarray, values: np.ndarray, message: str) -> None:
    """DataError naming the first row where ``bad`` holds, its value and the count, if any does
    (``store.ProblemLog.flag``, as validation reports them)."""
    log = ProblemLog()
    log.flag(file, column, bad, values, message)
    if log.problems:
        raise DataError(log.problems)


# --------------------------------------------------------------------------------------------
# value conversions


def vocabulary(values: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Sorted distinct non-null values and each value's id 1..V (0 for null)."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    distinct = pc.unique(values.drop_null())
    vocab = pc.take(distinct, pc.sort_indices(distinct))
    return vocab, _keys(values, vocab)


def buckets(values: pa.ChunkedArray, n: int, file: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Numeric values -> quantile bucket ids 1..B (0 for empty) and the B + 1 boundaries used
    (duplicates merged, so B <= n)."""
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise DataError([Problem(file, column, None, None, f"has type {values.type}; numeric buckets need numbers")])
    v = values.to_numpy(zero_copy_only=False).astype(np.float64)
    known = np.isfinite(v)
    if not known.any():
        raise DataError([Problem(file, column, None, None, "holds no numbers to bucket")])
    edges = np.unique(np.quantile(v[known], np.linspace(0, 1, n + 1)))
    ids = np.searchsorted(edges[1:-1], v, side="right") + 1
    return np.where(known, ids, 0).astype(np.int64), edges


def label_values(events: pa.Table, rule: str, file: str) -> np.ndarray:
    """0/1 float labels from a 0/1 or boolean column, or from a rule ``COLUMN OP NUMBER``; NaN
    where the source is empty."""
    match = RULE.match(rule)
    name = match.group(1) if match else rule
    col = _column(events, name, file, "label")
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
        raise DataError([Problem(file, name, None, None, f"has type {col.type}; a label needs numbers (or a rule such as '{name} >= 4' on a numeric column)")])
    v = col.to_numpy(zero_copy_only=False).astype(np.float64)
    if match:
        out = OPS[match.group(2)](v, float(match.group(3))).astype(np.float64)
        return np.where(np.isnan(v), np.nan, out)
    _refuse_rows(file, name, np.isfinite(v) & (v != 0) & (v != 1), v, "label is not 0 or 1 (give a rule such as 'rating >= 4' instead)")
    return v


def seconds(col: pa.ChunkedArray, unit: str, file: str, name: str) -> np.ndarray:
    """Event times in whole seconds since the epoch (int64); -1 where empty."""
    if unit == "iso" and not pa.types.is_timestamp(col.type):
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise DataError([Problem(file, name, None, None, f"has type {col.type}; time_unit 'iso' needs text or timestamps")])
        try:
            col = pc.cast(col, pa.timestamp("s"))
        except pa.ArrowInvalid as e:
            raise DataError([Problem(file, name, None, None, f"is not ISO-8601 time: {e}")]) from None
    if pa.types.is_timestamp(col.type):
        return pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise DataError([Problem(file, name, None, None, f"has type {col.type}; time_unit '{unit}' needs numbers (or time_unit: iso)")])
    v = col.to_numpy(zero_copy_only=False).astype(np.float64)
    _refuse_rows(file, name, np.isfinite(v) & (v < 0), v, "time before 1970 (negative)")
    return np.where(np.isfinite(v), np.floor(v / TIME_UNITS[unit]), -1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# the import


def _side(spec_fields: Fields, table: pa.Table | None, file: str, key_ids: np.ndarray, n: int, side: str) -> tuple[dict[str, np.ndarray], list[Field], dict[str, Any], dict[str, pa.Array]]:
    """Feature columns of one side, aligned to its ids 1..n: (columns, fields, import notes,
    vocabularies). ``key_ids``: the table's rows' ids (0 for a row whose key is empty)."""
    columns: dict[str, np.ndarray] = {}
    out_fields: list[Field] = []
    notes: dict[str, Any] = {}
    vocabs: dict[str, pa.Array] = {}
    names = [*spec_fields.categorical, *spec_fields.multi, *spec_fields.numeric]
    if names and table is None:
        raise DataError([Problem(file, None, None, None, f"{side} fields {names} are named but no {side}s table was given")])
    if len(set(names)) != len(names) or RESERVED & set(names):
        raise DataError([Problem(file, None, None, None, f"{side} fields {names}: a name is repeated or reserved (user_id, item_id)")])
    keep = key_ids > 0
    rows = key_ids[keep] - 1

    def place(values: np.ndarray) -> np.ndarray:
        out = np.zeros((n, *values.shape[1:]), dtype=np.int64)
        out[rows] = values[keep]
        return out

    for name in spec_fields.categorical:
        vocab, ids = vocabulary(_column(table, name, file, f"{side} feature"))
        columns[name] = place(ids)
        out_fields.append(Field(name, side, max(len(vocab), 1)))
        vocabs[name] = vocab
    for name, sep in spec_fields.multi.items():
        col = _column(table, name, file, f"{side} feature")
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise DataError([Problem(file, name, None, None, f"has type {col.type}; a multi-valued field is text split on '{sep}'")])
        lists = pc.split_pattern(col.combine_chunks(), sep)
        flat = pc.list_flatten(lists)
        vocab, ids = vocabulary(flat)
        lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        width = max(int(lengths.max(initial=0)), 1)
        padded = np.zeros((len(lengths), width), dtype=np.int64)
        padded[np.repeat(np.arange(len(lengths)), lengths), np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)] = ids
        columns[name] = place(padded)
        out_fields.append(Field(name, side, max(len(vocab), 1), multi=True, max_len=width))
        vocabs[name] = vocab
    for name, n_buckets in spec_fields.numeric.items():
        ids, edges = buckets(_column(table, name, file, f"{side} feature"), n_buckets, file, name)
        columns[name] = place(ids)
        out_fields.append(Field(name, side, max(len(edges) - 1, 1)))  # one distinct value: one bucket
        notes[name] = {"buckets": len(edges) - 1, "boundaries": edges.tolist()}
    return columns, out_fields, notes, vocabs


def _keys(values: pa.ChunkedArray | pa.Array, vocab: pa.Array) -> np.ndarray:
    """Ids 1..V of ``values`` in ``vocab``; 0 where empty or absent."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return pc.index_in(values, value_set=vocab).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1


def _key_type(col: pa.ChunkedArray, file: str, name: str) -> pa.ChunkedArray:
    if pa.types.is_floating(col.type):
        v = col.to_numpy(zero_copy_only=False)
        _refuse_rows(file, name, np.isfinite(v) & (v != np.floor(v)), v, "id is not a whole number")
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)  # pandas writes a missing id as NaN
        return pc.cast(col, pa.int64(), safe=False)
    if pa.types.is_integer(col.type) or pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col
    raise DataError([Problem(file, name, None, None, f"has type {col.type}; ids are whole numbers or text")])


def _event_columns(events: pa.Table, spec: ImportSpec, ev_file: str) -> tuple[pa.ChunkedArray, pa.ChunkedArray, np.ndarray, np.ndarray, np.ndarray, pa.ChunkedArray | None]:
    """The events' user and item keys, time in seconds (-1 unknown), label (NaN unknown), stage
    code (-1 unknown) and request key (None: grouped by time window); bad types refused."""
    user_col = _key_type(_column(events, spec.user, ev_file, "user"), ev_file, spec.user)
    item_col = _key_type(_column(events, spec.item, ev_file, "item"), ev_file, spec.item)
    ts = seconds(_column(events, spec.time, ev_file, "time"), spec.time_unit, ev_file, spec.time)
    label = label_values(events, spec.label, ev_file)
    stage = np.full(events.num_rows, EXPOSED, dtype=np.int64)
    if spec.stage:
        col = _column(events, spec.stage, ev_file, "stage")
        if not pa.types.is_integer(col.type):
            raise DataError([Problem(ev_file, spec.stage, None, None, f"has type {col.type}; stage codes are whole numbers {sorted(STAGES)}")])
        stage = col.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        _refuse_rows(ev_file, spec.stage, ~np.isin(stage, list(STAGES)) & (stage != -1), stage, f"stage is not one of {sorted(STAGES)}")
    request_key = _key_type(_column(events, spec.request, ev_file, "request"), ev_file, spec.request) if spec.request else None
    return user_col, item_col, ts, label, stage, request_key


def _id_vocabularies(spec: ImportSpec, user_col: pa.ChunkedArray, item_col: pa.ChunkedArray, users: pa.Table | None, items: pa.Table | None) -> tuple[dict[str, pa.Array], dict[str, pa.ChunkedArray]]:
    """(``user_id`` and ``item_id`` vocabularies: every value seen in the events or the side
    tables, sorted, whose positions are the ids 1..V; the side tables' keys, cast to the events'
    key type)."""
    side_keys = {}
    for side, table, key, file in (("user", users, spec.user, spec.users), ("item", items, spec.item, spec.items)):
        if table is not None:
            side_keys[side] = _key_type(_column(table, key, Path(file).name, f"{side} key"), Path(file).name, key)
    vocabs: dict[str, pa.Array] = {}
    for side, col in (("user", user_col), ("item", item_col)):
        both = col
        if side in side_keys:
            file = Path(spec.users if side == "user" else spec.items).name
            try:
                side_keys[side] = pc.cast(side_keys[side], col.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DataError([Problem(file, spec.user if side == "user" else spec.item, None, None, f"has type {side_keys[side].type} but the events' {side} ids are {col.type}")]) from None
            both = pa.chunked_array([*col.chunks, *side_keys[side].chunks], col.type)
        vocabs[f"{side}_id"] = vocabulary(both)[0]
    return vocabs, side_keys


def _splits(spec: ImportSpec, req_ts: np.ndarray, counts: dict[str, Any]) -> np.ndarray:
    """Each request's split: by time (the last ``test`` share of requests test, the ``valid``
    share before it validation; the cut times go to ``counts``) or drawn with ``seed``."""
    if spec.split == "time":
        cut_valid, cut_test = np.quantile(req_ts, [1 - spec.valid - spec.test, 1 - spec.test])
        counts["valid_from_ts"], counts["test_from_ts"] = int(cut_valid), int(cut_test)
        return np.where(req_ts >= cut_test, "test", np.where(req_ts >= cut_valid, "valid", "train"))
    u = np.random.default_rng(spec.seed).random(len(req_ts))
    return np.where(u < spec.test, "test", np.where(u < spec.test + spec.valid, "valid", "train"))


def import_logs(spec: ImportSpec) -> tuple[Dataset, dict[str, Any], dict[str, bytes]]:
    """Read and convert; returns (dataset, the import's record for ``import.json``, the extra
    files: ``import.json`` and ``vocab/*.parquet``). Raises DataError naming file, column, row."""
    events = read_table(spec.events, "events")
    ev_file = Path(spec.events).name
    users = read_table(spec.users, "users") if spec.users else None
    items = read_table(spec.items, "items") if spec.items else None
    counts: dict[str, Any] = {"events_read": events.num_rows}
    user_col, item_col, ts, label, stage, request_key = _event_columns(events, spec, ev_file)
    vocabs, side_keys = _id_vocabularies(spec, user_col, item_col, users, items)
    user = _keys(user_col, vocabs["user_id"])
    item = _keys(item_col, vocabs["item_id"])

    dropped = {
        "no user": user == 0,
        "no item": item == 0,
        "no time": ts < 0,
        "no label": np.isnan(label),
        "no stage": stage < 0,
    }
    if request_key is not None:
        dropped["no request"] = request_key.is_null().to_numpy(zero_copy_only=False)
    bad = np.zeros(events.num_rows, dtype=bool)
    for reason, mask in dropped.items():
        if mask.any():
            counts[f"set_aside_{reason.replace(' ', '_')}"] = int(mask.sum())
        bad |= mask
    keep = np.flatnonzero(~bad)
    if not len(keep):
        raise DataError([Problem(ev_file, None, None, None, f"no usable row: every one of {events.num_rows:,} lacks a user, item, time or label")])
    user, item, ts, label, stage = user[keep], item[keep], ts[keep], label[keep].astype(np.float32), stage[keep]

    # requests
    if request_key is not None:
        group = vocabulary(request_key.take(pa.array(keep)))[1]
    else:
        group = user * (int(ts.max()) // spec.request_window + 1) + ts // spec.request_window
    order = np.lexsort((-label, ts, group))  # within a request: time order, positives first on ties
    user, item, ts, label, stage, group = (a[order] for a in (user, item, ts, label, stage, group))
    first_of_group = np.r_[True, group[1:] != group[:-1]]
    request_index = np.cumsum(first_of_group) - 1
    R = int(request_index[-1]) + 1
    req_user = user[first_of_group]
    if request_key is not None:
        mixed = np.zeros(R, dtype=bool)
        np.logical_or.at(mixed, request_index, user != req_user[request_index])
        if mixed.any():
            r = int(np.flatnonzero(mixed)[0])
            raise DataError([Problem(ev_file, spec.request, None, None, f"request {r + 1} (in time order) holds events of more than one user; {int(mixed.sum()):,} requests in all")])
    req_ts = ts[first_of_group]
    # an item twice in one request: the highest label stays (sorted positives first per time;
    # resort by (request, item, -label) to find duplicates)
    pair_order = np.lexsort((-label, item, request_index))
    dup = np.zeros(len(item), dtype=bool)
    dup[pair_order[1:]] = (request_index[pair_order][1:] == request_index[pair_order][:-1]) & (item[pair_order][1:] == item[pair_order][:-1])
    if dup.any():
        counts["repeated_item_in_request_merged"] = int(dup.sum())
        user, item, ts, label, stage, request_index = (a[~dup] for a in (user, item, ts, label, stage, request_index))

    split = _splits(spec, req_ts, counts)
    # history: the user's positives strictly before the request, oldest first
    pos = np.flatnonzero(label == 1)
    pos = pos[np.lexsort((item[pos], ts[pos], user[pos]))]
    history, history_ts, history_len = last_before(user[pos], ts[pos], item[pos], req_user, req_ts, spec.history_max)

    n_users, n_items = len(vocabs["user_id"]), len(vocabs["item_id"])
    user_table: dict[str, np.ndarray] = {"user_id": np.arange(1, n_users + 1)}
    item_table: dict[str, np.ndarray] = {"item_id": np.arange(1, n_items + 1)}
    notes: dict[str, Any] = {}
    feature_fields = [Field("user_id", "user", n_users), Field("item_id", "item", n_items)]
    for side, table, file, spec_fields, target in (("user", users, spec.users, spec.user_fields, user_table), ("item", items, spec.items, spec.item_fields, item_table)):
        if table is None and not (spec_fields.categorical or spec_fields.multi or spec_fields.numeric):
            continue
        name = Path(file).name if file else f"{side}s"
        key_ids = _keys(side_keys[side], vocabs[f"{side}_id"]) if table is not None else np.zeros(0, np.int64)
        if table is not None:
            original = side_keys[side].to_numpy(zero_copy_only=False)
            _refuse_rows(name, spec.user if side == "user" else spec.item, duplicate_rows(key_ids) & (key_ids > 0), original, f"{side} listed twice")
        cols, side_fields, side_notes, side_vocabs = _side(spec_fields, table, name, key_ids, len(target[f"{side}_id"]), side)
        target.update(cols)
        feature_fields += side_fields
        notes.update(side_notes)
        vocabs.update(side_vocabs)

    requests = {
        "request_id": np.arange(1, R + 1),
        "user_id": req_user,
        "ts": req_ts,
        "split": split,
        "history": history,
        "history_ts": history_ts,
        "history_len": history_len,
    }
    candidates = {"request_id": request_index + 1, "item_id": item, "stage": stage.astype(np.int8), "label": label}
    counts.update(
        events_used=int(len(item)),
        users=n_users,
        items=n_items,
        requests={s: int((split == s).sum()) for s in ("train", "valid", "test")},
        positives=int(label.sum()),
    )
    record = {"spec": asdict(spec), "counts": counts, "numeric": notes}
    schema = Schema(
        name=spec.name,
        features=FeatureSpec(tuple(feature_fields)),
        temporal=spec.split == "time",
        history_max=spec.history_max,
        protocol={"importer": {k: v for k, v in asdict(spec).items() if k not in ("events", "users", "items")}, "counts": counts},
    )
    ds = Dataset(schema, user_table, item_table, requests, candidates)
    extra = {"import.json": (json.dumps(record, indent=2, sort_keys=True, default=str) + "\n").encode()}
    for name, vocab in vocabs.items():
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": pa.array(np.arange(1, len(vocab) + 1)), "value": vocab}), sink)
        extra[f"vocab/{name}.parquet"] = sink.getvalue().to_pybytes()
    return ds, record, extra


def import_to(spec: ImportSpec, out: str | Path) -> tuple[Dataset, dict[str, Any]]:
    """``import_logs`` then ``write_dataset`` (checked; whole or nothing) into ``out``."""
    check_output_dir(out)
    ds, record, extra = import_logs(spec)
    write_dataset(ds, out, extra)
    return ds, record


def read_vocabulary(directory: str | Path, name: str) -> pa.Table:
    """The saved vocabulary of field ``name``: columns id (1..V) and value (the original)."""
    return pq.read_table(Path(directory) / "vocab" / f"{name}.parquet")
