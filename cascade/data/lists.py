"""Padded listwise arrays: the one data path every model, loss and metric trains on.

A ``ListBatch`` holds B lists of up to N candidates:

* ``item``: item-side fields gathered by id, ``(B, N)`` or ``(B, N, max_len)``, ``item_id`` among
  them (0 = padding), plus item-side fields stored per candidate;
* ``label (B, N) float32``, ``stage (B, N) int8``, ``mask (B, N) bool``;
* ``teacher``: one ``(B, N) float32`` column of logits per teacher (filled by the flow);
* ``user``: user-side fields ``(B,)`` or ``(B, max_len)``; a user-side field stored per candidate
  (an out-of-fold statistic) is ``(B, N)``, which only pointwise models may use;
* ``history (B, L)`` item ids, most recent first-to-last, 0-padded after; ``request_id (B,)``;
* ``ts (B,)`` each request's time (None where unknown), for features computed at request time.

Pointwise training is the N = 1 case (``pointwise_lists``). Within a list, candidates are ordered
by logged stage, deepest first, then as stored; no metric depends on that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np

from cascade.data.store import Dataset


@dataclass
class ListBatch:
    request_id: np.ndarray
    user: dict[str, np.ndarray]
    history: np.ndarray
    item: dict[str, np.ndarray]
    label: np.ndarray
    stage: np.ndarray
    mask: np.ndarray
    teacher: dict[str, np.ndarray] = field(default_factory=dict)
    ts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.request_id)

    @property
    def list_size(self) -> int:
        return self.mask.shape[1]

    @property
    def positive_ids(self) -> np.ndarray:
        """(B, N) the item ids of each list's logged positives, 0 elsewhere (ids start at 1)."""
        return np.where(self.mask & (self.label > 0), self.item["item_id"], 0)

    def take(self, rows: np.ndarray) -> "ListBatch":
        """The lists at ``rows`` (a slice or an index array)."""
        pick = lambda d: {k: v[rows] for k, v in d.items()}  # noqa: E731
        ts = None if self.ts is None else self.ts[rows]
        return ListBatch(self.request_id[rows], pick(self.user), self.history[rows], pick(self.item), self.label[rows], self.stage[rows], self.mask[rows], pick(self.teacher), ts)

    def take_columns(self, cols: np.ndarray) -> "ListBatch":
        """Each list cut to its candidates at ``cols`` (B, M), in that order: a stage's top-m."""
        rows = np.arange(len(self))[:, None]
        pick = lambda d: {k: v[rows, cols] for k, v in d.items()}  # noqa: E731  (B, M, ...) per field
        return replace(self, item=pick(self.item), label=self.label[rows, cols], stage=self.stage[rows, cols], mask=self.mask[rows, cols], teacher=pick(self.teacher))

    def cells(self, rows: np.ndarray, cols: np.ndarray, valid: np.ndarray) -> "ListBatch":
        """Lists (S, M) of the candidates at (``rows[s]``, ``cols[s, j]``) where ``valid`` (S, M),
        padding elsewhere, gathered without copying whole rows."""
        r = rows[:, None]
        pad = lambda v: np.where(valid.reshape(valid.shape + (1,) * (v.ndim - 2)), v[r, cols], 0)  # noqa: E731  (S, M, ...)
        ts = None if self.ts is None else self.ts[rows]
        return ListBatch(
            self.request_id[rows], {k: v[rows] for k, v in self.user.items()}, self.history[rows],
            {k: pad(v) for k, v in self.item.items()}, pad(self.label), pad(self.stage), self.mask[r, cols] & valid,
            {k: pad(v) for k, v in self.teacher.items()}, ts,
        )

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator["ListBatch"]:
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for a in range(0, len(self), batch_size):
            yield self.take(order[a : a + batch_size])

    def with_teacher(self, name: str, logits: np.ndarray) -> "ListBatch":
        if logits.shape != self.mask.shape:
            raise ValueError(f"teacher '{name}' logits {logits.shape} do not match the lists {self.mask.shape}")
        return replace(self, teacher={**self.teacher, name: np.where(self.mask, logits, 0.0).astype(np.float32)})


def concat_lists(parts: list[ListBatch]) -> ListBatch:
    """The lists of ``parts`` (all of one list size) one after the other."""
    if len({p.list_size for p in parts}) > 1:
        raise ValueError(f"concat_lists: list sizes differ ({sorted({p.list_size for p in parts})})")
    cat = lambda arrays: np.concatenate(arrays, axis=0)  # noqa: E731
    fields = lambda name: {k: cat([getattr(p, name)[k] for p in parts]) for k in getattr(parts[0], name)}  # noqa: E731
    ts = None if any(p.ts is None for p in parts) else cat([p.ts for p in parts])
    return ListBatch(cat([p.request_id for p in parts]), fields("user"), cat([p.history for p in parts]), fields("item"), cat([p.label for p in parts]), cat([p.stage for p in parts]), cat([p.mask for p in parts]), fields("teacher"), ts)


def _lookup(ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Row of each id in a table keyed by ``keys`` (ids known to be present)."""
    order = np.argsort(keys, kind="stable")
    return order[np.searchsorted(keys[order], ids)]


def _gather_side(ds: Dataset, side: str, rows: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Fields of the users or items table at ``rows`` (flat), reshaped to ``shape``."""
    table = ds.users if side == "user" else ds.items
    out = {}
    for f in ds.schema.features.in_table("users" if side == "user" else "items"):
        v = table[f.name][rows]
        out[f.name] = v.reshape(shape + v.shape[1:])
    return out


def _split_rows(ds: Dataset, split: str | None) -> np.ndarray:
    req = ds.requests
    return np.arange(len(req["request_id"])) if split is None else np.flatnonzero(req["split"] == split)


def _candidate_rows(ds: Dataset, req_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates of the chosen requests, ordered by request then stage (deepest first).
    Returns candidate indices and each one's list index (into ``req_rows``)."""
    cand = ds.candidates
    list_of = np.full(len(ds.requests["request_id"]), -1)
    list_of[req_rows] = np.arange(len(req_rows))
    which = list_of[_lookup(cand["request_id"], ds.requests["request_id"])]
    idx = np.flatnonzero(which >= 0)
    idx = idx[np.lexsort((idx, -cand["stage"][idx].astype(np.int64), which[idx]))]
    return idx, which[idx]


def build_lists(ds: Dataset, split: str | None = None, max_items: int | None = None) -> ListBatch:
    """Every request of ``split`` (all when None) as one padded batch of lists.

    N is the longest list, or ``max_items``, which keeps each list's deepest-stage candidates.
    """
    req, cand = ds.requests, ds.candidates
    req_rows = _split_rows(ds, split)
    idx, lst = _candidate_rows(ds, req_rows)
    counts = np.bincount(lst, minlength=len(req_rows))
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pos = np.arange(len(idx)) - starts[lst]
    n = int(counts.max(initial=0)) if max_items is None else max_items
    keep = pos < n
    idx, lst, pos = idx[keep], lst[keep], pos[keep]
    B = len(req_rows)

    def scatter(values: np.ndarray, dtype) -> np.ndarray:
        out = np.zeros((B, n) + values.shape[1:], dtype=dtype)
        out[lst, pos] = values
        return out

    item_rows = _lookup(cand["item_id"][idx], ds.items["item_id"])
    item = {k: scatter(v, np.int64) for k, v in _gather_side(ds, "item", item_rows, (len(idx),)).items()}
    user = _gather_side(ds, "user", _lookup(req["user_id"][req_rows], ds.users["user_id"]), (B,))
    for f in ds.schema.features.in_table("candidates"):
        (item if f.side == "item" else user)[f.name] = scatter(cand[f.name][idx], np.int64)
    mask = np.zeros((B, n), dtype=bool)
    mask[lst, pos] = True
    return ListBatch(
        request_id=req["request_id"][req_rows],
        user=user,
        history=req["history"][req_rows],
        item=item,
        label=scatter(cand["label"][idx], np.float32),
        stage=scatter(cand["stage"][idx], np.int8),
        mask=mask,
        ts=req["ts"][req_rows],
    )


def drop_from_history(history: np.ndarray, length: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Remove the target from each history, or one other (random) item where it is absent,
    so every sample's history loses exactly one item whatever its label.

    history (B, L), length (B,), target (B,) -> history (B, L) compacted and 0-padded, length (B,).
    """
    L = history.shape[1]
    valid = np.arange(L) < length[:, None]
    hit = valid & (history == target[:, None])
    random_pos = (rng.random(len(length)) * np.maximum(length, 1)).astype(np.int64)
    drop = np.where(hit.any(axis=1), hit.argmax(axis=1), random_pos)
    keep = valid & (np.arange(L) != drop[:, None])
    order = np.argsort(~keep, axis=1, kind="stable")
    out = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(history, order, 1), 0)
    return out, keep.sum(axis=1)


def pointwise_lists(ds: Dataset, split: str | None = None, seed: int = 0, min_stage: int = 0) -> ListBatch:
    """One list of one candidate per sample (N = 1), through the same path as ``build_lists``;
    only candidates whose logged stage is at least ``min_stage`` (e.g. the exposures).

    When the protocol says ``history_drops_target`` (MovieLens-1M ``ctr``), each sample's
    history loses its target, or one seeded other item (``drop_from_history``).
    """
    lists = build_lists(ds, split)
    rows, cols = np.nonzero(lists.mask & (lists.stage >= min_stage))  # before the flat copies: a history per sample
    per_candidate = {f.name for f in ds.schema.features.in_table("candidates")}
    flat = ListBatch(
        request_id=lists.request_id[rows],
        user={k: (v[rows, cols][:, None] if k in per_candidate else v[rows]) for k, v in lists.user.items()},
        history=lists.history[rows],
        item={k: v[rows, cols][:, None] for k, v in lists.item.items()},
        label=lists.label[rows, cols][:, None],
        stage=lists.stage[rows, cols][:, None],
        mask=np.ones((len(rows), 1), dtype=bool),
        ts=lists.ts[rows],
    )
    if ds.schema.protocol.get("history_drops_target"):
        length = ds.requests["history_len"][_split_rows(ds, split)][rows]
        flat.history, _ = drop_from_history(flat.history, length, flat.item["item_id"][:, 0], np.random.default_rng(seed))
    return flat
