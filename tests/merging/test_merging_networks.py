"""STEPH and the AdaMerging family over every registered MIL network (not only ABMIL): what is
merged is the network's declared encoder, the merged forward equals the plain network with the
merged tensors loaded, Patch-GCN's graph passes through, artefacts rebuild the right network."""

import sys
from pathlib import Path

import pytest
import torch

from steph.config import StephConfig
from steph.inference import load_artefact, save_artefact
from steph.merging.baselines import AdaMerging, SurgeryMIL, adamerging_stack
from steph.merging.pool import ModelPool
from steph.merging.steph import STEPH
from steph.models import create_model
from steph.survival import TimeBins

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import TINY_NETWORKS as TINY  # tests/conftest.py

NETS = sorted(TINY)
N = 23  # instances of the test bag
pytestmark = pytest.mark.usefixtures("one_thread")


def hparams(arch):
    return create_model(arch, in_dim=12, n_bins=4, **TINY[arch]).hparams()


def bag(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 12, generator=g, dtype=torch.float64)
    if arch != "patch_gcn":
        return x, {}
    src = torch.tensor([(i + j) % N for i in range(N) for j in (1, 2, 5)])
    dst = torch.arange(N).repeat_interleave(3)
    return x, {"edge_index": torch.stack([src, dst])}


def make_pool(arch, m=4, scale=0.05):
    torch.manual_seed(0)
    theta0 = {k: v.double() for k, v in create_model(arch, **hparams(arch)).state_dict().items()}

    def trained(s):
        g = torch.Generator().manual_seed(s)
        return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)
                for k, v in theta0.items()}

    return ModelPool(theta0=theta0, target=trained(100), sources={f"S{i}": trained(i) for i in range(m)},
                     target_name="T", hparams=hparams(arch), arch=arch)


def make_steph(arch, **cfg):
    pool = make_pool(arch)
    model = STEPH(pool.stack(), pool.hparams, StephConfig(embed_dim=10, top_k=2, **cfg),
                  arch=arch).double()
    with torch.no_grad():  # positive output biases: every w and r past its ReLU
        model.h_agg[-1].bias.fill_(1.0)
        model.h_mix[-1].bias.fill_(1.0)
    return model, pool


def plain_network(arch, state):
    net = create_model(arch, **hparams(arch)).double().eval()
    net.load_state_dict(state)
    return net


@pytest.mark.parametrize("arch", NETS)
def test_pool_encoder_is_the_network_declared_encoder(arch):
    pool = make_pool(arch)
    net = create_model(arch, **hparams(arch))
    assert pool.encoder_names == net.encoder_names()
    assert set(pool.theta0) - set(pool.encoder_names) == {"head.weight", "head.bias"}


@pytest.mark.parametrize("arch", NETS)
def test_steph_merges_the_declared_encoder_by_its_formula(arch):
    """theta(X) = theta_0 + sum_{i in S} w_i (lam_i tau_t + (1 - lam_i) tau_i), computed here
    tensor by tensor on dicts; the forward equals the plain network with those tensors and
    STEPH's head loaded."""
    model, pool = make_steph(arch)
    x, extra = bag(arch)
    ex = model.explain(x, **extra)
    w, lam = ex.w, ex.lam
    selected = torch.topk(w, 2).indices.tolist()
    tau_t, taus = pool.task_vectors()
    expected = {}
    for name in pool.encoder_names:
        acc = pool.theta0[name].clone()
        for i in selected:
            acc = acc + w[i] * (lam[i] * tau_t[name] + (1 - lam[i]) * taus[i][name])
        expected[name] = acc
    assert list(ex.merged) == pool.encoder_names
    for name, tensor in expected.items():
        torch.testing.assert_close(ex.merged[name], tensor, msg=name)
    head = {"head.weight": model.network.head.weight.detach(),
            "head.bias": model.network.head.bias.detach()}
    net = plain_network(arch, {**expected, **head})
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, **extra).logits, net(x, **extra))
        torch.testing.assert_close(model.head_input(x, **extra), net.embed(x, **extra)[0])
    assert model.bag_inputs == net.bag_inputs


@pytest.mark.parametrize("arch", NETS)
def test_steph_trains_hypernetworks_and_head_only(arch):
    model, _ = make_steph(arch)
    x, extra = bag(arch)
    model.train()
    model(x, **extra).logits.pow(2).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("embed.", "h_agg.", "h_mix.", "network.head."))}
    assert model.network.head.weight.grad.abs().sum() > 0
    assert model.h_agg[0].weight.grad.abs().sum() > 0  # through the merge
    assert all(p.grad is None for n, p in model.network.named_parameters()
               if not n.startswith("head."))


def test_steph_without_the_graph_is_an_error():
    model, _ = make_steph("patch_gcn")
    with pytest.raises(ValueError, match="edge_index"):
        model(bag("patch_gcn")[0])


@pytest.mark.parametrize("arch", ["patch_gcn", "transmil"])
def test_steph_artefact_rebuilds_the_network(arch, tmp_path):
    model, _ = make_steph(arch)
    model = model.float().eval()
    x, extra = bag(arch)
    x = x.float()
    path = save_artefact(tmp_path / "m.safetensors", model, "steph", model.settings(),
                         TimeBins.uniform(4, 4000.0), 12)
    loaded, manifest = load_artefact(path)
    assert manifest["settings"]["arch"] == arch and loaded.arch == arch
    assert type(loaded.network) is type(model.network)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, **extra).logits, model(x, **extra).logits)


def test_steph_artefacts_written_before_networks_still_load(tmp_path):
    """Version-1 STEPH artefacts (before any network could be merged): settings
    {"abmil": hparams} without arch or n_patients, tensors "abmil.<name>"; load_artefact
    reads them through steph.runs.migrations."""
    import json

    from steph.inference import load_artefact, save_artefact
    from steph.survival.bins import TimeBins
    from steph.utils.io import save_tensors

    model, _ = make_steph("abmil")
    model = model.float().eval()
    path = save_artefact(tmp_path / "model.safetensors", model, "steph", model.settings(),
                         TimeBins.uniform(model.network.n_bins, 1000.0), model.network.in_dim)
    manifest = json.loads(path.with_suffix(".json").read_text())
    settings = manifest["settings"]
    settings["abmil"] = settings.pop("network")
    del settings["arch"], settings["n_patients"]
    state = {(k.replace("network.", "abmil.", 1) if k.startswith("network.") else k): v
             for k, v in model.state_dict().items()}
    save_tensors(path, state)
    manifest.update(format="steph-artefact/1", weights_sha256=None)
    path.with_suffix(".json").write_text(json.dumps(manifest))
    old, upgraded = load_artefact(path)
    assert upgraded["format"] == "steph-artefact/2" and upgraded["settings"]["arch"] == "abmil"
    x, _ = bag("abmil")
    with torch.no_grad():
        torch.testing.assert_close(old(x.float()).logits, model(x.float()).logits)


@pytest.mark.parametrize("arch", NETS)
def test_adamerging_over_the_network(arch):
    """Start: theta_0 + 0.3 (tau_t + sum tau_i) on the encoder, tensor by tensor; the export is
    a plain network of the same architecture computing the same logits."""
    pool = make_pool(arch)
    model = AdaMerging(adamerging_stack(pool), pool.hparams, arch=arch).eval()
    tau_t, taus = pool.task_vectors()
    merged = model.merged_encoder()
    assert list(merged) == pool.encoder_names
    for name in pool.encoder_names:
        expected = pool.theta0[name] + 0.3 * (tau_t[name] + sum(t[name] for t in taus))
        torch.testing.assert_close(merged[name], expected.float(), msg=name)
    x, extra = bag(arch)
    x = x.float()
    exported = model.export()
    assert type(exported) is type(model.network) and model.export_kind == arch
    with torch.no_grad():
        torch.testing.assert_close(exported(x, **extra), model(x, **extra).logits)
    # one step trains the coefficients through the merge
    model.train()
    model.begin_step()
    model(x, **extra).logits.pow(2).sum().backward()
    model.end_step()
    assert model.coef.grad is not None and model.coef.grad.abs().sum() > 0


def test_surgery_over_another_network_roundtrips(tmp_path):
    pool = make_pool("patch_gcn")
    model = AdaMerging(adamerging_stack(pool), pool.hparams, surgery_rank=3, arch="patch_gcn")
    model = model.float().eval()
    with torch.no_grad():
        model.surgery.up.weight.normal_()  # a surgery that changes the embedding
    x, extra = bag("patch_gcn")
    x = x.float()
    assert model.export_kind == "mil_surgery"
    path = save_artefact(tmp_path / "s.safetensors", model.export(), model.export_kind,
                         model.export_settings(), TimeBins.uniform(4, 4000.0), 12)
    loaded, _ = load_artefact(path)
    assert isinstance(loaded, SurgeryMIL) and loaded.arch == "patch_gcn"
    assert loaded.bag_inputs == ("edge_index",)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, **extra), model(x, **extra).logits)
        assert not torch.allclose(loaded.network(x, **extra), loaded(x, **extra))
