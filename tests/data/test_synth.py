import numpy as np
import pytest

from cascade.cli import main
from cascade.data.synth import World, WorldConfig, generate
from tests.conftest import SMALL


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_same_seed_same_bytes_and_check_passes(tmp_path, capsys):
    args = ["--users", "100", "--items", "500", "--requests", "300"]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert main(["data", "synth", "--out", str(tmp_path / name), "--seed", seed, *args]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["candidates.parquet", "items.parquet", "requests.parquet", "schema.json", "users.parquet", "world.npz"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "candidates.parquet").read_bytes() != (tmp_path / "c" / "candidates.parquet").read_bytes()
    capsys.readouterr()
    assert main(["data", "check", str(tmp_path / "a")]) == 0


def test_oracle_matches_the_documented_formula(small_world):
    ds, world = small_world
    # one pair worked through the formula with plain loops
    rid, item = 17, 42
    u = world.user_vec[world.request_user[rid - 1] - 1]
    hist = [h for h in world.request_history[rid - 1] if h > 0]
    ta = max(float(world.item_style[h - 1] @ world.item_style[item - 1]) for h in hist)
    c0, c_aff, c_pop, c_ta = world.coef
    want = _sigmoid(c0 + c_aff * u @ world.item_vec[item - 1] + c_pop * world.item_bias[item - 1] + c_ta * ta)
    assert world.click_prob(np.array([rid]), np.array([[item, 0]]))[0, 0] == pytest.approx(want)
    assert world.click_prob(np.array([rid]), np.array([[item, 0]]))[0, 1] == 0.0  # padding


def test_target_attention_window_is_the_most_recent_history(small_world):
    ds, world = small_world
    req = ds.requests
    for r in range(0, 400, 37):
        n = req["history_len"][r]
        recent = req["history"][r, max(0, n - SMALL.ta_window) : n]
        np.testing.assert_array_equal(world.request_history[r, : len(recent)], recent)
        assert (world.request_history[r, len(recent) :] == 0).all()


def test_best_topk_is_the_brute_force_best_and_skips_excluded(small_world):
    ds, world = small_world
    rid = np.array([1, 50, 399])
    exclude = ds.requests["history"][rid - 1]
    items, probs = world.best_topk(rid, 5, exclude=exclude)
    all_items = np.arange(1, SMALL.items + 1)
    for row, r in enumerate(rid):
        p = world.click_prob(np.array([r]), all_items[None])[0]
        p[exclude[row][exclude[row] > 0] - 1] = -1
        np.testing.assert_array_equal(items[row], np.argsort(-p, kind="stable")[:5] + 1)
        np.testing.assert_allclose(probs[row], np.sort(p)[::-1][:5])


def test_logged_cascade_respects_quotas_and_clicks_only_exposed(small_world):
    ds, _ = small_world
    stage = ds.candidates["stage"].reshape(SMALL.requests, -1)
    q = SMALL.quotas
    assert stage.shape[1] == q[0]
    for s in (1, 2, 3):
        assert ((stage >= s).sum(axis=1) == q[s]).all()
    assert (ds.candidates["label"][ds.candidates["stage"] != 3] == 0).all()
    assert 0.05 < ds.candidates["label"][ds.candidates["stage"] == 3].mean() < 0.5


def test_recall_never_returns_history(small_world):
    ds, _ = small_world
    items = ds.candidates["item_id"].reshape(SMALL.requests, -1)
    hist = ds.requests["history"]
    clash = (items[:, :, None] == hist[:, None, :]) & (hist[:, None, :] > 0)
    assert not clash.any()


def test_histories_follow_user_tastes(small_world):
    ds, _ = small_world
    # share of history items in the user's most frequent category, against the 1/20 of chance
    cat = ds.items["category"]
    hist = ds.requests["history"]
    shares = []
    for r in range(len(hist)):
        h = hist[r, : ds.requests["history_len"][r]]
        if len(h) >= 10:
            shares.append(np.bincount(cat[h - 1]).max() / len(h))
    assert np.mean(shares) > 0.3


def test_the_cascade_gets_better_at_each_stage(small_world):
    ds, world = small_world
    items = ds.candidates["item_id"].reshape(SMALL.requests, -1)
    stage = ds.candidates["stage"].reshape(SMALL.requests, -1)
    p = world.click_prob(np.arange(1, SMALL.requests + 1), items)
    means = [p[stage >= s].mean() for s in range(4)]
    assert means == sorted(means) and means[3] > 1.3 * means[0]


def test_temporal_split_is_last_ten_percent_test():
    ds, _ = generate(WorldConfig(users=50, items=400, requests=200, quotas=(40, 10, 4, 2), history_max=10))
    split, ts = ds.requests["split"], ds.requests["ts"]
    assert (split == "test").sum() == 20 and (split == "valid").sum() == 20
    assert ts[split == "train"].max() <= ts[split == "valid"].min() <= ts[split == "valid"].max() <= ts[split == "test"].min()


def test_world_round_trips_through_npz(small_dir, small_world):
    _, world = small_world
    loaded = World.load(small_dir)
    for name in ("user_vec", "item_vec", "item_style", "item_bias", "coef", "request_user", "request_history"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(world, name))


def test_impossible_config_is_refused(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "w"), "--items", "100"]) == 2
    assert "recall quota 200 needs more than 100 items" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
