"""The ONNX round trip every exported model must pass: onnxruntime against torch within
1e-5 * max(1, |x|) (fp32), on a real test split and on hypothesis-drawn ids."""

import numpy as np
import onnx
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cascade.data.lists import build_lists
from cascade.towers.embedding import pack_items, pack_user
from export.onnx import export_ranker, export_two_tower, flat_items, item_inputs, session, user_inputs


def assert_parity(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= 1e-5 * np.maximum(1.0, np.abs(want))), float(np.abs(got - want).max())


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine weights far from the identity, so folding them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def _random_ids(slots, vocab, b, n, draw_seed):
    """Per-slot int64 ids in 0..vocab (0 = padding), shaped (b[, n][, width])."""
    rng = np.random.default_rng(draw_seed)
    lead = (b,) if n is None else (b, n)
    return {s.name: rng.integers(0, vocab[s.table] + 1, size=lead + ((s.width,) if s.width > 1 else ())).astype(np.int64) for s in slots}


def _torch_inputs(inputs, slots):
    cols = [torch.from_numpy(inputs[s.name]).unsqueeze(-1) if s.width == 1 else torch.from_numpy(inputs[s.name]) for s in slots]
    return torch.cat(cols, dim=-1)


def assert_towers_round_trip(model, ds, tmp_path, max_items: int = 300) -> None:
    """Export the towers (and the score head where it is not a dot) from 3 test lists; run each
    in onnxruntime on the whole test split and on random ids, and compare with torch; the
    composed score ranks real candidate lists in the same order."""
    randomise_batchnorm(model)
    model.eval()
    lists = build_lists(ds, "test")
    files = export_two_tower(model, lists.take(slice(0, 3)), tmp_path)
    for file in files.values():
        ops = {node.op_type for node in onnx.load(str(tmp_path / file)).graph.node}
        assert "BatchNormalization" not in ops, f"{file} kept a BatchNormalization"
    user_s, item_s = session(tmp_path / files["user"]), session(tmp_path / files["item"])
    users = user_inputs(lists, model.user_slots)
    items = {k: v[:max_items] for k, v in flat_items(item_inputs(lists, model.item_slots)).items()}
    with torch.no_grad():
        assert_parity(user_s.run(None, users)[0], model.user(torch.from_numpy(pack_user(lists, model.user_slots))).numpy())
        assert_parity(item_s.run(None, items)[0], model.item(_torch_inputs(items, model.item_slots)).numpy())
    vocab = {f.name: f.vocab for f in ds.schema.features.fields}

    @settings(max_examples=10, deadline=None)
    @given(st.integers(1, 40), st.integers(0, 2**31))
    def random_ids(b, seed):
        u = _random_ids(model.user_slots, vocab, b, None, seed)
        v = _random_ids(model.item_slots, vocab, b, None, seed + 1)
        with torch.no_grad():
            assert_parity(user_s.run(None, u)[0], model.user(_torch_inputs(u, model.user_slots)).numpy())
            assert_parity(item_s.run(None, v)[0], model.item(_torch_inputs(v, model.item_slots)).numpy())

    random_ids()
    # the whole score on real lists: ONNX towers (+ score head) against the torch model
    some = lists.take(slice(0, 64))
    u = user_s.run(None, user_inputs(some, model.user_slots))[0]
    v = item_s.run(None, flat_items(item_inputs(some, model.item_slots)))[0]
    v = v.reshape(len(some), some.list_size, *v.shape[1:])
    if "score" in files:
        got = session(tmp_path / files["score"]).run(None, {"u": u, "v": v})[0]
    else:
        got = np.einsum("bhd,bnhd->bn", u, v) * model.dot_scale
    with torch.no_grad():
        want = model(torch.from_numpy(pack_user(some, model.user_slots)), torch.from_numpy(pack_items(some, model.item_slots))).numpy()
    assert_parity(got, want)
    assert_same_order(got, want, some.mask)


def assert_same_order(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> None:
    """Each row's valid candidates in the same order, up to ties within the tolerance."""
    for g, w, m in zip(got, want, mask):
        order = np.argsort(-g[m], kind="stable")
        ranked = w[m][order]
        # every adjacent pair in the onnxruntime order is in torch's order, or tied within tolerance
        assert np.all(ranked[:-1] >= ranked[1:] - 2e-5 * np.maximum(1.0, np.abs(ranked[1:])))


def assert_ranker_round_trip(model, ds, tmp_path) -> None:
    randomise_batchnorm(model)
    model.eval()
    lists = build_lists(ds, "test")
    path = export_ranker(model, lists.take(slice(0, 3)), tmp_path / "ranker.onnx")
    s = session(path)
    some = lists.take(slice(0, 32))
    got = s.run(None, user_inputs(some, model.user_slots) | item_inputs(some, model.item_slots))[0]
    with torch.no_grad():
        want = model(torch.from_numpy(pack_user(some, model.user_slots)), torch.from_numpy(pack_items(some, model.item_slots))).numpy()
    assert_parity(got, want)
    assert_same_order(got, want, some.mask)
