"""``steph bench efficiency`` (Table S4 as a command) at tiny sizes: the learnable-parameter
counts against the known ones at 1536-d input, the FLOPs against the networks' own counts."""

import pandas as pd
import pytest
import torch

from steph.cli import main
from steph.errors import ConfigError
from steph.experiments.efficiency import measure_efficiency, measured_methods
from steph.methods import CostSpec, get_method
from steph.models import create_model
from steph.models.flops import count_flops

# learnable parameters at in_dim 1536, 32 bins, m = 12 (method.md; docs/method-notes.md)
KNOWN = {"abmil": 1_197_729, "transmil": 2_949_680, "ilra": 4_214_560, "r2t_mil": 2_975_008,
         "patch_gcn": 1_586_980, "steph": 1_340_984,
         # m + 1 = 13 coefficients and a fresh 512 -> 32 head
         "adamerging": 13 + 512 * 32 + 32, "model_avg": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_parameter_counts_at_1536(tmp_path):
    spec = CostSpec(n_instances=16)  # 1536-d, 32 bins, m = 12; a tiny bag
    table = measure_efficiency(list(KNOWN), spec, repeats=1, warmup=0).set_index("method")
    assert table["learnable_params"].to_dict() == KNOWN
    assert table.loc["steph", "arch"] == "abmil" and table.loc["ilra", "arch"] == "ilra"
    assert (table["latency_ms"] > 0).all()
    assert table["paper_gflops"].isna().all()  # not Table S4's bag size: nothing to compare


@pytest.mark.parametrize("arch", ["patch_gcn", "transmil"])
def test_flops_are_the_networks_and_steph_adds_its_embedding(arch):
    spec = CostSpec(in_dim=32, n_bins=4, n_sources=3, n_instances=50, arch=arch)
    table = measure_efficiency([arch, "steph", "adamerging"], spec, repeats=1,
                               warmup=0).set_index("method")
    net = create_model(arch, in_dim=32, n_bins=4).eval()
    extra = get_method(arch).cost_model(spec)[1]
    own = count_flops(net, torch.randn(50, 32), **extra)
    assert table.loc[arch, "gflops_total"] == pytest.approx(own.total / 1e9)
    assert table.loc[arch, "gflops_layers"] == pytest.approx(own.layers / 1e9)
    # AdaMerging runs the exported network; STEPH adds its bag embedding (50 x 32 -> 512) and
    # the two hypernetworks (512 -> 512 -> m), 2 FLOPs per multiply-add
    assert table.loc["adamerging", "gflops_layers"] == pytest.approx(own.layers / 1e9)
    extra_flops = 2 * (50 * 32 * 512 + 2 * (512 * 512 + 512 * 3))
    assert table.loc["steph", "gflops_layers"] * 1e9 == pytest.approx(own.layers + extra_flops)
    assert table.loc["steph", "arch"] == arch


def test_every_network_and_transfer_method_is_measurable():
    names = measured_methods()
    assert {"abmil", "transmil", "ilra", "r2t_mil", "patch_gcn", "steph", "adamerging",
            "surgery_am", "model_avg"} <= set(names)
    with pytest.raises(ConfigError, match="repeats"):
        measure_efficiency(["abmil"], CostSpec(in_dim=8, n_instances=4), repeats=0)


def test_cli_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "eff.csv"
    main(["bench", "efficiency", "--methods", "abmil,patch_gcn,steph", "--instances", "200",
          "--dim", "32", "--sources", "3", "--repeats", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| patch_gcn | patch_gcn |" in printed and "GFLOPs layers" in printed
    table = pd.read_csv(out)
    assert list(table["method"]) == ["abmil", "patch_gcn", "steph"]
    assert (table["instances"] == 200).all() and (table["n_sources"] == 3).all()
