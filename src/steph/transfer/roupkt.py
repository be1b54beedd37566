"""ROUPKT: representation transfer by a routed mixture of experts (method.md section 6; the
Path-PKT study's MoE-PKT), and the simpler read-outs of the same embeddings.

For a bag X of the target cohort, with the bag embeddings z_1..z_E of the frozen expert models
(:class:`~steph.transfer.experts.ExpertBank`: z_1 from the target's own fold-k model, then one per
source; cached per run, :mod:`steph.transfer.cache`):

    logits = R(X)                      router: an ABMIL on the raw bag (Linear in->512 + ReLU,
                                       gated attention 512/384, dropout, attention pooling)
                                       with a bias-free Linear(512 -> E) as its head
    p      = softmax(logits)           over all E experts
    T      = the top_k largest p       (k = 5), NOT renormalised
    h      = sum_{i in T} p_i ReLU(W_i z_i + b_i)     one Linear(d -> d) expert per model
    out    = head(h)                   a fresh Linear(d -> n_bins)
    aux    = z_loss (logsumexp logits)^2 + balance_loss max_i p_i     (0.01 and 0.01)

The top-k choice is taken on p detached (a discrete choice); the selected p_i get gradient
through h, every logit through the auxiliary terms. Trainable: the router, the experts and the
head (4,618,913 parameters at 1536-d, E = 13); the expert models are frozen.

Inputs: during training the experts' inputs come from the run's cache as the per-bag input
``experts`` (E, d) (``bag_inputs = ("experts",)``); a served module (``bag_inputs = ()``) or a
call without it computes them from the bundled expert models, i.e. E + 1 MIL encoders per bag.

:class:`ExpertReadout` is a fresh head on the mean of some experts' embeddings: the linear probe
(one source's embedding) and ``fusion_mean`` (every source's and the self expert's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from steph.models.abmil import ABMIL
from steph.models.base import init_fresh_head
from steph.models.module import ModelOutput, SurvivalModule
from steph.models.registry import register_artefact
from steph.transfer.experts import ExpertBank

EXPERTS_INPUT = "experts"
ROUTER_DEFAULTS = {"hidden_dim": 512, "attn_dim": 384, "dropout": 0.25}


def _seeded(seed: int, build):
    """``build()`` with torch's global generator at ``seed``, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def _expert_inputs(bank: ExpertBank, x: torch.Tensor, experts: torch.Tensor | None,
                   columns: Sequence[int] | None = None) -> torch.Tensor:
    """(E, d): the cached inputs (their ``columns``, default all) or the bank's own on ``x``."""
    if experts is None:
        return bank(x)
    experts = experts.reshape(-1, experts.shape[-1])
    return experts if columns is None else experts[list(columns)]


class ROUPKT(SurvivalModule):
    def __init__(self, bank: ExpertBank, n_bins: int, *, top_k: int = 5, z_loss: float = 0.01,
                 balance_loss: float = 0.01, router: Mapping[str, Any] | None = None,
                 seed: int = 0, head_bias: torch.Tensor | None = None,
                 cached_inputs: bool = False):
        """``bank``: the frozen expert models (self first). ``router``: the router ABMIL's
        hidden_dim / attn_dim / dropout (512 / 384 / 0.25 by default). ``seed``: the fresh
        router, experts and head are drawn from it. ``head_bias``: the fresh head's bias (e.g.
        baseline hazard logits). ``cached_inputs``: the module takes the experts' inputs as the
        per-bag input ``experts`` (training); else it computes them itself (serving)."""
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.bank = bank
        self.n_experts, d = len(bank), bank.embed_dim
        self.n_bins = int(n_bins)
        self.top_k = min(int(top_k), self.n_experts)
        self.z_loss, self.balance_loss = float(z_loss), float(balance_loss)
        self.router_hparams = {**ROUTER_DEFAULTS, **(router or {})}
        self.seed = int(seed)
        self.bag_inputs: tuple[str, ...] = (EXPERTS_INPUT,) if cached_inputs else ()
        rh, e = self.router_hparams, self.n_experts

        def build():
            r = ABMIL(in_dim=bank.in_dim, n_bins=e, **rh)
            r.head = nn.Linear(r.hidden_dim, e, bias=False)  # logits over the experts
            experts = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ReLU()) for _ in range(e))
            return r, experts, nn.Linear(d, self.n_bins)

        self.router, self.experts, self.head = _seeded(self.seed, build)
        init_fresh_head(self.head, torch.Generator().manual_seed(self.seed), head_bias)

    # -- the pieces of the formula ----------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (E,), probabilities p (E,) and the indices of the top_k largest p."""
        logits = self.router(x).reshape(-1)
        p = F.softmax(logits, dim=0)
        top = torch.topk(p.detach(), self.top_k).indices
        return logits, p, top

    def mix(self, z: torch.Tensor, p: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """sum_{i in top} p_i expert_i(z_i), (1, d); p is not renormalised over ``top``."""
        outs = torch.stack([self.experts[i](z[i]) for i in top.tolist()])  # (k, d)
        return (p[top].unsqueeze(1) * outs).sum(dim=0, keepdim=True)

    def aux_loss(self, logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """z_loss (logsumexp logits)^2 + balance_loss (top-1 probability), already weighted."""
        return self.z_loss * torch.logsumexp(logits, dim=0) ** 2 + self.balance_loss * p.max()

    def _run(self, x: torch.Tensor, experts: torch.Tensor | None):
        z = _expert_inputs(self.bank, x, experts)
        if z.shape[0] != self.n_experts:
            raise ValueError(f"expected the inputs of {self.n_experts} experts, got {z.shape[0]}")
        logits, p, top = self.route(x)
        return self.mix(z, p, top), logits, p, top

    # -- what the trainer uses ----------------------------------------------------------------
    def forward(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> ModelOutput:
        h, logits, p, top = self._run(x, experts)
        selected = torch.zeros_like(p).index_fill_(0, top, 1.0)
        stats = {"p": p.detach(), "selected": selected.detach()}
        return ModelOutput(logits=self.head(h), aux_loss=self.aux_loss(logits, p), stats=stats)

    @property
    def survival_head(self) -> nn.Linear:
        return self.head

    def head_input(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        """The mixture h (1, d) that enters the head."""
        return self._run(x, experts)[0]

    def encoders_per_bag(self) -> int:
        """MIL encoders a served module runs per bag: every expert model plus the router."""
        return self.n_experts + 1

    def settings(self) -> dict[str, Any]:
        return {"bank": self.bank.settings(), "n_bins": self.n_bins, "top_k": self.top_k,
                "z_loss": self.z_loss, "balance_loss": self.balance_loss,
                "router": self.router_hparams, "seed": self.seed}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ROUPKT:
        """An untrained module shaped by ``settings`` that computes its experts' inputs itself;
        load the state dict after."""
        return cls(ExpertBank.from_settings(settings["bank"]), settings["n_bins"],
                   top_k=settings["top_k"], z_loss=settings["z_loss"],
                   balance_loss=settings["balance_loss"], router=settings["router"],
                   seed=settings["seed"])


class ExpertReadout(SurvivalModule):
    """A fresh head Linear(d -> n_bins) on the mean of the bank's embeddings.

    ``columns``: where the bank's experts are in the cached ``experts`` input (which holds every
    expert of the run); a linear probe keeps a bank of one source, ``fusion_mean`` every
    expert."""

    def __init__(self, bank: ExpertBank, n_bins: int, columns: Sequence[int] | None = None, *,
                 seed: int = 0, head_bias: torch.Tensor | None = None,
                 cached_inputs: bool = False):
        super().__init__()
        self.bank = bank
        self.n_bins = int(n_bins)
        self.columns = list(range(len(bank))) if columns is None else [int(c) for c in columns]
        if len(self.columns) != len(bank):
            raise ValueError(f"{len(self.columns)} columns for {len(bank)} experts")
        self.seed = int(seed)
        self.bag_inputs: tuple[str, ...] = (EXPERTS_INPUT,) if cached_inputs else ()
        self.head = nn.Linear(bank.embed_dim, self.n_bins)
        init_fresh_head(self.head, torch.Generator().manual_seed(self.seed), head_bias)

    def head_input(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        return _expert_inputs(self.bank, x, experts, self.columns).mean(dim=0, keepdim=True)

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.head_input(x, experts))

    @property
    def survival_head(self) -> nn.Linear:
        return self.head

    def encoders_per_bag(self) -> int:
        return len(self.bank)

    def settings(self) -> dict[str, Any]:
        return {"bank": self.bank.settings(), "n_bins": self.n_bins, "columns": self.columns,
                "seed": self.seed}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ExpertReadout:
        return cls(ExpertBank.from_settings(settings["bank"]), settings["n_bins"],
                   settings["columns"], seed=settings["seed"])


@register_artefact("roupkt")
def _roupkt_artefact(settings: dict[str, Any]) -> ROUPKT:
    return ROUPKT.from_settings(settings)


@register_artefact("expert_readout")
def _readout_artefact(settings: dict[str, Any]) -> ExpertReadout:
    return ExpertReadout.from_settings(settings)
