"""The blended stage (cascade/blend.py): per-list standardisation, the blend of models and item
fields, weights chosen on validation, and a blend as a cascade's rank stage and as a teacher."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.blend import Blend, blend_weights, standardised
from cascade.towers.embedding import Slot


class Shifted(torch.nn.Module):
    """A model whose logit is its 'colour' field plus the user id."""

    user_slots = (Slot("user_id", 0, 1, "user_id"),)
    item_slots = (Slot("item_id", 0, 1, "item_id"), Slot("colour", 1, 1, "colour"))

    def forward(self, user, items):
        return items[..., 1].float() + user[:, :1].float()


def test_a_blend_sums_the_weighted_parts_standardised_over_each_list():
    blend = Blend({"shifted": Shifted(), "item_trend_7d": None}, [1.0, 0.5], {"item_trend_7d": Slot("item_trend_7d", 0, 1, "item_trend_7d")})
    assert [s.name for s in blend.item_slots] == ["item_id", "colour", "item_trend_7d"]
    # one list of three (the fourth column is padding): the model gives colour + 3 = 4, 5, 6 ->
    # z = (x - 5) / 0.8165 = -1.2247, 0, 1.2247; the trend 4, 3, 1 (mean 8/3, std 1.2472) ->
    # z = 1.0690, 0.2673, -1.3363; the blend z1 + 0.5 z2 = -0.6902, 0.1336, 0.5566
    items = torch.tensor([[[5, 1, 4], [6, 2, 3], [7, 3, 1], [0, 0, 0]]])
    got = blend(torch.tensor([[3]]), items)
    np.testing.assert_allclose(got.detach().numpy(), [[-0.6902, 0.1336, 0.5566, 0.0]], atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=12), st.integers(0, 4), st.randoms(use_true_random=False))
def test_standardised_rows_have_mean_0_std_1_and_follow_the_candidates(values, pad, rnd):
    x = torch.tensor([values + [7.0] * pad])  # padding carries a value that must not count
    mask = torch.tensor([[True] * len(values) + [False] * pad])
    z = standardised(x, mask)[0, : len(values)].numpy().astype(np.float64)
    assert (standardised(x, mask)[0, len(values) :] == 0).all()
    if np.ptp(values) > 1e-3 * max(1.0, np.abs(np.mean(values))):
        assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
        v = np.array(values)
        assert (z[:, None] <= z[None, :] + 1e-6)[v[:, None] < v[None, :]].all()  # a larger value never gets a lower z
    elif np.ptp(values) == 0:
        assert (z == 0).all()  # one value: no spread to standardise
    perm = rnd.sample(range(len(values)), len(values))
    zp = standardised(torch.tensor([[values[i] for i in perm]]), torch.ones(1, len(values), dtype=torch.bool))[0].numpy()
    np.testing.assert_allclose(zp, standardised(torch.tensor([values]), torch.ones(1, len(values), dtype=torch.bool))[0].numpy()[perm], atol=1e-5)


def test_blend_weights_take_the_smallest_weight_that_reaches_the_best_quality():
    # two lists of four (the parts already standardised); the positives at columns 2 and 0.
    # Part 0 puts column 3 first in both; part 1 the positive. Top-1 hit: list 1 needs
    # 1 + 2w > 2.2 (w > 0.6), list 2 needs 1 + 2.5w > 2 (w > 0.4). On the grid, w = 0.5 hits
    # list 2 only (0.5), w = 1 both (1.0), and 2 or 4 no more: the smallest best weight is 1
    z0 = np.array([[0.0, 0.0, 1.0, 2.2], [1.0, 0.0, 0.0, 2.0]])
    z1 = np.array([[0.0, 0.0, 2.0, 0.0], [2.5, 0.0, 0.0, 0.0]])
    label = np.array([[0, 0, 1, 0], [1, 0, 0, 0]])
    quality = lambda s: float(np.mean(label[np.arange(2), s.argmax(1)]))  # noqa: E731
    assert blend_weights([z0, z1], quality, grid=(0.0, 0.25, 0.5, 1.0, 2.0, 4.0)) == [1.0, 1.0]
    assert blend_weights([z0, np.zeros_like(z1)], quality, grid=(0.0, 1.0)) == [1.0, 0.0]  # nothing to gain: weight 0


BLEND_STAGES = """
  din_blend:
    task: blend
    data: TREND_DATA
    model: {name: blend, params: {parts: [din_trend, item_trend_7d]}}
    train: {monitor: recall@4}
  student_of_blend:
    data: TREND_DATA
    model: {name: dssm, params: {hidden: [16, 8], dropout: 0.0}}
    distill: {teacher: din_blend}
  blended: {task: cascade, cascade: {method: frozen, prerank: student_of_blend, rank: din_blend}}
"""


@pytest.fixture(scope="module")
def blended(tmp_path_factory):
    """(config, runs) of a cascade whose rank stage is the DIN z-blended with the 7-day trend and
    whose pre-ranker is distilled from that blend."""
    from cascade.cli import main
    from tests.conftest import CONFIG
    from tests.test_evaluate import TREND_DATA, TREND_STAGES

    tmp = tmp_path_factory.mktemp("blend")
    path = tmp / "c.yaml"
    stages = (TREND_STAGES + BLEND_STAGES).replace("TREND_DATA", TREND_DATA.replace("SCALE", "list"))
    text = CONFIG.replace("experiments:", "experiments:" + stages, 1)
    path.write_text(text.replace("TRENDDATA", str(tmp / "trend_data")).replace("DATA", str(tmp / "data")).replace("OUT", str(tmp / "runs")).replace("CONFIG", str(path)))
    assert main(["train", str(path), "--experiment", "blended"]) == 0
    return path, tmp / "runs"


def test_the_blend_task_chooses_its_weights_on_validation_and_reports_its_parts(blended):
    from cascade.config import load_config
    from cascade.models import MODELS, load_trained
    from cascade.prepare import prepare_data
    from teachers import TEACHERS

    path, runs = blended
    result = json.loads((runs / "din_blend" / "results.json").read_text())
    assert list(result["weights"]) == ["din_trend", "item_trend_7d"] and result["weights"]["din_trend"] == 1.0
    # the grid holds 0, so on validation the blend is at least its first part alone
    assert result["valid"]["recall@4"] >= result["valid_parts"]["din_trend"]["recall@4"]
    (exp,) = load_config(path, "din_blend")
    blend = load_trained(exp, prepare_data(exp.data), {**MODELS, **TEACHERS}, lambda e: None)
    assert blend.weights.tolist() == list(result["weights"].values())
    # the student's teacher scores are the blend's (cached by the distillation)
    teacher = np.load(runs / "din_blend" / "scores" / "test.npy")
    from cascade.data.lists import build_lists
    from cascade.models import score_lists

    np.testing.assert_allclose(teacher, score_lists(blend, build_lists(prepare_data(exp.data), "test")), atol=1e-5)


def test_a_blended_rank_stage_exports_serves_and_evaluates_as_served(blended, tmp_path, capsys):
    from cascade.cli import main
    from cascade.evaluate import load_saved
    from cascade.models import MODELS
    from teachers import TEACHERS

    _, runs = blended
    assert main(["export", str(runs / "blended"), "--out", str(tmp_path / "bundle")]) == 0
    out = capsys.readouterr().out
    assert "rank blend top-4" in out
    assert "same_recall_survivors 1 same_prerank_survivors 1 same_rank_survivors 1 same_final_order 1" in out
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    rank = next(s for s in manifest["stages"] if s["name"] == "rank")
    weights = json.loads((runs / "din_blend" / "results.json").read_text())["weights"]
    assert rank["list_dependent"] is True and rank["blend"] == weights
    assert json.loads((runs / "blended" / "stages.json").read_text())["rank"]["blend"] == weights
    # evaluation's full run (every stage scores the whole list) cuts what serving cuts
    saved = load_saved(runs / "blended", models={**MODELS, **TEACHERS})
    cascade = saved.cascade()
    requests = saved.data.first("test", 64)
    requests = requests.take_columns(np.zeros((len(requests), 0), int))
    served, full = cascade.run(requests), cascade.run(requests, full=True)
    np.testing.assert_array_equal(served.items, full.items)
    # the full run scores the blend's parts once (whole_and_served): the final scores are served's
    assert hasattr(cascade.stages[1].scorer, "whole_and_served")
    np.testing.assert_allclose(full.scores, served.scores, atol=1e-5)
    for s, f in zip(served.stages, full.stages):
        kept = lambda o: [set(r[k].tolist()) for r, k in zip(o.lists.item["item_id"], o.kept)]  # noqa: E731
        assert kept(s) == kept(f), s.name


@pytest.mark.parametrize(
    "params, task, message",
    [
        ({"parts": ["din_trend", "nothing_here"]}, "blend", "'nothing_here' is neither another experiment"),
        ({"parts": ["din_trend"]}, "blend", "two or more distinct names"),
        ({"parts": ["din_trend", "item_trend_7d"], "weights": [1, 2]}, "blend", "unknown key 'weights'"),
        ({"parts": ["din_trend", "item_trend_7d"]}, "distill", "model.name 'blend' with task 'blend'"),
    ],
)
def test_a_bad_blend_is_refused_naming_what_is_wrong(blended, params, task, message):
    from cascade.config import ConfigError, load_config
    from cascade.models import MODELS, build_model
    from cascade.prepare import prepare_data

    path, _ = blended
    text = path.read_text().replace("model: {name: blend, params: {parts: [din_trend, item_trend_7d]}}", "model: {name: blend, params: " + json.dumps(params) + "}").replace("    task: blend\n", f"    task: {task}\n")
    bad = path.with_name("bad.yaml")
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        (exp,) = load_config(bad, "din_blend")
        build_model(exp, prepare_data(exp.data), MODELS)


def test_the_report_shows_a_blend_beside_its_parts(blended):
    from cascade.job import evaluate_path
    from cascade.report import tables

    _, runs = blended
    entry = evaluate_path(runs / "din_blend")
    result = json.loads((runs / "din_blend" / "results.json").read_text())
    table = tables([entry])["Single-stage runs (test, as each run reported it)"]
    assert [row[0] for row in table["rows"]] == ["din_blend", "din_blend: din_trend alone", "din_blend: item_trend_7d alone"]
    column = table["header"].index("recall@4")
    assert table["rows"][2][column] == f"{result['test_parts']['item_trend_7d']['recall@4']:.4f}"
