"""The interface every MIL network follows (steph.models.base), checked on all of them."""

import pytest
import torch
from torch import nn

from steph.models import MILNetwork, create_model, list_models

NETS = list_models()  # every registered network

# method.md section 6 / Table S4, at in_dim=1536 and n_bins=32
PARAMS = {"abmil": 1_197_729, "transmil": 2_949_680, "ilra": 4_214_560,
          "r2t_mil": 2_975_008, "patch_gcn": 1_586_980}

# Tensors that cannot influence the output, by construction of the specified configuration:
# Patch-GCN's first DeepGCN block owns a LayerNorm that is never applied (method.md's count);
# in ILRA with rank 1 every instance attends to ONE latent token (softmax weight 1), so the
# queries and keys of that attention do not matter.
INERT = {
    "patch_gcn": {"layers.0.norm.weight", "layers.0.norm.bias"},
    "ilra": {f"blocks.{b}.to_instances.{m}.{p}" for b in (0, 1) for m in ("fc_k", "attn.q_proj", "attn.k_proj")
             for p in ("weight", "bias")},
}


def test_the_networks_of_the_paper_are_registered():
    assert {"abmil", "transmil", "ilra", "r2t_mil", "patch_gcn"} <= set(NETS)
    assert set(PARAMS) == set(NETS)  # a new network needs its parameter count here


@pytest.mark.parametrize("name", NETS)
def test_every_network_has_typed_options_matching_its_class(name):
    """model.options.<name> is typed (steph.config.NetworksConfig) with exactly the class's
    keyword arguments besides in_dim, n_bins and the performance setting chunk_size, and the
    same defaults."""
    import inspect

    from steph.config import NetworksConfig
    from steph.models import model_class

    assert name in NetworksConfig.model_fields, f"add model.options.{name} to NetworksConfig"
    options = NetworksConfig.model_fields[name].annotation
    params = {p.name: p.default for p in inspect.signature(model_class(name)).parameters.values()
              if p.name not in ("self", "in_dim", "n_bins", "chunk_size")}
    assert {k: f.default for k, f in options.model_fields.items()} == params


@pytest.mark.parametrize("name", NETS)
def test_parameter_count_at_1536_and_32(name):
    with torch.device("meta"):  # shapes only, nothing allocated
        model = create_model(name, in_dim=1536, n_bins=32)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", NETS)
def test_hparams_rebuild_the_network(name, tiny_net):
    model = tiny_net(name)
    again = create_model(name, **model.hparams())
    assert type(again) is type(model) and again.hparams() == model.hparams()
    assert {n: p.shape for n, p in again.named_parameters()} == \
        {n: p.shape for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", NETS)
def test_encoder_and_head_split_every_parameter(name, tiny_net):
    model = tiny_net(name)
    assert isinstance(model, MILNetwork) and isinstance(model.head, nn.Linear)
    names = [n for n, _ in model.named_parameters()]
    enc, head = model.encoder_names(), model.head_names()
    assert head == ["head.weight", "head.bias"]
    assert enc == [n for n in names if n not in head]  # registration order, nothing left out
    assert all(n.startswith(type(model).ENCODER_PREFIXES) for n in enc)
    assert isinstance(type(model).bag_inputs, tuple)


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("n", [1, 2, 3, 9, 40])
def test_shapes_small_bags_and_3d_input(name, n, tiny_net, bag_inputs):
    torch.manual_seed(0)
    model = tiny_net(name).eval()
    x = torch.randn(n, 12)
    extra = bag_inputs(model, n)
    out = model(x, **extra)
    assert out.shape == (1, 4) and torch.isfinite(out).all()
    torch.testing.assert_close(model(x[None], **extra), out)
    z, attn = model.embed(x, **extra)
    assert z.shape == (1, model.head.in_features)
    torch.testing.assert_close(model.head(z), out)
    if attn is not None:
        assert attn.shape == (n,)
        torch.testing.assert_close(attn.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("name", NETS)
def test_gradient_reaches_every_parameter(name, tiny_net, bag_inputs):
    torch.manual_seed(1)
    model = tiny_net(name).train()
    x = torch.randn(30, 12)
    model(x, **bag_inputs(model, 30)).pow(2).sum().backward()
    inert = INERT.get(name, set())
    for pname, p in model.named_parameters():
        if pname in inert:
            assert p.grad is None or not p.grad.any(), pname
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", NETS)
def test_one_bag_at_a_time(name, tiny_net, bag_inputs):
    model = tiny_net(name)
    with pytest.raises(ValueError, match="one bag at a time"):
        model(torch.randn(2, 5, 12), **bag_inputs(model, 5))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        model(torch.randn(12), **bag_inputs(model, 1))


@pytest.mark.parametrize("name", ["transmil", "ilra", "r2t_mil", "patch_gcn"])
def test_empty_bag_is_a_clear_error(name, tiny_net):
    model = tiny_net(name)
    extra = {"edge_index": torch.zeros(2, 0, dtype=torch.int64)} if model.bag_inputs else {}
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(0, 12), **extra)


def test_dropout_is_off_in_eval(tiny_net, bag_inputs):
    for name in NETS:
        model = tiny_net(name).eval()
        x = torch.randn(20, 12)
        extra = bag_inputs(model, 20)
        torch.testing.assert_close(model(x, **extra), model(x, **extra))
