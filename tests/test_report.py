import base64
import json
import re

import numpy as np
import pytest

from cascade.cli import main
from cascade.evaluate import GLOSSARY
from cascade.report import tables, write_report


def _entry(label, joint, lat=1.0):
    stage = {"positives_kept": joint, "auc": 0.7, "teacher_recall@10@50": 0.5, "teacher_recall@10@10": 0.2}
    flow = {"joint_recall": joint, "positives_after_prerank": 0.4, "teacher_recall@10@50": 0.5, "oracle_ratio": 0.6, "blame_recall": 0.1, "blame_prerank": 0.1, "blame_rank": 0.2}
    base = {"recall": {"positives_kept@50": 0.5, "positives_kept@200": 0.8}, "most_popular_recall": {"positives_kept@50": 0.3, "positives_kept@200": 0.6}, "random_prerank": flow | {"joint_recall": 0.05, "teacher_recall@10@10": 0.05, "teacher_recall@10@50": 0.25}, "popularity_prerank": flow | {"joint_recall": 0.1}}
    metrics = {"quotas": {"recall": 200, "prerank": 50, "rank": 10}, "stages": {s: dict(stage) for s in ("recall", "prerank", "rank")}, "flow": flow, "baselines": base}
    return {"label": label, "path": label, "kind": "run", "metrics": metrics, "cost": {"flops_per_candidate": {"recall": 100, "prerank": 300, "rank": 9000}, "latency_ms": {"recall": lat, "prerank": lat, "rank": lat}, "latency_of": "torch"}, "notes": []}


def test_seeds_of_one_experiment_become_mean_and_std():
    t = tables([_entry("a", 0.2), _entry("a", 0.3), _entry("b", 0.1)])["Cascades side by side (test)"]
    assert [r[:3] for r in t["rows"]] == [["a", "2", "0.2500 ± 0.0707"], ["b", "1", "0.1000"]]  # std of (0.2, 0.3), ddof 1: 0.1 / sqrt 2


def test_report_html_is_one_self_contained_file_with_real_images(tmp_path):
    out = write_report([_entry("a", 0.2), _entry("b", 0.3, lat=2.0)], tmp_path / "r")
    page = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # consistency, frontier, blame
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere
    assert json.loads((out / "metrics.json").read_text())["entries"][1]["metrics"]["flow"]["joint_recall"] == 0.3
    assert "| a | 1 | 0.2000 |" in (out / "report.md").read_text()


def test_eval_refuses_an_out_directory_of_other_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["eval", str(tmp_path), "--out", str(out)]) == 2
    assert "not a cascade report" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_eval_names_a_path_that_is_no_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "nope: no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "empty: neither a 'task: cascade' run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written


def test_eval_of_a_run_and_its_bundle_agree(trained, bundle, tmp_path, capsys):
    _, runs = trained
    assert main(["eval", str(runs / "frozen"), str(bundle), "--out", str(tmp_path / "r")]) == 0
    entries = json.loads((tmp_path / "r" / "metrics.json").read_text())["entries"]
    assert [e["kind"] for e in entries] == ["run", "bundle"]
    run, served = (e["metrics"]["flow"] for e in entries)
    assert served["joint_recall"] == pytest.approx(run["joint_recall"], abs=1e-9)
    assert "untrained" in entries[0] and entries[0]["cost"]["flops_per_candidate"]["rank"] > entries[0]["cost"]["flops_per_candidate"]["prerank"]
    # the per-request figures the verdict's intervals resample average to the reported ones
    rows = entries[0]["metrics"]["per_request"]
    assert np.mean(rows["flow"]) == pytest.approx(run["joint_recall"], abs=1e-4)  # each value rounded to 4 places
    assert np.mean(rows["random_prerank"]) == pytest.approx(entries[0]["metrics"]["baselines"]["random_prerank"]["joint_recall"], abs=1e-4)
    assert len(set(rows["request_id"])) == len(rows["request_id"]) == len(rows["flow"])
    assert entries[0]["prerank"] == {"experiment": "exposure", "distilled_from": None}  # BCE on exposures: teacher named, unused
    # recall's in-batch softmax gives no probability; BCE on the exposures and RankFlow's BCE on the lists do
    assert entries[0]["probabilities"] == {"recall": False, "prerank": True, "rank": True}
    out = capsys.readouterr().out
    assert "Best cascade: frozen, joint recall" in out and "report.html" in out


def test_eval_shows_a_single_stage_run_beside_a_cascade(trained, tmp_path, capsys):
    _, runs = trained
    assert main(["eval", str(runs / "frozen"), str(runs / "exposure"), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    want = json.loads((runs / "exposure" / "results.json").read_text())["test"]["teacher_recall@4@10"]
    assert "Single-stage runs" in out and f"{want:.4f}" in out
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| frozen | 1 |" in md and "| exposure | distill | 1 |" in md


def test_tables_share_one_vocabulary_and_hold_no_empty_column():
    a, b = _entry("a", 0.2), _entry("b", 0.3)
    a["probabilities"] = {"recall": False, "prerank": False, "rank": True}  # a distilled pre-ranker's scores are no probabilities
    a["cost"]["latency_p95_ms"] = {"recall": 2.0, "prerank": 2.0, "rank": 2.0}
    for e in (a, b):
        del e["metrics"]["flow"]["oracle_ratio"]  # logs without a world
        for flow in ("random_prerank", "popularity_prerank"):
            del e["metrics"]["baselines"][flow]["oracle_ratio"]
    t = tables([a, b])
    side = t["Cascades side by side (test)"]
    assert "oracle ratio" not in side["header"] and "teacher R@10@50" in side["header"]
    stage = t["a: per stage (latency: torch)"]
    logloss = stage["header"].index("LogLoss")
    assert [r[logloss] for r in stage["rows"]] == ["n/a", "n/a", "—"]  # the rank stage's value is simply absent here
    assert stage["header"][-3:] == ["FLOPs / candidate", "p50 ms", "p95 ms"]
    # both cascades share one recall: one row names both, beside the most-popular baseline
    assert t["Recall against its baselines (positives kept by recall)"]["rows"] == [["recall of a, b", "0.5000", "0.8000"], ["most-popular recall", "0.3000", "0.6000"]]
    for table in t.values():
        for i in range(1, len(table["header"])):
            assert any(r[i] not in ("", "—") for r in table["rows"]), (table["header"][i], table)
    names = set(side["header"]) | set(stage["header"])
    glossary = " ".join(GLOSSARY)
    for name in ("joint recall", "oracle ratio", "teacher NDCG@10", "FLOPs / candidate"):
        assert name in glossary
    assert "T-NDCG@10" not in names and "tau vs next" not in names
