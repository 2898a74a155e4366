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
