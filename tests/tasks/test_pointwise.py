import numpy as np

from cascade.data.store import read_dataset, validate
from cascade.tasks.recall import frozen_recall_output


def test_cross_fitted_recall_output_gives_each_training_request_a_recall_that_never_saw_it(trained):
    path, runs = trained
    plain = frozen_recall_output({"config": str(path), "experiment": "recall", "n": 30})
    fitted = frozen_recall_output({"config": str(path), "experiment": "recall", "n": 30, "folds": 2})
    assert validate(fitted) == []
    req = fitted.requests
    train_ids = set(req["request_id"][req["split"] == "train"].tolist())

    def lists(ds, keep):
        c = ds.candidates
        rows = np.isin(c["request_id"], sorted(keep))
        return c["request_id"][rows], c["item_id"][rows]

    held_out = set(req["request_id"].tolist()) - train_ids
    for a, b in zip(lists(plain, held_out), lists(fitted, held_out)):  # valid and test lists unchanged
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(lists(plain, train_ids)[1], lists(fitted, train_ids)[1])  # train lists from other towers
    # each fold's tower trained with its fold as validation only: every training request sits in
    # exactly one fold's validation split, and that fold's tower trained on the others
    seen_as_valid = []
    for f in (1, 2):
        fold = read_dataset(path.parent / f"data_fold{f}of2")  # beside the logs (DATA = root/data)
        assert (runs / f"recall_fold{f}of2" / "results.json").exists()
        valid = fold.requests["request_id"][fold.requests["split"] == "valid"]
        assert set(valid.tolist()) <= train_ids
        seen_as_valid += valid.tolist()
    assert sorted(seen_as_valid) == sorted(train_ids)
    per_list = np.bincount(fitted.candidates["request_id"])
    assert per_list[sorted(train_ids)].max() <= 30


STREAM_CONFIG = """
base:
  data: {kind: synth, dir: DATA, synth: {users: 60, items: 400, requests: 300, history_max: 10, quotas: [40, 10, 4, 2], seed: 3}}
  model: {embedding_dim: 8, name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
  train: {epochs: 2, batch_size: 100000, seed: 1, lr: 0.01, monitor: auc}
  out: OUT
  task: pointwise
experiments:
  memory: {data: {stream: never}}
  streamed: {data: {stream: always}}
"""


def test_a_streamed_pointwise_run_learns_what_the_in_memory_one_learns(tmp_path):
    from tests.conftest import run_in_memory_and_streamed

    path = tmp_path / "s.yaml"
    path.write_text(STREAM_CONFIG.replace("DATA", str(tmp_path / "data")).replace("OUT", str(tmp_path / "runs")))
    # one batch of every training exposure per epoch: the same rows in another order, so the same
    # BatchNorm statistics, loss and Adam steps up to float rounding
    results = run_in_memory_and_streamed(path, "train", "memory", "streamed")
    for metric in ("auc", "logloss", "gauc"):
        assert abs(results["streamed"]["test"][metric] - results["memory"]["test"][metric]) < 1e-5, metric
    assert results["streamed"]["samples_per_rank"] == results["memory"]["samples_per_rank"]


def test_a_typo_in_data_stream_is_named(tmp_path, capsys):
    from cascade.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(STREAM_CONFIG.replace("DATA", str(tmp_path / "data")).replace("OUT", str(tmp_path / "runs")).replace("stream: never", "stream: nevr"))
    assert main(["train", str(path), "--experiment", "memory"]) == 2
    assert "stream: 'nevr' is not one of auto, always, never" in capsys.readouterr().err


def test_a_whole_read_of_logs_that_would_stream_is_warned_of(small_dir, monkeypatch, capsys):
    from cascade.config import DataConfig
    from cascade.data import stream
    from cascade.prepare import prepare_data

    # the small world's 24,000 candidates at this schema's bytes each pass a share of 1e-9 of any machine
    monkeypatch.setattr(stream, "MEMORY_SHARE", 1e-9)
    need = stream.in_memory_bytes(small_dir) / 2**30
    prepare_data(DataConfig(dir=str(small_dir)))  # auto: a whole read of logs that do not fit
    err = capsys.readouterr().err
    assert f"warning: {small_dir}: this step reads every candidate into memory, about {need:,.1f} GiB" in err
    for quiet in (DataConfig(dir=str(small_dir), stream="never"), DataConfig(dir=str(small_dir))):
        prepare_data(quiet, candidates=quiet.stream == "never")  # in memory as asked / a streamed run's read of the rest
    assert capsys.readouterr().err == ""
