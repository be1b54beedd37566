"""Issue 19, items 1-2: a runs folder tells its results (targets) from its input runs (the
sources' fold-0 models a transfer run needed), and every table shows the finished results of the
whole folder, whichever call made them."""

import json
import shutil
import sys
from pathlib import Path

import pandas as pd

from steph.experiments.cv import run_cv
from steph.experiments.summary import collect, mean_sd_table
from steph.runs import RunsFolder
from steph.runs.requests import REQUESTS_FILE

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_experiment_config
from test_cli import run as cli  # (args, capsys) -> exit code, stdout, stderr


def copy_grid(tiny_grid, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_grid, runs)
    return runs


def table_lines(text):
    return [line for line in text.splitlines() if line.startswith("|")]


def test_summaries_leave_out_the_sources_input_runs(tiny_grid, tiny_data, tmp_path, capsys):
    """`steph cv` and `steph summarize` print the same table of the target's runs; the sources'
    fold-0 ABMIL runs are listed as inputs, not averaged in."""
    runs = copy_grid(tiny_grid, tmp_path)
    assert {r.cohort for r, _ in RunsFolder(runs).finished()} == {"TGT", "RELA", "UNRB"}
    assert set(collect(runs)["cohort"]) == {"TGT"}
    code, cv_out, _ = cli(["cv", "--data", str(tiny_data), "--out", str(runs), "--methods",
                           "abmil,steph,adamerging", "--targets", "TGT", "--folds", "0,1",
                           "--set", "train.epochs=2", "--set", "train.bags_per_step=4",
                           "--set", "data.workers=0", "--set", "train.device=cpu",
                           "--set", "model.options.abmil.hidden_dim=16",
                           "--set", "model.options.abmil.attn_dim=8",
                           "--set", "steph.embed_dim=16", "--quiet"], capsys)
    assert code == 0
    code, sum_out, _ = cli(["summarize", "--out", str(runs), "--data", str(tiny_data)], capsys)
    assert code == 0
    assert table_lines(cv_out) == table_lines(sum_out)
    header = table_lines(sum_out)[0]
    assert header == "| method | TGT | Avg. |"  # no RELA / UNRB column
    assert "2 input run(s)" in sum_out and "RELA/abmil/fold0" in sum_out
    written = pd.read_csv(runs / "summary.csv")
    assert set(written["cohort"]) == {"TGT"}
    assert set(pd.read_csv(runs / "timing.csv")["cohort"]) == {"TGT"}
    assert "RELA" not in set(pd.read_csv(runs / "comparisons.csv")["cohort"])
    assert "input run(s)" in (runs / "summary.md").read_text()


def test_the_sd_of_one_fold_is_a_dash():
    one = pd.DataFrame({"cohort": ["A", "B", "B"], "method": ["abmil"] * 3,
                        "repeat": [0, 0, 0], "fold": [0, 0, 1], "c_index": [0.69, 0.6, 0.7]})
    table = mean_sd_table(one)
    assert table.loc["abmil", "A"] == "0.6900 ± – (n=1)"
    assert table.loc["abmil", "B"] == "0.6500 ± 0.071 (n=2)"


def test_a_call_with_fewer_methods_keeps_the_others_in_the_summary(tiny_grid, tiny_data,
                                                                      tmp_path):
    runs = copy_grid(tiny_grid, tmp_path)
    summary = run_cv(tiny_data, runs, ["abmil"], targets=["TGT"], folds=[0, 1],
                     cfg=tiny_experiment_config(), progress=False)
    expected = {"abmil", "steph", "adamerging", "oracle"}
    assert set(summary["method"]) == expected
    assert set(pd.read_csv(runs / "summary.csv")["method"]) == expected
    assert {"steph", "adamerging"} <= set(pd.read_csv(runs / "comparisons.csv")["method"])
    assert set(pd.read_csv(runs / "timing.csv")["method"]) == {"abmil", "steph", "adamerging"}
    md = (runs / "summary.md").read_text()
    assert "| steph |" in md and "| adamerging |" in md


def test_a_folder_without_requests_infers_its_results_and_says_so(tiny_grid, tmp_path, capsys):
    runs = copy_grid(tiny_grid, tmp_path)
    (runs / REQUESTS_FILE).unlink()
    roles = RunsFolder(runs).roles()
    assert roles.inferred and roles.targets == ("TGT",)
    assert roles.results == {("TGT", "abmil"), ("TGT", "steph"), ("TGT", "adamerging")}
    code, out, _ = cli(["summarize", "--out", str(runs)], capsys)
    assert code == 0 and "results inferred" in out
    assert table_lines(out)[0] == "| method | TGT | Avg. |"
    # the first request recorded there keeps the inferred results
    RunsFolder(runs).record_request(["RELA"], ["abmil"], [("RELA", "abmil")], folds=[0])
    record = json.loads((runs / REQUESTS_FILE).read_text())
    assert record["format"] == "steph-requests/1"
    assert record["requests"][0]["inferred"] is True
    roles = RunsFolder(runs).roles()
    assert not roles.inferred
    assert ("TGT", "steph") in roles.results and ("RELA", "abmil") in roles.results
    assert ("UNRB", "abmil") not in roles.results
    # RELA's fold 0 is now a result of its own request, UNRB's stays an input
    assert set(collect(runs)["cohort"]) == {"TGT", "RELA"}


def test_the_report_lists_input_runs_apart(tiny_grid, tmp_path):
    from steph.analysis.runs import run_inventory
    from steph.report.html import Report, _Page, _runs_section

    runs = copy_grid(tiny_grid, tmp_path)
    inv = run_inventory(runs)
    roles = dict(zip(inv["cohort"] + "/" + inv["method"], inv["role"]))
    assert roles["RELA/abmil"] == "input" and roles["TGT/steph"] == "result"
    page = _Page(tmp_path / "figs", Report(path=tmp_path / "r.html"))
    _runs_section(page, runs, inv)
    text = "\n".join(page.parts["runs"])
    results, inputs = text.split("Input runs")
    assert "TGT" in results and "RELA" not in results
    assert "RELA" in inputs and "UNRB" in inputs
