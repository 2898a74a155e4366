"""The logs a cascade is evaluated on (``cascade eval``): read whole, or streamed a row group at a time.

An evaluation needs a split's logged lists (the test requests, and the validation requests for
the trending baselines' window), each item's train-split positives (the most-popular baselines)
and, on temporal logs, every exposure (the item trend). ``EvalData`` gives all three from logs
read whole, or from logs that do not fit (``data.stream``): then it first reads every row group
once, validating it as the whole read does, counting the positives and keeping the exposures
(2.5% of a synthetic row group's candidates), and gives each split's lists a row group at a time
(``ListStream``). The evaluation adds up its figures over the parts (``metrics.add_totals``), so
memory holds the users, items and requests index, the exposures and a few row groups.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from cascade.data.lists import ListBatch, build_lists, concat_lists
from cascade.data.store import Dataset, read_dataset
from cascade.data.stream import ListStream, RowGroups
from cascade.data.trend import ItemTrend

BLOCK_REQUESTS = 4096  # the lists an in-memory evaluation runs the cascade on at once


def popularity(ds: Dataset) -> np.ndarray:
    """Train-split positives per item id, (max id + 1,) float64."""
    c, r = ds.candidates, ds.requests
    train = np.isin(c["request_id"], r["request_id"][r["split"] == "train"])
    return np.bincount(c["item_id"][train & (c["label"] > 0)], minlength=int(ds.items["item_id"].max()) + 1).astype(np.float64)


class EvalData:
    """The logs ``ds``, read whole, or without candidates (``read_dataset(candidates=False)``) when
    ``directory``, the log directory, is streamed."""

    def __init__(self, ds: Dataset, directory: str | Path | None = None):
        self.ds, self.directory = ds, None if directory is None else Path(directory)
        self._popularity: np.ndarray | None = None
        self._trend: ItemTrend | None = None

    @classmethod
    def read(cls, directory: str | Path, streamed: bool) -> "EvalData":
        return cls(read_dataset(directory, candidates=not streamed), directory if streamed else None)

    @property
    def streamed(self) -> bool:
        return self.directory is not None

    def lists(self, split: str) -> Iterator[ListBatch]:
        """The split's logged lists in parts: ``BLOCK_REQUESTS`` at a time in memory (padded to
        the split's longest list), a row group's at a time streamed (padded the same way)."""
        if not self.streamed:
            logged = build_lists(self.ds, split)
            yield from (logged.take(slice(a, a + BLOCK_REQUESTS)) for a in range(0, len(logged), BLOCK_REQUESTS))
            return
        self._scan()
        stream = ListStream.open(self.directory, split, self.ds, trusted=True)  # trusted: the scan validated every row group
        yield from (part for part in stream.groups() if len(part))

    def first(self, split: str, n: int) -> ListBatch:
        """The split's first ``n`` lists (fewer when it has fewer): what serving cost is measured on."""
        taken, have = [], 0
        for part in self.lists(split):
            taken.append(part.take(slice(0, n - have)))
            have += len(taken[-1])
            if have >= n:
                break
        if not taken:
            raise ValueError(f"the logs have no '{split}' request")
        return concat_lists(taken)

    def popularity(self) -> np.ndarray:
        """Train-split positives per item id (``popularity``)."""
        if self._popularity is None:
            self._popularity = self._scan()[0] if self.streamed else popularity(self.ds)
        return self._popularity

    def trend(self) -> ItemTrend:
        """Every exposure of every split, at its request's time (temporal logs only)."""
        if self._trend is None:
            # from_dataset refuses logs that are not temporal, streamed or not
            self._trend = self._scan()[1] if self.streamed and self.ds.schema.temporal else ItemTrend.from_dataset(self.ds)
        return self._trend

    def _scan(self) -> tuple[np.ndarray, ItemTrend | None]:
        """One pass over every row group (each converted and validated: a bad value anywhere stops
        the evaluation, naming the file's row): the train positives per item and, on temporal
        logs, the exposures. Kept; later calls return them."""
        if self._popularity is None:
            counts, trends = popularity(self.ds), []  # the empty candidates give zeros of the right length
            for piece in RowGroups.open(self.directory, self.ds).pieces():
                counts += popularity(piece)
                if self.ds.schema.temporal:
                    trends.append(ItemTrend.from_dataset(piece))
            self._popularity = counts
            if self.ds.schema.temporal:
                self._trend = ItemTrend.gather(trends)
        return self._popularity, self._trend
