"""Issue 19, item 4: every input a request reads is checked before any training, and every
problem is reported at once (`steph cv`, `steph train`, `steph data check`)."""

import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from steph.errors import DataError
from steph.experiments.cv import run_cv

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_experiment_config
from test_cli import run as cli  # (args, capsys) -> exit code, stdout, stderr


def broken(tiny_data, tmp_path):
    """The tiny data with a negative time in the target's label table and a source feature file
    that is not HDF5."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    labels = pd.read_csv(data / "TGT" / "labels.csv", dtype=str)
    labels.loc[3, "time"] = "-5"
    labels.to_csv(data / "TGT" / "labels.csv", index=False)
    bad = min((data / "RELA" / "features").glob("*.h5"))
    bad.write_bytes(b"this is not an HDF5 file")
    return data, bad


def test_cv_checks_every_cohort_before_training(tiny_data, tmp_path, capsys):
    data, bad = broken(tiny_data, tmp_path)
    runs = tmp_path / "runs"
    code, _, err = cli(["cv", "--data", str(data), "--out", str(runs), "--methods",
                          "abmil,steph", "--targets", "TGT", "--folds", "0", "--epochs", "1",
                          "--quiet"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "2 problem(s) in the inputs of this request; nothing was trained" in err
    assert "labels.csv" in err and "time" in err  # the target's label table, its column
    assert bad.name in err  # the source's feature file
    # nothing trained: not the sources, not theta_0
    assert not list(runs.rglob("metrics.json")) and not (runs / "theta0.safetensors").exists()


def test_train_checks_the_sources_too(tiny_data, tmp_path, capsys):
    data, bad = broken(tiny_data, tmp_path)
    shutil.copy(tiny_data / "TGT" / "labels.csv", data / "TGT" / "labels.csv")
    code, _, err = cli(["train", "--data", str(data), "--out", str(tmp_path / "runs"),
                        "--cohort", "TGT", "--method", "steph", "--quiet"], capsys)
    assert code == 1 and bad.name in err and "1 problem(s)" in err
    assert not list((tmp_path / "runs").rglob("metrics.json"))


def test_cohorts_of_one_network_need_one_feature_dimension(tiny_data, tmp_path):
    from steph.data import synthetic

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import tiny_synth_config

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    other = tmp_path / "other"
    synthetic.generate(tiny_synth_config(feature_dim=12), other, seed=1, progress=False)
    shutil.rmtree(data / "UNRB")
    shutil.copytree(other / "UNRB", data / "UNRB")
    with pytest.raises(DataError, match=r"feature dimensions differ between cohorts "
                                        r"\(UNRB: 12; TGT, RELA: 16\)|"
                                        r"\(RELA, TGT: 16; UNRB: 12\)|\(TGT, RELA: 16; UNRB: 12\)"):
        run_cv(data, tmp_path / "runs", ["steph"], targets=["TGT"], folds=[0],
               cfg=tiny_experiment_config(epochs=1), progress=False)


def test_data_check_reports_every_cohort(tiny_data, tmp_path, capsys):
    data, bad = broken(tiny_data, tmp_path)
    code, out, err = cli(["data", "check", "--data", str(data)], capsys)
    assert code == 1 and "Traceback" not in err
    lines = out.splitlines()
    rela = next(line for line in lines if line.startswith("RELA"))
    assert "1 problem(s)" in rela and any(bad.name in line for line in lines)
    tgt = next(line for line in lines if line.startswith("TGT"))
    assert "labels.csv" in tgt and "time" in tgt
    assert next(line for line in lines if line.startswith("UNRB")).endswith("0 problem(s)")
    assert lines[-1] == "2 problem(s) in 2 of 3 cohort(s)"
    # --skip-bad-slides: bad slides alone do not fail the check; a broken table still does
    shutil.copy(tiny_data / "TGT" / "labels.csv", data / "TGT" / "labels.csv")
    code, out, _ = cli(["data", "check", "--data", str(data), "--skip-bad-slides"], capsys)
    assert code == 0 and out.splitlines()[-1] == "1 problem(s) in 1 of 3 cohort(s)"
