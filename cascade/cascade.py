"""THE cascade: an ordered list of stages, each a scorer and a quota.

``Cascade.run(requests)`` retrieves each request's top ``recall_quota`` from the catalog (the
history excluded), then lets every stage score what the one before it passed on and keep its top
``quota``; it returns each stage's input, scores, survivors and seconds. Training (the joint
report of ``task: cascade``), evaluation and serving all call it; only the scorers differ: torch
modules in training (``TorchScorer``, ``recall.TowerRetriever``), onnxruntime sessions, cached
item vectors, LightGBM and a faiss index in serving (``export.runtime``).

A scorer is any ``lists (B, N) -> scores (B, N)`` callable over a ``ListBatch`` (values at padding
are ignored); a retriever is ``(requests, n) -> (ids (B, n), scores (B, n))``, 0 / -inf where it
found fewer than n. A cut keeps the top ``quota`` by score among the valid candidates; ties go to
the earlier candidate, so the same input gives the same survivors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from cascade.data.lists import ListBatch
from cascade.data.store import Dataset
from cascade.data.trend import ItemTrend, TrendSpec, trend_field_name, trend_ids
from cascade.models import list_tensors, score_lists

Scorer = Callable[[ListBatch], np.ndarray]
Retriever = Callable[[ListBatch, int], tuple[np.ndarray, np.ndarray]]


class Catalog:
    """Every item's fields by id (row 0 = padding): turns candidate ids into the item side of a
    ``ListBatch``. Items-table fields, and with ``trend`` each item's trend as ``trend_spec`` says
    at the request's time (``cascade.data.trend``, as a recall output with ``trend_days`` and ``trend_scale`` stores
    them); no other per-candidate field: it has no value for an item a stage picked from the
    catalog."""

    def __init__(self, item_ids: np.ndarray, fields: dict[str, np.ndarray], trend: ItemTrend | None = None, trend_spec: TrendSpec = TrendSpec()):
        if trend_spec and trend is None:
            raise ValueError("trend_spec needs the trend")
        n = int(item_ids.max(initial=0)) + 1
        self.item_ids = item_ids
        self.by_id = {}
        for name, values in fields.items():
            table = np.zeros((n,) + values.shape[1:], dtype=np.int64)
            table[item_ids] = values
            self.by_id[name] = table
        self.trend, self.trend_spec = trend, trend_spec

    @classmethod
    def from_dataset(cls, ds: Dataset, trend_spec: TrendSpec = TrendSpec(), trend: ItemTrend | None = None) -> "Catalog":
        """``trend``: the logs' exposures, when ``trend_spec`` needs them and ``ds`` was read
        without its candidates (streamed); otherwise taken from ``ds``."""
        names = [f.name for f in ds.schema.features.in_table("items")]
        if trend_spec and trend is None:
            trend = ItemTrend.from_dataset(ds)
        return cls(ds.items["item_id"], {name: ds.items[name] for name in names}, trend, trend_spec)

    def rows(self) -> dict[str, np.ndarray]:
        """Every field with one row per catalog item, in ``item_ids`` order (what built it)."""
        return {name: table[self.item_ids] for name, table in self.by_id.items()}

    def attach(self, requests: ListBatch, ids: np.ndarray) -> ListBatch:
        """``requests``' user side with candidate ``ids`` (B, N) as its lists (0 = padding; an id
        past the catalog is padding too)."""
        ids = np.where((ids > 0) & (ids < len(self.by_id["item_id"])), ids, 0)
        shape = ids.shape
        lists = replace(
            requests,
            item={name: table[ids] for name, table in self.by_id.items()},
            label=np.zeros(shape, np.float32),
            stage=np.zeros(shape, np.int8),
            mask=ids > 0,
            teacher={},
        )
        return self.add_trend(lists)

    def add_trend(self, lists: ListBatch) -> ListBatch:
        """``lists`` with each candidate's item trend at its request's time (as is without a
        ``trend_spec``; on its ``list`` scale, among the row's candidates); padding gets 0."""
        if not self.trend_spec:
            return lists
        if lists.ts is None:
            raise ValueError("the item trend needs each request's time (ts)")
        ids = lists.item["item_id"]
        real = ids > 0
        row = np.broadcast_to(np.arange(len(ids))[:, None], ids.shape)[real]
        trend = {}
        counts = self.trend.windows(ids, lists.ts, self.trend_spec.days)  # (W, B, N)
        for d, c in zip(self.trend_spec.days, counts):
            values = np.zeros(ids.shape, np.int64)
            values[real] = trend_ids(c[real], row, self.trend_spec.scale)
            trend[trend_field_name(d)] = values
        return replace(lists, item={**lists.item, **trend})


def requests_batch(user: dict[str, np.ndarray], history: np.ndarray, request_id: np.ndarray | None = None, ts: np.ndarray | None = None) -> ListBatch:
    """B requests with no candidates yet: user fields (B,) or (B, max_len), history (B, L), and
    their times ts (B,) where a stage reads the item trend."""
    b = len(history)
    return ListBatch(
        request_id=np.arange(b) if request_id is None else request_id,
        user=user,
        history=history,
        item={},
        label=np.zeros((b, 0), np.float32),
        stage=np.zeros((b, 0), np.int8),
        mask=np.zeros((b, 0), bool),
        ts=ts,
    )


class TorchScorer:
    """A torch model (pre-ranker or ranker) as a stage's scorer."""

    def __init__(self, model: nn.Module, lists_per_batch: int = 64):
        self.model, self.lists_per_batch = model, lists_per_batch
        self.list_dependent = getattr(model, "list_dependent", False)

    def __call__(self, lists: ListBatch) -> np.ndarray:
        return score_lists(self.model, lists, self.lists_per_batch)

    @torch.no_grad()
    def served(self, lists: ListBatch, alive: Sequence[np.ndarray]) -> list[np.ndarray]:
        """A blend's scores (B, N) as served when only the candidates of each ``alive`` mask
        (B, N) reach it (standardised among them; -inf elsewhere), from one pass of its parts."""
        self.model.eval()
        t = list_tensors(lists, self.model)
        masks = [torch.from_numpy(a & lists.mask) for a in alive]
        out: list[list[torch.Tensor]] = [[] for _ in masks]
        for a in range(0, len(lists), self.lists_per_batch):
            items = t.items[a : a + self.lists_per_batch]
            parts = self.model.part_scores(t.user[a : a + self.lists_per_batch], items)
            for scores, on in zip(out, masks):
                scores.append(self.model.combine(parts, on[a : a + self.lists_per_batch]))
        return [np.where(m.numpy(), torch.cat(s).numpy(), -np.inf).astype(np.float32) for s, m in zip(out, masks)]

    def whole_and_served(self, lists: ListBatch, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The blend's scores over the whole lists (0 at padding) and over the ``alive``
        candidates alone (``served``): what ``Cascade.run(full=True)`` needs of a list-dependent stage."""
        whole, served = self.served(lists, [lists.mask, alive])
        return np.where(lists.mask, whole, 0.0).astype(np.float32), served


@dataclass(frozen=True)
class Stage:
    name: str
    scorer: Scorer
    quota: int


@dataclass
class StageOutput:
    """One stage of a run: the lists it scored (B, N), its scores (B, N), which candidates it
    passed on (``kept`` (B, N), at most its quota per row) and its wall time."""

    name: str
    lists: ListBatch
    scores: np.ndarray
    kept: np.ndarray
    seconds: float


@dataclass
class CascadeOutput:
    """``stages``: recall first when the run retrieved; ``items`` and ``scores`` (B, k): the last
    stage's survivors best first (0 / -inf past a row's survivors)."""

    stages: list[StageOutput]
    items: np.ndarray
    scores: np.ndarray

    @property
    def seconds(self) -> dict[str, float]:
        return {s.name: s.seconds for s in self.stages}


def top_mask(scores: np.ndarray, alive: np.ndarray, quota: int) -> np.ndarray:
    """(B, N) bool: each row's top ``quota`` of the ``alive`` candidates by score (ties to the
    earlier column)."""
    order = np.argsort(np.where(alive, -scores, np.inf), axis=1, kind="stable")[:, :quota]
    kept = np.zeros_like(alive)
    np.put_along_axis(kept, order, True, axis=1)
    return kept & alive


def best_first(lists: ListBatch, scores: np.ndarray, kept: np.ndarray, width: int) -> tuple[ListBatch, np.ndarray]:
    """The ``kept`` candidates of each row, best first, in ``width`` columns (padding after)."""
    order = np.argsort(np.where(kept, -scores, np.inf), axis=1, kind="stable")[:, :width]
    cut = lists.take_columns(order)
    alive = np.take_along_axis(kept, order, 1)
    # a column past the survivors is padding, id 0 included: a list-dependent scorer reads the ids
    item = {**cut.item, "item_id": np.where(alive, cut.item["item_id"], 0)}
    return replace(cut, mask=cut.mask & alive, item=item), np.where(alive, np.take_along_axis(scores, order, 1), -np.inf)


class Cascade:
    """recall (a retriever and its quota, optional) -> stages in order, each cutting to its quota.

    A scorer whose scores depend on the list it is given (``list_dependent``: a blend standardises
    each part over the list) cuts, in a ``full`` run too, the list it is served: what survived
    the stages before it; its scores of the whole list are still what the figures read."""

    def __init__(self, stages: Sequence[Stage], retriever: Retriever | None = None, recall_quota: int = 0, catalog: Catalog | None = None):
        if retriever is not None and (recall_quota < 1 or catalog is None):
            raise ValueError("a retriever needs a recall_quota >= 1 and the catalog")
        quotas = [recall_quota] * (retriever is not None) + [s.quota for s in stages]
        if any(q < 1 for q in quotas) or any(a <= b for a, b in zip(quotas, quotas[1:])):
            raise ValueError(f"quotas must be >= 1 and shrink from stage to stage, got {quotas}")
        self.stages, self.retriever, self.recall_quota, self.catalog = list(stages), retriever, recall_quota, catalog

    @staticmethod
    def cut_as_served(stage: Stage, lists: ListBatch, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stage's top quota of the ``alive`` candidates, scored as a list of their own (in the
        order of ``lists``, so ties still go to the earlier candidate): kept (B, N) bool, and
        those scores at their columns (B, N; -inf elsewhere)."""
        width = max(int(alive.sum(axis=1).max(initial=0)), 1)
        cols = np.argsort(~alive, axis=1, kind="stable")[:, :width]  # each row's alive columns first, in order
        sub = lists.take_columns(cols)
        on = sub.mask & np.take_along_axis(alive, cols, 1)
        sub = replace(sub, mask=on, item={**sub.item, "item_id": np.where(on, sub.item["item_id"], 0)})
        scores = np.asarray(stage.scorer(sub), np.float32)
        kept, served = np.zeros_like(alive), np.full(alive.shape, -np.inf, np.float32)
        np.put_along_axis(kept, cols, top_mask(scores, on, stage.quota), axis=1)
        np.put_along_axis(served, cols, np.where(on, scores, -np.inf), axis=1)
        return kept & alive, served

    def run(self, requests: ListBatch, candidates: ListBatch | None = None, full: bool = False) -> CascadeOutput:
        """Serve ``requests`` (B, ...). ``candidates``: lists to start from instead of retrieving
        (a frozen recall output). ``full``: every stage scores the whole first list (what
        evaluation needs for teacher consistency) while the cuts stay the same; otherwise each
        stage scores only what the stage before it passed on (what serving does)."""
        out: list[StageOutput] = []
        if candidates is None:
            if self.retriever is None:
                raise ValueError("this cascade has no retriever: pass the candidates")
            start = time.perf_counter()
            ids, scores = self.retriever(requests, self.recall_quota)
            lists = self.catalog.attach(requests, ids)
            out.append(StageOutput("recall", lists, scores, lists.mask.copy(), time.perf_counter() - start))
        else:
            lists = candidates
        current, alive = lists, lists.mask
        order_by = None  # the last stage's scores as served, where they differ from its whole-list ones
        for i, stage in enumerate(self.stages):
            start = time.perf_counter()
            if full:
                if i and getattr(stage.scorer, "list_dependent", False):
                    if hasattr(stage.scorer, "whole_and_served"):  # a torch blend: its parts scored once
                        scores, order_by = stage.scorer.whole_and_served(lists, alive)
                        kept = top_mask(order_by, alive, stage.quota)
                    else:
                        scores = np.asarray(stage.scorer(lists), np.float32)
                        kept, order_by = self.cut_as_served(stage, lists, alive)
                else:
                    scores = np.asarray(stage.scorer(lists), np.float32)
                    kept, order_by = top_mask(scores, alive, stage.quota), None
                out.append(StageOutput(stage.name, lists, scores, kept, time.perf_counter() - start))
                alive = kept
            else:
                scores = np.asarray(stage.scorer(current), np.float32)
                kept = top_mask(scores, current.mask, stage.quota)
                out.append(StageOutput(stage.name, current, scores, kept, time.perf_counter() - start))
                current, _ = best_first(current, scores, kept, stage.quota)
        last = out[-1]
        final, final_scores = best_first(last.lists, last.scores if order_by is None else order_by, last.kept, self.stages[-1].quota if self.stages else self.recall_quota)
        return CascadeOutput(out, np.where(final.mask, final.item["item_id"], 0), final_scores)

