import numpy as np

from cascade.data.store import read_dataset, validate
from cascade.pipeline import frozen_recall_output


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
