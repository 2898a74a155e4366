import numpy as np
import pytest

from cascade.cli import main
from cascade.data.movielens import ALL_TIMED_FROM, convert
from cascade.data.store import DataError, read_dataset

# ---------------------------------------------------------------------------- the real files


@pytest.fixture(scope="module")
def ctr(ml1m_dir):
    return convert(ml1m_dir, "ctr")


@pytest.fixture(scope="module")
def temporal(ml1m_dir):
    return convert(ml1m_dir, "cascade")


def test_ctr_counts_on_the_real_files(ctr):
    ds, report = ctr
    c = ds.schema.protocol["counts"]
    assert c["ratings_read"] == 1_000_209
    assert c["ratings_untimed"] == 177_402  # shared/data/ml-1m/NOTE.md
    assert c["users"] == 6040 and c["movies"] == 3883 and c["movies_rated"] == 3706
    assert c["dropped_rating_3"] == 261_197
    assert c["candidates"] == len(ds.candidates["item_id"]) == 739_012
    # 20% of 739,012 -> 147,802 test; 20% of the remaining 591,210 -> 118,242 valid
    assert c["samples"] == {"train": 472_968, "valid": 118_242, "test": 147_802}
    assert sum(c["positives"].values()) == 348_971 + 226_310  # every 4 and 5
    assert "candidates: 739012" in report


def test_ctr_history_is_training_positives_only(ctr):
    ds, _ = ctr
    req, cand = ds.requests, ds.candidates
    train_pos = (cand["label"] == 1) & (req["split"][cand["request_id"] - 1] == "train")
    user_of = req["user_id"][cand["request_id"] - 1]
    allowed = set(zip(user_of[train_pos].tolist(), cand["item_id"][train_pos].tolist()))
    for r in range(0, len(req["request_id"]), 97):
        for item in req["history"][r, : req["history_len"][r]]:
            assert (int(req["user_id"][r]), int(item)) in allowed
    assert req["history_len"].max() == 50


def test_cascade_counts_and_windows_on_the_real_files(temporal):
    ds, _ = temporal
    c = ds.schema.protocol["counts"]
    assert c["ratings_set_aside_untimed"] == 177_402
    assert c["candidates"] == 1_000_209 - 177_402
    assert ALL_TIMED_FROM <= c["valid_from_ts"] < c["test_from_ts"]
    # NOTE.md: the 80th and 90th percentiles fall on 2000-12-08 and 2001-01-21 (UTC)
    assert np.datetime64(c["valid_from_ts"], "s").astype("datetime64[D]") == np.datetime64("2000-12-08")
    assert np.datetime64(c["test_from_ts"], "s").astype("datetime64[D]") == np.datetime64("2001-01-21")
    req = ds.requests
    assert (req["ts"][req["split"] == "valid"] >= c["valid_from_ts"]).all()
    assert (req["ts"][req["split"] == "train"] < c["valid_from_ts"]).all()
    assert ds.schema.temporal  # so reading it back checks every history_ts < ts


def test_converted_directories_pass_check(ml1m_dir, tmp_path, capsys):
    for protocol in ("ctr", "cascade"):
        assert main(["data", "movielens", "--src", str(ml1m_dir), "--out", str(tmp_path / protocol), "--protocol", protocol]) == 0
        assert main(["data", "check", str(tmp_path / protocol)]) == 0
    assert "ratings_read: 1000209" in capsys.readouterr().out


# ---------------------------------------------------------------------------- small handmade files


def _write_ml(directory, ratings):
    directory.mkdir(exist_ok=True)
    (directory / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n")
    (directory / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure\n3::Café (1999)::Drama\n4::Heat (1995)::Action|Crime\n".encode("latin-1"))
    (directory / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in ratings))
    return directory


RATINGS = [(u, m, r, 978_300_000 + 1000 * u + 10 * m) for u in (1, 2, 3) for m, r in zip((1, 2, 3, 4), (5, 1, 4, 2))]


def test_empty_timestamps_are_read_as_unknown_and_counted(tmp_path):
    untimed = [(u, m, r, "" if (u, m) == (3, 2) else t) for u, m, r, t in RATINGS]
    ds, report = convert(_write_ml(tmp_path / "ml", untimed), "ctr")
    assert ds.schema.protocol["counts"]["ratings_untimed"] == 1
    assert ds.schema.protocol["counts"]["candidates"] == 12  # no rating 3 here: every line used
    assert "ratings_untimed: 1" in report
    standard, _ = convert(_write_ml(tmp_path / "std", RATINGS), "ctr")
    assert standard.schema.protocol["counts"]["ratings_untimed"] == 0


def test_latin1_titles_and_multi_valued_genres(tmp_path):
    ds, _ = convert(_write_ml(tmp_path / "ml", RATINGS), "ctr")
    # genres sorted: Action 1, Adventure 2, Animation 3, Children's 4, Comedy 5, Crime 6, Drama 7
    np.testing.assert_array_equal(ds.items["genres"], [[3, 4, 5], [2, 0, 0], [7, 0, 0], [1, 6, 0]])


def _feature_of(ds, user, movie, name):
    cand, req = ds.candidates, ds.requests
    row = np.flatnonzero((req["user_id"][cand["request_id"] - 1] == user) & (cand["item_id"] == movie))[0]
    return cand[name][row], req["split"][cand["request_id"][row] - 1]


def test_mean_rating_features_never_see_their_own_or_held_out_labels(tmp_path):
    rng = np.random.default_rng(0)
    many = [(u, m, int(rng.choice([1, 2, 4, 5])), 978_300_000 + 10 * (u * 5 + m)) for u in (1, 2, 3) for m in (1, 2, 3, 4)]
    base, _ = convert(_write_ml(tmp_path / "a", many), "ctr", seed=1)
    split_of = {(u, m): _feature_of(base, u, m, "user_mean_rating")[1] for u, m, _, _ in many}
    for (u, m), split in split_of.items():
        flipped = [(uu, mm, (1 if r >= 4 else 5) if (uu, mm) == (u, m) else r, t) for uu, mm, r, t in many]
        other, _ = convert(_write_ml(tmp_path / f"b{u}{m}", flipped), "ctr", seed=1)
        for name in ("user_mean_rating", "item_mean_rating"):
            # a row's own label never reaches its own features
            assert _feature_of(other, u, m, name)[0] == _feature_of(base, u, m, name)[0], (u, m, name)
            if split != "train":  # a held-out label reaches no feature at all
                np.testing.assert_array_equal(other.candidates[name], base.candidates[name])


def test_bad_rating_names_file_row_and_value(tmp_path, capsys):
    bad = list(RATINGS)
    bad[4] = (2, 1, 7, 978_300_000)
    src = _write_ml(tmp_path / "ml", bad)
    with pytest.raises(DataError, match=r"ratings.dat: column 'Rating', row 4: rating is not 1..5 \(value 7\)"):
        convert(src, "ctr")
    assert main(["data", "movielens", "--src", str(src), "--out", str(tmp_path / "out"), "--protocol", "ctr"]) == 2
    assert "ratings.dat: column 'Rating', row 4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_file_is_named(tmp_path):
    src = _write_ml(tmp_path / "ml", RATINGS)
    (src / "movies.dat").unlink()
    with pytest.raises(DataError, match="movies.dat: file is missing"):
        convert(src, "ctr")


# Users 1 and 2 rate on days 1 and 2, user 3 on days 3, 4, 5, 5: sorted times v0..v11, the 80th
# percentile is v8 + 0.8 (v9 - v8) and the 90th v9 + 0.9 (v10 - v9), so the day-3 request (ts v8)
# is train, day 4 (v9) valid, day 5 (v10) test.
DAYS = {(3, 1): 3, (3, 2): 4, (3, 3): 5, (3, 4): 5}
SPREAD = [(u, m, r, 978_300_000 + 86_400 * DAYS.get((u, m), u) + 10 * m) for u, m, r, _ in RATINGS]


def test_round_trip_of_a_converted_directory(tmp_path):
    src = _write_ml(tmp_path / "ml", SPREAD)
    assert main(["data", "movielens", "--src", str(src), "--out", str(tmp_path / "out"), "--protocol", "cascade"]) == 0
    ds = read_dataset(tmp_path / "out")
    assert ds.schema.temporal and len(ds.candidates["item_id"]) == 12
    assert sorted(ds.requests["split"].tolist()) == ["test", "train", "train", "train", "valid"]


def test_temporal_windows_before_the_fully_timed_period_are_refused(tmp_path):
    early = [(u, m, r, 900_000_000 + t % 1000) for u, m, r, t in RATINGS]  # all in 1998
    with pytest.raises(DataError, match="ratings.dat: column 'Timestamp': the 80th percentile of rating time falls before"):
        convert(_write_ml(tmp_path / "ml", early), "cascade")


def test_a_repeated_rating_is_named(tmp_path):
    twice = [*RATINGS, RATINGS[2]]
    with pytest.raises(DataError, match=r"ratings.dat: column 'MovieID', row 12: user rated this movie twice \(value 3\)"):
        convert(_write_ml(tmp_path / "ml", twice), "ctr")
