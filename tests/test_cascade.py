import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.cascade import Cascade, Catalog, Stage, TorchScorer, requests_batch, top_mask
from cascade.data.lists import build_lists
from cascade.recall import TowerRetriever
from cascade.towers.dssm import DSSM
from cascade.towers.embedding import Embeddings


def _catalog():
    ids = np.arange(1, 11)
    return Catalog(ids, {"item_id": ids, "colour": ids % 3 + 1})


def _requests(b=1):
    return requests_batch({"user_id": np.arange(1, b + 1)}, np.zeros((b, 2), np.int64))


def by_id(lists):
    return lists.item["item_id"].astype(np.float32)


def by_minus_id(lists):
    return -lists.item["item_id"].astype(np.float32)


def test_each_stage_scores_what_the_last_passed_on_and_keeps_its_quota():
    lists = _catalog().attach(_requests(), np.array([[5, 3, 9, 1, 0]]))
    flow = Cascade([Stage("prerank", by_id, 3), Stage("rank", by_minus_id, 2)])
    out = flow.run(lists, candidates=lists)
    # pre-rank by id keeps 9, 5, 3 (of 5, 3, 9, 1; the 0 is padding); rank by -id shows 3 then 5
    assert out.stages[0].kept.tolist() == [[True, True, True, False, False]]
    assert out.stages[1].lists.item["item_id"].tolist() == [[9, 5, 3]]
    assert out.items.tolist() == [[3, 5]] and out.scores.tolist() == [[-3.0, -5.0]]
    # the catalog's fields travel with the ids: colour = id % 3 + 1
    assert out.stages[1].lists.item["colour"].tolist() == [[1, 3, 1]]


def test_full_mode_scores_the_whole_list_and_cuts_the_same():
    lists = _catalog().attach(_requests(), np.array([[5, 3, 9, 1, 0]]))
    flow = Cascade([Stage("prerank", by_id, 3), Stage("rank", by_minus_id, 2)])
    full = flow.run(lists, candidates=lists, full=True)
    assert full.stages[1].scores.shape == (1, 5)  # the ranker saw all five columns
    # survivors after rank: 5 and 3 (ids), i.e. columns 0 and 1; 1 scores best by -id but was cut
    assert full.stages[1].kept.tolist() == [[True, True, False, False, False]]
    assert full.items.tolist() == flow.run(lists, candidates=lists).items.tolist() == [[3, 5]]


def test_a_tie_at_the_cut_goes_to_the_earlier_candidate():
    kept = top_mask(np.array([[1.0, 2.0, 2.0, 2.0]]), np.ones((1, 4), bool), 2)
    assert kept.tolist() == [[False, True, True, False]]


def test_quotas_must_shrink():
    with pytest.raises(ValueError, match="shrink"):
        Cascade([Stage("prerank", by_id, 3), Stage("rank", by_id, 3)])
    with pytest.raises(ValueError, match="retriever"):
        Cascade([Stage("rank", by_id, 3)], retriever=lambda r, n: None, recall_quota=10)


@settings(max_examples=50, deadline=None)
@given(st.permutations(list(range(1, 11))), st.integers(1, 9))
def test_survivors_do_not_depend_on_candidate_order(order, m):
    # distinct scores (the id), so the cut is unique whatever the order
    lists = _catalog().attach(_requests(), np.array([order]))
    out = Cascade([Stage("prerank", by_id, m + 1), Stage("rank", by_id, m)]).run(lists, candidates=lists)
    assert out.items.tolist() == [list(range(10, 10 - m, -1))]


def test_recall_retrieves_from_the_catalog_without_the_history(small_world):
    ds, _ = small_world
    spec = ds.schema.features
    torch.manual_seed(0)
    tower = DSSM(spec.side("user"), spec.side("item"), Embeddings(spec, 8), history_len=ds.schema.history_max, hidden=(16, 8)).eval()
    requests = build_lists(ds, "test")
    flow = Cascade([Stage("prerank", TorchScorer(tower), 20), Stage("rank", TorchScorer(tower), 5)], TowerRetriever(tower, ds), 60, Catalog.from_dataset(ds))
    out = flow.run(requests)
    recalled = out.stages[0].lists.item["item_id"]
    assert recalled.shape == (len(requests), 60) and (recalled > 0).all()
    assert not ((recalled[:, :, None] == requests.history[:, None, :]) & (requests.history[:, None, :] > 0)).any()
    assert out.items.shape == (len(requests), 5)
    # the same tower at every stage: the final top-5 is the recall's own top-5, in order
    np.testing.assert_array_equal(out.items, recalled[:, :5])
    assert set(out.seconds) == {"recall", "prerank", "rank"}


@pytest.mark.parametrize("scale", ["count", "list"])
def test_the_catalog_gives_a_retrieved_item_the_trend_its_stored_list_has(small_world, scale):
    # the same (request, item) pairs two ways: stored by with_trend in a recall output's lists,
    # and computed by the catalog at each request's time for items it attaches (on the list
    # scale, ranked among the same list either way)
    from cascade.data.trend import ItemTrend, TrendSpec, with_trend

    ds, _ = small_world
    spec = TrendSpec((1, 7.5), scale)
    lists = build_lists(with_trend(ds, ItemTrend.from_dataset(ds), spec), "test")
    attached = Catalog.from_dataset(ds, spec).attach(lists.take_columns(np.zeros((len(lists), 0), int)), np.where(lists.mask, lists.item["item_id"], 0))
    for name in ("item_trend_1d", "item_trend_7.5d"):
        np.testing.assert_array_equal(np.where(lists.mask, attached.item[name], 0), np.where(lists.mask, lists.item[name], 0))
        assert (attached.item[name][~lists.mask] == 0).all()  # padding stays 0
        assert len(np.unique(lists.item[name][lists.mask])) > 1  # the check is not over a constant
    with pytest.raises(ValueError, match="request's time"):
        Catalog.from_dataset(ds, TrendSpec((1,), scale)).attach(_requests(), np.array([[1, 2]]))


class ZSum:
    """z(id) + z(colour) over the list given (a blend's form): its order depends on the list."""

    list_dependent = True

    def __call__(self, lists):
        from cascade.blend import standardised

        m = torch.from_numpy(lists.item["item_id"] > 0)
        z = lambda name: standardised(torch.tensor(lists.item[name], dtype=torch.float32), m)  # noqa: E731
        return (z("item_id") + z("colour")).numpy()


def test_a_list_dependent_ranker_cuts_in_full_mode_what_serving_cuts():
    # ids 1..7, pre-rank by id keeps 7, 6, 5, 4 (colours id % 3 + 1: 2, 1, 3, 2).
    # Served, the ranker sees those four: z(id) = (id - 5.5) / 1.118 -> 4: -1.342, 5: -0.447,
    # 6: 0.447, 7: 1.342; z(colour) = (c - 2) / 0.707 -> 4: 0, 5: 1.414, 6: -1.414, 7: 0; sums
    # 4: -1.342, 5: 0.967, 6: -0.967, 7: 1.342 -> it shows 7 then 5.
    # Over the whole list 1..7 instead, z(id) = (id - 4) / 2 and z(colour) = (c - 2) / 0.756 give
    # 5: 0.5 + 1.323 = 1.823 above 7: 1.5: 5 then 7, the order a full run would cut if it scored
    # the whole list.
    lists = _catalog().attach(_requests(), np.array([[1, 2, 3, 4, 5, 6, 7]]))
    flow = Cascade([Stage("prerank", by_id, 4), Stage("rank", ZSum(), 2)])
    served, full = flow.run(lists, candidates=lists), flow.run(lists, candidates=lists, full=True)
    assert served.items.tolist() == full.items.tolist() == [[7, 5]]
    assert full.stages[1].kept.tolist() == [[False, False, False, False, True, False, True]]
    assert full.stages[1].scores.shape == (1, 7)  # the whole list still scored, for the figures
    naive = ZSum()
    naive.list_dependent = False
    assert Cascade([Stage("prerank", by_id, 4), Stage("rank", naive, 2)]).run(lists, candidates=lists, full=True).items.tolist() == [[5, 7]]
