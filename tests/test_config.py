import json

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
    assert f"{run / 'last.pt'}: cannot be read" in err and "run again with --restart" in err
    assert main(["train", str(path), "--experiment", "small", "--epochs", "2", "--restart"]) == 0
    assert f"--restart: removed {run}" in capsys.readouterr().out
    assert "resumed" not in (run / "log.txt").read_text()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_resuming_with_a_changed_config_exits_2_naming_the_key(tmp_path, capsys):
    path = _write(tmp_path)
    assert main(["train", str(path), "--experiment", "small", "--epochs", "1"]) == 0
    (tmp_path / "runs" / "small" / "results.json").unlink()  # unfinished
    capsys.readouterr()
    assert main(["train", str(path), "--experiment", "small", "--seed", "5"]) == 2
    assert "trained with another config (train.seed: 1 -> 5); run with --restart" in capsys.readouterr().err


def test_unknown_model_and_bad_params_exit_2(tmp_path, capsys):
    assert main(["train", str(_write(tmp_path, CONFIG.replace("name: dssm", "name: dsm")))]) == 2
    assert "unknown model 'dsm' (have: dssm, senet, dat, inttower, hit, poly, mvke, tarq, cold, din)" in capsys.readouterr().err
    assert main(["train", str(_write(tmp_path, CONFIG.replace("dropout: 0.0", "dropuot: 0.0")))]) == 2
    err = capsys.readouterr().err
    assert "c.yaml: experiments.small.model: dssm with params" in err and "dropuot" in err


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


# The hostile-config corpus: (old, new) edits of CONFIG, or a whole text, and what the error
# must say. Each goes through `cascade train`: exit 2, the file and key named, no traceback, and
# nothing trained.
BAD_CONFIGS = {
    "epochs as text": (("epochs: 2", 'epochs: "5"'), "experiments.small.train.epochs: '5' is not a whole number"),
    "negative lr": (("seed: 1", "seed: 1, lr: -0.001"), "experiments.small.train.lr: -0.001 must be above 0"),
    "batch_size 0": (("batch_size: 64", "batch_size: 0"), "experiments.small.train.batch_size: 0 is below 1"),
    "batch_size -5": (("batch_size: 64", "batch_size: -5"), "experiments.small.train.batch_size: -5 is below 1"),
    "embedding_dim -4": (("embedding_dim: 8", "embedding_dim: -4"), "experiments.small.model.embedding_dim: -4 is below 1"),
    "epochs true": (("epochs: 2", "epochs: true"), "train.epochs: True is not a whole number"),
    "lr nan": (("seed: 1", "seed: 1, lr: .nan"), "train.lr: nan is not a number"),
    "monitor typo": (("seed: 1", "seed: 1, monitor: acu"), "experiments.small.train.monitor: 'acu' is not a validation metric of a 'pointwise' task (it has: auc, gauc, logloss)"),
    "data kind typo": (("kind: synth", "kind: synht"), "experiments.small.data.kind: 'synht' is not one of synth, movielens, recall_output, logs"),
    "params not a mapping": (("params: {hidden: [16, 8], dropout: 0.0}", "params: [16, 8]"), "experiments.small.model.params: [16, 8] is not a mapping"),
    "hidden layer of -3": (("hidden: [16, 8]", "hidden: [-3]"), "experiments.small.model: dssm with params {'hidden': [-3], 'dropout': 0.0}: Trying to create tensor with negative dimension -3"),
    "duplicate key": (("  train: {epochs: 2", "  train: {epochs: 1}\n  train: {epochs: 2"), "line 6: not valid YAML: key 'train' given twice (lines 5 and 6)"),
    "top level a list": ("- base\n- experiments\n", "the top level must be a mapping (key: value lines), got list"),
    "empty file": ("", "the top level must be a mapping (key: value lines), got NoneType"),
    "experiments a list": ("experiments: [small]\n", "'experiments' must be a mapping"),
    "alias bomb": (
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
        "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
        "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\ni: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]\n",
        "its anchors and aliases expand to more than 100,000 values; refused",
    ),
    "out climbs": (("out: OUT", "out: ../elsewhere"), "experiments.small.out: '../elsewhere' climbs out of the directory the command runs in"),
    "out empty": (("out: OUT", "out: ''"), "experiments.small.out: '' is not a folder of its own"),
    "experiment name climbs": (("  small: {}", "  ../../escape: {}"), "experiments: '../../escape' is not a plain name"),
    "experiment name absolute": (("  small: {}", "  /tmp/escape: {}"), "experiments: '/tmp/escape' is not a plain name"),
    "experiment name empty": (("  small: {}", "  '': {}"), "experiments: '' is not a plain name"),
    "logs dir missing": (("kind: synth, dir: DATA", "kind: logs, dir: no_such_logs"), "data.dir: '"),
    "quota order": (("  small: {}", "  small: {task: distill, distill: {prerank_quota: 5, rank_quota: 10}}"), "need 0 < rank_quota < prerank_quota, got 10 and 5"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_hostile_configs_exit_2_naming_file_and_key(case, tmp_path, capsys):
    edit, message = BAD_CONFIGS[case]
    text = CONFIG.replace(*edit) if isinstance(edit, tuple) else edit
    path = _write(tmp_path, text)
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert str(path) in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing trained
    if case != "hidden layer of -3":  # a model's own parameters are checked as it is built, after the data
        assert not (tmp_path / "data").exists()


def test_input_paths_resolve_against_the_config_file(tmp_path, small_dir):
    """data.dir of 'kind: logs' and other configs' paths are read relative to the config file,
    wherever the command runs."""
    import shutil

    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    shutil.copytree(small_dir, tmp_path / "project" / "logs")
    text = CONFIG.replace("kind: synth, dir: DATA", "kind: logs, dir: ../logs")
    text += "  cas: {task: cascade, cascade: {recall: {config: c.yaml, experiment: small}}}\n"
    (folder / "c.yaml").write_text(text.replace("OUT", str(tmp_path / "runs")))
    small, *_, cas = load_config(folder / "c.yaml")
    assert small.data.dir == str(folder / "../logs")
    assert cas.cascade.recall["config"] == str(folder / "c.yaml")
    assert (tmp_path / "project" / "logs" / "schema.json").samefile(small.data.dir + "/schema.json")


KILLABLE = """
import io, sys, time
from pathlib import Path
import cascade.data.store as store
import cascade.train as train
from cascade.cli import main

whole = store.write_atomic


def slow(path, write):
    # every file cascade writes atomically is written half, announced, and finished 0.1 s later:
    # the test kills the process at a chosen announcement, in the middle of that write
    def halves(f):
        buf = io.BytesIO()
        write(buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        print("WRITING", Path(path).name, flush=True)
        time.sleep(0.1)
        f.write(data[len(data) // 2 :])
    return whole(path, halves)


store.write_atomic = train.write_atomic = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_at_random_points_then_rerun_gives_the_uninterrupted_result(tmp_path, capsys):
    import random
    import signal
    import subprocess
    import sys

    path = _write(tmp_path, CONFIG.replace("epochs: 2", "epochs: 4"))
    assert main(["train", str(path), "--experiment", "small", "--out", str(tmp_path / "straight")]) == 0
    capsys.readouterr()
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    command = [sys.executable, str(script), "train", str(path), "--experiment", "small", "--out", str(tmp_path / "killed")]
    rng = random.Random(11)
    kills = []
    for attempt in range(8):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if attempt < 4:  # at the k-th write: inside checkpoint, best.pt, config.json, results.json writes
            k, seen = rng.randint(1, 3), 0  # a rerun writes config.json, a checkpoint or two, results.json
            for line in proc.stdout:
                if line.startswith("WRITING"):
                    seen += 1
                    if seen == k:
                        proc.send_signal(signal.SIGKILL)
                        kills.append(line.split()[1])
                        break
        elif attempt < 6:  # at a random time
            try:
                proc.wait(timeout=rng.uniform(1.5, 4.0))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                kills.append("timed")
        out, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err  # never a traceback, only our kills
    assert proc.returncode == 0, err
    print("killed during:", kills)
    assert any(name in ("last.pt", "prev.pt", "best.pt") for name in kills), kills  # a checkpoint write was cut
    straight, killed = (tmp_path / d / "small" for d in ("straight", "killed"))
    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, killed))
    assert b["test"] == pytest.approx(a["test"], abs=1e-6)
    rows = lambda d: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "samples_per_s")} for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["epoch"] for r in rows(killed)] == [r["epoch"] for r in rows(straight)]  # each epoch once
    for x, y in zip(rows(straight), rows(killed)):
        assert y == pytest.approx(x, abs=1e-6)
