"""Cancer-specific training: a MIL network trained on one cohort from the shared theta_0."""

from __future__ import annotations

from steph.methods.registry import Built, Method, MethodContext, register_method
from steph.models import ABMIL


def _build_abmil(ctx: MethodContext) -> Built:
    model = ABMIL(**ctx.hparams)
    model.load_state_dict(ctx.theta0)  # every cancer-specific model starts from theta_0
    return Built(module=model, kind="abmil", settings=model.hparams)


register_method(Method("abmil", "cancer-specific ABMIL trained from the shared theta_0",
                       needs_pool=False, trains=True, build=_build_abmil))
