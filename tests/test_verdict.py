import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cascade.report import write_report
from cascade.verdict import bootstrap_mean, difference, stage_losses, verdict


def _entry(label, per_request, teacher=None, popularity=None, world=True):
    """A cascade's entry whose flow has the given per-request joint recall (request ids 1..R)."""
    ids = list(range(1, len(per_request) + 1))
    joint = float(np.mean(per_request))
    flow = {"joint_recall": joint, "positives_after_prerank": 0.4, "positives_retrieved": 0.8}
    if world:
        flow |= {"oracle_ratio": 0.6, "blame_recall": 0.05, "blame_prerank": 0.25, "blame_rank": 0.1}
    popularity = popularity if popularity is not None else [0.0] * len(ids)
    base = {"popularity_prerank": {"joint_recall": float(np.mean(popularity))}, "random_prerank": {"joint_recall": 0.0}}
    base |= {"recall": {"positives_kept@200": 0.8}, "most_popular_recall": {"positives_kept@200": 0.85}}
    rows = {"request_id": ids, "flow": list(per_request), "popularity_prerank": list(popularity), "random_prerank": [0.0] * len(ids)}
    metrics = {"quotas": {"recall": 200, "prerank": 50, "rank": 10}, "flow": flow, "baselines": base, "per_request": rows}
    return {"label": label, "kind": "run", "metrics": metrics, "prerank": {"experiment": label, "distilled_from": teacher}}


def test_a_constant_figure_has_no_spread_and_a_coin_has_the_normal_interval():
    assert bootstrap_mean(np.full(50, 0.3)) == pytest.approx((0.3, 0.3))
    # 500 zeros and 500 ones: mean 0.5, standard error 0.5 / sqrt(1000) = 0.0158, 95% half-width 1.96 x 0.0158 = 0.031
    low, high = bootstrap_mean(np.repeat([0.0, 1.0], 500))
    assert low == pytest.approx(0.5 - 0.031, abs=0.006) and high == pytest.approx(0.5 + 0.031, abs=0.006)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40))
def test_a_bootstrap_interval_lies_within_the_values(values):
    low, high = bootstrap_mean(np.array(values))
    assert min(values) - 1e-12 <= low <= high <= max(values) + 1e-12


def test_a_paired_difference_is_beyond_noise_only_when_the_requests_differ_consistently():
    rng = np.random.default_rng(0)
    a = rng.random(400)
    lifted = _entry("distilled", np.clip(a + 0.1, 0, 1), teacher="din")
    same = _entry("shuffled", rng.permutation(a), teacher="din")
    ind = _entry("independent", a)
    d = difference([lifted], [ind])
    assert d.value == pytest.approx(np.mean(np.clip(a + 0.1, 0, 1) - a)) and not d.level
    assert d.how == "bootstrap over 400 test requests"
    # the same values over other requests: the means tie, the per-request differences are wide
    assert difference([same], [ind]).level


def test_seeds_weigh_a_difference_by_their_spread():
    a = [_entry("a", [v]) for v in (0.30, 0.32)]
    b = [_entry("b", [v]) for v in (0.20, 0.22)]
    d = difference(a, b)
    # 0.31 - 0.21 = 0.10; se = sqrt(0.0002 / 2 + 0.0002 / 2) = 0.01414 (each seed pair's variance, ddof 1: 0.0002)
    assert d.value == pytest.approx(0.10) and d.low == pytest.approx(0.10 - 2 * 0.014142, abs=1e-5) and d.how == "2 seeds"
    assert not d.level


def test_stage_losses_add_up_to_what_the_cascade_does_not_show():
    e = _entry("a", [0.2, 0.2])
    losses = stage_losses([e])
    # positives: recall 1 - 0.8, pre-rank 0.8 - 0.4, rank 0.4 - 0.2
    assert {s: round(p, 6) for s, (p, _) in losses.items()} == {"recall": 0.2, "prerank": 0.4, "rank": 0.2}
    assert sum(p for p, _ in losses.values()) == pytest.approx(1 - 0.2)
    assert {s: u for s, (_, u) in losses.items()} == {"recall": 0.05, "prerank": 0.25, "rank": 0.1}


def test_the_verdict_names_the_best_cascade_the_gain_and_a_baseline_that_matches_it():
    rng = np.random.default_rng(1)
    a = rng.random(300) * 0.3
    groups = {"independent": [_entry("independent", a)], "distilled": [_entry("distilled", a + 0.2, teacher="din", popularity=a + 0.2)]}
    lines, table = verdict(groups)
    assert lines[0].startswith("**Best cascade: distilled**")
    assert "**Distillation** (the pre-ranker distilled from din)" in lines[1] and "beyond noise" in lines[1]
    assert f"joint recall independent {np.mean(a):.4f} (independent pre-ranker) -> distilled {np.mean(a) + 0.2:.4f}, +" in lines[1]
    # the popularity pre-ranker scores every request as the trained one does: level, said plainly
    assert "a popularity pre-ranker" in lines[2] and "**level with the trained pre-ranker**" in lines[2]
    # most-popular recall (0.85) keeps more than the recall tower (0.80): said, in bold
    assert lines[3] == "**Recall** keeps 0.8000 of the logged positives in its top-200 (without a model: most popular recall 0.8500); **most popular recall keeps as many or more** (means over the same requests, no interval)."
    assert "pre-rank" in lines[4] and table["rows"][1] == ["pre-rank", "0.4000", "0.2500"]


def test_a_baseline_above_the_trained_pre_ranker_is_said_to_win():
    a = np.full(200, 0.1)
    lines, _ = verdict({"only": [_entry("only", a, popularity=a + 0.3)]})
    assert "**above the trained pre-ranker** by 0.3000" in lines[1] and "a pre-ranker without a model wins" in lines[1]
    assert not any("Distillation" in x for x in lines)  # nothing to compare against


def test_without_a_world_the_stage_table_has_positives_only(tmp_path):
    e = _entry("a", [0.2, 0.4], world=False)
    lines, table = verdict({"a": [e]})
    assert table["header"] == ["stage", "logged positives lost here"]
    assert "needs a synthetic world's truth" in lines[-1]


def test_the_report_opens_on_the_verdict(tmp_path):
    entry = _entry("a", [0.2, 0.4])
    entry |= {"path": "a", "cost": {"flops_per_candidate": {"recall": 1, "prerank": 2, "rank": 3}, "latency_ms": {}, "latency_of": "torch"}, "notes": []}
    for stage in ("recall", "prerank", "rank"):
        entry["metrics"].setdefault("stages", {})[stage] = {"positives_kept": 0.5}
    out = write_report([entry], tmp_path / "r")
    md = (out / "report.md").read_text().splitlines()
    assert md[2] == "## Verdict" and md[4].startswith("- **Best cascade: a**, joint recall 0.3000 (95% CI")
    assert "<h2>Verdict</h2><ul><li><b>Best cascade: a</b>" in (out / "report.html").read_text()
