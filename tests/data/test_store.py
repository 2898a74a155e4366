import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cascade.cli import main
from cascade.data.store import DataError, read_dataset, write_dataset


def _copy(src, tmp_path):
    dst = tmp_path / "logs"
    shutil.copytree(src, dst)
    return dst


def _edit(directory, file, change):
    """Rewrite one parquet file through ``change(pyarrow.Table) -> pyarrow.Table``."""
    path = directory / file
    pq.write_table(change(pq.read_table(path)), path)


def _set(table, column, row, value, typ=None):
    values = table.column(column).to_pylist()
    values[row] = value
    return table.set_column(table.column_names.index(column), column, pa.array(values, typ or table.column(column).type))


def _check(directory, capsys):
    code = main(["data", "check", str(directory)])
    return code, capsys.readouterr().err


def test_round_trip_keeps_every_array(small_world, small_dir):
    ds, _ = small_world
    back = read_dataset(small_dir)
    assert back.schema == ds.schema
    for name in ("users", "items", "requests", "candidates"):
        original, loaded = ds.table(name), back.table(name)
        assert set(loaded) == set(original), name
        for col in original:
            np.testing.assert_array_equal(loaded[col], original[col], err_msg=f"{name}.{col}")


def test_check_accepts_a_valid_directory(small_dir, capsys):
    code = main(["data", "check", str(small_dir)])
    assert code == 0
    assert "ok" in capsys.readouterr().out


# Each case: (file, edit, text the message must contain). Rows are 0-based.
BAD_INPUTS = {
    "missing file": ("items.parquet", None, "items.parquet: file is missing"),
    "missing column": ("candidates.parquet", lambda t: t.drop_columns(["label"]), "candidates.parquet: column 'label': column is missing"),
    "wrong dtype": (
        "candidates.parquet",
        lambda t: t.set_column(1, "item_id", pa.array([str(v) for v in t.column("item_id").to_pylist()])),
        "candidates.parquet: column 'item_id': has type string, expected int",
    ),
    "negative id": ("users.parquet", lambda t: _set(t, "segment", 3, -4), "users.parquet: column 'segment', row 3: negative id (value -4)"),
    "out of vocabulary": ("items.parquet", lambda t: _set(t, "category", 5, 21), "items.parquet: column 'category', row 5: id beyond the vocabulary of 20 in schema.json (value 21)"),
    "out of vocabulary in a list": (
        "items.parquet",
        lambda t: _set(t, "tags", 2, [1, 99, 0]),
        "items.parquet: column 'tags', row 2: id beyond the vocabulary of 20 in schema.json (value 99)",
    ),
    "duplicate key": ("users.parquet", lambda t: _set(t, "user_id", 9, 3), "users.parquet: column 'user_id', row 9: duplicate user_id (value 3)"),
    "duplicate candidate": ("candidates.parquet", lambda t: _set(t, "item_id", 1, t.column("item_id")[0].as_py()), "candidates.parquet: column 'item_id', row 1: item listed twice"),
    "history leakage": ("requests.parquet", None, "requests.parquet: column 'history_ts', row 0: history event at or after the request's ts (leakage)"),
    "unknown request": ("candidates.parquet", lambda t: _set(t, "request_id", 11, 999_999), "candidates.parquet: column 'request_id', row 11: request not in requests.parquet (value 999999)"),
    "unknown item": ("items.parquet", None, "candidates.parquet: column 'item_id'"),
    "request without candidates": ("candidates.parquet", None, "requests.parquet: column 'request_id', row 0: request has no candidates (value 1)"),
    "unknown split": ("requests.parquet", lambda t: _set(t, "split", 4, "holdout"), "requests.parquet: column 'split', row 4: split is not one of ['train', 'valid', 'test'] (value 'holdout')"),
    "unknown stage": ("candidates.parquet", lambda t: _set(t, "stage", 6, 7), "candidates.parquet: column 'stage', row 6: stage is not one of [0, 1, 2, 3] (value 7)"),
    "stage past int8": ("candidates.parquet", lambda t: _set(t, "stage", 6, 259, pa.int64()), "candidates.parquet: column 'stage', row 6: stage is not one of [0, 1, 2, 3] (value 259)"),
    "nan label": ("candidates.parquet", lambda t: _set(t, "label", 8, float("nan")), "candidates.parquet: column 'label', row 8: label is not finite (value nan)"),
    "infinite label": ("candidates.parquet", lambda t: _set(t, "label", 8, float("inf")), "candidates.parquet: column 'label', row 8: label is not finite (value inf)"),
    "null inside a list": ("items.parquet", lambda t: _set(t, "tags", 6, [1, None, 0]), "items.parquet: column 'tags', row 6: list holds a null"),
    "null value": ("requests.parquet", lambda t: _set(t, "ts", 2, None), "requests.parquet: column 'ts', row 2: is null"),
    "candidate item 0": ("candidates.parquet", lambda t: _set(t, "item_id", 4, 0), "candidates.parquet: column 'item_id', row 4: item id is not positive (0 is padding) (value 0)"),
    "negative candidate item": ("candidates.parquet", lambda t: _set(t, "item_id", 4, -3), "candidates.parquet: column 'item_id', row 4: item id is not positive (0 is padding) (value -3)"),
    "label 5": ("candidates.parquet", lambda t: _set(t, "label", 8, 5.0), "candidates.parquet: column 'label', row 8: label is not 0 or 1 (value 5.0)"),
    "label -1": ("candidates.parquet", lambda t: _set(t, "label", 8, -1.0), "candidates.parquet: column 'label', row 8: label is not 0 or 1 (value -1.0)"),
    "no valid requests": (
        "requests.parquet",
        lambda t: t.set_column(t.column_names.index("split"), "split", pa.compute.replace_substring(t.column("split"), "valid", "train")),
        "requests.parquet: column 'split': no 'valid' requests",
    ),
    "history newest-first": ("requests.parquet", None, "requests.parquet: column 'history_ts', row 0: history is not oldest-first"),
    "splits out of time order": ("requests.parquet", None, "requests.parquet: column 'ts', row 0: a 'valid' request before the last 'train' one"),
    "ts in milliseconds": (
        "requests.parquet",
        lambda t: t.set_column(t.column_names.index("ts"), "ts", pa.compute.multiply(t.column("ts"), 1000)),
        "requests.parquet: column 'history_ts': history_ts (median",
    ),
    "uint64 id past int64": (
        "users.parquet",
        lambda t: t.set_column(0, "user_id", pa.array([2**63 + 5, *t.column("user_id").to_pylist()[1:]], pa.uint64())),
        "users.parquet: column 'user_id', row 0: id beyond the largest 64-bit signed integer (9223372036854775807) (value 9223372036854775813)",
    ),
}


def _newest_first(table):
    # the first request's history (20 events at most, oldest first) reversed, times with it
    hist, hist_ts = table.column("history").to_pylist(), table.column("history_ts").to_pylist()
    hist[0], hist_ts[0] = hist[0][::-1], hist_ts[0][::-1]
    table = table.set_column(table.column_names.index("history"), "history", pa.array(hist, table.column("history").type))
    return table.set_column(table.column_names.index("history_ts"), "history_ts", pa.array(hist_ts, table.column("history_ts").type))


def _valid_first(table):
    # row 0 is a train request; marked valid, it precedes the later train requests
    split = table.column("split").to_pylist()
    assert split[0] == "train"
    return _set(table, "split", 0, "valid")


def _leak(table):
    # the first request's newest history event moved to the request's own ts
    hist_ts = table.column("history_ts").to_pylist()
    hist_ts[0][-1] = table.column("ts")[0].as_py()
    return table.set_column(table.column_names.index("history_ts"), "history_ts", pa.array(hist_ts, table.column("history_ts").type))


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_check_names_each_bad_input(case, small_dir, tmp_path, capsys):
    file, change, expected = BAD_INPUTS[case]
    logs = _copy(small_dir, tmp_path)
    if case == "missing file":
        (logs / file).unlink()
    elif case == "history leakage":
        _edit(logs, file, _leak)
    elif case == "unknown item":
        # drop an item that candidates use; its id stays inside the vocabulary
        used = pq.read_table(logs / "candidates.parquet").column("item_id")[0].as_py()
        _edit(logs, file, lambda t: t.filter(pa.compute.not_equal(t.column("item_id"), used)))
        expected += f", row 0: item not in items.parquet (value {used})"
    elif case == "history newest-first":
        _edit(logs, file, _newest_first)
    elif case == "splits out of time order":
        _edit(logs, file, _valid_first)
    elif case == "request without candidates":
        _edit(logs, file, lambda t: t.filter(pa.compute.not_equal(t.column("request_id"), 1)))
    else:
        _edit(logs, file, change)
    code, err = _check(logs, capsys)
    assert code == 2
    assert expected in err, err
    assert "nothing written" in err
    # a streamed run's read (the requests checked a batch at a time, the candidates' values left to
    # the stream) finds the same problems, but those of the candidates' values
    full, streamed = _problems(logs, True), _problems(logs, False)
    assert full
    leaves = lambda p: (p.file == "candidates.parquet" and p.row is not None) or p.message == "request has no candidates"  # noqa: E731
    assert sorted(map(str, streamed)) == sorted(str(p) for p in full if not leaves(p))


def _problems(logs, candidates):
    try:
        read_dataset(logs, candidates=candidates)
    except DataError as e:
        return e.problems
    return []


def test_a_streamed_read_keeps_the_requests_index_and_reads_any_request_whole(small_world, tmp_path, monkeypatch):
    from cascade.data import store

    monkeypatch.setattr(store, "REQUEST_ROW_GROUP", 64)  # the small world's 400 requests in 7 row groups
    logs = write_dataset(small_world[0], tmp_path / "logs")
    whole, streamed = read_dataset(logs), read_dataset(logs, candidates=False)
    assert pq.ParquetFile(logs / "requests.parquet").metadata.num_row_groups == 7
    assert set(streamed.requests) == set(store.REQUEST_INDEX) < set(whole.requests)
    for name in store.REQUEST_INDEX:
        np.testing.assert_array_equal(streamed.requests[name], whole.requests[name], err_msg=name)
    # rows from every row group, in any order, repeated: each the whole read's row
    rows = np.r_[np.random.default_rng(0).permutation(400), 5, 5, 399, 0]
    got = streamed.request_rows(rows)
    assert set(got) == set(whole.requests)
    for name, values in whole.requests.items():
        np.testing.assert_array_equal(got[name], values[rows], err_msg=name)
    assert all(len(v) == 0 for v in streamed.request_rows(np.zeros(0, np.int64)).values())


def test_each_candidates_row_group_has_its_requests_in_one_row_group(small_world, tmp_path, monkeypatch):
    # 24,000 candidates of 400 requests in row groups of at most 1,000 (whole requests): each
    # one's requests are one row group of requests.parquet, and no more, so a stream reads them alone
    from cascade.data import store

    monkeypatch.setattr(store, "CANDIDATE_ROW_GROUP", 1000)
    logs = write_dataset(small_world[0], tmp_path / "logs")
    cand, req = pq.ParquetFile(logs / "candidates.parquet"), pq.ParquetFile(logs / "requests.parquet")
    ids = lambda f, g: set(f.read_row_group(g, columns=["request_id"]).column(0).to_pylist())  # noqa: E731
    candidate_groups = [ids(cand, g) for g in range(cand.num_row_groups)]
    request_groups = [ids(req, g) for g in range(req.num_row_groups)]
    assert len(candidate_groups) == len(request_groups) >= 24
    assert candidate_groups == request_groups  # every request of the small world has candidates
    assert all(max(a) < min(b) for a, b in zip(request_groups, request_groups[1:]))  # sorted by id


def test_every_problem_is_reported_at_once(small_dir, tmp_path, capsys):
    logs = _copy(small_dir, tmp_path)
    _edit(logs, "candidates.parquet", lambda t: _set(_set(t, "label", 0, float("nan")), "stage", 1, 9))
    code, err = _check(logs, capsys)
    assert code == 2
    assert "label is not finite" in err and "stage is not one of" in err
    assert "2 problem(s)" in err


def test_a_problem_counts_all_its_rows(small_dir, tmp_path, capsys):
    logs = _copy(small_dir, tmp_path)
    _edit(logs, "candidates.parquet", lambda t: t.set_column(3, "label", pa.array(np.full(len(t), np.nan, np.float32))))
    n = pq.read_metadata(logs / "candidates.parquet").num_rows
    _, err = _check(logs, capsys)
    assert f"{n:,} rows in all" in err


@pytest.mark.parametrize("rows, first", [((1, 4), 1), ((4,), 4)])
def test_histories_checked_a_block_at_a_time_report_one_problem_from_its_first_row(small_dir, tmp_path, monkeypatch, rows, first):
    # the requests ``rows`` lead their history with an unknown item; blocks of 2 rows (0-1, 2-3,
    # 4-5) part rows 1 and 4: still one problem, from the first bad row counted from the table's
    # start, with every bad row in its count
    import cascade.data.store as store

    logs = _copy(small_dir, tmp_path)

    def unknown_first(table):
        hist = table.column("history").to_pylist()
        for row in rows:
            assert hist[row]
            hist[row][0] = 10**6
        return table.set_column(table.column_names.index("history"), "history", pa.array(hist, table.column("history").type))

    _edit(logs, "requests.parquet", unknown_first)
    monkeypatch.setattr(store, "HISTORY_CHECK_ROWS", 2)
    with pytest.raises(DataError) as raised:
        read_dataset(logs, candidates=False)
    (problem,) = [p for p in raised.value.problems if p.message == "history item not in items.parquet"]
    assert (problem.row, problem.value, problem.count) == (first, 10**6, len(rows))


def test_bad_schema_is_named(small_dir, tmp_path, capsys):
    logs = _copy(small_dir, tmp_path)
    schema = json.loads((logs / "schema.json").read_text())
    schema["fields"][0]["side"] = "context"
    (logs / "schema.json").write_text(json.dumps(schema))
    code, err = _check(logs, capsys)
    assert code == 2
    assert "schema.json: invalid: fields[0] 'user_id': side 'context'" in err


# schema.json edits: (change, text the message must contain)
BAD_SCHEMAS = {
    "history_max a list": (lambda s: s.update(history_max=[50]), "key 'history_max': [50] is not a whole number"),
    "history_max true": (lambda s: s.update(history_max=True), "key 'history_max': True is not a whole number"),
    "quotas an int": (lambda s: s.update(quotas=200), "key 'quotas': 200 is not an object"),
    "quota zero": (lambda s: s.update(quotas={"recall": 0}), "key 'quotas.recall': 0 is not a positive whole number"),
    "max_len a string": (lambda s: s["fields"][-1].update(max_len="3"), ".max_len': '3' is not a whole number"),
    "temporal a string": (lambda s: s.update(temporal="false"), "key 'temporal': 'false' is not true or false"),
    "unknown key": (lambda s: s.update(temproal=True), "unknown key 'temproal'"),
    "unknown field key": (lambda s: s["fields"][0].update(vocabulary=3), "fields[0]: unknown key 'vocabulary'"),
    "fields an object": (lambda s: s.update(fields={"user_id": 1}), "key 'fields': {'user_id': 1} is not a list"),
    "vocab 2**40": (lambda s: s["fields"][0].update(vocab=2**40), "schema.json: column 'user_id': vocab 1,099,511,627,776 needs at least 4,096.0 GiB for one embedding table"),
    "history_max 1e7": (lambda s: s.update(history_max=10**7), "schema.json: column 'history_max': history_max 10,000,000 needs 59.6 GiB for the padded histories of 400 requests"),
    "not JSON": (None, "schema.json: invalid: not JSON"),
    "a directory": (None, "schema.json: invalid: is a directory, not a file"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCHEMAS))
def test_bad_schema_values_are_named(case, small_dir, tmp_path, capsys):
    change, expected = BAD_SCHEMAS[case]
    logs = _copy(small_dir, tmp_path)
    path = logs / "schema.json"
    if case == "not JSON":
        path.write_text('{"name": "x",')
    elif case == "a directory":
        path.unlink()
        path.mkdir()
    else:
        schema = json.loads(path.read_text())
        change(schema)
        path.write_text(json.dumps(schema))
    code, err = _check(logs, capsys)
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err


def test_a_pandas_dictionary_split_column_is_valid(small_dir, tmp_path, capsys):
    logs = _copy(small_dir, tmp_path)
    _edit(logs, "requests.parquet", lambda t: t.set_column(t.column_names.index("split"), "split", t.column("split").dictionary_encode()))
    assert pa.types.is_dictionary(pq.read_schema(logs / "requests.parquet").field("split").type)
    code, _ = _check(logs, capsys)
    assert code == 0
    np.testing.assert_array_equal(read_dataset(logs).requests["split"], read_dataset(small_dir).requests["split"])


def test_check_warns_of_single_class_requests(small_dir, capsys):
    assert main(["data", "check", str(small_dir)]) == 0
    # the small world: 241 of its 400 requests hold only negatives or only positives
    assert "warning: 241 of 400 requests have one class only" in capsys.readouterr().out


def test_writing_over_a_foreign_directory_is_refused(small_world, tmp_path, capsys):
    ds, _ = small_world
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="exists and is not a cascade log directory"):
        write_dataset(ds, home)
    assert main(["data", "synth", "--out", str(home)]) == 2  # refused before the world is made
    assert "not a cascade log directory" in capsys.readouterr().err
    assert [p.name for p in home.iterdir()] == ["thesis.tex"]
    # an earlier log directory is replaced, as before
    write_dataset(ds, tmp_path / "logs")
    write_dataset(ds, tmp_path / "logs")
    assert read_dataset(tmp_path / "logs").schema == ds.schema


def test_bad_dataset_writes_nothing(small_world, tmp_path):
    ds, _ = small_world
    bad_label = ds.candidates["label"].copy()
    bad_label[0] = np.nan
    bad = type(ds)(ds.schema, ds.users, ds.items, ds.requests, {**ds.candidates, "label": bad_label})
    with pytest.raises(DataError, match="label is not finite"):
        write_dataset(bad, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # an existing directory survives a failed overwrite untouched
    write_dataset(ds, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(DataError):
        write_dataset(bad, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
