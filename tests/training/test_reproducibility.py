"""Bit-identical reruns: two processes of the same command, the switches of
train.deterministic (CUDA mocked: no GPU in CI), MKL's reproducible mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from steph.utils import reproducibility as repro

# fields that are timings or timestamps, allowed to differ between two processes
VOLATILE = {"log.jsonl": {"seconds"}, "metrics.json": {"train_seconds"}, "model.json": {"created"}}
PROVENANCE = {"run.json"}  # timing, host and software of a run, where a version writes one


def _comparable(path: Path):
    """What must be identical in a run's file: every byte, but for its volatile fields."""
    drop = VOLATILE.get(path.name)
    if drop is None:
        return path.read_bytes()
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in drop} for r in rows]
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}


def test_same_command_in_two_processes_gives_identical_files(tiny_data, tmp_path):
    """`steph train --method steph` (the shared theta_0, two ABMIL models and STEPH) started
    twice at the same time, in two processes: every tensor, prediction and loss is identical."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"hidden_dim": 16, "attn_dim": 8},
                                   "steph": {"embed_dim": 16},
                                   "train": {"epochs": 2, "bags_per_step": 4}}))
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}  # steph sets it itself
    procs = []
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "steph", "train", "--data", str(tiny_data), "--out",
               str(tmp_path / name), "--cohort", "TGT", "--method", "steph", "--config",
               str(cfg), "--sources", "RELA", "--quiet"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "MKL reproducible mode" in err
    a, b = tmp_path / "a", tmp_path / "b"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert sum(f.suffix == ".safetensors" for f in files) == 4  # theta_0 + 2 ABMIL + STEPH
    assert any(f.name == "predictions.csv" for f in files)
    for f in files:
        if f.name not in PROVENANCE:
            assert _comparable(a / f) == _comparable(b / f), f
    # bytes equal implies tensors equal; check the tensors too, as a reader sees them
    from steph.utils.io import load_tensors

    for f in files:
        if f.suffix == ".safetensors":
            ta, tb = load_tensors(a / f), load_tensors(b / f)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f


@pytest.mark.skipif(not (repro.mkl_cnr_mode() or "").endswith("STRICT"),
                    reason="needs MKL in strict reproducible mode")
def test_abmil_gradients_do_not_depend_on_the_thread_count():
    """Under MKL's strict mode the products of ABMIL give the same bits for any thread count
    (without it, every gradient differs between 1 and 2 threads)."""
    from steph.models import ABMIL

    torch.manual_seed(0)
    model = ABMIL(in_dim=384, n_bins=8, hidden_dim=128, attn_dim=64, dropout=0.0)
    bag = torch.randn(1500, 384, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            model.zero_grad()
            model(bag).square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(x, y) for x, y in zip(*grads))


def test_decode_cbwr():
    assert repro.decode_cbwr(0x10002) == "AUTO,STRICT"
    assert repro.decode_cbwr(0x1) == "OFF"
    assert repro.decode_cbwr(0x3) == "COMPATIBLE"
    assert repro.decode_cbwr(0x1000A) == "AVX2,STRICT"


def test_mkl_mode_is_requested_unless_the_user_chose_one():
    env = {}
    repro.request_mkl_cnr(env)
    assert env["MKL_CBWR"] == repro.MKL_CBWR_DEFAULT == "AUTO,STRICT"
    env = {"MKL_CBWR": "COMPATIBLE"}
    repro.request_mkl_cnr(env)
    assert env["MKL_CBWR"] == "COMPATIBLE"
    env = {"MKL_CBWR": ""}
    repro.request_mkl_cnr(env)
    assert env["MKL_CBWR"] == "AUTO,STRICT"


@pytest.fixture
def fake_cuda(monkeypatch):
    """A process that sees a GPU; records the determinism calls instead of making them."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda flag, **kw: calls.__setitem__("algorithms", flag))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False, raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True, raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)


def test_deterministic_on_cuda_switches_everything(fake_cuda):
    info = repro.configure(True, 1)
    assert fake_cuda == {"algorithms": True}
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    assert info["threads"] == 1 == torch.get_num_threads()
    assert info["cuda"] == {"cublas_workspace_config": ":4096:8", "cudnn_deterministic": True,
                            "cudnn_benchmark": False}


def test_deterministic_keeps_a_valid_cublas_setting(fake_cuda, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other deterministic value
    repro.configure(True, None)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    repro.configure(True, None)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_not_deterministic_leaves_torch_alone_but_pins_threads(fake_cuda):
    info = repro.configure(False, 1)
    assert fake_cuda == {} and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert torch.backends.cudnn.deterministic is False and torch.backends.cudnn.benchmark is True
    assert info["deterministic"] is False and info["threads"] == 1 == torch.get_num_threads()
    assert "cuda" not in info


def test_deterministic_on_cpu_only_touches_torch_algorithms(monkeypatch):
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda flag, **kw: calls.__setitem__("algorithms", flag))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    info = repro.configure(True, None)
    assert calls == {"algorithms": True} and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert info["threads"] == torch.get_num_threads() and "cuda" not in info


def test_deterministic_is_part_of_a_runs_identity_and_old_runs_stay_valid():
    from steph.config import build_config, without_performance_keys
    from steph.runs.migrations import upgrade_settings

    on = build_config().to_dict()
    off = build_config({"train": {"deterministic": False}}).to_dict()
    old = build_config().to_dict()
    del old["train"]["deterministic"]  # a config.yaml written before the setting existed
    assert without_performance_keys(on) == without_performance_keys(upgrade_settings(old))
    assert without_performance_keys(on) != without_performance_keys(off)