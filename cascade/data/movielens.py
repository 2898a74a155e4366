"""MovieLens-1M (``users.dat``, ``movies.dat``, ``ratings.dat``) into the cascade log schema.

Two protocols:

``ctr`` (IntTower / HIT, without their leakage): rating 3 dropped, label = rating > 3, a seeded
random 80/20 train/test split of the samples and 20% of train as validation. One request per
(user, split) whose candidates are the user's samples in that split. History = the user's 50
most recent *training* positives; at batch time the target is taken out of it (or, when absent,
one other seeded item), so no label leaks through history length (``history_drops_target``).
Mean-rating features are computed from training rows only, out-of-fold for the training rows.

``cascade`` (temporal): a request is one user's ratings on one UTC day, its ts the first of them;
label = rating >= 4; history = up to 50 of the user's positives strictly before ts; validation
and test are the requests from the 80th to the 90th and after the 90th percentile of rating
time; ratings without a timestamp are set aside and counted.

An empty timestamp (``3001::1234::2::``) is read as unknown; the standard file, where every line
has one, reads the same way.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from cascade.data.history import last_before
from cascade.data.schema import EXPOSED, Schema
from cascade.data.store import DataError, Dataset, Problem, ProblemLog, duplicate_rows
from cascade.features import Field, FeatureSpec

HISTORY = 50
AGES = (1, 18, 25, 35, 45, 50, 56)
MEAN_BUCKETS = 20
OOF_FOLDS = 5
# Temporal windows must lie where every rating has its time (see shared/data/ml-1m/NOTE.md).
ALL_TIMED_FROM = 975_769_200  # 2000-12-02 15:00 UTC


def _read_dat(path: Path, names: list[str], types: dict[str, pa.DataType]) -> pa.Table:
    """Read a ``::``-separated file; errors name the file and line."""
    if not path.exists():
        raise DataError([Problem(path.name, None, None, None, f"file is missing (looked in {path.parent})")])
    text = path.read_bytes().decode("latin-1").replace("::", "\t").encode("utf-8")
    try:
        return pacsv.read_csv(
            io.BytesIO(text),
            read_options=pacsv.ReadOptions(column_names=names),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
        )
    except pa.ArrowInvalid as e:
        raise DataError([Problem(path.name, None, None, None, f"unreadable: {e}")]) from None


def read_movielens(src: str | Path) -> dict[str, np.ndarray]:
    """The three files as flat arrays; ``ts`` is -1 where the timestamp is empty."""
    src = Path(src)
    ratings = _read_dat(src / "ratings.dat", ["user", "movie", "rating", "ts"], {"user": pa.int64(), "movie": pa.int64(), "rating": pa.int64(), "ts": pa.int64()})
    users = _read_dat(src / "users.dat", ["user", "gender", "age", "occupation", "zip"], {"user": pa.int64(), "gender": pa.string(), "age": pa.int64(), "occupation": pa.int64(), "zip": pa.string()})
    movies = _read_dat(src / "movies.dat", ["movie", "title", "genres"], {"movie": pa.int64(), "title": pa.string(), "genres": pa.string()})
    log = ProblemLog()
    problems = log.problems
    for table, file in ((ratings, "ratings.dat"), (users, "users.dat"), (movies, "movies.dat")):
        for col in table.column_names:
            if col != "ts" and table.column(col).null_count:
                row = int(np.flatnonzero(table.column(col).is_null().to_numpy(zero_copy_only=False))[0])
                problems.append(Problem(file, col, row, None, "is empty", table.column(col).null_count))
    if problems:
        raise DataError(problems)
    out = {
        "user": ratings.column("user").to_numpy(),
        "movie": ratings.column("movie").to_numpy(),
        "rating": ratings.column("rating").to_numpy(),
        "ts": ratings.column("ts").fill_null(-1).to_numpy(),
        "u_user": users.column("user").to_numpy(),
        "u_gender": np.asarray(users.column("gender").to_pylist()),
        "u_age": users.column("age").to_numpy(),
        "u_occupation": users.column("occupation").to_numpy(),
        "u_zip": np.asarray(users.column("zip").to_pylist()),
        "m_movie": movies.column("movie").to_numpy(),
        "m_genres": np.asarray(movies.column("genres").to_pylist()),
    }
    log.flag("ratings.dat", "Rating", (out["rating"] < 1) | (out["rating"] > 5), out["rating"], "rating is not 1..5")
    log.flag("ratings.dat", "UserID", ~np.isin(out["user"], out["u_user"]), out["user"], "user not in users.dat")
    log.flag("ratings.dat", "MovieID", ~np.isin(out["movie"], out["m_movie"]), out["movie"], "movie not in movies.dat")
    log.flag("ratings.dat", "Timestamp", out["ts"] < -1, out["ts"], "negative timestamp")
    log.flag("users.dat", "Gender", ~np.isin(out["u_gender"], ["F", "M"]), out["u_gender"], "gender is not F or M")
    log.flag("users.dat", "Age", ~np.isin(out["u_age"], AGES), out["u_age"], f"age is not one of {list(AGES)}")
    log.flag("users.dat", "Occupation", (out["u_occupation"] < 0) | (out["u_occupation"] > 20), out["u_occupation"], "occupation is not 0..20")
    log.flag("users.dat", "UserID", out["u_user"] < 1, out["u_user"], "user id is not positive")
    log.flag("movies.dat", "MovieID", out["m_movie"] < 1, out["m_movie"], "movie id is not positive")
    dup = duplicate_rows(np.stack([out["user"], out["movie"]], axis=1))
    log.flag("ratings.dat", "MovieID", dup, out["movie"], "user rated this movie twice")
    if problems:
        raise DataError(problems)
    return out


def _side_tables(raw: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[Field]]:
    zips, zip_id = np.unique(raw["u_zip"], return_inverse=True)
    genre_lists = [g.split("|") for g in raw["m_genres"]]
    genre_names = sorted({g for gs in genre_lists for g in gs})
    max_genres = max(len(gs) for gs in genre_lists)
    genres = np.zeros((len(genre_lists), max_genres), dtype=np.int64)
    for i, gs in enumerate(genre_lists):
        genres[i, : len(gs)] = [genre_names.index(g) + 1 for g in gs]
    users = {
        "user_id": raw["u_user"],
        "gender": np.where(raw["u_gender"] == "F", 1, 2),
        "age": np.searchsorted(AGES, raw["u_age"]) + 1,
        "occupation": raw["u_occupation"] + 1,
        "zip": zip_id + 1,
    }
    items = {"item_id": raw["m_movie"], "genres": genres}
    fields = [
        Field("user_id", "user", int(raw["u_user"].max())),
        Field("gender", "user", 2),
        Field("age", "user", len(AGES)),
        Field("occupation", "user", 21),
        Field("zip", "user", len(zips)),
        Field("item_id", "item", int(raw["m_movie"].max())),
        Field("genres", "item", len(genre_names), multi=True, max_len=max_genres),
    ]
    return users, items, fields


def _bucket(mean: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Mean rating in [1, 5] -> id 1..MEAN_BUCKETS; 0 where no training row gave a mean."""
    b = np.clip(((mean - 1.0) / 4.0 * MEAN_BUCKETS).astype(np.int64) + 1, 1, MEAN_BUCKETS)
    return np.where(known, b, 0)


def _mean_rating(key: np.ndarray, rating: np.ndarray, is_train: np.ndarray, fold: np.ndarray, n_keys: int) -> np.ndarray:
    """Bucketed mean rating per row's key, from training rows only: a training row sees the
    mean over the other folds' training rows (out-of-fold), any other row all training rows."""
    k, r, f = key[is_train], rating[is_train].astype(np.float64), fold[is_train]
    total = np.bincount(k, r, minlength=n_keys)
    count = np.bincount(k, minlength=n_keys).astype(np.float64)
    per_fold_sum = np.bincount(f * n_keys + k, r, minlength=OOF_FOLDS * n_keys)
    per_fold_cnt = np.bincount(f * n_keys + k, minlength=OOF_FOLDS * n_keys)
    s = total[key].copy()
    c = count[key].copy()
    s[is_train] -= per_fold_sum[f * n_keys + k]
    c[is_train] -= per_fold_cnt[f * n_keys + k]
    return _bucket(s / np.maximum(c, 1), c > 0)


def _requests_and_candidates(group: np.ndarray, split: np.ndarray, user: np.ndarray, movie: np.ndarray, label: np.ndarray, extra: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """One request per distinct ``group`` value, request ids in group order.

    Returns requests (without ts and history), candidates sorted by request, and each input
    row's request index (0-based).
    """
    order = np.argsort(group, kind="stable")
    _, first, inverse = np.unique(group[order], return_index=True, return_inverse=True)
    request_of_row = np.empty(len(group), dtype=np.int64)
    request_of_row[order] = inverse
    req_row = order[first]
    cand = {
        "request_id": inverse + 1,
        "item_id": movie[order],
        "stage": np.full(len(order), EXPOSED, dtype=np.int8),
        "label": label[order].astype(np.float32),
        **{k: v[order] for k, v in extra.items()},
    }
    req = {"request_id": np.arange(1, len(first) + 1), "user_id": user[req_row], "split": split[req_row]}
    return req, cand, request_of_row


def convert(src: str | Path, protocol: str, seed: int = 2024) -> tuple[Dataset, str]:
    """Convert MovieLens-1M under ``protocol`` ('ctr' or 'cascade'); returns (dataset, report)."""
    raw = read_movielens(src)
    users, items, fields = _side_tables(raw)
    movie, rating, ts = raw["movie"], raw["rating"], raw["ts"]
    timed = ts >= 0
    counts: dict[str, object] = {
        "ratings_read": len(rating),
        "ratings_untimed": int((~timed).sum()),
        "users": len(users["user_id"]),
        "movies": len(items["item_id"]),
        "movies_rated": int(len(np.unique(movie))),
    }
    if protocol == "ctr":
        ds = _ctr(raw, users, items, fields, counts, seed)
    elif protocol == "cascade":
        ds = _cascade(raw, users, items, fields, counts)
    else:
        raise ValueError(f"unknown protocol {protocol!r} (ctr or cascade)")
    report = f"MovieLens-1M, protocol '{protocol}':\n" + "\n".join(f"  {k}: {v}" for k, v in counts.items())
    return ds, report


def _ctr(raw, users, items, fields, counts, seed) -> Dataset:
    keep = raw["rating"] != 3
    user, movie, rating, ts = (raw[k][keep] for k in ("user", "movie", "rating", "ts"))
    label = rating > 3
    n = len(rating)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(n, dtype=bool)
    is_test[rng.permutation(n)[: round(0.2 * n)]] = True
    train_rows = np.flatnonzero(~is_test)
    is_valid = np.zeros(n, dtype=bool)
    is_valid[rng.permutation(train_rows)[: round(0.2 * len(train_rows))]] = True
    split = np.where(is_test, "test", np.where(is_valid, "valid", "train"))
    is_train = split == "train"
    fold = rng.integers(0, OOF_FOLDS, n)
    extra = {
        "user_mean_rating": _mean_rating(user, rating, is_train, fold, int(user.max()) + 1),
        "item_mean_rating": _mean_rating(movie, rating, is_train, fold, int(movie.max()) + 1),
    }
    fields += [
        Field("user_mean_rating", "user", MEAN_BUCKETS, table="candidates"),
        Field("item_mean_rating", "item", MEAN_BUCKETS, table="candidates"),
    ]
    split_code = np.searchsorted(["test", "train", "valid"], split)
    req, cand, request_of_row = _requests_and_candidates(user * 3 + split_code, split, user, movie, label, extra)
    req["ts"] = np.zeros(len(req["request_id"]), dtype=np.int64)  # the latest known time; unused
    np.maximum.at(req["ts"], request_of_row, np.maximum(ts, 0))
    # history: each user's 50 most recent training positives (all positives carry a time)
    pos = np.flatnonzero(is_train & label)
    pos = pos[np.lexsort((movie[pos], ts[pos], user[pos]))]
    far = np.full(len(req["user_id"]), ts.max() + 1)
    req["history"], req["history_ts"], req["history_len"] = last_before(user[pos], ts[pos], movie[pos], req["user_id"], far, HISTORY)
    counts.update(
        dropped_rating_3=int((~keep).sum()),
        samples={s: int((split == s).sum()) for s in ("train", "valid", "test")},
        positives={s: int((label & (split == s)).sum()) for s in ("train", "valid", "test")},
        requests={s: int((req["split"] == s).sum()) for s in ("train", "valid", "test")},
        candidates=int(n),
    )
    schema = Schema(
        name="movielens-1m-ctr",
        features=FeatureSpec(tuple(fields)),
        temporal=False,
        history_max=HISTORY,
        protocol={"name": "ctr", "seed": seed, "history_drops_target": True, "oof_folds": OOF_FOLDS, "counts": counts},
    )
    return Dataset(schema, users, items, req, cand)


def _cascade(raw, users, items, fields, counts) -> Dataset:
    timed = raw["ts"] >= 0
    user, movie, rating, ts = (raw[k][timed] for k in ("user", "movie", "rating", "ts"))
    label = rating >= 4
    p80, p90 = np.quantile(ts, [0.8, 0.9])
    if p80 < ALL_TIMED_FROM:
        message = f"the 80th percentile of rating time falls before {ALL_TIMED_FROM} (2000-12-02 15:00 UTC), where untimed ratings may still lie"
        raise DataError([Problem("ratings.dat", "Timestamp", None, int(p80), message)])
    day = ts // 86_400
    group = user * (int(day.max()) + 1) + day
    first_ts = np.full(int(group.max()) + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_ts, group, ts)
    row_req_ts = first_ts[group]
    split = np.where(row_req_ts >= p90, "test", np.where(row_req_ts >= p80, "valid", "train"))
    req, cand, request_of_row = _requests_and_candidates(group, split, user, movie, label, {})
    req["ts"] = np.zeros(len(req["request_id"]), dtype=np.int64)
    req["ts"][request_of_row] = row_req_ts
    pos = np.flatnonzero(label)
    pos = pos[np.lexsort((movie[pos], ts[pos], user[pos]))]
    req["history"], req["history_ts"], req["history_len"] = last_before(user[pos], ts[pos], movie[pos], req["user_id"], req["ts"], HISTORY)
    counts.update(
        ratings_set_aside_untimed=counts["ratings_untimed"],
        valid_from_ts=int(p80),
        test_from_ts=int(p90),
        samples={s: int((split == s).sum()) for s in ("train", "valid", "test")},
        positives={s: int((label & (split == s)).sum()) for s in ("train", "valid", "test")},
        requests={s: int((req["split"] == s).sum()) for s in ("train", "valid", "test")},
        candidates=int(len(rating)),
    )
    schema = Schema(
        name="movielens-1m-cascade",
        features=FeatureSpec(tuple(fields)),
        temporal=True,
        history_max=HISTORY,
        protocol={"name": "cascade", "counts": counts},
    )
    return Dataset(schema, users, items, req, cand)
