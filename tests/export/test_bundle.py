import json
import shutil

import faiss
import numpy as np
import pytest

from cascade.cli import main
from export.bundle import MANIFEST, BundleError, IndexSpec, _write_index, sha256, verify_bundle
from export.runtime import CascadeService


def test_the_bundle_holds_every_stage_and_its_manifest_checks_out(bundle):
    manifest = verify_bundle(bundle)
    assert [(s["name"], s["model"], s["quota"]) for s in manifest["stages"]] == [("recall", "dssm", 40), ("prerank", "dssm", 10), ("rank", "din", 4)]
    assert set(manifest["files"]) == {"schema.json", "catalog.npz", "recall/user.onnx", "recall/index.faiss", "recall/item_ids.npy", "prerank/user.onnx", "prerank/item.onnx", "prerank/items.npy", "rank/model.onnx"}
    assert all(sha256(bundle / name) == digest for name, digest in manifest["files"].items())
    assert {"torch", "onnxruntime", "faiss-cpu", "lightgbm"} <= set(manifest["libraries"])
    # the cached item side covers the whole catalog by id, row 0 (padding) zero
    items = np.load(bundle / "prerank" / "items.npy")
    assert items.shape == (401, 1, 8) and not items[0].any()
    assert manifest["stages"][1]["score"]["kind"] == "dot"


@pytest.mark.parametrize("stream", ["auto", "always"])
def test_export_prints_parity_with_the_torch_cascade(trained, tmp_path, capsys, stream):
    from export.stages import from_run

    _, runs = trained
    run = runs / "frozen"
    if stream == "always":  # the cascade's data.stream (stages.json): the logs' candidates are never read whole
        run = shutil.copytree(run, tmp_path / "frozen")
        (run / "stages.json").write_text(json.dumps(json.loads((run / "stages.json").read_text()) | {"data_stream": stream}))
    assert from_run(run)[0].streamed == (stream == "always")
    assert main(["export", str(run), "--out", str(tmp_path / "b")]) == 0
    figures = parity_figures(capsys)
    # onnxruntime and torch agree to ~1e-7 here, so every stage keeps the same items
    assert figures["same_recall_survivors"] == figures["same_prerank_survivors"] == figures["same_final_order"] == 1.0
    assert figures["max_final_score_gap"] < 1e-5


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda b: (b / "prerank" / "items.npy").write_bytes((b / "prerank" / "items.npy").read_bytes()[:-1] + b"\x01"), "prerank/items.npy: altered"),
        (lambda b: (b / "rank" / "model.onnx").unlink(), "rank/model.onnx: missing"),
        (lambda b: (b / "recall" / "notes.txt").write_text("hi"), "recall/notes.txt: not in the manifest"),
        (lambda b: (b / MANIFEST).write_text("{"), "manifest.json: unreadable"),
        (lambda b: (b / MANIFEST).write_text(json.dumps(json.loads((b / MANIFEST).read_text()) | {"format_version": 9})), "format_version 9"),
    ],
)
def test_a_tampered_bundle_is_refused_naming_the_file(bundle, tmp_path, capsys, tamper, message):
    copy = shutil.copytree(bundle, tmp_path / "copy")
    tamper(copy)
    with pytest.raises(BundleError, match=message):
        CascadeService(copy)
    assert main(["serve", str(copy), "--port", "1"]) == 2  # refused before any socket is opened
    assert message in capsys.readouterr().err


def test_export_errors_exit_2_and_leave_an_older_bundle_whole(trained, bundle, tmp_path, capsys):
    config, runs = trained
    out = shutil.copytree(bundle, tmp_path / "old")
    before = verify_bundle(out)["files"]
    assert main(["export", "--recall", f"{config}:recall", "--prerank", f"{config}:exposure", "--rank", f"{config}:no_such", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--rank: " in err and "no experiment 'no_such'" in err
    assert verify_bundle(out)["files"] == before
    assert main(["export", str(runs / "recall"), "--out", str(tmp_path / "x")]) == 2
    assert "stages.json: missing" in capsys.readouterr().err
    assert main(["export", "--recall", f"{config}:recall", "--out", str(tmp_path / "x")]) == 2
    assert "--prerank is required" in capsys.readouterr().err
    assert main(["export", "--recall", f"{config}:recall", "--prerank", f"{config}:exposure", "--rank", f"{config}:din", "--quotas", "10,40,4", "--out", str(tmp_path / "x")]) == 2
    assert "quotas must shrink" in capsys.readouterr().err
    assert main(["export", "--recall", f"{config}:din", "--prerank", f"{config}:exposure", "--rank", f"{config}:din", "--out", str(tmp_path / "x")]) == 2
    assert "recall: model 'din' is not a two-tower model" in capsys.readouterr().err
    assert main(["export", "--recall", f"{config}:recall", "--prerank", f"{config}:exposure", "--rank", f"{config}:din", "--index", "annoy", "--out", str(tmp_path / "x")]) == 2
    assert "index 'annoy' is not one of flat, ivf, hnsw, ivfpq" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_named_stages_with_a_lightgbm_ranker_an_hnsw_index_and_int8(trained, tmp_path):
    config, runs = trained
    assert main(["train", str(config), "--experiment", "gbdt"]) == 0
    out = tmp_path / "gbdt"
    args = ["export", "--recall", f"{config}:recall", "--prerank", f"{config}:inttower", "--rank", f"{config}:gbdt", "--quotas", "40,10,4"]
    assert main(["train", str(config), "--experiment", "inttower"]) == 0
    assert main(args + ["--index", "hnsw", "--quantize", "--out", str(out)]) == 0
    manifest = verify_bundle(out)
    stages = {s["name"]: s for s in manifest["stages"]}
    assert stages["rank"]["kind"] == "lightgbm" and (out / "rank" / "model.txt").exists()
    assert stages["recall"]["index"]["factory"] == "HNSW32" and manifest["quantized"]
    assert stages["prerank"]["score"] == {"kind": "graph", "file": "score.onnx"}  # IntTower: MaxSim head
    service = CascadeService(out)
    got = service.recommend({"user_id": 5, "segment": 1, "history": [7, 8, 9]})
    assert len(got["items"]) == 4 and not {7, 8, 9} & set(got["items"])
    assert got["scores"] == sorted(got["scores"], reverse=True)


def parity_figures(capsys) -> dict[str, float]:
    """The figures of `cascade export`'s parity line."""
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("parity"))
    return dict(zip(line.split()[4::2], map(float, line.split()[5::2])))


def _export_with_parity(config, prerank: str, tmp_path, capsys):
    """Export recall -> ``prerank`` -> DIN of the trained config; every request keeps torch's
    pre-rank set and final order."""
    out = tmp_path / prerank
    assert main(["export", "--recall", f"{config}:recall", "--prerank", f"{config}:{prerank}", "--rank", f"{config}:din", "--quotas", "40,10,4", "--out", str(out)]) == 0
    figures = parity_figures(capsys)
    assert figures["same_prerank_survivors"] == figures["same_final_order"] == 1.0
    return out


def test_a_tarq_preranker_distils_exports_with_parity_and_serves(trained, tmp_path, capsys):
    config, runs = trained
    assert main(["train", str(config), "--experiment", "tarq"]) == 0  # distilled from the DIN
    epochs = [json.loads(line) for line in (runs / "tarq" / "metrics.jsonl").read_text().splitlines()]
    # the code usage of each epoch's training candidates: 2 levels of 8 codes
    assert epochs and all(0 < e["codebook_utilisation"] <= 1 and 0 <= e["token_entropy"] <= np.log(8) + 1e-6 for e in epochs)
    out = _export_with_parity(config, "tarq", tmp_path, capsys)
    stages = {s["name"]: s for s in verify_bundle(out)["stages"]}
    assert stages["prerank"]["score"] == {"kind": "graph", "file": "score.onnx"} and stages["prerank"]["item_vectors"] == [2, 8]
    codes = np.load(out / "prerank" / "items.npy")[1:, 1, :2]  # every item's 2 codes: rows 0..7 of level 0, 8..15 of level 1
    assert np.array_equal(codes, np.round(codes)) and (codes[:, 0] < 8).all() and ((codes[:, 1] >= 8) & (codes[:, 1] < 16)).all()
    got = CascadeService(out).recommend({"user_id": 5, "segment": 1, "history": [7, 8, 9]})
    assert len(got["items"]) == 4 and got["scores"] == sorted(got["scores"], reverse=True)


def test_a_cold_preranker_runs_whole_on_every_candidate_with_parity(trained, tmp_path, capsys):
    config, runs = trained
    assert main(["train", str(config), "--experiment", "cold"]) == 0  # distilled from the DIN
    out = _export_with_parity(config, "cold", tmp_path, capsys)
    stages = {s["name"]: s for s in verify_bundle(out)["stages"]}
    assert stages["prerank"]["kind"] == "onnx" and (out / "prerank" / "model.onnx").exists() and not (out / "prerank" / "items.npy").exists()
    got = CascadeService(out).recommend({"user_id": 5, "segment": 1, "history": [7, 8, 9]})
    assert len(got["items"]) == 4 and got["scores"] == sorted(got["scores"], reverse=True)


@pytest.mark.parametrize("prerank, item_side", [("poly", [1, 8]), ("mvke", [2, 8])])
def test_poly_encoder_and_mvke_distil_export_with_parity_and_serve(prerank, item_side, trained, tmp_path, capsys):
    config, _ = trained
    assert main(["train", str(config), "--experiment", prerank]) == 0
    out = _export_with_parity(config, prerank, tmp_path, capsys)
    stages = {s["name"]: s for s in verify_bundle(out)["stages"]}
    assert stages["prerank"]["score"]["kind"] == "graph" and stages["prerank"]["item_vectors"] == item_side
    assert len(CascadeService(out).recommend({"user_id": 5, "segment": 1, "history": [7, 8, 9]})["items"]) == 4


@pytest.mark.parametrize("kind, refine", [("flat", 0), ("ivf", 0), ("hnsw", 0), ("ivfpq", 0), ("ivfpq", 4)])
def test_each_index_kind_finds_the_exact_top_1_on_separated_vectors(kind, refine, tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    spec = IndexSpec(kind, nlist=16, nprobe=16, pq_m=8, refine=refine)
    _write_index(vectors, spec, tmp_path / "i.faiss")
    index = faiss.read_index(str(tmp_path / "i.faiss"))
    for name, value in spec.search_parameters().items():
        faiss.ParameterSpace().set_index_parameter(index, name, value)
    # each vector is its own best inner-product match (unit vectors); PQ is lossy, so 90% there,
    # and refined on 8-bit vectors among its top 4 it is exact again
    _, idx = index.search(vectors[:200], 1)
    hit = float((idx[:, 0] == np.arange(200)).mean())
    assert hit >= (0.9 if kind == "ivfpq" and not refine else 1.0), hit
    if refine:
        assert faiss.downcast_index(index).k_factor == refine


def test_only_an_ivfpq_index_is_refined():
    with pytest.raises(ValueError, match="refine 4: only an ivfpq index is refined"):
        IndexSpec("hnsw", refine=4)
    with pytest.raises(ValueError, match="refine -1"):
        IndexSpec("ivfpq", refine=-1)


def test_an_unknown_index_kind_is_refused():
    with pytest.raises(ValueError, match="index 'annoy' is not one of flat, ivf, hnsw, ivfpq"):
        IndexSpec("annoy")
