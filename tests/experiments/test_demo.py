import sys
from pathlib import Path

import pytest

from steph.experiments.cv import run_cv
from steph.experiments.demo import (
    DEMO_CONFIG,
    demo_methods,
    family_of,
    run_demo,
    source_weights,
    top_sources_text,
)


def test_demo_methods_cover_every_method_family():
    names = demo_methods()
    for m in ["abmil", "steph", "model_avg", "task_arithmetic", "adamerging", "roupkt",
              "zero_shot", "linear_probe", "fusion_mean"]:
        assert m in names
    assert not any(m.startswith("steph_") for m in names)  # ablations are left to steph cv
    assert set(DEMO_CONFIG) <= {"data", "train"}  # performance settings only: defaults as users get


def test_top_sources_are_read_from_the_steph_logs(tiny_data, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import tiny_experiment_config

    run_cv(tiny_data, tmp_path, ["steph"], targets=["TGT"], folds="0-1",
           cfg=tiny_experiment_config(epochs=1), progress=False)
    w = source_weights(tmp_path, "TGT")
    assert list(w.index) == ["fold0", "fold1"] and set(w.columns) == {"RELA", "UNRB"}
    assert family_of(tiny_data) == {"TGT": "a", "RELA": "a", "UNRB": "b"}
    text = top_sources_text(tmp_path, tiny_data, "TGT")
    assert "RELA" in text and "(related)" in text and "(unrelated)" in text
    first = text.splitlines()[1].split()[0]
    assert w.mean().idxmax() == first  # sorted by mean weight


def test_zero_shot_text_matches_the_zero_shot_table(tiny_data, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import tiny_experiment_config

    from steph.analysis.transferability import zero_shot_table, zero_shot_text

    run_cv(tiny_data, tmp_path, ["abmil", "zero_shot"], targets=["TGT"], folds="0-1",
           cfg=tiny_experiment_config(epochs=1), progress=False)
    text = zero_shot_text(tmp_path, tiny_data, "TGT")
    t = zero_shot_table(tmp_path, tiny_data, targets=["TGT"])
    t = t[t["split"] == "test"].groupby("source")["c_index"].mean()
    lines = text.splitlines()
    assert f"own ABMIL {t['own']:.3f}" in lines[0] and "mean C-index over 2 folds" in lines[0]
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[1:]}
    assert set(rows) == {"RELA", "UNRB"}
    for name, (value, tag) in rows.items():
        assert float(value) == pytest.approx(t[name], abs=5e-4)
        assert tag == ("(related)" if name == "RELA" else "(unrelated)")
    values = [float(v[0]) for v in rows.values()]
    assert values == sorted(values, reverse=True)


@pytest.mark.slow
def test_full_demo(tmp_path):
    """The project's main job, end to end (minutes): every demo method, 5 folds."""
    lines = []
    from steph.analysis.transferability import zero_shot_text

    summary = run_demo(tmp_path, progress=False, echo=lines.append, zero_shot_text=zero_shot_text)
    runs = summary[summary["method"] != "oracle"]
    assert set(runs["method"]) == set(demo_methods())
    assert (runs.groupby("method")["fold"].nunique() == 5).all()
    assert runs["c_index"].notna().all()
    means = runs.groupby("method")["c_index"].mean()
    # the training-free merges average every tensor of four cohorts' models, heads included:
    # on the demo data they rank ALPHA's patients worse than chance (0.45, README)
    assert (means.drop(["model_avg", "task_arithmetic"]) > 0.5).all()
    text = "\n".join(lines)
    assert "| steph |" in text and "Paired comparison with `abmil`" in text
    assert "Sources STEPH weighted most" in text and "Which cohorts can help ALPHA" in text
