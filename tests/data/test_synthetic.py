"""The synthetic generator writes the users' layout and models what makes transfer meaningful."""

import json

import numpy as np
import pandas as pd
import pytest

from steph.data import synthetic
from steph.data.cohort import Cohort
from steph.errors import ConfigError
from steph.survival.metrics import concordance_index


def small(n=200, cens=0.7, **kw):
    spec = dict(patches_mean=60.0, patches_max=1000, slides_per_patient=1.4)
    spec.update(kw)
    return synthetic.SynthConfig(
        feature_dim=16, n_phenotypes=6, latent_dim=8, min_patches=2,
        cohorts=(synthetic.CohortSpec("A", n, "f1", cens, **spec),
                 synthetic.CohortSpec("B", n, "f1", cens, **spec),
                 synthetic.CohortSpec("C", n, "f2", cens, **spec)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(small(), root, seed=3, progress=False)
    return root


def test_layout_is_read_by_the_real_loaders(world):
    for name in "ABC":
        c = Cohort.load(world / name, check="full")
        assert len(c) == 200 and c.feature_dim == 16
        labels = pd.read_csv(world / name / "labels.csv")
        assert list(labels.columns) == ["patient_id", "slide_id", "time", "event"]
        assert labels["slide_id"].str.endswith(".svs").any()  # the loaders strip WSI extensions
        assert (labels.groupby("patient_id").size() > 1).any()  # multi-slide patients
        truth = pd.read_csv(world / name / "true_risk.csv")
        assert set(truth["patient_id"]) == set(c.patient_ids)
    manifest = json.loads((world / "synth.json").read_text())
    assert manifest["seed"] == 3 and len(manifest["cohorts"]) == 3


def test_censoring_share_and_bag_sizes(world):
    for name in "ABC":
        c = Cohort.load(world / name)
        assert abs((1 - c.patients["event"].mean()) - 0.7) < 0.06
        n = c.slides["n_patches"]
        assert n.max() / n.min() >= 10  # bag sizes span more than an order of magnitude
        assert (c.patients["time"] >= 1).all()


def test_true_risk_is_prognostic(world):
    truth = pd.read_csv(world / "A" / "true_risk.csv")
    assert concordance_index(truth["time"], truth["event"], truth["true_risk"]) > 0.65


def test_related_cohorts_share_effects_unrelated_do_not(world):
    """What makes transfer meaningful: a risk model fitted on cohort A (ridge on the mean patch
    feature) ranks the true risks of related cohort B well, and those of unrelated C poorly."""
    def mean_features(name):
        c = Cohort.load(world / name)
        truth = pd.read_csv(world / name / "true_risk.csv").set_index("patient_id")
        X = np.stack([c.load_bag_array(p).mean(0) for p in c.patient_ids])
        return X, truth.loc[c.patient_ids, "true_risk"].to_numpy()

    Xa, ya = mean_features("A")
    mu = Xa.mean(0)
    beta = np.linalg.solve((Xa - mu).T @ (Xa - mu) + 1.0 * np.eye(Xa.shape[1]), (Xa - mu).T @ (ya - ya.mean()))
    corr = {}
    for name in "BC":
        X, y = mean_features(name)
        corr[name] = np.corrcoef((X - mu) @ beta, y)[0, 1]
    assert corr["B"] > 0.5
    assert corr["B"] > corr["C"] + 0.4


def test_deterministic_for_a_seed(tmp_path):
    cfg = small(n=20)
    synthetic.generate(cfg, tmp_path / "a", seed=1, progress=False)
    synthetic.generate(cfg, tmp_path / "b", seed=1, progress=False)
    synthetic.generate(cfg, tmp_path / "c", seed=2, progress=False)
    la, lb, lc = (pd.read_csv(tmp_path / x / "A" / "labels.csv") for x in "abc")
    pd.testing.assert_frame_equal(la, lb)
    assert not la.equals(lc)
    ca, cb = (Cohort.load(tmp_path / x / "A") for x in "ab")
    pid = ca.patient_ids[0]
    assert np.array_equal(ca.load_bag_array(pid), cb.load_bag_array(pid))


def test_refuses_to_overwrite_and_presets(tmp_path):
    cfg = small(n=10)
    synthetic.generate(cfg, tmp_path, seed=0, progress=False)
    with pytest.raises(ConfigError, match="already holds"):
        synthetic.generate(cfg, tmp_path, seed=0, progress=False)
    with pytest.raises(ConfigError, match="unknown synthetic preset"):
        synthetic.preset("nope")
    t13 = synthetic.preset("tcga13", patch_scale=0.005)
    assert len(t13.cohorts) == 13 and t13.feature_dim == 1536
    brca = next(c for c in t13.cohorts if c.name == "BRCA")
    assert brca.n_patients == 1035 and brca.censored_share == 0.924
    assert synthetic.preset("transfer", feature_dim=64).feature_dim == 64


def test_tissue_layout_clusters_phenotypes_in_space():
    """A patch's 8 nearest neighbours share its phenotype far more often than chance, and the
    layout only places patches: the slide's phenotype composition is untouched."""
    from steph.data.graphs import knn_neighbours

    rng = np.random.default_rng(0)
    same, chance = [], []
    for n in (40, 150, 600):
        mix = rng.dirichlet(np.full(6, 2.0))
        phen = rng.choice(6, size=n, p=mix)
        side = int(np.ceil(np.sqrt(n)))
        order = synthetic._tissue_layout(phen, side, rng)
        assert np.array_equal(np.sort(order), np.arange(n))  # a permutation of the patches
        placed = phen[order]  # phenotype on each raster cell
        coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1)
        nb = knn_neighbours(coords)
        same.append((placed[nb] == placed[:, None]).mean())
        share = np.bincount(phen, minlength=6) / n
        chance.append((share ** 2).sum())
    # small slides cannot do much better (a phenotype of 3 patches has at most 2 of its own
    # among a patch's 8 neighbours); with random placement same ~ chance
    assert all(s > 2 * c for s, c in zip(same, chance)), (same, chance)
    assert same[-1] > 0.7


def test_hilbert_curve_visits_each_cell_once_through_adjacent_cells():
    side = 8
    cx, cy = np.arange(side * side) % side, np.arange(side * side) // side
    d = synthetic._hilbert_index(cx, cy, side)
    assert np.array_equal(np.sort(d), np.arange(side * side))
    path = np.argsort(d)
    steps = np.abs(np.diff(cx[path])) + np.abs(np.diff(cy[path]))
    assert (steps == 1).all()


def test_written_slides_have_spatial_structure(world):
    """In the files: neighbouring patches (by coords) have closer features than random pairs of
    patches of the same slide (ratio ~0.85 here; ~1.05 with the former random placement)."""
    from steph.data.features import read_coords, read_features
    from steph.data.graphs import knn_neighbours

    c = Cohort.load(world / "A")
    near, far = [], []
    rng = np.random.default_rng(0)
    for path in c.slides["path"][:40]:
        x, coords = read_features(path), read_coords(path)
        nb = knn_neighbours(coords)
        near.append(np.linalg.norm(x[:, None] - x[nb], axis=-1).mean())
        far.append(np.linalg.norm(x - x[rng.permutation(len(x))], axis=-1).mean())
    assert np.mean(near) < 0.92 * np.mean(far)
