"""Fixtures shared by every test folder: a tiny synthetic world that trains in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steph.config import build_config
from steph.data import synthetic

TINY_COHORTS = ("TGT", "RELA", "UNRB")

# Small but structurally complete settings of every MIL network (every code path of the
# full-size networks runs), by model name.
TINY_NETWORKS = {
    "abmil": {"hidden_dim": 16, "attn_dim": 8},
    "transmil": {"dim": 16, "heads": 2, "n_landmarks": 8, "residual_kernel": 5},
    "ilra": {"hidden_dim": 16, "heads": 2},
    "r2t_mil": {"dim": 16, "heads": 2, "region_num": 2, "epeg_kernel": 3, "attn_dim": 8},
    "patch_gcn": {"hidden_dim": 8},
}


def tiny_synth_config(feature_dim: int = 16) -> synthetic.SynthConfig:
    kw = {"patches_mean": 20.0, "patches_max": 60, "slides_per_patient": 1.3}
    return synthetic.SynthConfig(
        feature_dim=feature_dim,
        n_phenotypes=6,
        latent_dim=8,
        min_patches=4,
        cohorts=(
            synthetic.CohortSpec("TGT", 30, "a", 0.6, **kw),
            synthetic.CohortSpec("RELA", 30, "a", 0.6, **kw),
            synthetic.CohortSpec("UNRB", 30, "b", 0.6, **kw),
        ),
    )


def tiny_experiment_config(**train):
    """Small model and short training: 2 epochs of 4-bag steps, on the CPU, bags read in the
    test process (worker processes cost more than they save on bags of 20 patches; the tests
    of steph.data.loader and the worker-identity tests use them)."""
    return build_config({
        "data": {"workers": 0},
        "model": {"options": {"abmil": {"hidden_dim": 16, "attn_dim": 8}}},
        "train": {"epochs": 2, "bags_per_step": 4, "eval_every": 1, "device": "cpu", **train},
        "steph": {"embed_dim": 16},
    })


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data root with three tiny cohorts (read-only: copy it before changing anything)."""
    root = tmp_path_factory.mktemp("tiny-data")
    synthetic.generate(tiny_synth_config(), root, seed=0, progress=False)
    return root


@pytest.fixture
def tiny_cfg():
    return tiny_experiment_config()


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids thread wake-up costs, which on a busy machine made
    millisecond forwards take seconds; the thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_grid(tiny_data, tmp_path_factory) -> Path:
    """A finished runs folder on ``tiny_data`` (read-only: copy it before changing anything):
    ABMIL, STEPH and AdaMerging on TGT folds 0 and 1 (sources RELA, UNRB: their ABMIL fold 0)."""
    from steph.experiments.cv import run_cv

    runs = tmp_path_factory.mktemp("tiny-grid") / "runs"
    cfg = tiny_experiment_config()
    run_cv(tiny_data, runs, ["abmil", "steph", "adamerging"], targets=["TGT"], folds=[0, 1],
           cfg=cfg, progress=False)
    return runs
