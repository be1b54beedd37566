"""The trainer's device contract (docs/architecture.md): after ``module.to(device)`` every
tensor a module computes with is on that device. Tested on the ``meta`` device, which refuses
to mix with CPU tensors, so a tensor kept as a plain attribute, or created on the default
device inside a forward pass, fails here as it would on a GPU."""

from __future__ import annotations

import pytest
import torch

from steph.merging import baselines as B
from steph.models import ABMIL
from steph.models.output import as_output

from .test_steph import HP, make_pool, make_steph

META = torch.device("meta")


def _modules():
    pool = make_pool(m=4)
    yield "abmil", ABMIL(**HP)
    for kw in ({}, {"mixing": "none"}, {"mixing": "free"}, {"aggregation": "free"},
               {"top_k": 10}):
        yield f"steph {kw}", make_steph(m=4, **kw)[0]
    yield "adamerging", B.AdaMerging(B.adamerging_stack(pool), HP)
    yield "surgery_am", B.AdaMerging(B.adamerging_stack(pool), HP, surgery_rank=2)
    yield "static merge", B.merged_abmil(B.model_average(pool), HP)


@pytest.mark.parametrize("module", [m for _, m in _modules()], ids=[n for n, _ in _modules()])
def test_a_module_moved_to_a_device_computes_there(module):
    module.to(META)
    x = torch.randn(23, HP["in_dim"], device=META)
    module.train()
    getattr(module, "begin_step", lambda: None)()
    out = as_output(module(x))
    loss = out.logits.sum() + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    getattr(module, "end_step", lambda: None)()
    assert out.logits.device == META
    assert all(v.device == META for v in out.stats.values())
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device == META for g in grads)
    module.eval()
    if hasattr(module, "abmil"):
        module.abmil.chunk_size = 8  # the chunked evaluation paths too
    elif isinstance(module, ABMIL):
        module.chunk_size = 8
    with torch.no_grad():
        assert as_output(module(x)).logits.device == META
