"""A synthetic cascade world: logs in the cascade schema plus the hidden truth that scores them.

The truth. Every item has a category, a latent vector ``v``, a style vector ``w`` (unit length)
and a popularity bias ``b``; every user a category taste and a latent vector ``u``. For a
request r of user u and an item i the true click probability is

    p(r, i) = sigmoid(c0 + c_aff <u, v_i> + c_pop b_i + c_ta max_{h in last T of history(r)} <w_h, w_i>)

The last, target-attention term asks how strongly the target resembles what this request's
user consumed most recently: a max over the history, which a two-tower model (one user vector
from the pooled history, dotted with one item vector) cannot represent exactly and a DIN-style
ranker can.

Histories are organic consumption streams that follow each user's taste: a category chain that
stays put with probability ``stay`` and otherwise redraws from the taste, items drawn within the
category by popularity.

The logged cascade. Per request a production system with imperfect models recalls ``quotas[0]``
items of the catalog (noisy affinity + popularity, the history excluded), pre-ranks them to
``quotas[1]`` (the truth without its target-attention term, plus noise), ranks to ``quotas[2]``
(the full truth plus less noise) and exposes the first ``quotas[3]``; clicks on exposed items
are drawn from the truth. Every recalled item is logged with the last stage it survived.

``World`` is the oracle: true click probability of any (request, item) pairs and the best
achievable top-k of the whole catalog. Same config and seed, same bytes.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cascade.data.history import last_before
from cascade.data.schema import QUOTA_NAMES, Schema
from cascade.data.store import Dataset
from cascade.features import Field, FeatureSpec

WORLD_FILE = "world.npz"
DAY = 86_400


@dataclass(frozen=True)
class WorldConfig:
    users: int = 2000
    items: int = 5000
    requests: int = 20000
    categories: int = 20
    dim: int = 16
    style_dim: int = 8
    style_noise: float = 0.6  # spread of an item's style around its category's: lower, categories further apart
    taste_alpha: float = 0.3  # Dirichlet concentration of a user's category taste: higher, more interests
    substyles: int = 0  # per category: styles within it, observable as the item field 'style' (0: none)
    substyle_spread: float = 0.3  # per style dimension, as style_noise: the spread of a category's substyle centres around its own
    history_max: int = 50
    ta_window: int = 10  # the target-attention term looks at this many most recent items
    quotas: tuple[int, int, int, int] = (200, 50, 10, 5)
    stay: float = 0.7  # probability that the next consumed item keeps the current category
    days: int = 60
    seed: int = 0
    # true click logit coefficients
    c0: float = -5.5
    c_aff: float = 1.0
    c_pop: float = 0.5
    c_ta: float = 2.5
    # noise of the logged production models (std of the added logit noise)
    recall_noise: float = 1.0
    prerank_noise: float = 1.0
    rank_noise: float = 0.5

    def __post_init__(self) -> None:
        q = self.quotas
        if not all(a > b > 0 for a, b in zip(q, q[1:])) or q[-1] < 1:
            raise ValueError(f"quotas must strictly decrease and stay positive, got {q}")
        if q[0] > self.items - self.history_max:
            raise ValueError(f"recall quota {q[0]} needs more than {self.items} items (history excluded)")
        if min(self.users, self.items, self.requests, self.categories) < 1:
            raise ValueError("users, items, requests and categories must be positive")


TARGET_ATTENTION_KNOB = "target_attention"  # data.synth's key for target_attention_world's knob


# target_attention_world's two ends: knob 0 and knob 1; a knob in between interpolates each
TA_LOW = dict(stay=0.9, taste_alpha=0.1, ta_window=10, style_dim=8, style_noise=0.6, substyles=8, c_ta=1.5, c_aff=1.0, c0=-5.5)
TA_HIGH = dict(stay=0.1, taste_alpha=1.0, ta_window=20, style_dim=32, style_noise=0.05, substyles=8, c_ta=6.0, c_aff=0.5, c0=-7.0)
TA_WHOLE = ("ta_window", "style_dim", "substyles")  # interpolated, then rounded


def target_attention_world(knob: float, **overrides) -> WorldConfig:
    """A world on one knob from 0 to 1: how much a ranker loses that scores a candidate against
    one user vector rather than against each recent history item (``World.oracle_ratios``).

    At 0 (``TA_LOW``) a user keeps to one interest (a stream that stays in its category with
    probability 0.9, a taste concentrated on few categories: Dirichlet 0.1) and the
    target-attention term is weak (``c_ta`` 1.5): one user vector is enough. At 1 (``TA_HIGH``)
    interests interleave (``stay`` 0.1, Dirichlet 1.0), the window holds the last 20 items, an
    item's style is its substyle's (8 per category, the observable field ``style``; ``style_dim``
    32, ``style_noise`` 0.05) and the term weighs more than affinity (``c_ta`` 6.0, ``c_aff``
    0.5, ``c0`` -7.0): the target matches one of some 20 substyles of the window, which a single
    vector averages and a ranker must find by comparing the target with each history item. (The
    logged ranker exposes those matches first, so half the exposures there are clicked, against
    a fifth at knob 0: ``benchmarks/results/ta_worlds.md``.) Every setting in between is the straight line
    between the two (the window, style width and substyles rounded); ``overrides`` set any other
    ``WorldConfig`` key."""
    k = float(knob)
    if not 0.0 <= k <= 1.0:
        raise ValueError(f"{TARGET_ATTENTION_KNOB}: expected a number from 0 to 1, got {knob!r}")
    settings = {name: (1 - k) * TA_LOW[name] + k * TA_HIGH[name] for name in TA_LOW}  # exact at both ends
    settings.update({name: int(round(settings[name])) for name in TA_WHOLE})
    return WorldConfig(**{**settings, **overrides})


def world_config(synth: dict) -> WorldConfig:
    """``data.synth`` as a ``WorldConfig``: its keys, or ``target_attention: KNOB`` with any
    other key overriding what the knob sets."""
    rest = {k: v for k, v in synth.items() if k != TARGET_ATTENTION_KNOB}
    if TARGET_ATTENTION_KNOB in synth:
        return target_attention_world(synth[TARGET_ATTENTION_KNOB], **rest)
    return WorldConfig(**rest)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _marked(ids: np.ndarray, width: int) -> np.ndarray:
    """ids (B, L) 1-based, 0 = none -> (B, width) bool, True in each id's column."""
    out = np.zeros((len(ids), width), dtype=bool)
    rows = np.repeat(np.arange(len(ids)), ids.shape[1])
    keep = ids.ravel() > 0
    out[rows[keep], ids.ravel()[keep] - 1] = True
    return out


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k highest scores, best first. (B, N) -> (B, k)."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


@dataclass
class World:
    """The hidden truth of a synthetic world, indexed by 1-based user, item and request ids."""

    user_vec: np.ndarray  # (U, D)
    item_vec: np.ndarray  # (I, D)
    item_style: np.ndarray  # (I, S), unit rows
    item_bias: np.ndarray  # (I,)
    coef: np.ndarray  # (4,) c0, c_aff, c_pop, c_ta
    request_user: np.ndarray  # (R,) user id of each request id 1..R
    request_history: np.ndarray  # (R, L) item ids, most recent last, 0-padded after

    def terms(self, request_ids: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The two parts of the true logit, request_ids (B,), item_ids (B, N) or (N,) shared by
        every request (the catalog: matrix products, no per-request gather) -> (B, N) each: the
        two-tower part ``c0 + c_aff <u, v> + c_pop b`` and the target-attention part."""
        r = np.asarray(request_ids) - 1
        items = np.asarray(item_ids)
        it = np.maximum(items, 1) - 1
        u = self.user_vec[self.request_user[r] - 1]  # (B, D)
        hist = self.request_history[r]  # (B, T)
        if items.ndim == 1:
            aff = u @ self.item_vec[it].T
            sim = self.item_style[np.maximum(hist, 1) - 1] @ self.item_style[it].T  # (B, T, N)
        else:
            aff = np.einsum("bd,bnd->bn", u, self.item_vec[it])
            sim = np.einsum("bts,bns->btn", self.item_style[np.maximum(hist, 1) - 1], self.item_style[it])
        sim[np.broadcast_to((hist <= 0)[:, :, None], sim.shape)] = -np.inf
        sim = sim.max(axis=1)
        ta = np.where(np.isfinite(sim), sim, 0.0)  # an empty history attends to nothing
        c0, c_aff, c_pop, c_ta = self.coef
        return c0 + c_aff * aff + c_pop * self.item_bias[it], c_ta * ta

    def true_logit(self, request_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """request_ids (B,), item_ids (B, N) -> (B, N) true click logits; -inf for item id 0."""
        two_tower, ta = self.terms(request_ids, item_ids)
        return np.where(np.asarray(item_ids) > 0, two_tower + ta, -np.inf)

    def click_prob(self, request_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """True click probability, request_ids (B,), item_ids (B, N) -> (B, N); 0 for id 0."""
        return _sigmoid(self.true_logit(request_ids, item_ids))

    def best_topk(self, request_ids: np.ndarray, k: int, exclude: np.ndarray | None = None, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """The k items of the whole catalog with the highest true click probability per request.

        exclude (B, L) item ids that may not be shown (e.g. the request's history; 0 = none).
        Returns item ids (B, k) and their probabilities (B, k), best first.
        """
        request_ids = np.asarray(request_ids)
        n_items = len(self.item_bias)
        all_items = np.arange(1, n_items + 1)
        ids, probs = [], []
        for a in range(0, len(request_ids), chunk):
            r = request_ids[a : a + chunk]
            logit = self.true_logit(r, all_items)  # (B, n_items), a fresh array
            if exclude is not None:
                logit[_marked(exclude[a : a + chunk], n_items)] = -np.inf
            top = _top(logit, k)
            ids.append(top + 1)
            probs.append(_sigmoid(np.take_along_axis(logit, top, 1)))
        return np.concatenate(ids), np.concatenate(probs)

    def _window_centres(self, request_ids: np.ndarray) -> np.ndarray:
        """(B, S): the normalised mean style of each request's target-attention window (0 when empty)."""
        hist = self.request_history[np.asarray(request_ids) - 1]
        centre = np.where((hist > 0)[:, :, None], self.item_style[np.maximum(hist, 1) - 1], 0.0).sum(axis=1)
        norm = np.linalg.norm(centre, axis=1, keepdims=True)
        return np.divide(centre, norm, out=np.zeros_like(centre), where=norm > 0)

    def oracle_ratios(self, request_ids: np.ndarray, k: int = 10, exclude: np.ndarray | None = None, candidates: np.ndarray | None = None, chunk: int = 256) -> dict[str, float]:
        """What a ranker keeps of the best achievable top-k utility (the sum of true click
        probabilities over the catalog minus ``exclude`` (B, L): the catalog's best top-k = 1)
        when it ranks the whole catalog, or only each request's ``candidates`` (B, N) item ids
        (0 = padding), by:

        - ``truth``: the true logit (1 over the catalog; less within lists that miss the best);
        - ``no_target_attention``: the two-tower part of the truth alone;
        - ``one_user_vector``: the target-attention term replaced by its least-squares fit on one
          vector per request, the normalised mean style of its window (``a + b <centre, w_i>``,
          fitted over the same requests and items): what a two-tower model keeps if it learns the
          term as well as one vector allows.

        ``truth`` minus ``one_user_vector`` is the headroom an interaction can win back."""
        request_ids = np.asarray(request_ids)
        n_items = len(self.item_bias)
        centres = self._window_centres(request_ids)

        def chunks():
            """Per chunk of requests: (its rows, the items ranked (B, N), the truth's two parts and
            x = <centre, w_i>, each (B, N)); computed again on each pass rather than held for all."""
            shared = np.arange(1, n_items + 1)
            for a in range(0, len(request_ids), chunk):
                part = slice(a, a + chunk)
                r = request_ids[part]
                if candidates is None:
                    two_tower, ta = self.terms(r, shared)
                    yield part, np.broadcast_to(shared, two_tower.shape), two_tower, ta, centres[part] @ self.item_style.T
                else:
                    items = np.asarray(candidates)[part]
                    two_tower, ta = self.terms(r, items)
                    yield part, items, two_tower, ta, np.einsum("bs,bns->bn", centres[part], self.item_style[np.maximum(items, 1) - 1])

        sums = np.zeros(5)  # n, sum x, sum y, sum xx, sum xy of (x = <centre, w_i>, y = the term)
        for _, items, _, ta, x in chunks():
            x, ta = x[items > 0], ta[items > 0]
            sums += [x.size, x.sum(), ta.sum(), (x * x).sum(), (x * ta).sum()]
        n, sx, sy, sxx, sxy = sums
        slope = (n * sxy - sx * sy) / max(n * sxx - sx * sx, 1e-12)
        kept = {"truth": 0.0, "no_target_attention": 0.0, "one_user_vector": 0.0}
        for part, items, two_tower, ta, x in chunks():
            truth = _sigmoid(two_tower + ta)
            out = items <= 0  # padding, and the excluded items of the catalog
            if exclude is not None and candidates is None:
                out = out | _marked(exclude[part], n_items)
            for name, v in (("truth", two_tower + ta), ("no_target_attention", two_tower), ("one_user_vector", two_tower + slope * x)):
                top = _top(np.where(out, -np.inf, v), k)
                kept[name] += float(np.where(np.take_along_axis(out, top, 1), 0.0, np.take_along_axis(truth, top, 1)).sum())
        # over the catalog the truth's own top-k is the best; within lists, the catalog's best is another pass
        best = kept["truth"] if candidates is None else float(self.best_topk(request_ids, k, exclude=exclude, chunk=chunk)[1].sum())
        return {name: value / best for name, value in kept.items()}

    def to_bytes(self) -> bytes:
        """An .npz whose bytes depend only on the arrays (fixed zip timestamps)."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, arr in asdict(self).items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w") as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
        return buf.getvalue()

    @staticmethod
    def load(directory: str | Path) -> "World":
        with np.load(Path(directory) / WORLD_FILE, allow_pickle=False) as z:
            return World(**{k: z[k] for k in z.files})


def _consumption(cfg: WorldConfig, rng: np.random.Generator, taste: np.ndarray, item_cat: np.ndarray, item_pop: np.ndarray, n_events: np.ndarray) -> np.ndarray:
    """Organic consumption streams: (sum n_events,) item ids (0-based), grouped by user, in order."""
    n_users, n_cat = taste.shape
    # items of each category, drawn by popularity: per-category cumulative distributions
    order = np.argsort(item_cat, kind="stable")
    cat_start = np.searchsorted(item_cat[order], np.arange(n_cat + 1))
    pop_sorted = item_pop[order]
    cum = np.cumsum(pop_sorted)
    base = np.concatenate(([0.0], cum))[cat_start]  # cumulative mass before each category
    mass = base[1:] - base[:-1]
    taste_cum = np.cumsum(taste, axis=1)

    offsets = np.concatenate(([0], np.cumsum(n_events)))
    out = np.empty(offsets[-1], dtype=np.int64)
    cat = (taste_cum < rng.random((n_users, 1))).sum(axis=1).clip(max=n_cat - 1)
    for t in range(int(n_events.max())):
        users = np.flatnonzero(n_events > t)
        redraw = rng.random(len(users)) > cfg.stay
        fresh = (taste_cum[users] < rng.random((len(users), 1))).sum(axis=1).clip(max=n_cat - 1)
        cat[users] = np.where(redraw, fresh, cat[users])
        c = cat[users]
        target = base[c] + rng.random(len(users)) * mass[c]
        pick = np.searchsorted(cum, target, side="right").clip(cat_start[c], cat_start[c + 1] - 1)
        out[offsets[users] + t] = order[pick]
    return out


def generate(cfg: WorldConfig = WorldConfig()) -> tuple[Dataset, World]:
    """Build the logs and the truth of one world."""
    rng = np.random.default_rng(cfg.seed)
    U, I, R, C, D = cfg.users, cfg.items, cfg.requests, cfg.categories, cfg.dim
    L, T = cfg.history_max, cfg.ta_window

    # --- items: Zipf-like category sizes, latent vectors around category centres
    cat_weight = 1.0 / np.sqrt(np.arange(1, C + 1))
    item_cat = rng.choice(C, size=I, p=cat_weight / cat_weight.sum())
    centre = rng.normal(size=(C, D)) / np.sqrt(D) * 1.5
    item_vec = centre[item_cat] + rng.normal(size=(I, D)) / np.sqrt(D) * 0.8
    style_centre = _normalise(rng.normal(size=(C, cfg.style_dim)))
    item_style = _normalise(style_centre[item_cat] + rng.normal(size=(I, cfg.style_dim)) * cfg.style_noise)
    if cfg.substyles:  # drawn from a stream of their own: a world without substyles keeps its bytes
        sub_rng = np.random.default_rng([cfg.seed, 1])
        item_sub = sub_rng.integers(0, cfg.substyles, size=I)
        sub_offset = sub_rng.normal(size=(C, cfg.substyles, cfg.style_dim)) * cfg.substyle_spread
        item_style = _normalise(style_centre[item_cat] + sub_offset[item_cat, item_sub] + sub_rng.normal(size=(I, cfg.style_dim)) * cfg.style_noise)
    item_bias = rng.normal(size=I)
    item_pop = np.exp(0.8 * item_bias)

    # --- users: sparse category tastes, latent vectors from the tastes
    taste = rng.dirichlet(np.full(C, cfg.taste_alpha), size=U)
    user_vec = taste @ centre * 1.5 + rng.normal(size=(U, D)) / np.sqrt(D) * 0.5
    activity = rng.lognormal(0.0, 0.8, size=U)
    req_user = rng.choice(U, size=R, p=activity / activity.sum())
    req_ts = np.sort(rng.integers(cfg.days * DAY // 4, cfg.days * DAY, size=R))
    req_user = req_user[np.argsort(rng.random(R))]  # users independent of time order

    # --- consumption streams, spread over the whole period, before the first request too
    per_user = np.bincount(req_user, minlength=U)
    n_events = L + 2 * per_user + rng.integers(0, L, size=U)
    events = _consumption(cfg, rng, taste, item_cat, item_pop, n_events)
    ev_user = np.repeat(np.arange(U), n_events)
    ev_ts = rng.integers(0, cfg.days * DAY, size=len(events))
    by = np.lexsort((ev_ts, ev_user))
    # the stream is a sequence: give its i-th event the user's i-th smallest time
    ev_ts = ev_ts[by]
    history, history_ts, hist_len = last_before(ev_user, ev_ts, events + 1, req_user, req_ts, L)
    # the target-attention window: the last T history items, padded after
    n_recent = np.minimum(hist_len, T)[:, None]
    recent_pos = np.clip(hist_len[:, None] - n_recent + np.arange(T), 0, L - 1)
    recent = np.where(np.arange(T) < n_recent, np.take_along_axis(history, recent_pos, 1), 0)

    world = World(
        user_vec=user_vec,
        item_vec=item_vec,
        item_style=item_style,
        item_bias=item_bias,
        coef=np.array([cfg.c0, cfg.c_aff, cfg.c_pop, cfg.c_ta]),
        request_user=req_user + 1,
        request_history=recent,
    )

    # --- the logged production cascade, in chunks of requests
    q_recall, q_pre, q_rank, q_exp = cfg.quotas
    cand_items = np.empty((R, q_recall), dtype=np.int64)
    cand_stage = np.empty((R, q_recall), dtype=np.int8)
    cand_label = np.zeros((R, q_recall), dtype=np.float32)
    chunk = 1024
    for a in range(0, R, chunk):
        b = min(R, a + chunk)
        rid = np.arange(a, b) + 1
        u = user_vec[req_user[a:b]] + rng.normal(size=(b - a, D)) / np.sqrt(D) * cfg.recall_noise
        recall_score = u @ item_vec.T + 0.5 * item_bias
        rows = np.repeat(np.arange(b - a), L)
        h = history[a:b].ravel()
        recall_score[rows[h > 0], h[h > 0] - 1] = -np.inf  # consumed items are not recalled
        recalled = _top(recall_score, q_recall) + 1  # (B, q_recall) item ids
        two_tower, ta = world.terms(rid, recalled)
        logit = two_tower + ta
        # the production pre-ranker is a two-tower model: it misses the target-attention term
        pre_score = two_tower + rng.normal(size=logit.shape) * cfg.prerank_noise
        pre_pos = _top(pre_score, q_pre)
        rank_score = np.full(logit.shape, -np.inf)
        rank_val = logit + rng.normal(size=logit.shape) * cfg.rank_noise
        np.put_along_axis(rank_score, pre_pos, np.take_along_axis(rank_val, pre_pos, 1), 1)
        rank_pos = _top(rank_score, q_rank)
        stage = np.zeros(logit.shape, dtype=np.int8)
        np.put_along_axis(stage, pre_pos, 1, 1)
        np.put_along_axis(stage, rank_pos, 2, 1)
        np.put_along_axis(stage, rank_pos[:, :q_exp], 3, 1)
        clicks = (rng.random(logit.shape) < _sigmoid(logit)) & (stage == 3)
        cand_items[a:b], cand_stage[a:b], cand_label[a:b] = recalled, stage, clicks

    n_test = R // 10
    split = np.full(R, "train", dtype="<U5")
    split[R - 2 * n_test : R - n_test] = "valid"
    split[R - n_test :] = "test"

    # --- observable features
    segment = np.where(rng.random(U) < 0.8, taste.argmax(axis=1), rng.integers(0, C, U)) + 1
    near = np.argsort(-(style_centre @ style_centre.T), axis=1)[:, 1:3]  # two closest categories
    tags = np.stack([item_cat, near[item_cat, 0], near[item_cat, 1]], axis=1) + 1
    tags[:, 1:] *= rng.random((I, 2)) < 0.5  # each related tag present half the time
    tags = np.take_along_axis(tags, np.argsort(tags == 0, axis=1, kind="stable"), 1)  # zeros last
    pop_band = np.searchsorted(np.quantile(item_bias, [0.2, 0.4, 0.6, 0.8]), item_bias) + 1

    style_field = (Field("style", "item", C * cfg.substyles),) if cfg.substyles else ()
    fields = FeatureSpec(
        (
            Field("user_id", "user", U),
            Field("segment", "user", C),
            Field("item_id", "item", I),
            Field("category", "item", C),
            Field("tags", "item", C, multi=True, max_len=3),
            Field("pop_band", "item", 5),
        )
        + style_field
    )
    style_ids = {"style": (item_cat * cfg.substyles + item_sub + 1).astype(np.int64)} if cfg.substyles else {}
    counts = {
        "users": U,
        "items": I,
        "requests": {s: int((split == s).sum()) for s in ("train", "valid", "test")},
        "candidates": int(R * q_recall),
        "exposed": int((cand_stage == 3).sum()),
        "clicks": int(cand_label.sum()),
    }
    schema = Schema(
        name="synthetic",
        features=fields,
        temporal=True,
        history_max=L,
        quotas=dict(zip(QUOTA_NAMES, cfg.quotas)),
        protocol={"name": "synthetic", "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}, "counts": counts},
    )
    ds = Dataset(
        schema=schema,
        users={"user_id": np.arange(1, U + 1), "segment": segment.astype(np.int64)},
        items={"item_id": np.arange(1, I + 1), "category": item_cat + 1, "tags": tags.astype(np.int64), "pop_band": pop_band.astype(np.int64), **style_ids},
        requests={
            "request_id": np.arange(1, R + 1),
            "user_id": req_user + 1,
            "ts": req_ts.astype(np.int64),
            "split": split,
            "history": history,
            "history_ts": history_ts.astype(np.int64),
            "history_len": hist_len,
        },
        candidates={
            "request_id": np.repeat(np.arange(1, R + 1), q_recall),
            "item_id": cand_items.ravel(),
            "stage": cand_stage.ravel(),
            "label": cand_label.ravel(),
        },
    )
    return ds, world
