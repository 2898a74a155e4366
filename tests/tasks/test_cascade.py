import json

import numpy as np
import pytest
import torch

from cascade.cli import main
from cascade.config import ConfigError, load_config
from cascade.data.lists import ListBatch
from cascade.tasks.cascade import LcronLoss, StackedStages, top_of
from cascade.losses.arf import e2e_loss, relax_bce
from cascade.losses.sorting import neural_sort, top_k_indicator
from cascade.train import Tensors
from tests.conftest import SMALL_DISTILL_BASE, one_thread

CONFIG = """
base:
""" + SMALL_DISTILL_BASE + """  cascade: {recall: {config: CONFIG, experiment: recall}, recall_quota: 40, prerank_quota: 10, rank_quota: 4, lcron_recall_quota: 20, rounds: 1, self_epochs: 1, tutor_epochs: 1, lcron_epochs: 1, tau: 20.0, catalog_negatives: 20}
experiments:
  recall:
    task: recall
    train: {monitor: recall@50}
  din:
    model: {name: din, params: {attention_hidden: [8], hidden: [16], dropout: 0.0}}
    train: {monitor: recall@4}
    distill: {teacher: null, exposure_bce: 0, rankflow_bce: 1}
  exposure: {}
  frozen: {task: cascade, cascade: {method: frozen, prerank: exposure}}
  ranker_as_preranker: {task: cascade, cascade: {method: frozen, prerank: din}}
  rankflow: {task: cascade, cascade: {method: rankflow, prerank: exposure}}
  rankflow_retrieval: {task: cascade, cascade: {method: rankflow, prerank: exposure, recall_self: retrieval, self_positives: listed, trained: [recall]}}
  lcron: {task: cascade, cascade: {method: lcron, prerank: exposure}}
  lcron_prerank: {task: cascade, cascade: {method: lcron, prerank: exposure, trained: [prerank]}}
"""


def _write(tmp_path, text=CONFIG):
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("DATA", str(tmp_path / "data")).replace("OUT", str(tmp_path / "runs")).replace("CONFIG", str(path)))
    return path


def _lists(label, mask):
    b, n = label.shape
    return ListBatch(np.arange(b), {}, np.zeros((b, 0)), {"item_id": np.arange(1, b * n + 1).reshape(b, n)}, label, np.zeros((b, n), np.int8), mask)


def test_top_of_keeps_the_top_m_plus_the_marked_items_in_list_order():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [3.0, 1.0, 2.0, 0.0]])
    mask = np.array([[True, True, True, True], [True, True, True, False]])
    label = np.array([[1.0, 0, 0, 0], [0, 0, 0, 0]])
    cut = top_of(_lists(label, mask), scores, 2, also=label > 0)
    # row 0: top-2 are items 2 (0.9) and 4 (0.7); item 1 is marked (a positive) and joins.
    # row 1: top-2 are items 5 (3.0) and 7 (2.0); nothing marked: its third slot is padding.
    assert set(cut.item["item_id"][0][cut.mask[0]].tolist()) == {1, 2, 4}
    assert cut.item["item_id"][1][cut.mask[1]].tolist() == [5, 7]
    assert cut.item["item_id"][0][cut.mask[0]].tolist() == [1, 2, 4]  # list order, not score order
    assert cut.label[0][cut.mask[0]].sum() == 1  # labels travel with their items


def test_stacked_stages_score_each_stage_on_its_own_columns(small_world):
    from cascade.data.lists import build_lists
    from cascade.models import score_lists
    from cascade.towers.dssm import DSSM
    from cascade.towers.embedding import Embeddings

    ds, _ = small_world
    spec = ds.schema.features
    torch.manual_seed(0)
    # different fields per stage, so a wrong column split would show
    first = DSSM(spec.side("user"), spec.in_table("items"), Embeddings(spec, 8), history_len=ds.schema.history_max, hidden=(16, 8), dropout=0.0)
    second = DSSM(spec.side("user")[:1], spec.side("item")[:2], Embeddings(spec, 4), history_len=0, hidden=(8, 4), dropout=0.0)
    lists = build_lists(ds, "test").take(np.arange(5))
    stacked = StackedStages(first, second).eval()
    packed = stacked.pack(lists, np.zeros(lists.mask.shape, np.float32))
    with torch.no_grad():
        both = stacked(packed.user, packed.items).numpy()
    np.testing.assert_allclose(np.where(lists.mask, both[..., 0], 0), score_lists(first, lists), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.where(lists.mask, both[..., 1], 0), score_lists(second, lists), rtol=1e-5, atol=1e-5)


def test_lcron_loss_is_e2e_plus_half_the_stage_losses_at_unit_sigma():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 2, generator=g)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[2, 6:] = False
    teacher = torch.randn(3, 8, generator=g)
    batch = Tensors(user=torch.zeros(3, 1), items=torch.zeros(3, 8, 1), label=torch.zeros(3, 8), mask=mask, teacher=teacher)
    p = [neural_sort(logits[..., i], mask, 2.0) for i in (0, 1)]
    gt = top_k_indicator(teacher, mask, 2)
    # sigma = 1 at the start: L = e2e + L_recall / 2 + L_prerank / 2 + log 1 + log 1
    expected = e2e_loss(p, [5, 3], gt, mask) + relax_bce(p[0], gt, mask, 5) / 2 + relax_bce(p[1], gt, mask, 3) / 2
    assert LcronLoss((5, 3), 2, 2.0)(logits, batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_cascade_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"experiments.frozen.cascade.recall: 'experiment' is required"):
        load_config(_write(tmp_path, CONFIG.replace("experiment: recall}, recall_quota", "}, recall_quota")))
    with pytest.raises(ConfigError, match=r"experiments.lcron.cascade: method 'lcorn' is not one of frozen, rankflow, lcron"):
        load_config(_write(tmp_path, CONFIG.replace("method: lcron", "method: lcorn")))
    with pytest.raises(ConfigError, match=r"need 0 < rank_quota < prerank_quota < recall_quota, got 4, 10 and 8"):
        load_config(_write(tmp_path, CONFIG.replace("recall_quota: 40", "recall_quota: 8")))
    with pytest.raises(ConfigError, match=r"experiments.lcron_prerank.cascade.trained: lcron trains recall or prerank, and \['rank'\] names neither"):
        load_config(_write(tmp_path, CONFIG.replace("trained: [prerank]", "trained: [rank]")))


def test_cascade_train_runs_each_method_and_a_rerun_resumes_to_the_same_result(tmp_path, capsys):
    path = _write(tmp_path)
    names = ("frozen", "ranker_as_preranker", "rankflow", "rankflow_retrieval", "lcron", "lcron_prerank")
    for name in names:
        assert main(["train", str(path), "--experiment", name]) == 0
    runs = tmp_path / "runs"
    results = {name: json.loads((runs / name / "results.json").read_text()) for name in names}
    for name, r in results.items():
        for row in r["rounds"]:
            t = row["test"]
            # survival can only shrink down the cascade
            assert 1 >= t["positives_retrieved"] >= t["positives_after_prerank"] >= t["joint_recall"] >= 0, name
            assert 0 < t["oracle_ratio"] <= 1
    assert [row["after"] for row in results["rankflow"]["rounds"]] == ["start", "round 1"]
    assert [row["after"] for row in results["lcron"]["rounds"]] == ["start", "lcron"]
    # every method starts from the same warm-up cascade
    assert results["rankflow"]["rounds"][0]["test"] == results["frozen"]["rounds"][0]["test"] == results["lcron"]["rounds"][0]["test"]
    # the ranker as its own pre-ranker passes all its top-4 on
    assert results["ranker_as_preranker"]["test"]["teacher_recall@4@10"] == pytest.approx(1.0)
    # rankflow and lcron retrained the recall tower, in their own folders: the warm-up is untouched
    warm = torch.load(runs / "recall" / "best.pt", weights_only=True)
    rankflow_recall = torch.load(runs / "rankflow" / "round1" / "recall_tutor" / "best.pt", weights_only=True)
    lcron_recall = {k.removeprefix("first."): v for k, v in torch.load(runs / "lcron" / "lcron" / "best.pt", weights_only=True).items() if k.startswith("first.")}
    for retrained in (rankflow_recall, lcron_recall):
        assert retrained.keys() == warm.keys()
        assert any(not torch.equal(retrained[k], warm[k]) for k in warm)
    # lcron with trained: [prerank] keeps recall as it was and trains the pre-ranker alone
    stacked = torch.load(runs / "lcron_prerank" / "lcron" / "best.pt", weights_only=True)
    warm_prerank = torch.load(runs / "exposure" / "best.pt", weights_only=True)
    assert all(torch.equal(stacked[f"first.{k}"], v) for k, v in warm.items())
    assert any(not torch.equal(stacked[f"second.{k}"], v) for k, v in warm_prerank.items())
    assert results["lcron_prerank"]["test"]["positives_retrieved"] == results["frozen"]["test"]["positives_retrieved"]
    assert "lcron: recall + pre-ranker (recall frozen) on" in (runs / "lcron_prerank" / "lcron" / "log.txt").read_text()
    for phase in ("rank_self", "prerank_self", "recall_self", "prerank_tutor", "recall_tutor"):
        assert (runs / "rankflow" / "round1" / phase / "best.pt").exists(), phase
    # trained: [recall] runs only recall's phases; recall_self: retrieval trains on (request, positive) pairs
    assert sorted(d.name for d in (runs / "rankflow_retrieval" / "round1").iterdir()) == ["recall_self", "recall_tutor"]
    assert "(request, positive) pairs, sampled softmax" in (runs / "rankflow_retrieval" / "round1" / "recall_self" / "log.txt").read_text()
    # a rerun resumes every phase (nothing trains again) and reports the same cascade
    assert main(["train", str(path), "--experiment", "rankflow"]) == 0
    again = json.loads((runs / "rankflow" / "results.json").read_text())
    assert again["rounds"] == results["rankflow"]["rounds"]
    assert "resumed from" in (runs / "rankflow" / "round1" / "recall_tutor" / "log.txt").read_text()


def test_a_cascade_phase_adds_the_towers_own_regulariser(tmp_path):
    # the same DAT model and seed, one phase run with its mimic loss at weight 0 and at weight 1
    # (twice): if fit_phase adds the model's regulariser the two weights end apart
    from dataclasses import replace

    from cascade.config import DistillConfig
    from cascade.data.lists import build_lists
    from cascade.tasks.cascade import fit_phase
    from cascade.models import build_model, list_tensors
    from cascade.prepare import prepare_data

    (exp,) = load_config(_write(tmp_path), "rankflow")
    dat = replace(exp, model=replace(exp.model, name="dat", params={"hidden": [16, 8], "dropout": 0.0, "mimic_weight": 1.0}))
    ds = prepare_data(exp.data)
    lists = build_lists(ds, "train")
    self_loss = DistillConfig(teacher=None, exposure_bce=0, rankflow_bce=1.0, prerank_quota=10, rank_quota=4)
    trained = {}
    for name in ("no_mimic", "dat", "dat_again"):
        torch.manual_seed(0)
        model = build_model(dat, ds)
        model.mimic_weight = 0.0 if name == "no_mimic" else 1.0
        fit_phase(model, lists, lambda lst: list_tensors(lst, model), self_loss, exp, tmp_path / f"phase_{name}", 1)
        trained[name] = {k: v for k, v in model.state_dict().items() if ".augment." in k}
    assert trained["dat"]
    assert all(torch.equal(trained["dat"][k], trained["dat_again"][k]) for k in trained["dat"])  # seeded: the gap is the mimic term
    assert any(not torch.equal(trained["dat"][k], trained["no_mimic"][k]) for k in trained["dat"])


def test_a_cascade_takes_its_stages_and_their_teacher_as_named(tmp_path):
    # `named` maps every experiment a cascade names, its stages and the distilled pre-ranker's
    # teacher (here: each at seed 5 in a folder of its own), but not the recall tower, whose
    # lists the stages learn from: so only the mapped folders and recall's may appear
    from dataclasses import replace

    from cascade.tasks import train_experiment
    from cascade.models import MODELS
    from teachers import TEACHERS

    kd = "  kd: {distill: {teacher: din, exposure_bce: 0, listwise_kd: 1.0}}\n  distilled: {task: cascade, cascade: {method: frozen, prerank: kd}}\n"
    path = _write(tmp_path, CONFIG + kd)
    (exp,) = load_config(path, "distilled")
    at_5 = lambda e: replace(e, name=f"{e.name}_s5", train=replace(e.train, seed=5))  # noqa: E731
    train_experiment(exp, path, {**MODELS, **TEACHERS}, named=at_5)
    runs = tmp_path / "runs"
    assert sorted(d.name for d in runs.iterdir()) == ["din_s5", "distilled", "kd_s5", "recall"]
    for stage in ("din_s5", "kd_s5"):
        assert json.loads((runs / stage / "config.json").read_text())["train"]["seed"] == 5
    assert json.loads((runs / "recall" / "config.json").read_text())["train"]["seed"] == 1


STREAMED = """
  frozen_never: {task: cascade, data: {stream: never}, cascade: {method: frozen, prerank: exposure}}
  frozen_always: {task: cascade, data: {stream: always}, cascade: {method: frozen, prerank: exposure}}
  rankflow_never: {task: cascade, data: {stream: never}, cascade: {method: rankflow, prerank: exposure, catalog_negatives: 0, lists_per_batch: 100000}}
  rankflow_always: {task: cascade, data: {stream: always}, cascade: {method: rankflow, prerank: exposure, catalog_negatives: 0, lists_per_batch: 100000}}
  lcron_never: {task: cascade, data: {stream: never}, cascade: {method: lcron, prerank: exposure, catalog_negatives: 0, lists_per_batch: 100000}}
  lcron_always: {task: cascade, data: {stream: always}, cascade: {method: lcron, prerank: exposure, catalog_negatives: 0, lists_per_batch: 100000}}
"""


def test_a_streamed_cascade_reports_and_trains_what_the_in_memory_one_does(tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq

    from cascade.data import store

    monkeypatch.setattr(store, "CANDIDATE_ROW_GROUP", 1000)  # 300 requests of 40 candidates in 12 row groups
    path = _write(tmp_path, CONFIG + STREAMED)
    runs = tmp_path / "runs"
    for method in ("frozen", "rankflow", "lcron"):
        for stream in ("never", "always"):
            with one_thread():  # both paths' steps on one thread: the same float rounding
                assert main(["train", str(path), "--experiment", f"{method}_{stream}"]) == 0
        assert pq.ParquetFile(tmp_path / "data" / "candidates.parquet").metadata.num_row_groups == 12
        memory, streamed = (json.loads((runs / f"{method}_{s}" / "results.json").read_text()) for s in ("never", "always"))
        # the same lists, a row group at a time: every metric of every round (a mean over rows, added up in parts)
        assert [row["after"] for row in streamed["rounds"]] == [row["after"] for row in memory["rounds"]]
        for got, want in zip(streamed["rounds"], memory["rounds"]):
            for split in ("valid", "test"):
                assert got[split] == pytest.approx(want[split], abs=1e-6, nan_ok=True), (method, got["after"], split)
        # one batch of every list an epoch: the same lists in another order, so the same steps up
        # to float rounding (measured: at most 1.1e-5 apart, against the 1e-3 or more that one
        # Adam step at lr 0.01 moves a weight, checked below)
        for stage in ("recall", "prerank", "rank"):
            want = torch.load(runs / f"{method}_never" / "stages" / f"{stage}.pt", weights_only=True)
            got = torch.load(runs / f"{method}_always" / "stages" / f"{stage}.pt", weights_only=True)
            for key, value in want.items():
                torch.testing.assert_close(got[key], value, atol=5e-5, rtol=1e-4, msg=f"{method} {stage} {key}")
        assert not (runs / f"{method}_always" / "stage_data").exists()  # the spilled stages are as large as the logs: gone
    out = capsys.readouterr().out
    assert "frozen_always: " in out and "streams: each round's stage data is written under" in out and "frozen_never: " not in out.split("streams:")[0][-40:]
    assert "(streamed)" in (runs / "rankflow_always" / "round1" / "prerank_tutor" / "log.txt").read_text()
    assert "(streamed)" not in (runs / "rankflow_never" / "round1" / "prerank_tutor" / "log.txt").read_text()
    assert "(streamed)" in (runs / "lcron_always" / "lcron" / "log.txt").read_text()
    # the trained cascades moved away from their warm-up stages, so the equality above says something
    for method in ("rankflow", "lcron"):
        warm = torch.load(runs / "exposure" / "best.pt", weights_only=True)
        trained = torch.load(runs / f"{method}_always" / "stages" / "prerank.pt", weights_only=True)
        assert max((trained[k] - v).abs().max().item() for k, v in warm.items() if v.is_floating_point()) > 1e-3, method


TREND_DATA = "{kind: recall_output, dir: OUT_trend_data, recall: {config: CONFIG, experiment: recall, n: 40, trend_days: [1, 7], trend_scale: list}}"
STREAMED_TREND = f"""
  din_trend:
    data: {TREND_DATA}
    model: {{name: din, params: {{attention_hidden: [8], hidden: [16], dropout: 0.0}}}}
    train: {{monitor: recall@4}}
    distill: {{teacher: null, exposure_bce: 0, rankflow_bce: 1}}
  exposure_trend: {{data: {TREND_DATA}, distill: {{teacher: din_trend}}}}
  trend_never: {{task: cascade, data: {{stream: never}}, cascade: {{method: frozen, prerank: exposure_trend, rank: din_trend}}}}
  trend_always: {{task: cascade, data: {{stream: always}}, cascade: {{method: frozen, prerank: exposure_trend, rank: din_trend}}}}
"""


def test_a_streamed_cascade_gives_its_stages_the_item_trend_of_every_row_group(tmp_path, monkeypatch):
    # The stages read each candidate's exposures in the 1 and 7 days before its request (on the
    # list scale), counted over every logged exposure: a streamed cascade gathers them from every
    # row group before it writes the stage data a row group at a time. Its reports must be the
    # in-memory cascade's; counting only a row group's own exposures would change the trend of
    # requests whose window reaches into the row groups before, and with it the stages' scores.
    from cascade.data import store

    monkeypatch.setattr(store, "CANDIDATE_ROW_GROUP", 1000)  # 300 requests of 40 candidates in 12 row groups
    path = _write(tmp_path, CONFIG + STREAMED_TREND)
    runs = tmp_path / "runs"
    for stream in ("never", "always"):
        assert main(["train", str(path), "--experiment", f"trend_{stream}"]) == 0
    memory, streamed = (json.loads((runs / f"trend_{s}" / "results.json").read_text()) for s in ("never", "always"))
    for split in ("valid", "test"):
        assert streamed["rounds"][0][split] == pytest.approx(memory["rounds"][0][split], abs=1e-6, nan_ok=True), split
    assert 0 < memory["test"]["teacher_recall@4@10"] < 1
