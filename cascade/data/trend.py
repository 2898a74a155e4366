"""Item trend: how often an item was exposed in the days just before a request.

A catalog's taste moves: on MovieLens-1M the test requests (2001-2003, late sessions of long-time
raters) rate what was being rated that month far more than what was popular in training, and a
ranker that sees only static item fields cannot know it. The count is causal: it uses exposures
logged strictly before the request's ``ts`` (its own and later events never count), which is
what a serving feature store holds at request time, so it is leak-free in a temporal split.

``ItemTrend.from_dataset(ds)`` indexes the exposures; ``counts(item (B, N), ts (B,), days)`` the
windowed counts; ``bucket`` turns a count into an embeddable id (log2 buckets, 1..TREND_BUCKETS); ``with_trend`` adds
them to a data set as per-candidate item fields (``data.recall.trend_days``), which a ranker and a
pre-ranker's item tower embed like any item field.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cascade.data.schema import EXPOSED, Schema
from cascade.features import FeatureSpec, Field
from cascade.data.store import Dataset

TREND_BUCKETS = 16  # id 1 + floor(log2(1 + count)), capped: counts to 2**15 apart
DAY = 86_400


def trend_field_name(days: float) -> str:
    return f"item_trend_{days:g}d"


def bucket(counts: np.ndarray) -> np.ndarray:
    """count >= 0 -> id 1 + floor(log2(1 + count)), at most TREND_BUCKETS (0 stays padding's)."""
    return np.minimum(1 + np.floor(np.log2(1.0 + counts)).astype(np.int64), TREND_BUCKETS)


@dataclass(frozen=True)
class ItemTrend:
    """Exposure times, sorted by (item, ts): ``item (E,)``, ``ts (E,)`` int64 seconds."""

    item: np.ndarray
    ts: np.ndarray

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "ItemTrend":
        """Every exposed candidate of every split, at its request's ``ts``."""
        if not ds.schema.temporal:
            raise ValueError(f"item trend needs temporal logs; '{ds.schema.name}' is not temporal (its ts does not order events)")
        cand = ds.candidates
        exposed = cand["stage"] == EXPOSED
        return cls.from_events(cand["item_id"][exposed], request_ts(ds, cand["request_id"][exposed]))

    @classmethod
    def from_events(cls, item: np.ndarray, ts: np.ndarray) -> "ItemTrend":
        order = np.lexsort((ts, item))
        return cls(np.asarray(item, np.int64)[order], np.asarray(ts, np.int64)[order])

    def counts(self, item: np.ndarray, ts: np.ndarray, days: float) -> np.ndarray:
        """item (B, N) ids, ts (B,) -> (B, N) int64: exposures of each item in [ts - days, ts)."""
        if days <= 0:
            raise ValueError(f"trend window must be positive days, got {days}")
        item = np.asarray(item, np.int64)
        t = np.broadcast_to(np.asarray(ts, np.int64).reshape(-1, *([1] * (item.ndim - 1))), item.shape)
        # one sorted key per event, item-major: item * span + (ts - first ts)
        first, last = (int(self.ts.min()), int(self.ts.max())) if len(self.ts) else (0, 0)
        span = last - first + 2
        top = max(int(self.item.max(initial=0)), int(item.max(initial=0))) + 1
        if top * span >= 2**62:
            raise ValueError(f"item ids up to {top - 1} and a ts span of {span:,} s do not fit one 64-bit key")
        keys = self.item * span + (self.ts - first)
        at = lambda when: item * span + np.clip(when - first, 0, span - 1)  # noqa: E731
        hi = np.searchsorted(keys, at(t), side="left")  # events strictly before t
        lo = np.searchsorted(keys, at(t - int(days * DAY)), side="left")
        return (hi - lo).astype(np.int64)


def request_ts(ds: Dataset, request_id: np.ndarray) -> np.ndarray:
    """The ``ts`` of each request id (all known to ``ds``)."""
    req = ds.requests
    order = np.argsort(req["request_id"])
    return req["ts"][order[np.searchsorted(req["request_id"][order], request_id)]]


def trend_schema(schema: Schema, days: tuple[float, ...]) -> Schema:
    """``schema`` with one per-candidate item field per window (``trend_field_name(d)``)."""
    names = [trend_field_name(d) for d in days]
    taken = sorted(set(names) & set(schema.features.names))
    if taken:
        raise ValueError(f"field '{taken[0]}' is already in the schema")
    fields = tuple(Field(name, "item", TREND_BUCKETS, table="candidates") for name in names)
    return replace(schema, features=FeatureSpec(schema.features.fields + fields), protocol={**schema.protocol, "item_trend_days": list(days)})


def with_trend(ds: Dataset, trend: ItemTrend, days: tuple[float, ...]) -> Dataset:
    """``ds`` with ``trend_schema``'s fields, valued per candidate: the trend bucket of each
    candidate at its request's ``ts``."""
    schema = trend_schema(ds.schema, days)
    cand = ds.candidates
    ts = request_ts(ds, cand["request_id"])
    columns = {trend_field_name(d): bucket(trend.counts(cand["item_id"], ts, d)) for d in days}
    return replace(ds, schema=schema, candidates={**cand, **columns})
