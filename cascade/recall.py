"""The recall stage: a two-tower retrieval model trained with sampled softmax, and faiss
inner-product retrieval of the top-N of the whole catalog.

Training pairs are (request, positive item) from the logs. For a batch of B pairs the candidates
are: the B positives (each the others' in-batch negative; expected count B * q_j, q_j the item's
share of training positives), optionally M items drawn by popularity^power (expected count
M * p_j), and optionally K hard negatives per pair mined from the logged cascade (recalled but cut
before the rank stage, stage <= 1; not corrected). Logits are s / tau - log(expected count);
accidental hits (a row's own positive appearing as another candidate) are masked.

Each pair counts once by default, so a request with 45 positives (a MovieLens sign-up day, no
history yet) outweighs nine with 5 (a regular's day, 50 items of history). Recall@k averages over
requests; ``pair_weight: request`` weighs the pairs so that every request counts the same.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import torch

from cascade import metrics as M
from cascade.data.lists import ListBatch, build_lists, concat_lists, pointwise_lists
from cascade.config import RecallConfig
from cascade.data.store import Dataset
from cascade.data.stream import RowGroups
from cascade.losses.retrieval import log_q_correction, remove_accidental_hits, sampled_softmax
from cascade.towers.base import TwoTower
from cascade.towers.embedding import Slot, pack_items, pack_user
from cascade.train import Tensors


def item_table(ds: Dataset, slots: tuple[Slot, ...]) -> torch.Tensor:
    """Every catalog item packed for an item tower, indexed by item id: (max id + 1, Wi), row 0
    all padding. The recall item tower may use items-table fields only (it must be able to
    embed any item of the catalog, not just logged ones)."""
    names = {f.name for f in ds.schema.features.in_table("items")}
    missing = [s.name for s in slots if s.name not in names]
    if missing:
        raise ValueError(f"the recall item tower may only use items-table fields; '{missing[0]}' is stored per candidate")
    n = len(ds.items["item_id"])
    batch = ListBatch(np.zeros(n), {}, np.zeros((n, 0)), {k: v[:, None] for k, v in ds.items.items()}, np.zeros((n, 1)), np.zeros((n, 1)), np.ones((n, 1), bool))
    table = np.zeros((int(ds.items["item_id"].max()) + 1, sum(s.width for s in slots)), dtype=np.int64)
    table[ds.items["item_id"]] = pack_items(batch, slots)[:, 0]
    return torch.from_numpy(table)


def training_pairs(ds: Dataset, model: TwoTower, split: str, table: torch.Tensor, cfg: RecallConfig) -> Tensors:
    """(request, positive) pairs: user (P, Wu), items (P, 1 + K, Wi) = the positive then up to K
    hard negatives of its request (cut before rank in the logged cascade, K = ``cfg.hard_negatives``),
    mask (P, 1 + K); with ``cfg.pair_weight="request"`` a weight (P,) = mean positives per
    request / its request's positives, so every request weighs the same and the weights average 1."""
    flat, ids = positive_pairs(ds, split, cfg.hard_negatives, np.random.default_rng(cfg.seed))
    return pair_tensors(flat, ids, model, table, cfg.pair_weight)


def positives_only(ds: Dataset) -> Dataset:
    """``ds`` with its candidates cut to the positives (label > 0)."""
    c = ds.candidates
    return replace(ds, candidates={k: v[c["label"] > 0] for k, v in c.items()})


def positive_pairs(ds: Dataset, split: str, hard_negatives: int, rng: np.random.Generator, seed: int = 0) -> tuple[ListBatch, np.ndarray]:
    """The positives of ``split`` as samples (P lists of 1; ``seed``: ``pointwise_lists``' draw)
    and each pair's item ids (P, 1 + K): the positive, then K of its request's cut items (stage
    <= 1) in an order drawn from ``rng``, 0 where the request has fewer."""
    flat = pointwise_lists(positives_only(ds), split, seed=seed)  # no flat copy of the negatives
    ids = np.zeros((len(flat), 1 + hard_negatives), dtype=np.int64)
    ids[:, 0] = flat.item["item_id"][:, 0]
    if hard_negatives and len(flat):
        lists = build_lists(ds, split)
        order = np.argsort(lists.request_id)
        rows = order[np.searchsorted(lists.request_id[order], flat.request_id)]
        cut = lists.mask[rows] & (lists.stage[rows] <= 1)
        # a random order among each request's cut items; the first K are its hard negatives
        key = np.where(cut, rng.random(cut.shape), np.inf)
        pick = np.argsort(key, axis=1)[:, :hard_negatives]
        ok = np.take_along_axis(cut, pick, 1)
        ids[:, 1:] = np.where(ok, np.take_along_axis(lists.item["item_id"][rows], pick, 1), 0)
    return flat, ids


def pair_tensors(flat: ListBatch, ids: np.ndarray, model: TwoTower, table: torch.Tensor, pair_weight: str) -> Tensors:
    """The pairs ``positive_pairs`` gives, packed for ``model`` (see ``training_pairs``)."""
    weight = None
    if pair_weight == "request":
        _, which, per_request = np.unique(flat.request_id, return_inverse=True, return_counts=True)
        weight = torch.from_numpy(per_request.mean() / per_request[which]).float()
    return Tensors(
        user=torch.from_numpy(pack_user(flat, model.user_slots)),
        items=table[torch.from_numpy(ids)],
        label=torch.ones(ids.shape),
        mask=torch.from_numpy(ids > 0),
        weight=weight,
    )


HELD_OUT = ("valid", "test")  # the splits evaluate_recall scores


def streamed_training_data(ds: Dataset, directory: str | Path, model: TwoTower, table: torch.Tensor, cfg: RecallConfig) -> tuple[Dataset, Tensors]:
    """``ds`` (read without candidates) holding only what ``evaluate_recall`` reads of the held-out
    splits of ``directory`` (their positives and those requests), and the training pairs of
    ``training_pairs``, both made a row group at a time (``RowGroups``): memory holds the
    held-out positives, not the logs. Each row group holds whole requests, so its hard negatives
    are drawn as in memory, from a generator seeded per row group: the same draw, not the same
    numbers."""
    positives, requests, flats, ids = [], [], [], []
    for g, piece in enumerate(RowGroups.open(directory, ds).pieces()):
        held = positives_only(piece)
        held_rows = np.flatnonzero(np.isin(held.requests["split"], HELD_OUT) & np.isin(held.requests["request_id"], held.candidates["request_id"]))
        requests.append({k: v[held_rows] for k, v in held.requests.items()})
        keep = np.isin(held.candidates["request_id"], requests[-1]["request_id"])
        positives.append({k: v[keep] for k, v in held.candidates.items()})
        flat, pair_ids = positive_pairs(piece, "train", cfg.hard_negatives, np.random.default_rng((cfg.seed, g)), seed=g)
        flats.append(flat)
        ids.append(pair_ids)
    if not flats:  # no row groups: no pairs, nothing held out
        empty = replace(ds, requests=ds.request_rows(np.zeros(0, np.int64)), requests_file=None)
        flat, pair_ids = positive_pairs(empty, "train", cfg.hard_negatives, np.random.default_rng(cfg.seed))
        return empty, pair_tensors(flat, pair_ids, model, table, cfg.pair_weight)
    joined = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # noqa: E731
    held_out = replace(ds, requests=joined(requests), candidates=joined(positives), requests_file=None)
    return held_out, pair_tensors(concat_lists(flats), np.concatenate(ids), model, table, cfg.pair_weight)


class RecallStep:
    """The training step: ``step(model, batch) -> loss`` with the configured negatives."""

    def __init__(self, cfg: RecallConfig, model: TwoTower, table: torch.Tensor, item_ids: np.ndarray, pairs: Tensors):
        self.cfg = cfg
        self.id_column = next(s.start for s in model.item_slots if s.name == "item_id")
        positive_ids = pairs.items[:, 0, self.id_column].numpy()
        n = len(table)
        counts = np.bincount(positive_ids, minlength=n).astype(np.float64)
        self.q_batch = torch.from_numpy(np.maximum(counts, 1.0) / max(len(positive_ids), 1))  # share of positives
        pop = np.zeros(n)
        pop[item_ids] = (counts[item_ids] + 1.0) ** cfg.popularity_power
        self.p_pop = torch.from_numpy(pop / pop.sum())
        self.table = table
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def __call__(self, model: TwoTower, batch: Tensors) -> torch.Tensor:
        cfg = self.cfg
        b = len(batch)
        u = model.user(batch.user)[:, 0]  # (B, D)
        pos_items = batch.items[:, 0]
        pos_ids = pos_items[:, self.id_column]
        cand = [model.item(pos_items)[:, 0]]
        cand_ids = [pos_ids]
        log_count = [torch.log(b * self.q_batch[pos_ids])]
        if cfg.popularity_negatives:
            drawn = torch.multinomial(self.p_pop, cfg.popularity_negatives, replacement=True, generator=self.generator)
            cand.append(model.item(self.table[drawn])[:, 0])
            cand_ids.append(drawn)
            log_count.append(torch.log(cfg.popularity_negatives * self.p_pop[drawn]))
        shared = log_q_correction(u @ torch.cat(cand).T / cfg.temperature, torch.cat(log_count).float())
        shared = remove_accidental_hits(shared, pos_ids, torch.cat(cand_ids), torch.arange(b))
        logits = [shared]
        if batch.items.shape[1] > 1:
            hard = batch.items[:, 1:]
            k = hard.shape[1]
            hv = model.item(hard.reshape(b * k, -1))[:, 0].reshape(b, k, -1)
            hard_logits = torch.einsum("bd,bkd->bk", u, hv) / cfg.temperature
            invalid = ~batch.mask[:, 1:] | (hard[:, :, self.id_column] == pos_ids.unsqueeze(1))
            logits.append(hard_logits.masked_fill(invalid, float("-inf")))
        return sampled_softmax(torch.cat(logits, dim=1), torch.arange(b), batch.weight)


class ItemIndex:
    """A faiss inner-product index over item vectors, with the item id of each row.

    ``ItemIndex(ids, vectors)`` builds the exact ``IndexFlatIP``; ``ItemIndex(ids, index=...)``
    wraps any faiss index already built over the same rows (an IVF or HNSW one in a bundle)."""

    def __init__(self, item_ids: np.ndarray, vectors: np.ndarray | None = None, index: faiss.Index | None = None):
        self.item_ids = item_ids
        if index is None:
            index = faiss.IndexFlatIP(vectors.shape[1])
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.index = index

    def search_scored(self, user_vectors: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item ids (R, k) per user vector, best first, never an id in that row of
        ``exclude``, and their inner products (R, k); 0 and -inf where the catalog runs out."""
        extra = 0 if exclude is None else exclude.shape[1]
        sim, idx = self.index.search(np.ascontiguousarray(user_vectors, dtype=np.float32), min(k + extra, len(self.item_ids)))
        ids = np.where(idx >= 0, self.item_ids[idx], 0)  # faiss marks missing results with -1
        sim = np.where(idx >= 0, sim, -np.inf).astype(np.float32)
        if exclude is not None:
            banned = M.in_rows(ids, exclude) | (ids == 0)  # exclude's padding 0 matches only the empty results
            # keep order, push banned ids after the allowed ones, then cut
            order = np.argsort(banned, axis=1, kind="stable")
            ids, sim = np.take_along_axis(ids, order, 1), np.take_along_axis(sim, order, 1)
            banned = np.take_along_axis(banned, order, 1)
            ids, sim = np.where(banned, 0, ids), np.where(banned, -np.inf, sim)
        if ids.shape[1] < k:  # a catalog smaller than k
            pad = k - ids.shape[1]
            ids, sim = np.pad(ids, ((0, 0), (0, pad))), np.pad(sim, ((0, 0), (0, pad)), constant_values=-np.inf)
        return ids[:, :k], sim[:, :k]

    def search(self, user_vectors: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
        """Top-k item ids (R, k) per user vector, never an id in that row of ``exclude``."""
        return self.search_scored(user_vectors, k, exclude)[0]


def build_index(model: TwoTower, ds: Dataset) -> ItemIndex:
    return ItemIndex(ds.items["item_id"], item_vectors(model, item_table(ds, model.item_slots)[torch.from_numpy(ds.items["item_id"])]))


@torch.no_grad()
def _tower_vectors(model: TwoTower, tower: torch.nn.Module, packed: torch.Tensor, batch: int = 8192) -> np.ndarray:
    """``tower``'s first head (R, D) for packed rows (R, W), in batches on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([tower(packed[a : a + batch].to(device))[:, 0].cpu() for a in range(0, len(packed), batch)]).numpy()


def item_vectors(model: TwoTower, packed: torch.Tensor) -> np.ndarray:
    """The item tower's vector (R, D) of every packed item row (R, Wi)."""
    return _tower_vectors(model, model.item, packed)


def user_vectors(model: TwoTower, lists: ListBatch) -> np.ndarray:
    """The user tower's vector of every request of ``lists``: (R, D)."""
    return _tower_vectors(model, model.user, torch.from_numpy(pack_user(lists, model.user_slots)))


class TowerRetriever:
    """The recall stage with a torch recall tower: its user vector searched against a faiss
    index of its item vectors for the whole catalog, the request's history excluded."""

    def __init__(self, model: TwoTower, ds: Dataset):
        self.model = model
        self.index = build_index(model, ds)

    def __call__(self, requests: ListBatch, n: int) -> tuple[np.ndarray, np.ndarray]:
        """requests (B, ...) -> item ids (B, n) best first (0 = none) and their scores (B, n)."""
        return self.index.search_scored(user_vectors(self.model, requests), n, exclude=requests.history)


EVAL_REQUESTS = 4096  # requests evaluate_recall retrieves at once: its (R, k + history) arrays stay bounded


@torch.no_grad()
def evaluate_recall(model: TwoTower, ds: Dataset, split: str, ks: tuple[int, ...] = (50, 200)) -> dict[str, float]:
    """Recall@k of the catalog retrieval against each request's logged positives, the
    request's history excluded from what may be retrieved: a mean over the requests with a
    positive, retrieved ``EVAL_REQUESTS`` at a time (the parts' sums add up to the mean)."""
    lists = build_lists(positives_only(ds), split)  # the positives are all it reads
    retriever = TowerRetriever(model, ds)
    sums, defined = dict.fromkeys(ks, 0.0), 0
    for a in range(0, len(lists), EVAL_REQUESTS):
        part = lists.take(slice(a, a + EVAL_REQUESTS))
        retrieved, _ = retriever(part, max(ks))
        positives = part.positive_ids
        rows = int((positives > 0).any(axis=1).sum())
        if rows:
            defined += rows
            for k in ks:
                sums[k] += M.retrieval_recall(retrieved[:, :k], positives) * rows
    return {f"recall@{k}": sums[k] / defined if defined else float("nan") for k in ks}


def recall_output(ds: Dataset, model: TwoTower, n: int, keep_positives: bool = False, catalog_negatives: int = 0, seed: int | tuple[int, ...] = 0, retriever: TowerRetriever | None = None) -> Dataset:
    """The logs with each request's candidates replaced by the frozen recall output: the recall
    tower's top-n of the catalog (faiss, history excluded). A retrieved item the request logged
    keeps its logged stage and label; any other is stage 0, label 0 (unexposed: a negative, as
    in RankFlow). Logged items recall missed are gone, as in a real cascade, unless
    ``keep_positives``: then its missed positives are added (RankFlow's self-learning sees every
    positive of the split beside the stage's own negatives). ``catalog_negatives``: that many
    uniform draws from the catalog per request are added as label-0 items (duplicates and the
    request's logged positives dropped): recall's own candidate space is the whole catalog, not
    its top-n. Every split. ``retriever``: ``model``'s index when the caller built it already
    (a streamed cascade retrieves a row group of the logs at a time from one index)."""
    lists = build_lists(ds, max_items=0)  # the requests alone (user fields, history): no copy of the logged lists
    retrieved, _ = (retriever or TowerRetriever(model, ds))(lists, n)  # (R, n), best first
    logged = ds.candidates
    extra = sorted(set(logged) - {"request_id", "item_id", "stage", "label"})
    if extra:
        raise ValueError(f"candidates field '{extra[0]}' is stored per logged sample and has no value for a retrieved item")
    rid, iid = np.repeat(lists.request_id, n), retrieved.ravel()
    keep = iid > 0  # faiss pads with id 0 when the catalog runs out
    rid, iid = rid[keep], iid[keep]
    key = lambda r, i: r.astype(np.int64) * (int(ds.items["item_id"].max()) + 1) + i  # noqa: E731
    logged_keys = key(logged["request_id"], logged["item_id"])
    order = np.argsort(logged_keys)
    pos = np.clip(np.searchsorted(logged_keys[order], key(rid, iid)), 0, len(order) - 1)
    hit = logged_keys[order][pos] == key(rid, iid)
    row = order[pos]
    stage = np.where(hit, logged["stage"][row], 0).astype(logged["stage"].dtype)
    label = np.where(hit, logged["label"][row], 0).astype(logged["label"].dtype)
    positive = logged["label"] > 0
    if keep_positives:
        missed = np.flatnonzero(positive & ~np.isin(logged_keys, key(rid, iid)))
        rid, iid = np.concatenate([rid, logged["request_id"][missed]]), np.concatenate([iid, logged["item_id"][missed]])
        stage, label = np.concatenate([stage, logged["stage"][missed]]), np.concatenate([label, logged["label"][missed]])
    if catalog_negatives:
        draw_r = np.repeat(lists.request_id, catalog_negatives)
        draw_i = np.random.default_rng(seed).choice(ds.items["item_id"], size=len(draw_r))
        drawn = key(draw_r, draw_i)
        first = np.zeros(len(drawn), bool)
        first[np.unique(drawn, return_index=True)[1]] = True
        new = np.flatnonzero(first & ~np.isin(drawn, key(rid, iid)) & ~np.isin(drawn, logged_keys[positive]))
        rid, iid = np.concatenate([rid, draw_r[new]]), np.concatenate([iid, draw_i[new]])
        stage, label = np.concatenate([stage, np.zeros(len(new), stage.dtype)]), np.concatenate([label, np.zeros(len(new), label.dtype)])
    return replace(ds, candidates={"request_id": rid, "item_id": iid, "stage": stage, "label": label})
