"""The command line as a user meets it: exit codes and messages, no tracebacks."""

import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from steph.cli import main


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def test_help_and_methods(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "cv" in out and "demo" in out and "predict" in out
    code, out, _ = run(["methods"], capsys)
    assert code == 0 and "steph" in out and "abmil" in out


@pytest.mark.parametrize("args, needle", [
    (["cv", "--data", "/nonexistent/data", "--out", "/tmp/x"], "data root not found"),
    (["cv", "--data", "{data}", "--out", "{tmp}", "--methods", "abmil,wizard"], "unknown method 'wizard'"),
    (["cv", "--data", "{data}", "--out", "{tmp}", "--targets", "NOPE"], "unknown target"),
    (["cv", "--data", "{data}", "--out", "{tmp}", "--folds", "7"], "out of range"),
    (["cv", "--data", "{data}", "--out", "{tmp}", "--set", "train.nope=1"], "unknown key 'train.nope'"),
    (["cv", "--data", "{data}", "--out", "{tmp}", "--config", "{bad_cfg}"], "unknown key 'training'"),
    (["train", "--data", "{data}", "--out", "{tmp}", "--cohort", "TGT", "--fold", "9"], "no fold 9"),
])
def test_bad_input_is_one_clear_line(args, needle, capsys, tiny_data, tmp_path):
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text(yaml.safe_dump({"training": {"epochs": 3}}))
    args = [a.format(data=tiny_data, tmp=tmp_path / "runs", bad_cfg=bad_cfg) for a in args]
    code, out, err = run(args, capsys)
    assert code != 0
    assert needle in err
    assert "Traceback" not in err and "Traceback" not in out


def test_usage_error_exit_code(capsys):
    code, _, err = run(["cv", "--epochs", "zero"], capsys)
    assert code == 2 and "zero" in err


def test_debug_shows_the_traceback(capsys):
    from steph.errors import StephError

    with pytest.raises(StephError):
        main(["cv", "--data", "/nonexistent", "--out", "/tmp/x", "--debug"])


def test_synth_and_data_commands(tmp_path, capsys):
    data = tmp_path / "data"
    code, out, _ = run(["synth", "--out", str(data), "--preset", "demo", "--feature-dim", "8"], capsys)
    assert code == 0 and (data / "ALPHA" / "labels.csv").exists()
    code, out, _ = run(["data", "summary", "--data", str(data)], capsys)
    assert code == 0 and "ALPHA" in out and "DELTA" in out
    assert not re.search(r"\d\.\d{2,}", out)  # one decimal, not 63.333333 (issue 19, item 11)
    code, out, _ = run(["data", "check", "--data", str(data), "--cohorts", "ALPHA", "--full"], capsys)
    assert code == 0 and "0 problem(s)" in out and "no problem found in 1 cohort(s)" in out
    code, _, err = run(["synth", "--out", str(data), "--preset", "demo"], capsys)
    assert code == 1 and "already holds a cohort" in err  # never overwrites silently
    assert "add --overwrite to replace it" in err  # what one types (issue 19, item 7)


def test_train_predict_explain(tmp_path, capsys, tiny_data):
    data = tiny_data
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"hidden_dim": 8, "attn_dim": 4}, "steph": {"embed_dim": 8},
                                   "train": {"bags_per_step": 4}}))
    runs = tmp_path / "runs"
    code, out, err = run(["train", "--data", str(data), "--out", str(runs), "--cohort", "TGT",
                          "--method", "steph", "--epochs", "1", "--config", str(cfg), "--quiet"], capsys)
    assert code == 0, err
    assert "TGT/steph/fold0: test C-index" in out
    # the head start is one short line, not a dict of 16-digit floats (issue 19, item 11)
    head = [line for line in err.splitlines() if "head start fit:" in line]
    assert head and all("head_cv_cindex" not in line and len(line) < 160 for line in head)
    assert re.search(r"head start fit: ridge [0-9.e-]+ \(inner-CV C-index 0\.\d{3}, best of "
                     r"5\), noise ratio \d\.\d\d$", head[0])
    art = runs / "TGT" / "steph" / "fold0"
    slides = sorted((data / "TGT" / "features").glob("*.h5"))[:3]
    pred_csv = tmp_path / "pred.csv"
    code, out, err = run(["predict", "--model", str(art), "--labels", str(data / "TGT" / "labels.csv"),
                          "--out", str(pred_csv), *map(str, slides)], capsys)
    assert code == 0, err
    pred = pd.read_csv(pred_csv)
    assert pred["patient_id"].nunique() == len(pred) >= 1 and "S@365" in pred.columns
    code, out, err = run(["explain", "--model", str(art), str(slides[0]), "--device", "cpu"],
                         capsys)
    assert code == 0 and "selected sources" in out and "RELA" in out
    code, out, err = run(["predict", "--model", str(art), "--device", "cpu", str(slides[0])],
                         capsys)
    assert code == 0 and slides[0].stem in out


def _no_traceback(code, out, err, needle):
    assert code == 1 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert "Traceback" not in err + out


def test_missing_cuda_is_one_line(capsys, tiny_data, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    runs = tmp_path / "runs"
    _no_traceback(*run(["train", "--data", str(tiny_data), "--out", str(runs), "--cohort", "TGT",
                        "--set", "train.device=cuda", "--quiet"], capsys),
                  "train.device=cuda: CUDA is not available on this machine")
    assert not runs.exists()  # refused before anything was written
    _no_traceback(*run(["predict", "--model", str(runs), "--device", "cuda:1",
                        str(next((tiny_data / "TGT" / "features").glob("*.h5")))], capsys),
                  "CUDA is not available")


def test_bf16_on_a_gpu_without_it_is_one_line(capsys, tiny_data, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    _no_traceback(*run(["train", "--data", str(tiny_data), "--out", str(tmp_path / "runs"),
                        "--cohort", "TGT", "--set", "train.device=cuda", "--set",
                        "train.precision=bf16", "--quiet"], capsys),
                  "train.precision=bf16: cuda:0 (Tesla V100) does not support bf16")


def test_console_script_is_installed():
    exe = shutil.which("steph") or str(__import__("pathlib").Path(sys.executable).parent / "steph")
    res = subprocess.run([exe, "cv", "--data", "/nonexistent", "--out", "/tmp/x"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_predict_and_explain_mistakes_are_clear(tiny_grid, tiny_data, tmp_path, capsys):
    """Issue 19, item 6."""
    import h5py
    import numpy as np

    run_dir = tiny_grid / "TGT" / "steph" / "fold0"
    slides = sorted((tiny_data / "TGT" / "features").glob("*.h5"))[:2]
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f.create_dataset("features", data=np.ones((5, 7), np.float32))
    # explain: features of another dimension are one line naming the file and both dimensions
    _no_traceback(*run(["explain", "--model", str(run_dir), str(wrong), "--device", "cpu"],
                       capsys), f"{wrong}: feature dimension 7, but the model")
    # explain: several slides are explained one by one, or as one patient's bag when asked
    code, out, _ = run(["explain", "--model", str(run_dir), *map(str, slides), "--device",
                        "cpu"], capsys)
    assert code == 0 and out.count("selected sources") == 2
    assert out.startswith(f"{slides[0].stem}: ")
    code, out, _ = run(["explain", "--model", str(run_dir), *map(str, slides), "--patient",
                        "--device", "cpu"], capsys)
    assert code == 0 and out.count("selected sources") == 1
    assert out.startswith("one bag of 2 slides")
    # predict: a mistyped --features folder and a missing run are named
    typo = tiny_data / "TGT" / "featuers"
    _no_traceback(*run(["predict", "--model", str(run_dir), "--features", str(typo),
                        "--device", "cpu"], capsys), f"--features {typo}: folder not found")
    fold9 = tiny_grid / "TGT" / "steph" / "fold9"
    code, out, err = run(["predict", "--model", str(fold9), "--features",
                          str(tiny_data / "TGT" / "features"), "--device", "cpu"], capsys)
    _no_traceback(code, out, err, f"{fold9}: not found (give a finished run directory")
    assert "fold9.json" not in err
    # predict --labels: the C-index, and a warning that training patients are among them
    code, out, err = run(["predict", "--model", str(run_dir), "--features",
                          str(tiny_data / "TGT" / "features"), "--labels",
                          str(tiny_data / "TGT" / "labels.csv"), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "C-index against" in out and "(30 patient(s)" in out
    assert "24 of 30 patient(s) trained this model" in err and "without them:" in err


@pytest.mark.parametrize("args, needle", [
    (["--epochs", "4", "--set", "train.epochs=0"],
     "--epochs 4 and --set train.epochs=0 give train.epochs two values; give one"),
    (["--seed", "1", "--config", "{cfg}"],
     "--seed 1 and train.seed: 3 in {cfg} give train.seed two values"),
    (["--set", "train.lr=1e-3", "--set", "train.lr=1e-4"],
     "--set train.lr=1e-3 and --set train.lr=1e-4 give train.lr two values"),
    (["--epochs", "4", "--set", "train.epochs=4", "--seed", "3", "--config", "{cfg}"],
     "no fold 9"),  # the same value twice is no conflict: the command goes on
])
def test_conflicting_settings_are_an_error_naming_both(args, needle, capsys, tiny_data,
                                                       tmp_path):
    """Issue 19, item 7: `--epochs 4 --set train.epochs=0` ran 4 epochs silently."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"seed": 3}}))
    args = [a.format(cfg=cfg) for a in args]
    code, out, err = run(["train", "--data", str(tiny_data), "--out", str(tmp_path / "runs"),
                          "--cohort", "TGT", "--fold", "9", *args], capsys)
    if needle == "no fold 9":
        assert code == 1 and needle in err and "two values" not in err
    else:
        _no_traceback(code, out, err, needle.format(cfg=cfg))


def test_a_label_table_missing_a_column_names_it(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    labels = pd.read_csv(data / "TGT" / "labels.csv")
    labels.drop(columns="event").to_csv(data / "TGT" / "labels.csv", index=False)
    code, out, _ = run(["data", "check", "--data", str(data), "--cohorts", "TGT"], capsys)
    assert code == 1
    assert "the closest, native (patient_id, slide_id, time (days), event (1 = event)), " \
           "lacks column(s) 'event'" in out
    assert "--set data.convention=NAME" in out


def test_synth_lists_every_preset_and_writes_the_calibrated_one(tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    from steph.cli import synth
    from steph.data import synthetic

    choices = next(p for p in synth.params if p.name == "preset").type.choices
    assert list(choices) == list(synthetic.PRESETS)  # the CLI's list is the registry's
    code, out, _ = run(["synth", "--help"], capsys)
    assert code == 0 and "calibrated-null" in out and "calibrated 64" in out
    # the full preset takes seconds: the same code path with 10 patients per cohort
    full = synthetic.PRESETS["calibrated"]
    monkeypatch.setitem(synthetic.PRESETS, "calibrated", lambda: replace(
        full(), cohorts=tuple(replace(c, n_patients=10) for c in full().cohorts)))
    data = tmp_path / "cal"
    code, out, _ = run(["synth", "--out", str(data), "--preset", "calibrated"], capsys)
    assert code == 0 and "wrote 13 cohort(s) (BRCA" in out
    assert len(pd.read_csv(data / "SARC" / "true_risk.csv")) == 10
    code, _, err = run(["synth", "--out", str(tmp_path / "x"), "--preset", "calibrated",
                        "--feature-dim", "32"], capsys)
    assert code == 1 and "feature_dim >= 43" in err and len(err.strip().splitlines()) == 1
