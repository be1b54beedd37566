"""STEPH: sparse task-vector mixup with hypernetworks (method.md section 5).

For a bag X, with target task vector tau_t and source task vectors tau_1..tau_m (MIL encoder):

    z        = mean_n ReLU(W_e x_n + b_e)                  shared bag embedding
    w        = ReLU(H_agg(z))          (m,)  >= 0           merge weights
    lambda   = 1 / (1 + ReLU(H_mix(z)))  (m,) in (0, 1]     mixup coefficients (1 = pure target)
    S        = indices of the K largest w
    theta(X) = theta_0 + sum_{i in S} w_i (lambda_i tau_t + (1 - lambda_i) tau_i)
    logits   = head(encoder(X; theta(X)))                  fresh head, trained
    loss     = L_surv + gamma L_agg + beta L_mix
    L_agg    = (logsumexp_i w_i)^2 + (1/K) sum_{i in S} w_i
    L_mix    = mean_{i in S} lambda_i^2

The merge is one matrix-vector product over the stacked task vectors: the coefficient of tau_t
is ``sum_{i in S} w_i lambda_i`` and that of tau_i is ``w_i (1 - lambda_i)`` for i in S, 0
otherwise. theta_0 and all task vectors are frozen buffers; the bag embedding, H_agg, H_mix and
the head are trained.

Ablations (Table S5 / S3): ``mixing="none"`` (lambda = 1), ``mixing="free"`` (lambda a learned
vector), ``aggregation="free"`` (w a learned vector), any ``top_k`` (K >= m: no sparsity).

Cross-fitted target task vectors (``inner_tau``, config ``steph.crossfit``, a departure that is
off by default; docs/method-notes.md): tau_t is the target's fold model, trained on exactly the
patients STEPH trains on, so STEPH's training loss sees a target encoder that has memorised
them and every source as a step away from a perfect fit. With J inner target models (each
trained from theta_0 on the training patients minus one inner fold; rows of the buffer
``tau_inner``), every training bag carries the per-bag input ``tau_row``, the inner model that
never saw it, and its merge uses that row in place of tau_t; a bag with ``tau_row`` < 0 (a test
bag) uses tau_t. :meth:`STEPH.without_crossfit` drops the inner rows after training: the
exported module is a plain STEPH (with ``crossfit_test: mean`` its tau_t the inner rows' mean).

Any registered MIL network can be merged (``arch``; ABMIL by default): the task vectors cover
the tensors its class declares as the encoder (``ENCODER_PREFIXES``), the merged forward runs
the network's ``embed`` through ``torch.func.functional_call`` with the merged tensors and the
bag's extra inputs (Patch-GCN's ``edge_index``), and the fresh head is the network's ``head``.
The hypernetworks always read the bag embedding of the raw features (above), whatever the
network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from steph.config import StephConfig, without_added_defaults
from steph.merging.networks import OverNetwork
from steph.merging.task_vectors import FlatLayout, TaskVectorStack, TensorDict
from steph.models.base import DEFAULT_CHUNK_SIZE, MILNetwork
from steph.models.module import ModelOutput
from steph.models.registry import register_artefact
from steph.utils.device import autocast_off

# The per-bag input naming the inner target model of a training bag (cross-fitting; < 0: tau_t).
CROSSFIT_INPUT = "tau_row"

# A free lambda starts just below 1: lambda = 1 / (1 + exp(rho)), rho = -6 -> 0.9975. Exactly 1
# would sit where ReLU-type parametrisations have no gradient.
_FREE_RHO_INIT = -6.0


def hypernet(dim: int, n_out: int, dropout: float) -> nn.Sequential:
    """Linear(dim->dim) + ReLU + Dropout + Linear(dim->n_out); the caller applies the final ReLU."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, n_out))


@dataclass
class MergeExplanation:
    """What STEPH did for one bag."""

    w: torch.Tensor  # (m,) merge weights
    lam: torch.Tensor  # (m,) mixup coefficients
    selected: list[str]  # names of the K selected sources, by decreasing w
    coefficients: dict[str, float]  # effective coefficient of every task vector (target first)
    merged: TensorDict  # merged encoder parameters, name -> tensor
    logits: torch.Tensor  # (1, n_bins)


class STEPH(OverNetwork):
    def __init__(self, stack: TaskVectorStack, hparams: dict[str, Any], cfg: StephConfig | None = None,
                 head_seed: int = 0, n_patients: int = 0, head_bias: torch.Tensor | None = None,
                 arch: str = "abmil", inner_tau: torch.Tensor | None = None):
        """``stack``: rows ``[tau_t, tau_1, ..., tau_m]`` of the MIL encoder, labels = cohorts.
        ``hparams``: the merged network's (``arch``, a registered MIL network).
        ``n_patients``: size of the target cohort, which picks gamma when it is not set.
        ``head_bias``: initial bias of the fresh head (e.g. baseline hazard logits); its weights
        are always freshly drawn.
        ``inner_tau``: (J, P) cross-fitted target task vectors (see the module docstring)."""
        super().__init__()
        self.n_patients = int(n_patients)
        cfg = cfg or StephConfig()
        if stack.vectors.shape[0] < 2:
            raise ValueError("STEPH needs the target task vector and at least one source")
        self.cfg = cfg
        self.layout: FlatLayout = stack.layout
        self.target_name = stack.labels[0]
        self.source_names = list(stack.labels[1:])
        m = len(self.source_names)
        self.m = m
        self.top_k = min(cfg.top_k, m)
        self.register_buffer("theta0_flat", stack.base.clone())
        self.register_buffer("tau", stack.vectors.clone())  # (m+1, P), row 0 = tau_t

        # The network whose encoder tensors are replaced by theta(X) at every forward; only its
        # head is trained. Its encoder parameters hold theta_0 (frozen) so the module is complete.
        self.attach_network(arch, hparams, frozen=(self.layout, self.theta0_flat),
                            head_generator=torch.Generator().manual_seed(head_seed),
                            head_bias=head_bias)
        if inner_tau is not None:
            if inner_tau.ndim != 2 or inner_tau.shape[1] != stack.vectors.shape[1]:
                raise ValueError(f"inner_tau must be (J, {stack.vectors.shape[1]}), got "
                                 f"{tuple(inner_tau.shape)}")
            self.register_buffer("tau_inner", inner_tau.detach().float().clone())
            self.bag_inputs = (*self.bag_inputs, CROSSFIT_INPUT)

        in_dim, d = self.network.in_dim, cfg.embed_dim
        self.embed = nn.Sequential(nn.Linear(in_dim, d), nn.ReLU())
        self.chunk_size = DEFAULT_CHUNK_SIZE  # bag_embedding in eval / no grad (0 = one pass)
        self.hold_weights = False  # w and lambda held fixed (head warm-up, see on_epoch_start)
        w0 = 1.0 / self.top_k  # "complete" start: the K selected weights sum to ~1
        if cfg.aggregation == "hyper":
            self.h_agg = hypernet(d, m, cfg.dropout)
            if cfg.w_init == "complete":
                with torch.no_grad():
                    self.h_agg[-1].bias.add_(w0)
        else:
            self.w_free = nn.Parameter(torch.full((m,), w0 if cfg.w_init == "complete" else 1.0 / m))
        if cfg.mixing == "hyper":
            self.h_mix = hypernet(d, m, cfg.dropout)
        elif cfg.mixing == "free":
            self.rho_free = nn.Parameter(torch.full((m,), _FREE_RHO_INIT))

    @torch.no_grad()
    def start_merge_at(self, w: torch.Tensor, lam: torch.Tensor) -> None:
        """Start the merge at the same ``w`` and ``lambda`` (both (m,)) for every bag: the output
        layers' weights become 0 and their biases give w and lambda (they learn input
        dependence from there; lambda's start is kept off ReLU's kink, at most 1/1.05)."""
        if w.shape != (self.m,) or lam.shape != (self.m,):
            raise ValueError(f"start_merge_at needs ({self.m},) weights, got {tuple(w.shape)}, "
                             f"{tuple(lam.shape)}")
        r = (1.0 / lam.clamp(1e-3, 1.0) - 1.0).clamp_min(0.05)
        if self.cfg.aggregation == "hyper":
            self.h_agg[-1].weight.zero_()
            self.h_agg[-1].bias.copy_(w)
        else:
            self.w_free.copy_(w)
        if self.cfg.mixing == "hyper":
            self.h_mix[-1].weight.zero_()
            self.h_mix[-1].bias.copy_(r)
        elif self.cfg.mixing == "free":
            self.rho_free.copy_(torch.log(r))

    # -- the pieces of the formula ------------------------------------------------------------
    def bag_embedding(self, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """z = mean_n ReLU(W_e x_n + b_e), (d,). In eval mode without autograd (prediction) a
        bag of more than ``chunk_size`` instances (default: ``self.chunk_size``, a performance
        setting, not saved) is summed chunk by chunk, so the (N, d) activations never exist at
        once; the result is the one-pass mean up to float rounding."""
        x = MILNetwork._as_instances(x)
        if chunk_size is None:
            chunked = not self.training and not torch.is_grad_enabled()
            chunk_size = self.chunk_size if chunked else 0
        if not 0 < chunk_size < x.shape[0]:
            return self.embed(x).mean(dim=0)
        def part(start: int) -> torch.Tensor:  # summed in float32 at least (bf16 under autocast)
            h = self.embed(x[start:start + chunk_size])
            return h.to(torch.promote_types(h.dtype, torch.float32)).sum(dim=0)

        total = part(0)
        for start in range(chunk_size, x.shape[0], chunk_size):
            total += part(start)
        return total / x.shape[0]

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge weights w >= 0 and mixup coefficients lambda in (0, 1], both (m,), float32
        (under autocast the bag embedding is computed in low precision, the hypernetworks'
        small heads and everything after them in float32)."""
        z = None
        if self.cfg.aggregation == "hyper" or self.cfg.mixing == "hyper":
            z = self.bag_embedding(x)
        anchor = z if z is not None else next(self.parameters())
        with autocast_off(anchor):  # in the parameters' dtype (float32), bf16 z cast up
            z = z.to(self.embed[0].weight.dtype) if z is not None else None
            act = F.softplus if self.cfg.w_activation == "softplus" else F.relu
            w = act(self.h_agg(z)) if self.cfg.aggregation == "hyper" else act(self.w_free)
            if self.cfg.mixing == "hyper":
                lam = 1.0 / (1.0 + F.relu(self.h_mix(z)))
            elif self.cfg.mixing == "free":
                lam = 1.0 / (1.0 + torch.exp(self.rho_free))
            else:
                lam = torch.ones_like(w)
        return w, lam

    def select(self, w: torch.Tensor) -> torch.Tensor:
        """0/1 mask (m,) of the K largest merge weights."""
        idx = torch.topk(w.detach(), self.top_k).indices
        return torch.zeros_like(w).index_fill_(0, idx, 1.0)

    @staticmethod
    def coefficients(w: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Coefficients (m+1,) of [tau_t, tau_1..tau_m] in theta(X) - theta_0."""
        ws = w * mask
        return torch.cat([(ws * lam).sum().view(1), ws * (1.0 - lam)])

    def merged_flat(self, coef: torch.Tensor, row: int | None = None) -> torch.Tensor:
        """theta_0 + coef @ tau, float32 (autocast would round the merged weights); with
        ``row``, inner target task vector ``row`` in place of tau_t (cross-fitting)."""
        with autocast_off(coef):
            flat = torch.addmv(self.theta0_flat, self.tau.t(), coef.to(self.tau.dtype))
            if row is not None:
                flat = flat + coef[0].to(self.tau.dtype) * (self.tau_inner[row] - self.tau[0])
            return flat

    def _inner_row(self, bag_inputs: dict[str, torch.Tensor]
                   ) -> tuple[int | None, dict[str, torch.Tensor]]:
        """(the bag's inner target row or None, the network's own per-bag inputs)."""
        if CROSSFIT_INPUT not in bag_inputs:
            return None, bag_inputs
        rest = {k: v for k, v in bag_inputs.items() if k != CROSSFIT_INPUT}
        if getattr(self, "tau_inner", None) is None:
            return None, rest
        row = int(bag_inputs[CROSSFIT_INPUT])
        if row >= self.tau_inner.shape[0]:
            raise ValueError(f"tau_row {row} but STEPH holds {self.tau_inner.shape[0]} inner "
                             "target task vectors")
        return (row if row >= 0 else None), rest

    @torch.no_grad()
    def without_crossfit(self) -> STEPH:
        """Drop the inner target rows (after training): a plain STEPH, returned (in place). With
        ``steph.crossfit_test: mean`` its target task vector becomes the inner rows' mean."""
        if getattr(self, "tau_inner", None) is not None:
            if self.cfg.crossfit_test == "mean":
                self.tau[0].copy_(self.tau_inner.mean(dim=0))
            del self.tau_inner
            self.bag_inputs = tuple(n for n in self.bag_inputs if n != CROSSFIT_INPUT)
        return self

    def aux_losses(self, w: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = mask.sum()
        l_agg = torch.logsumexp(w, dim=0) ** 2 + (w * mask).sum() / k
        l_mix = (lam ** 2 * mask).sum() / k
        return l_agg, l_mix

    def gamma(self) -> float:
        """gamma as set, or by cohort size (``size_rule``: 0.005 above 500 patients, else 0.05).
        ``search`` is resolved by the experiment before the module is built."""
        g = self.cfg.gamma
        if g == "size_rule":
            return self.cfg.gamma_large if self.n_patients > self.cfg.large_cohort else self.cfg.gamma_small
        if g == "search":
            raise ValueError("gamma 'search' must be resolved (steph.experiments.search) before "
                             "STEPH is built")
        return float(g)

    # -- forward --------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, bag_inputs: dict[str, torch.Tensor]):
        row, bag_inputs = self._inner_row(bag_inputs)
        w, lam = self.weights(x)
        if self.training and self.hold_weights:
            w, lam = w.detach(), lam.detach()
        mask = self.select(w)
        coef = self.coefficients(w, lam, mask)
        params = self.layout.unflatten(self.merged_flat(coef, row))
        z = self.merged_embedding(x, params, bag_inputs)
        return self.network.head(z), w, lam, mask, coef, params

    def head_input(self, x: torch.Tensor, **bag_inputs: torch.Tensor) -> torch.Tensor:
        """The merged model's bag embedding for ``x`` (what enters the fresh head)."""
        row, bag_inputs = self._inner_row(bag_inputs)
        w, lam = self.weights(x)
        coef = self.coefficients(w, lam, self.select(w))
        return self.merged_embedding(x, self.layout.unflatten(self.merged_flat(coef, row)),
                                     bag_inputs)

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer (epoch is 0-based): hold w and lambda during the head warm-up."""
        self.hold_weights = epoch < self.cfg.head_warmup_epochs

    def forward(self, x: torch.Tensor, **bag_inputs: torch.Tensor) -> ModelOutput:
        logits, w, lam, mask, _, _ = self._run(x, bag_inputs)
        l_agg, l_mix = self.aux_losses(w, lam, mask)
        aux = self.gamma() * l_agg + self.cfg.beta * l_mix
        alive = ((w.detach() * mask) > 0).any().float()  # 1 if a selected source contributes
        # source_coef: the coefficient of each source's own task vector, w (1 - lambda) if
        # selected (w alone also carries tau_t's share when lambda is near 1)
        stats = {"w": w.detach(), "lambda": lam.detach(), "selected": mask.detach(), "alive": alive,
                 "source_coef": (w * (1 - lam) * mask).detach()}
        return ModelOutput(logits=logits, aux_loss=aux, stats=stats)

    @torch.no_grad()
    def explain(self, x: torch.Tensor, **bag_inputs: torch.Tensor) -> MergeExplanation:
        was_training = self.training
        self.eval()
        try:
            logits, w, lam, mask, coef, params = self._run(x, bag_inputs)
        finally:
            self.train(was_training)
        order = torch.argsort(w, descending=True)
        selected = [self.source_names[i] for i in order.tolist() if mask[i] > 0]
        names = [self.target_name, *self.source_names]
        return MergeExplanation(
            w=w.clone(), lam=lam.clone(), selected=selected,
            coefficients={n: float(c) for n, c in zip(names, coef)},
            merged={k: v.clone() for k, v in params.items()}, logits=logits,
        )

    def settings(self) -> dict[str, Any]:
        """Everything needed to rebuild this module around its saved tensors."""
        return {
            "target": self.target_name,
            "sources": self.source_names,
            "arch": self.arch,
            "network": self.network.hparams(),
            # settings added since (cross-fitting) only where they differ from what STEPH had
            # before them: a plain run's artefact is what it was
            "steph": without_added_defaults("steph", self.cfg.model_dump(mode="json")),
            "layout": self.layout.to_dict(),
            "n_patients": self.n_patients,
        }

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> STEPH:
        """An empty STEPH (zero tensors) shaped by ``settings``; load the state dict after."""
        layout = FlatLayout.from_dict(settings["layout"])
        labels = [settings["target"], *settings["sources"]]
        zeros = {n: torch.zeros(s) for n, s in zip(layout.names, layout.shapes)}
        stack = TaskVectorStack(layout=layout, base=layout.flatten(zeros),
                                vectors=torch.zeros(len(labels), layout.size), labels=labels)
        return cls(stack, settings["network"], StephConfig(**settings["steph"]),
                   n_patients=int(settings["n_patients"]), arch=settings["arch"])


@register_artefact("steph")
def _steph_artefact(settings: dict[str, Any]) -> STEPH:
    return STEPH.from_settings(settings)

