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
"""

from __future__ import annotations

import functools
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


PRESETS: dict[str, Callable[[], SynthConfig]] = {
    "demo": _demo,
    "transfer": _transfer,
    "tcga13": _tcga13,
}


def preset(name: str, *, feature_dim: int | None = None, patch_scale: float | None = None,
           layout: str | None = None) -> SynthConfig:
    """A named preset, optionally with another feature dimension / bag-size scale / h5 layout."""
    if name not in PRESETS:
        raise ConfigError(f"unknown synthetic preset {name!r}; known: {', '.join(PRESETS)}")
    if patch_scale is not None and name != "tcga13":
        raise ConfigError("--patch-scale applies to the tcga13 preset only")
    cfg = _tcga13(patch_scale) if (name == "tcga13" and patch_scale is not None) else PRESETS[name]()
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


def generate(cfg: SynthConfig, out: str | Path, seed: int = 0, overwrite: bool = False,
             progress: bool = True) -> Path:
    """Write all cohorts of ``cfg`` under ``out``; return ``out``.

    Deterministic for (cfg, seed). An existing cohort folder is an error unless ``overwrite``.
    """
    from steph.data.features import write_features_h5  # data layer writer (atomic)

    out = Path(out)
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
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for spec, css in zip(cfg.cohorts, cohort_ss):
        cdir = out / spec.name
        if (cdir / "labels.csv").exists() and not overwrite:
            raise ConfigError(f"{cdir} already holds a cohort; choose another --out, or add "
                              "--overwrite to replace it")
        rng = np.random.default_rng(css)
        labels, truth, slides = _simulate_cohort(cfg, spec, world, rng)
        feat_dir = cdir / "features"
        feat_dir.mkdir(parents=True, exist_ok=True)
        it = slides
        if progress and tqdm is not None:
            it = tqdm(slides, desc=f"synth {spec.name}", unit="slide", leave=False, disable=None)
        for slide_id, phen, shift in it:
            x, coords = _patch_features(cfg, world, phen, shift, rng)
            write_features_h5(feat_dir / f"{slide_id}.h5", x.astype(np.float16), coords=coords,
                              layout=cfg.layout)
        write_csv(cdir / "true_risk.csv", truth)
        write_csv(cdir / "labels.csv", labels)  # written last: a cohort is complete once it exists
        log.info("wrote synthetic cohort %s: %d patients, %d slides", spec.name,
                 truth.shape[0], len(slides))
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
