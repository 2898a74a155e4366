import numpy as np
import pytest

from cascade import metrics as M
from cascade.data.lists import ListBatch, build_lists, pointwise_lists
from cascade.features import Field, FeatureSpec
from teachers.gbdt import GBDTConfig, GBDTTeacher


def test_history_crosses_hand_worked():
    spec = FeatureSpec((Field("user_id", "user", 3), Field("item_id", "item", 5), Field("genres", "item", 4, multi=True, max_len=2)))
    items = {"item_id": np.arange(1, 6), "genres": np.array([[1, 2], [2, 0], [3, 0], [1, 3], [4, 0]])}
    teacher = GBDTTeacher(spec, items)
    lists = ListBatch(
        request_id=np.array([1]),
        user={"user_id": np.array([1])},
        history=np.array([[1, 2, 3, 0]]),  # genres {1,2}, {2}, {3}
        item={"item_id": np.array([[4, 5, 2]]), "genres": np.array([[[1, 3], [4, 0], [2, 0]]])},
        label=np.zeros((1, 3), np.float32),
        stage=np.zeros((1, 3), np.int8),
        mask=np.ones((1, 3), bool),
    )
    # item 4 {1,3}: genre 1 in item 1, genre 3 in item 3 -> 2; item 5 {4}: 0; item 2 {2}: items 1, 2 -> 2
    np.testing.assert_array_equal(teacher.history_crosses(lists)["genres"], [[2, 0, 2]])
    x, names, categorical = teacher.features(lists)
    assert x.shape == (3, len(names)) and categorical == ["user_id", "item_id"]
    np.testing.assert_allclose(x[:, names.index("history_share_rate_genres")], [2 / 3, 0, 2 / 3], rtol=1e-6)


def test_dropped_fields_and_history_leave_the_features():
    spec = FeatureSpec((Field("user_id", "user", 3), Field("item_id", "item", 5), Field("genres", "item", 4, multi=True, max_len=2)))
    items = {"item_id": np.arange(1, 6), "genres": np.array([[1, 2], [2, 0], [3, 0], [1, 3], [4, 0]])}
    lists = ListBatch(np.array([1]), {"user_id": np.array([1])}, np.array([[1, 2, 0]]), {"item_id": np.array([[4, 5]]), "genres": np.array([[[1, 3], [4, 0]]])}, np.zeros((1, 2), np.float32), np.zeros((1, 2), np.int8), np.ones((1, 2), bool))
    _, names, categorical = GBDTTeacher(spec, items, drop=("user_id", "item_id")).features(lists)
    assert categorical == [] and names == [f"genres={i}" for i in range(1, 5)] + ["history_shares_genres", "history_share_rate_genres", "history_len"]
    _, names, _ = GBDTTeacher(spec, items, drop=("history",)).features(lists)
    assert names == ["user_id", "item_id"] + [f"genres={i}" for i in range(1, 5)]
    with pytest.raises(ValueError, match="drop_fields: unknown field 'user'"):
        GBDTTeacher(spec, items, drop=("user",))


def test_binary_teacher_beats_random_on_exposures(small_world):
    ds, _ = small_world
    flat = {s: pointwise_lists(ds, s) for s in ("train", "valid", "test")}
    flat = {s: f.take(np.flatnonzero(f.stage[:, 0] == 3)) for s, f in flat.items()}
    teacher = GBDTTeacher(ds.schema.features, ds.items, GBDTConfig(objective="binary", n_estimators=200, min_data_in_leaf=20))
    teacher.fit(flat["train"], flat["valid"])
    s = teacher.score(flat["test"])
    assert s.shape == flat["test"].mask.shape
    assert M.auc(flat["test"].label[:, 0], s[:, 0]) > 0.55


def test_lambdarank_teacher_orders_lists_like_the_logged_ranker(small_world):
    ds, _ = small_world
    lists = {s: build_lists(ds, s) for s in ("train", "valid", "test")}
    # graded target: the last stage each candidate survived (what a ranker teacher should learn)
    for s in lists:
        lists[s].label[:] = lists[s].stage
    teacher = GBDTTeacher(ds.schema.features, ds.items, GBDTConfig(n_estimators=100, min_data_in_leaf=20))
    best = teacher.fit(lists["train"], lists["valid"])
    assert "ndcg@10" in best
    test = lists["test"]
    scores = teacher.score(test)
    assert (scores[~test.mask] == 0).all()
    # the teacher's top-8 recovers the logged rank stage's 8 far better than the 8/60 of chance
    passed_rank = (test.stage >= 2).astype(float)
    assert M.recall_at_k(scores, passed_rank, 8, test.mask) > 2 * 8 / 60


def test_unknown_objective_is_refused(small_world):
    ds, _ = small_world
    with pytest.raises(ValueError, match="objective 'xendcg'"):
        GBDTTeacher(ds.schema.features, ds.items, GBDTConfig(objective="xendcg"))


def test_features_take_per_candidate_fields_of_both_sides(tmp_path):
    # MovieLens ctr stores out-of-fold mean ratings per candidate, on the user and the item side
    from cascade.data.movielens import convert
    from tests.data.test_movielens import RATINGS, _write_ml

    ds, _ = convert(_write_ml(tmp_path / "ml", RATINGS), "ctr", seed=0)
    flat = pointwise_lists(ds, "train")
    x, names, categorical = GBDTTeacher(ds.schema.features, ds.items).features(flat)
    assert x.shape[0] == len(flat)
    np.testing.assert_array_equal(x[:, names.index("user_mean_rating")], flat.user["user_mean_rating"][:, 0])
    np.testing.assert_array_equal(x[:, names.index("item_mean_rating")], flat.item["item_mean_rating"][:, 0])
    assert "user_mean_rating" in categorical


def test_binary_scores_are_logits(small_world):
    ds, _ = small_world
    flat = {s: pointwise_lists(ds, s) for s in ("train", "valid")}
    teacher = GBDTTeacher(ds.schema.features, ds.items, GBDTConfig(objective="binary", n_estimators=20, min_data_in_leaf=20))
    teacher.fit(flat["train"], flat["valid"])
    raw = teacher.score(flat["valid"])[:, 0]
    prob = teacher.booster.predict(teacher.features(flat["valid"])[0], num_iteration=teacher.booster.best_iteration)
    np.testing.assert_allclose(1 / (1 + np.exp(-raw)), prob, rtol=1e-5)


def test_a_model_that_cannot_tell_candidates_apart_does_not_inherit_the_list_order():
    # 300 lists of 10 whose positive always comes first (as the logged item of a real list does)
    # and whose only feature is the same for every candidate: every score ties. LightGBM breaks
    # NDCG ties by position, so unshuffled lists would score validation NDCG@10 = 1 here; shuffled,
    # the expected NDCG@10 of one positive at a uniform rank r in 1..10 is
    # mean(1 / log2(1 + r)) = 0.4544 (the 300 validation lists give about +-0.02).
    b, n = 300, 10
    spec = FeatureSpec((Field("user_id", "user", 1), Field("item_id", "item", 1)))
    label = np.zeros((b, n), np.float32)
    label[:, 0] = 1.0
    lists = ListBatch(np.arange(b), {"user_id": np.ones(b, np.int64)}, np.zeros((b, 1), np.int64), {"item_id": np.ones((b, n), np.int64)}, label, np.zeros((b, n), np.int8), np.ones((b, n), bool))
    teacher = GBDTTeacher(spec, {"item_id": np.array([1])}, GBDTConfig(n_estimators=5, min_data_in_leaf=5), drop=("history",))
    best = teacher.fit(lists, lists)
    assert best["ndcg@10"] == pytest.approx(np.mean(1 / np.log2(2 + np.arange(n))), abs=0.06)
