"""Tiny configurations of every MIL network, and bag inputs for them (as fixtures: the test
modules are imported with --import-mode=importlib and cannot import this file)."""

import sys
from pathlib import Path

import pytest
import torch

from steph.models import create_model

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import TINY_NETWORKS as TINY  # tests/conftest.py


def ring_edges(n: int, k: int = 2) -> torch.Tensor:
    """Each node receives edges from its k successors on a ring (fewer when n <= k)."""
    k = min(k, n - 1)
    src = [(i + j) % n for i in range(n) for j in range(1, k + 1)]
    dst = [i for i in range(n) for _ in range(k)]
    return torch.tensor([src, dst], dtype=torch.int64).reshape(2, -1)


@pytest.fixture(autouse=True)
def one_thread(one_thread):
    """Every test here runs on one thread (tests/conftest.py's fixture)."""
    yield


@pytest.fixture
def tiny_net():
    """tiny_net(name, in_dim=12, n_bins=4) -> a small network of that architecture."""
    def make(name: str, in_dim: int = 12, n_bins: int = 4, **kw):
        return create_model(name, in_dim=in_dim, n_bins=n_bins, **{**TINY[name], **kw})
    return make


@pytest.fixture
def bag_inputs():
    """bag_inputs(model, n) -> the extra keyword inputs the model needs for a bag of n."""
    def inputs(model, n: int) -> dict:
        return {"edge_index": ring_edges(n)} if "edge_index" in model.bag_inputs else {}
    return inputs


@pytest.fixture
def ring():
    return ring_edges
