"""Pointwise samples streamed from a log directory's ``candidates.parquet``, a row group at a time.

For logs whose candidates do not fit in memory. The users and items tables are read whole, the
requests table as an index (``store.REQUEST_INDEX``: id, user, split, time, history length), each
row group's requests read in full when it is (``store.RequestFile``); the candidates are read with
``pyarrow.dataset`` one row group at a time (``store.CANDIDATE_ROW_GROUP`` rows as ``write_dataset`` writes them), converted and
validated by the same code as ``read_dataset`` on their first read (so a bad value anywhere stops
the run, naming the file's row; later epochs let Arrow filter the stages wanted before converting),
cut to one split's requests and those stages, and turned into samples by the same code as in memory (``pointwise_lists`` on a
``Dataset`` holding that row group's candidates and their requests). So memory holds a few row
groups, whatever the size of the logs.

Each epoch reads the row groups in a seeded order and mixes the samples of ``buffer`` row groups
at a time (a shuffle buffer: samples far apart in the file meet in a batch only when their row
groups are read together). Under torchrun every rank reads its share of the row groups
(``shard``); ``steps`` tells each rank how many batches every rank can make, so that all take
the same number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from cascade.data.lists import ListBatch, build_lists, concat_lists, pointwise_lists
from cascade.data.schema import TABLE_FILES, Schema
from cascade.data.store import DataError, Dataset, Problem, convert_table, drop_lengths, memory_bytes, read_dataset, table_columns, validate_candidates

MEMORY_SHARE = 0.25  # the in-memory path may take this share of the machine's memory


def in_memory_bytes(directory: str | Path) -> int:
    """What the in-memory path holds per candidate of a log directory, from its schema and the
    file's footer: the table (ids, stage, label, per-candidate fields), the padded list cell of
    every item field that ``build_lists`` makes, and its index arrays (the lexsort's order and
    each candidate's list and position: 48 bytes). On the 10x world of benchmarks/data_stream.py
    this gives 4.6 GiB against 5.0 GiB measured above the baseline."""
    root = Path(directory)
    schema = Schema.read(root)
    rows = pq.read_metadata(root / TABLE_FILES["candidates"]).num_rows
    table_row = 8 * 2 + 1 + 4 + 8 * len(schema.features.in_table("candidates"))
    list_row = 8 * sum(f.max_len if f.multi else 1 for f in schema.features.in_table("items")) + 4 + 1 + 1
    return rows * (table_row + list_row + 48)


def fits_in_memory(directory: str | Path) -> bool:
    return in_memory_bytes(directory) <= MEMORY_SHARE * memory_bytes()


@dataclass
class SampleStream:
    """The samples (one candidate each, N = 1) of ``split`` whose stage is at least ``min_stage``."""

    root: Path
    ds: Dataset  # users, items and requests; no candidates
    split: str
    min_stage: int
    seed: int = 0  # history_drops_target's draw (MovieLens-1M ctr), per row group
    trusted: bool = False  # written by cascade itself (a joint cascade's spilled stage data): never validated

    @classmethod
    def open(cls, directory: str | Path, split: str, min_stage: int = 0, ds: Dataset | None = None) -> "SampleStream":
        """``ds``: the log directory read without candidates, when the caller has it already."""
        return cls(Path(directory), ds if ds is not None else read_dataset(directory, candidates=False), split, min_stage)

    def __post_init__(self) -> None:
        req = self.ds.requests
        self._order = np.argsort(req["request_id"], kind="stable")
        self._sorted_ids = req["request_id"][self._order]
        self._in_split = self._kept_requests()
        split_ids = pa.array(req["request_id"][self._in_split])
        self._filter = pc.field("request_id").isin(split_ids) & (pc.field("stage") >= self.min_stage)
        self._file = self.root / TABLE_FILES["candidates"]
        self._kinds = table_columns(self.ds.schema)["candidates"]
        self._groups = [g for f in pads.dataset(self._file, format="parquet").get_fragments() for g in f.split_by_row_group()]
        self._starts = np.cumsum([0] + [g.row_groups[0].num_rows for g in self._groups])  # each group's first row in the file
        self._counts: np.ndarray | None = None
        self._validated: set[int] = set(range(len(self._groups))) if self.trusted else set()  # row groups read and validated whole once

    def _kept_requests(self) -> np.ndarray:
        """(R,) bool: the requests table's rows this stream reads."""
        return self.ds.requests["split"] == self.split

    def counts(self) -> np.ndarray:
        """The samples in each row group (one pass over two columns, kept)."""
        if self._counts is None:
            self._counts = np.array([g.count_rows(filter=self._filter) for g in self._groups], dtype=np.int64)
        return self._counts

    def __len__(self) -> int:
        return int(self.counts().sum())

    def steps(self, batch_size: int, world: int = 1) -> int:
        """Batches of ``batch_size`` every one of ``world`` shards can make (the fewest), so
        every rank of a data-parallel run takes the same number of steps."""
        return min(int(self.counts()[r::world].sum()) // batch_size for r in range(world)) if world > 1 else -(-len(self) // batch_size)

    def groups(self, seed: int | None = None, shard: tuple[int, int] = (0, 1)) -> Iterator[ListBatch]:
        """The samples of each row group of this shard (rank, world), in a seeded order (file order
        without a seed)."""
        order = np.arange(len(self._groups)) if seed is None else np.random.default_rng(seed).permutation(len(self._groups))
        rank, world = shard
        for g in order[order % world == rank]:  # by group number, so each rank's share is the same every epoch
            yield self._samples(int(g))

    def _samples(self, g: int) -> ListBatch:
        """Row group ``g``'s samples of this stream."""
        return pointwise_lists(self._piece(g), self.split, seed=self.seed + g, min_stage=self.min_stage)

    def _piece(self, g: int) -> Dataset:
        """Row group ``g`` cut to this stream's requests and stages, with those requests. Its first
        read converts and validates it whole (every split's rows: a bad value anywhere stops the
        run); later reads let Arrow keep only the stages wanted (the exposures are 2.5% of a
        synthetic row group)."""
        if g in self._validated:
            raw = self._groups[g].to_table(columns=list(self._kinds), filter=pc.field("stage") >= self.min_stage, use_threads=False)
        else:
            raw = self._groups[g].to_table(columns=list(self._kinds), use_threads=False)  # torch has the cores
        problems: list[Problem] = []
        cand = convert_table(raw, self._kinds, self.ds.schema, TABLE_FILES["candidates"], problems)
        if not problems and g not in self._validated:
            problems = validate_candidates(replace(self.ds, candidates=cand))
        if problems:  # rows of the file, not of the row group
            raise DataError([replace(p, row=None if p.row is None else int(self._starts[g]) + p.row) for p in problems])
        self._validated.add(g)
        drop_lengths(cand)
        req_rows = self._order[np.searchsorted(self._sorted_ids, cand["request_id"])]
        keep = self._in_split[req_rows] & (cand["stage"] >= self.min_stage)
        cand = {k: v[keep] for k, v in cand.items()}
        cand["stage"] = cand["stage"].astype(np.int8)
        rows = np.unique(req_rows[keep])
        return replace(self.ds, requests=self.ds.request_rows(rows), candidates=cand, requests_file=None)

    def batches(self, batch_size: int, seed: int | None = None, shard: tuple[int, int] = (0, 1), buffer: int = 4) -> Iterator[ListBatch]:
        """Batches of ``batch_size`` samples: ``buffer`` row groups at a time, shuffled together
        with ``seed`` (in order without one). Under a shard, exactly ``steps(batch_size, world)``
        full batches; otherwise every sample, the last batch short."""
        for pool in self.pools(batch_size, seed, shard, buffer):
            for a in range(0, len(pool), batch_size):
                yield pool.take(slice(a, a + batch_size))

    def pools(self, batch_size: int, seed: int | None = None, shard: tuple[int, int] = (0, 1), buffer: int = 4) -> Iterator[ListBatch]:
        """The samples ``batches`` cuts, a shuffled pool at a time: each pool whole batches of
        ``batch_size`` (the last one of an unsharded epoch may end short), so a caller can pack
        a pool once and slice it."""
        rng = None if seed is None else np.random.default_rng(seed)
        rank, world = shard
        left = self.steps(batch_size, world) if world > 1 else None  # batches a shard may still make
        pending: list[ListBatch] = []
        groups = self.groups(seed, shard)
        while True:
            read = [g for _, g in zip(range(buffer), groups)]
            pending += read
            if not pending:
                return
            pool = concat_lists(pending)
            pool = pool.take(rng.permutation(len(pool))) if rng is not None else pool
            full = len(pool) // batch_size
            if left is not None:
                full = min(full, left)
                left -= full
            if full:
                yield pool.take(slice(0, full * batch_size))
            rest = pool.take(slice(full * batch_size, len(pool)))
            pending = [rest] if len(rest) and left != 0 else []
            if len(read) < buffer:  # the last row groups are read
                if pending and left is None:
                    yield rest
                return

    def collect(self) -> ListBatch:
        """Every sample, in file order (an evaluation split: what fits in memory)."""
        return concat_lists(list(self.groups()))


@dataclass
class ListStream(SampleStream):
    """The lists of ``split`` (one per request: every candidate it logged, as ``build_lists``
    makes them, padded to the split's longest list), of the requests whose history holds at
    least ``min_history`` items. Needs row groups of whole requests, as ``write_dataset`` writes
    them (checked, naming the request, on the first pass)."""

    min_history: int = 0

    @classmethod
    def open(cls, directory: str | Path, split: str, ds: Dataset | None = None, min_history: int = 0, trusted: bool = False) -> "ListStream":
        return cls(Path(directory), ds if ds is not None else read_dataset(directory, candidates=False), split, 0, trusted=trusted, min_history=min_history)

    def _kept_requests(self) -> np.ndarray:
        kept = super()._kept_requests()
        return kept & (self.ds.requests["history_len"] >= self.min_history) if self.min_history else kept

    def counts(self) -> np.ndarray:
        """The lists in each row group; sets ``list_size``, the longest (one pass over the
        request ids, kept)."""
        if self._counts is None:
            ids, longest = [], 0
            for g in self._groups:
                col = g.to_table(columns=["request_id"], filter=self._filter, use_threads=False)["request_id"].to_numpy()
                unique, per_list = np.unique(col, return_counts=True)
                ids.append(unique)
                longest = max(longest, int(per_list.max(initial=0)))
            every = np.concatenate(ids) if ids else np.zeros(0, np.int64)
            values, seen = np.unique(every, return_counts=True)
            if np.any(seen > 1):
                request = int(values[seen > 1][0])
                where = [i for i, u in enumerate(ids) if request in u]
                raise DataError([Problem(TABLE_FILES["candidates"], "request_id", None, request, f"request {request} spans row groups {where[0]} and {where[1]}, so its list cannot be read a row group at a time; write the directory with cascade's write_dataset (cascade import), which keeps each request in one row group")])
            self._counts, self.list_size = np.array([len(u) for u in ids], dtype=np.int64), longest
        return self._counts

    def _samples(self, g: int) -> ListBatch:
        """Row group ``g``'s lists, padded to ``list_size``."""
        self.counts()
        return build_lists(self._piece(g), self.split, max_items=self.list_size)


@dataclass
class RowGroups(SampleStream):
    """Every split's candidates, one row group at a time, each read (and validated) once: for a
    run that keeps a small part of the logs (the recall tower keeps the positives)."""

    @classmethod
    def open(cls, directory: str | Path, ds: Dataset | None = None) -> "RowGroups":
        return cls(Path(directory), ds if ds is not None else read_dataset(directory, candidates=False), split="", min_stage=0)

    def _kept_requests(self) -> np.ndarray:
        return np.ones(len(self.ds.requests["request_id"]), bool)

    def pieces(self) -> Iterator[Dataset]:
        """Each row group's candidates with their requests, in file order."""
        for g in range(len(self._groups)):
            yield self._piece(g)
