import pytest

from cascade.cli import main
from cascade.config import ConfigError, load_config

CONFIG = """
base:
  data: {kind: synth, dir: DATA, synth: {users: 60, items: 400, requests: 300, history_max: 10, quotas: [40, 10, 4, 2]}}
  model: {embedding_dim: 8, name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
  train: {epochs: 2, batch_size: 64, seed: 1}
  out: OUT
experiments:
  small: {}
  wide: {model: {params: {hidden: [32, 8]}}, train: {lr: 0.01}}
"""


def _write(tmp_path, text=CONFIG):
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("DATA", str(tmp_path / "data")).replace("OUT", str(tmp_path / "runs")))
    return path


def test_experiments_merge_over_base(tmp_path):
    small, wide = load_config(_write(tmp_path))
    assert small.model.params == {"hidden": [16, 8], "dropout": 0.0}
    assert wide.model.params == {"hidden": [32, 8], "dropout": 0.0}  # merged, not replaced
    assert wide.train.lr == 0.01 and wide.train.batch_size == 64 and small.train.lr == 0.001
    assert [e.name for e in load_config(_write(tmp_path), "wide")] == ["wide"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (("batch_size: 64", "batchsize: 64"), "experiments.small.train: unknown key 'batchsize'"),
        (("embedding_dim: 8", "embedding_dim: 8, color: red"), "experiments.small.model: unknown key 'color'"),
        (("experiments:", "experiment:"), "needs an 'experiments' mapping"),
        (("seed: 1", "seed: 1, device: gpu0"), "experiments.small.train.device: 'gpu0' is not a torch device"),
    ],
)
def test_config_errors_name_the_key(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, CONFIG.replace(*edit)))


def test_train_from_config_writes_a_run(tmp_path, capsys):
    path = _write(tmp_path)
    assert main(["train", str(path), "--experiment", "small"]) == 0
    run = tmp_path / "runs" / "small"
    for f in ("config.json", "log.txt", "metrics.jsonl", "last.pt", "best.pt", "results.json"):
        assert (run / f).exists(), f
    assert "small: test auc" in capsys.readouterr().out  # "small: test auc 0.xxxx logloss ..."


def test_a_run_with_a_broken_checkpoint_exits_2_naming_it(tmp_path, capsys):
    path = _write(tmp_path)
    run = tmp_path / "runs" / "small"
    assert main(["train", str(path), "--experiment", "small", "--epochs", "1"]) == 0
    (run / "results.json").unlink()  # as if killed before the run finished
    (run / "last.pt").write_bytes(b"")  # and its checkpoint lost
    capsys.readouterr()
    assert main(["train", str(path), "--experiment", "small", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'last.pt'}: cannot be read to resume this run" in err and "delete it" in err


def test_unknown_model_and_bad_params_exit_2(tmp_path, capsys):
    assert main(["train", str(_write(tmp_path, CONFIG.replace("name: dssm", "name: dsm")))]) == 2
    assert "unknown model 'dsm' (have: dssm, senet, dat, inttower, hit, din)" in capsys.readouterr().err
    assert main(["train", str(_write(tmp_path, CONFIG.replace("dropout: 0.0", "dropuot: 0.0")))]) == 2
    err = capsys.readouterr().err
    assert "error: model:" in err and "dropuot" in err


def test_gbdt_trains_from_config(tmp_path, capsys):
    # model params belong to each experiment: base params would merge into every model's
    text = CONFIG.replace(", params: {hidden: [16, 8], dropout: 0.0}", "") + "  boosted: {model: {name: gbdt, params: {n_estimators: 30, min_data_in_leaf: 5}}}\n"
    assert main(["train", str(_write(tmp_path, text)), "--experiment", "boosted"]) == 0
    assert (tmp_path / "runs" / "boosted" / "model.txt").exists()
    assert "boosted: test auc" in capsys.readouterr().out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="experiments.small.train.device: 'cuda' asked for, but this torch .* sees no CUDA device"):
        load_config(_write(tmp_path, CONFIG.replace("seed: 1", "seed: 1, device: cuda")))
