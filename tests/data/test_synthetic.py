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


# -- the existing presets are unchanged by later edits of the generator -----------------------------

# The generator as it was before the calibrated preset was added (main, 6430979): the demo,
# transfer and tcga13 presets must still write these exact bytes; and the calibrated preset those
# of the research branch's v6 (4907abb), on which docs/calibration.md's table was measured.
REFERENCE_COMMIT = "6430979b5523556d94eca51a5dfcf3e3fe769986"
CALIBRATED_COMMIT = "4907abba13957391aed630a00023c4f5914fac63"


def _reference_generator(tmp_path, commit=REFERENCE_COMMIT):
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    try:
        src = subprocess.run(["git", "-C", str(repo), "show",
                              f"{commit}:src/steph/data/synthetic.py"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"the reference commit {commit[:7]} is not in this checkout")
    path = tmp_path / "synthetic_reference.py"
    path.write_text(src)
    name = "steph_synthetic_reference"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the classes are built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def _shrunk(module, name, **kw):
    """A preset of ``module`` with 12 patients per cohort and small features (fast)."""
    from dataclasses import replace

    cfg = module.preset(name, **kw)
    return replace(cfg, cohorts=tuple(replace(c, n_patients=12) for c in cfg.cohorts))


def _digests(root):
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, kw, seed, commit", [
    ("demo", {"feature_dim": 8}, 0, REFERENCE_COMMIT),
    ("transfer", {"feature_dim": 8}, 1, REFERENCE_COMMIT),
    ("tcga13", {"feature_dim": 8, "patch_scale": 0.002, "layout": "trident"}, 2, REFERENCE_COMMIT),
    ("calibrated", {}, 0, CALIBRATED_COMMIT),
    ("calibrated-null", {"patch_scale": 0.002}, 3, CALIBRATED_COMMIT),
])
def test_presets_write_the_reference_bytes(tmp_path, name, kw, seed, commit):
    ref = _reference_generator(tmp_path, commit)
    ref.generate(_shrunk(ref, name, **kw), tmp_path / "ref", seed=seed, progress=False)
    synthetic.generate(_shrunk(synthetic, name, **kw), tmp_path / "new", seed=seed,
                       progress=False)
    want, got = _digests(tmp_path / "ref"), _digests(tmp_path / "new")
    assert len(want) > 2 * len(synthetic.preset(name).cohorts)  # labels, truth, features
    assert got == want


# -- the calibrated preset (motifs) ----------------------------------------------------------------

def small_calibrated(n=120, null=False, **kw):
    """The calibrated preset with 4 of its cohorts (two of one family), ``n`` patients each."""
    from dataclasses import replace

    cfg = synthetic.preset("calibrated-null" if null else "calibrated")
    keep = [c for c in cfg.cohorts if c.name in ("BLCA", "HNSC", "BRCA", "SKCM")]
    cohorts = tuple(replace(c, n_patients=n, patches_mean=40.0, **kw) for c in keep)
    return replace(cfg, cohorts=cohorts)


def test_calibrated_preset_layout(tmp_path):
    """13 cohorts named and ordered as Table S1, sizes scaled into 80-300 keeping the order,
    event rates 1 - Table S1's survival rate, four families of two."""
    cfg = synthetic.preset("calibrated")
    names = [row[0] for row in synthetic.TABLE_S1]
    assert [c.name for c in cfg.cohorts] == names and cfg.feature_dim == 64
    sizes = [c.n_patients for c in cfg.cohorts]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] <= 300 and sizes[-1] == 80
    rates = {c.name: c.event_rate for c in cfg.cohorts}
    assert rates["BRCA"] == pytest.approx(1 - 0.924) and rates["GBMLGG"] == pytest.approx(0.476)
    fams = pd.Series({c.name: c.family for c in cfg.cohorts if c.family})
    assert (fams.value_counts() == 2).all() and len(fams) == 8
    assert set(synthetic.CALIBRATED_WEIGHTS) == set(names)
    assert synthetic.preset("calibrated-null").null and not cfg.null
    assert synthetic.preset("calibrated", feature_dim=96).feature_dim == 96
    small_bags = synthetic.preset("calibrated", patch_scale=0.001)
    assert small_bags.cohorts[0].patches_mean < cfg.cohorts[0].patches_mean
    with pytest.raises(ConfigError, match="feature_dim >= 43"):
        synthetic.generate(synthetic.preset("calibrated", feature_dim=32), tmp_path / "x")
    assert not (tmp_path / "x").exists()  # checked before anything is written
    with pytest.raises(ConfigError, match="tcga13 and calibrated presets only"):
        synthetic.preset("demo", patch_scale=0.1)


@pytest.fixture(scope="module")
def calibrated_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    synthetic.generate(small_calibrated(), root / "a", seed=5, progress=False)
    synthetic.generate(small_calibrated(), root / "b", seed=5, progress=False)
    synthetic.generate(small_calibrated(null=True), root / "null", seed=5, progress=False)
    return root


def test_calibrated_is_deterministic_and_read_by_the_loaders(calibrated_world):
    assert _digests(calibrated_world / "a") == _digests(calibrated_world / "b")
    for name in ("BLCA", "SKCM"):
        c = Cohort.load(calibrated_world / "a" / name, check="full")
        assert len(c) == 120 and c.feature_dim == 64
    manifest = json.loads((calibrated_world / "a" / "synth.json").read_text())
    assert {c["name"]: c["family"] for c in manifest["cohorts"]}["HNSC"] == "F2"
    assert manifest["hazard_weights"]["BLCA"]["U"] > 0
    with pytest.raises(ConfigError, match="already holds"):
        synthetic.generate(small_calibrated(), calibrated_world / "a", seed=5, progress=False)


def test_calibrated_event_rates_within_tolerance(calibrated_world):
    for spec in small_calibrated().cohorts:
        c = Cohort.load(calibrated_world / "a" / spec.name)
        assert abs(c.patients["event"].mean() - spec.event_rate) < 0.03, spec.name


def test_calibrated_null_has_the_same_patches_and_other_labels(calibrated_world):
    """The negative control: byte-identical features, hazards without U and F."""
    a, z = (Cohort.load(calibrated_world / x / "BLCA") for x in ("a", "null"))
    for pid in a.patient_ids[:5]:
        assert np.array_equal(a.load_bag_array(pid), z.load_bag_array(pid))
    ta = pd.read_csv(calibrated_world / "a" / "BLCA" / "true_risk.csv")
    tz = pd.read_csv(calibrated_world / "null" / "BLCA" / "true_risk.csv")
    assert np.corrcoef(ta["true_risk"], ta["load_U"])[0, 1] > 0.3
    # the control's hazard is a function of the private and easy loads alone
    X = np.column_stack([np.ones(len(tz)), tz["load_P"], tz["load_E"]])
    coef, *_ = np.linalg.lstsq(X, tz["true_risk"], rcond=None)
    assert np.abs(X @ coef - tz["true_risk"]).max() < 1e-9
    X = np.column_stack([np.ones(len(ta)), ta["load_P"], ta["load_E"]])
    coef, *_ = np.linalg.lstsq(X, ta["true_risk"], rcond=None)
    assert np.abs(X @ coef - ta["true_risk"]).max() > 0.1


def test_calibrated_motif_is_invisible_to_the_mean_patch(calibrated_world):
    """Mean pooling cancels the +/- motif: a ridge read-out of the mean patch does not find the
    U load, a detector of the displacement along U's direction does."""
    cfg = small_calibrated()
    world = synthetic._make_motif_world(
        cfg, np.random.default_rng(np.random.SeedSequence(5).spawn(1 + len(cfg.cohorts))[0]))
    v = world.basis[:, cfg.background_dim + world.motifs.index("U")]
    X, det, y = [], [], []
    for name in ("BLCA", "HNSC", "BRCA", "SKCM"):
        c = Cohort.load(calibrated_world / "a" / name)
        truth = pd.read_csv(calibrated_world / "a" / name / "true_risk.csv").set_index("patient_id")
        for p in c.patient_ids:
            bag = c.load_bag_array(p).astype(float)
            X.append(bag.mean(0))
            det.append((np.abs((bag - world.offset) @ v) > cfg.motif_shift / 2).mean())
            y.append(truth.loc[p, "load_U"])
    X, det, y = np.array(X), np.array(det), np.array(y)
    fit, test = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    mu = X[fit].mean(0)
    beta = np.linalg.solve((X[fit] - mu).T @ (X[fit] - mu) + 1.0 * np.eye(X.shape[1]),
                           (X[fit] - mu).T @ (y[fit] - y[fit].mean()))
    assert abs(np.corrcoef((X[test] - mu) @ beta, y[test])[0, 1]) < 0.2
    assert np.corrcoef(det, y)[0, 1] > 0.4
