"""Synthetic multi-cancer cohorts that make cross-cancer knowledge transfer measurable.

The generator writes exactly the on-disk layout users bring (``<cohort>/labels.csv``,
``<cohort>/features/<slide>.h5``) so that every run goes through the real loaders, plus a
``true_risk.csv`` per cohort (the oracle's log-hazard, ignored by training) and a
``synth.json`` manifest at the root.

The model, and why each part is there:

* **Shared tissue phenotypes.** Every patch belongs to one of ``n_phenotypes`` phenotypes whose
  prototypes live in a low-dimensional latent space mapped to ``feature_dim`` by one random
  linear map shared by all cohorts (foundation-model features are low-rank and shared across
  organs). Patches add within-phenotype latent noise and isotropic feature noise.
* **Cohort-specific shifts.** Each cohort moves all its patches by its own latent offset (organ,
  site and stain effects), so a model trained on one cohort sees slightly shifted inputs on
  another.
* **Prognostic phenotype composition.** A patient's phenotype mix is drawn from a cohort-specific
  Dirichlet; the log-hazard is a linear function of that mix. Cohorts of the same *family*
  share the prognostic coefficients (up to a small perturbation): a model of a related cohort
  has learned the features the target needs. Cohorts of another family are driven by other
  phenotypes, some with reversed effects: their models help little or hurt.
* **Realistic follow-up.** Weibull event times with proportional hazards; staggered
  administrative censoring plus random loss to follow-up, scaled by bisection to hit the
  cohort's target share of censored patients (TCGA: 50 to 92 % censored); integer days.
* **Bags.** One or more slides per patient; patches per slide log-normal, spanning more than an
  order of magnitude, clipped at the cohort's maximum.
* **Tissue regions.** A slide's patches (their phenotypes drawn independently from the patient's
  mix, as above) are laid on a raster so that each phenotype forms compact regions: the
  phenotypes' patches are cut into chunks of about ``max(16, n / 8)``, the chunks shuffled and
  laid along a Hilbert curve over the raster (a run along the curve covers a compact patch of
  the raster), with a little mixing where runs meet. Neighbouring patches therefore mostly share
  a phenotype, so graphs over coordinates and attention maps have something to find, while the
  composition (and hence the labels) is exactly what the independent draws gave. Rows are
  written in raster order, as patch extractors do.

The ``calibrated`` and ``calibrated-null`` presets use another model (prognostic motifs that
the mean patch does not show), described where it is defined below and in docs/calibration.md.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from steph.errors import ConfigError
from steph.utils.io import write_csv, write_json

log = logging.getLogger("steph.data.synthetic")


@dataclass(frozen=True)
class CohortSpec:
    name: str
    n_patients: int
    family: str
    censored_share: float  # share of patients censored (Table S1's "survival rate")
    slides_per_patient: float = 1.1  # mean; every patient has at least one slide
    patches_mean: float = 200.0  # mean patches per slide
    patches_max: int = 2000
    effect_noise: float = 0.25  # deviation of this cohort's coefficients from its family's
    median_survival_days: float = 1800.0


@dataclass(frozen=True)
class SynthConfig:
    cohorts: tuple[CohortSpec, ...]
    feature_dim: int = 1536
    n_phenotypes: int = 12
    latent_dim: int = 32
    prototype_scale: float = 1.5  # spread of phenotype prototypes in the latent space
    within_noise: float = 0.5  # latent noise of one patch around its prototype
    feature_noise: float = 0.3  # isotropic noise added in feature space
    cohort_shift: float = 0.5  # scale of each cohort's latent offset
    composition_concentration: float = 2.0  # Dirichlet concentration of a patient's mix
    effect_size: float = 1.5  # std of the true log-hazard within a cohort
    n_prognostic: int = 3  # phenotypes with a non-zero effect per family
    weibull_shape: float = 1.2
    # Mean abundance of a family's prognostic phenotypes relative to the others (1: as common;
    # 0.1: ten times rarer, a few % of the patches). Rare prognostic tissue hides in the mean of
    # the patches; an attention network that learned to look for it finds it.
    prognostic_abundance: float = 0.1
    min_patches: int = 16
    layout: str = "contiguous"  # or "trident" (one-row chunks)
    families: dict[str, int] = field(default_factory=dict)  # family -> index (derived)


def _spec(name, n, fam, cens, **kw) -> CohortSpec:
    return CohortSpec(name=name, n_patients=n, family=fam, censored_share=cens, **kw)


def _demo() -> SynthConfig:
    small = dict(patches_mean=60.0, patches_max=400, slides_per_patient=1.15)
    return SynthConfig(
        feature_dim=256,
        cohorts=(
            _spec("ALPHA", 120, "glandular", 0.65, **small),
            _spec("BETA", 180, "glandular", 0.70, **small),
            _spec("GAMMA", 160, "glandular", 0.60, **small),
            _spec("DELTA", 160, "squamous", 0.60, **small),
        ),
    )


def _transfer() -> SynthConfig:
    kw = dict(patches_mean=100.0, patches_max=1000, slides_per_patient=1.15)
    return SynthConfig(
        feature_dim=512,
        cohorts=(
            _spec("TARGET", 150, "glandular", 0.65, **kw),
            _spec("REL1", 360, "glandular", 0.60, **kw),
            _spec("REL2", 360, "glandular", 0.65, **kw),
            _spec("REL3", 300, "glandular", 0.70, **kw),
            _spec("UNR1", 360, "squamous", 0.60, **kw),
            _spec("UNR2", 360, "squamous", 0.65, **kw),
            _spec("UNR3", 300, "mesenchymal", 0.60, **kw),
        ),
    )


# Table S1 of the STEPH appendix: patients, WSIs, patches (mean, max) per WSI, survival rate.
TABLE_S1 = (
    ("BRCA", 1035, 1106, 10694, 58176, 0.924, "hormonal"),
    ("KIPAN", 880, 910, 10117, 72795, 0.836, "renal"),
    ("LUNG", 848, 924, 13199, 220294, 0.782, "squamous"),
    ("GBMLGG", 841, 1623, 16209, 216885, 0.524, "neural"),
    ("COADREAD", 568, 577, 6458, 38322, 0.866, "glandular"),
    ("STES", 512, 539, 8429, 31458, 0.727, "glandular"),
    ("UCEC", 504, 565, 14203, 73141, 0.893, "hormonal"),
    ("HNSC", 427, 449, 6530, 56558, 0.717, "squamous"),
    ("SKCM", 412, 453, 9593, 136934, 0.607, "neural"),
    ("BLCA", 372, 443, 14465, 103807, 0.685, "squamous"),
    ("LIHC", 355, 362, 8875, 35839, 0.775, "glandular"),
    ("CESC", 266, 276, 6212, 54021, 0.816, "squamous"),
    ("SARC", 248, 591, 27346, 243906, 0.685, "renal"),
)


def _tcga13(patch_scale: float = 0.01) -> SynthConfig:
    cohorts = tuple(
        _spec(
            name, n, fam, surv,
            slides_per_patient=wsis / n,
            patches_mean=max(8.0, mean * patch_scale),
            patches_max=max(32, int(mx * patch_scale)),
        )
        for name, n, wsis, mean, mx, surv, fam in TABLE_S1
    )
    return SynthConfig(cohorts=cohorts, feature_dim=1536)


PRESETS: dict[str, Callable[[], SynthConfig | CalibratedConfig]] = {
    "demo": _demo,
    "transfer": _transfer,
    "tcga13": _tcga13,
    "calibrated": lambda: _calibrated(),
    "calibrated-null": lambda: _calibrated(null=True),
}


def preset(name: str, *, feature_dim: int | None = None, patch_scale: float | None = None,
           layout: str | None = None) -> SynthConfig | CalibratedConfig:
    """A named preset, optionally with another feature dimension / bag-size scale / h5 layout."""
    if name not in PRESETS:
        raise ConfigError(f"unknown synthetic preset {name!r}; known: {', '.join(PRESETS)}")
    if patch_scale is not None and name not in ("tcga13", "calibrated", "calibrated-null"):
        raise ConfigError("--patch-scale applies to the tcga13 and calibrated presets only")
    if patch_scale is None:
        cfg = PRESETS[name]()
    elif name == "tcga13":
        cfg = _tcga13(patch_scale)
    else:
        cfg = _calibrated(null=name == "calibrated-null", patch_scale=patch_scale)
    if feature_dim is not None:
        if feature_dim < 2:
            raise ConfigError(f"feature dimension must be >= 2, got {feature_dim}")
        cfg = replace(cfg, feature_dim=int(feature_dim))
    if layout is not None:
        cfg = replace(cfg, layout=layout)
    return cfg


# --------------------------------------------------------------------------------------------
# the world shared by all cohorts


@dataclass
class _World:
    prototypes: np.ndarray  # (P, L)
    mixing: np.ndarray  # (L, D)
    offset: np.ndarray  # (D,) features are not centred, like real foundation-model features
    family_effects: dict[str, np.ndarray]  # family -> (P,)
    family_base: dict[str, np.ndarray]  # family -> (P,) log base composition


def _make_world(cfg: SynthConfig, rng: np.random.Generator) -> _World:
    P, L, D = cfg.n_phenotypes, cfg.latent_dim, cfg.feature_dim
    prototypes = rng.normal(0.0, cfg.prototype_scale, size=(P, L))
    mixing = rng.normal(0.0, 1.0 / math.sqrt(L), size=(L, D))
    offset = rng.normal(0.0, 0.5, size=D)
    families = sorted({c.family for c in cfg.cohorts})
    # Each family gets its own prognostic phenotypes: consecutive windows of k phenotypes,
    # disjoint while P allows (P >= k x families); beyond that the windows wrap around and
    # families share phenotypes, possibly with reversed effects.
    effects, bases = {}, {}
    k = cfg.n_prognostic
    for i, fam in enumerate(families):
        beta = np.zeros(P)
        idx = [(i * k + j) % P for j in range(k)]
        signs = rng.choice([-1.0, 1.0], size=k)
        signs[0] = 1.0
        beta[idx] = signs * rng.uniform(1.0, 2.0, size=k)
        effects[fam] = beta
        base = rng.normal(0.0, 0.6, size=P)
        base[idx] += math.log(cfg.prognostic_abundance)
        bases[fam] = base
    return _World(prototypes, mixing, offset, effects, bases)


def _censoring_scale(t_event: np.ndarray, entry: np.ndarray, dropout: np.ndarray,
                     target_censored: float) -> float:
    """Scale s so that censoring at min(s * entry, s * dropout) censors the target share."""

    def share(s: float) -> float:
        c = np.minimum(s * entry, s * dropout)
        return float(np.mean(c < t_event))

    lo, hi = 1e-3, 1e3
    for _ in range(60):  # share() decreases with s; bisection on log scale
        mid = math.sqrt(lo * hi)
        if share(mid) > target_censored:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def families(data_root: str | Path) -> dict[str, str]:
    """Cohort -> family of a data root this module wrote (its synth.json; the cohorts of a
    preset without families are left out); {} for real data."""
    path = Path(data_root) / "synth.json"
    if not path.exists():
        return {}
    return {c["name"]: c["family"] for c in json.loads(path.read_text()).get("cohorts", [])
            if c.get("family")}


def _check_free(cdir: Path, overwrite: bool) -> None:
    if (cdir / "labels.csv").exists() and not overwrite:
        raise ConfigError(f"{cdir} already holds a cohort; choose another --out, or add "
                          "--overwrite to replace it")


def _write_cohorts(cfg, out: Path, cohort_ss, overwrite: bool, progress: bool,
                   simulate: Callable, features: Callable) -> None:
    """Write each cohort of ``cfg`` with its own seed: ``simulate(spec, rng)`` gives the labels,
    the true risks and the slides ``(slide_id, *what features needs)``; ``features(slide[1:],
    rng)`` a slide's patches and coords. The label table is written last: a cohort folder is
    complete once it has one."""
    from steph.data.features import write_features_h5  # data layer writer (atomic)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for spec, css in zip(cfg.cohorts, cohort_ss):
        cdir = out / spec.name
        _check_free(cdir, overwrite)
        rng = np.random.default_rng(css)
        labels, truth, slides = simulate(spec, rng)
        feat_dir = cdir / "features"
        feat_dir.mkdir(parents=True, exist_ok=True)
        it = slides
        if progress and tqdm is not None:
            it = tqdm(slides, desc=f"synth {spec.name}", unit="slide", leave=False, disable=None)
        for slide_id, *slide in it:
            x, coords = features(slide, rng)
            write_features_h5(feat_dir / f"{slide_id}.h5", x.astype(np.float16), coords=coords,
                              layout=cfg.layout)
        write_csv(cdir / "true_risk.csv", truth)
        write_csv(cdir / "labels.csv", labels)
        log.info("wrote synthetic cohort %s: %d patients, %d slides", spec.name,
                 truth.shape[0], len(slides))


def generate(cfg: SynthConfig | CalibratedConfig, out: str | Path, seed: int = 0,
             overwrite: bool = False, progress: bool = True) -> Path:
    """Write all cohorts of ``cfg`` under ``out``; return ``out``.

    Deterministic for (cfg, seed). An existing cohort folder is an error unless ``overwrite``.
    """
    out = Path(out)
    if isinstance(cfg, CalibratedConfig):  # checks its settings before writing anything
        return _generate_calibrated(cfg, out, seed, overwrite, progress)
    out.mkdir(parents=True, exist_ok=True)
    ss = np.random.SeedSequence(seed)
    world_ss, *cohort_ss = ss.spawn(1 + len(cfg.cohorts))
    world = _make_world(cfg, np.random.default_rng(world_ss))
    manifest = {
        "generator": "steph.data.synthetic",
        "seed": seed,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("cohorts", "families")},
        "cohorts": [asdict(c) for c in cfg.cohorts],
        "family_effects": {f: b.tolist() for f, b in world.family_effects.items()},
    }
    _write_cohorts(cfg, out, cohort_ss, overwrite, progress,
                   lambda spec, rng: _simulate_cohort(cfg, spec, world, rng),
                   lambda slide, rng: _patch_features(cfg, world, *slide, rng))
    write_json(out / "synth.json", manifest)
    return out


def _simulate_cohort(cfg: SynthConfig, spec: CohortSpec, world: _World, rng: np.random.Generator):
    P = cfg.n_phenotypes
    n = spec.n_patients
    beta = world.family_effects[spec.family] + rng.normal(0.0, spec.effect_noise, size=P)
    base = world.family_base[spec.family] + rng.normal(0.0, 0.3, size=P)
    alpha = cfg.composition_concentration * np.exp(base) / np.exp(base).sum() * P
    mix = rng.dirichlet(alpha, size=n)  # (n, P) phenotype composition of each patient
    raw = mix @ beta
    eta = (raw - raw.mean()) / (raw.std() + 1e-12) * cfg.effect_size  # true log-hazard

    # Weibull proportional hazards: S(t) = exp(-(t / lam)^k * exp(eta)); lam from the median.
    k = cfg.weibull_shape
    lam = spec.median_survival_days / (math.log(2.0) ** (1.0 / k))
    t_event = lam * (rng.exponential(1.0, size=n) * np.exp(-eta)) ** (1.0 / k)
    entry = rng.uniform(0.3, 1.0, size=n) * 4000.0  # staggered administrative end of follow-up
    dropout = rng.exponential(6000.0, size=n)  # random loss to follow-up
    s = _censoring_scale(t_event, entry, dropout, spec.censored_share)
    t_cens = np.minimum(s * entry, s * dropout)
    time = np.maximum(1.0, np.round(np.minimum(t_event, t_cens)))
    event = (t_event <= t_cens).astype(int)

    shift = rng.normal(0.0, cfg.cohort_shift, size=cfg.latent_dim)
    rows, slides = [], []
    patient_ids = [f"{spec.name}-{i:04d}" for i in range(n)]
    for i, pid in enumerate(patient_ids):
        n_slides = 1 + rng.poisson(max(0.0, spec.slides_per_patient - 1.0))
        for j in range(n_slides):
            slide_id = f"{pid}-S{j + 1}"
            n_patches = _bag_size(spec, cfg, rng)
            phen = rng.choice(P, size=n_patches, p=mix[i])
            slides.append((slide_id, phen, shift))
            # Every other slide id carries a WSI extension, as in real tables: the loaders strip it.
            rows.append((pid, slide_id + (".svs" if (i + j) % 2 else ""), time[i], event[i]))
    labels = pd.DataFrame(rows, columns=["patient_id", "slide_id", "time", "event"])
    labels["time"] = labels["time"].astype(int)
    truth = pd.DataFrame({"patient_id": patient_ids, "true_risk": eta, "time": time.astype(int),
                          "event": event})
    return labels, truth, slides


def _bag_size(spec: CohortSpec, cfg: SynthConfig, rng: np.random.Generator) -> int:
    sigma = 0.8  # log-normal: the central 95 % spans a factor of ~23
    mu = math.log(spec.patches_mean) - sigma**2 / 2
    n = int(round(rng.lognormal(mu, sigma)))
    return int(min(max(n, cfg.min_patches), max(spec.patches_max, cfg.min_patches)))


def _patch_features(cfg: SynthConfig, world: _World, phen: np.ndarray, shift: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = len(phen)
    latent = world.prototypes[phen] + shift + rng.normal(0.0, cfg.within_noise,
                                                          size=(n, cfg.latent_dim))
    x = latent @ world.mixing + world.offset + rng.normal(0.0, cfg.feature_noise,
                                                          size=(n, cfg.feature_dim))
    side = int(math.ceil(math.sqrt(n)))
    idx = np.arange(n)
    coords = np.stack([(idx % side) * 256, (idx // side) * 256], axis=1).astype(np.int32)
    order = _tissue_layout(phen, side, rng)  # the patch on each raster cell
    return x[order].astype(np.float32), coords


def _tissue_layout(phen: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """Which patch sits on each of the first ``len(phen)`` cells (row-major) of a side x side
    raster, so that phenotypes form compact regions (see the module docstring)."""
    n = len(phen)
    # cells in curve order, in one of 8 orientations so that layouts differ by slide
    rank = _hilbert_rank(side, rng.integers(8).item())[:n]
    along = np.argsort(rank, kind="stable")
    # each phenotype's patches cut into chunks of about `region`, the chunks in random order
    region = max(16, n // 8)
    by_phen = np.argsort(phen, kind="stable")
    counts = np.bincount(phen)
    counts = counts[counts > 0]
    n_chunks = -(-counts // region)
    # chunk of each patch of a phenotype: even split of its count into n_chunks pieces
    start = np.repeat(np.cumsum(counts) - counts, counts)
    pos = np.arange(n) - start
    chunk = np.repeat(np.cumsum(n_chunks) - n_chunks, counts) + pos * np.repeat(n_chunks, counts) \
        // np.repeat(counts, counts)
    chunk_rank = rng.permutation(int(n_chunks.sum()))
    seq = by_phen[np.argsort(chunk_rank[chunk] * n + pos, kind="stable")]
    # mixing at region borders: each patch moves about one step along the curve
    seq = seq[np.argsort(np.arange(n) + rng.normal(0.0, 1.0, size=n), kind="stable")]
    order = np.empty(n, dtype=np.int64)
    order[along] = seq
    return order


@functools.lru_cache(maxsize=512)
def _hilbert_rank(side: int, orientation: int) -> np.ndarray:
    """Position along a Hilbert curve of every cell (row-major) of a side x side raster, the
    raster transposed / mirrored according to the 3 bits of ``orientation``. Read-only."""
    cx, cy = np.arange(side * side) % side, np.arange(side * side) // side
    if orientation & 1:
        cx, cy = cy, cx
    if orientation & 2:
        cx = side - 1 - cx
    if orientation & 4:
        cy = side - 1 - cy
    rank = _hilbert_index(cx, cy, side)
    rank.flags.writeable = False
    return rank


def _hilbert_index(x: np.ndarray, y: np.ndarray, side: int) -> np.ndarray:
    """Position of the cells (x, y) along the Hilbert curve over the smallest power-of-two
    square holding a side x side raster (consecutive positions are adjacent cells)."""
    n = 1 << max(0, (side - 1).bit_length())
    x, y = x.astype(np.int64), y.astype(np.int64)
    d = np.zeros_like(x)
    s = n // 2
    while s > 0:
        rx, ry = (x & s) > 0, (y & s) > 0
        d += s * s * ((3 * rx) ^ ry)
        # rotate the quadrant so that the sub-curve is in standard orientation
        flip = ~ry & rx
        x, y = np.where(flip, n - 1 - x, x), np.where(flip, n - 1 - y, y)
        x, y = np.where(~ry, y, x), np.where(~ry, x, y)
        s //= 2
    return d


# --------------------------------------------------------------------------------------------
# the "calibrated" preset: knowledge that only a trained encoder can carry between cohorts
#
# The presets above put the prognostic signal in the phenotype *composition* of a bag, which the
# mean of its patches already shows: a linear read-out of theta_0's random features scores as well
# as a trained encoder, and a source's task vector has little to give (docs/method-notes.md).
# Here the prognostic tissue is a set of *motifs*. A motif patch is a patch of a common "decoy"
# background phenotype displaced by +s v or -s v (random sign) along a direction v in which the
# background never varies. Motif patches replace decoy patches (the decoy's abundance is not
# touched), so the mean of a bag's patches does not depend on how much motif it holds, and a random
# ReLU unit, whose input is dominated by the background's variation, responds to the +/-
# displacement only weakly; a unit aligned with v (what training learns) detects it, and the
# attention can look for those patches. A patient's log-hazard is a sum of (weights in log-hazard
# units per standard deviation of the patient's latent motif load):
#
# * U, a *universal* motif present in every cohort with a weight of the same size in most of
#   them (a few have a smaller or reversed one): every source learns to detect it, and how much
#   it matters next to the target's other signal decides how well the sources' models rank the
#   target (the target's identity explains most of the zero-shot variance, the source's little);
# * F, a *family* motif shared by two cohorts only (GBMLGG-KIPAN, BLCA-HNSC, CESC-STES,
#   LIHC-SARC), hidden in a background phenotype of the family's own: meant to make each the
#   other's best source;
# * P, a *private* motif of the cohort alone (its patches exist in that cohort only), harmful in
#   some cohorts and protective in others, so that a detector of "any displaced patch" does not
#   transfer;
# * E, an *easy* private effect: a share of the cohort's patches (any phenotype) moved one way
#   along a direction of the cohort's own, so that the mean patch, and theta_0's random features,
#   show it (real features carry such directly readable signal too); it does not transfer.
#
# The ``calibrated-null`` preset is the negative control: the same world and the same patches
# (byte-identical features for the same seed), but U and F carry no hazard (their weight moves to
# the private motif), so the sources carry nothing the target can use.


@dataclass(frozen=True)
class CalibratedCohort:
    name: str
    n_patients: int
    event_rate: float  # share of patients with an observed event
    universal: float  # log-hazard weight of U (signed)
    family_weight: float  # of the family motif (used only with a family)
    private: float  # of the private motif (signed: protective in some cohorts)
    easy: float  # of the easy effect
    family: str = ""  # "" = none; the motif is shared with the other cohort(s) of the name
    slides_per_patient: float = 1.1
    patches_mean: float = 60.0
    patches_max: int = 300
    median_survival_days: float = 1800.0

    @property
    def censored_share(self) -> float:
        return 1.0 - self.event_rate


@dataclass(frozen=True)
class CalibratedConfig:
    cohorts: tuple[CalibratedCohort, ...]
    feature_dim: int = 64
    null: bool = False  # negative control: U and F carry no hazard
    n_background: int = 8  # background phenotypes
    background_dim: int = 12  # their latent subspace
    prototype_scale: float = 1.0
    within_noise: float = 0.5
    feature_noise: float = 0.3  # isotropic, in every feature direction
    cohort_shift: float = 0.5
    composition_concentration: float = 4.0
    motif_shift: float = 5.0  # s: displacement of a motif patch along its direction
    motif_max: float = 0.6  # largest share of a decoy phenotype's patches that are one motif
    easy_shift: float = 1.5  # one-way displacement of an easy patch along its cohort's direction
    easy_max: float = 0.4  # largest share of a bag's patches that carry the easy displacement
    weibull_shape: float = 1.2
    min_patches: int = 16
    layout: str = "contiguous"


# Real-data facts the preset is calibrated against (UNI2-h, DSS, 13 TCGA cohorts): the families
# that give the four mutual-best pairs of the zero-shot matrix.
CALIBRATED_FAMILIES = {"GBMLGG": "F1", "KIPAN": "F1", "BLCA": "F2", "HNSC": "F2",
                       "CESC": "F3", "STES": "F3", "LIHC": "F4", "SARC": "F4"}
# name -> log-hazard weights (universal, family, private, easy), tuned with
# benchmarks/transfer_study.py against the real facts (docs/calibration.md)
CALIBRATED_WEIGHTS = {
    "BRCA": (1.0, 0.0, -0.5, 1.0),
    "KIPAN": (0.8, 1.4, 0.6, 1.6),
    "LUNG": (0.9, 0.0, 0.2, 0.4),
    "GBMLGG": (0.8, 1.4, -0.5, 1.4),
    "COADREAD": (1.0, 0.0, 0.5, 1.0),
    "STES": (1.0, 1.2, -0.4, 1.0),
    "UCEC": (1.2, 0.0, -0.5, 1.2),
    "HNSC": (0.8, 1.4, 0.4, 1.0),
    "SKCM": (-0.3, 0.0, -0.5, 0.9),
    "BLCA": (0.8, 1.4, -0.4, 1.0),
    "LIHC": (1.0, 1.4, 0.5, 1.4),
    "CESC": (1.0, 1.4, -0.4, 1.0),
    "SARC": (0.3, 1.2, 0.2, 0.3),
}


def calibrated_size(n: int) -> int:
    """Table S1's cohort size scaled into 80-300 patients, order kept (248 -> 80, 1035 -> 298)."""
    return round(80.0 * (n / 248.0) ** 0.92)


def _calibrated(null: bool = False, patch_scale: float = 0.005) -> CalibratedConfig:
    cohorts = []
    for name, n, wsis, mean, mx, surv, _ in TABLE_S1:
        u, f, p, e = CALIBRATED_WEIGHTS[name]
        cohorts.append(CalibratedCohort(
            name=name, n_patients=calibrated_size(n), event_rate=round(1.0 - surv, 3),
            universal=u, family_weight=f, private=p, easy=e,
            family=CALIBRATED_FAMILIES.get(name, ""), slides_per_patient=wsis / n,
            patches_mean=max(24.0, mean * patch_scale),
            patches_max=max(64, min(400, int(mx * patch_scale)))))
    return CalibratedConfig(cohorts=tuple(cohorts), null=null)


@dataclass
class _MotifWorld:
    basis: np.ndarray  # (D, D) orthonormal: background subspace, then one direction per motif
    prototypes: np.ndarray  # (B, Lb) background phenotype prototypes
    offset: np.ndarray  # (D,)
    motifs: list[str]  # motif i moves patches along basis[:, Lb + i]
    decoy: dict[str, int]  # +/- motif -> the background phenotype it hides in
    base: dict[str, np.ndarray]  # cohort -> (B,) log base composition


def _motif_names(cfg: CalibratedConfig) -> list[str]:
    fams = sorted({c.family for c in cfg.cohorts if c.family})
    return ["U", *(f"F:{f}" for f in fams), *(f"P:{c.name}" for c in cfg.cohorts),
            *(f"E:{c.name}" for c in cfg.cohorts)]


def _make_motif_world(cfg: CalibratedConfig, rng: np.random.Generator) -> _MotifWorld:
    D, B, Lb = cfg.feature_dim, cfg.n_background, cfg.background_dim
    motifs = _motif_names(cfg)
    if Lb + len(motifs) > D:
        raise ConfigError(f"the calibrated preset needs feature_dim >= {Lb + len(motifs)} "
                          f"({Lb} background + {len(motifs)} motif directions), got {D}")
    basis, _ = np.linalg.qr(rng.normal(size=(D, D)))
    prototypes = rng.normal(0.0, cfg.prototype_scale, size=(B, Lb))
    offset = rng.normal(0.0, 0.5, size=D)
    # the +/- motifs hide in common background phenotypes: U in phenotype 0, the private motifs
    # in 1, each family's motif in a phenotype of its own (2, 3, ...), so that a detector of one
    # family's motif does not also count another family's
    fams = sorted({c.family for c in cfg.cohorts if c.family})
    if B < 2 + len(fams):
        raise ConfigError(f"the calibrated preset needs n_background >= {2 + len(fams)}")
    decoy = {"U": 0, **{f"F:{f}": 2 + i for i, f in enumerate(fams)},
             **{f"P:{c.name}": 1 for c in cfg.cohorts}}
    base = {}
    for c in cfg.cohorts:
        b = rng.normal(0.0, 0.4, size=B)
        b[:2] += (1.5, 1.2)  # the decoys are common tissue
        if c.family:
            b[decoy[f"F:{c.family}"]] += 1.2
        base[c.name] = b
    return _MotifWorld(basis, prototypes, offset, motifs, decoy, base)


def _hazard_weights(cfg: CalibratedConfig, spec: CalibratedCohort) -> dict[str, float]:
    """Log-hazard weight of each of the cohort's motifs (the null control moves U's and F's
    weight to the private motif, so that the cohort's own signal keeps its size)."""
    u, f = spec.universal, spec.family_weight if spec.family else 0.0
    w = {"U": u, f"P:{spec.name}": spec.private, f"E:{spec.name}": spec.easy}
    if spec.family:
        w[f"F:{spec.family}"] = f
    if cfg.null:
        w["U"] = 0.0
        if spec.family:
            w[f"F:{spec.family}"] = 0.0
        w[f"P:{spec.name}"] = math.copysign(math.sqrt(spec.private**2 + u**2 + f**2),
                                            spec.private)
    return w


def _simulate_calibrated(cfg: CalibratedConfig, spec: CalibratedCohort, world: _MotifWorld,
                         rng: np.random.Generator):
    B, n = cfg.n_background, spec.n_patients
    base = np.exp(world.base[spec.name])
    alpha = cfg.composition_concentration * base / base.sum() * B
    mix = rng.dirichlet(alpha, size=n)  # (n, B) background composition
    weights = _hazard_weights(cfg, spec)
    own = list(weights)
    loads = {m: rng.normal(size=n) for m in own}  # latent motif load of each patient
    # share of the decoy's patches that are the motif (of all patches for the easy effect): a
    # logistic function of the load, half the maximum at load 0
    shares = {m: (cfg.easy_max if m.startswith("E:") else cfg.motif_max)
              / (1.0 + np.exp(-1.5 * z)) for m, z in loads.items()}
    eta = sum(weights[m] * (loads[m] - loads[m].mean()) / (loads[m].std() + 1e-12) for m in own)

    k = cfg.weibull_shape
    lam = spec.median_survival_days / (math.log(2.0) ** (1.0 / k))
    t_event = lam * (rng.exponential(1.0, size=n) * np.exp(-eta)) ** (1.0 / k)
    entry = rng.uniform(0.3, 1.0, size=n) * 4000.0
    dropout = rng.exponential(6000.0, size=n)
    s = _censoring_scale(t_event, entry, dropout, spec.censored_share)
    t_cens = np.minimum(s * entry, s * dropout)
    time = np.maximum(1.0, np.round(np.minimum(t_event, t_cens)))
    event = (t_event <= t_cens).astype(int)

    shift = rng.normal(0.0, cfg.cohort_shift, size=cfg.background_dim)
    index = {m: world.motifs.index(m) for m in own}
    easy = f"E:{spec.name}"
    rows, slides = [], []
    patient_ids = [f"{spec.name}-{i:04d}" for i in range(n)]
    for i, pid in enumerate(patient_ids):
        n_slides = 1 + rng.poisson(max(0.0, spec.slides_per_patient - 1.0))
        for j in range(n_slides):
            slide_id = f"{pid}-S{j + 1}"
            n_patches = _bag_size(spec, cfg, rng)
            phen = rng.choice(B, size=n_patches, p=mix[i])
            motif = np.full(n_patches, -1)
            for m in own:  # +/- motif patches replace patches of their decoy phenotype
                if m == easy:
                    continue
                free = np.flatnonzero((phen == world.decoy[m]) & (motif < 0))
                hit = free[rng.random(free.size) < shares[m][i]]
                motif[hit] = index[m]
            easy_on = rng.random(n_patches) < shares[easy][i]  # any patch may carry it
            slides.append((slide_id, phen, motif, easy_on, index[easy], shift))
            rows.append((pid, slide_id + (".svs" if (i + j) % 2 else ""), time[i], event[i]))
    labels = pd.DataFrame(rows, columns=["patient_id", "slide_id", "time", "event"])
    labels["time"] = labels["time"].astype(int)
    truth = pd.DataFrame({"patient_id": patient_ids, "true_risk": eta, "time": time.astype(int),
                          "event": event})
    for m in own:
        truth[f"load_{m.split(':')[0]}"] = loads[m]
    return labels, truth, slides


def _motif_features(cfg: CalibratedConfig, world: _MotifWorld, phen: np.ndarray,
                    motif: np.ndarray, easy_on: np.ndarray, easy_index: int, shift: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n, D, Lb = len(phen), cfg.feature_dim, cfg.background_dim
    latent = world.prototypes[phen] + shift + rng.normal(0.0, cfg.within_noise, size=(n, Lb))
    x = latent @ world.basis[:, :Lb].T + world.offset + rng.normal(0.0, cfg.feature_noise,
                                                                    size=(n, D))
    sign = rng.choice([-1.0, 1.0], size=n)
    has = motif >= 0
    if has.any():
        dirs = world.basis[:, Lb + motif[has]].T  # (k, D)
        x[has] += (sign[has] * cfg.motif_shift)[:, None] * dirs
    x[easy_on] += cfg.easy_shift * world.basis[:, Lb + easy_index]
    side = math.ceil(math.sqrt(n))
    idx = np.arange(n)
    coords = np.stack([(idx % side) * 256, (idx // side) * 256], axis=1).astype(np.int32)
    # regions of one phenotype; a motif patch is laid out as its own pseudo-phenotype
    label = np.where(has, cfg.n_background + motif, phen)
    order = _tissue_layout(label, side, rng)
    return x[order].astype(np.float32), coords


def _generate_calibrated(cfg: CalibratedConfig, out: Path, seed: int, overwrite: bool,
                         progress: bool) -> Path:
    ss = np.random.SeedSequence(seed)
    world_ss, *cohort_ss = ss.spawn(1 + len(cfg.cohorts))
    world = _make_motif_world(cfg, np.random.default_rng(world_ss))
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "generator": "steph.data.synthetic",
        "model": "motifs (calibrated preset)",
        "seed": seed,
        "config": {k: v for k, v in asdict(cfg).items() if k != "cohorts"},
        "cohorts": [asdict(c) for c in cfg.cohorts],
        "motifs": world.motifs,
        "hazard_weights": {c.name: _hazard_weights(cfg, c) for c in cfg.cohorts},
    }
    _write_cohorts(cfg, out, cohort_ss, overwrite, progress,
                   lambda spec, rng: _simulate_calibrated(cfg, spec, world, rng),
                   lambda slide, rng: _motif_features(cfg, world, *slide, rng))
    write_json(out / "synth.json", manifest)
    return out
