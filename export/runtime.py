"""Serving a bundle: onnxruntime, cached item vectors, LightGBM and faiss as the scorers of the
one ``Cascade``, and ``CascadeService``, which checks each request and serves it.

A request is a JSON object: the user's fields by name (ids as in the schema; a multi-valued one
as a list), ``history`` (item ids, oldest first, most recent last), optionally ``k`` (how many
to return, at most the rank quota) and ``ts`` (seconds, the time the online features are read
at; the server's clock without one). A missing field or an id outside 1..vocab is the unknown id
0 and is counted; a history longer than the schema's is cut to its most recent events and
counted; anything else wrong (a key the schema does not have, a string where an id belongs, a
nested list) raises ``RequestError`` naming the field, before any model runs.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import lightgbm as lgb
import numpy as np
from threadpoolctl import threadpool_limits

from cascade.cascade import Cascade, Catalog, Stage, StageOutput, requests_batch
from cascade.data.lists import ListBatch
from cascade.data.schema import SCHEMA_FILE, Schema
from cascade.data.trend import ItemTrend
from cascade.recall import ItemIndex
from cascade.towers.embedding import Slot
from export.bundle import CATALOG, MANIFEST, BundleError, set_search, sha256, verify_bundle
from export.online import EventError, EventStore, FUTURE_SLACK, Journal, OnlineFeatures, parse_ts
from export.onnx import flat_items, item_inputs, session, user_inputs
from teachers.gbdt import GBDTConfig, GBDTTeacher


CANDIDATES_PER_CALL = 4096


def _slots(entries: list[dict[str, Any]]) -> tuple[Slot, ...]:
    return tuple(Slot(e["name"], 0, int(e["width"]), e["name"]) for e in entries)


class OnnxRetriever:
    """Recall: the ONNX user tower, then a faiss search over the catalog, history excluded."""

    def __init__(self, root: Path, stage: dict, threads: int = 1):
        self.user = session(root / "recall" / "user.onnx", threads)
        self.slots = _slots(stage["user_inputs"])
        # read whole: faiss can memory-map an IVF index's lists (IO_FLAG_MMAP), but searching them
        # through its OnDiskInvertedLists took 5.9 ms a query against 0.67 (100k items, nprobe 128)
        index = set_search(faiss.read_index(str(root / "recall" / "index.faiss")), stage["index"]["search"])
        self.index = ItemIndex(np.load(root / "recall" / "item_ids.npy", mmap_mode="r"), index=index)

    def __call__(self, requests: ListBatch, n: int) -> tuple[np.ndarray, np.ndarray]:
        u = self.user.run(None, user_inputs(requests, self.slots))[0][:, 0]
        return self.index.search_scored(u, n, exclude=requests.history)


class TwoTowerScorer:
    """Pre-rank: the ONNX user tower once per request against the cached item side; the score
    is a scaled dot, or the exported score head (MaxSim). An item tower that reads an online
    feature (the trend) has no cache: it runs on the candidates (``item_vectors: "live"``)."""

    def __init__(self, root: Path, stage: dict, threads: int = 1):
        self.user = session(root / "prerank" / "user.onnx", threads)
        self.slots = _slots(stage["user_inputs"])
        self.live = stage["item_vectors"] == "live"
        if self.live:
            self.item = session(root / "prerank" / stage["item_file"], threads)
            self.item_slots = _slots(stage["item_inputs"])
        else:
            self.items = np.load(root / "prerank" / "items.npy", mmap_mode="r")  # (max id + 1, Hv, D), shared by --workers
            self.flat = np.ascontiguousarray(self.items.reshape(len(self.items), -1))  # (max id + 1, Hv * D)
        score = stage["score"]
        self.scale = score.get("scale")
        self.head = session(root / "prerank" / score["file"], threads) if score["kind"] == "graph" else None

    def score_vectors(self, u: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """u (B, Hu, D) against the cached items ``ids`` (B, N) -> (B, N)."""
        b, n = ids.shape
        hv, d = self.items.shape[1:]
        if self.head is None and hv == 1 and 4 * n >= len(self.flat):
            # the candidates are most of the catalog: one contiguous pass over it, then pick
            # (gathering the rows first costs more than the arithmetic it saves)
            every = self.flat @ u[:, 0].T  # (max id + 1, B)
            return every[ids, np.arange(b)[:, None]] * np.float32(self.scale)
        return self.score(u, np.take(self.flat, ids.ravel(), axis=0).reshape(b, n, hv, d))  # take: ~3x a fancy index here

    def score(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """u (B, Hu, D), v (B, N, Hv, D) -> (B, N)."""
        if self.head is not None:
            return self.head.run(None, {"u": u, "v": v})[0]
        if v.shape[2] == 1:  # one head: a batched matrix-vector product
            return np.matmul(v[:, :, 0], u[:, 0, :, None])[..., 0] * np.float32(self.scale)
        return np.einsum("bhd,bnhd->bn", u, v) * np.float32(self.scale)

    def __call__(self, lists: ListBatch) -> np.ndarray:
        u = self.user.run(None, user_inputs(lists, self.slots))[0]
        if not self.live:
            return self.score_vectors(u, lists.item["item_id"])
        b, n = lists.mask.shape
        v = self.item.run(None, flat_items(item_inputs(lists, self.item_slots)))[0]  # (B * N, Hv, D)
        return self.score(u, v.reshape(b, n, *v.shape[1:]))


class OnnxRankScorer:
    """A whole ONNX model over the user's fields and the candidates' fields: the rank stage (DIN),
    or a pre-ranker that is no two-tower (COLD)."""

    def __init__(self, root: Path, stage: dict, threads: int = 1):
        self.model = session(root / stage["name"] / "model.onnx", threads)
        self.user_slots, self.item_slots = _slots(stage["user_inputs"]), _slots(stage["item_inputs"])
        self.list_dependent = stage.get("list_dependent", False)  # a blend: standardised per list

    def __call__(self, lists: ListBatch) -> np.ndarray:
        # a few thousand candidates a call: DIN's attention holds (B, N, L, hidden) floats, 6 GB
        # for a whole test split of 2,000 x 200 candidates
        step = max(1, CANDIDATES_PER_CALL // max(lists.list_size, 1))
        parts = [self.model.run(None, user_inputs(part, self.user_slots) | item_inputs(part, self.item_slots))[0] for part in lists.batches(step)]
        return np.concatenate(parts) if parts else np.zeros(lists.mask.shape, np.float32)


def prerank_scorer(root: Path, stage: dict, threads: int) -> "TwoTowerScorer | OnnxRankScorer":
    return TwoTowerScorer(root, stage, threads) if stage["kind"] == "two_tower" else OnnxRankScorer(root, stage, threads)


class BoosterScorer:
    """Rank: a LightGBM model file, scored by LightGBM's Booster over the ranker's features."""

    def __init__(self, root: Path, stage: dict, schema: Schema, catalog: Catalog):
        params = dict(stage.get("params", {}))
        drop = tuple(params.pop("drop_fields", ()))
        self.teacher = GBDTTeacher(schema.features, catalog.rows(), GBDTConfig(**params), drop)
        self.teacher.booster = lgb.Booster(model_file=str(root / "rank" / "model.txt"))

    def __call__(self, lists: ListBatch) -> np.ndarray:
        return self.teacher.score(lists)


def survivors(stage: StageOutput, row: int) -> list[int]:
    """The items ``stage`` passed on for request ``row``, best first (ties to the earlier)."""
    ids, scores, kept = stage.lists.item["item_id"][row], stage.scores[row], stage.kept[row]
    order = np.argsort(-scores[kept], kind="stable")
    return ids[kept][order].tolist()


class RequestError(ValueError):
    """A request the service refuses, naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class ParsedRequest:
    """A checked request: user field ids, history (history_max,), k, what was counted (unknown
    ids, a cut history), its ts and whether each stage's survivors go back (``trace``)."""

    user: dict[str, Any]
    history: np.ndarray
    k: int
    counts: Counter
    ts: int
    trace: bool


class CascadeService:
    """A verified bundle as a cascade: ``recommend(request)`` and ``recommend_batch(requests)``."""

    def __init__(self, bundle: str | Path, threads: int = 1, journal: Journal | None = None, online: EventStore | None = None):
        """``threads``: per onnxruntime session, and the BLAS pool numpy uses for the scores (set
        for the whole process: left at the core count, a matrix-vector product of 10k cached items
        wakes every core and waits for them, 8 ms at p50 against 0.15 ms on one). ``journal``:
        where the online features' events are kept (``export.online``; None: in memory only).
        ``online``: the live counters of the bundle this one replaces (a reload), shared when both
        count the same events on the same snapshot; ``BundleError`` when they do not."""
        threadpool_limits(threads, user_api="blas")
        root = Path(bundle)
        self.root = root
        self.manifest = verify_bundle(root)
        self.sha256 = sha256(root / MANIFEST)  # the bundle's identity (/health, /metrics)
        self.schema = Schema.from_json((root / SCHEMA_FILE).read_text())
        with np.load(root / CATALOG) as z:
            ids, fields = z["item_id"], {k: z[k] for k in z.files}
        self.online: EventStore | None = None
        if self.manifest.get("online"):
            definition = OnlineFeatures.from_json(self.manifest["online"])
            known = np.zeros(int(ids.max(initial=0)) + 1, bool)
            known[ids] = True
            # a journal's events count on top of the snapshot they were posted to: bundles that
            # share the definition and the snapshot (a retrained model) share a journal
            state = json.dumps({"online": self.manifest["online"], "events": self.manifest["files"][self.manifest["online"]["events"]]}, sort_keys=True)
            identity = hashlib.sha256(state.encode()).hexdigest()
            if online is not None and online.identity != identity:
                raise BundleError(f"{root}: its online features (definition or snapshot of events) differ from the bundle served, whose counters it would have to start again; serve it as a new server (a fresh --state)")
            self.online = online or EventStore(definition, np.load(root / self.manifest["online"]["events"]), known, journal, identity)
            self.catalog = Catalog(ids, fields, self.online, definition.trend)
        else:
            if online is not None:
                raise BundleError(f"{root}: its stages read no online feature, unlike the bundle served; serve it as a new server")
            self.catalog = Catalog(ids, fields)
        self.owns_online = online is None
        stages = {s["name"]: s for s in self.manifest["stages"]}
        rank = stages["rank"]
        ranker = BoosterScorer(root, rank, self.schema, self.catalog) if rank["kind"] == "lightgbm" else OnnxRankScorer(root, rank, threads)
        self.cascade = Cascade(
            [Stage("prerank", prerank_scorer(root, stages["prerank"], threads), stages["prerank"]["quota"]), Stage("rank", ranker, rank["quota"])],
            OnnxRetriever(root, stages["recall"], threads),
            stages["recall"]["quota"],
            self.catalog,
        )
        self.user_fields = {f.name: f for f in self.schema.features.in_table("users")}
        self.history_max = self.schema.history_max
        self.item_vocab = self.schema.features["item_id"].vocab
        self.k = rank["quota"]
        self.counts: Counter[str] = Counter()  # unknown ids per field, truncated histories
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ requests

    def _ids(self, name: str, value: Any, vocab: int, width: int | None, counts: Counter) -> np.ndarray:
        """One field's value as int64 ids (a scalar, or ``width`` columns 0-padded)."""
        if width is None:
            if not _is_id(value):
                raise RequestError(name, f"expected an integer id, got {json.dumps(value)[:60]}")
            values = [value]
        else:
            if not isinstance(value, list) or not all(_is_id(x) for x in value):
                raise RequestError(name, f"expected a list of integer ids, got {json.dumps(value)[:60]}")
            if len(value) > width:
                raise RequestError(name, f"has {len(value)} values, at most {width}")
            values = value + [0] * (width - len(value))
        given = values[: 1 if width is None else len(value)]
        unknown = sum(1 for x in given if not 0 < x <= vocab)
        if unknown:
            counts[f"unknown_{name}"] += unknown
        ids = np.array([x if 0 < x <= vocab else 0 for x in values], dtype=np.int64)
        return ids if width is not None else ids[0]

    def parse(self, request: Any, now: float | None = None) -> "ParsedRequest":
        """A request object, checked (its ts ``now``, the server's clock, without one)."""
        if not isinstance(request, dict):
            raise RequestError("request", "expected a JSON object of user fields, 'history' and optionally 'k' and 'ts'")
        now = time.time() if now is None else now
        known = set(self.user_fields) | {"history", "k", "ts", "trace"}
        unknown = sorted(set(request) - known)
        if unknown:
            raise RequestError(str(unknown[0]), f"unknown field (known: {', '.join(sorted(known))})")
        counts: Counter[str] = Counter()
        user = {}
        for name, f in self.user_fields.items():
            if name not in request:
                counts[f"missing_{name}"] += 1
                user[name] = np.zeros(f.max_len, np.int64) if f.multi else np.int64(0)
            else:
                user[name] = self._ids(name, request[name], f.vocab, f.max_len if f.multi else None, counts)
        history = request.get("history", [])
        if not isinstance(history, list) or not all(_is_id(x) for x in history):
            raise RequestError("history", f"expected a list of integer item ids, got {json.dumps(history)[:60]}")
        if len(history) > self.history_max:
            counts["truncated_history"] += 1
            history = history[-self.history_max :]  # the most recent events
        hist = self._ids("history", list(history), self.item_vocab, self.history_max, counts)
        k = request.get("k", self.k)
        if not _is_id(k) or not 1 <= k <= self.k:
            raise RequestError("k", f"expected an integer in 1..{self.k}, got {json.dumps(k)[:60]}")
        try:
            ts = parse_ts(request["ts"], "ts", now + FUTURE_SLACK) if "ts" in request else int(now)
        except EventError as e:
            raise RequestError(e.field, e.message) from None
        if not isinstance(request.get("trace", False), bool):
            raise RequestError("trace", f"expected true or false, got {json.dumps(request['trace'])[:60]}")
        return ParsedRequest(user, hist, k, counts, ts, request.get("trace", False))

    # ------------------------------------------------------------------ serving

    def contract(self) -> dict[str, Any]:
        """What a request may hold (``GET /health``): each user field with its vocabulary (ids
        1..vocab; others are counted as unknown and read as 0) and width, the history's length,
        ``k``'s range, ``ts`` and ``trace``."""
        fields = {name: {"type": "list of ids" if f.multi else "id", "vocab": f.vocab} | ({"max_len": f.max_len} if f.multi else {}) for name, f in self.user_fields.items()}
        return {
            "fields": fields | {"history": {"type": "list of item ids, oldest first", "vocab": self.item_vocab, "max_len": self.history_max, "longer": "the most recent kept, counted"}},
            "k": {"min": 1, "max": self.k, "default": self.k},
            "ts": "seconds since the epoch, at most a day ahead of the server's clock; the server's clock without one",
            "trace": "true: each stage's survivors go back too",
            "missing fields": "read as 0 and counted",
        }

    def parse_batch(self, requests: Any) -> list[ParsedRequest]:
        """``{"requests": [...]}``'s list, each request checked (one bad request refuses the
        batch, naming it: ``requests[i].field``)."""
        if not isinstance(requests, list) or not requests:
            raise RequestError("requests", "expected a non-empty list of request objects")
        parsed, now = [], time.time()
        for i, r in enumerate(requests):
            try:
                parsed.append(self.parse(r, now))
            except RequestError as e:
                raise RequestError(f"requests[{i}].{e.field}", e.message) from None
        return parsed

    def recommend_batch(self, requests: list[Any]) -> list[dict[str, Any]]:
        """Serve several requests in one cascade run (each checked first; one bad request
        refuses the batch, naming it: ``requests[i].field``)."""
        return self.run_parsed(self.parse_batch(requests))

    def batch(self, parsed: list[ParsedRequest]) -> ListBatch:
        """Checked requests as the cascade's input: B requests with no candidates yet."""
        user = {}
        for name, f in self.user_fields.items():
            user[name] = np.stack([p.user[name] for p in parsed]) if f.multi else np.array([p.user[name] for p in parsed], np.int64)
        return requests_batch(user, np.stack([p.history for p in parsed]), ts=np.array([p.ts for p in parsed], np.int64))

    def run_parsed(self, parsed: list[ParsedRequest]) -> list[dict[str, Any]]:
        """Checked requests through the cascade as one batch, a result per request."""
        start = time.perf_counter()
        batch = self.batch(parsed)
        if self.online is not None:
            self.online.sync()  # what other processes journalled since
        out = self.cascade.run(batch)
        total = time.perf_counter() - start
        timings = {name: round(s * 1000, 3) for name, s in out.seconds.items()} | {"total": round(total * 1000, 3)}
        with self._lock:
            for p in parsed:
                self.counts.update(p.counts)
        results = []
        for row, p in enumerate(parsed):
            keep = out.items[row, : p.k] > 0
            results.append({"items": out.items[row, : p.k][keep].tolist(), "scores": [round(float(s), 6) for s in out.scores[row, : p.k][keep]], "timings_ms": timings, "counted": dict(p.counts)})
            if p.trace:
                results[-1]["stages"] = {s.name: survivors(s, row) for s in out.stages}
        return results

    def ingest(self, payload: Any) -> int:
        """``{"events": [...]}`` -> the number of events, durable once this returns;
        ``RequestError`` naming the bad field (nothing is written then)."""
        if self.online is None:
            raise RequestError("events", "this bundle's stages read no online feature, so it takes no events")
        try:
            keys = self.online.parse_events(payload)
        except EventError as e:
            raise RequestError(e.field, e.message) from None
        self.online.append(keys)
        return len(keys)

    def close(self) -> None:
        if self.online is not None and self.owns_online:
            self.online.close()

    def catch_up(self, logged: ItemTrend) -> int:
        """Take the logged exposures the bundle's snapshot lacks (from its ``events_until`` on),
        as a replay of the logs posts them: what serving the logged test requests offline needs.
        A counter's window ends strictly before each request's ts, so later events change
        nothing. Returns the events taken."""
        if self.online is None:
            return 0
        keys = logged.keys[logged.ts >= self.online.definition.events_until]
        self.online.append(keys)
        return len(keys)

    def features(self, item_id: Any, ts: Any) -> dict[str, Any]:
        """One item's online counters at ``ts`` (``GET /features``)."""
        if self.online is None:
            raise RequestError("item_id", "this bundle's stages read no online feature")
        if not _is_id(item_id) or not 0 < item_id < len(self.online.item_known) or not self.online.item_known[item_id]:
            raise RequestError("item_id", f"unknown item {json.dumps(item_id)[:40]}")
        try:
            when = parse_ts(ts, "ts", time.time() + FUTURE_SLACK) if ts is not None else int(time.time())
        except EventError as e:
            raise RequestError(e.field, e.message) from None
        return self.online.features(item_id, when)

    def recommend(self, request: Any) -> dict[str, Any]:
        """recall top-N (history excluded) -> pre-rank -> rank -> the top-k items, best first,
        with their scores, per-stage milliseconds and what was counted (unknown ids, a cut
        history)."""
        try:
            return self.recommend_batch([request])[0]
        except RequestError as e:
            raise RequestError(e.field.removeprefix("requests[0]."), e.message) from None
