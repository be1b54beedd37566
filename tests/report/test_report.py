"""``steph report`` on the tiny finished grid (ABMIL, STEPH, AdaMerging; TGT folds 0-1): the
page's sections, its embedded images (decoded and checked as PNG / SVG), the figure files beside
it, a grid with unfinished runs, and the analyses' numbers against independent computations."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
import torch

from steph.analysis.runs import RunRef
from steph.data.features import strip_wsi_extension
from steph.report import ReportOptions, build_report
from steph.report.html import SECTIONS

PNG = b"\x89PNG\r\n\x1a\n"
EXPECTED_FIGURES = {"results-cindex", "results-forest", "km", "steph-dynamics", "steph-selection",
                    "landscape-TGT-fold0", "sar", "efficiency"}


def _images(page: str) -> list[tuple[str, bytes]]:
    out = []
    for src in re.findall(r'<img [^>]*src="([^"]+)"', page):
        m = re.fullmatch(r"data:(image/png|image/svg\+xml);base64,([A-Za-z0-9+/=]+)", src)
        assert m, f"an image that is not an embedded PNG / SVG: {src[:60]}"
        out.append((m.group(1), base64.b64decode(m.group(2), validate=True)))
    return out


def _check_image(mime: str, data: bytes) -> tuple[int, int]:
    """(width, height) of a valid PNG or SVG (raises otherwise)."""
    if mime == "image/png":
        from PIL import Image

        assert data.startswith(PNG)
        Image.open(io.BytesIO(data)).verify()
        return Image.open(io.BytesIO(data)).size
    root = ET.fromstring(data)
    assert root.tag.endswith("svg")
    w, h = (float(re.sub(r"[a-z]+$", "", root.get(k))) for k in ("width", "height"))
    return int(w), int(h)


def _section(page: str, key: str) -> str:
    m = re.search(rf'<section id="{key}">(.*?)</section>', page, re.DOTALL)
    assert m, f"no section {key}"
    return m.group(1)


def test_sections_and_embedded_images(built_report):
    page = built_report.path.read_text()
    for key, title in SECTIONS:
        assert title in _section(page, key)
    images = _images(page)
    names = set(built_report.figures)
    assert EXPECTED_FIGURES <= names
    assert sum(n.startswith("attention-") for n in names) == 2
    assert len(images) == len(names)
    for mime, data in images:
        w, h = _check_image(mime, data)
        assert w > 50 and h > 50
    assert {m for m, _ in images} == {"image/png", "image/svg+xml"}
    # every figure also beside the page, as PNG and SVG, and each embedded one is that file
    embedded = {d for _, d in images}
    for paths in built_report.figures.values():
        assert set(paths) == {"png", "svg"}
        _check_image("image/png", paths["png"].read_bytes())
        _check_image("image/svg+xml", paths["svg"].read_bytes())
        assert paths["png"].read_bytes() in embedded or paths["svg"].read_bytes() in embedded
    # one figure per section that has its inputs; each section with data shows a figure
    for key in ("results", "survival", "dynamics", "landscape", "sar", "attention", "efficiency"):
        assert "<img " in _section(page, key), key


def test_self_contained_and_printable(built_report):
    page = built_report.path.read_text()
    assert "<script" not in page.lower()
    for attr in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert attr.startswith(("data:", "#")), f"reference outside the file: {attr[:60]}"
    assert "@import" not in page and "url(" not in page
    assert "@media print" in page and "break-inside: avoid" in page
    assert "<details" not in page  # nothing hidden behind a click


def test_tables_and_notes(built_report, report_grid):
    page = built_report.path.read_text()
    results = _section(page, "results")
    for method in ("abmil", "steph", "adamerging", "oracle"):
        assert f"<td>{method}</td>" in results
    assert "pooled diff [95 % CI]" in results
    survival = _section(page, "survival")
    assert "log-rank" in survival and "<td>TGT</td>" in survival
    settings = _section(page, "settings")
    assert "run.sources" in settings and "RELA, UNRB" in settings and "torch" in settings
    efficiency = _section(page, "efficiency")
    assert "efficiency.csv" in efficiency and "<td>steph</td>" in efficiency
    assert "Training time per epoch" in efficiency
    assert built_report.notes == {}  # every input was there
    # the attention CSVs beside the figures
    assert len([f for f in built_report.files if f.suffix == ".csv"]) == 2


def test_numbers_against_independent_computations(built_report, report_grid, tiny_data):
    from steph.analysis.landscape import loss_landscape
    from steph.analysis.sar import steph_sar
    from steph.analysis.survival import risk_groups
    from steph.merging.analysis import subspace_alignment_ratio
    from steph.utils.io import load_tensors

    root = report_grid
    # the landscape at (C_s, C_t) = (0, 1) is the target's own model: its test loss is the
    # one the trainer logged in the target run's last epoch
    for source in ("RELA", "UNRB"):
        ls = loss_landscape(root, tiny_data, RunRef("TGT", "abmil", 0), source)
        assert ls.losses.shape == (26, 26)
        last = json.loads((root / "TGT/abmil/fold0/log.jsonl").read_text().splitlines()[-1])
        assert ls.losses[25, 0] == pytest.approx(last["test_loss"], rel=1e-5)
    # SAR at lambda = 0 from the STEPH artefact's stacked task vectors equals the ratio of the
    # task vectors computed from the run directories' weights
    sar = steph_sar(root, RunRef("TGT", "steph", 0))
    theta0 = load_tensors(root / "theta0.safetensors")
    tau_t = {k: v - theta0[k] for k, v in load_tensors(root / "TGT/abmil/fold0/model.safetensors").items()}
    for source in ("RELA", "UNRB"):
        tau_s = {k: v - theta0[k]
                 for k, v in load_tensors(root / f"{source}/abmil/fold0/model.safetensors").items()}
        for layer in ("feat_proj.0.weight", "attention.a.0.weight", "attention.b.0.weight"):
            row = sar[(sar["source"] == source) & (sar["layer"] == layer) & (sar["lambda"] == 0.0)
                      & (sar["kind"] == "curve")]
            assert row["sar"].item() == pytest.approx(
                subspace_alignment_ratio(tau_t[layer], tau_s[layer]), abs=1e-6)
        assert (sar[(sar["source"] == source) & (sar["kind"] == "steph")]["layer"].nunique()) == 3
    # risk groups: every test patient of both folds once per method
    groups = risk_groups(root, [RunRef("TGT", m, f) for m in ("abmil", "steph") for f in (0, 1)])
    assert groups.groupby("method").size().to_dict() == {"abmil": 12, "steph": 12}


def _abmil_attention(state: dict, x: torch.Tensor) -> np.ndarray:
    """ABMIL's gated attention written out (method.md section 3)."""
    h = torch.relu(x @ state["feat_proj.0.weight"].T + state["feat_proj.0.bias"])
    a = torch.tanh(h @ state["attention.a.0.weight"].T + state["attention.a.0.bias"])
    b = torch.sigmoid(h @ state["attention.b.0.weight"].T + state["attention.b.0.bias"])
    s = (a * b) @ state["attention.score.weight"].T + state["attention.score.bias"]
    return torch.softmax(s.reshape(-1), 0).numpy()


def test_attention_maps_against_the_formula(built_report, report_grid, tiny_data):
    from steph.data.cohort import Cohort
    from steph.data.features import read_coords
    from steph.inference import load_artefact
    from steph.utils.io import load_tensors

    cohort = Cohort.load(tiny_data / "TGT")
    for csv in [f for f in built_report.files if f.suffix == ".csv"]:
        table = pd.read_csv(csv)
        assert list(table.columns) == ["slide_id", "patch", "x", "y", "attention_abmil",
                                       "attention_steph"]
        slide = str(table["slide_id"].iloc[0])
        pid = cohort.slides.set_index("slide_id").loc[slide, "patient_id"]
        path = cohort.slides.set_index("slide_id").loc[slide, "path"]
        assert np.array_equal(table[["x", "y"]].to_numpy(), read_coords(path))
        fold = next(f for f in (0, 1) if pid in set(pd.read_csv(
            report_grid / f"TGT/steph/fold{f}/predictions.csv").query("split == 'test'")["patient_id"]))
        bag = cohort.load_bag(pid)
        slides = list(cohort.patient(pid)["slides"])
        start = sum(len(read_coords(cohort.slides.set_index("slide_id").loc[s, "path"]))
                    for s in slides[:slides.index(slide)])
        rows = slice(start, start + len(table))
        target = load_tensors(report_grid / f"TGT/abmil/fold{fold}/model.safetensors")
        assert table["attention_abmil"].to_numpy() == pytest.approx(
            _abmil_attention(target, bag)[rows], abs=1e-6)
        steph, _ = load_artefact(report_grid / f"TGT/steph/fold{fold}")
        merged = steph.explain(bag).merged
        assert table["attention_steph"].to_numpy() == pytest.approx(
            _abmil_attention(merged, bag)[rows], abs=1e-6)


def test_a_grid_with_unfinished_and_missing_runs(grid_copy):
    runs = grid_copy
    (runs / "TGT/steph/fold1/metrics.json").unlink()  # unfinished (interrupted)
    shutil.rmtree(runs / "TGT/adamerging/fold1")  # missing
    rep = build_report(runs, None, None, ReportOptions(progress=False))
    assert rep.path == runs / "report.html"
    page = rep.path.read_text()
    status = _section(page, "runs")
    assert "2 run(s) not finished" in status
    assert re.search(r"<td>TGT</td><td>steph</td><td>0</td><td>1</td><td>unfinished</td>", status)
    assert re.search(r"<td>TGT</td><td>adamerging</td><td>0</td><td>1</td><td>missing</td>", status)
    # the finished runs are still reported; without --data the feature analyses say so
    assert "<img " in _section(page, "results") and "<img " in _section(page, "sar")
    for key in ("landscape", "attention"):
        assert "Needs the features" in _section(page, key)
    assert "training" in _section(page, "dynamics")  # selections from the log instead
    assert "No efficiency measurement" in _section(page, "efficiency")


def test_no_steph_run(grid_copy, tmp_path):
    runs = grid_copy
    shutil.rmtree(runs / "TGT/steph")
    rep = build_report(runs, None, tmp_path / "r.html", ReportOptions(progress=False))
    page = rep.path.read_text()
    for key in ("dynamics", "landscape", "sar", "attention"):
        assert "No finished run of <code>steph</code>" in _section(page, key)
    assert "<img " in _section(page, "survival")  # the baseline's curves remain


def test_cli_report_and_analyses(report_grid, tiny_data, tmp_path, capsys):
    from steph.cli import main

    def run(args):
        with pytest.raises(SystemExit) as exc:
            main(args)
            raise SystemExit(0)
        out = capsys.readouterr()
        return exc.value.code or 0, out.out, out.err

    code, out, _ = run(["report", "--out", str(report_grid), "--html", str(tmp_path / "r.html"),
                        "--quiet"])
    assert code == 0 and "r.html" in out and (tmp_path / "r-figures" / "km.svg").exists()
    dest = tmp_path / "analysis"
    code, out, _ = run(["analyze", "sar", "--out", str(report_grid), "--target", "TGT",
                        "--fold", "1", "--dest", str(dest)])
    assert code == 0 and "SAR" in out
    assert {p.name for p in dest.iterdir()} == {"sar-TGT-fold1.png", "sar-TGT-fold1.svg",
                                                 "sar-TGT-fold1.csv"}
    code, out, _ = run(["analyze", "landscape", "--out", str(report_grid), "--data",
                        str(tiny_data), "--target", "TGT", "--sources", "UNRB", "--step", "0.5",
                        "--dest", str(dest), "--quiet"])
    assert code == 0 and "lowest smoothed test loss" in out
    grid = pd.read_csv(dest / "landscape-TGT-fold0.csv")
    assert len(grid) == 9 and set(grid["source"]) == {"UNRB"}
    pred = pd.read_csv(report_grid / "TGT/steph/fold1/predictions.csv")
    pid = pred.loc[pred["split"] == "test", "patient_id"].iloc[0]
    labels = pd.read_csv(tiny_data / "TGT/labels.csv")
    slide = strip_wsi_extension(labels.loc[labels["patient_id"] == pid, "slide_id"].iloc[0])
    code, out, _ = run(["analyze", "attention", "--out", str(report_grid), "--data",
                        str(tiny_data), "--slide", slide, "--dest", str(dest)])
    assert code == 0 and "TGT/steph/fold1" in out
    assert (dest / f"attention-{slide}.csv").exists() and (dest / f"attention-{slide}.png").exists()
    code, _, err = run(["analyze", "sar", "--out", str(report_grid), "--target", "RELA"])
    assert code == 1 and "no finished steph run of cohort 'RELA'" in err
    code, _, err = run(["analyze", "attention", "--out", str(report_grid), "--data",
                        str(tiny_data), "--slide", "NOPE"])
    assert code == 1 and "slide 'NOPE'" in err
    code, _, err = run(["analyze", "landscape", "--out", str(report_grid), "--data",
                        str(tiny_data), "--target", "TGT", "--sources", "TGT"])
    assert code == 1 and "not sources of" in err


def test_analyses_resume_from_their_cache(built_report, report_grid, tiny_data, monkeypatch):
    """After the report, the landscape, selections and attention maps are read back from
    RUNS/.cache/analysis without running a model; a cache entry of other inputs is redone."""
    import steph.analysis.landscape as L
    import steph.inference
    from steph.analysis.attention import attention_table
    from steph.analysis.dynamics import test_selections

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(L, "evaluate_grid", boom)
    monkeypatch.setattr(steph.inference, "load_artefact", boom)
    target = RunRef("TGT", "abmil", 0)
    first = L.loss_landscape(report_grid, tiny_data, target, "RELA")
    sel = test_selections(report_grid, tiny_data, RunRef("TGT", "steph", 1))
    assert len(sel) == 2 * 6 and set(sel["selected"]) == {1}  # K = 5 >= m = 2: all selected
    slide = str(pd.read_csv(built_report.files[0])["slide_id"].iloc[0])
    assert len(attention_table(report_grid, tiny_data, RunRef("TGT", "steph", 0), slide))
    cached = next((report_grid / ".cache/analysis/landscape/TGT/abmil/fold0").glob("RELA.json"))
    stored = json.loads(cached.read_text())
    cached.write_text(json.dumps({**stored, "key": "other inputs"}))
    with pytest.raises(AssertionError, match="recomputed"):
        L.loss_landscape(report_grid, tiny_data, target, "RELA")
    cached.write_text(json.dumps(stored))
    assert np.array_equal(L.loss_landscape(report_grid, tiny_data, target, "RELA").losses,
                          first.losses)


def test_chosen_slides_and_a_wrong_one(grid_copy, tiny_data):
    pred = pd.read_csv(grid_copy / "TGT/steph/fold1/predictions.csv")
    cohort_slides = pd.read_csv(tiny_data / "TGT/labels.csv")
    pid = pred.loc[pred["split"] == "test", "patient_id"].iloc[0]
    slide = strip_wsi_extension(cohort_slides.loc[cohort_slides["patient_id"] == pid,
                                                  "slide_id"].iloc[0])
    rep = build_report(grid_copy, tiny_data, None,
                       ReportOptions(progress=False, slides=[slide, "NOPE"], top_sources=1))
    assert {n for n in rep.figures if n.startswith("attention-")} == {f"attention-{slide}"}
    assert any("NOPE" in n for n in rep.notes["attention"])
    assert "landscape-TGT-fold0" in rep.figures


def test_a_missing_data_root_is_an_error_and_leaves_the_report(grid_copy, tmp_path, capsys):
    """Issue 19, item 5: `steph report --data <missing>` exits 1 and writes nothing (it
    overwrote a complete report with a weaker one); a rebuilt report removes the figures of an
    earlier one that it no longer has."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from test_cli import run as cli

    html = tmp_path / "r.html"
    code, _, _ = cli(["report", "--out", str(grid_copy), "--html", str(html), "--quiet"], capsys)
    assert code == 0
    before = html.read_bytes()
    stale = tmp_path / "r-figures" / "landscape-TGT-fold0.png"
    stale.write_bytes(b"an earlier report's figure")
    for missing in (tmp_path / "no-such-data", grid_copy):  # a typo; the runs folder
        code, _, err = cli(["report", "--out", str(grid_copy), "--data", str(missing),
                              "--html", str(html), "--quiet"], capsys)
        assert code == 1 and str(missing) in err and len(err.strip().splitlines()) == 1
        assert html.read_bytes() == before and stale.exists()
    code, _, err = cli(["summarize", "--out", str(grid_copy), "--data",
                        str(tmp_path / "no-such-data")], capsys)
    assert code == 1 and "no-such-data" in err
    code, _, _ = cli(["report", "--out", str(grid_copy), "--html", str(html), "--quiet"], capsys)
    assert code == 0 and not stale.exists()
    assert (tmp_path / "r-figures" / "km.svg").exists()
