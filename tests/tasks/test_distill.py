import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.cli import main
from cascade.config import ConfigError, load_config
from cascade.data.lists import build_lists
from cascade.config import DistillConfig
from cascade.tasks.distill import DistillLoss, cascade_report
from cascade.train import Tensors
from tests.conftest import SMALL_DISTILL_BASE, run_in_memory_and_streamed

CONFIG = """
base:
""" + SMALL_DISTILL_BASE + """experiments:
  din:
    task: pointwise
    model: {name: din, params: {attention_hidden: [8], hidden: [16], dropout: 0.0}}
    train: {monitor: auc}
  exposure: {}
  mix: {distill: {exposure_bce: 0, rankflow_bce: 1, tutor: 1, arf: 1, arf_tau: 5, listwise_kd: 1, logit_mse: 0.1, soft_bce: 0.1}}
"""


def _write(tmp_path, text=CONFIG):
    path = tmp_path / "d.yaml"
    path.write_text(text.replace("DATA", str(tmp_path / "data")).replace("OUT", str(tmp_path / "runs")))
    return path


def test_distill_trains_every_mix_from_config_against_one_frozen_teacher(tmp_path, capsys):
    path = _write(tmp_path)
    assert main(["distill", str(path)]) == 0
    out = capsys.readouterr().out
    assert "exposure: test teacher_recall@4@4" in out and "mix: test" in out
    teacher_best = (tmp_path / "runs" / "din" / "best.pt").stat().st_mtime_ns
    cached = tmp_path / "runs" / "din" / "scores" / "test.npy"
    cached_at = cached.stat().st_mtime_ns
    results = {name: json.loads((tmp_path / "runs" / name / "results.json").read_text()) for name in ("exposure", "mix")}
    for r in results.values():
        assert 0 <= r["test"]["teacher_recall@4@10"] <= 1 and 0 < r["test"]["oracle_ratio"] <= 1
    # the teacher as its own pre-ranker passes all of its top-4 on: consistency 1
    assert results["mix"]["reference"]["teacher_as_preranker"]["teacher_recall@4@10"] == pytest.approx(1.0)
    # a second run reuses the trained teacher rather than training it again
    assert main(["distill", str(path), "--experiment", "exposure"]) == 0
    assert (tmp_path / "runs" / "din" / "best.pt").stat().st_mtime_ns == teacher_best
    assert cached.stat().st_mtime_ns == cached_at  # and its cached scores rather than scoring again


def test_distill_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"experiments.din.distill: need 0 < rank_quota < prerank_quota, got 10 and 10"):
        load_config(_write(tmp_path, CONFIG.replace("rank_quota: 4", "rank_quota: 10")))
    with pytest.raises(ConfigError, match="experiments.din.distill: unknown key 'kd'"):
        load_config(_write(tmp_path, CONFIG.replace("lists_per_batch: 16}", "lists_per_batch: 16, kd: 1}")))
    with pytest.raises(ConfigError, match="experiments.mix.distill: tutor, arf, listwise_kd, logit_mse and soft_bce need a teacher"):
        load_config(_write(tmp_path, CONFIG.replace("mix: {distill: {", "mix: {distill: {teacher: null, ")))
    with pytest.raises(ConfigError, match="at least one > 0"):
        load_config(_write(tmp_path, CONFIG.replace("lists_per_batch: 16}", "lists_per_batch: 16, exposure_bce: 0}")))


def test_exposure_bce_sees_only_exposed_items_and_the_mix_adds_terms():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    batch = Tensors(user=torch.zeros(1, 1), items=torch.zeros(1, 3, 1), label=torch.tensor([[1.0, 0.0, 0.0]]), mask=torch.ones(1, 3, dtype=torch.bool), teacher=torch.tensor([[1.0, 3.0, -2.0]]), stage=torch.tensor([[3, 0, 3]]))
    # exposed: items 0 (label 1, logit 2) and 2 (label 0, logit 0.5):
    # (log(1 + e^-2) + log(1 + e^0.5)) / 2 = (0.126928 + 0.974077) / 2 = 0.550503
    assert DistillLoss(DistillConfig(prerank_quota=2, rank_quota=1))(logits, batch).item() == pytest.approx(0.550503, abs=1e-5)
    kd_only = DistillLoss(DistillConfig(prerank_quota=2, rank_quota=1, exposure_bce=0, listwise_kd=1.0))(logits, batch)
    both = DistillLoss(DistillConfig(prerank_quota=2, rank_quota=1, listwise_kd=1.0))(logits, batch)
    assert both.item() == pytest.approx(0.550503 + kd_only.item(), abs=1e-5)


def test_cascade_report_hand_worked(small_world):
    ds, world = small_world
    lists = build_lists(ds, "test").take(np.arange(3))
    teacher = np.where(lists.mask, np.random.default_rng(0).normal(size=lists.mask.shape), 0).astype(np.float32)
    cfg = DistillConfig(prerank_quota=20, rank_quota=8)
    perfect = cascade_report(teacher, teacher, lists, cfg)
    assert perfect["teacher_recall@8@20"] == pytest.approx(1.0) and perfect["teacher_recall@8@20"] == perfect[f"teacher_recall@8@{cfg.prerank_quota}"]
    # a student that ranks the teacher's order backwards passes none of its top-8 into its top-20
    # (each list holds 60 candidates: the teacher's top-8 are the student's bottom-8)
    assert cascade_report(-teacher, teacher, lists, cfg)["teacher_recall@8@20"] == 0.0
    # the tightest cut, the student's own top-8: all of the teacher's for itself, none backwards
    assert perfect["teacher_recall@8@8"] == pytest.approx(1.0) and cascade_report(-teacher, teacher, lists, cfg)["teacher_recall@8@8"] == 0.0


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_cascade_report_is_the_same_whatever_rows_it_reads_at_once(small_world, rows_at_once, seed):
    # every metric is a mean over its own rows (teacher consistency over rows with a candidate,
    # Recall and NDCG over rows with a positive) and the oracle ratio a ratio of sums: the parts
    # must add up to the whole, also where a part has no positive at all
    import cascade.tasks.distill as flow

    ds, world = small_world
    lists = build_lists(ds, "test").take(np.arange(40))
    rng = np.random.default_rng(seed)
    lists.label[rng.random(len(lists)) < 0.5] = 0.0  # about half the rows without a positive
    student, teacher = (np.where(lists.mask, rng.normal(size=lists.mask.shape), 0).astype(np.float32) for _ in range(2))
    cfg = DistillConfig(prerank_quota=30, rank_quota=8)
    whole = cascade_report(student, teacher, lists, cfg, world)  # 40 rows: one part
    cells = flow.REPORT_CELLS
    try:
        flow.REPORT_CELLS = rows_at_once * lists.mask.shape[1]
        parts = cascade_report(student, teacher, lists, cfg, world)
    finally:
        flow.REPORT_CELLS = cells
    assert set(parts) == set(whole) == {"teacher_recall@8@8", "teacher_recall@8@20", "teacher_recall@8@30", "recall@8", "ndcg@8", "oracle_ratio"}
    for name in whole:
        assert parts[name] == pytest.approx(whole[name], rel=1e-9, abs=1e-12, nan_ok=True), name  # no row with a positive: both nan


def test_recall_output_is_the_retrieved_items_labelled_from_the_logs(small_world):
    from cascade.data.store import validate
    from cascade.recall import recall_output
    from cascade.towers.dssm import DSSM
    from cascade.towers.embedding import Embeddings

    ds, _ = small_world
    spec = ds.schema.features
    torch.manual_seed(0)
    model = DSSM(spec.side("user"), spec.in_table("items"), Embeddings(spec, 8), history_len=ds.schema.history_max, hidden=(16, 8), dropout=0.0)
    out = recall_output(ds, model, 30)
    assert validate(out) == []
    c, logged = out.candidates, ds.candidates
    # 30 per request (the catalog is large enough), no (request, item) twice
    assert (np.bincount(c["request_id"])[ds.requests["request_id"]] == 30).all()
    assert len(set(zip(c["request_id"].tolist(), c["item_id"].tolist()))) == len(c["item_id"])
    # a retrieved item the request logged keeps its logged stage and label; the others are 0 / 0
    logged_rows = {(r, i): (s, y) for r, i, s, y in zip(logged["request_id"].tolist(), logged["item_id"].tolist(), logged["stage"].tolist(), logged["label"].tolist())}
    got = list(zip(c["request_id"].tolist(), c["item_id"].tolist(), c["stage"].tolist(), c["label"].tolist()))
    assert all((s, y) == logged_rows.get((r, i), (0, 0.0)) for r, i, s, y in got)
    assert any((r, i) in logged_rows for r, i, _, _ in got)  # some overlap, or the test checks nothing
    history = {r: set(h[h > 0].tolist()) for r, h in zip(ds.requests["request_id"].tolist(), ds.requests["history"])}
    assert not any(i in history[r] for r, i, _, _ in got)
    # keep_positives adds exactly the logged positives recall missed, with their logged stage
    full = recall_output(ds, model, 30, keep_positives=True)
    assert validate(full) == []
    retrieved = {(r, i) for r, i, _, _ in got}
    positives = {(r, i): (s, y) for (r, i), (s, y) in logged_rows.items() if y > 0}
    added = list(zip(*(full.candidates[k][len(c["item_id"]) :].tolist() for k in ("request_id", "item_id", "stage", "label"))))
    assert {(r, i) for r, i, _, _ in added} == set(positives) - retrieved
    assert all((s, y) == positives[(r, i)] for r, i, s, y in added) and len(added) > 0
    # catalog_negatives adds up to 25 new label-0 items per request, never a logged positive
    wide = recall_output(ds, model, 30, catalog_negatives=25, seed=1)
    assert validate(wide) == []  # no (request, item) twice
    drawn = list(zip(*(wide.candidates[k][len(c["item_id"]) :].tolist() for k in ("request_id", "item_id", "label"))))
    per_request = np.bincount([r for r, _, _ in drawn], minlength=len(ds.requests["request_id"]) + 1)
    assert 20 * len(ds.requests["request_id"]) < len(drawn) and per_request.max() <= 25
    assert not any((r, i) in retrieved or (r, i) in positives or y != 0 for r, i, y in drawn)


def test_recall_output_data_needs_a_recall_experiment(tmp_path):
    from cascade.tasks.recall import frozen_recall_output

    with pytest.raises(ConfigError, match="data.recall: 'experiment' is required for kind 'recall_output'"):
        frozen_recall_output({"config": "configs/ml1m_recall.yaml"})
    path = _write(tmp_path)
    with pytest.raises(ConfigError, match="data.recall: experiment 'din' of .* is not a recall task"):
        frozen_recall_output({"config": str(path), "experiment": "din"})


GBDT_TEACHER = """
  gbdt_rank:  # a LightGBM lambdarank ranker on the lists: an order-only teacher
    model: {name: gbdt, params: {n_estimators: 20, num_leaves: 7, min_data_in_leaf: 5, early_stopping: 5}}
    distill: {teacher: null, exposure_bce: 0, rankflow_bce: 1}
  from_gbdt:
    model: {params: {hidden: [16, 8], dropout: 0.0}}
    distill: {teacher: gbdt_rank, exposure_bce: 0, tutor: 1, tutor_alpha: 1.0, arf: 1, arf_tau: 5}
  kd_from_gbdt: {distill: {teacher: gbdt_rank, exposure_bce: 0, listwise_kd: 1}}
  mse_from_gbdt: {distill: {teacher: gbdt_rank, exposure_bce: 0, tutor: 1, tutor_alpha: 0.5}}
"""


def test_a_lightgbm_lambdarank_teacher_feeds_only_the_order_based_terms(tmp_path, capsys):
    # model params only per experiment: the base's would merge into the LightGBM ones
    path = _write(tmp_path, CONFIG.replace("name: dssm, params: {hidden: [16, 8], dropout: 0.0}}", "name: dssm}") + GBDT_TEACHER)
    assert main(["distill", str(path), "--experiment", "from_gbdt"]) == 0
    runs = tmp_path / "runs"
    teacher = json.loads((runs / "gbdt_rank" / "results.json").read_text())
    assert teacher["objective"] == "lambdarank" and (runs / "gbdt_rank" / "model.txt").exists()
    student = json.loads((runs / "from_gbdt" / "results.json").read_text())
    assert student["teacher"] == "gbdt_rank"
    # the scores the student learned from are the ones the LightGBM ranker wrote: the flow with
    # them as their own pre-ranker reports the same as the ranker's own run (below 1: its few
    # trees leave ties at the cut, counted at their expected share)
    reference = student["reference"]["teacher_as_preranker"]
    assert {k: reference[k] for k in teacher["test"]} == pytest.approx(teacher["test"])
    capsys.readouterr()
    # terms that read the teacher's score scale are refused, naming the term
    assert main(["distill", str(path), "--experiment", "kd_from_gbdt"]) == 2
    assert "teacher 'gbdt_rank' is order-only (LightGBM lambdarank): it feeds only tutor at tutor_alpha 1 and arf, not listwise_kd" in capsys.readouterr().err
    assert main(["distill", str(path), "--experiment", "mse_from_gbdt"]) == 2
    assert "not tutor with tutor_alpha 0.5 (its MSE term)" in capsys.readouterr().err


def test_min_history_trains_on_returning_users_lists_only(tmp_path):
    text = CONFIG + "  returning: {distill: {min_history: 8}}\n"
    path = _write(tmp_path, text)
    assert main(["distill", str(path), "--experiment", "exposure"]) == 0
    assert main(["distill", str(path), "--experiment", "returning"]) == 0
    (exp,) = load_config(path, "exposure")
    from cascade.prepare import prepare_data

    lists = build_lists(prepare_data(exp.data), "train")
    n_all, n_returning = len(lists), int(((lists.history > 0).sum(axis=1) >= 8).sum())
    assert 0 < n_returning < n_all
    log = lambda name: (tmp_path / "runs" / name / "log.txt").read_text()  # noqa: E731
    assert f"{n_all:,} train lists" in log("exposure") and f"{n_returning:,} train lists" in log("returning")
    # the teacher's cached train scores still cover every list
    assert np.load(tmp_path / "runs" / "din" / "scores" / "train.npy").shape[0] == n_all


def test_a_dat_student_distils_with_its_own_mimic_loss(tmp_path):
    # two DAT students, same seed and data, mimic weight 0 and 1: the mimic term reaches only the
    # augmented vectors (tests/towers/test_dat.py), so if train_distill adds it they end apart
    text = CONFIG + "".join(f"  dat_m{w}: {{model: {{name: dat, params: {{hidden: [16, 8], dropout: 0.0, mimic_weight: {w}}}}}}}\n" for w in (0, 1))
    path = _write(tmp_path, text)
    for w in (0, 1):
        assert main(["distill", str(path), "--experiment", f"dat_m{w}"]) == 0
    weights = {w: torch.load(tmp_path / "runs" / f"dat_m{w}" / "best.pt", weights_only=True) for w in (0, 1)}
    augmented = [k for k in weights[0] if ".augment." in k]
    assert augmented
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in augmented)


def test_a_streamed_distill_run_learns_what_the_in_memory_one_learns(tmp_path, monkeypatch):
    from cascade.data import store

    monkeypatch.setattr(store, "CANDIDATE_ROW_GROUP", 1000)  # 300 lists of 40 in 12 row groups of 25 lists
    # one batch of every training list per epoch (lists_per_batch above the 240 train lists):
    # the same lists in another order, so the same loss and Adam steps up to float rounding
    text = CONFIG + "".join(f"  kd_{s}: {{data: {{stream: {s}}}, distill: {{exposure_bce: 0, listwise_kd: 1, lists_per_batch: 1000}}}}\n" for s in ("never", "always"))
    path = _write(tmp_path, text)
    results = {s.removeprefix("kd_"): r for s, r in run_in_memory_and_streamed(path, "distill", "kd_never", "kd_always").items()}
    run = lambda s: tmp_path / "runs" / f"kd_{s}"  # noqa: E731
    assert pq.ParquetFile(tmp_path / "data" / "candidates.parquet").metadata.num_row_groups == 12
    for split in ("valid", "test"):
        for metric, value in results["never"][split].items():
            assert results["always"][split][metric] == pytest.approx(value, abs=1e-6), (split, metric)
    for flow, metrics in results["never"]["reference"].items():  # the teacher's scores, streamed and cached
        assert results["always"]["reference"][flow] == pytest.approx(metrics, abs=1e-6), flow
    # the teacher scored the streamed lists once, into a cache beside its best.pt that a second run reads
    cache = tmp_path / "runs" / "din" / "scores" / "train.streamed.npy"
    assert np.load(cache, mmap_mode="r").shape == (240, 40)
    cached_at = cache.stat().st_mtime_ns
    (run("always") / "results.json").unlink()
    assert main(["distill", str(path), "--experiment", "kd_always"]) == 0
    assert cache.stat().st_mtime_ns == cached_at
    # the cache is in the stream's order and looked up by request id; an unknown request is named
    from dataclasses import replace

    from cascade.data.stream import ListStream
    from cascade.tasks.distill import cached_stream_scores

    stream = ListStream.open(tmp_path / "data", "train")
    lookup = cached_stream_scores(None, stream, cache)  # fresh: nothing to score
    lists = stream.collect()
    np.testing.assert_array_equal(lookup(lists.take(np.array([5, 0]))), np.load(cache)[[5, 0]])
    with pytest.raises(ValueError, match="holds no scores for request 99999"):
        lookup(replace(lists.take(np.array([0])), request_id=np.array([99999])))


def test_a_streamed_run_refuses_a_lightgbm_teacher_and_model(tmp_path, capsys):
    text = CONFIG.replace("name: dssm, params: {hidden: [16, 8], dropout: 0.0}}", "name: dssm}") + GBDT_TEACHER + "  streamed_from_gbdt: {data: {stream: always}, distill: {teacher: gbdt_rank, exposure_bce: 0, tutor: 1, tutor_alpha: 1.0}}\n"
    assert main(["distill", str(_write(tmp_path, text)), "--experiment", "streamed_from_gbdt"]) == 2
    assert "distill.teacher: 'gbdt_rank' (gbdt) scores whole in-memory lists" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "gbdt_rank").exists()  # refused before the teacher trained
    with pytest.raises(ConfigError, match=r"experiments.gbdt_rank.data.stream: 'always', but a LightGBM model \(gbdt\) reads its data whole"):
        load_config(_write(tmp_path, text.replace("  gbdt_rank:  # a LightGBM lambdarank ranker on the lists: an order-only teacher\n", "  gbdt_rank:\n    data: {stream: always}\n")))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 5), st.integers(0, 2**31 - 1))
def test_every_loss_term_is_blind_to_padding_after_the_lists(rows, valid, padding, seed):
    # Tensors.batches cuts a batch of lists of different lengths to its longest one; that is
    # only the same training if no term sees the padded columns it drops
    g = torch.Generator().manual_seed(seed)
    n = valid + padding
    lengths = torch.randint(1, valid + 1, (rows,), generator=g)
    mask = torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)
    batch = Tensors(
        user=torch.zeros(rows, 1),
        items=torch.zeros(rows, n, 1),
        label=(torch.rand(rows, n, generator=g) < 0.3).float() * mask,
        mask=mask,
        teacher=torch.randn(rows, n, generator=g) * mask,
        stage=torch.randint(0, 4, (rows, n), generator=g),
    )
    logits = torch.randn(rows, n, generator=g)
    cfg = DistillConfig(prerank_quota=3, rank_quota=2, exposure_bce=1, rankflow_bce=1, tutor=1, arf=1, arf_tau=5, listwise_kd=1, logit_mse=0.1, soft_bce=0.1)
    loss = DistillLoss(cfg)
    width = int(lengths.max())
    assert loss(logits[:, :width], batch.cut(width)).item() == pytest.approx(loss(logits, batch).item(), rel=1e-5, abs=1e-6)
