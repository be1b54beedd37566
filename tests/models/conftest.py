"""Tiny configurations of every MIL network, and bag inputs for them (as fixtures: the test
modules are imported with --import-mode=importlib and cannot import this file)."""

import pytest
import torch

from steph.models import create_model

# small but structurally complete: every code path of the full-size networks runs
TINY = {
    "abmil": {"hidden_dim": 16, "attn_dim": 8},
    "transmil": {"dim": 16, "heads": 2, "n_landmarks": 8, "residual_kernel": 5},
    "ilra": {"hidden_dim": 16, "heads": 2},
    "r2t_mil": {"dim": 16, "heads": 2, "region_num": 2, "epeg_kernel": 3, "attn_dim": 8},
    "patch_gcn": {"hidden_dim": 8},
}


def ring_edges(n: int, k: int = 2) -> torch.Tensor:
    """Each node receives edges from its k successors on a ring (fewer when n <= k)."""
    k = min(k, n - 1)
    src = [(i + j) % n for i in range(n) for j in range(1, k + 1)]
    dst = [i for i in range(n) for _ in range(k)]
    return torch.tensor([src, dst], dtype=torch.int64).reshape(2, -1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids thread wake-up costs, which on a busy machine made these
    millisecond forwards take seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
