"""The evaluation report: ``metrics.json``, ``report.md`` and ``report.html`` (one file, the plots
embedded as PNG) from the entries ``cascade eval`` computed.

An entry is one evaluated run or bundle: ``{"label", "path", "kind", "metrics" (``evaluate``'s
dict), "cost" ({"flops_per_candidate": {stage: x}, "latency_ms": {stage: p50}, "latency_p95_ms": {stage: p95}, "latency_of": str}),
"untrained" (the flow figures of the same architectures untrained, optional), "notes" [str]}``.
Entries with the same label (one experiment over several seeds) are shown as mean ± std.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from cascade.evaluate import GLOSSARY
from cascade.data.store import replacing_directory
from cascade.saved import STAGE_NAMES
from cascade.verdict import STAGE_WORDS, difference, verdict

METRICS_FILE = "metrics.json"


def _groups(entries: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in entries:
        out.setdefault(e["label"], []).append(e)
    return out


def _get(entry: dict, path: str) -> float:
    """The number at ``path`` ('a/b/c'); TR stands for the cascade's own teacher_recall@k@m."""
    q = entry.get("metrics", {}).get("quotas", {})
    path = path.replace("TR", f"teacher_recall@{q.get('rank', 10)}@{q.get('prerank', 50)}")
    node = entry
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            return math.nan
        node = node[part]
    return float(node) if isinstance(node, (int, float)) else math.nan


def cell(values: list[float], digits: int = 4) -> str:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return "—"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> dict:
    return {"header": header, "rows": rows}


SIDE_BY_SIDE = [
    ("joint recall", "metrics/flow/joint_recall"),
    ("positives kept by recall", "metrics/stages/recall/positives_kept"),
    ("positives kept after pre-rank", "metrics/flow/positives_after_prerank"),
    ("TR", "metrics/stages/prerank/TR"),
    ("oracle ratio", "metrics/flow/oracle_ratio"),
    ("pre-rank AUC", "metrics/stages/prerank/auc"),
    ("rank AUC", "metrics/stages/rank/auc"),
    ("rank NDCG@10", "metrics/stages/rank/ndcg@10"),
]

STAGE_COLUMNS = [
    ("positives kept", "positives_kept"),
    ("exposures kept", "exposed_kept"),
    ("Recall@10", "recall@10"),
    ("HitRate@10", "hit_rate@10"),
    ("NDCG@10", "ndcg@10"),
    ("AUC", "auc"),
    ("GAUC", "gauc"),
    ("LogLoss", "logloss"),
    ("Kendall tau vs rank", "kendall_tau"),
    ("Kendall tau vs next stage", "kendall_tau_vs_next"),
    ("teacher NDCG@10", "teacher_ndcg@10"),
    ("TR", "TR"),
]
NOT_PROBABILITIES = "n/a"  # the LogLoss cell of a stage not trained as a probability


def teacher_recall_name(entry: dict) -> str:
    """The cascade's own teacher R@k@m, as its tables name it (k, m: its rank and pre-rank quotas)."""
    q = entry["metrics"]["quotas"]
    return f"teacher R@{q['rank']}@{q['prerank']}"


def without_empty_columns(t: dict) -> dict:
    """The table less each column (but the first) with no value in any row."""
    keep = [0] + [i for i in range(1, len(t["header"])) if any(r[i] not in ("", "—") for r in t["rows"])]
    return _table([t["header"][i] for i in keep], [[r[i] for i in keep] for r in t["rows"]])


def _stage_rows(g: list[dict]) -> list[list[str]]:
    rows = []
    for stage in STAGE_NAMES:
        cells = []
        for _, key in STAGE_COLUMNS:
            as_probability = g[0].get("probabilities", {}).get(stage, True)
            cells.append(cell([_get(e, f"metrics/stages/{stage}/{key}") for e in g]) if key != "logloss" or as_probability else NOT_PROBABILITIES)
        cost = [cell([_get(e, f"cost/flops_per_candidate/{stage}") for e in g], 0)] + [cell([_get(e, f"cost/{which}/{stage}") for e in g], 2) for which in ("latency_ms", "latency_p95_ms")]
        rows.append([STAGE_WORDS[stage]] + cells + cost)
    return rows


def tables(entries: list[dict]) -> dict[str, dict]:
    """Every table of the report, by title; no column without a value."""
    out = {}
    stages = [e for e in entries if e["kind"] == "stage"]
    if stages:
        keys = sorted({k for e in stages for k in e["metrics"]["test"]})
        sg = _groups(stages)
        rows = []
        for label, g in sg.items():
            rows.append([label, g[0]["task"], str(len(g))] + [cell([_get(e, f"metrics/test/{k}") for e in g]) for k in keys])
            for part in g[0]["metrics"].get("parts", {}):  # a blend: each part alone, on the same lists
                rows.append([f"{label}: {part} alone", "blend part", str(len(g))] + [cell([_get(e, f"metrics/parts/{part}/test/{k}") for e in g]) for k in keys])
        out["Single-stage runs (test, as each run reported it)"] = _table(["run", "task", "seeds"] + keys, rows)
    groups = _groups([e for e in entries if e["kind"] != "stage"])
    if not groups:
        return out
    first = next(iter(groups.values()))[0]
    tr = teacher_recall_name(first)
    out["Cascades side by side (test)"] = without_empty_columns(_table(
        ["run", "seeds"] + [tr if name == "TR" else name for name, _ in SIDE_BY_SIDE],
        [[label, str(len(g))] + [cell([_get(e, path) for e in g]) for _, path in SIDE_BY_SIDE] for label, g in groups.items()],
    ))
    out["Recall against its baselines (positives kept by recall)"] = _recall_baselines(groups)
    for label, g in groups.items():
        of = g[0].get("cost", {}).get("latency_of", "")
        header = ["stage"] + [teacher_recall_name(g[0]) if n == "TR" else n for n, _ in STAGE_COLUMNS] + ["FLOPs / candidate", "p50 ms", "p95 ms"]
        out[f"{label}: per stage" + (f" (latency: {of})" if of else "")] = without_empty_columns(_table(header, _stage_rows(g)))
        flow_rows = [("pre-ranker (this run)", "metrics/flow"), ("random pre-ranker", "metrics/baselines/random_prerank"), ("popularity pre-ranker", "metrics/baselines/popularity_prerank"), ("trending pre-ranker", "metrics/baselines/trending_prerank"), (f"untrained cascade (every stage; {_untrained_requests(g)} test requests)", "untrained")]
        rows = []
        for name, root in flow_rows:
            cells = [cell([_get(e, f"{root}/{key}") for e in g]) for key in ("joint_recall", "positives_after_prerank", "TR", "oracle_ratio")]
            if any(c != "—" for c in cells):
                rows.append([name] + cells)
        header = ["between the same recall and ranker", "joint recall", "positives kept after pre-rank", teacher_recall_name(g[0]), "oracle ratio"]
        out[f"{label}: the pre-ranker against baselines"] = without_empty_columns(_table(header, rows))
    return out


def _untrained_requests(g: list[dict]) -> str:
    n = [e.get("untrained", {}).get("requests") for e in g]
    return "all" if None in n else f"{min(n):,}"


def _recall_baselines(groups: dict[str, list[dict]]) -> dict:
    """One row per distinct recall of the cascades (named by the cascades that share it), then
    most-popular and trending recall."""
    first = next(iter(groups.values()))[0]
    n = first["metrics"]["quotas"]["recall"]
    cells = lambda g, root: [cell([_get(e, f"metrics/baselines/{root}/positives_kept@{c}") for e in g]) for c in (50, n)]  # noqa: E731
    shared: dict[tuple, list[str]] = {}
    for label, g in groups.items():
        shared.setdefault(tuple(cells(g, "recall")), []).append(label)
    rows = [[f"recall of {', '.join(labels)}", *kept] for kept, labels in shared.items()]
    rows.append(["most-popular recall", *cells([first], "most_popular_recall")])
    days = _get(first, "metrics/baselines/trending_recall/days")
    if not math.isnan(days):
        rows.append([f"trending recall ({days:g}-day window)", *cells([first], "trending_recall")])
    return without_empty_columns(_table(["recall", "positives kept@50", f"positives kept@{n}"], rows))


# ------------------------------------------------------------------------------- plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(entry: dict, k: int) -> list[int]:
    """The m values of the entry's teacher_recall@k@m curve."""
    keys = entry["metrics"]["stages"]["prerank"]
    return sorted(int(key.split("@")[2]) for key in keys if key.startswith(f"teacher_recall@{k}@"))


NO_MODEL_FLOPS = 1.0  # where a pre-ranker without a model (a lookup per candidate) sits on the log FLOPs axis


def frontier_figure(groups: dict[str, list[dict]], first: dict):
    """Joint recall (95% interval: seeds or a bootstrap over requests) against the pre-ranker's
    FLOPs per candidate (log axis; the baselines without a model at ``NO_MODEL_FLOPS``) and,
    where measured, against the whole cascade's latency (p50, the bar reaching p95). Both
    quality axes start at 0; every point is named in the legend, not on the plot."""
    import matplotlib.pyplot as plt

    has_latency = any(not math.isnan(_get(e, "cost/latency_ms/prerank")) for g in groups.values() for e in g)
    fig, axes = plt.subplots(1, 2 if has_latency else 1, figsize=(12 if has_latency else 6.5, 4.4), squeeze=False)
    flops_ax = axes[0, 0]
    top = 0.0
    for i, (label, g) in enumerate(groups.items()):
        color = f"C{i % 10}"
        y = float(np.nanmean([_get(e, "metrics/flow/joint_recall") for e in g]))
        est = difference(g, [])
        yerr = [[y - est.low], [est.high - y]] if est else None
        top = max(top, est.high if est else y)
        x = float(np.nanmean([_get(e, "cost/flops_per_candidate/prerank") for e in g]))
        flops_ax.errorbar([x], [y], yerr=yerr, fmt="o", color=color, capsize=3, label=label)
        if has_latency:
            p50 = float(np.nansum([np.nanmean([_get(e, f"cost/latency_ms/{s}") for e in g]) for s in STAGE_NAMES]))
            p95 = float(np.nansum([np.nanmean([_get(e, f"cost/latency_p95_ms/{s}") for e in g]) for s in STAGE_NAMES]))
            xerr = [[0.0], [max(p95 - p50, 0.0)]] if p95 > 0 else None
            axes[0, 1].errorbar([p50], [y], xerr=xerr, yerr=yerr, fmt="o", color=color, capsize=3, label=label)
    for name, marker in (("random_prerank", "v"), ("popularity_prerank", "s"), ("trending_prerank", "^")):
        y = _get(first, f"metrics/baselines/{name}/joint_recall")
        if not math.isnan(y):
            top = max(top, y)
            flops_ax.scatter([NO_MODEL_FLOPS], [y], marker=marker, color="grey", label=f"{name.replace('_', ' ')} (no model; {first['label']})")
    flops_ax.set_xscale("log")
    flops_ax.set_xlabel(f"pre-ranker FLOPs per candidate (log; no model at {NO_MODEL_FLOPS:g})")
    flops_ax.set_title("Quality against the pre-ranker's cost")
    if has_latency:
        axes[0, 1].set_xlim(left=0)
        axes[0, 1].set_xlabel("ms per request, all stages: p50, bar to p95")
        axes[0, 1].set_title("Quality against latency")
    for ax in axes[0]:
        ax.set_ylim(0, top * 1.15 if top > 0 else 1)
        ax.set_ylabel("joint recall (95% interval)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return fig


def plots(entries: list[dict]) -> dict[str, str]:
    """Base64 PNGs by title: the consistency curves, the quality-cost frontier, stage blame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in entries if e["kind"] != "stage"]
    groups = _groups(entries)
    out: dict[str, str] = {}
    if not groups:
        return out
    first = next(iter(groups.values()))[0]
    k = first["metrics"]["quotas"]["rank"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    recall_curves: dict[tuple, list[str]] = {}  # cascades sharing one recall tower draw it once
    for label, g in groups.items():
        ms = _grid(g[0], k)
        ys = [np.nanmean([_get(e, f"metrics/stages/prerank/teacher_recall@{k}@{m}") for e in g]) for m in ms]
        ax.plot(ms, ys, "-o", label=f"{label} prerank")
        curve = tuple(ms) + tuple(round(float(np.nanmean([_get(e, f"metrics/stages/recall/teacher_recall@{k}@{m}") for e in g])), 12) for m in ms)
        recall_curves.setdefault(curve, []).append(label)
    for curve, labels in recall_curves.items():
        half = len(curve) // 2
        ax.plot(curve[:half], curve[half:], ":s", label=f"recall of {', '.join(labels)}")
    ms = _grid(first, k)
    for name, style in (("random_prerank", "--"), ("popularity_prerank", "-.")):
        ax.plot(ms, [_get(first, f"metrics/baselines/{name}/teacher_recall@{k}@{m}") for m in ms], style, color="grey", label=name.replace("_", " ") + f" ({first['label']})")
    ax.set_xscale("log")
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.set_xlabel("m: candidates the stage passes on")
    ax.set_ylabel(f"teacher Recall@{k}@m")
    ax.set_title(f"How many items each stage must pass on to keep the ranker's top-{k}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out["consistency"] = _png(fig)

    out["frontier"] = _png(frontier_figure(groups, first))

    rows = [(label, "metrics/flow") for label in groups]
    if any(not math.isnan(_get(first, "metrics/flow/oracle_ratio")) for _ in [0]):
        rows += [(f"random pre-ranker ({first['label']})", "metrics/baselines/random_prerank"), (f"popularity pre-ranker ({first['label']})", "metrics/baselines/popularity_prerank")]
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
        parts = [("oracle_ratio", "shown", "#4c9a2a"), ("blame_rank", "lost at rank", "#e0a030"), ("blame_prerank", "lost at pre-rank", "#d05030"), ("blame_recall", "lost at recall", "#7a3b8f")]
        for i, (label, root) in enumerate(rows):
            g = groups.get(label, [first])
            left = 0.0
            for key, name, color in parts:
                w = np.nanmean([_get(e, f"{root}/{key}") for e in g])
                ax.barh(i, w, left=left, color=color, label=name if i == 0 else None)
                left += w
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of the best achievable true utility (top-k of the catalog)")
        ax.set_title("Stage blame: which stage drops the best items")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        out["blame"] = _png(fig)
    return out


# ------------------------------------------------------------------------------- writing


def text_table(t: dict) -> str:
    """A table as aligned plain-text columns, for the terminal."""
    widths = [max(len(r[i]) for r in [t["header"]] + t["rows"]) for i in range(len(t["header"]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [t["header"]] + t["rows"])


def _md_table(t: dict) -> str:
    lines = ["| " + " | ".join(t["header"]) + " |", "|" + "---|" * len(t["header"])]
    lines += ["| " + " | ".join(r) + " |" for r in t["rows"]]
    return "\n".join(lines)


def _html_table(t: dict) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t["header"])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t["rows"])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PLOT_TITLES = {"consistency": "Recall-vs-rank: teacher Recall@10@m", "frontier": "Quality-cost frontier", "blame": "Stage blame (synthetic world)"}


LEFT_OUT = "the logged system's own cascade is not a reference row: a logged positive exists only where it exposed the item, so it keeps every positive by construction"


def notes(entries: list[dict]) -> list[str]:
    out = [LEFT_OUT]
    for e in entries:
        out += [f"{e['label']}: {n}" for n in e.get("notes", [])]
    return out


def read_entries(out: str | Path) -> list[dict]:
    """The evaluated entries of the report in ``out`` (its ``metrics.json``)."""
    return json.loads((Path(out) / METRICS_FILE).read_text())["entries"]


def opening(entries: list[dict]) -> tuple[list[str], dict | None]:
    """The verdict over the cascades (``cascade.verdict``): sentences in markdown, the table of
    where the best cascade loses its positives."""
    return verdict(_groups([e for e in entries if e["kind"] != "stage"]))


def plain(sentence: str) -> str:
    """A markdown sentence of the verdict for the terminal."""
    return sentence.replace("**", "")


def _html_sentence(sentence: str) -> str:
    parts = html.escape(sentence).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def write_report(entries: list[dict], out: str | Path) -> Path:
    """``metrics.json``, ``report.md`` and ``report.html`` in ``out`` (replaced whole); they open
    on the verdict."""
    tabs = tables(entries)
    figs = plots(entries)
    lines = notes(entries)
    said, losses = opening(entries)
    with replacing_directory(Path(out)) as tmp:
        (tmp / METRICS_FILE).write_text(json.dumps({"entries": entries, "glossary": GLOSSARY}, indent=2, default=float) + "\n")
        md = ["# cascade evaluation report", ""]
        if said:
            md += ["## Verdict", ""] + [f"- {s}" for s in said] + [""] + ([_md_table(losses), ""] if losses else [])
        md += [f"- {n}" for n in lines] + ([""] if lines else [])
        for title, t in tabs.items():
            md += [f"## {title}", "", _md_table(t), ""]
        for name, data in figs.items():
            (tmp / f"{name}.png").write_bytes(base64.b64decode(data))
            md += [f"## {PLOT_TITLES[name]}", "", f"![{name}]({name}.png)", ""]
        md += ["## What the names mean", ""] + [f"- **{k}**: {v}" for k, v in GLOSSARY.items()]
        (tmp / "report.md").write_text("\n".join(md) + "\n")
        style = "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        body = ["<h1>cascade evaluation report</h1>"]
        if said:
            body += ["<h2>Verdict</h2><ul>" + "".join(f"<li>{_html_sentence(x)}</li>" for x in said) + "</ul>"] + ([_html_table(losses)] if losses else [])
        body += ["<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in lines) + "</ul>"] if lines else []
        for title, t in tabs.items():
            body += [f"<h2>{html.escape(title)}</h2>", _html_table(t)]
        for name, data in figs.items():
            body += [f"<h2>{PLOT_TITLES[name]}</h2>", f'<img alt="{name}" src="data:image/png;base64,{data}">']
        body += ["<h2>What the names mean</h2><dl>" + "".join(f"<dt><b>{html.escape(k)}</b></dt><dd>{html.escape(v)}</dd>" for k, v in GLOSSARY.items()) + "</dl>"]
        (tmp / "report.html").write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>cascade report</title><style>{style}</style></head><body>{"".join(body)}</body></html>\n')
    return Path(out)
