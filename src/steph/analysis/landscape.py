"""The loss landscape of task-vector mixup (STEPH appendix C.2.3, Figures 4, S3 and S5).

For a target cohort t, a source s and a fold: the merged model

    M(C_s, C_t) = theta_0 + C_s tau_s + C_t tau_t,   C_s, C_t in {0, 0.04, ..., 1}

(26 x 26 = 676 models) is evaluated on the fold's test patients of t; the landscape is their
mean survival loss (the training loss, ``train.loss_alpha`` of the run) as a function of
(C_s, C_t), shown after a Gaussian smoothing with sigma = 1 grid step
(``scipy.ndimage.gaussian_filter``, its default ``reflect`` border).

Conventions where the paper is silent:

* the task vectors cover **every** tensor of the network, the head included, as the formula
  says of whole models: the corner (0, 1) is the target's own model, (1, 0) the source's model
  applied to the target, (0, 0) theta_0. (STEPH itself merges the encoder only and trains a
  fresh head.) The loss uses the target run's time bins;
* tau_t is the target's model of that fold (it never saw the fold's test patients), tau_s the
  source's fold-0 model, as STEPH's pool (method.md section 4);
* STEPH's mixup of this pair moves along the segment C_s + C_t = 1 (C_t = lambda); the path
  shown is the mean lambda of the source per training epoch (``log.jsonl``).

The 676 merged models are evaluated in groups of grid points (as many as fit a memory bound):
a group's merged tensors are built once and every bag is evaluated with them, one
``torch.func.vmap`` over the group's points per bag (a loop over the points where a network
cannot be vmapped), on ``device``, with a progress bar over the bags. A Linear layer applied to
the bag's features themselves (the networks' feature projection) is formed from its three
products with the bag, ``x W0^T + C_s x W_s^T + C_t x W_t^T``, instead of one product per point.
(Building the tensors for every bag and group, as steph did before, made the landscape most of
``steph report``'s time; ``benchmarks/bench_landscape.py`` times both.)
Each (target, fold, source) is cached (``RUNS/.cache/analysis/landscape/<target>/<network>/
[rep<r>/]fold<k>/<source>.json``, keyed by the three models' weights, the patients, their feature files,
the loss and the grid), so an interrupted analysis resumes with the pairs it has not done.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from steph.analysis.cache import cache_key, read_cached, run_cache_path, write_cached
from steph.analysis.runs import RunRef, read_log, source_run, theta0_digest, weights_digest

log = logging.getLogger("steph.analysis")

GRID_STEP = 0.04
SIGMA = 1.0
# activations (points x instances x widest tensor) of one vmapped call: a block that stays in
# the CPU's caches evaluates faster than one vmapped call over the whole group of points
ACTIVATION_BLOCK = 2 ** 20
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def coefficient_grid(step: float = GRID_STEP) -> np.ndarray:
    """0, step, ..., 1 (26 values for the paper's 0.04); ``1 / step`` must be a whole number."""
    n = round(1.0 / step)
    if n < 1 or abs(n * step - 1.0) > 1e-9:
        raise ValueError(f"grid step must divide 1 into whole steps, got {step}")
    return np.round(np.linspace(0.0, 1.0, n + 1), 10)


def evaluate_grid(loss_fn: LossFn, coefficients: Sequence[float], batch: int = 26,
                  progress: bool = False, desc: str = "landscape") -> np.ndarray:
    """``losses[i, j] = loss_fn(C_s = c[j], C_t = c[i])`` over the square grid of
    ``coefficients``; ``loss_fn`` takes two (G,) tensors of C_s and C_t and returns the (G,)
    losses of those G points (it is called with ``batch`` points at a time)."""
    from tqdm.auto import tqdm

    c = np.asarray(coefficients, dtype=np.float64)
    ct, cs = np.meshgrid(c, c, indexing="ij")  # row i: C_t = c[i]; column j: C_s = c[j]
    flat_s, flat_t = cs.reshape(-1), ct.reshape(-1)
    out = np.empty(flat_s.shape[0])
    starts = range(0, len(flat_s), max(1, int(batch)))
    for a in tqdm(starts, desc=desc, unit="batch", disable=None if progress else True,
                  leave=False):
        b = min(a + batch, len(flat_s))
        values = loss_fn(torch.from_numpy(flat_s[a:b]), torch.from_numpy(flat_t[a:b]))
        out[a:b] = np.asarray(values.detach().cpu(), dtype=np.float64).reshape(-1)
    return out.reshape(cs.shape)


def smooth(losses: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """The landscape after a Gaussian smoothing of ``sigma`` grid steps (appendix C.2.3)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(losses, dtype=np.float64), sigma=sigma)


@dataclass
class Bag:
    """One test bag: features, the network's extra inputs, its time bin and event."""

    x: torch.Tensor
    inputs: dict[str, torch.Tensor]
    bin: int
    event: int


class _ProjectedInput(torch.nn.Module):
    """Stands in for a Linear layer applied to the raw features of a bag: its output at the
    weight ``W0 + C_s W_s + C_t W_t`` is ``x W0^T + C_s x W_s^T + C_t x W_t^T`` (plus the merged
    bias), so the three products ``proj`` are computed once per bag and each grid point combines
    them with its ``coef`` = (1, C_s, C_t) instead of multiplying the bag by its own weight."""

    def __init__(self, bias: bool):
        super().__init__()
        self.register_buffer("coef", torch.tensor([1.0, 0.0, 0.0]))
        self.bias = torch.nn.Parameter(torch.zeros(1)) if bias else None
        self.x: torch.Tensor | None = None  # the bag whose products ``proj`` holds
        self.proj: torch.Tensor | None = None  # (3, N, out): x W0^T, x W_s^T, x W_t^T

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        if self.x is None or not _same_tensor(inp, self.x):
            raise RuntimeError("landscape: a projected input layer got another input than the "
                               "bag it was prepared for")
        out = torch.tensordot(self.coef, self.proj, dims=1)
        return out if self.bias is None else out + self.bias


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a is b) or (a.data_ptr() == b.data_ptr() and a.shape == b.shape
                        and a.stride() == b.stride() and a.dtype == b.dtype)


def _input_linears(network: torch.nn.Module, bags: Sequence[Bag], fixed: dict,
                   params: dict) -> list[str]:
    """The Linear layers of ``network`` that, on every bag, are called exactly once and on the
    bag's features themselves (ABMIL's ``feat_proj.0``): their output is linear in their weight,
    so it can be formed from three products per bag (:class:`_ProjectedInput`). Found by running
    the network once per bag with hooks; a layer called on anything else (a chunk of the bag, a
    transformed bag) or more than once is left as it is."""
    from torch.func import functional_call

    linears = {name: m for name, m in network.named_modules() if isinstance(m, torch.nn.Linear)}
    if not linears or not bags:
        return []
    keep = set(linears)
    for bag in bags:
        calls: dict[str, list[bool]] = {name: [] for name in linears}
        handles = [m.register_forward_pre_hook(
            lambda _m, args, seen=calls[name], x=bag.x: seen.append(
                len(args) == 1 and _same_tensor(args[0], x)))
            for name, m in linears.items()]
        try:
            functional_call(network, {**fixed, **params}, (bag.x,), dict(bag.inputs))
        except Exception:  # noqa: BLE001 - the evaluation proper reports errors; no shortcut
            return []
        finally:
            for h in handles:
                h.remove()
        keep = {name for name in keep if calls[name] == [True]}
        if not keep:
            return []
    return sorted(keep)


def merged_loss_fn(network: torch.nn.Module, theta0: dict[str, torch.Tensor],
                   tau_s: dict[str, torch.Tensor], tau_t: dict[str, torch.Tensor],
                   bags: Sequence[Bag], loss_alpha: float, device: str | torch.device = "cpu",
                   max_elements: int = 2 ** 26, progress: bool = False,
                   desc: str = "landscape", block_elements: int = ACTIVATION_BLOCK) -> LossFn:
    """The mean survival loss over ``bags`` of ``network`` with the tensors
    ``theta0 + C_s tau_s + C_t tau_t`` (floating tensors; others as in ``theta0``), for a batch of
    (C_s, C_t) points (a progress bar over the bags with ``progress``). ``max_elements`` bounds
    one vmapped call: its merged tensors (points x parameters) and its activations (points x
    instances x the widest tensor), so large networks and bags run in smaller groups of
    points.

    The points are taken in groups; the merged tensors of a group are built once (one product
    ``[1, C_s, C_t] @ [theta0; tau_s; tau_t]`` over all tensors) and every bag is evaluated
    with them. A Linear layer applied to the bag's features themselves (ABMIL's feature
    projection) is not given merged weights at all: its three products with the bag are
    computed once per bag and group and combined per point (the same values up to float
    rounding, without one bag x weight product per point). A group's points are evaluated on a
    bag in vmapped calls of at most ``block_elements`` activations (points x instances x the
    widest tensor; views of the group's tensors), which stay in the CPU's caches."""
    from torch.func import functional_call, vmap
    from tqdm.auto import tqdm

    from steph.survival.loss import nll_survival_loss

    dev = torch.device(device)
    network = network.to(dev).eval()
    merged = [n for n, v in theta0.items() if v.is_floating_point()]
    fixed = {n: v.to(dev) for n, v in theta0.items() if not v.is_floating_point()}
    base = {n: theta0[n].to(dev, torch.float32) for n in merged}
    ts = {n: tau_s[n].to(dev, torch.float32) for n in merged}
    tt = {n: tau_t[n].to(dev, torch.float32) for n in merged}
    width = max(max(v.shape) if v.dim() else 1 for v in base.values())
    on_device = [Bag(b.x.to(dev), {k: v.to(dev) for k, v in b.inputs.items()}, b.bin, b.event)
                 for b in bags]
    max_n = max((b.x.shape[0] for b in on_device), default=1)

    with torch.no_grad():
        projected = [name for name in _input_linears(network, on_device, fixed, base)
                     if f"{name}.weight" in base]  # a layer whose weight is merged
    if projected:
        network = copy.deepcopy(network)
        for name in projected:
            parent, _, leaf = name.rpartition(".")
            owner = network.get_submodule(parent) if parent else network
            old = getattr(owner, leaf)
            setattr(owner, leaf, _ProjectedInput(old.bias is not None).to(dev))
        log.debug("landscape: %s's %s computed from three products per bag",
                  type(network).__name__, ", ".join(projected))
    weights = {f"{name}.weight" for name in projected}
    built = [n for n in merged if n not in weights]
    # the stacked [theta0; tau_s; tau_t] of every merged tensor, flattened: a group's tensors
    # are one (G, 3) x (3, P) product
    stack = torch.stack([torch.cat([t[n].reshape(-1) for n in built]) if built
                         else torch.zeros(0, device=dev) for t in (base, ts, tt)])
    offsets, at = {}, 0
    for n in built:
        offsets[n] = (at, base[n].shape)
        at += base[n].numel()
    n_params = max(1, at)
    group = max(1, max_elements // max(n_params, max_n * width))
    state = {"vmap": True}

    def one(params: dict[str, torch.Tensor], bag: Bag) -> torch.Tensor:
        return functional_call(network, {**fixed, **params}, (bag.x,), dict(bag.inputs))

    def group_params(cs: torch.Tensor, ct: torch.Tensor) -> dict[str, torch.Tensor]:
        coef = torch.stack([torch.ones_like(cs), cs, ct], dim=1)  # (G, 3)
        flat = coef @ stack  # (G, P)
        params = {n: flat[:, a:a + base[n].numel()].reshape(len(cs), *shape)
                  for n, (a, shape) in offsets.items()}
        for name in projected:
            params[f"{name}.coef"] = coef
        return params

    def prepare(bag: Bag) -> None:
        for name in projected:
            w = f"{name}.weight"
            module = network.get_submodule(name)
            both = torch.cat([base[w], ts[w], tt[w]])  # (3 out, in)
            module.proj = (bag.x @ both.t()).reshape(bag.x.shape[0], 3, -1).transpose(0, 1)
            module.x = bag.x

    def logits(params: dict[str, torch.Tensor], g: int, bag: Bag) -> torch.Tensor:
        if state["vmap"]:
            try:
                return vmap(lambda p: one(p, bag))(params).reshape(g, -1)
            except Exception as err:  # noqa: BLE001 - data-dependent control flow and the like
                log.info("landscape: %s cannot be vmapped (%s); evaluating point by point",
                         type(network).__name__, type(err).__name__)
                state["vmap"] = False
        return torch.cat([one({n: v[i] for n, v in params.items()}, bag).reshape(1, -1)
                          for i in range(g)])

    @torch.no_grad()
    def loss_fn(cs: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
        cs, ct = cs.to(dev, torch.float32), ct.to(dev, torch.float32)
        total = torch.zeros(len(cs), dtype=torch.float64, device=dev)
        starts = range(0, len(cs), group)
        bar = tqdm(total=len(starts) * len(on_device), desc=desc, unit="bag",
                   disable=None if progress else True, leave=False)
        try:
            for a in starts:
                params = group_params(cs[a:a + group], ct[a:a + group])
                n = len(cs[a:a + group])
                for bag in on_device:
                    prepare(bag)
                    block = max(1, min(n, block_elements // (bag.x.shape[0] * width)))
                    for b in range(0, n, block):
                        m = min(block, n - b)
                        part = params if m == n else {k: v[b:b + m] for k, v in params.items()}
                        out = logits(part, m, bag)
                        loss = nll_survival_loss(out, torch.full((m,), bag.bin, device=dev),
                                                 torch.full((m,), bag.event, device=dev),
                                                 alpha=loss_alpha, reduction="none")
                        total[a + b:a + b + m] += loss.double()
                    bar.update(1)
        finally:
            bar.close()
            for name in projected:  # the bag's products are not kept beyond the call
                module = network.get_submodule(name)
                module.proj = module.x = None
        return total / max(1, len(on_device))

    return loss_fn


@dataclass
class Landscape:
    """The test loss of theta_0 + C_s tau_s + C_t tau_t for one target, fold and source."""

    target: str
    source: str
    fold: int
    repeat: int
    coefficients: np.ndarray  # (n,) the grid of C_s and of C_t
    losses: np.ndarray  # (n, n): row i is C_t = c[i], column j is C_s = c[j]; not smoothed
    n_patients: int
    path: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["epoch", "lambda"]))

    def smoothed(self, sigma: float = SIGMA) -> np.ndarray:
        return smooth(self.losses, sigma)

    def minimum(self, smoothed: bool = True) -> tuple[float, float, float]:
        """(C_s, C_t, loss) of the lowest point of the (smoothed) landscape."""
        z = self.smoothed() if smoothed else self.losses
        i, j = np.unravel_index(int(np.argmin(z)), z.shape)
        return float(self.coefficients[j]), float(self.coefficients[i]), float(z[i, j])

    def mixup_minimum(self, smoothed: bool = True) -> tuple[float, float]:
        """(lambda, loss) of the lowest point on the mixup segment C_t = lambda,
        C_s = 1 - lambda (the grid's anti-diagonal)."""
        z = self.smoothed() if smoothed else self.losses
        n = len(self.coefficients)
        diag = np.array([z[i, n - 1 - i] for i in range(n)])
        i = int(np.argmin(diag))
        return float(self.coefficients[i]), float(diag[i])

    def table(self) -> pd.DataFrame:
        """Long form: C_s, C_t, loss, smoothed loss."""
        ct, cs = np.meshgrid(self.coefficients, self.coefficients, indexing="ij")
        return pd.DataFrame({"c_s": cs.reshape(-1), "c_t": ct.reshape(-1),
                             "loss": self.losses.reshape(-1),
                             "loss_smoothed": self.smoothed().reshape(-1)})


def lambda_path(runs_root: str | Path, steph_run: RunRef, source: str) -> pd.DataFrame:
    """Mean lambda (and w) of ``source`` per training epoch of a STEPH run."""
    from steph.analysis.dynamics import sources_of

    sources = sources_of(runs_root, steph_run)
    if source not in sources:
        return pd.DataFrame(columns=["epoch", "lambda", "w"])
    i = sources.index(source)
    rows = [{"epoch": int(r["epoch"]), "lambda": float(np.atleast_1d(r["mean_lambda"])[i]),
             "w": float(np.atleast_1d(r["mean_w"])[i])}
            for r in read_log(steph_run.path(runs_root)) if "mean_lambda" in r]
    return pd.DataFrame(rows, columns=["epoch", "lambda", "w"])


def loss_landscape(runs_root: str | Path, data_root: str | Path, target: RunRef, source: str,
                   step: float = GRID_STEP, device: str = "cpu", progress: bool = False,
                   steph_run: RunRef | None = None) -> Landscape:
    """The landscape of ``target`` (a finished cancer-specific run: its cohort, fold and network)
    and ``source`` (a cohort whose fold-0 run of the same network is finished), computed or read
    from the cache; with ``steph_run``, the path its lambda took for this source."""
    from steph.analysis.bags import RunBags
    from steph.runs import RunsFolder
    from steph.inference import load_artefact
    from steph.survival.bins import TimeBins
    from steph.utils.io import load_tensors

    runs_root = Path(runs_root)
    arch = target.method
    src = source_run(source, arch)
    coefficients = coefficient_grid(step)
    bags = RunBags(runs_root, data_root, target)
    ids = bags.test_ids()
    key = cache_key("landscape/1", theta0_digest(runs_root, arch),
                    weights_digest(target.path(runs_root)), weights_digest(src.path(runs_root)),
                    ids, bags.files_key(ids), bags.loss_alpha, coefficients.tolist())
    path = run_cache_path(runs_root, "landscape", target, source)
    cached = read_cached(path, key)
    if cached is None:
        network, manifest = load_artefact(target.path(runs_root))
        source_net, _ = load_artefact(src.path(runs_root))
        theta0 = {k: v.float() if v.is_floating_point() else v
                  for k, v in load_tensors(RunsFolder(runs_root).theta0(arch)).items()}
        theta_t, theta_s = network.state_dict(), source_net.state_dict()
        tau_t = {n: theta_t[n].float() - theta0[n] for n in theta0 if theta0[n].is_floating_point()}
        tau_s = {n: theta_s[n].float() - theta0[n] for n in theta0 if theta0[n].is_floating_point()}
        bins = TimeBins.from_dict(manifest["bins"])
        test = []
        for pid in ids:
            time_, event = bags.label(pid)
            test.append(Bag(bags.bag(pid), bags.bag_inputs(pid, network.bag_inputs),
                            int(bins.to_bins(np.array([time_]))[0]), event))
        fn = merged_loss_fn(network, theta0, tau_s, tau_t, test, bags.loss_alpha, device,
                            progress=progress,
                            desc=f"landscape {target.cohort} fold{target.fold} x {source}")
        losses = evaluate_grid(fn, coefficients, batch=len(coefficients) ** 2)
        cached = {"losses": losses.tolist(), "n_patients": len(ids)}
        write_cached(path, key, cached)
    out = Landscape(target.cohort, source, target.fold, target.repeat, coefficients,
                    np.asarray(cached["losses"], dtype=np.float64), int(cached["n_patients"]))
    if steph_run is not None:
        out.path = lambda_path(runs_root, steph_run, source)
    return out


def steph_landscapes(runs_root: str | Path, data_root: str | Path, steph_run: RunRef,
                     sources: Sequence[str], step: float = GRID_STEP, device: str = "cpu",
                     progress: bool = False) -> list[Landscape]:
    """The landscapes of a STEPH run's target model (the network it merged, same fold) with
    each of ``sources``, with STEPH's lambda path on them."""
    from steph.analysis.runs import steph_arch, target_run

    target = target_run(steph_run, steph_arch(runs_root, steph_run))
    return [loss_landscape(runs_root, data_root, target, source, step=step, device=device,
                           progress=progress, steph_run=steph_run) for source in sources]


def landscape_summary(lands: Sequence[Landscape]) -> pd.DataFrame:
    """Per landscape (source): the lowest smoothed test loss and where (``c_s``, ``c_t``), the
    lowest on the mixup segment and its lambda, STEPH's final lambda and the target model's
    own loss at (0, 1), not smoothed."""
    rows = []
    for ls in lands:
        cs, ct, lo = ls.minimum()
        lam, lo_mix = ls.mixup_minimum()
        rows.append({"source": ls.source, "c_s": cs, "c_t": ct, "loss": lo,
                     "mixup_lambda": lam, "mixup_loss": lo_mix,
                     "steph_lambda": ls.path["lambda"].iloc[-1] if len(ls.path) else np.nan,
                     "target_loss": ls.losses[len(ls.coefficients) - 1, 0]})
    return pd.DataFrame(rows, columns=["source", "c_s", "c_t", "loss", "mixup_lambda",
                                       "mixup_loss", "steph_lambda", "target_loss"])
