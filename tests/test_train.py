import json

import pytest
import torch
from torch import nn

from cascade.train import CheckpointError, RunError, Tensors, TrainConfig, Trainer, read_checkpoint


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).float()
    return Tensors(user=x, items=torch.zeros(n, 1, 1), label=y[:, None], mask=torch.ones(n, 1, dtype=torch.bool))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))


def _fit(run_dir, epochs, patience=5, evaluate=None):
    model = _model()
    data = _data()
    trainer = Trainer(model, TrainConfig(epochs=epochs, batch_size=32, lr=0.01, patience=patience, monitor="neg_loss"), run_dir)
    loss = lambda b: nn.functional.binary_cross_entropy_with_logits(model(b.user), b.label)  # noqa: E731
    default_eval = lambda: {"neg_loss": -float(loss(data))}  # noqa: E731
    trainer.fit(data, loss, evaluate or default_eval)
    return model


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    straight = _fit(tmp_path / "a", epochs=4)
    _fit(tmp_path / "b", epochs=2)
    resumed = _fit(tmp_path / "b", epochs=4)  # a new process would do the same: last.pt holds all
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    assert "resumed from" in (tmp_path / "b" / "log.txt").read_text()
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 4


class _ScaledBCE(nn.Module):
    """A loss owning a parameter (as ARF's and LCRON's uncertainty weights do)."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, logits, label):
        return nn.functional.binary_cross_entropy_with_logits(logits * self.log_scale.exp(), label)


def _fit_with_loss(run_dir, epochs):
    model, data, loss = _model(), _data(), _ScaledBCE()
    Trainer(model, TrainConfig(epochs=epochs, batch_size=32, lr=0.01), run_dir, loss=loss).fit(data, lambda b: loss(model(b.user), b.label), None)
    return model, loss


def test_a_loss_with_parameters_is_trained_and_resumed_with_the_model(tmp_path):
    model, loss = _fit_with_loss(tmp_path / "a", epochs=3)
    assert loss.log_scale.item() != 0.0  # the optimiser saw it
    _fit_with_loss(tmp_path / "b", epochs=1)
    model_b, loss_b = _fit_with_loss(tmp_path / "b", epochs=3)  # resumed after epoch 1
    torch.testing.assert_close(loss_b.log_scale, loss.log_scale)
    torch.testing.assert_close(model_b[0].weight, model[0].weight)


def test_without_evaluate_every_epoch_runs_and_the_last_is_kept(tmp_path):
    model, _ = _fit_with_loss(tmp_path, epochs=3)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    last = read_checkpoint(tmp_path / "last.pt")["model"]
    for k, v in torch.load(tmp_path / "best.pt", weights_only=True).items():
        torch.testing.assert_close(v, last[k], msg=k)


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    model, data = _model(), _data()
    trainer = Trainer(model, TrainConfig(epochs=5, batch_size=32, lr=0.01, patience=2, monitor="neg_loss"), tmp_path)
    best = trainer.fit(data, lambda b: nn.functional.binary_cross_entropy_with_logits(model(b.user), b.label), lambda: {"neg_loss": next(scores)})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # best 0.7 at epoch 2, then two epochs without improvement -> stop before epoch 5
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert best["epoch"] == 2
    assert not (tmp_path / "results.json").exists()  # the task writes it, last, with its test figures


def test_an_unreadable_checkpoint_stops_the_run_naming_it(tmp_path):
    _fit(tmp_path, epochs=1)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:100])  # what a kill mid-write used to leave
    with pytest.raises(CheckpointError, match=r"last\.pt: cannot be read .*run again with --restart"):
        _fit(tmp_path, epochs=2)


def test_checkpoints_are_replaced_whole(tmp_path, monkeypatch):
    _fit(tmp_path, epochs=1)
    before = (tmp_path / "last.pt").read_bytes()

    def killed(obj, f, *args, **kwargs):  # the save dies after writing part of the file
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, epochs=2)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _flip_a_body_byte(path):
    data = bytearray(path.read_bytes())
    sealed = torch.load(path, weights_only=True)
    body = sealed["body"].numpy().tobytes()
    at = data.find(body[1000:1032])  # the stored bytes of the checkpoint's body
    assert at > 0
    data[at + 7] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path):
    straight = _fit(tmp_path / "a", epochs=4)
    _fit(tmp_path / "b", epochs=3)  # last.pt after epoch 3, prev.pt after epoch 2
    _flip_a_body_byte(tmp_path / "b" / "last.pt")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_checkpoint(tmp_path / "b" / "last.pt")
    resumed = _fit(tmp_path / "b", epochs=4)  # epoch 3 again, then 4
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    log = (tmp_path / "b" / "log.txt").read_text()
    assert "checksum mismatch" in log and "falling back to" in log and "prev.pt" in log
    rows = [json.loads(line)["epoch"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]  # epoch 3's first row went with its checkpoint


def test_no_readable_checkpoint_names_both_and_the_way_out(tmp_path):
    _fit(tmp_path, epochs=2)
    (tmp_path / "last.pt").write_bytes(b"")
    (tmp_path / "prev.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match=r"last\.pt: cannot be read.*prev\.pt: cannot be read.*--restart"):
        _fit(tmp_path, epochs=3)


def _fit_config(run_dir, lr, epochs):
    model, data = _model(), _data()
    trainer = Trainer(model, TrainConfig(epochs=epochs, batch_size=32, lr=lr), run_dir)
    resolved = {"train": {"lr": lr, "epochs": epochs}, "model": {"hidden": [8]}}
    trainer.fit(data, lambda b: nn.functional.binary_cross_entropy_with_logits(model(b.user), b.label), None, resolved_config=resolved)


def test_resuming_with_another_config_is_refused_naming_the_key(tmp_path):
    _fit_config(tmp_path, lr=0.01, epochs=1)
    _fit_config(tmp_path, lr=0.01, epochs=2)  # more epochs: a resume, allowed
    with pytest.raises(RunError, match=r"trained with another config \(train\.lr: 0\.01 -> 0\.02\); run with --restart"):
        _fit_config(tmp_path, lr=0.02, epochs=3)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 0.01  # left as trained


def test_an_epoch_logged_but_not_checkpointed_is_not_logged_twice(tmp_path):
    _fit(tmp_path, epochs=2)
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    # killed after epoch 3's row was written, before its checkpoint; and a line cut short
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows + [rows[-1].replace('"epoch": 2', '"epoch": 3'), '{"epoch": 4, "tra']) + "\n")
    _fit(tmp_path, epochs=3)
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_training_lowers_the_loss(tmp_path):
    data = _data()
    model = _fit(tmp_path, epochs=5)
    with torch.no_grad():
        loss = nn.functional.binary_cross_entropy_with_logits(model.eval()(data.user), data.label)
    assert loss < 0.55  # ln 2 = 0.693 untrained; the labels are a linear rule of x (0.45 seen)


def test_checkpoints_load_with_weights_only(tmp_path):
    _fit(tmp_path, epochs=1)
    sealed = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(sealed) == {"format", "sha256", "body"}
    assert set(read_checkpoint(tmp_path / "last.pt")) == {"model", "loss", "optimizer", "rng", "state", "best_model", "config"}
    with pytest.raises(Exception):
        torch.save({"bad": object()}, tmp_path / "x.pt")
        torch.load(tmp_path / "x.pt", weights_only=True)


def test_bf16_autocast_keeps_fp32_master_weights_and_learns(tmp_path):
    data, model = _data(), _model()
    seen = []

    def loss(b):
        out = model(b.user)
        seen.append(out.dtype)  # the forward runs in bf16 under autocast
        return nn.functional.binary_cross_entropy_with_logits(out.float(), b.label)

    fp32_loss = lambda: float(nn.functional.binary_cross_entropy_with_logits(model(data.user), data.label))  # noqa: E731
    Trainer(model, TrainConfig(epochs=5, batch_size=32, lr=0.01, monitor="neg_loss", precision="bf16"), tmp_path).fit(data, loss, lambda: {"neg_loss": -fp32_loss()})
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        final = nn.functional.binary_cross_entropy_with_logits(model.eval()(data.user), data.label)
    assert final < 0.6  # ln 2 = 0.693 untrained


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16', got 'fp16'"):
        TrainConfig(precision="fp16")


def test_prefetch_keeps_the_order_raises_the_producers_error_and_ends_on_a_break():
    import threading

    from cascade.train import prefetch

    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise ValueError("row group 7 is bad")

    got = []
    with pytest.raises(ValueError, match="row group 7 is bad"):
        for x in prefetch(failing()):
            got.append(x)
    assert got == [1]
    before = threading.active_count()
    for x in prefetch(iter(range(10**6)), depth=2):
        if x == 5:
            break
    assert threading.active_count() == before  # the producer thread has ended


def test_prefetch_leaves_its_reader_a_core_and_gives_it_back():
    from cascade.train import prefetch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert [torch.get_num_threads() for _ in prefetch(iter(range(3)))] == [1, 1, 1]
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)  # never none
        assert [torch.get_num_threads() for _ in prefetch(iter(range(2)))] == [1, 1]
        torch.set_num_threads(3)
        for _ in prefetch(iter(range(10))):
            assert torch.get_num_threads() == 2
            break
        assert torch.get_num_threads() == 3  # a consumer that stops early gives the core back too
    finally:
        torch.set_num_threads(threads)


def _lists(lengths: list[int], width: int) -> Tensors:
    rows = len(lengths)
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    ids = torch.arange(rows, dtype=torch.float32)
    return Tensors(user=ids.unsqueeze(1), items=torch.zeros(rows, width, 1), label=torch.zeros(rows, width), mask=mask)


def test_random_batches_of_lists_of_different_lengths_are_bucketed_and_cut():
    # 90 lists of 5 candidates and 10 of 50, batches of 10: all 100 rows fall in one pool
    # (BUCKET_POOL batches), so 9 batches hold short lists only (cut to width 5) and one the long
    # ones (width 50): 9 * 10 * 5 + 10 * 50 = 950 cells against 100 * 50 = 5,000 unbucketed
    data = _lists([5] * 90 + [50] * 10, 50)
    batches = list(data.batches(10, torch.Generator().manual_seed(0)))
    assert sorted(b.mask.shape[1] for b in batches) == [5] * 9 + [50]
    assert sum(b.mask.numel() for b in batches) == 950
    seen = torch.cat([b.user[:, 0] for b in batches]).long()
    assert sorted(seen.tolist()) == list(range(100))  # every list once
    for b in batches:  # no valid candidate cut off, and each list's columns kept in place
        assert (b.mask.sum(1) == torch.tensor([5 if i < 90 else 50 for i in b.user[:, 0].long().tolist()])).all()


def test_batches_of_lists_of_one_length_keep_the_plain_shuffle():
    # the usual recall top-n: the same batches, in the same order, as before bucketing existed
    data = _lists([7] * 23, 9)
    got = [b.user[:, 0].long().tolist() for b in data.batches(5, torch.Generator().manual_seed(3))]
    order = torch.randperm(23, generator=torch.Generator().manual_seed(3)).tolist()
    assert got == [order[a : a + 5] for a in range(0, 23, 5)]
    assert all(b.mask.shape[1] == 9 for b in data.batches(5, torch.Generator().manual_seed(3)))  # not cut


def test_batches_in_order_are_never_cut():
    # scoring concatenates the batches' outputs, so they keep the full width
    data = _lists([3, 9, 1, 4], 9)
    assert [b.mask.shape[1] for b in data.batches(2)] == [9, 9]
