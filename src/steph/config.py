"""Every setting of an experiment, validated (unknown keys are errors) and serialisable.

A YAML config file mirrors this tree, e.g.::

    train:
      epochs: 20
      lr: 1.0e-4
    steph:
      top_k: 5

Command-line options and ``--set section.key=value`` override the file; the effective config is
saved with every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from steph.errors import ConfigError
from steph.utils.io import read_user_text

# Settings that change speed or memory but never a result: not part of a run's identity.
# (train.threads changes the last bits of STEPH's merge sums, never more: see the README.)
PERFORMANCE_ONLY = {"data": ("cache_mb", "workers", "prefetch"), "train": ("threads", "device")}

# Keys added to the settings after format 2, with the value every run made before them had in
# effect. A run's identity (config_for, RunDir.check_or_write_settings: both go through
# without_performance_keys) and a STEPH artefact's settings leave such a key out
# while it holds that value, so a run made before the key existed and one made since with that
# value are the same run, with the same config.yaml bytes; any other value is written and makes
# another run. (No format bump: nothing is upgraded, a missing key simply is that value.)
ADDED_AT_DEFAULT: dict[str, dict[str, Any]] = {
    # STEPH's cross-fitted target task vectors and the screening probes' ridge
    # (docs/method-notes.md), off / as before by default
    "steph": {"crossfit": 0, "crossfit_screen": True, "crossfit_test": "full",
              "screen_ridge": "search"},
}


def without_added_defaults(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (one settings section) without the keys of ADDED_AT_DEFAULT that hold the
    value runs made before them had."""
    defaults = ADDED_AT_DEFAULT.get(section, {})
    return {k: v for k, v in values.items() if not (k in defaults and v == defaults[k])}



def without_performance_keys(settings: dict[str, Any]) -> dict[str, Any]:
    """A copy of a settings tree as it identifies a run: without the keys of PERFORMANCE_ONLY,
    and without the keys added since format 2 that hold the value runs made before them had
    (ADDED_AT_DEFAULT)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in settings.items()}
    for section, keys in PERFORMANCE_ONLY.items():
        if isinstance(out.get(section), dict):
            for key in keys:
                out[section].pop(key, None)
    for section, values in out.items():
        if isinstance(values, dict):
            out[section] = without_added_defaults(section, values)
    return out


class _Strict(BaseModel):
    # NaN / inf are never a meaningful setting (and would pass bounds such as lr > 0)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    labels: str = "labels.csv"  # file name inside each cohort folder
    convention: Literal["native", "mcat", "tcga_cdr", "steph"] | None = None  # None: detect
    endpoint: Literal["os", "dss", "pfi", "dfi"] | None = None  # TCGA-CDR only; None: DSS
    time_unit: Literal["days", "months"] | None = None
    on_bad_slide: Literal["raise", "skip"] = "raise"
    check: Literal["shape", "full"] = "shape"
    n_folds: int = Field(5, ge=2)
    split_seed: int = 0
    max_instances: int | None = Field(None, ge=1)  # patch sampling of training bags
    # Evaluation of a network that cannot compute a huge bag in pieces (TransMIL): bags above
    # this many patches are evaluated on a sample, recorded in metrics.json (None: whole bags,
    # always exact). Networks that compute in pieces (ABMIL, ILRA, R2T-MIL, Patch-GCN) ignore it.
    eval_max_instances: int | None = Field(None, ge=1)
    cache_mb: int = Field(0, ge=0)  # in-memory LRU of bags, for small studies
    # Worker processes that read bags ahead of training (steph.data.loader): None = min(4,
    # CPUs - 1); 0 = read in the main process. Results do not depend on it.
    workers: int | None = Field(None, ge=0)
    prefetch: int = Field(2, ge=1)  # bags each worker reads ahead


class BinsConfig(_Strict):
    kind: Literal["uniform", "quantile"] = "uniform"
    n_bins: int = Field(32, ge=1)
    max_time: float = Field(11680.0, gt=0)  # uniform bins: [0, max_time), last bin open


class NetworkOptions(_Strict):
    """Base of a network's typed hyper-parameters (besides ``in_dim`` and ``n_bins``, which the
    data decide): the keyword arguments of its class, with the defaults of method.md."""


class ABMILOptions(NetworkOptions):
    hidden_dim: int = Field(512, ge=1)
    attn_dim: int = Field(384, ge=1)
    dropout: float = Field(0.25, ge=0.0, lt=1.0)


class TransMILOptions(NetworkOptions):
    dim: int = Field(512, ge=1)
    heads: int = Field(8, ge=1)
    n_landmarks: int = Field(256, ge=1)
    pinv_iterations: int = Field(6, ge=1)
    residual_kernel: int = Field(33, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class ILRAOptions(NetworkOptions):
    hidden_dim: int = Field(256, ge=1)
    n_blocks: int = Field(2, ge=1)
    heads: int = Field(8, ge=1)
    rank: int = Field(1, ge=1)


class R2TMILOptions(NetworkOptions):
    dim: int = Field(512, ge=1)
    heads: int = Field(8, ge=1)
    region_num: int = Field(8, ge=1)
    epeg_kernel: int = Field(15, ge=1)
    crmsa_k: int = Field(3, ge=1)
    attn_dim: int = Field(128, ge=1)
    dropout: float = Field(0.25, ge=0.0, lt=1.0)
    trans_dropout: float = Field(0.1, ge=0.0, lt=1.0)


class PatchGCNOptions(NetworkOptions):
    hidden_dim: int = Field(256, ge=1)
    n_layers: int = Field(3, ge=1)
    dropout: float = Field(0.25, ge=0.0, lt=1.0)
    block_dropout: float = Field(0.1, ge=0.0, lt=1.0)


class NetworksConfig(_Strict):
    """Every registered network's options, by the network's registered name (a network's
    registration names its options model; tests/models check that every registered network has
    its field here, with its class's keyword arguments and defaults)."""

    abmil: ABMILOptions = ABMILOptions()
    transmil: TransMILOptions = TransMILOptions()
    ilra: ILRAOptions = ILRAOptions()
    r2t_mil: R2TMILOptions = R2TMILOptions()
    patch_gcn: PatchGCNOptions = PatchGCNOptions()

    @field_validator("*", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any) -> Any:
        return {} if v is None else v


# ABMIL's options were top-level keys of ``model`` before every network's options were typed
_LEGACY_ABMIL_KEYS = ("hidden_dim", "attn_dim", "dropout")


class ModelConfig(_Strict):
    # The backbone of a runs folder (a registered network: abmil, transmil, ilra, r2t_mil,
    # patch_gcn): what the transfer methods (STEPH, the merging baselines) merge, i.e. which
    # cancer-specific runs they need. Configs written before it existed call it ``name``.
    arch: str = Field("abmil", validation_alias=AliasChoices("arch", "name"))
    init_seed: int = 0  # seed of the shared initialisation theta_0 (one per architecture)
    # Every network's hyper-parameters, typed: model.options.<network>.<key>, e.g.
    # model.options.abmil.hidden_dim or model.options.transmil.dim; unset ones keep the
    # configuration of method.md (Table S4's parameter counts).
    options: NetworksConfig = NetworksConfig()

    @model_validator(mode="before")
    @classmethod
    def _legacy_abmil_keys(cls, data: Any) -> Any:
        """``model.hidden_dim / attn_dim / dropout`` (before every network's options were
        typed) are ABMIL's options."""
        if isinstance(data, dict) and any(k in data for k in _LEGACY_ABMIL_KEYS):
            data = dict(data)
            options = dict(data.get("options") or {})
            abmil = dict(options.get("abmil") or {})
            for key in _LEGACY_ABMIL_KEYS:
                if key in data:
                    if key in abmil and abmil[key] != data[key]:
                        raise ValueError(f"model.{key} and model.options.abmil.{key} disagree")
                    abmil[key] = data.pop(key)
            options["abmil"] = abmil
            data["options"] = options
        return data

    def network_kwargs(self, arch: str | None = None) -> dict[str, Any]:
        """Keyword arguments (besides in_dim and n_bins) of network ``arch`` (default: arch)."""
        arch = arch or self.arch
        if arch not in NetworksConfig.model_fields:
            raise ConfigError(f"model.options has no section for network {arch!r} (known: "
                              f"{', '.join(NetworksConfig.model_fields)})")
        return getattr(self.options, arch).model_dump()


class TrainConfig(_Strict):
    epochs: int = Field(20, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)  # matrices only; never biases or 1-d parameters
    warmup_epochs: int = Field(1, ge=0)
    bags_per_step: int = Field(16, ge=1)  # gradient accumulation; the remainder is dropped
    loss_alpha: float = Field(0.5, ge=0.0, le=1.0)
    seed: int = 0
    eval_every: int = Field(1, ge=0)  # test C-index every N epochs (0: last epoch only)
    # Where every method's survival head starts (steph.training.head_start): reference | baseline
    # | null | fit.
    head_init: Literal["reference", "baseline", "null", "fit"] = "fit"
    threads: int | None = Field(None, ge=1)  # None: torch's count when the run starts
    # Bit-identical reruns (steph.utils.reproducibility): pinned thread count, torch's
    # deterministic algorithms and, on CUDA, deterministic cuBLAS / cuDNN. Part of a run's
    # identity: a run made without it carries no bit-for-bit guarantee.
    deterministic: bool = True
    # auto (CUDA, else Apple mps, else CPU) | cpu | cuda | cuda:N | mps (steph.utils.device)
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    # Autocast of the network's forward; loss, merge coefficients and metrics stay float32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class StephConfig(_Strict):
    @field_validator("gamma", mode="before")
    @classmethod
    def _gamma_none_is_size_rule(cls, v: Any) -> Any:
        return "size_rule" if v is None else v  # configs written before gamma had names

    @field_validator("gamma_grid", mode="after")
    @classmethod
    def _grid_sorted(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("gamma_grid needs at least one value")
        return tuple(sorted(set(v)))

    top_k: int = Field(5, ge=1)  # K; larger than the number of sources means "all"
    beta: float = Field(0.05, ge=0)  # weight of L_mix
    # Weight of L_agg: a number; "size_rule" (the paper's result on TCGA: gamma_large above
    # large_cohort patients, else gamma_small); or "search" (the paper's method: an inner
    # cross-validation on the training patients over gamma_grid, see steph.experiments.search).
    gamma: Literal["search", "size_rule"] | Annotated[float, Field(ge=0)] = "size_rule"
    gamma_grid: tuple[Annotated[float, Field(ge=0)], ...] = (0.0, 0.0025, 0.005, 0.01, 0.05)
    gamma_large: float = 0.005
    gamma_small: float = 0.05
    large_cohort: int = 500
    search_folds: int = Field(3, ge=2)  # inner folds of gamma: search
    # Target task vector of the inner search: "inner" trains the target's model on each inner
    # training split (no inner validation patient seen); "outer" reuses the fold's own target
    # model, which has seen the inner validation patients (a leak, kept to measure it).
    search_target: Literal["inner", "outer"] = "inner"
    # Collapse guard: when every selected merge weight was zero for a whole epoch, warn and
    # restart the run with the next smaller gamma of gamma_grid (off: warn only).
    guard: bool = True
    # "reference": every setting not given explicitly takes the reference release's value
    # (REFERENCE_PROFILE below), so the paper can be run as published next to steph's defaults.
    profile: Literal["steph", "reference"] = "steph"
    mixing: Literal["hyper", "none", "free"] = "hyper"  # none: lambda = 1; free: learned vector
    aggregation: Literal["hyper", "free"] = "hyper"  # free: w as a learned vector
    dropout: float = Field(0.25, ge=0.0, lt=1.0)
    embed_dim: int = Field(512, ge=1)
    # Start of the merge weights: "complete" sets H_agg's output bias (or the free w) to 1/K so
    # that sum_{i in S} w_i ~ 1 and theta(X) starts near theta_0 + tau_t (the target's model);
    # "default" keeps PyTorch's initialisation (w ~ 0.03: theta(X) starts near theta_0).
    # "screened": each source is scored by a cross-validated probe of theta_0 + tau_t + tau_i
    # on the training patients against theta_0 + tau_t (forward passes only); the merge starts
    # with w = 1 and lambda = 0.5 for the sources that helped (at most K), w ~ 0 for the others,
    # and as "complete" (the target's own encoder) when none helped.
    w_init: Literal["complete", "default", "screened"] = "screened"
    # Output activation of H_agg (the reference release offers relu / softplus / sigmoid; the
    # paper uses relu). softplus never has zero gradient, so a small w can recover.
    w_activation: Literal["relu", "softplus"] = "relu"
    # Epochs at the start during which w and lambda are held fixed (no gradient) so that the
    # fresh head first adapts to the initial merged encoder.
    head_warmup_epochs: int = Field(0, ge=0)
    # Cross-fitted target task vectors (a departure, off by default; docs/method-notes.md):
    # 0 = off (tau_t is the target's fold model, which has seen every training patient);
    # J >= 2 = J inner target models, each trained from theta_0 on the training patients minus
    # one of J inner folds (the runner trains them, <run>/crossfit/inner<j>); STEPH merges each
    # training patient with the inner model that never saw it, the test patients with tau_t.
    crossfit: int = Field(0, ge=0)
    # With crossfit and w_init "screened": the screening probes embed every training patient
    # with the inner target encoder that never saw it (False: the fold's target encoder, which
    # has seen the patients it is scored on).
    crossfit_screen: bool = True
    # With crossfit: the target task vector of the trained module at test time (and in the
    # saved artefact): "full" (the fold model's tau_t) or "mean" (the mean of the inner target
    # task vectors, closer to what the hypernetworks and the head were trained with).
    crossfit_test: Literal["full", "mean"] = "full"
    # Ridge of the screening probes: "search" (each probe chooses its own by inner CV over the
    # head start's grid) or "target" (every source probe uses the ridge the target encoder's
    # probe chose: a quarter of the penalised fits).
    screen_ridge: Literal["search", "target"] = "search"

    @field_validator("crossfit", mode="after")
    @classmethod
    def _crossfit_folds(cls, v: int) -> int:
        if v == 1:
            raise ValueError("crossfit needs 0 (off) or at least 2 inner folds")
        return v


class MergeConfig(_Strict):
    """Settings of the model-merging baselines (method.md section 6)."""

    init_coef: float = 0.3  # AdaMerging family: initial task coefficients
    ta_coef: float = 0.3  # Task Arithmetic: fixed coefficient
    ties_density: float = Field(0.2, gt=0.0, le=1.0)
    iso_cts_fraction: float = Field(0.8, gt=0.0, le=1.0)
    surgery_rank: int = Field(16, ge=1)
    # The AdaMerging family's coefficients learn at train.lr x coef_lr_scale: at the protocol's
    # 1e-4 they move about 1e-4 per step, i.e. not at all within a small cohort's budget.
    coef_lr_scale: float = Field(10.0, gt=0)  # 1e-3: AdaMerging's own coefficient rate


class TransferConfig(_Strict):
    """Representation transfer (method.md section 6): ROUPKT and the simpler transfer rows."""

    top_k: int = Field(5, ge=1)  # experts kept per bag (larger than E: all)
    z_loss: float = Field(0.01, ge=0)  # weight of (logsumexp router logits)^2
    balance_loss: float = Field(0.01, ge=0)  # weight of the top-1 router probability
    # How linear_probe picks its source on the training patients: "inner_cv" = the inner
    # cross-validated C-index of a linear read-out of each source's embedding; "zero_shot" =
    # the training C-index of each source model as it is.
    probe_selection: Literal["inner_cv", "zero_shot"] = "inner_cv"


# What ``steph.profile: reference`` sets (unless given explicitly): the reference release's
# training of every method, without the departures documented in docs/method-notes.md.
REFERENCE_PROFILE: dict[tuple[str, str], Any] = {
    ("train", "head_init"): "reference",  # ABMIL keeps theta_0's head; fresh heads fully random
    ("steph", "w_init"): "default",  # PyTorch's initialisation of H_agg
    ("steph", "gamma"): "size_rule",  # 0.005 above 500 patients, else 0.05
    ("steph", "guard"): False,  # nothing protects w from collapsing
    ("merge", "coef_lr_scale"): 1.0,  # AdaMerging coefficients at the shared learning rate
}


class ExperimentConfig(_Strict):
    data: DataConfig = DataConfig()
    bins: BinsConfig = BinsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    steph: StephConfig = StephConfig()
    merge: MergeConfig = MergeConfig()
    transfer: TransferConfig = TransferConfig()

    @field_validator("*", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any) -> Any:
        return {} if v is None else v  # an empty YAML section means "defaults"

    @model_validator(mode="after")
    def _apply_profile(self) -> ExperimentConfig:
        if self.steph.profile == "reference":
            for (section, key), value in REFERENCE_PROFILE.items():
                part = getattr(self, section)
                if key not in part.model_fields_set:
                    object.__setattr__(part, key, value)  # stays "not explicitly set"
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_validation(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {loc!r}")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid configuration ({source}): " + "; ".join(lines)


def build_config(data: dict[str, Any] | None = None, source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_validation(err, source)) from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        text = read_user_text(path, "config file", error=ConfigError)
        try:
            loaded = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError) as err:  # PyYAML: ValueError for a bad \U escape
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value, source)
    if overrides:
        source = f"{source} + overrides"
    return build_config(data, source)


def _yaml_problem(err: Exception) -> str:
    """A YAML error on one line: what is wrong and where."""
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err)
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _set_dotted(data: dict[str, Any], key: str, value: Any, source: str = "config") -> None:
    """Set ``section.key`` (or a deeper key, e.g. ``model.options.abmil.hidden_dim``)."""
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {key!r} must look like section.key (e.g. train.epochs)")
    node = data
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or an empty section: defaults
            node[part] = {}
        if not isinstance(node[part], dict):
            where = ".".join(parts[:depth + 1])
            raise ConfigError(f"cannot apply override {key!r}: {where!r} of {source} is not a "
                              f"mapping (got {node[part]!r:.60})")
        node = node[part]
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-3`` -> ("train.lr", 0.001); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError):
        value = raw
    return key.strip(), value
