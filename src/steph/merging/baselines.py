"""Model-merging baselines (method.md section 6): the merges and the modules that train them.

The recipes that make them methods of ``steph cv`` are in :mod:`steph.methods.model_merging`.

Every baseline uses the same model pool as STEPH (:class:`steph.merging.pool.ModelPool`): the
shared initialisation theta_0, the target's own fold-k model and the fold-0 model of every source
cohort, with task vectors ``tau_c = theta_c - theta_0``. Coefficients are always ordered as the
pool orders its models: ``[target, source_1, ..., source_m]``.

Methods (names as ``steph cv --methods`` knows them)
----------------------------------------------------
``model_avg``        no training: the plain average of the m + 1 models, over **all** tensors
                     (heads included), ``theta_0 + (tau_t + sum_i tau_i) / (m + 1)``.
``task_arithmetic``  no training (a sanity row): ``theta_0 + ta_coef (tau_t + sum_i tau_i)`` over
                     all tensors, heads included.
``adamerging``       ``theta_0 + c_t tau_t + sum_i c_i tau_i`` on the MIL encoder, one learnable
                     coefficient per task vector (task-wise) initialised at ``init_coef``, a fresh
                     head, trained with the survival loss on the target's training split.
``ties_am``          AdaMerging over sources preprocessed pairwise with the target by TIES.
``isoc_am``          AdaMerging over sources preprocessed pairwise with the target by Iso-C.
``isocts_am``        AdaMerging over sources preprocessed pairwise with the target by Iso-CTS.
``surgery_am``       AdaMerging plus Representation Surgery on the merged bag embedding.

Choices (method.md is silent on these; each is deliberate)
-----------------------------------------------------------
* **Heads in Model Avg / Task Arithmetic.** These two methods do not train, so nothing could
  replace the head: the head is merged like every other tensor (its own task vectors are
  ``head_c - head_0``). A fresh random head would make the merged model predict noise.
* **The target's task vector in AdaMerging** is one of the learned coefficients (method.md asks
  for it; the reference release leaves it open): coefficients ``[c_t, c_1, ..., c_m]``, all
  starting at ``init_coef`` (0.3), so the starting point is ``theta_0 + 0.3 (tau_t + sum tau_i)``.
* **Coefficients are unconstrained** real numbers (no clamping to [0, 1], no softmax): the
  reference release's ``MergedModel`` defaults to ``clamp_weights=False``. They are 1-d, hence
  without weight decay (the trainer decays matrices only), and trained with the shared protocol
  (AdamW, lr ``train.lr``, cosine schedule), like every other module of the project.
* **Fresh head**: Linear(hidden -> n_bins) drawn from U(-1/sqrt(hidden), 1/sqrt(hidden)) (PyTorch's
  default range for a Linear) with a generator seeded by the training seed, as STEPH's head;
  never copied from a model of the pool. The encoder's tensors are never trained (theta_0 and the
  task vectors are frozen buffers).
* **Preprocessed AdaMerging (TIES / Iso-C / Iso-CTS AM).** Each *source* vector is replaced by
  its pairwise merge with the target, ``preprocess_pairwise(tau_t, [tau_1..tau_m], method)``;
  the target's own row stays the raw ``tau_t``. Reasons: (1) the preprocessing is defined
  pairwise *with the target*, there is no "pair" for the target itself (``merge(tau_t, tau_t)``
  would only rescale or sparsify the target's own knowledge); (2) this is what the reference
  release does (it preprocesses only its list of source vectors); (3) it keeps every AdaMerging
  variant starting from the same target contribution ``0.3 tau_t``, so the rows differ only by
  how the sources are treated. TIES uses the module defaults of
  :func:`steph.merging.preprocess.ties_merge` (global ranking, disjoint *sum*) with density
  ``merge.ties_density``; Iso-CTS uses ``merge.iso_cts_fraction``.
* **Representation Surgery** (Yang et al., ICML 2024) on the merged model's bag embedding
  ``z`` (ABMIL: the 512-d attention-pooled vector that enters the head): ``z' = z - W_up ReLU(W_down z)``,
  W_down: Linear(hidden -> rank), W_up: Linear(rank -> hidden), rank ``merge.surgery_rank``.
  As in the Surgery paper's code: **no biases**, ``W_up = 0`` at the start (so training starts
  exactly at plain AdaMerging with the same head), ``W_down`` drawn like a PyTorch Linear
  (Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(hidden), 1/sqrt(hidden))) from the same
  seeded generator, after the head. Unlike the paper (frozen merge coefficients, an unsupervised
  L1 alignment of ``z'`` with the individual models' features, one surgery module per task),
  method.md trains the module **jointly** with the coefficients and the head with the survival
  loss: labels exist, and there is one task. No extra loss term. The matrices get the trainer's
  weight decay like every other matrix.
* **One merge per optimiser step.** The merged encoder depends only on the coefficients, which
  are constant within an optimiser step. ``begin_step()`` computes the merged flat vector once
  (no autograd); its named views, detached into leaf tensors that require grad (they share the
  flat vector's storage), are the encoder of every bag of the step, and accumulate
  ``d loss / d theta``; ``end_step()`` concatenates those gradients in the flat layout and adds
  ``d loss / d c = T (d loss / d theta)`` (one matrix-vector product with the stacked task
  vectors ``T``) to the coefficients' gradient. (Per-tensor leaves rather than one flat leaf:
  the backward pass of a view of a flat leaf materialises a full-length gradient per view and
  per bag, measurably slower.) This equals the per-bag autograd merge (the
  merge is linear in ``c``), which the module still uses in training mode when no step is open
  (e.g. outside the trainer). In eval mode the merged encoder is computed without autograd and
  cached while the coefficients and buffers do not change.
* **Any network.** The pool's network (``arch``, ABMIL by default; ``model.arch``) is merged:
  its class's ``ENCODER_PREFIXES`` say which tensors the coefficients merge, its ``head`` is
  the fresh head, the merged forward passes the bag's extra inputs (Patch-GCN's graph) to the
  network's ``embed``, and Surgery acts on whatever that ``embed`` returns (the vector that
  enters the head).
* **Export**: AdaMerging and its TIES / Iso-C / Iso-CTS variants become a plain network of the
  pool's architecture (merged encoder + trained head, artefact kind = the network's name, e.g.
  ``"abmil"``); Surgery AM becomes a :class:`SurgeryMIL` (artefact kind ``"mil_surgery"``): the merged
  network plus the surgery module.
  Neither needs theta_0, a task vector or a source checkpoint at inference.
* **Run configuration**: the trained methods record the ``train`` and ``merge`` sections; the two
  untrained ones record ``merge`` but not ``train`` (training settings cannot change them;
  those of their input models are recorded in the input runs).
* **Logged statistics**: every forward returns ``stats={"coef": c}`` (the coefficients, target
  first), so ``log.jsonl`` gets ``mean_coef`` per epoch (the mean over the epoch's bags).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from steph.errors import ConfigError
from steph.merging.networks import OverNetwork
from steph.merging.pool import ModelPool
from steph.merging.preprocess import preprocess_pairwise
from steph.merging.task_vectors import FlatLayout, TaskVectorStack, TensorDict
from steph.models.base import MILNetwork
from steph.models.module import ModelOutput, SurvivalModule
from steph.models.registry import create_model, register_artefact
from steph.utils.device import autocast_off

__all__ = [
    "AdaMerging",
    "RepresentationSurgery",
    "SurgeryMIL",
    "adamerging_stack",
    "merged_network",
    "model_average",
    "static_merge",
    "task_arithmetic",
]


# ------------------------------------------------------------------------------------------------
# no training: Model Avg and Task Arithmetic over all tensors (heads included)
# ------------------------------------------------------------------------------------------------

def static_merge(pool: ModelPool, coef: float | Sequence[float]) -> TensorDict:
    """``theta_0 + c_t tau_t + sum_i c_i tau_i`` over **every** tensor of the models (heads too).

    ``coef``: one number for all m + 1 task vectors, or one per vector (target first)."""
    stack = pool.stack(names=list(pool.theta0))  # rows [tau_t, tau_1..tau_m], all tensors
    n = stack.vectors.shape[0]
    c = torch.full((n,), float(coef)) if isinstance(coef, (int, float)) else \
        torch.as_tensor(list(coef), dtype=torch.float32)
    if c.shape != (n,):
        raise ConfigError(f"static_merge: {n} task vectors but {c.numel()} coefficients")
    return {k: v.clone() for k, v in stack.merged_dict(c).items()}


def model_average(pool: ModelPool) -> TensorDict:
    """The plain average of the target and the m sources: ``theta_0 + sum(tau) / (m + 1)``."""
    return static_merge(pool, 1.0 / (len(pool.sources) + 1))


def task_arithmetic(pool: ModelPool, coef: float = 0.3) -> TensorDict:
    """``theta_0 + coef (tau_t + sum_i tau_i)`` over all tensors."""
    return static_merge(pool, coef)


def merged_network(state: Mapping[str, torch.Tensor], hparams: dict[str, Any],
                   arch: str = "abmil") -> MILNetwork:
    """A network ``arch`` holding the merged tensors ``state``."""
    model = create_model(arch, **hparams)
    model.load_state_dict(dict(state))
    return model


# ------------------------------------------------------------------------------------------------
# Representation Surgery and its artefact
# ------------------------------------------------------------------------------------------------

class RepresentationSurgery(nn.Module):
    """``z' = z - W_up ReLU(W_down z)`` (Yang et al., ICML 2024); bias-free, W_up = 0 at start."""

    def __init__(self, dim: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ConfigError(f"surgery rank must be >= 1, got {rank}")
        self.dim, self.rank = int(dim), int(rank)
        self.down = nn.Linear(self.dim, self.rank, bias=False)
        self.up = nn.Linear(self.rank, self.dim, bias=False)
        with torch.no_grad():
            bound = 1.0 / self.dim ** 0.5  # kaiming_uniform(a=sqrt(5)) of a Linear
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.up.weight.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.up(F.relu(self.down(z)))


class SurgeryMIL(OverNetwork):
    """A (merged) MIL network whose bag embedding passes Representation Surgery before the
    head."""

    def __init__(self, hparams: dict[str, Any], rank: int, arch: str = "abmil"):
        super().__init__()
        self.attach_network(arch, hparams)
        self.surgery = RepresentationSurgery(self.network.head.in_features, rank)

    def forward(self, x: torch.Tensor, **bag_inputs: torch.Tensor) -> torch.Tensor:
        z, _ = self.network.embed(x, **bag_inputs)
        return self.network.head(self.surgery(z))

    kind = "mil_surgery"  # its artefact kind, whatever the network

    def settings(self) -> dict[str, Any]:
        return {"arch": self.arch, "network": self.network.hparams(), "rank": self.surgery.rank}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> SurgeryMIL:
        return cls(settings["network"], int(settings["rank"]), settings["arch"])


register_artefact(SurgeryMIL.kind)(SurgeryMIL.from_settings)


# ------------------------------------------------------------------------------------------------
# AdaMerging (and the preprocessed / surgery variants)
# ------------------------------------------------------------------------------------------------

def adamerging_stack(pool: ModelPool, preprocessing: str = "none",
                     **options: Any) -> TaskVectorStack:
    """Rows ``[tau_t, tau'_1, ..., tau'_m]`` of the MIL encoder, where ``tau'_i`` is the source
    task vector preprocessed pairwise with the target (``"ties"``, ``"iso_c"``, ``"iso_cts"``)
    or the raw one (``"none"``); the target's row is always the raw ``tau_t``."""
    names = pool.encoder_names
    tau_t, taus = pool.task_vectors(names)
    if preprocessing != "none":
        taus = preprocess_pairwise(tau_t, taus, preprocessing, **options)
    elif options:
        raise ConfigError(f"preprocessing 'none' takes no option, got {sorted(options)}")
    theta0 = {n: pool.theta0[n] for n in names}
    labels = [pool.target_name, *pool.source_names]
    return TaskVectorStack.from_dicts(theta0, [tau_t, *taus], labels, names)


class AdaMerging(OverNetwork):
    """Task-wise AdaMerging on the MIL encoder of network ``arch`` with a fresh head (and
    optional surgery).

    ``theta = theta_0 + sum_j c_j T_j`` with rows ``T = [tau_t, tau_1, ..., tau_m]`` (possibly
    preprocessed, see :func:`adamerging_stack`), ``c`` learnable, all ``init_coef`` at start.
    Trainable: ``coef``, the head and, with ``surgery_rank``, the surgery module. Frozen buffers:
    ``theta0_flat`` and ``tau``. See the module docstring for the one-merge-per-step scheme.
    """

    def __init__(self, stack: TaskVectorStack, hparams: dict[str, Any],
                 init_coef: float = 0.3, head_seed: int = 0, surgery_rank: int | None = None,
                 head_bias: torch.Tensor | None = None, coef_lr_scale: float = 1.0,
                 arch: str = "abmil"):
        super().__init__()
        # read by the trainer's parameter groups: the coefficients' own learning-rate factor
        self.lr_scales = {"coef": float(coef_lr_scale)} if coef_lr_scale != 1.0 else {}
        if stack.vectors.shape[0] < 1:
            raise ConfigError("AdaMerging needs at least one task vector")
        self.layout: FlatLayout = stack.layout
        self.labels = list(stack.labels)
        self.register_buffer("theta0_flat", stack.base.detach().float().clone())
        self.register_buffer("tau", stack.vectors.detach().float().clone())  # (T, P)
        self.coef = nn.Parameter(torch.full((len(self.labels),), float(init_coef)))

        g = torch.Generator().manual_seed(int(head_seed))  # fresh head, not copied
        try:  # the module is complete on its own: the encoder holds theta_0
            self.attach_network(arch, hparams, frozen=(self.layout, self.theta0_flat),
                                head_generator=g, head_bias=head_bias)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # surgery draws from g after the head
        self.surgery = (RepresentationSurgery(self.network.head.in_features, int(surgery_rank),
                                              generator=g)
                        if surgery_rank is not None else None)
        self._step_params: TensorDict | None = None
        self._step_coef_version: int | None = None
        self._eval_cache: tuple[tuple, torch.Tensor, TensorDict] | None = None

    # -- merging ----------------------------------------------------------------------------------
    def merged_flat(self, coef: torch.Tensor | None = None) -> torch.Tensor:
        """Flat ``theta_0 + coef @ tau`` (autograd to ``coef`` unless under no_grad), float32
        even inside an autocast region (the coefficients and the merge are never rounded)."""
        coef = self.coef if coef is None else coef
        with autocast_off(coef):
            return torch.addmv(self.theta0_flat, self.tau.t(), coef)

    @torch.no_grad()
    def merged_encoder(self) -> TensorDict:
        """The merged encoder tensors at the current coefficients (copies, no autograd)."""
        return {k: v.clone() for k, v in self.layout.unflatten(self.merged_flat()).items()}

    def begin_step(self) -> None:
        """Merge once for the optimiser step that starts (training mode only).

        The merged flat vector is computed without autograd; its named views are detached into
        leaf tensors (sharing its storage) that require grad, so each bag's backward pass
        accumulates ``d loss / d theta`` per tensor (no full-length gradient buffer per bag)."""
        self._step_params = self._step_coef_version = None
        if not self.training:
            return
        with torch.no_grad():
            flat = self.merged_flat()
        self._step_params = {k: v.detach().requires_grad_(True)
                             for k, v in self.layout.unflatten(flat).items()}
        self._step_coef_version = self.coef._version

    def end_step(self) -> None:
        """Push the step's accumulated ``d loss / d theta`` to the coefficients: ``T @ grad``."""
        params = self._step_params
        self._step_params = self._step_coef_version = None
        if params is None or all(p.grad is None for p in params.values()):
            return
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params.values()])  # layout order = the flat vector's order
        g = torch.mv(self.tau, grad)
        if self.coef.grad is None:
            self.coef.grad = g
        else:
            self.coef.grad.add_(g)

    def _eval_params(self) -> TensorDict:
        key = (self.theta0_flat.data_ptr(), self.theta0_flat._version, self.tau.data_ptr(),
               self.tau._version, self.coef.data_ptr(), self.coef._version)
        cache = self._eval_cache
        if cache is None or cache[0] != key or not torch.equal(cache[1], self.coef.detach()):
            with torch.no_grad():
                params = self.layout.unflatten(self.merged_flat())
            cache = (key, self.coef.detach().clone(), params)
            self._eval_cache = cache
        return cache[2]

    def _params(self) -> TensorDict:
        if not self.training:
            return self._eval_params()
        if self._step_params is not None:
            if self.coef._version != self._step_coef_version:
                raise RuntimeError("AdaMerging: the coefficients changed inside an optimiser step "
                                   "(between begin_step() and end_step())")
            return self._step_params
        return self.layout.unflatten(self.merged_flat())  # per-bag merge through autograd

    # -- forward ----------------------------------------------------------------------------------
    def embedding(self, x: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None,
                  **bag_inputs: torch.Tensor) -> torch.Tensor:
        """Bag embedding (1, d) of the merged encoder, after surgery when there is one."""
        params = self._params() if params is None else params
        z = self.merged_embedding(x, dict(params), bag_inputs)
        return self.surgery(z) if self.surgery is not None else z

    def forward(self, x: torch.Tensor, **bag_inputs: torch.Tensor) -> ModelOutput:
        logits = self.network.head(self.embedding(x, **bag_inputs))
        return ModelOutput(logits=logits, stats={"coef": self.coef.detach()})

    def head_input(self, x: torch.Tensor, **bag_inputs: torch.Tensor) -> torch.Tensor:
        return self.embedding(x, **bag_inputs)

    # -- export -----------------------------------------------------------------------------------
    def coefficients(self) -> dict[str, float]:
        return {name: float(c) for name, c in zip(self.labels, self.coef.detach())}

    @torch.no_grad()
    def export(self) -> nn.Module:
        """A plain network (merged encoder + trained head), or a :class:`SurgeryMIL`; eval
        mode."""
        state = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        state.update(self.merged_encoder())
        net = merged_network(state, self.network.hparams(), self.arch)
        if self.surgery is None:
            return net.eval()
        out = SurgeryMIL(self.network.hparams(), self.surgery.rank, self.arch)
        out.network.load_state_dict(net.state_dict())
        out.surgery.load_state_dict(self.surgery.state_dict())
        return out.eval()

    @property
    def export_kind(self) -> str:
        """Artefact kind of :meth:`export`'s module."""
        return self.arch if self.surgery is None else SurgeryMIL.kind

    def export_settings(self) -> dict[str, Any]:
        """Settings of the exported artefact (what its builder takes)."""
        if self.surgery is None:
            return self.network.hparams()
        settings = {"arch": self.arch, "network": self.network.hparams(),
                    "rank": self.surgery.rank}
        return {**settings, "coefficients": self.coefficients()}  # the last key: informative


