import json

from cascade.cli import main

CONFIG = """
base:
  data: {kind: synth, dir: DATA, synth: {users: 60, items: 400, requests: 300, history_max: 10, quotas: [40, 10, 4, 2], seed: 5}}
  model: {embedding_dim: 8}
  train: {epochs: 1, batch_size: 64, seed: 1, lr: 0.01, monitor: auc}
  out: OUT
  distill: {prerank_quota: 10, rank_quota: 4, lists_per_batch: 16}
experiments:
  recall:
    task: recall
    model: {name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
    train: {monitor: recall@50}
  din:
    task: distill
    model: {name: din, params: {attention_hidden: [8], hidden: [16], dropout: 0.0}}
    train: {monitor: recall@4}
    distill: {teacher: null, exposure_bce: 0, rankflow_bce: 1}
  exposure:
    model: {name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
  distilled:
    task: distill
    model: {name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
    train: {monitor: teacher_recall@4@10}
    distill: {teacher: din, exposure_bce: 0, listwise_kd: 1}
  independent: {task: cascade, cascade: &c {recall: {config: CONFIG, experiment: recall}, recall_quota: 40, prerank_quota: 10, rank_quota: 4, lcron_recall_quota: 20, prerank: exposure, rank: din}}
  kd: {task: cascade, cascade: {<<: *c, prerank: distilled}}
"""


def test_run_does_the_whole_job_then_keeps_what_is_done(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.replace("DATA", str(tmp_path / "data")).replace("OUT", str(tmp_path / "runs")).replace("CONFIG", str(path)))
    assert main(["run", str(path)]) == 0
    first = capsys.readouterr().out
    # data, recall, exposure, din, distilled, two cascades, two exports, eval
    assert "[10/10] eval" in first and "[2/10] train exposure (task: pointwise) ..." in first
    table = first[first.index("cascade   "):].splitlines()
    assert [row.split()[0] for row in table[1:3]] == ["independent", "kd"]
    for name in ("independent", "kd"):
        assert (tmp_path / "runs" / name / "bundle" / "manifest.json").exists()
    report = tmp_path / "runs" / "report"
    entries = json.loads((report / "metrics.json").read_text())["entries"]
    assert [e["label"] for e in entries] == ["independent", "kd"] and (report / "report.html").exists()
    assert f"report: {(report / 'report.html').resolve()}" in first
    # a second run trains nothing and keeps the report
    assert main(["run", str(path)]) == 0
    second = capsys.readouterr().out
    assert second.count("done before, kept") == 10 and "epoch" not in second


def test_run_refuses_a_config_without_a_cascade(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("experiments:\n  only: {model: {name: dssm}}\n")
    assert main(["run", str(path)]) == 2
    assert "no 'task: cascade' experiment" in capsys.readouterr().err


def test_a_bad_override_is_refused_before_anything_runs(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as stop:
        main(["run", str(tmp_path / "c.yaml"), "--epochs", "0"])
    assert stop.value.code == 2 and "--epochs: must be at least 1, got 0" in capsys.readouterr().err


def test_epochs_and_out_override_reach_every_experiment(tmp_path):
    from cascade.config import command_line, load_config

    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.replace("DATA", str(tmp_path / "data")).replace("OUT", str(tmp_path / "runs")).replace("CONFIG", str(path)))
    with command_line({"train": {"epochs": 7, "seed": 3}, "out": str(tmp_path / "elsewhere")}):
        exps = load_config(path)
    assert {e.train.epochs for e in exps} == {7} and {e.train.seed for e in exps} == {3}
    assert {e.run_dir.parent for e in exps} == {tmp_path / "elsewhere"}
    assert load_config(path)[0].train.epochs == 1  # gone after the block
