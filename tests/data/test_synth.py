from dataclasses import replace

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


def test_terms_over_shared_columns_equal_the_per_request_gather(small_world):
    # the catalog path (item ids (N,), matrix products) must give each request what the
    # per-request gather (B, N) gives: same formula, only the summation order differs; a request
    # with an empty history attends to nothing (its target-attention term is 0 on both paths).
    _, world = small_world
    history = world.request_history.copy()
    history[0] = 0  # request 1: no history
    world = replace(world, request_history=history)
    rid = np.array([1, 2, 77, 300])
    cols = np.array([1, 5, 9, 2, SMALL.items, 0])
    for shared, gathered in zip(world.terms(rid, cols), world.terms(rid, np.broadcast_to(cols, (len(rid), len(cols))))):
        assert shared.shape == gathered.shape == (4, 6)
        np.testing.assert_allclose(shared, gathered, rtol=1e-12, atol=1e-12)
    assert world.terms(rid[:1], cols)[1].tolist() == [[0.0] * 6]


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


def _hand_world() -> World:
    # one request whose window holds items 1 and 2 (styles (1, 0) and (0, 1)); item 3 has item 1's
    # style, item 4 lies between them and has a popularity bias of 0.1; only c_pop and c_ta are on
    r = np.sqrt(0.5)
    return World(
        user_vec=np.zeros((1, 1)),
        item_vec=np.zeros((4, 1)),
        item_style=np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [r, r]]),
        item_bias=np.array([0.0, 0.0, 0.0, 0.1]),
        coef=np.array([0.0, 0.0, 1.0, 1.0]),
        request_user=np.array([1]),
        request_history=np.array([[1, 2]]),
    )


def test_oracle_ratios_hand_worked():
    # the history (1, 2) excluded, the catalog is items 3 and 4; k = 1.
    # full truth: item 3 = 0 + max(1, 0) = 1, item 4 = 0.1 + max(r, r) = 0.8071: item 3, p = sigmoid(1)
    # no target attention: item 3 = 0, item 4 = 0.1: item 4, p = sigmoid(0.8071) -> ratio 0.9458
    # one user vector: centre = (r, r); x = <centre, w> = r, r, r, 1 for items 1-4 and the term
    # y = 1, 1, 1, r: the least-squares slope is (r - 1) / (1 - r) = -1, so item 3 scores -r and
    # item 4 0.1 - 1 = -0.9: item 3, ratio 1
    world = _hand_world()
    got = world.oracle_ratios(np.array([1]), k=1, exclude=np.array([[1, 2]]))
    assert got["no_target_attention"] == pytest.approx(_sigmoid(0.1 + np.sqrt(0.5)) / _sigmoid(1.0))
    assert got["no_target_attention"] == pytest.approx(0.9458, abs=1e-4)
    assert got["one_user_vector"] == pytest.approx(1.0) and got["truth"] == pytest.approx(1.0)
    # the same within a list of items 3 and 4 (and padding): the fit over these two alone has the
    # same slope, (r - 1) / (1 - r) = -1, and the catalog's best is in the list
    assert world.oracle_ratios(np.array([1]), k=1, exclude=np.array([[1, 2]]), candidates=np.array([[4, 0, 3]])) == pytest.approx(got)
    # a list without item 3: every ranking takes item 4, sigmoid(0.8071) / sigmoid(1) of the best
    assert world.oracle_ratios(np.array([1]), k=1, exclude=np.array([[1, 2]]), candidates=np.array([[4, 0]]))["truth"] == pytest.approx(0.9458, abs=1e-4)


def test_without_target_attention_nothing_is_left_to_win_back():
    ds, world = generate(WorldConfig(users=80, items=500, requests=300, history_max=10, quotas=(40, 10, 4, 2), c_ta=0.0, seed=5))
    test = ds.requests["split"] == "test"
    got = world.oracle_ratios(ds.requests["request_id"][test], k=10, exclude=ds.requests["history"][test])
    assert got == {"truth": pytest.approx(1.0), "no_target_attention": pytest.approx(1.0), "one_user_vector": pytest.approx(1.0)}
    assert replace(world, coef=world.coef + [0, 0, 0, 3.0]).oracle_ratios(ds.requests["request_id"][test], k=10, exclude=ds.requests["history"][test])["no_target_attention"] < 1.0


def test_the_target_attention_knob_runs_from_one_vector_enough_to_not():
    from cascade.data.synth import TA_HIGH, TA_LOW, target_attention_world, world_config

    low, high = target_attention_world(0.0), target_attention_world(1.0)
    assert all(getattr(low, k) == v for k, v in TA_LOW.items()) and all(getattr(high, k) == v for k, v in TA_HIGH.items())
    assert target_attention_world(0.5, requests=77).requests == 77  # other keys pass through
    assert world_config({"target_attention": 1.0, "c_ta": 2.0}).c_ta == 2.0  # and override the knob
    assert world_config({"items": 900}) == WorldConfig(items=900)
    with pytest.raises(ValueError, match="target_attention: expected a number from 0 to 1, got 1.5"):
        target_attention_world(1.5)
    kept = []
    for knob in (0.0, 1.0):
        ds, world = generate(target_attention_world(knob, users=300, items=1500, requests=1000, seed=2))
        test = ds.requests["split"] == "test"
        kept.append(world.oracle_ratios(ds.requests["request_id"][test], k=10, exclude=ds.requests["history"][test])["one_user_vector"])
    # measured on this small world: about 0.96 at knob 0 and 0.6 at knob 1 (benchmarks/results/ta_worlds.md at full size)
    assert kept[0] > 0.9 and kept[1] < 0.75


def test_substyles_are_observable_and_closer_within_than_across():
    small = dict(users=80, items=600, requests=300, history_max=10, quotas=(40, 10, 4, 2), seed=5, style_noise=0.05, style_dim=16)
    plain, _ = generate(WorldConfig(**small))
    ds, world = generate(WorldConfig(**small, substyles=4))
    # the substyles draw from a stream of their own: the rest of the world is unchanged
    np.testing.assert_array_equal(ds.items["category"], plain.items["category"])
    np.testing.assert_array_equal(ds.requests["history"], plain.requests["history"])
    style, category = ds.items["style"], ds.items["category"]
    assert ds.schema.features["style"].vocab == 20 * 4 and style.min() >= 1 and style.max() <= 80
    assert np.array_equal((style - 1) // 4, category - 1)  # a substyle lies within its item's category
    sim = world.item_style @ world.item_style.T
    same_style = style[:, None] == style[None, :]
    same_category = (category[:, None] == category[None, :]) & ~same_style
    off = ~np.eye(len(style), dtype=bool)
    # tight substyles (noise 0.05 a dimension): near 1 within one, lower across substyles, lower still across categories
    assert sim[same_style & off].mean() > 0.9 > sim[same_category].mean() > sim[~same_style & ~same_category].mean()
    assert "style" not in plain.items and "style" not in plain.schema.features.names
