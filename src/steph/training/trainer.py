"""The training loop shared by cancer-specific ABMIL, STEPH and every merging baseline.

Protocol (method.md section 4): AdamW with weight decay on matrices only, linear warm-up for
``warmup_epochs`` then cosine decay to zero (stepped per optimiser step), one bag per forward
pass and ``bags_per_step`` bags per optimiser step (loss averaged over them, incomplete remainder
of an epoch dropped), seeded shuffling, the last epoch evaluated.

Resumption: at the end of every epoch the trainable parameters, the optimiser state, the
scheduler position, the RNG state, the epoch history and the thread count are written to one
safetensors file atomically, with a checksum of its tensors; the checkpoint it replaces is kept
as ``checkpoint.prev.safetensors`` until the last epoch is written. Restarting with the same
arguments continues after the last completed epoch and ends with the same weights as an
uninterrupted run. A damaged or truncated checkpoint is reported in the log and the run goes on
from the previous one, or from scratch when neither is usable.

Reproducibility: at the start, :func:`steph.utils.reproducibility.configure` pins the thread
count (``train.threads``, else the one recorded in the checkpoint, else torch's current one) and,
with ``train.deterministic``, switches on the deterministic algorithms; what was in effect is
returned in ``TrainResult.extra["reproducibility"]``.

The module is a :class:`steph.models.SurvivalModule` (checked at the start): it sees one bag at
a time, ``module(features, **extras)``, where ``extras`` are the per-bag inputs it names in its
``bag_inputs`` (e.g. a graph), taken from the dataset item; its hooks ``begin_step()`` /
``end_step()`` are called before the first bag of an optimiser step and after its last backward
pass (before ``optimizer.step()``; merging baselines whose merged weights are constant within a
step merge once per step), ``on_epoch_start(epoch)`` (0-based) before each epoch, on resume too.
The caller's ``on_epoch_end(row)`` runs after each epoch's checkpoint and log are written (and,
on resume, for the last epoch done): it may raise :class:`TrainingRestart` to ask for a fresh
start with other settings (e.g. STEPH's collapse guard, in its recipe).

Device and precision (``train.device``, ``train.precision``): the module is moved to the device
once (the device contract of docs/architecture.md); bags come through
:class:`steph.data.loader.BagLoader` (worker processes, float16 until the device); the forward
pass runs under autocast for bf16 / fp16, the loss in float32, with a gradient scaler for fp16.
Per-bag losses, risks and module statistics stay on the device and are copied to the host once
per epoch, for the log row (which names the device). Checkpoints hold CPU tensors, the RNG
state of the device and the scaler's state, so a run resumes on another device.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from steph.config import TrainConfig
from steph.data.loader import BagLoader
from steph.errors import CorruptFileError, RunError
from steph.models.module import ModelOutput, SurvivalModule, check_module, forward_item
from steph.runs import RunDir
from steph.survival.loss import nll_survival_loss
from steph.survival.metrics import concordance_index_or_nan
from steph.survival.risk import risk_from_logits, survival_from_logits
from steph.training.head_start import initialize_head
from steph.utils import reproducibility
from steph.utils.device import (
    autocast,
    check_precision,
    device_label,
    grad_scaler,
    resolve_device,
    rng_state,
    set_rng_state,
)
from steph.utils.faults import fault_point
from steph.utils.io import (
    load_tensor_metadata,
    read_safetensors,
    remove_temporaries,
    save_tensors,
    write_text,
)

log = logging.getLogger("steph.training")

CHECKPOINT_FORMAT = "steph-checkpoint/1"
_CPU = torch.device("cpu")


class TrainingRestart(Exception):
    """Raised by a run's ``on_epoch_end(row)`` callback to ask for the run to start again from
    scratch with other settings (``overrides``: dotted config keys, e.g. ``{"steph.gamma":
    0.01}``); the trainer has already written that epoch's log. The experiment records the
    attempt and restarts (``steph.experiments.runner``)."""

    def __init__(self, reason: str, overrides: dict[str, object]):
        super().__init__(reason)
        self.reason = reason
        self.overrides = dict(overrides)


def parameter_groups(model: SurvivalModule, weight_decay: float,
                     lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (ndim >= 2) only, never on biases or 1-d parameters.

    Parameters the module names in ``lr_scales``, ``{name prefix: factor}`` (e.g.
    AdaMerging's merge coefficients), get groups of their own with ``lr * factor``."""
    scales = dict(model.lr_scales)
    grouped: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            factor = next((f for prefix, f in scales.items() if name.startswith(prefix)), 1.0)
            grouped.setdefault((p.ndim >= 2, float(factor)), []).append(p)
    groups = []
    for decays, factor in sorted(grouped, key=lambda k: (k[1] != 1.0, not k[0], k[1])):
        group = {"params": grouped[(decays, factor)], "weight_decay": weight_decay if decays else 0.0}
        if factor != 1.0:
            if lr is None:
                raise ValueError("parameter_groups: lr_scales need the base learning rate")
            group["lr"] = lr * factor
        groups.append(group)
    if not groups:
        raise RunError("the model has no trainable parameter")
    return groups


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier for optimiser step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    resumed_from: int  # epochs already done when this call started (0 = fresh)
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def _epoch_permutation(seed: int, epoch: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def _to_float(t: torch.Tensor) -> Any:
    t = t.detach().float().cpu()
    return t.item() if t.numel() == 1 else t.reshape(-1).tolist()


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int,
                     step: int, history: list[dict[str, Any]], *, threads: int | None = None,
                     final: bool = False, device: torch.device = _CPU,
                     scaler: torch.amp.GradScaler | None = None) -> None:
    """Write the checkpoint of a completed epoch; the one it replaces becomes
    ``checkpoint.prev.safetensors`` (removed after the `final` epoch). An I/O error leaves
    both files as they were and raises a RunError naming the file. Tensors are saved on the
    CPU (save_tensors), with the RNG state of ``device`` and an fp16 ``scaler``'s state, so a
    checkpoint resumes on any device."""
    tensors = {f"model.{k}": v for k, v in _trainable_state(model).items()}
    state = opt.state_dict()
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"opt.{pid}.{key}"] = value
    tensors.update(rng_state(device))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "epoch": str(epoch),
        "step": str(step),
        "param_groups": json.dumps(state["param_groups"]),
        "history": json.dumps(history),
    }
    if threads is not None:
        meta["threads"] = str(threads)
    if scaler is not None and scaler.is_enabled():
        meta["grad_scaler"] = json.dumps(scaler.state_dict())
    prev = path.with_name(RunDir.CHECKPOINT_PREV)
    save_tensors(path, tensors, metadata=meta, backup=prev)
    if final:
        prev.unlink(missing_ok=True)


@dataclass
class _Checkpoint:
    path: Path
    epoch: int
    step: int
    history: list[dict[str, Any]]
    param_groups: list[dict[str, Any]]
    tensors: dict[str, torch.Tensor]
    grad_scaler: dict[str, Any] | None = None  # an fp16 run's GradScaler state


def _read_checkpoint(path: Path) -> _Checkpoint:
    """A checkpoint read and checked (checksum, metadata), not yet applied; CorruptFileError
    naming the file and what is wrong when it is damaged."""
    tensors, meta = read_safetensors(path)
    try:
        epoch, step = int(meta["epoch"]), int(meta["step"])
        history = json.loads(meta["history"])
        groups = json.loads(meta["param_groups"])
        if epoch < 0 or step < 0 or not isinstance(history, list) or len(history) != epoch:
            raise ValueError(f"epoch {epoch} with {len(history)} history rows")
        if not isinstance(groups, list) or "rng.torch" not in tensors:
            raise ValueError("no optimiser groups or RNG state")
        scaler = json.loads(meta["grad_scaler"]) if "grad_scaler" in meta else None
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptFileError(f"{path}: damaged checkpoint metadata ({type(e).__name__}: {e})"
                               ) from None
    return _Checkpoint(path, epoch, step, history, groups, tensors, scaler)


def _apply_checkpoint(ckpt: _Checkpoint, model: nn.Module, opt: torch.optim.Optimizer,
                      device: torch.device = _CPU, scaler: torch.amp.GradScaler | None = None,
                      seed: int = 0) -> None:
    """Load a checked checkpoint into the model, the optimiser, torch's RNG (``device``'s
    too) and an fp16 ``scaler``, wherever their tensors live (the optimiser moves its state to
    its parameters' device). A checkpoint of another model (other settings) is a RunError, not
    damage."""
    path, tensors = ckpt.path, ckpt.tensors
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.startswith("model."):
            name = key[len("model."):]
            if name not in params:
                raise RunError(f"{path}: checkpoint holds {name!r}, which the model does not have")
            if params[name].shape != value.shape:
                raise RunError(f"{path}: checkpoint holds {name!r} of shape {tuple(value.shape)}, "
                               f"the model's is {tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(value)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    try:
        opt.load_state_dict({"state": opt_state, "param_groups": ckpt.param_groups})
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: the optimiser state does not fit this model ({e})") from None
    set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, device,
                  fallback_seed=int(seed) * 100_003 + ckpt.epoch)
    if scaler is not None and scaler.is_enabled() and ckpt.grad_scaler is not None:
        scaler.load_state_dict(ckpt.grad_scaler)


def _load_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     desc: str = "train", device: torch.device = _CPU,
                     scaler: torch.amp.GradScaler | None = None,
                     seed: int = 0) -> _Checkpoint | None:
    """Resume from the newest usable checkpoint of `run_dir` (the current one, else the
    previous one); None to start from scratch. A damaged checkpoint is removed and reported
    with a warning naming the file and what is wrong."""
    current, prev = RunDir(run_dir).checkpoint, RunDir(run_dir).checkpoint_prev
    if not current.exists() and prev.exists():
        log.warning("%s: %s is missing (the run stopped while replacing it); trying %s", desc,
                    current, prev.name)
    for path in (current, prev):
        if not path.exists():
            continue
        try:
            ckpt = _read_checkpoint(path)
        except CorruptFileError as e:
            fallback = ("trying the previous checkpoint" if path == current and prev.exists()
                        else "starting from scratch")
            log.warning("%s: unusable checkpoint, removed, %s: %s", desc, fallback, e)
            path.unlink(missing_ok=True)
            continue
        _apply_checkpoint(ckpt, model, opt, device, scaler, seed)
        if path == prev:
            log.warning("%s: resuming from the previous checkpoint %s (after epoch %d)", desc,
                        path, ckpt.epoch)
        return ckpt
    return None


def _start(cfg: TrainConfig, run_dir: Path, desc: str) -> dict[str, Any]:
    """Pin the thread count (resumed runs keep their recorded one) and the determinism
    switches; remove temporary files left by a killed process; return what is in effect."""
    remove_temporaries(run_dir)
    threads = cfg.threads
    for path in (RunDir(run_dir).checkpoint, RunDir(run_dir).checkpoint_prev):
        if path.exists():
            try:
                recorded = int(load_tensor_metadata(path).get("threads", 0))
            except (RunError, ValueError):
                continue  # damaged: reported when the checkpoint is loaded
            if recorded and threads is None:
                threads = recorded
            elif recorded and threads != recorded and cfg.deterministic:
                log.warning("%s: resuming with %d threads where the run started with %d: the "
                            "result may differ from an uninterrupted run in the last bits",
                            desc, threads, recorded)
            break
    info = reproducibility.configure(cfg.deterministic, threads)
    log.info("%s: %d thread(s), %s, MKL reproducible mode %s", desc, info["threads"],
             "deterministic" if info["deterministic"] else "not deterministic",
             info["mkl_cbwr"] or "n/a")
    return info


def model_device(model: nn.Module) -> torch.device:
    """Where a module's tensors are (the first parameter's or buffer's device; CPU if none)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return _CPU


def _as_device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    if device is None:
        return model_device(model)
    return device if isinstance(device, torch.device) else resolve_device(device)


@torch.no_grad()
def predict(model: nn.Module, dataset: Sequence[dict[str, Any]],
            loss_alpha: float | None = None, *, device: torch.device | str | None = None,
            precision: str = "fp32", workers: int | None = 0,
            loader: BagLoader | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Risk and survival curve of every bag, in eval mode, in one pass.

    Returns a frame (patient_id, risk, time, event[, loss]) and the survival curves (n, bins);
    the per-bag survival loss is added when ``loss_alpha`` is given. ``device``: where to
    compute (the model is moved there; default: where it is); ``precision``: autocast of the
    forward pass (risks and curves in float32); ``workers``: processes reading the bags
    (:mod:`steph.data.loader`), or ``loader``, an open :class:`BagLoader` over ``dataset``.
    Values come back to the host once, at the end.
    """
    device = _as_device(device, model)
    amp_dtype = check_precision(device, precision)
    model.to(device)
    model.eval()
    own = loader is None
    if own:
        loader = BagLoader(dataset, workers=workers, device=device,
                           dtype=amp_dtype or torch.float32, persistent=False)
    rows, risks, curves, losses = [], [], [], []
    try:
        for item in loader:
            with autocast(device, amp_dtype):
                logits = forward_item(model, item).logits
            logits = logits.float()
            rows.append({"patient_id": item["patient_id"], "time": float(item["time"]),
                         "event": int(item["event"])})
            risks.append(risk_from_logits(logits)[0])
            curves.append(survival_from_logits(logits)[0])
            if loss_alpha is not None:
                event = torch.tensor([int(item["event"])], device=device)
                losses.append(nll_survival_loss(logits, item["bin"].view(1), event,
                                                alpha=loss_alpha))
    finally:
        if own:
            loader.close()
    frame = pd.DataFrame(rows, columns=["patient_id", "time", "event"])
    frame.insert(1, "risk", _host(risks))
    if loss_alpha is not None:
        frame["loss"] = _host(losses)
    return frame, torch.stack(curves).cpu().numpy() if curves else np.zeros((0, 0))


def _host(values: list[torch.Tensor]) -> list[float]:
    """Device scalars as Python floats, in one copy."""
    return torch.stack(values).reshape(-1).cpu().tolist() if values else []


def evaluate(model: nn.Module, dataset: Sequence[dict[str, Any]], loss_alpha: float,
             **predict_options: Any) -> dict[str, float]:
    """C-index and mean survival loss on ``dataset`` (eval mode; options of :func:`predict`)."""
    frame, _ = predict(model, dataset, loss_alpha=loss_alpha, **predict_options)
    return {"cindex": concordance_index_or_nan(frame["time"], frame["event"], frame["risk"]),
            "loss": float(frame["loss"].mean()) if len(frame) else float("nan")}


@dataclass
class _EpochTotals:
    """Per-bag values of one epoch, kept on the device until the epoch's log row."""

    surv: list[torch.Tensor] = field(default_factory=list)
    aux: list[torch.Tensor] = field(default_factory=list)
    risk: list[torch.Tensor] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, item: dict[str, Any], surv: torch.Tensor, out: ModelOutput,
            logits: torch.Tensor) -> None:
        self.surv.append(surv.detach())
        if out.aux_loss is not None:
            self.aux.append(out.aux_loss.detach().float())
        self.risk.append(risk_from_logits(logits.detach())[0])
        self.times.append(float(item["time"]))
        self.events.append(int(item["event"]))
        for k, v in out.stats.items():
            v = v.detach().float()
            self.stats[k] = self.stats[k] + v if k in self.stats else v.clone()

    def row(self) -> dict[str, Any]:
        """The epoch's training columns of the log (the one copy to the host)."""
        surv = _host(self.surv)
        row: dict[str, Any] = {
            "train_loss": float(np.mean(surv)),
            "train_cindex": concordance_index_or_nan(self.times, self.events, _host(self.risk)),
        }
        if self.aux:
            row["train_aux_loss"] = float(np.mean(_host(self.aux)))
        for k, v in self.stats.items():
            row[f"mean_{k}"] = _to_float(v / len(surv))
        return row



def describe_head_start(info: dict[str, Any]) -> str:
    """The head start's facts on one short line (the full dict is logged at DEBUG): the ridge
    chosen, its inner-CV C-index, the noise ratio and whether the head was refitted."""
    parts = []
    if "head_ridge" in info:
        cv = info.get("head_cv_cindex") or {}
        best = cv.get(str(info["head_ridge"]))
        text = f"ridge {info['head_ridge']:g}"
        if isinstance(best, float) and math.isfinite(best):
            text += f" (inner-CV C-index {best:.3f}, best of {len(cv)})"
        parts.append(text)
    if "head_noise_ratio" in info:
        parts.append(f"noise ratio {info['head_noise_ratio']:.2f}")
    if "head_fit_on" in info:
        parts.append(f"refitted on the {info['head_fit_on']}")
    return ", ".join(parts) or ", ".join(f"{k} {v}" for k, v in info.items())

def fit(
    model: SurvivalModule,
    train: Sequence[dict[str, Any]],
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    test: Sequence[dict[str, Any]] | None = None,
    progress: bool = True,
    desc: str = "train",
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    workers: int | None = 0,
    prefetch: int = 2,
) -> TrainResult:
    """Train ``model`` in place on ``train`` (a sequence of bag items) with the protocol above.

    Writes ``checkpoint.safetensors`` and ``log.jsonl`` into ``run_dir``; resumes from the
    checkpoint when one exists. The caller writes the final weights and metrics.

    The model is moved to ``cfg.device`` and stays there; bags are read by ``workers``
    processes, ``prefetch`` bags ahead each (:mod:`steph.data.loader`; 0 = in this process,
    None = the default count), and moved to the device, where the forward pass runs under
    ``cfg.precision``'s autocast. The survival loss and the logged values are float32; per-bag
    values stay on the device and reach the host once per epoch, for the log row.
    """
    from tqdm.auto import tqdm

    check_module(model)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = RunDir(run_dir)
    repro = _start(cfg, run_dir, desc)
    device = resolve_device(cfg.device)
    amp_dtype = check_precision(device, cfg.precision)
    n = len(train)
    steps_per_epoch = n // cfg.bags_per_step
    if steps_per_epoch == 0:
        raise RunError(
            f"{desc}: {n} training bags is fewer than one optimiser step of "
            f"{cfg.bags_per_step} bags; lower train.bags_per_step"
        )
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = steps_per_epoch * cfg.warmup_epochs
    if device.type == "cuda":
        torch.cuda.set_device(device)  # cuda:N: its stream, allocator and pinned memory
    model.to(device)
    opt = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay, cfg.lr), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, warmup_steps, total_steps)
    )
    scaler = grad_scaler(device, cfg.precision)
    loaders: dict[str, Any] = {"workers": workers, "device": device,
                               "dtype": amp_dtype or torch.float32, "prefetch": prefetch}
    train_loader = BagLoader(train, **loaders)
    test_loader = BagLoader(test, **loaders) if test is not None and len(test) else None
    try:
        ckpt = run.checkpoint
        history: list[dict[str, Any]] = []
        start_epoch, step = 0, 0
        resumed = _load_checkpoint(run_dir, model, opt, desc, device, scaler, cfg.seed)
        if resumed is not None:
            start_epoch, step, history = resumed.epoch, resumed.step, resumed.history
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: cosine_with_warmup(s, warmup_steps, total_steps), last_epoch=step - 1
            )
            # the log as of the checkpoint: a process killed between the two writes left it an
            # epoch short (after the last epoch nothing would write it again)
            run.write_log(history)
            log.info("%s: resuming after epoch %d", desc, start_epoch)
        else:
            torch.manual_seed(cfg.seed)  # dropout; shuffling has its own generator per epoch
            with autocast(device, amp_dtype):
                head_info = initialize_head(model, train, cfg.head_init, cfg.loss_alpha,
                                            seed=cfg.seed, items=lambda: iter(train_loader))
            if head_info:
                log.info("%s: head start %s: %s", desc, cfg.head_init,
                         describe_head_start(head_info))
                log.debug("%s: head start %s: %s", desc, cfg.head_init, head_info)
        if history and on_epoch_end is not None:
            on_epoch_end(history[-1])  # a process killed between the check and its effect
        t0 = time.perf_counter()
        bar = tqdm(range(start_epoch, cfg.epochs), desc=desc, unit="epoch", disable=None if progress else True,
                   initial=start_epoch, total=cfg.epochs, leave=False)
        for epoch in bar:
            model.train()
            model.on_epoch_start(epoch)
            t_epoch = time.perf_counter()
            order = _epoch_permutation(cfg.seed, epoch, n)[: steps_per_epoch * cfg.bags_per_step]
            items = train_loader.iterate(order)
            totals = _EpochTotals()
            for _ in range(steps_per_epoch):
                opt.zero_grad(set_to_none=True)
                model.begin_step()
                for _ in range(cfg.bags_per_step):
                    item = next(items)
                    with autocast(device, amp_dtype):
                        out: ModelOutput = forward_item(model, item)
                    logits = out.logits.float()
                    event = torch.tensor([int(item["event"])], device=device)
                    surv = nll_survival_loss(logits, item["bin"].view(1), event, alpha=cfg.loss_alpha)
                    loss = surv if out.aux_loss is None else surv + out.aux_loss.float()
                    scaler.scale(loss / cfg.bags_per_step).backward()
                    totals.add(item, surv, out, logits)
                    fault_point("train:bag")
                model.end_step()
                scaler.step(opt)  # opt.step() unless fp16 (unscaled, skipped on inf / NaN)
                scaler.update()
                sched.step()
                step += 1
                fault_point("train:step")
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **totals.row()}
            last = epoch + 1 == cfg.epochs
            if test_loader is not None and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
                ev = evaluate(model, test_loader.data, cfg.loss_alpha, device=device,
                              precision=cfg.precision, loader=test_loader)
                row["test_cindex"], row["test_loss"] = ev["cindex"], ev["loss"]
            row["seconds"] = round(time.perf_counter() - t_epoch, 3)
            row["device"] = device_label(device)
            history.append(row)
            _save_checkpoint(ckpt, model, opt, epoch + 1, step, history, threads=repro["threads"],
                             final=epoch + 1 == cfg.epochs, device=device, scaler=scaler)
            run.write_log(history)
            fault_point("train:epoch")
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", c=f"{row.get('test_cindex', float('nan')):.3f}")
            if bar.disable and progress:  # no terminal (a cluster log): one line per epoch instead
                log.info("%s epoch %d/%d: loss %.4f, train C %.4f, test C %s (%.1f s, %s)", desc,
                         epoch + 1, cfg.epochs, row["train_loss"], row["train_cindex"],
                         f"{row['test_cindex']:.4f}" if "test_cindex" in row else "-",
                         row["seconds"], row["device"])
            if on_epoch_end is not None:  # may raise TrainingRestart (after the log is written)
                on_epoch_end(row)
        bar.close()
        return TrainResult(history=history, resumed_from=start_epoch,
                           seconds=time.perf_counter() - t0, extra={"reproducibility": repro})
    finally:
        train_loader.close()
        if test_loader is not None:
            test_loader.close()
