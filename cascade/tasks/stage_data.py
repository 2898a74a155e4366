"""A joint cascade's stage data: recall's output per request, made in memory or spilled to parquet.

Every round of a joint cascade (``tasks.cascade.train_cascade``) regenerates its stages' data from the
current recall tower: each request's top-n of the catalog (``recall.recall_output``), R x n
candidates, about as many as the logs hold (the 10x world: 200,000 requests x 200). Logs that
fit (``data.stream``) make it in memory. Otherwise ``StageData`` makes it a row group of the logs
at a time, with one faiss index over the catalog: each row group's requests are retrieved and
labelled from that row group's logs (it holds whole requests), and written as one row group of
the stage's own ``candidates.parquet``, which a ``ListStream`` reads back a row group at a time.
Memory holds the users, items and requests tables, the index and a few row groups.

A stage's split is then a ``ListBatch`` (in memory) or a ``ListStream`` (spilled); ``parts``
walks either, and a phase trains on either (``tasks.cascade.fit_phase``).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
from torch import nn

from cascade.data.lists import ListBatch, build_lists
from cascade.data.schema import SPLITS
from cascade.data.store import Dataset, to_arrow
from cascade.data.stream import ListStream, RowGroups
from cascade.data.trend import ItemTrend, TrendSpec, trend_schema, with_trend
from cascade.distributed import barrier, broadcast, is_writer
from cascade.tasks.distill import stream_score_lookup, write_stream_scores
from cascade.models import score_lists
from cascade.recall import TowerRetriever, recall_output

Source = ListBatch | ListStream  # one split of a stage's data


def parts(source: Source) -> Iterator[ListBatch]:
    """A split's lists: the batch itself, or a stream's row groups that hold any."""
    if isinstance(source, ListBatch):
        yield source
    else:
        yield from (lst for lst in source.groups() if len(lst))


class StageData:
    """Makes a joint cascade's stage data from the logs ``ds`` (read whole, or without candidates
    when ``directory``, the log directory, is streamed); ``spill``: where a streamed run writes
    its stages (one folder each, by name, replaced at every regeneration)."""

    def __init__(self, ds: Dataset, trend: TrendSpec = TrendSpec(), directory: str | Path | None = None, spill: Path | None = None):
        self.ds, self.trend, self.spill = ds, trend, spill
        self.logs = None if directory is None else RowGroups.open(directory, ds)  # kept: each row group is validated once
        self._positives: np.ndarray | None = None
        self._exposures: ItemTrend | None = None  # the item trend's exposures, gathered once

    @property
    def streamed(self) -> bool:
        return self.logs is not None

    def __call__(self, recall: nn.Module, n: int, keep_positives: bool = False, catalog_negatives: int = 0, seed: int = 0, splits: tuple[str, ...] = SPLITS, name: str = "served") -> dict[str, Source]:
        """Each split's (of ``splits``) recall output: the recall tower's top-n per request (and,
        with ``keep_positives``, every logged positive it missed; ``catalog_negatives`` uniform
        catalog draws as label-0 items: see ``recall.recall_output``), with the item trend where
        the stages were trained with it. A streamed run draws a row group's catalog negatives
        from a generator seeded by (``seed``, row group): the same draw, not the same numbers."""
        if not self.streamed:
            out = recall_output(self.ds, recall, n, keep_positives, catalog_negatives, seed)
            if self.trend:
                out = with_trend(out, self.exposures(), self.trend)
            return {split: build_lists(out, split) for split in splits}
        folder, counted = self.spill / name, self._positives is not None
        if is_writer():  # rank 0 writes; every rank reads its share of the row groups
            self._write(folder, recall, n, keep_positives, catalog_negatives, seed)
        barrier()
        if not counted:
            self._positives = broadcast(self._positives)
        stage_ds = replace(self.ds, schema=trend_schema(self.ds.schema, self.trend)) if self.trend else self.ds  # the spill's columns
        return {split: ListStream.open(folder, split, stage_ds, trusted=True) for split in splits}

    def _write(self, folder: Path, recall: nn.Module, n: int, keep_positives: bool, catalog_negatives: int, seed: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        retriever = TowerRetriever(recall, self.ds)  # one index over the catalog for every row group
        tmp, writer = folder / "candidates.parquet.tmp", None
        counts = np.zeros(self._request_slots(), np.int64)
        try:
            for g, piece in enumerate(self.logs.pieces()):
                counts += _positive_counts(piece.candidates, len(counts))
                out = recall_output(piece, recall, n, keep_positives, catalog_negatives, (seed, g), retriever)
                if self.trend:  # per candidate at its request's time, from every row group's exposures
                    out = with_trend(out, self.exposures(), self.trend)
                table = to_arrow(out, "candidates")
                writer = writer or pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table, row_group_size=max(len(table), 1))  # one row group: whole requests
        finally:
            if writer is not None:
                writer.close()
        tmp.replace(folder / "candidates.parquet")
        self._positives = counts

    def exposures(self) -> ItemTrend:
        """Every logged exposure at its request's time (the stages' item trend): from the logs
        read whole, or gathered a row group at a time from streamed logs (one pass, kept)."""
        if self._exposures is None:
            self._exposures = ItemTrend.gather(ItemTrend.from_dataset(p) for p in self.logs.pieces()) if self.streamed else ItemTrend.from_dataset(self.ds)
        return self._exposures

    def positives(self, request_id: np.ndarray) -> np.ndarray:
        """Each request's number of logged positives (retrieved or not), (R,) in the order of
        ``request_id``; a streamed run counts them while it writes its first stage."""
        if self._positives is None:
            if self.streamed:
                raise RuntimeError("a streamed StageData counts the positives while it writes a stage: make one first")
            self._positives = _positive_counts(self.ds.candidates, self._request_slots())
        return self._positives[request_id]

    def scores(self, model: nn.Module, source: Source, name: str) -> Callable[[ListBatch], np.ndarray]:
        """``model``'s scores of a stage's lists (a frozen stage teaching, or choosing, in a phase):
        lists (b, N) -> scores (b, N). In memory, scored when asked; streamed, written once a row
        group at a time beside the stages (``tasks.distill.write_stream_scores``) and looked up per pool, so
        a phase's epochs never rescore (as in memory, where the phase's one pack scores once)."""
        if isinstance(source, ListBatch):
            return lambda lst: score_lists(model, lst)
        path = self.spill / f"{name}.scores.npy"
        if is_writer():
            write_stream_scores(model, source, path)
        barrier()
        return stream_score_lookup(path)

    def _request_slots(self) -> int:
        return int(self.ds.requests["request_id"].max(initial=0)) + 1

    def clear(self) -> None:
        """Delete the spilled stages (a completed run's: they are as large as the logs), once every
        rank has read them: each rank reads the last report's lists whole."""
        barrier()
        if self.spill is not None and is_writer():
            shutil.rmtree(self.spill, ignore_errors=True)


def _positive_counts(candidates: dict[str, np.ndarray], slots: int) -> np.ndarray:
    """(slots,) the logged positives of each request id among ``candidates``."""
    return np.bincount(candidates["request_id"][candidates["label"] > 0], minlength=slots)
