"""Item trend: how often an item was exposed in the days just before a request.

A catalog's taste moves: on MovieLens-1M the test requests (2001-2003, late sessions of long-time
raters) rate what was being rated that month far more than what was popular in training, and a
ranker that sees only static item fields cannot know it. The count is causal: it uses exposures
logged strictly before the request's ``ts`` (its own and later events never count), which is
what a serving feature store holds at request time, so it is leak-free in a temporal split.

``ItemTrend.from_dataset(ds)`` indexes the exposures; ``counts(item (B, N), ts (B,), days)`` the
windowed counts; ``TrendSpec`` names the windows and the scale that turns a count into an embeddable
id (1..TREND_BUCKETS); ``with_trend`` adds them to a data set as per-candidate item fields
(``data.recall.trend_days`` and ``trend_scale``), which a ranker and a pre-ranker's item tower embed
like any item field.

Two scales (``TREND_SCALES``):

- ``count``: log2 buckets of the count itself. A count's meaning moves with the log's volume: on
  MovieLens-1M the training requests (2000) see an item's 7-day count mostly in buckets 4-9 and
  the test requests (2001-2003; the median 7-day window before a request holds 743 ratings
  against 19,173 in training) 99% in buckets 1-3, where training has 11% of its candidates: a
  model learns the trend where it will not serve.
- ``list``: the candidate's percentile among the candidates of its list (the share counted
  strictly less, in TREND_BUCKETS equal steps): invariant to the log's volume. The list is the one
  a stage is served (recall's output; later stages keep the value computed on it), so a model
  must see it on lists built the same way. On MovieLens-1M's cross-fitted top-200 lists it lifts
  the DIN ranker's test Recall@10 from 0.0915 (count, 2 seeds) to 0.1141 (3 seeds;
  benchmarks/results/trend_ml1m.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np

from cascade.data.schema import EXPOSED, Schema
from cascade.features import FeatureSpec, Field
from cascade.data.store import Dataset

TREND_BUCKETS = 16  # ids 1..16: log2 buckets of a count, or sixteenths of a list percentile
TREND_SCALES = ("count", "list")
DAY = 86_400


@dataclass(frozen=True)
class TrendSpec:
    """The item-trend fields a model reads: one per window in ``days``, valued on ``scale``
    (``TREND_SCALES``). Falsy when there are no windows."""

    days: tuple[float, ...] = ()
    scale: str = "count"

    def __post_init__(self):
        if self.scale not in TREND_SCALES:
            raise ValueError(f"trend scale must be one of {', '.join(TREND_SCALES)}, got '{self.scale}'")

    def __bool__(self) -> bool:
        return bool(self.days)


def trend_field_name(days: float) -> str:
    return f"item_trend_{days:g}d"


def is_trend_field(name: str) -> bool:
    """Whether a field is a per-request item trend (``trend_field_name``): no item-side cache holds it."""
    return name.startswith("item_trend_")


def bucket(counts: np.ndarray) -> np.ndarray:
    """count >= 0 -> id 1 + floor(log2(1 + count)), at most TREND_BUCKETS (0 stays padding's)."""
    return np.minimum(1 + np.floor(np.log2(1.0 + counts)).astype(np.int64), TREND_BUCKETS)


def list_percentile(counts: np.ndarray, group: np.ndarray) -> np.ndarray:
    """counts (E,), group (E,) int: which list each belongs to -> (E,) ids 1..TREND_BUCKETS:
    1 + floor(TREND_BUCKETS * share of its list counted strictly less), the top id capped. Equal
    counts get equal ids, whatever the order of the list."""
    order = np.lexsort((counts, group))
    g, c = group[order], counts[order]
    start = np.searchsorted(g, g, "left")
    size = np.searchsorted(g, g, "right") - start
    new = np.ones(len(g), bool)
    new[1:] = (g[1:] != g[:-1]) | (c[1:] != c[:-1])
    first_equal = np.maximum.accumulate(np.where(new, np.arange(len(g)), 0))
    ids = 1 + np.minimum((TREND_BUCKETS * (first_equal - start)) // np.maximum(size, 1), TREND_BUCKETS - 1)
    out = np.empty(len(g), np.int64)
    out[order] = ids
    return out


def trend_ids(counts: np.ndarray, group: np.ndarray, scale: str) -> np.ndarray:
    """(E,) counts and the list each is in -> (E,) ids on ``scale``."""
    return bucket(counts) if scale == "count" else list_percentile(counts, group)


TS_BITS = 34  # an event key: item id in the high bits, ts + TS_OFFSET in the low 34
TS_OFFSET = 1 << 33  # so a ts may be any second within about 272 years of 1970, before or after
MAX_ITEM = (1 << (63 - TS_BITS)) - 1


def event_keys(item: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """item (E,) ids, ts (E,) seconds -> (E,) int64 keys that sort item-major, then by time: the
    one encoding of an exposure offline (``ItemTrend``) and online (``export.online``)."""
    item, ts = np.asarray(item, np.int64), np.asarray(ts, np.int64)
    if item.size and (item.min() < 0 or item.max() > MAX_ITEM):
        raise ValueError(f"item trend: item ids must be in 0..{MAX_ITEM}, got {int(item.min())}..{int(item.max())}")
    if ts.size and (ts.min() < -TS_OFFSET or ts.max() >= TS_OFFSET):
        raise ValueError(f"item trend: ts must be within ±{TS_OFFSET} s of 0, got {int(ts.min())}..{int(ts.max())}")
    return (item << TS_BITS) + (ts + TS_OFFSET)


def window_counts(keys: np.ndarray, item: np.ndarray, ts: np.ndarray, days: Sequence[float]) -> np.ndarray:
    """THE trend feature: ``keys`` sorted event keys, item (B, N) ids, ts (B,) -> (W, B, N) int64:
    each item's events in [ts - days[w], ts), strictly before the request, per window. Serving
    calls it on the live store's keys, training on the logs'. One search for every bound."""
    if any(d <= 0 for d in days):
        raise ValueError(f"trend windows must be positive days, got {list(days)}")
    item = np.asarray(item, np.int64)
    t = np.broadcast_to(np.asarray(ts, np.int64).reshape(-1, *([1] * (item.ndim - 1))), item.shape)
    starts = t[None] - np.array([int(d * DAY) for d in days], np.int64).reshape(-1, *([1] * item.ndim))
    # a time clipped to the key range still counts right: TS_OFFSET past an item's base is the
    # next item's first key (every event of the item is before it), -TS_OFFSET its own first
    bounds = (item << TS_BITS)[None] + (np.clip(np.concatenate([t[None], starts]), -TS_OFFSET, TS_OFFSET) + TS_OFFSET)
    flat = bounds.ravel()
    order = np.argsort(flat)  # sorted queries: numpy's search narrows from the last one, ~2.5x faster
    found = np.empty(len(flat), np.int64)
    found[order] = np.searchsorted(keys, flat[order], side="left")
    found = found.reshape(bounds.shape)
    return (found[:1] - found[1:]).astype(np.int64)


@dataclass(frozen=True)
class ItemTrend:
    """Exposures as sorted ``event_keys`` (E,): item-major, then by time."""

    keys: np.ndarray

    @property
    def item(self) -> np.ndarray:
        return self.keys >> TS_BITS

    @property
    def ts(self) -> np.ndarray:
        return (self.keys & ((1 << TS_BITS) - 1)) - TS_OFFSET

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "ItemTrend":
        """Every exposed candidate of every split, at its request's ``ts``."""
        if not ds.schema.temporal:
            raise ValueError(f"item trend needs temporal logs; '{ds.schema.name}' is not temporal (its ts does not order events)")
        if ds.requests_file is not None:
            raise ValueError("item trend: these logs were read without their candidates (streamed); gather the exposures a row group at a time (eval_data.EvalData.trend)")
        cand = ds.candidates
        exposed = cand["stage"] == EXPOSED
        return cls.from_events(cand["item_id"][exposed], request_ts(ds, cand["request_id"][exposed]))

    @classmethod
    def from_events(cls, item: np.ndarray, ts: np.ndarray) -> "ItemTrend":
        return cls(np.sort(event_keys(item, ts)))

    @classmethod
    def gather(cls, parts: Iterable["ItemTrend"]) -> "ItemTrend":
        """One trend of every part's exposures: logs streamed a row group at a time, each row
        group's ``from_dataset`` (the exposures are 2.5% of a synthetic world's candidates)."""
        return cls(np.sort(np.concatenate([p.keys for p in parts] or [np.zeros(0, np.int64)])))

    def before(self, ts: int) -> "ItemTrend":
        """The exposures logged strictly before ``ts``."""
        return ItemTrend(self.keys[self.ts < ts])

    def counts(self, item: np.ndarray, ts: np.ndarray, days: float) -> np.ndarray:
        """item (B, N) ids, ts (B,) -> (B, N) int64: exposures of each item in [ts - days, ts)."""
        return window_counts(self.keys, item, ts, (days,))[0]

    @cached_property
    def by_time(self) -> tuple[np.ndarray, np.ndarray]:
        """The exposures in time order: item (E,) ids and ts (E,)."""
        order = np.argsort(self.ts, kind="stable")
        return self.item[order], self.ts[order]

    def catalog_counts(self, catalog: np.ndarray, ts: np.ndarray, days: float) -> np.ndarray:
        """catalog (C,) ids, ts (B,) -> (B, C) int64: ``counts`` of every catalog item at each ts,
        swept in time order: the counts at the earliest ts, then each later ts adds the exposures
        that entered its window and drops those that left (a cumulative sum over the rows), so the
        work is B x C plus the events between the earliest and the latest ts, with no search per
        cell. Fast when the ts are close together (``evaluate.trending`` sorts its requests)."""
        catalog, ts = np.asarray(catalog, np.int64), np.asarray(ts, np.int64)
        ev_item, ev_ts = self.by_time
        n_items = len(catalog)
        position = np.full(int(max(catalog.max(initial=0), ev_item.max(initial=0))) + 1, -1, np.int64)
        position[catalog] = np.arange(n_items)
        order = np.argsort(ts, kind="stable")
        t = ts[order]
        end = np.searchsorted(ev_ts, t, side="left")  # events strictly before each ts
        start = np.searchsorted(ev_ts, t - int(days * DAY), side="left")  # ... and before its window

        def per_row(lo: np.ndarray, bounds: np.ndarray) -> np.ndarray:
            """(B, C): the catalog events in [lo[0], lo[-1]) counted at the first row whose bound
            passes them."""
            events = np.arange(lo[0], lo[-1])
            pos = position[ev_item[events]]
            keep = pos >= 0
            rows = np.searchsorted(bounds, events[keep], side="right")
            return np.bincount(rows * n_items + pos[keep], minlength=len(t) * n_items).reshape(len(t), n_items)

        first = position[ev_item[start[0] : end[0]]] if len(t) else np.zeros(0, np.int64)
        base = np.bincount(first[first >= 0], minlength=n_items)
        out = np.empty((len(t), n_items), np.int64)
        if len(t):
            out[order] = np.cumsum(per_row(end, end) - per_row(start, start), axis=0) + base
        return out

    def windows(self, item: np.ndarray, ts: np.ndarray, days: Sequence[float]) -> np.ndarray:
        """item (B, N), ts (B,) -> (W, B, N): ``counts`` for every window of ``days`` at once."""
        return window_counts(self.keys, item, ts, days)


def request_ts(ds: Dataset, request_id: np.ndarray) -> np.ndarray:
    """The ``ts`` of each request id (all known to ``ds``)."""
    req = ds.requests
    order = np.argsort(req["request_id"])
    return req["ts"][order[np.searchsorted(req["request_id"][order], request_id)]]


def trend_schema(schema: Schema, spec: TrendSpec) -> Schema:
    """``schema`` with one per-candidate item field per window (``trend_field_name(d)``)."""
    names = [trend_field_name(d) for d in spec.days]
    taken = sorted(set(names) & set(schema.features.names))
    if taken:
        raise ValueError(f"field '{taken[0]}' is already in the schema")
    fields = tuple(Field(name, "item", TREND_BUCKETS, table="candidates") for name in names)
    return replace(schema, features=FeatureSpec(schema.features.fields + fields), protocol={**schema.protocol, "item_trend_days": list(spec.days), "item_trend_scale": spec.scale})


def with_trend(ds: Dataset, trend: ItemTrend, spec: TrendSpec) -> Dataset:
    """``ds`` with ``trend_schema``'s fields, valued per candidate: the trend id of each candidate
    at its request's ``ts`` (on the ``list`` scale, among its request's candidates)."""
    schema = trend_schema(ds.schema, spec)
    cand = ds.candidates
    ts = request_ts(ds, cand["request_id"])
    columns = {trend_field_name(d): trend_ids(trend.counts(cand["item_id"], ts, d), cand["request_id"], spec.scale) for d in spec.days}
    return replace(ds, schema=schema, candidates={**cand, **columns})
