import numpy as np
import pytest

from cascade.data.store import read_dataset
from export.runtime import CascadeService, RequestError


@pytest.fixture(scope="module")
def service(bundle):
    return CascadeService(bundle)


def test_a_request_gets_the_top_k_best_first_never_from_its_history(service):
    got = service.recommend({"user_id": 5, "segment": 2, "history": [11, 12, 13]})
    assert len(got["items"]) == 4 and len(set(got["items"])) == 4
    assert not {11, 12, 13} & set(got["items"])
    assert got["scores"] == sorted(got["scores"], reverse=True)
    assert set(got["timings_ms"]) == {"recall", "prerank", "rank", "total"}
    assert got["counted"] == {}
    assert len(service.recommend({"user_id": 5, "segment": 2, "history": [11, 12, 13], "k": 2})["items"]) == 2


def test_the_service_serves_what_the_logged_request_would_get(service, trained):
    # the same user and history as a logged test request, through the service and through the
    # bundle's own cascade object called directly on the data set's request arrays
    from cascade.data.lists import build_lists

    config, runs = trained
    ds = read_dataset(runs.parent / "data")
    lists = build_lists(ds, "test").take(slice(0, 5))
    direct = service.cascade.run(lists.take_columns(np.zeros((5, 0), int)))
    for row in range(5):
        n = int((lists.history[row] > 0).sum())
        body = {"user_id": int(lists.user["user_id"][row]), "segment": int(lists.user["segment"][row]), "history": lists.history[row, :n].tolist()}
        assert service.recommend(body)["items"] == direct.items[row].tolist()


def test_unknown_ids_and_long_histories_are_counted_not_refused(service):
    before = dict(service.counts)
    got = service.recommend({"user_id": 10**12, "history": list(range(1, 26)) + [9999]})
    # user_id past the vocabulary (60) -> 0; segment missing -> 0; 26 history events > 10 kept:
    # the last 10 (17..25 and 9999), of which 9999 is past the item vocabulary (400) -> 0
    assert got["counted"] == {"unknown_user_id": 1, "missing_segment": 1, "truncated_history": 1, "unknown_history": 1}
    assert not set(range(17, 26)) & set(got["items"])
    assert service.counts["truncated_history"] == before.get("truncated_history", 0) + 1


@pytest.mark.parametrize(
    "body, field",
    [
        ([1, 2], "request"),
        ({"user_idd": 5}, "user_idd"),
        ({"user_id": "5"}, "user_id"),
        ({"user_id": True}, "user_id"),
        ({"user_id": 5.0}, "user_id"),
        ({"user_id": 5, "history": [[1]]}, "history"),
        ({"user_id": 5, "history": "1,2"}, "history"),
        ({"user_id": 5, "k": 0}, "k"),
        ({"user_id": 5, "k": 5}, "k"),
    ],
)
def test_a_malformed_request_is_refused_naming_the_field(service, body, field):
    with pytest.raises(RequestError) as e:
        service.recommend(body)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_a_batch_serves_each_request_as_alone_and_names_a_bad_one(service):
    a, b = {"user_id": 1, "segment": 3, "history": [4]}, {"user_id": 2, "history": [5, 6]}
    batch = service.recommend_batch([a, b])
    assert [r["items"] for r in batch] == [service.recommend(a)["items"], service.recommend(b)["items"]]
    with pytest.raises(RequestError, match=r"requests\[1\].segment: expected an integer id"):
        service.recommend_batch([a, {"user_id": 2, "segment": [1]}])


@pytest.mark.parametrize("catalog", [30, 500])  # 4 x 20 candidates past / short of the catalog size
def test_dot_scores_from_the_cached_side_take_either_path_to_the_same_numbers(catalog):
    from export.runtime import TwoTowerScorer

    rng = np.random.default_rng(0)
    scorer = TwoTowerScorer.__new__(TwoTowerScorer)
    scorer.items = rng.normal(size=(catalog + 1, 1, 8)).astype(np.float32)
    scorer.flat, scorer.head, scorer.scale = scorer.items[:, 0].copy(), None, 2.0
    u = rng.normal(size=(3, 1, 8)).astype(np.float32)
    ids = rng.integers(1, catalog + 1, size=(3, 20))
    want = 2.0 * np.einsum("bhd,bnhd->bn", u, scorer.items[ids])
    np.testing.assert_allclose(scorer.score_vectors(u, ids), want, rtol=1e-5, atol=1e-5)


def test_the_ranker_scores_a_large_batch_in_chunks_to_the_same_numbers(service, trained, monkeypatch):
    import export.runtime
    from cascade.data.lists import build_lists

    _, runs = trained
    lists = build_lists(read_dataset(runs.parent / "data"), "test")  # 30 lists of 40
    ranker = service.cascade.stages[1].scorer
    whole = ranker(lists)
    monkeypatch.setattr(export.runtime, "CANDIDATES_PER_CALL", 100)  # 2 lists a call
    np.testing.assert_array_equal(ranker(lists), whole)
