"""benchmarks/bench_gpu.py's smoke mode (--device cpu --small): every section runs and writes
its JSON and Markdown, so the script is known to work before it meets a GPU."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _smoke(tmp_path, monkeypatch, precisions):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_gpu

    threads = torch.get_num_threads()
    out = tmp_path / "out"
    try:
        assert bench_gpu.main(["--device", "cpu", "--small", "--out", str(out), "--workers", "1",
                               "--precisions", ",".join(precisions),
                               "--tmpdir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # --small runs on one thread
        sys.modules.pop("bench_gpu", None)
    res = json.loads((out / "bench_gpu.json").read_text())
    assert set(res["results"]) == {"step", "epoch", "cindex"}
    step = res["results"]["step"]
    assert {(r["model"], r["precision"]) for r in step["rows"]} == {
        (m, p) for m in ("ABMIL", "STEPH") for p in precisions}
    assert all(r["ms"] > 0 for r in step["rows"])
    assert all(math.isfinite(v) and v > 0 for v in step["ratios"].values())
    epoch = res["results"]["epoch"]
    whats = {(r["what"], r["precision"]) for r in epoch["rows"]}
    assert {("epoch STEPH", p) for p in precisions} <= whats
    assert ("load only (pipeline, no model)", None) in whats and epoch["workers"] == 1
    cidx = res["results"]["cindex"]["rows"]
    assert {(r["method"], r["precision"]) for r in cidx} == {
        (m, p) for m in ("abmil", "steph") for p in precisions}
    md = (out / "bench_gpu.md").read_text()
    assert "## One epoch" in md and f"| epoch STEPH | {precisions[-1]} |" in md
    assert not list(tmp_path.glob("steph-gpu-*"))  # the written data is removed
    return res


def test_bench_gpu_smoke(tmp_path, monkeypatch):
    res = _smoke(tmp_path, monkeypatch, ["bf16"])
    assert res["results"]["epoch"]["abmil_epoch_over_max_load_compute"] is None  # no fp32 epoch


@pytest.mark.slow
def test_bench_gpu_smoke_both_precisions(tmp_path, monkeypatch):
    res = _smoke(tmp_path, monkeypatch, ["fp32", "bf16"])
    assert "train step ABMIL fp32 / bf16 (speed-up)" in res["results"]["step"]["ratios"]
    assert res["results"]["epoch"]["abmil_epoch_over_max_load_compute"] > 0
