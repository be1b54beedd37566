"""The runs folder's one owner (steph.runs): where every file is, the one walk over run
directories, record formats and the reading of version-1 records (steph.runs.migrations)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from steph.config import ADDED_AT_DEFAULT, build_config
from steph.runs import RunDir, RunRef, RunsFolder, migrations

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_experiment_config  # noqa: E402


def test_run_paths_and_walk(tmp_path):
    runs = RunsFolder(tmp_path)
    refs = [RunRef("A", "abmil", 0), RunRef("A", "abmil", 1), RunRef("A", "abmil", 0, 1),
            RunRef("B", "steph", 2)]
    for ref in refs:
        runs.run(ref).path.mkdir(parents=True)
    (runs.run(refs[1]).metrics).write_text("{}")
    for junk in ("splits/A", "graphs/A", ".cache/analysis", "report-figures", "A/.hidden/fold0"):
        (tmp_path / junk).mkdir(parents=True, exist_ok=True)
    assert RunRef("A", "abmil", 0, 1).path(tmp_path) == tmp_path / "A/abmil/rep1/fold0"
    assert str(RunRef("A", "abmil", 0, 1)) == "A/abmil/rep1/fold0"
    assert [ref for ref, _ in runs.walk()] == refs
    assert [ref for ref, _ in runs.finished()] == [refs[1]]
    assert runs.run(refs[0]).lease == tmp_path / "A/abmil/.fold0.lock"
    assert runs.theta0() == tmp_path / "theta0.safetensors"
    assert runs.theta0("patch_gcn") == tmp_path / "theta0-patch_gcn.safetensors"
    assert runs.splits("A", 2) == tmp_path / "splits/A/rep2"


def test_records_carry_their_format(tmp_path):
    run = RunDir(tmp_path / "r")
    settings = {"run": {"cohort": "A"}, **build_config().to_dict()}
    run.check_or_write_settings(settings)
    written = yaml.safe_load(run.config.read_text())
    assert written["format"] == migrations.SETTINGS_FORMAT
    assert "threads" not in written["train"]  # performance-only keys are not the identity
    run.check_or_write_settings(settings)  # the same run: fine
    run.write_metrics({"c_index": 0.7})
    assert json.loads(run.metrics.read_text())["format"] == migrations.METRICS_FORMAT
    assert run.read_metrics() == {"c_index": 0.7}
    run.write_record({"host": "h"})
    assert run.read_record() == {"host": "h"}


def test_version1_settings_identify_the_same_run(tmp_path):
    """A config.yaml written before formats existed: model.name, ABMIL's options at the top of
    model, no typed options, no eval_max_instances / deterministic / precision."""
    cfg = build_config({"model": {"options": {"abmil": {"hidden_dim": 16}}}})
    settings = {"run": {"cohort": "A"}, **cfg.to_dict()}
    old = json.loads(json.dumps(settings))
    old["model"] = {"name": "abmil", "hidden_dim": 16, "attn_dim": 384, "dropout": 0.25,
                    "init_seed": 0, "options": {}}
    del old["data"]["eval_max_instances"], old["train"]["deterministic"]
    del old["train"]["precision"]
    run = RunDir(tmp_path)
    run.config.write_text(yaml.safe_dump(old))
    assert run.read_settings()["model"] == settings["model"]
    run.check_or_write_settings(settings)
    other = json.loads(json.dumps(settings))
    other["model"]["options"]["abmil"]["hidden_dim"] = 32
    with pytest.raises(Exception, match="model.options.abmil.hidden_dim"):
        run.check_or_write_settings(other)


def test_formats_of_other_records_and_newer_versions_are_refused():
    with pytest.raises(ValueError, match="newer than this steph reads"):
        migrations.upgrade_metrics({"format": "steph-metrics/99"})
    with pytest.raises(ValueError, match="not a steph metrics record"):
        migrations.upgrade_metrics({"format": "steph-artefact/2"})
    assert migrations.upgrade_metrics({"c_index": 0.5}) == {"c_index": 0.5, "repeat": 0}
    assert migrations.upgrade_theta0({"hparams": {}}) == {"hparams": {}, "model": "abmil"}
    old = {"format": "steph-artefact/1", "kind": "abmil_surgery",
           "settings": {"abmil": {"in_dim": 4}, "rank": 2}}
    new = migrations.upgrade_manifest(old)
    assert new["kind"] == "mil_surgery" and new["format"] == migrations.ARTEFACT_FORMAT
    assert new["settings"] == {"arch": "abmil", "network": {"in_dim": 4}, "rank": 2}
    state = migrations.upgrade_artefact_tensors(old, {"abmil.w": 1, "surgery.up": 2})
    assert state == {"network.w": 1, "surgery.up": 2}
    assert migrations.upgrade_artefact_tensors(new, {"abmil.w": 1}) == {"abmil.w": 1}


def _as_version1(root: Path) -> None:
    """Rewrite every record of a runs folder as steph wrote it before formats existed."""
    for path in root.rglob("*"):
        if path.name == "config.yaml":
            d = yaml.safe_load(path.read_text())
            d.pop("format")
            model = d["model"]
            abmil = model["options"].pop("abmil")
            d["model"] = {"arch": model["arch"], **abmil, "init_seed": model["init_seed"],
                          "options": {}}
            for key in ("deterministic", "precision"):  # written only when not the default
                d.get("train", {}).pop(key, None)
            path.write_text(yaml.safe_dump(d, sort_keys=False))
        elif path.name in ("metrics.json", "run.json", "theta0.json"):
            d = json.loads(path.read_text())
            d.pop("format")
            if path.name == "metrics.json":
                d.pop("repeat")
            if path.name == "theta0.json":
                d.pop("model")
            path.write_text(json.dumps(d))
        elif path.name == "model.json":
            d = json.loads(path.read_text())
            d["format"] = "steph-artefact/1"
            if d["kind"] == "mil_surgery":
                d["kind"] = "abmil_surgery"
                s = d["settings"]
                d["settings"] = {"abmil": s["network"], "rank": s["rank"],
                                 "coefficients": s["coefficients"]}
            path.write_text(json.dumps(d))


def test_a_version1_runs_folder_is_read_without_training_again(tiny_data, tmp_path):
    """The same grid on a runs folder whose records are all version 1: nothing is trained
    again, the metrics are the same, and its artefacts predict the same risks."""
    from steph.experiments.cv import run_cv
    from steph.inference import predict_patients

    cfg = tiny_experiment_config(epochs=1)
    methods = ["abmil", "adamerging", "surgery_am"]
    first = run_cv(tiny_data, tmp_path, methods, targets=["TGT"], folds="0", cfg=cfg,
                   progress=False)
    runs = RunsFolder(tmp_path)
    surgery = runs.run(RunRef("TGT", "surgery_am", 0))
    pred = surgery.read_predictions()
    _as_version1(tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("model.safetensors")}
    again = run_cv(tiny_data, tmp_path, methods, targets=["TGT"], folds="0", cfg=cfg,
                   progress=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("model.safetensors")} == stamps
    assert again["c_index"].tolist() == first["c_index"].tolist()
    from steph.data.cohort import Cohort

    cohort = Cohort.load(tiny_data / "TGT")
    test = pred[pred["split"] == "test"]
    got = predict_patients(surgery.path, [(p, cohort.slide_paths(p)) for p in test["patient_id"]],
                           device="cpu")
    assert got["risk"].tolist() == pytest.approx(test["risk"].tolist(), rel=1e-5, abs=1e-6)


def test_keys_added_at_their_default_keep_the_identity(tmp_path):
    """steph.crossfit & co. (added after format 2): at the value earlier runs had they are not
    written, so a run made before them is the same run with the same config.yaml bytes; any
    other value is another run."""
    from steph.errors import RunError

    cfg = build_config()
    settings = {"run": {"cohort": "A"}, **cfg.to_dict()}
    assert settings["steph"]["crossfit"] == 0  # the effective config holds it
    run = RunDir(tmp_path / "r")
    run.check_or_write_settings(settings)
    written = yaml.safe_load(run.config.read_text())
    assert not {"crossfit", "crossfit_screen", "crossfit_test", "screen_ridge"} & set(written["steph"])
    before = run.config.read_bytes()
    old = json.loads(json.dumps(settings))  # a run written before the keys existed
    for key in ADDED_AT_DEFAULT["steph"]:
        del old["steph"][key]
    run.check_or_write_settings(old)
    assert run.config.read_bytes() == before
    other = build_config({"steph": {"crossfit": 3}})
    with pytest.raises(RunError, match="steph.crossfit"):
        run.check_or_write_settings({"run": {"cohort": "A"}, **other.to_dict()})
