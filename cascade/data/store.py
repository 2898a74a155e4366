"""Read, validate and write a cascade log directory.

In memory every table is a dict of numpy arrays (one row per entry):

* ``users``: ``user_id (U,)`` + user fields, ``(U,)`` or ``(U, max_len)`` for multi-valued ones;
* ``items``: ``item_id (I,)`` + item fields;
* ``requests``: ``request_id, user_id, ts (R,)``, ``split (R,)`` str, ``history`` and
  ``history_ts (R, history_max)`` padded with 0 after the last entry, ``history_len (R,)``;
* ``candidates``: ``request_id, item_id (C,)``, ``stage (C,) int8``, ``label (C,) float32``,
  plus any field whose ``table`` is ``candidates``.

Reading validates; nothing is returned, and ``write_dataset`` writes nothing, when a problem is
found. Every problem names its file, column, first offending row (0-based) and value.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cascade.data.schema import EXPOSED, SCHEMA_FILE, SPLITS, STAGES, TABLE_FILES, Schema
from cascade.distributed import is_writer

Table = dict[str, np.ndarray]


@dataclass(frozen=True)
class Problem:
    file: str
    column: str | None
    row: int | None
    value: object
    message: str
    count: int = 1

    def __str__(self) -> str:
        where = self.file
        if self.column is not None:
            where += f": column '{self.column}'"
        if self.row is not None:
            where += f", row {self.row}"
        text = f"{where}: {self.message}"
        if self.row is not None:
            text += f" (value {_plain(self.value)!r})"
        if self.count > 1:
            text += f"; {self.count:,} rows in all"
        return text


class DataError(Exception):
    """Bad input: one or more problems, each naming file, column, row and value."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass
class Dataset:
    schema: Schema
    users: Table
    items: Table
    requests: Table
    candidates: Table
    # a streamed read (``read_dataset(candidates=False)``): ``requests`` holds only REQUEST_INDEX,
    # in the file's row order, and every field of a request comes from here on demand
    requests_file: "RequestFile | None" = None

    def table(self, name: str) -> Table:
        return {"users": self.users, "items": self.items, "requests": self.requests, "candidates": self.candidates}[name]

    def request_rows(self, rows: np.ndarray) -> Table:
        """Every field of the requests at ``rows`` of ``requests``, in that order."""
        if self.requests_file is None:
            return {k: v[rows] for k, v in self.requests.items()}
        return self.requests_file.rows(rows)


# --------------------------------------------------------------------------------------------
# column layout of each table


def table_columns(schema: Schema) -> dict[str, dict[str, str]]:
    """table -> column -> kind: int, float, str, list (list of ints)."""
    cols: dict[str, dict[str, str]] = {
        "users": {"user_id": "int"},
        "items": {"item_id": "int"},
        "requests": {"request_id": "int", "user_id": "int", "ts": "int", "split": "str", "history": "list", "history_ts": "list"},
        "candidates": {"request_id": "int", "item_id": "int", "stage": "int", "label": "float"},
    }
    for f in schema.features.fields:
        cols[f.source].setdefault(f.name, "list" if f.multi else "int")
    return cols


def _kind_ok(kind: str, typ: pa.DataType) -> bool:
    if pa.types.is_dictionary(typ):  # pandas writes categorical columns so
        typ = typ.value_type
    if kind == "int":
        return pa.types.is_integer(typ)
    if kind == "float":
        return pa.types.is_floating(typ) or pa.types.is_integer(typ)
    if kind == "str":
        return pa.types.is_string(typ) or pa.types.is_large_string(typ)
    return (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_integer(typ.value_type)


def _padded(col: pa.ChunkedArray | pa.Array, width: int, block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """list<int> column -> (rows, width) int64 padded with 0 after the values, and lengths.
    Filled ``block`` rows at a time, so the temporaries stay small whatever the table's size."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    lengths = np.concatenate([pc.list_value_length(c).to_numpy(zero_copy_only=False) for c in chunks] or [np.zeros(0)]).astype(np.int64)
    out = np.zeros((len(lengths), max(width, int(lengths.max(initial=0)))), dtype=np.int64)
    row = 0
    for chunk in chunks:
        for start in range(0, len(chunk), block):
            part = chunk.slice(start, block)
            n = lengths[row : row + len(part)]
            values = part.flatten().to_numpy(zero_copy_only=False)  # a slice's values only
            pos = np.arange(len(values)) - np.repeat(np.cumsum(n) - n, n)
            out[row + np.repeat(np.arange(len(n)), n), pos] = values
            row += len(part)
    return out, lengths


def _rows_with_null_elements(arr: pa.ListArray) -> np.ndarray:
    lengths = np.diff(arr.offsets.to_numpy().astype(np.int64))
    null = arr.flatten().is_null().to_numpy(zero_copy_only=False)
    return np.unique(np.repeat(np.arange(len(lengths)), lengths)[null])


INT64_MAX = np.iinfo(np.int64).max
CANDIDATE_ROW_GROUP = 1 << 17  # rows per row group of candidates.parquet (at most, unless one request is longer): the unit a stream reads
REQUEST_ROW_GROUP = 1 << 14  # at most, in requests.parquet (a row holds its histories, ~800 bytes): small decode buffers


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def size_problems(schema: Schema, root: Path) -> list[Problem]:
    """Sizes in schema.json whose tables could not fit in this machine's memory: the padded
    history (two int64 per slot and request), a multi-valued field's padded rows, and a
    vocabulary's embedding table at one float per id (the least any model allocates)."""
    limit = memory_bytes()
    problems = []

    def num_rows(table: str) -> int:
        try:
            return pq.read_metadata(root / TABLE_FILES[table]).num_rows
        except (OSError, pa.ArrowInvalid):
            return 0  # reported as unreadable later

    rows = {table: num_rows(table) for table in TABLE_FILES}  # one footer read per file
    need = rows["requests"] * schema.history_max * 16
    if need > limit:
        problems.append(Problem(SCHEMA_FILE, "history_max", None, schema.history_max, f"history_max {schema.history_max:,} needs {_gib(need)} for the padded histories of {rows['requests']:,} requests; this machine has {_gib(limit)}"))
    for f in schema.features.fields:
        need = (f.vocab + 1) * 4
        if need > limit:
            problems.append(Problem(SCHEMA_FILE, f.name, None, f.vocab, f"vocab {f.vocab:,} needs at least {_gib(need)} for one embedding table (4 bytes per id and dimension); this machine has {_gib(limit)}"))
        need = rows[f.source] * f.max_len * 8
        if f.multi and need > limit:
            problems.append(Problem(SCHEMA_FILE, f.name, None, f.max_len, f"max_len {f.max_len:,} needs {_gib(need)} for {rows[f.source]:,} padded rows; this machine has {_gib(limit)}"))
    return problems


# --------------------------------------------------------------------------------------------
# reading


def read_dataset(directory: str | os.PathLike, candidates: bool = True) -> Dataset:
    """Load and validate a log directory; raises DataError listing every problem found.
    ``candidates=False`` is a run that streams its logs (``cascade.data.stream``): the candidates
    table is left empty (its columns, no rows), to be converted and validated batch by batch; the
    requests are validated in one pass, ``READ_BATCH`` at a time, keeping ``REQUEST_INDEX`` of
    each, and ``Dataset.request_rows`` reads the rest a row group at a time (``RequestFile``)."""
    root = Path(directory)
    if not root.is_dir():
        raise DataError([Problem(str(root), None, None, None, "is not a directory")])
    try:
        schema = Schema.read(root)
    except FileNotFoundError:
        raise DataError([Problem(SCHEMA_FILE, None, None, None, "file is missing")]) from None
    except ValueError as e:
        raise DataError([Problem(SCHEMA_FILE, None, None, None, f"invalid: {e}")]) from None

    problems = size_problems(schema, root)
    if problems:
        raise DataError(problems)
    tables: dict[str, Table] = {}
    for name, kinds in table_columns(schema).items():
        file = TABLE_FILES[name]
        path = root / file
        if not path.exists():
            problems.append(Problem(file, None, None, None, "file is missing"))
            continue
        try:
            if candidates or name not in ("candidates", "requests"):
                tables[name] = read_table(path, kinds, schema, file, problems)
            elif name == "candidates":
                tables[name] = convert_table(pq.read_schema(path).empty_table(), kinds, schema, file, problems)
        except (pa.ArrowInvalid, OSError) as e:
            problems.append(Problem(file, None, None, None, f"is not a readable parquet file: {e}"))
    if problems:
        raise DataError(problems)
    if candidates:
        ds = Dataset(schema, tables["users"], tables["items"], tables["requests"], tables["candidates"])
        problems = validate(ds)
    else:
        ds = Dataset(schema, tables["users"], tables["items"], {}, tables["candidates"])
        c = ProblemLog()
        _check_users_items(c, ds)
        path = root / TABLE_FILES["requests"]
        try:
            index = _read_request_index(path, table_columns(schema)["requests"], ds, problems, c)
        except (pa.ArrowInvalid, OSError) as e:
            problems.append(Problem(TABLE_FILES["requests"], None, None, None, f"is not a readable parquet file: {e}"))
        if problems:
            raise DataError(problems)
        ds = replace(ds, requests=index, requests_file=RequestFile(path, schema))
        problems = c.problems
    if problems:
        raise DataError(problems)
    ds.candidates["stage"] = ds.candidates["stage"].astype(np.int8)
    for table in (ds.users, ds.items, ds.candidates, ds.requests):
        drop_lengths(table)
    pa.default_memory_pool().release_unused()  # Arrow keeps freed decode buffers for reuse: 0.08 GiB after the 10x world's requests
    return ds


REQUEST_INDEX = ("request_id", "user_id", "split", "ts", "history_len")  # what a streamed read keeps of every request


def _read_request_index(path: Path, kinds: dict[str, str], ds: Dataset, problems: list[Problem], c: ProblemLog) -> Table:
    """requests.parquet converted and checked ``READ_BATCH`` rows at a time against ``ds``'s users
    and items (conversion problems into ``problems``, value problems into ``c``, as
    ``validate_entities`` finds them); returns REQUEST_INDEX of every request, in file order."""
    file = TABLE_FILES["requests"]
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    for col in kinds:
        if col not in names:
            problems.append(Problem(file, col, None, None, "column is missing"))
    if problems:
        return {}
    step, start, unit = _unit_step(pf.metadata.num_rows), 0, []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in REQUEST_INDEX}
    for batch in pf.iter_batches(batch_size=READ_BATCH, columns=list(kinds)):
        found: list[Problem] = []
        block = convert_table(batch, kinds, ds.schema, file, found)
        for p in found:
            add_problem(problems, replace(p, row=None if p.row is None else p.row + start))
        if not found:
            _check_request_rows(c, ds, block, start)
            unit.append(_unit_sample(block, start, step))
            for k in REQUEST_INDEX:
                parts[k].append(block[k])
        start += batch.num_rows
    if problems:
        return {}
    if start == 0:
        empty = _empty_table(pf, kinds, ds.schema, file, problems)
        return {k: empty[k] for k in REQUEST_INDEX}
    index = {k: np.concatenate(v) for k, v in parts.items()}
    _check_request_index(c, ds, index, np.concatenate(unit))
    return index


class RequestFile:
    """requests.parquet read a row group at a time (validated whole when its directory was read):
    every field of any requests by row, the last ``KEEP`` row groups kept converted. A stream reads
    the requests of a candidates row group this way; write_dataset's row groups of 16,384 requests
    keep each read small (a file written elsewhere costs one of its own row groups a read)."""

    KEEP = 2

    def __init__(self, path: Path, schema: Schema):
        self.path, self.schema = Path(path), schema
        self.kinds = table_columns(schema)["requests"]
        self._file = pq.ParquetFile(self.path)
        meta = self._file.metadata
        self.starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._groups: dict[int, Table] = {}  # insertion order: oldest first
        self._lock = threading.Lock()  # a stream reads in a prefetch thread

    def rows(self, rows: np.ndarray) -> Table:
        """Every field of the requests at file rows ``rows``, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        group = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(group, kind="stable")
        with self._lock:
            parts = [self._group(int(g)) for g in np.unique(group)] or [self._empty()]
            picks = [rows[order][group[order] == g] - self.starts[g] for g in np.unique(group)] or [np.zeros(0, np.int64)]
            cat = {k: np.concatenate([t[k][i] for t, i in zip(parts, picks)]) for k in parts[0]}
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {k: v[inverse] for k, v in cat.items()}

    def _group(self, g: int) -> Table:
        if g not in self._groups:
            problems: list[Problem] = []
            table = convert_table(self._file.read_row_group(g, columns=list(self.kinds), use_threads=False), self.kinds, self.schema, TABLE_FILES["requests"], problems)
            if problems:  # validated when read: the file changed since
                raise DataError([replace(p, row=None if p.row is None else int(self.starts[g]) + p.row) for p in problems])
            drop_lengths(table)
            if len(self._groups) >= self.KEEP:
                del self._groups[next(iter(self._groups))]
            self._groups[g] = table
        return self._groups[g]

    def _empty(self) -> Table:
        table = _empty_table(self._file, self.kinds, self.schema, TABLE_FILES["requests"], [])
        drop_lengths(table)
        return table


def drop_lengths(table: Table) -> None:
    """Remove the ``NAME_len`` arrays validation needed (history_len stays: models use it)."""
    for key in [k for k in table if k.endswith("_len") and k != "history_len"]:
        del table[key]


READ_BATCH = 1 << 14  # rows converted at a time: Parquet's decode buffers stay small


def read_table(path: Path, kinds: dict[str, str], schema: Schema, file: str, problems: list[Problem]) -> Table:
    """``convert_table`` of one parquet file, ``READ_BATCH`` rows at a time into arrays allocated
    once (reading the whole table first held Arrow's copy and its decode buffers too: 3x the
    arrays at the peak). A problem found in several batches is one entry, its rows counted."""
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    for col in kinds:
        if col not in names:
            problems.append(Problem(file, col, None, None, "column is missing"))
    kinds = {c: k for c, k in kinds.items() if c in names}
    out: Table = {}
    strings: dict[str, list[np.ndarray]] = {}
    start = 0
    for batch in pf.iter_batches(batch_size=READ_BATCH, columns=list(kinds)):
        found: list[Problem] = []
        part = convert_table(batch, kinds, schema, file, found)
        for p in found:
            add_problem(problems, replace(p, row=None if p.row is None else p.row + start))
        for col, values in part.items():
            if values.dtype.kind == "U":  # a string's width is known only at the end
                strings.setdefault(col, []).append(values)
                continue
            if col not in out:
                out[col] = np.zeros((pf.metadata.num_rows,) + values.shape[1:], dtype=values.dtype)
            elif values.ndim == 2 and values.shape[1] > out[col].shape[1]:  # a list beyond its max_len (validate says so)
                out[col] = np.pad(out[col], ((0, 0), (0, values.shape[1] - out[col].shape[1])))
            if values.ndim == 2:
                out[col][start : start + len(values), : values.shape[1]] = values
            else:
                out[col][start : start + len(values)] = values
        start += batch.num_rows
    if start == 0:
        return _empty_table(pf, kinds, schema, file, problems)
    out.update({col: np.concatenate(parts) for col, parts in strings.items()})
    return out


def _empty_table(pf: pq.ParquetFile, kinds: dict[str, str], schema: Schema, file: str, problems: list[Problem]) -> Table:
    """The columns ``kinds`` names of a parquet file, with no rows."""
    return convert_table(pf.schema_arrow.empty_table().select(list(kinds)), kinds, schema, file, problems)


def convert_table(raw: pa.Table | pa.RecordBatch, kinds: dict[str, str], schema: Schema, file: str, problems: list[Problem]) -> Table:
    """The columns ``kinds`` names of one parquet table (or a batch of its rows) as numpy arrays;
    type problems are appended to ``problems`` (rows counted from the start of ``raw``)."""
    table: Table = {}
    for col, kind in kinds.items():
        if col not in raw.column_names:
            problems.append(Problem(file, col, None, None, "column is missing"))
            continue
        data = raw.column(col)
        if pa.types.is_dictionary(data.type):
            data = data.cast(data.type.value_type)
        if not _kind_ok(kind, data.type):
            problems.append(Problem(file, col, None, None, f"has type {data.type}, expected {kind}{'<int>' if kind == 'list' else ''}"))
            continue
        if data.null_count:
            row = int(np.flatnonzero(data.is_null().to_numpy(zero_copy_only=False))[0])
            problems.append(Problem(file, col, row, None, "is null", data.null_count))
            continue
        if kind == "list":
            data = pa.chunked_array([data]) if isinstance(data, pa.Array) else data
            null_rows = _rows_with_null_elements(data.combine_chunks()) if any(c.flatten().null_count for c in data.chunks) else []
            if len(null_rows):
                problems.append(Problem(file, col, int(null_rows[0]), None, "list holds a null", len(null_rows)))
                continue
            width = schema.history_max if col.startswith("history") else schema.features[col].max_len
            table[col], table[col + "_len"] = _padded(data, width)  # lengths checked by validate
        elif kind == "str":
            table[col] = np.asarray(data.to_numpy(zero_copy_only=False), dtype=str)
        elif kind == "float":
            table[col] = data.to_numpy().astype(np.float32)
        else:
            values = data.to_numpy()
            if values.dtype == np.uint64 and len(values) and values.max() > INT64_MAX:
                row = int(np.argmax(values > INT64_MAX))
                problems.append(Problem(file, col, row, int(values[row]), f"id beyond the largest 64-bit signed integer ({INT64_MAX})", int((values > INT64_MAX).sum())))
                continue
            table[col] = values.astype(np.int64)  # stage narrows to int8 once validated
    return table


# --------------------------------------------------------------------------------------------
# validation of values


class ProblemLog:
    """Collects problems; ``flag`` records one per (file, column, message) with its first row."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def flag(self, file: str, column: str, bad: np.ndarray, values: np.ndarray, message: str, offset: int = 0) -> None:
        """One problem for all rows where ``bad`` holds (rows are axis 0 of ``bad``, numbered
        from ``offset``: a table checked a block of rows at a time adds to its first block's
        problem, whose row stays the first)."""
        bad = np.asarray(bad)
        rows = bad.reshape(len(bad), -1).any(axis=1) if bad.ndim > 1 else bad
        n = int(rows.sum())
        if n:
            row = int(np.flatnonzero(rows)[0])
            value = values[row]
            if bad.ndim > 1:  # show the offending element of a list
                value = values[row][np.asarray(bad[row]).nonzero()[0][0]]
            add_problem(self.problems, Problem(file, column, offset + row, _plain(value), message, n))


def add_problem(problems: list[Problem], problem: Problem) -> None:
    """Append ``problem``, or add its rows to the one already there for the same file, column and
    message (a table read or checked a block of rows at a time: the first block's row stays; a
    problem of no row, e.g. a column's type, is not counted again)."""
    for i, seen in enumerate(problems):
        if (seen.file, seen.column, seen.message) == (problem.file, problem.column, problem.message):
            if problem.row is not None:
                problems[i] = replace(seen, count=seen.count + problem.count)
            return
    problems.append(problem)


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def duplicate_rows(keys: np.ndarray) -> np.ndarray:
    """Mask of rows whose key already appeared in an earlier row. keys (n,) or (n, k)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=bool)
    if keys.ndim == 2 and keys.shape[1] == 2 and keys.min() >= 0:
        a, b = keys[:, 0].astype(np.int64), keys[:, 1].astype(np.int64)
        width = int(b.max()) + 1
        if int(a.max()) < INT64_MAX // width:  # one int64 per pair: a 1-d sort, not a sort of rows
            keys = a * width + b
    _, first = np.unique(keys, axis=0 if keys.ndim > 1 else None, return_index=True)
    dup = np.ones(len(keys), dtype=bool)
    dup[first] = False
    return dup


def _present(ids: np.ndarray, known: np.ndarray) -> np.ndarray:
    return np.isin(ids, known)


def validate(ds: Dataset) -> list[Problem]:
    """Every value problem in a dataset whose columns exist with the right types."""
    problems = validate_entities(ds) + validate_candidates(ds)
    c = ProblemLog()
    req = ds.requests
    c.flag(TABLE_FILES["requests"], "request_id", ~_present(req["request_id"], ds.candidates["request_id"]), req["request_id"], "request has no candidates")
    return problems + c.problems


def validate_entities(ds: Dataset) -> list[Problem]:
    """The problems of the users, items and requests tables (the candidates not read)."""
    c = ProblemLog()
    _check_users_items(c, ds)
    req = ds.requests
    step, unit = _unit_step(len(req["request_id"])), []
    for start in range(0, len(req["request_id"]), HISTORY_CHECK_ROWS):
        block = {name: values[start : start + HISTORY_CHECK_ROWS] for name, values in req.items()}
        _check_request_rows(c, ds, block, start)
        unit.append(_unit_sample(block, start, step))
    _check_request_index(c, ds, req, np.concatenate(unit) if unit else np.zeros(0, np.int64))
    return c.problems


def _check_users_items(c: ProblemLog, ds: Dataset) -> None:
    for table_name, key in (("users", "user_id"), ("items", "item_id")):
        _check_ids(c, ds, table_name, key)
        table, file = ds.table(table_name), TABLE_FILES[table_name]
        c.flag(file, key, duplicate_rows(table[key]), table[key], f"duplicate {key}")


def _check_request_rows(c: ProblemLog, ds: Dataset, req: Table, offset: int) -> None:
    """The checks of a block of requests (rows ``offset`` on) that need no other request."""
    R = TABLE_FILES["requests"]
    c.flag(R, "user_id", ~_present(req["user_id"], ds.users["user_id"]), req["user_id"], "user not in users.parquet", offset)
    _check_histories(c, ds, req, offset)


def _check_request_index(c: ProblemLog, ds: Dataset, req: Table, unit_sample: np.ndarray) -> None:
    """The checks across requests, on REQUEST_INDEX alone; ``unit_sample``: ``_unit_sample``'s
    history times of every block."""
    R = TABLE_FILES["requests"]
    c.flag(R, "request_id", duplicate_rows(req["request_id"]), req["request_id"], "duplicate request_id")
    c.flag(R, "split", ~np.isin(req["split"], SPLITS), req["split"], f"split is not one of {list(SPLITS)}")
    if ds.schema.temporal:
        for earlier, later in zip(SPLITS, SPLITS[1:]):
            before = req["ts"][req["split"] == earlier]
            if len(before):
                c.flag(R, "ts", (req["split"] == later) & (req["ts"] < before.max()), req["ts"], f"a '{later}' request before the last '{earlier}' one (ts {before.max()}): temporal splits follow time")
    unit = _unit_gap(req["ts"], unit_sample)
    if unit:
        c.problems.append(Problem(R, "history_ts", None, None, unit))
    for split in SPLITS:
        if not np.any(req["split"] == split):
            c.problems.append(Problem(R, "split", None, None, f"no '{split}' requests: training needs train and valid, evaluation test"))


def _unit_step(requests: int) -> int:
    """The unit check compares magnitudes (100x apart): every step-th request, at most about a block's, does."""
    return max(1, -(-requests // HISTORY_CHECK_ROWS))


def _unit_sample(req: Table, offset: int, step: int) -> np.ndarray:
    """The history times of a block's requests (rows ``offset`` on) whose row is a multiple of
    ``step`` (lengths agreeing, within the history's length)."""
    hts, w = req["history_ts"], min(req["history"].shape[1], req["history_ts"].shape[1])
    rows = np.arange((-offset) % step, len(hts), step)
    hlen = req["history_len"][rows]
    same_len = req.get("history_ts_len", req["history_len"])[rows] == hlen
    valid_pos = (np.arange(w) < hlen[:, None]) & same_len[:, None]
    return hts[rows, :w][valid_pos]


HISTORY_CHECK_ROWS = 16_384  # requests whose (rows, history_max) checks run at once: bounded temporaries


def _check_histories(c: ProblemLog, ds: Dataset, req: Table, offset: int) -> None:
    """The history checks of a block of requests (rows ``offset`` on)."""
    R = TABLE_FILES["requests"]
    hist, hts, hlen = req["history"], req["history_ts"], req["history_len"]
    hts_len = req.get("history_ts_len", hlen)  # only a file read from disk can disagree
    valid_pos = np.arange(hist.shape[1]) < hlen[:, None]
    c.flag(R, "history", hlen > ds.schema.history_max, hlen, f"history longer than history_max {ds.schema.history_max}", offset)
    c.flag(R, "history_ts", hts_len != hlen, hts_len, "history_ts length differs from history length", offset)
    c.flag(R, "history", valid_pos & (hist <= 0), hist, "history item id is not positive", offset)
    c.flag(R, "history", valid_pos & (hist > 0) & ~_present(hist, ds.items["item_id"]), hist, "history item not in items.parquet", offset)
    w = min(hist.shape[1], hts.shape[1])
    same_len = (hts_len == hlen)[:, None]
    backwards = valid_pos[:, 1:w] & same_len & (hts[:, 1:w] < hts[:, : w - 1])
    c.flag(R, "history_ts", np.pad(backwards, ((0, 0), (1, 0))), hts, "history is not oldest-first (history_ts falls)", offset)
    if ds.schema.temporal:
        leak = valid_pos[:, :w] & same_len & (hts[:, :w] >= req["ts"][:, None])
        c.flag(R, "history_ts", leak, hts, "history event at or after the request's ts (leakage)", offset)


def validate_candidates(ds: Dataset) -> list[Problem]:
    """The problems of ``ds.candidates`` (all of them, or a streamed batch's) against the other
    tables; rows count from the start of ``ds.candidates``."""
    c = ProblemLog()
    C = TABLE_FILES["candidates"]
    _check_ids(c, ds, "candidates", None)
    req, cand = ds.requests, ds.candidates
    c.flag(C, "request_id", ~_present(cand["request_id"], req["request_id"]), cand["request_id"], "request not in requests.parquet")
    c.flag(C, "item_id", cand["item_id"] <= 0, cand["item_id"], "item id is not positive (0 is padding)")
    c.flag(C, "item_id", (cand["item_id"] > 0) & ~_present(cand["item_id"], ds.items["item_id"]), cand["item_id"], "item not in items.parquet")
    pair = np.stack([cand["request_id"], cand["item_id"]], axis=1)
    c.flag(C, "item_id", duplicate_rows(pair), cand["item_id"], "item listed twice for the same request")
    c.flag(C, "stage", ~np.isin(cand["stage"], list(STAGES)), cand["stage"], f"stage is not one of {sorted(STAGES)}")
    c.flag(C, "label", ~np.isfinite(cand["label"]), cand["label"], "label is not finite")
    c.flag(C, "label", np.isfinite(cand["label"]) & (cand["label"] != 0) & (cand["label"] != 1), cand["label"], "label is not 0 or 1")
    return c.problems


def _check_ids(c: ProblemLog, ds: Dataset, table_name: str, key: str | None) -> None:
    """Ids of the fields stored in ``table_name``: known, not negative, a key never 0."""
    table, file = ds.table(table_name), TABLE_FILES[table_name]
    for f in ds.schema.features.in_table(table_name):
        v = table[f.name]
        low = 1 if f.name == key else 0  # a key needs a real id; 0 is "unknown" elsewhere
        c.flag(file, f.name, v < 0, v, "negative id")
        c.flag(file, f.name, (v >= 0) & (v < low), v, f"id 0 is padding, not a valid {f.name}")
        c.flag(file, f.name, v > f.vocab, v, f"id beyond the vocabulary of {f.vocab} in schema.json")
        if f.multi:
            lengths = table.get(f.name + "_len")
            if lengths is not None:
                c.flag(file, f.name, lengths > f.max_len, lengths, f"list longer than max_len {f.max_len}")


def _unit_gap(ts: np.ndarray, history_ts: np.ndarray) -> str | None:
    """A message when request times and history times look like different units (seconds
    against milliseconds: typical magnitudes 100x or more apart)."""
    ts, history_ts = ts[ts > 0], history_ts[history_ts > 0]
    if not len(ts) or not len(history_ts):
        return None
    a, b = float(np.median(ts)), float(np.median(history_ts))
    if max(a, b) / min(a, b) < 100:
        return None
    return f"history_ts (median {b:.0f}) and requests' ts (median {a:.0f}) differ {max(a, b) / min(a, b):,.0f}x: one time unit for both (e.g. seconds)"


def warnings(ds: Dataset) -> list[str]:
    """What is valid but worth knowing before training on it."""
    out = []
    cand = ds.candidates
    order = np.argsort(cand["request_id"], kind="stable")
    rid, label = cand["request_id"][order], cand["label"][order]
    starts = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]])
    positives = np.add.reduceat(label, starts) if len(starts) else np.zeros(0)
    sizes = np.diff(np.r_[starts, len(rid)])
    single = int(((positives == 0) | (positives == sizes)).sum())
    if single:
        out.append(f"{single:,} of {len(starts):,} requests have one class only (all positive or all negative): they add nothing to GAUC or to a list's ranking loss")
    if len(cand["stage"]) and np.all(cand["stage"] == EXPOSED):
        out.append("every candidate is exposed (stage 3): the logs hold no unexposed items, so the recall-space losses only see what recall retrieves")
    return out


# --------------------------------------------------------------------------------------------
# writing


def _list_column(padded: np.ndarray, lengths: np.ndarray) -> pa.Array:
    keep = np.arange(padded.shape[1]) < lengths[:, None]
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(padded[keep].astype(np.int64)))


def to_arrow(ds: Dataset, name: str) -> pa.Table:
    table = ds.table(name)
    out: dict[str, pa.Array] = {}
    for col, kind in table_columns(ds.schema)[name].items():
        v = table[col]
        if kind == "list":
            lengths = table["history_len"] if col.startswith("history") else np.full(len(v), v.shape[1])
            out[col] = _list_column(v, lengths)
        elif kind == "str":
            out[col] = pa.array(v.astype(str), pa.string())
        elif kind == "float":
            out[col] = pa.array(v.astype(np.float32))
        else:
            out[col] = pa.array(v.astype(np.int8 if col == "stage" else np.int64))
    return pa.table(out)


def request_cuts(request_id: np.ndarray, size: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of about ``size`` rows (at most, unless one request is longer)
    that never cut a request in two; ``request_id`` (n,) sorted."""
    starts = np.flatnonzero(np.r_[True, request_id[1:] != request_id[:-1]]) if len(request_id) else np.zeros(0, np.int64)
    n, cuts, a = len(request_id), [], 0
    while a < n:
        if a + size >= n:
            b = n
        else:
            i = np.searchsorted(starts, a + size, side="right") - 1  # the last request starting within size
            b = int(starts[i]) if starts[i] > a else int(starts[i + 1]) if i + 1 < len(starts) else n  # else one request longer than size
        cuts.append((a, b))
        a = b
    return cuts


def _by_request(table: pa.Table, rid: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """``table`` and its request ids ``rid`` sorted by request id (rows of a request keep their order)."""
    if np.any(rid[1:] < rid[:-1]):
        order = np.argsort(rid, kind="stable")
        table, rid = table.take(pa.array(order)), rid[order]
    return table, rid


def _write_candidates(ds: Dataset, path: Path) -> np.ndarray:
    """candidates.parquet sorted by request (each request's rows keep their order) in row groups
    of whole requests, so a stream can read its lists a row group at a time (cascade.data.stream).
    Returns the first request id of each row group."""
    table, rid = _by_request(to_arrow(ds, "candidates"), ds.candidates["request_id"])
    cuts = request_cuts(rid, CANDIDATE_ROW_GROUP)
    with pq.ParquetWriter(path, table.schema, compression="zstd") as writer:
        for a, b in cuts:
            writer.write_table(table.slice(a, b - a), row_group_size=b - a)
    return np.array([rid[a] for a, _ in cuts], dtype=np.int64)


def _write_requests(ds: Dataset, path: Path, group_starts: np.ndarray) -> None:
    """requests.parquet sorted by request id, its row groups cut where the candidates' are (the
    request ids ``group_starts``) and at ``REQUEST_ROW_GROUP`` rows: a stream reads the requests
    of a candidates row group from one small row group of requests (``RequestFile``)."""
    table, rid = _by_request(to_arrow(ds, "requests"), ds.requests["request_id"])
    starts = np.unique(np.r_[0, np.searchsorted(rid, group_starts[1:])])
    bounds = sorted({int(x) for a, b in zip(starts, np.r_[starts[1:], len(rid)]) for x in range(a, b, REQUEST_ROW_GROUP)} | {len(rid)})
    with pq.ParquetWriter(path, table.schema, compression="zstd") as writer:
        for a, b in zip(bounds[:-1], bounds[1:]):
            writer.write_table(table.slice(a, b - a), row_group_size=b - a)


def check_output_dir(directory: str | os.PathLike) -> Path:
    """``directory`` if a log directory may be written there: new, empty, or an older log
    directory (replaced whole); anything else is refused before any work is done."""
    out = Path(directory)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SCHEMA_FILE).is_file())):
        raise DataError([Problem(str(out), None, None, None, "exists and is not a cascade log directory (no schema.json): choose an empty or new directory; nothing there was touched")])
    return out


def write_dataset(ds: Dataset, directory: str | os.PathLike, extra_files: dict[str, bytes] | None = None) -> Path:
    """Validate, then write the schema, the four tables and ``extra_files`` (name -> bytes).

    The directory appears whole or not at all: files go to a temporary sibling that is renamed
    into place, replacing an older directory of that name only once everything is written.
    """
    problems = validate(ds)
    if problems:
        raise DataError(problems)
    out = check_output_dir(directory)
    with replacing_directory(out) as tmp:
        (tmp / SCHEMA_FILE).write_text(ds.schema.to_json())
        group_starts = _write_candidates(ds, tmp / TABLE_FILES["candidates"])
        _write_requests(ds, tmp / TABLE_FILES["requests"], group_starts)
        for name in ("users", "items"):
            pq.write_table(to_arrow(ds, name), tmp / TABLE_FILES[name], compression="zstd")
        for file, data in (extra_files or {}).items():
            (tmp / file).parent.mkdir(parents=True, exist_ok=True)
            (tmp / file).write_bytes(data)
    return out


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file whole or not at all: ``write(f)`` fills a temporary sibling, which is flushed,
    fsynced and renamed over ``path``; on any error (or a kill) ``path`` keeps its old content and
    the temporary file is removed (or, after a kill, left as a dot-file beside it). In a
    data-parallel run only rank 0 writes (``cascade.distributed``): elsewhere this does nothing."""
    path = Path(path)
    if not is_writer():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``write_atomic`` of a UTF-8 text."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


@contextmanager
def replacing_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it is renamed to ``out`` (an older
    ``out`` is replaced only then), on any error it is removed: ``out`` appears whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            old.rmdir()
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
