import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from cascade.cli import main
from cascade.data.importer import ImportSpec, import_logs, read_vocabulary
from cascade.data.store import DataError, read_dataset

# A hand-worked log. Days (86,400 s windows): alice day 0 (x clicked, y not), bob day 1 (x),
# alice day 1 (z clicked, x not), bob day 2 (y). alice's y has no time and carol's w no label:
# both set aside and counted. Sorted ids: users alice 1, bob 2, carol 3; items w 1, x 2, y 3, z 4.
# Requests in (user, day) order: 1 alice d0 ts 100, 2 alice d1 ts 90100, 3 bob d1 ts 90000,
# 4 bob d2 ts 200000. History = the user's positives strictly before: request 2 -> [x] at 100,
# request 4 -> [x] at 90000. Time split with valid 0.25, test 0.25 over request times
# [100, 90000, 90100, 200000]: the 50% quantile 90050 and the 75% quantile
# 90100 + 0.25 * 109900 = 117575, so requests 1, 3 train, 2 valid, 4 test.
EVENTS = pa.table(
    {
        "user": ["alice", "alice", "bob", "alice", "alice", "bob", "alice", "carol"],
        "item": ["x", "y", "x", "z", "x", "y", "y", "w"],
        "ts": pa.array([100, 200, 90000, 90100, 90200, 200000, None, 5], pa.int64()),
        "clicked": pa.array([1, 0, 1, 1, 0, 1, 1, None], pa.int64()),
    }
)


def _spec(path, **kw):
    return ImportSpec(events=str(path), user="user", item="item", time="ts", label="clicked", valid=0.25, test=0.25, **kw)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_hand_worked_log(fmt, tmp_path):
    path = tmp_path / f"events.{fmt}"
    pacsv.write_csv(EVENTS, path) if fmt == "csv" else pq.write_table(EVENTS, path)
    ds, record, extra = import_logs(_spec(path))
    req, cand = ds.requests, ds.candidates
    np.testing.assert_array_equal(req["user_id"], [1, 1, 2, 2])
    np.testing.assert_array_equal(req["ts"], [100, 90100, 90000, 200000])
    np.testing.assert_array_equal(req["split"], ["train", "valid", "train", "test"])
    np.testing.assert_array_equal(cand["request_id"], [1, 1, 2, 2, 3, 4])
    np.testing.assert_array_equal(cand["item_id"], [2, 3, 4, 2, 2, 3])
    np.testing.assert_array_equal(cand["label"], [1, 0, 1, 0, 1, 1])
    np.testing.assert_array_equal(cand["stage"], [3] * 6)
    np.testing.assert_array_equal(req["history_len"], [0, 1, 0, 1])
    assert req["history"][1, 0] == 2 and req["history_ts"][1, 0] == 100
    assert req["history"][3, 0] == 2 and req["history_ts"][3, 0] == 90000
    assert ds.schema.temporal
    assert record["counts"]["set_aside_no_time"] == 1 and record["counts"]["set_aside_no_label"] == 1
    assert record["counts"]["events_used"] == 6
    assert (record["counts"]["valid_from_ts"], record["counts"]["test_from_ts"]) == (90050, 117575)
    assert set(extra) == {"import.json", "vocab/user_id.parquet", "vocab/item_id.parquet"}


def test_round_trip_restores_the_original_ids(tmp_path):
    pq.write_table(EVENTS, tmp_path / "events.parquet")
    assert main(["data", "import", "--events", str(tmp_path / "events.parquet"), "--user", "user", "--item", "item", "--time", "ts", "--label", "clicked", "--valid", "0.25", "--test", "0.25", "--out", str(tmp_path / "logs")]) == 0
    ds = read_dataset(tmp_path / "logs")
    users, items = read_vocabulary(tmp_path / "logs", "user_id"), read_vocabulary(tmp_path / "logs", "item_id")
    assert users.column("value").to_pylist() == ["alice", "bob", "carol"]
    assert items.column("value").to_pylist() == ["w", "x", "y", "z"]
    # every usable event comes back as (user, item, label) in the original names
    user_of = np.asarray(users.column("value").to_pylist())[ds.requests["user_id"][ds.candidates["request_id"] - 1] - 1]
    item_of = np.asarray(items.column("value").to_pylist())[ds.candidates["item_id"] - 1]
    back = sorted(zip(user_of.tolist(), item_of.tolist(), ds.candidates["label"].astype(int).tolist()))
    kept = [(u, i, c) for u, i, t, c in zip(*(EVENTS.column(k).to_pylist() for k in ("user", "item", "ts", "clicked"))) if t is not None and c is not None]
    assert back == sorted(kept)
    assert json.loads((tmp_path / "logs" / "import.json").read_text())["counts"]["events_read"] == 8


def _generated(tmp_path, n=3000, seed=0):
    """Events with string user ids, sparse integer item ids, a rating label, numeric and
    categorical side fields, and missing values in each."""
    rng = np.random.default_rng(seed)
    users = np.array([f"user-{i}" for i in range(80)])
    items = rng.choice(10**9, 150, replace=False)
    rating = rng.integers(1, 6, n).astype(float)
    rating[rng.random(n) < 0.02] = np.nan
    events = pa.table({"u": rng.choice(users, n), "i": rng.choice(items, n), "t": 1_700_000_000 + rng.integers(0, 40 * 86_400, n), "rating": rating})
    age = rng.integers(15, 80, 80).astype(float)
    age[:5] = np.nan
    user_table = pa.table({"u": users, "age": age, "country": pa.array([None if k % 9 == 0 else ["de", "fr", "us"][k % 3] for k in range(80)])})
    item_table = pa.table({"i": items, "genres": pa.array([None if k % 7 == 0 else "|".join(["a", "b", "c"][: 1 + k % 3]) for k in range(150)]), "price": rng.random(150) * 100})
    paths = {}
    for fmt in ("csv", "parquet"):
        for name, table in (("events", events), ("users", user_table), ("items", item_table)):
            paths[fmt, name] = tmp_path / f"{name}.{fmt}"
            pacsv.write_csv(table, paths[fmt, name]) if fmt == "csv" else pq.write_table(table, paths[fmt, name])
    return events, user_table, item_table, paths


def test_csv_and_parquet_give_the_same_dataset_with_checked_features(tmp_path):
    events, user_table, item_table, paths = _generated(tmp_path)
    fields = dict(user_fields={"categorical": ["country"], "numeric": {"age": 4}}, item_fields={"multi": {"genres": "|"}, "numeric": {"price": 5}})
    specs = {
        fmt: ImportSpec.from_dict({"events": paths[fmt, "events"].name, "users": paths[fmt, "users"].name, "items": paths[fmt, "items"].name, "columns": {"user": "u", "item": "i", "time": "t", "label": "rating >= 4"}, **fields}, "test", tmp_path)
        for fmt in ("csv", "parquet")
    }
    (a, rec_a, _), (b, _, _) = (import_logs(specs[fmt]) for fmt in ("csv", "parquet"))
    for name in ("users", "items", "requests", "candidates"):
        for col in a.table(name):
            np.testing.assert_array_equal(a.table(name)[col], b.table(name)[col], err_msg=f"{name}.{col}")
    # a rating-less event is set aside, not a negative
    rating = events.column("rating").to_numpy()
    assert rec_a["counts"]["set_aside_no_label"] == int(np.isnan(rating).sum())
    # numeric buckets: ids 1..4 by the quartiles of the known ages; a missing age is 0
    age = user_table.column("age").to_numpy(zero_copy_only=False)
    edges = np.quantile(age[~np.isnan(age)], [0, 0.25, 0.5, 0.75, 1])
    by_name = dict(zip(sorted(user_table.column("u").to_pylist()), a.users["age"]))  # ids 1..V in sorted order
    for name, value in zip(user_table.column("u").to_pylist(), age):
        expected = 0 if np.isnan(value) else int(np.searchsorted(edges[1:-1], value, side="right")) + 1
        assert by_name[name] == expected, name
    assert rec_a["numeric"]["age"]["boundaries"] == pytest.approx(edges.tolist())
    # a missing category is 0; the known ones 1..3 (de, fr, us)
    assert a.schema.features["country"].vocab == 3
    assert (a.users["country"] == 0).sum() == sum(1 for k in range(80) if k % 9 == 0)
    # multi-valued genres: padded to the longest list, an item without genres all 0
    assert a.items["genres"].shape == (150, 3)
    assert (a.items["genres"].sum(axis=1) == 0).sum() == sum(1 for k in range(150) if k % 7 == 0)
    # history: positives of the same user strictly before the request, oldest first
    req = a.requests
    for r in range(0, len(req["ts"]), 37):
        n = req["history_len"][r]
        assert (req["history_ts"][r, :n] < req["ts"][r]).all() and (np.diff(req["history_ts"][r, :n]) >= 0).all()


def test_random_split_is_seeded_and_not_temporal(tmp_path):
    _, _, _, paths = _generated(tmp_path)
    spec = lambda seed: ImportSpec(events=str(paths["parquet", "events"]), user="u", item="i", time="t", label="rating >= 4", split="random", seed=seed)  # noqa: E731
    a, b, c = (import_logs(spec(s))[0] for s in (1, 1, 2))
    np.testing.assert_array_equal(a.requests["split"], b.requests["split"])
    assert (a.requests["split"] != c.requests["split"]).any()
    assert not a.schema.temporal


def test_command_line_options_override_the_mapping(tmp_path):
    _, _, _, paths = _generated(tmp_path)
    (tmp_path / "map.yaml").write_text("events: events.csv\ncolumns: {user: u, item: i, time: t, label: rating >= 4}\nhistory_max: 7\n")
    assert main(["data", "import", "--mapping", str(tmp_path / "map.yaml"), "--label", "rating >= 5", "--out", str(tmp_path / "logs")]) == 0
    ds = read_dataset(tmp_path / "logs")
    assert ds.schema.history_max == 7
    rating = pacsv.read_csv(paths["csv", "events"]).column("rating").to_numpy()
    # merged repeats keep their highest label, so at most as many positives as 5-ratings
    assert 0 < ds.candidates["label"].sum() <= (rating == 5).sum()


# Bad input through `cascade data import`: (mapping YAML or events edit, text of the error)
BAD_IMPORTS = {
    "missing column": ("columns: {user: uid, item: i, time: t, label: rating >= 4}", "events.csv: column 'uid': column is missing (the user column; the file has u, i, t, rating)"),
    "label not 0/1": ("columns: {user: u, item: i, time: t, label: rating}", "events.csv: column 'rating', row"),
    "label text": ("columns: {user: u, item: i, time: t, label: u}", "events.csv: column 'u': has type string; a label needs numbers"),
    "time as text in seconds": ("columns: {user: u, item: i, time: u, label: rating >= 4}", "column 'u': has type string; time_unit 's' needs numbers (or time_unit: iso)"),
    "unknown key": ("columns: {user: u, item: i, time: t, label: rating >= 4}\nhistroy_max: 3", "unknown key 'histroy_max'"),
    "unknown column role": ("columns: {user: u, item: i, time: t, label: rating >= 4, clicks: c}", "columns: unknown key 'clicks'"),
    "missing label": ("columns: {user: u, item: i, time: t}", "'label' is required"),
    "bad split": ("columns: {user: u, item: i, time: t, label: rating >= 4}\nsplit: temporal", "split: 'temporal' is not one of time, random"),
    "fractions": ("columns: {user: u, item: i, time: t, label: rating >= 4}\nvalid: 0.6\ntest: 0.5", "valid + test: 1.1 leaves no training requests"),
    "missing events file": ("events: nowhere.csv\ncolumns: {user: u, item: i, time: t, label: rating >= 4}", "nowhere.csv: events file is missing"),
    "fields without a table": ("columns: {user: u, item: i, time: t, label: rating >= 4}\nuser_fields: {categorical: [country]}", "user fields ['country'] are named but no users table was given"),
    "duplicate key": ("columns: {user: u, item: i, time: t, label: rating >= 4}\nhistory_max: 3\nhistory_max: 4", "key 'history_max' given twice"),
    "request of two users": ("columns: {user: u, item: i, time: t, label: rating >= 4, request: day}", "holds events of more than one user"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMPORTS))
def test_bad_imports_exit_2_naming_what(case, tmp_path, capsys):
    events, _, _, _ = _generated(tmp_path)
    if case == "request of two users":
        pacsv.write_csv(events.append_column("day", pa.compute.divide(events.column("t"), 86_400)), tmp_path / "events.csv")
    text, expected = BAD_IMPORTS[case]
    if not text.startswith("events:"):
        text = "events: events.csv\n" + text
    (tmp_path / "map.yaml").write_text(text + "\n")
    code = main(["data", "import", "--mapping", str(tmp_path / "map.yaml"), "--out", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert not (tmp_path / "logs").exists()


def test_bad_label_row_is_named(tmp_path):
    bad = EVENTS.set_column(3, "clicked", pa.array([1, 0, 1, 5, 0, 1, 1, None], pa.int64()))
    pq.write_table(bad, tmp_path / "events.parquet")
    with pytest.raises(DataError, match=r"events.parquet: column 'clicked', row 3: label is not 0 or 1 .* \(value 5.0\)"):
        import_logs(_spec(tmp_path / "events.parquet"))


@pytest.mark.parametrize(
    "unit, times",
    [
        # 2024-01-01T00:00:00Z is 1,704,067,200 s since the epoch; the second event a day and 5 s later
        ("iso", ["2024-01-01T00:00:00", "2024-01-02T00:00:05", "2024-01-03T00:00:00", "2024-01-04T00:00:00"]),
        ("ms", [1_704_067_200_000, 1_704_153_605_999, 1_704_240_000_000, 1_704_326_400_000]),
        ("s", [1_704_067_200, 1_704_153_605, 1_704_240_000, 1_704_326_400]),
    ],
)
def test_time_units_are_stored_in_seconds(unit, times, tmp_path):
    events = pa.table({"user": ["a", "a", "a", "a"], "item": ["x", "y", "z", "x"], "t": times, "c": [1, 1, 0, 1]})
    pq.write_table(events, tmp_path / "e.parquet")
    spec = ImportSpec(events=str(tmp_path / "e.parquet"), user="user", item="item", time="t", label="c", time_unit=unit, valid=0.25, test=0.25)
    ds, _, _ = import_logs(spec)
    np.testing.assert_array_equal(ds.requests["ts"], [1_704_067_200, 1_704_153_605, 1_704_240_000, 1_704_326_400])
    # one request a day; the third day's sees the first two positives x (id 1), y (id 2), oldest first
    np.testing.assert_array_equal(ds.requests["history"][2, :2], [1, 2])


def test_a_nan_float_id_is_set_aside_and_a_constant_numeric_field_is_one_bucket(tmp_path):
    # pandas writes an integer id column with a missing value as float64 with NaN
    events = pa.table({"u": [1.0, 2.0, np.nan, 1.0, 2.0, 1.0], "i": [10, 11, 12, 11, 10, 12], "t": [1, 2, 3, 100_000, 200_000, 300_000], "c": [1, 0, 1, 1, 1, 0]})
    pq.write_table(events, tmp_path / "e.parquet")
    pq.write_table(pa.table({"i": [10, 11, 12], "price": [5.0, 5.0, 5.0]}), tmp_path / "items.parquet")
    spec = ImportSpec.from_dict({"events": "e.parquet", "items": "items.parquet", "columns": {"user": "u", "item": "i", "time": "t", "label": "c"}, "valid": 0.25, "test": 0.25, "item_fields": {"numeric": {"price": 4}}}, "test", tmp_path)
    ds, record, _ = import_logs(spec)
    assert record["counts"]["set_aside_no_user"] == 1 and record["counts"]["events_used"] == 5
    assert ds.schema.features["user_id"].vocab == 2  # 1.0 and 2.0; the NaN is no user
    assert ds.schema.features["price"].vocab == 1 and (ds.items["price"] == 1).all()
