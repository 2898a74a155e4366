import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade import metrics as M
from cascade.data.lists import build_lists
from dataclasses import replace

from cascade.data.trend import ItemTrend, TrendSpec
from cascade.eval_data import EvalData
from cascade.evaluate import Truth, evaluate, exposure_metrics, exposure_scores, flops_per_candidate, load_saved, most_popular, run_flow, torch_cascade, trending
from cascade.cascade import Catalog, requests_batch
from cascade.models import MODELS
from teachers import TEACHERS


def test_most_popular_skips_the_history_and_keeps_popularity_order():
    # counts by id 0..5: item 3 (9) > 1 (7) > 5 (4) > 2 (2) > 4 (1); the request saw 1 and 5.
    counts = np.array([0, 7, 2, 9, 1, 4], float)
    req = requests_batch({}, np.array([[1, 5, 0]]))
    assert most_popular(req, counts, np.arange(1, 6), 3).tolist() == [[3, 2, 4]]


def test_trending_takes_the_items_most_exposed_before_each_request_history_excluded():
    # exposures (item at ts): 3 at 10, 20, 30; 1 at 25; 4 at 5 and 35; 2 at 40 (after the request)
    trend = ItemTrend.from_events(np.array([3, 3, 3, 1, 4, 4, 2]), np.array([10, 20, 30, 25, 5, 35, 40]))
    req = replace(requests_batch({}, np.array([[3, 0]])), ts=np.array([36]))
    # counts before 36: item 3 -> 3 (history: never retrieved), 4 -> 2, 1 -> 1, 2 and 5 -> 0 (tie:
    # the lower id first)
    assert trending(req, trend, np.arange(1, 6), 3, 1).tolist() == [[4, 1, 2]]
    assert trending(req, trend, np.arange(1, 6), 5, 1).tolist() == [[4, 1, 2, 5, 0]]  # 0: the catalog ran out


def test_truth_marks_logged_positives_and_exposures_per_row():
    truth = Truth(positives=np.array([[4, 0], [7, 9]]), exposed=np.array([[4, 5], [9, 0]]), n_positives=np.array([1, 2]))
    ids = np.array([[4, 5, 7, 0], [9, 4, 7, 1]])
    assert truth.contains(ids, "positives").tolist() == [[True, False, False, False], [True, False, True, False]]
    assert truth.contains(ids, "exposures").tolist() == [[True, True, False, False], [True, False, False, False]]


@pytest.fixture(scope="module")
def saved(trained):
    _, runs = trained
    return load_saved(runs / "frozen", models={**MODELS, **TEACHERS})


@pytest.fixture(scope="module")
def report(saved):
    return evaluate(saved.cascade(), saved.data, saved.world)


def test_report_figures_agree_with_the_metrics_module(saved, report):
    """Recompute the headline figures from one plain run of the same cascade with cascade.metrics."""
    fr = run_flow(saved.cascade(), build_lists(saved.ds, "test"), saved.world)
    recall, prerank, rank = fr.run.stages
    lists = fr.lists
    positive = lists.mask & (lists.label > 0)
    n_pos = fr.truth.n_positives
    assert report["flow"]["joint_recall"] == pytest.approx(M.joint_recall([prerank.scores, rank.scores], [10, 4], positive, lists.mask, n_pos))
    assert report["stages"]["prerank"]["teacher_recall@4@10"] == pytest.approx(M.teacher_recall_at_k_at_m(prerank.scores, rank.scores, 4, 10, lists.mask))
    assert report["stages"]["recall"]["kendall_tau"] == pytest.approx(M.kendall_tau(recall.scores, rank.scores, lists.mask))
    # the rank stage's kept positives are the survivors of every cut: joint recall (no ties in float scores)
    assert report["stages"]["rank"]["positives_kept"] == pytest.approx(report["flow"]["joint_recall"])
    # AUC on the exposures, scored directly by the ranker
    logged = build_lists(saved.ds, "test")
    exposed = logged.mask & (logged.stage == 3)
    scores = saved.cascade().stages[1].scorer(logged)
    assert report["stages"]["rank"]["auc"] == pytest.approx(M.auc(logged.label[exposed], scores[exposed]))
    assert exposure_metrics(*exposure_scores(saved.cascade().stages[1], logged))["auc"] == pytest.approx(report["stages"]["rank"]["auc"])


def test_stage_blame_adds_up_to_the_whole_best_utility(report):
    flow = report["flow"]
    parts = flow["oracle_ratio"] + flow["blame_recall"] + flow["blame_prerank"] + flow["blame_rank"]
    assert parts == pytest.approx(1.0)
    assert min(flow["blame_recall"], flow["blame_prerank"], flow["blame_rank"]) >= -1e-12


def test_baselines_are_computed_on_the_same_lists(report):
    base = report["baselines"]
    assert base["recall"]["positives_kept@40"] == pytest.approx(report["stages"]["recall"]["positives_kept"])
    assert base["trending_recall"]["days"] in (1, 7, 30)  # the synthetic world is temporal
    for name in ("random_prerank", "popularity_prerank", "trending_prerank"):
        row = base[name]
        # a pre-ranker only chooses among recall's list: it never keeps more than recall did
        assert 0 <= row["joint_recall"] <= row["positives_after_prerank"] <= base["recall"]["positives_kept@40"] + 1e-12
        assert row["teacher_recall@4@40"] == pytest.approx(1.0)  # m = the whole list keeps everything


def test_two_tower_flops_are_the_user_tower_once_plus_a_dot_per_candidate(saved):
    # DSSM pre-ranker: total(n) = U + 2 * D * n with D = 8 (the tower's last width), so the per-candidate
    # figures at n = 10 and n = 20 satisfy f(10) * 10 - f(20) * 20 = -2 * 8 * 10 whatever U is.
    lists = build_lists(saved.ds, "test")
    f10, f20 = (flops_per_candidate(saved.models["prerank"], lists, "prerank", n) for n in (10, 20))
    assert f10 * 10 - f20 * 20 == pytest.approx(-160)
    assert f10 * 10 - 160 > 0  # the user tower costs something
    # a ranker scores every candidate in full: its per-candidate figure does not depend on n
    r10, r20 = (flops_per_candidate(saved.models["rank"], lists, "rank", n) for n in (10, 20))
    assert r10 == pytest.approx(r20, rel=0.02)  # up to the history's key projection, shared per request


TREND_DATA = "{kind: recall_output, dir: TRENDDATA, recall: {config: CONFIG, experiment: recall, n: 40, trend_days: [1, 7], trend_scale: SCALE}}"
TREND_STAGES = """
  din_trend:
    data: TREND_DATA
    model: {name: din, params: {attention_hidden: [8], hidden: [16], dropout: 0.0}}
    train: {monitor: recall@4}
    distill: {teacher: null, exposure_bce: 0, rankflow_bce: 1}
  exposure_trend:
    data: TREND_DATA
    model: {name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
    distill: {teacher: din_trend}
  frozen_trend: {task: cascade, cascade: {method: frozen, prerank: exposure_trend, rank: din_trend}}
"""


@pytest.mark.parametrize("scale", ["count", "list"])
def test_a_cascade_with_the_item_trend_evaluates_as_it_trained_and_exports(tmp_path, capsys, scale):
    # The stages train on recall-output lists that store each candidate's trend; `cascade eval`
    # retrieves from the catalog, which computes it at each request's time. Both paths must give
    # the cascade the same inputs, so eval's joint recall equals the training report's. On the
    # list scale that holds only if the catalog ranks a candidate among the same recall list and
    # the later stages keep that value.
    import json

    from cascade.cli import main
    from cascade.job import evaluate_path
    from tests.conftest import CONFIG

    path = tmp_path / "c.yaml"
    text = CONFIG.replace("experiments:", "experiments:" + TREND_STAGES.replace("TREND_DATA", TREND_DATA.replace("SCALE", scale)), 1)
    path.write_text(text.replace("TRENDDATA", str(tmp_path / "trend_data")).replace("DATA", str(tmp_path / "data")).replace("OUT", str(tmp_path / "runs")).replace("CONFIG", str(path)))
    assert main(["train", str(path), "--experiment", "frozen_trend"]) == 0, capsys.readouterr().err
    trained = json.loads((tmp_path / "runs" / "frozen_trend" / "results.json").read_text())["test"]
    saved = load_saved(tmp_path / "runs" / "frozen_trend", models={**MODELS, **TEACHERS})
    assert saved.trend == TrendSpec((1, 7), scale)
    assert {"item_trend_1d", "item_trend_7d"} <= {s.name for s in saved.models["prerank"].item_slots}
    # its item tower reads the trend, so it runs per candidate (no cache): total(n) = U + n (I + 2 D), so
    # f(10) * 10 - f(20) * 20 = -10 (I + 2 D), below the cached tower's -10 * 2 D = -160 (D = 8)
    some = saved.data.first("test", 4)
    lists = Catalog.from_dataset(saved.ds, saved.trend).add_trend(some)
    f10, f20 = (flops_per_candidate(saved.models["prerank"], lists, "prerank", n) for n in (10, 20))
    assert f10 * 10 - f20 * 20 < -160 - 10 * 100  # the item tower costs more than 100 FLOPs a candidate
    flow = evaluate_path(tmp_path / "runs" / "frozen_trend")["metrics"]["flow"]
    for key in ("positives_retrieved", "positives_after_prerank", "joint_recall", "teacher_recall@4@10"):
        assert flow[key] == pytest.approx(trained[key], abs=1e-9), key
    assert 0 < trained["teacher_recall@4@10"] < 1  # the pre-ranker's top-10 holds some of the ranker's top-4, not all
    # exported, its bundle serves the trend from live counters (tests/export/test_replay.py): the
    # export's own parity, after the test split's exposures, is whole on every stage
    capsys.readouterr()
    assert main(["export", str(tmp_path / "runs" / "frozen_trend"), "--out", str(tmp_path / "bundle")]) == 0
    out = capsys.readouterr().out
    assert f"online item trend [1, 7] days, '{scale}' scale" in out
    assert "same_recall_survivors 1 same_prerank_survivors 1 same_rank_survivors 1 same_final_order 1" in out


def _close(got, want, path=()):
    """Every number of ``want`` equals ``got``'s to 1e-9 (NaN equal NaN), the random pre-ranker's
    draws, the timings and the per-request rows aside; the AUC family to 1e-6, its float32 scores
    coming from batches of other shapes."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for key in want:
            if key not in ("random_prerank", "seconds", "per_request"):
                _close(got[key], want[key], path + (key,))
    else:
        tolerance = 1e-6 if path[-1] in ("auc", "gauc", "logloss") else 1e-9
        assert got == pytest.approx(want, abs=tolerance, nan_ok=True), path


@pytest.fixture(scope="module")
def grouped_logs(saved, tmp_path_factory):
    """The frozen cascade's logs rewritten in 12 row groups of 1,000 candidates (read-only)."""
    import pyarrow.parquet as pq

    from cascade.data import store

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store, "CANDIDATE_ROW_GROUP", 1000)
        out = store.write_dataset(saved.ds, tmp_path_factory.mktemp("eval") / "logs")
    assert pq.ParquetFile(out / "candidates.parquet").metadata.num_row_groups == 12
    return out


def test_an_evaluation_in_parts_reports_what_the_whole_one_does(saved, report, grouped_logs, monkeypatch):
    # Every figure is a mean over rows (or a ratio of sums), added up over the parts; the AUC
    # family is computed once over the gathered exposures. So the streamed evaluation (a row
    # group at a time) and an in-memory one in blocks of 7 requests must both give the report
    # of one block of all 30 test requests.
    import cascade.eval_data as eval_data

    streamed = EvalData.read(grouped_logs, streamed=True)
    assert streamed.streamed and len(streamed.ds.candidates["item_id"]) == 0  # the index only
    assert [len(p) for p in streamed.lists("test")] == [5, 25]  # the last 30 requests (a split by time), in the last 2 row groups
    np.testing.assert_array_equal(streamed.popularity(), saved.data.popularity())
    whole = ItemTrend.from_dataset(saved.ds)
    np.testing.assert_array_equal(streamed.trend().item, whole.item)
    np.testing.assert_array_equal(streamed.trend().ts, whole.ts)
    got = evaluate(torch_cascade(streamed.ds, saved.models, saved.quotas), streamed, saved.world)
    _close(got, report)
    monkeypatch.setattr(eval_data, "BLOCK_REQUESTS", 7)
    assert [len(p) for p in saved.data.lists("test")] == [7, 7, 7, 7, 2]
    _close(evaluate(saved.cascade(), saved.data, saved.world), report)
    assert 0 <= report["baselines"]["random_prerank"]["joint_recall"] <= 1


def test_a_streamed_evaluation_stops_at_a_bad_candidate_naming_its_row(grouped_logs, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cascade.data.store import DataError

    bad = tmp_path / "bad"
    shutil.copytree(grouped_logs, bad)
    table = pq.read_table(bad / "candidates.parquet")
    item = table.column("item_id").to_numpy().copy()
    item[10_500] = 99_999  # in the 11th row group; the catalog holds ids up to 400
    table = table.set_column(table.schema.get_field_index("item_id"), "item_id", pa.array(item))
    pq.write_table(table, bad / "candidates.parquet", row_group_size=1000)
    data = EvalData.read(bad, streamed=True)  # the requests index reads: the candidates wait
    with pytest.raises(DataError, match=r"candidates.parquet.*item_id.*10500"):
        list(data.lists("test"))


def test_cascade_eval_streams_when_the_cascade_run_did(saved, trained, tmp_path, capsys):
    # stages.json keeps the cascade's data.stream; `cascade eval` reads the logs as it says
    import json
    import shutil

    from cascade.job import evaluate_path

    _, runs = trained
    run = tmp_path / "frozen"
    shutil.copytree(runs / "frozen", run)
    stages = json.loads((run / "stages.json").read_text())
    assert stages["data_stream"] == "auto"
    in_memory = evaluate_path(run)
    assert "streamed" not in capsys.readouterr().out
    (run / "stages.json").write_text(json.dumps(stages | {"data_stream": "always"}))
    assert load_saved(run, models={**MODELS, **TEACHERS}).data.streamed
    streamed = evaluate_path(run)
    assert "streamed (data.stream), read a row group at a time" in capsys.readouterr().out
    _close(streamed["metrics"], in_memory["metrics"])
    _close(streamed["untrained"], in_memory["untrained"])
    assert streamed["cost"]["flops_per_candidate"] == in_memory["cost"]["flops_per_candidate"]


def test_exposures_scored_in_rows_of_their_request_score_as_one_at_a_time(saved, monkeypatch):
    import cascade.evaluate as E

    monkeypatch.setattr(E, "EXPOSURES_PER_ROW", 2)
    logged = build_lists(saved.ds, "test")
    stage = logged.stage.copy()
    stage[::2, :5] = np.where(logged.mask[::2, :5], 3, stage[::2, :5])  # every other request exposes 5 or more: split over 3 lists
    logged = replace(logged, stage=stage)
    for st in saved.cascade().stages:
        y, s, groups = exposure_scores(st, logged)
        rows, cols = np.nonzero(logged.mask & (logged.stage == 3))
        alone = np.asarray(st.scorer(logged.take(rows).take_columns(cols[:, None])), np.float64)[:, 0]
        assert len(s) == len(rows) > 0 and np.allclose(s, alone, atol=1e-5)
        assert np.array_equal(groups, logged.request_id[rows]) and np.array_equal(y, logged.label[rows, cols])


def test_a_list_dependent_stage_has_no_score_for_an_exposure_alone(saved):
    stage = saved.cascade().stages[1]
    stage.scorer.list_dependent = True  # as a blend: standardised over its list
    y, s, groups = exposure_scores(stage, build_lists(saved.ds, "test"))
    assert len(y) == len(s) == len(groups) == 0 and exposure_metrics(y, s, groups) == {}


def test_cells_gathers_candidates_and_pads_the_rest():
    lists = build_lists_of_ids(np.array([[5, 6, 7], [8, 9, 0]]))
    got = lists.cells(np.array([1, 0, 0]), np.array([[1, 0], [2, 0], [0, 1]]), np.array([[True, True], [True, False], [True, True]]))
    assert got.item["item_id"].tolist() == [[9, 8], [7, 0], [5, 6]]
    assert got.mask.tolist() == [[True, True], [True, False], [True, True]]
    assert got.request_id.tolist() == [2, 1, 1] and got.history.shape == (3, 1)


def build_lists_of_ids(ids):
    from cascade.data.lists import ListBatch

    b, n = ids.shape
    return ListBatch(np.arange(1, b + 1), {"user_id": np.arange(1, b + 1)}, np.zeros((b, 1), np.int64), {"item_id": ids}, np.zeros((b, n), np.float32), np.zeros((b, n), np.int8), ids > 0, {}, None)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_trending_equals_a_full_sort_of_the_searched_counts(data):
    # the reference: every catalog cell's count searched, the history set to -1, a stable sort by
    # count (ties to the lower catalog position), -1 cells padded as 0. The fast path sweeps the
    # requests in time order and takes the top n by argpartition; a few requests at random times,
    # several items tied, some blocks of one request (``cells``) must not change a cell.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    trend = ItemTrend.from_events(rng.integers(1, 9, 60), rng.integers(0, 5 * 86_400, 60))
    catalog, n_req = np.arange(1, 8), data.draw(st.integers(1, 9))
    n, days = data.draw(st.integers(1, 9)), data.draw(st.sampled_from([0.5, 1, 3]))
    req = replace(requests_batch({}, rng.integers(0, 9, (n_req, 3))), ts=rng.integers(0, 6 * 86_400, n_req))
    counts = trend.counts(np.broadcast_to(catalog, (n_req, len(catalog))), req.ts, days).astype(np.float64)
    counts[(req.history[:, :, None] == catalog[None, None]).any(1)] = -1.0
    order = np.argsort(-counts, axis=1, kind="stable")[:, :n]
    want = np.where(np.take_along_axis(counts, order, 1) >= 0, catalog[order], 0)
    np.testing.assert_array_equal(trending(req, trend, catalog, n, days, cells=data.draw(st.sampled_from([7, 20, 1 << 21]))), want)
