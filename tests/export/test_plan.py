import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.cascade import Cascade, Catalog, Stage, requests_batch
from cascade.cli import main
from cascade.evaluate import flow_figures, load_saved
from cascade.models import MODELS
from export.plan import CostCurves, QualityGrid, _interp, choose, quality_grid
from teachers import TEACHERS

ITEMS = 12


def test_interpolation_is_linear_between_grid_sizes_and_extends_the_last_segment():
    ms = np.array([[1.0, 3.0, 4.0]])  # at 10, 20, 40 candidates
    assert _interp([10, 20, 40], ms, 15)[0] == pytest.approx(2.0)  # halfway from 1 to 3
    assert _interp([10, 20, 40], ms, 30)[0] == pytest.approx(3.5)  # halfway from 3 to 4
    assert _interp([10, 20, 40], ms, 80)[0] == pytest.approx(6.0)  # 4 + (80-40)/20 * 1
    assert _interp([10, 20, 40], ms, 10)[0] == 1.0


def _curves():
    # two requests; recall and pre-rank cost 1 ms at 20 candidates and 2 at 40; rank 1 ms at 5,
    # 3 at 10; the second request costs twice as much everywhere; no rest
    recall = np.array([[1.0, 2.0], [2.0, 4.0]])
    return CostCurves([20, 40], [5, 10], recall, recall.copy(), np.array([[1.0, 3.0], [2.0, 6.0]]), np.zeros(2))


def test_a_plans_latency_adds_each_stage_at_its_input_size():
    c = _curves()
    # quotas (40, 10): recall 2 + pre-rank 2 + rank 3 = 7 ms for the first request, 14 for the second
    assert c.per_request(40, 10).tolist() == [7.0, 14.0]
    # p99 of two values, numpy's linear rule: 7 + 0.99 * (14 - 7)
    assert c.p99(40, 10) == pytest.approx(13.93)


def test_the_plan_is_the_best_joint_recall_that_fits_the_budget():
    c = _curves()
    per_request = np.full((4, 2, 2), np.nan)
    per_request[:, 0, 0] = 0.25  # (20, 5)
    per_request[:, 1, 0] = 0.50  # (40, 5)
    per_request[:, 1, 1] = 0.75  # (40, 10); (20, 10) is no cascade: P must stay below R
    q = QualityGrid([20, 40], [5, 10], 2, per_request)
    # p99s: (20, 5) ~ 5.97 ms (1+1+1 | 2+2+2), (40, 5) ~ 9.95, (40, 10) ~ 13.93
    assert choose(c, q, 10.0).quotas == {"recall": 40, "prerank": 5, "rank": 2}
    assert choose(c, q, 20.0).quotas == {"recall": 40, "prerank": 10, "rank": 2}
    assert choose(c, q, 20.0).joint_recall == 0.75
    none = choose(c, q, 5.0)
    assert none.quotas is None and none.p99_ms == pytest.approx(5.97)


class NearTheListsMean:
    """A list-dependent scorer: items whose colour is nearest the mean colour of the list it is
    given score highest (id breaks ties), so the same item ranks differently in another list."""

    list_dependent = True

    def __call__(self, lists):
        x = lists.item["colour"].astype(np.float64)
        n = np.maximum(lists.mask.sum(axis=1, keepdims=True), 1)
        mean = np.where(lists.mask, x, 0).sum(axis=1, keepdims=True) / n
        return (-((x - mean) ** 2) + 0.01 * lists.item["item_id"]).astype(np.float32)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_the_quality_grid_is_what_serving_each_quota_pair_keeps(data):
    """Property: joint recall at every (R, P) equals the share of each request's positives that
    ``Cascade.run`` (the serving path, each stage scoring only what it is passed) shows with those
    quotas, for a pointwise pre-ranker and a list-dependent ranker."""
    b = 3
    ids = np.arange(1, ITEMS + 1)
    colour = np.array(data.draw(st.lists(st.integers(1, 4), min_size=ITEMS, max_size=ITEMS)))
    catalog = Catalog(ids, {"item_id": ids, "colour": colour})
    recall_score = np.array(data.draw(st.lists(st.lists(st.floats(0, 1), min_size=ITEMS, max_size=ITEMS), min_size=b, max_size=b)))
    pre_score = np.array(data.draw(st.lists(st.integers(0, 5), min_size=ITEMS + 1, max_size=ITEMS + 1)), np.float32)

    def retrieve(requests, n):
        order = np.argsort(-recall_score[requests.request_id], axis=1, kind="stable")[:, :n]
        return order + 1, np.take_along_axis(recall_score[requests.request_id], order, 1)

    def prerank(lists):
        return pre_score[lists.item["item_id"]]

    requests = requests_batch({"user_id": np.arange(1, b + 1)}, np.zeros((b, 1), np.int64), request_id=np.arange(b))
    positives = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=ITEMS, max_size=ITEMS), min_size=b, max_size=b)))
    positives[:, 0] = True  # every request has a positive
    logged = catalog.attach(requests, np.tile(ids, (b, 1)))
    logged.label = positives.astype(np.float32)
    k, recall_sizes, prerank_sizes = 2, [4, 8, 12], [3, 5, 7]
    cascade = Cascade([Stage("prerank", prerank, 7), Stage("rank", NearTheListsMean(), k)], retrieve, 12, catalog)
    grid = quality_grid(cascade, [logged], recall_sizes, prerank_sizes)
    for i, r in enumerate(recall_sizes):
        for j, p in enumerate(prerank_sizes):
            if p >= r:
                assert np.isnan(grid.per_request[:, i, j]).all()
                continue
            served = Cascade([Stage("prerank", prerank, p), Stage("rank", NearTheListsMean(), k)], retrieve, r, catalog).run(requests)
            shown = np.array([positives[row, served.items[row][served.items[row] > 0] - 1].sum() for row in range(b)])
            assert grid.per_request[:, i, j] == pytest.approx(shown / positives.sum(axis=1)), (r, p)


def test_plan_at_the_runs_own_quotas_matches_cascade_eval_and_export_serves_its_choice(trained, bundle, tmp_path, capsys):
    # the bundle's run: recall 40 -> pre-rank 10 -> rank 4; every test request for the quality
    _, runs = trained
    out = tmp_path / "plan"
    assert main(["plan", str(bundle), "--budget-ms", "0.001", "1000", "--recall-quotas", "20,40", "--prerank-quotas", "6,10", "--requests", "100000", "--cost-requests", "20", "--out", str(out)]) == 0
    result = json.loads((out / "plan.json").read_text())
    saved = load_saved(runs / "frozen", models={**MODELS, **TEACHERS})
    want = flow_figures(saved.cascade(), saved.data)["joint_recall"]
    assert result["current"]["joint_recall"] == pytest.approx(want, abs=1e-9)
    assert result["quality_requests"] > 0
    tight, loose = result["plans"]
    assert tight["quotas"] is None  # nothing runs in a microsecond
    best = max(result["grid"], key=lambda g: (g["joint_recall"], -g["p99_ms"]))
    assert (loose["quotas"]["recall"], loose["quotas"]["prerank"], loose["quotas"]["rank"]) == (best["recall"], best["prerank"], 4)
    printed = capsys.readouterr().out
    assert "nothing on the grid fits" in printed and f"--quotas {best['recall']},{best['prerank']},4" in printed
    served = tmp_path / "served"
    assert main(["export", str(runs / "frozen"), "--quotas", "20,6,4", "--out", str(served)]) == 0
    manifest = json.loads((served / "manifest.json").read_text())
    assert [s["quota"] for s in manifest["stages"]] == [20, 6, 4]


def test_plan_and_export_refuse_bad_input_naming_it(bundle, tmp_path, capsys):
    assert main(["plan", str(tmp_path), "--budget-ms", "5"]) == 2
    assert "not a bundle" in capsys.readouterr().err
    assert main(["plan", str(bundle), "--budget-ms", "5", "--prerank-quotas", "3,10"]) == 2  # 3 <= rank quota 4
    assert "every pre-rank quota above the rank quota 4" in capsys.readouterr().err
    assert main(["export", str(bundle), "--quotas", "20,20,4", "--out", str(tmp_path / "b")]) == 2
    assert "quotas must shrink" in capsys.readouterr().err
    assert main(["export", str(bundle), "--quotas", "20,6", "--out", str(tmp_path / "b")]) == 2
    assert "expected three whole numbers" in capsys.readouterr().err
