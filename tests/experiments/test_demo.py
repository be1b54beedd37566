import pytest

from steph.experiments.demo import DEMO_CONFIG, demo_methods, run_demo


def test_demo_methods_cover_every_method_family():
    names = demo_methods()
    for m in ["abmil", "steph", "model_avg", "task_arithmetic", "adamerging", "ties_am", "isoc_am", "surgery_am"]:
        assert m in names
    assert DEMO_CONFIG["steph"]["gamma"] == 0.0


@pytest.mark.slow
def test_full_demo(tmp_path):
    """The project's main job, end to end (minutes): every method, 5 folds."""
    lines = []
    summary = run_demo(tmp_path, progress=False, echo=lines.append)
    runs = summary[summary["method"] != "oracle"]
    assert set(runs["method"]) == set(demo_methods())
    assert (runs.groupby("method")["fold"].nunique() == 5).all()
    assert runs["c_index"].notna().all()
    assert any("| steph |" in line for line in lines)
