import json

import numpy as np
import pytest

from cascade.saved import STAGE_NAMES, SavedError, SavedStage, SavedStages, finished, read_results, read_stages, write_results, write_stages


def _stages() -> SavedStages:
    return SavedStages({name: SavedStage(f"/cfg/{name}.yaml", f"exp_{name}", quota, f"stages/{name}.pt") for name, quota in zip(STAGE_NAMES, (200, 50, 10))}, "never")


def test_stages_read_back_as_written(tmp_path):
    blend = {"din": 1.0, "trend_1d": 0.25}
    saved = _stages()
    saved = SavedStages({**saved.stages, "rank": SavedStage("/cfg/rank.yaml", "blend", 10, "stages/rank.pt", blend)}, saved.data_stream)
    write_stages(tmp_path, saved)
    back = read_stages(tmp_path)
    assert back == saved
    assert back.weights("prerank") == tmp_path / "stages" / "prerank.pt"
    raw = json.loads((tmp_path / "stages.json").read_text())
    # the file as `cascade export` of older runs reads it: the stream key first, then the stages in order
    assert list(raw) == ["data_stream", "recall", "prerank", "rank"]
    assert raw["rank"]["blend"] == blend and "blend" not in raw["recall"]


def test_a_missing_or_incomplete_stages_file_names_the_file_and_key(tmp_path):
    with pytest.raises(SavedError, match=r"stages\.json: missing"):
        read_stages(tmp_path)
    write_stages(tmp_path, _stages())
    raw = json.loads((tmp_path / "stages.json").read_text())
    del raw["prerank"]["quota"]
    (tmp_path / "stages.json").write_text(json.dumps(raw))
    with pytest.raises(SavedError, match=r"stages\.json: prerank: 'quota' is missing"):
        read_stages(tmp_path)
    raw["prerank"]["quota"] = 50
    del raw["rank"]
    (tmp_path / "stages.json").write_text(json.dumps(raw))
    with pytest.raises(SavedError, match=r"no 'rank' stage"):
        read_stages(tmp_path)


def test_results_mark_a_finished_run_and_keep_numpy_scalars(tmp_path):
    run = tmp_path / "run"
    assert not finished(run)
    with pytest.raises(SavedError, match="results.json: missing"):
        read_results(run)
    write_results(run, {"experiment": "x", "test": {"auc": np.float32(0.75), "n": 3}})
    assert finished(run)
    # np.float32(0.75) is exact in binary, so it reads back as 0.75
    assert read_results(run) == {"experiment": "x", "test": {"auc": 0.75, "n": 3}}
    (run / "results.json").write_text("{not json")
    with pytest.raises(SavedError, match="not JSON"):
        read_results(run)
