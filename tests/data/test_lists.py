import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.data.lists import ListBatch, build_lists, drop_from_history, pointwise_lists
from cascade.data.movielens import convert
from tests.conftest import SMALL
from tests.data.test_movielens import RATINGS, _write_ml


def test_lists_hold_exactly_each_requests_candidates(small_world):
    ds, _ = small_world
    lists = build_lists(ds, "valid")
    req_rows = np.flatnonzero(ds.requests["split"] == "valid")
    assert lists.mask.shape == (len(req_rows), SMALL.quotas[0])
    cand = ds.candidates
    for b in (0, 7, len(lists) - 1):
        rid = lists.request_id[b]
        mine = cand["request_id"] == rid
        got = sorted(zip(lists.item["item_id"][b][lists.mask[b]], lists.stage[b][lists.mask[b]], lists.label[b][lists.mask[b]]))
        want = sorted(zip(cand["item_id"][mine], cand["stage"][mine], cand["label"][mine]))
        assert got == want
        # deepest stage first
        assert (np.diff(lists.stage[b][lists.mask[b]].astype(int)) <= 0).all()
        # item fields gathered by id, user fields by the request's user
        items = lists.item["item_id"][b][lists.mask[b]]
        np.testing.assert_array_equal(lists.item["tags"][b][lists.mask[b]], ds.items["tags"][items - 1])
        user = ds.requests["user_id"][rid - 1]
        assert lists.user["segment"][b] == ds.users["segment"][user - 1]
        np.testing.assert_array_equal(lists.history[b], ds.requests["history"][rid - 1])


def test_truncation_keeps_the_deepest_stages(small_world):
    ds, _ = small_world
    lists = build_lists(ds, "test", max_items=SMALL.quotas[1])
    assert lists.mask.all()
    assert (lists.stage >= 1).all()  # exactly the pre-rank survivors


def test_pointwise_is_the_one_candidate_case(small_world):
    ds, _ = small_world
    flat = pointwise_lists(ds, "test")
    lists = build_lists(ds, "test")
    assert flat.mask.shape == (int(lists.mask.sum()), 1)
    np.testing.assert_array_equal(flat.item["item_id"][:, 0], lists.item["item_id"][lists.mask])
    np.testing.assert_array_equal(flat.label[:, 0], lists.label[lists.mask])
    assert flat.user["segment"].shape == (len(flat),)


def test_batches_cover_every_list_once(small_world):
    ds, _ = small_world
    lists = build_lists(ds, "train")
    seen = np.concatenate([b.request_id for b in lists.batches(64, shuffle=True, seed=3)])
    assert sorted(seen) == sorted(lists.request_id) and not (seen == lists.request_id).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(1, 40))
def test_dropping_from_history_removes_one_item_whatever_the_target(seed, width, batch):
    rng = np.random.default_rng(seed)
    length = rng.integers(0, width + 1, batch)
    history = np.where(np.arange(width) < length[:, None], rng.permutation(1000)[: batch * width].reshape(batch, width) + 1, 0)
    in_hist = rng.random(batch) < 0.5
    target = np.where(in_hist & (length > 0), history[np.arange(batch), np.maximum(length - 1, 0)], 5000)
    out, out_len = drop_from_history(history, length, target, rng)
    np.testing.assert_array_equal(out_len, np.maximum(length - 1, 0))  # label-independent length
    assert not (out == target[:, None]).any()
    for b in range(batch):
        kept = out[b, : out_len[b]]
        assert (out[b, out_len[b] :] == 0).all()
        assert set(kept) <= set(history[b, : length[b]])
        # relative order (most recent last) survives
        pos = [list(history[b]).index(x) for x in kept]
        assert pos == sorted(pos)


def test_ctr_pointwise_lists_drop_the_target(tmp_path):
    ds, _ = convert(_write_ml(tmp_path / "ml", RATINGS), "ctr", seed=0)
    flat = pointwise_lists(ds, "train")
    full = ds.requests["history_len"][flat.request_id - 1]
    got = (flat.history > 0).sum(axis=1)
    np.testing.assert_array_equal(got, np.maximum(full - 1, 0))
    assert not (flat.history == flat.item["item_id"]).any()
    # the per-candidate statistics arrive as per-sample user and item fields
    # per-candidate fields keep their (B, N) shape, N = 1, on either side
    assert flat.user["user_mean_rating"].shape == (len(flat), 1) and flat.item["item_mean_rating"].shape == (len(flat), 1)


def test_positive_ids_are_the_listed_positives_and_zero_elsewhere():
    # row 0: items 4, 9, 2 with labels 1, 0, 1 -> 4, 0, 2; row 1: item 7 is a positive but padding
    # (mask False), item 5 a negative -> 0, 0, 0
    item_id = np.array([[4, 9, 2], [5, 7, 0]])
    label = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = np.array([[True, True, True], [True, False, False]])
    lists = ListBatch(np.arange(2), {}, np.zeros((2, 0)), {"item_id": item_id}, label, np.zeros((2, 3), np.int8), mask)
    np.testing.assert_array_equal(lists.positive_ids, [[4, 0, 2], [0, 0, 0]])
