"""Pairwise preprocessing of task vectors for the model-merging baselines (TIES, Iso-C, Iso-CTS).

A *task vector* is a mapping ``name -> torch.Tensor`` (``tau_c = theta_c - theta_0``, restricted
to the MIL encoder). The baselines "TIES AM" and "Iso-C AM" (docs: method.md, section 6) replace
every source task vector ``tau_i`` by the result of merging it *with the target's* ``tau_t``
before AdaMerging learns the merge coefficients; :func:`preprocess_pairwise` does exactly that.

Every function here is pure: no module state, the inputs are never modified (nor aliased by the
outputs), the output has the same keys (in the order of the first input), shapes and dtypes as
the inputs, it is computed under ``torch.no_grad()`` and it is deterministic for a given input on
a given machine (SVD sign conventions are LAPACK's / cuSOLVER's). Linear algebra runs in float64
for float64 inputs and in float32 otherwise (half precision is upcast), and is cast back.

Invalid options raise :class:`steph.errors.ConfigError`; task vectors that do not match (keys,
shapes, dtypes) raise :class:`steph.errors.DataError` naming the tensor.

TIES-Merging (Yadav et al., NeurIPS 2023), disjoint **sum** variant
-------------------------------------------------------------------
1. *Trim*: each task vector keeps its ``k = int(density * n)`` largest-magnitude entries, the
   others are set to 0. ``n`` counts the entries of the ranking scope: ``scope="global"`` ranks
   all tensors of the dict flattened together (what the STEPH reference release does),
   ``scope="per_tensor"`` ranks each tensor on its own. **Tie rule:** every entry whose magnitude
   is ``>=`` the k-th largest magnitude is kept, so ``k`` entries are kept plus any entry tied
   with the k-th one (``k = 0`` keeps nothing, ``density = 1`` keeps everything).
   ``int()`` truncation is the rule of peft and of the reference release (note that it inherits
   float rounding: ``int(0.29 * 100) == 28``).
2. *Elect sign*: per entry, the sign of the sum of the trimmed vectors. An entry whose sum is
   exactly 0 gets a fallback sign chosen by ``zero_sign``:

   - ``"total"`` (default): the sign of the sum of *all* summed entries of the ranking scope
     (the whole dict for ``scope="global"``, the tensor for ``"per_tensor"``);
   - ``"majority"``: the sign of the sum of the elected signs of the scope, i.e. whether more
     entries elected + than - (the rule of the TIES authors' code and of the STEPH release);
   - ``"positive"``: +1 (peft's ``calculate_majority_sign_mask``, which tests ``sum >= 0``).

   If the fallback is itself 0 it is +1. The choice only matters where the trimmed values cancel
   exactly (e.g. ``+a`` and ``-a``); where they are all 0 the merged entry is 0 whatever the sign.
3. *Disjoint sum*: per entry, the sum of the trimmed values whose sign equals the elected sign.

Differences from ``peft.utils.merge_utils`` (peft 0.21), all checked by the tests:

- peft prunes each tensor on its own (``magnitude_based_pruning``); there is no global ranking.
  ``scope="per_tensor"`` matches it.
- peft keeps *exactly* ``k = int(density * numel)`` entries with ``torch.topk`` and breaks ties at
  the threshold arbitrarily; here all ties with the k-th magnitude are kept.
- ``peft.utils.merge_utils.prune`` returns the tensor untouched (with a warning) for
  ``density >= 1`` and accepts ``density > 1``; here ``density`` must lie in [0, 1].
- peft elects +1 where the sum is exactly 0 (``zero_sign="positive"`` here).
- peft's ``disjoint_merge`` returns the **mean** of the agreeing entries (count clamped at 1);
  TIES AM uses the **sum**: ``sum = mean * count``.
- peft's ``ties`` multiplies by per-task weights after the sign election; there are no weights here
  (they are AdaMerging's learned coefficients, applied later).

Differences from the STEPH reference release (``model/utils_merge.py``, read for understanding):
its ``topk_values_mask`` keeps the entries ``>=`` the ``(n - int(density * n))``-th *smallest*
magnitude, i.e. the ``int(density * n) + 1`` largest (one more entry than ``density`` asks for;
at density 0.2 on the 1.2 M-entry ABMIL encoder this is one entry); here it is ``int(density * n)``
(plus ties). Its zero-sign rule is ``zero_sign="majority"``.

Iso-C (Marczak et al., "No task left behind: isotropic model merging with common and
task-specific subspaces", ICML 2025)
----------------------------------------------------------------------------------------------
Every 2-D tensor: ``M = sum of the task vectors``, ``M = U diag(S) V^T`` (thin SVD), output
``mean(S) * U V^T`` (a flat spectrum). Every other tensor (biases, 1-D, 0-D, and any tensor with
more than two dimensions): the mean of the task vectors. Note that the 2-D rule does **not**
divide by the number of tasks: for a ``1 x d`` matrix (ABMIL's ``attention.score.weight``) the
spectrum has one value and Iso-C returns ``M`` itself, i.e. the *sum*; this is the paper's rule
and the reference release's. Singular values equal to 0 count in the mean and their (arbitrary,
orthonormal) singular vectors are filled with the mean value, as in the paper.

Iso-CTS (same paper, common and task-specific subspaces)
--------------------------------------------------------
For each 2-D tensor, with ``T`` task vectors ``D_1..D_T``, ``M = sum_j D_j`` and ``r = min(m, n)``:

1. *Sizes*: ``k0 = int(f * r)`` (``f = common_space_fraction``), ``s = round((r - k0) / T)``
   directions per task (Python ``round``: half to even, the rule of the authors' code and of the
   STEPH release; capped at ``r // T``), and the common size is adjusted to ``k = r - T * s`` so
   that ``k + T * s = r`` exactly. E.g. r = 384, T = 2: k = 308, s = 38; r = 512: k = 408, s = 52;
   r = 1: k = 1, s = 0.
2. *Common subspace*: the top ``k`` left / right singular vectors of ``M`` (``U_c``, ``V_c``) and
   their singular values.
3. *Task-specific subspaces*: for each task, ``D_j_perp = D_j - U_c U_c^T D_j`` (the component
   orthogonal to the common subspace, projected on the *left*, as in the paper), its thin SVD, and
   its top ``s`` left / right singular vectors and singular values.
4. *Combine*: ``U* = [U_c, U_1, ..., U_T]`` (m x r), ``V* = [V_c, V_1, ..., V_T]`` (n x r).
5. *Orthogonalise*: each replaced by its polar factor, ``A = P Sigma Q^T -> P Q^T`` (the closest
   matrix with orthonormal columns; it exists and has orthonormal columns even when ``A`` is
   rank-deficient, where it is not unique and LAPACK's choice is taken).
6. *Isotropic spectrum*: ``sigma = mean`` of the ``r`` combined singular values (the ``k`` common
   ones and the ``T * s`` task-specific ones); output ``sigma * U_perp V_perp^T``.

Other tensors: the mean of the task vectors. With ``f = 1`` (or whenever ``s = 0``) ``U*`` and
``V*`` already are orthonormal and Iso-CTS equals Iso-C. The pairwise variant uses ``T = 2``
(the target and one source), as the STEPH release does. Note that the STEPH release's pairwise
Iso-CTS loop reuses its outer loop variable, so it writes every source's 2-D result into the
task vector of source 1; this module does not reproduce that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from steph.errors import ConfigError, DataError

__all__ = [
    "PREPROCESS_METHODS",
    "TIES_SCOPES",
    "TIES_ZERO_SIGN_RULES",
    "iso_c",
    "iso_c_pair",
    "iso_cts",
    "iso_cts_pair",
    "iso_cts_sizes",
    "preprocess_pairwise",
    "ties_disjoint_sum",
    "ties_elect_signs",
    "ties_merge",
    "ties_pair",
    "ties_trim",
]

TaskVector = Mapping[str, Tensor]

TIES_SCOPES = ("global", "per_tensor")
TIES_ZERO_SIGN_RULES = ("total", "majority", "positive")
PREPROCESS_METHODS = ("ties", "iso_c", "iso_cts", "none")


# --------------------------------------------------------------------------------------------
# validation and small helpers
# --------------------------------------------------------------------------------------------


def _check_vectors(task_vectors: Sequence[TaskVector], what: str) -> list[str]:
    """Check that the task vectors share keys, shapes and dtypes; return the key order."""
    if isinstance(task_vectors, Mapping) or not isinstance(task_vectors, Sequence):
        raise ConfigError(f"{what}: expected a list of task vectors (dicts name -> tensor)")
    if len(task_vectors) == 0:
        raise ConfigError(f"{what}: needs at least one task vector, got none")
    first = task_vectors[0]
    keys = list(first.keys())
    for j, tv in enumerate(task_vectors):
        if not isinstance(tv, Mapping):
            raise ConfigError(f"{what}: task vector {j} is a {type(tv).__name__}, not a dict")
        if set(tv.keys()) != set(keys):
            missing = sorted(set(keys) - set(tv.keys()))
            extra = sorted(set(tv.keys()) - set(keys))
            raise DataError(
                f"{what}: task vector {j} does not have the same tensors as task vector 0 "
                f"(missing: {missing}, extra: {extra})"
            )
        for name in keys:
            t, ref = tv[name], first[name]
            if not isinstance(t, Tensor):
                raise DataError(f"{what}: '{name}' of task vector {j} is not a tensor")
            if t.shape != ref.shape:
                raise DataError(
                    f"{what}: '{name}' has shape {tuple(t.shape)} in task vector {j} but "
                    f"{tuple(ref.shape)} in task vector 0"
                )
            if t.dtype != ref.dtype:
                raise DataError(
                    f"{what}: '{name}' has dtype {t.dtype} in task vector {j} but {ref.dtype} "
                    "in task vector 0"
                )
            if not t.is_floating_point():
                raise DataError(f"{what}: '{name}' has non-floating dtype {t.dtype}")
    return keys


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_density(density: float) -> float:
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise ConfigError(f"TIES density must be a number in [0, 1], got {density!r}") from None
    if not (0.0 <= d <= 1.0):  # also rejects NaN
        raise ConfigError(f"TIES density must lie in [0, 1], got {density!r}")
    return d


def _check_choice(value: str, choices: Sequence[str], option: str) -> str:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {list(choices)}, got {value!r}")
    return value


def _scopes(keys: list[str], scope: str) -> list[list[str]]:
    """The groups of tensor names ranked / resolved together."""
    return [keys] if scope == "global" else [[k] for k in keys]


# --------------------------------------------------------------------------------------------
# TIES-Merging
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def ties_trim(task_vector: TaskVector, density: float = 0.2, scope: str = "global") -> dict:
    """TIES step 1: keep the ``int(density * n)`` largest-magnitude entries (plus ties).

    ``n`` is the number of entries of the scope (all tensors together for ``"global"``, one
    tensor for ``"per_tensor"``). Entries with magnitude ``>=`` the k-th largest magnitude are
    kept; the others become 0. Returns a new dict of new tensors.
    """
    d = _check_density(density)
    _check_choice(scope, TIES_SCOPES, "TIES scope")
    keys = _check_vectors([task_vector], "ties_trim")
    out: dict[str, Tensor] = {}
    for group in _scopes(keys, scope):
        tensors = [task_vector[k].detach() for k in group]
        n = sum(t.numel() for t in tensors)
        k = int(d * n)
        if k <= 0:
            for name, t in zip(group, tensors):
                out[name] = torch.zeros_like(t)
            continue
        if k >= n:
            for name, t in zip(group, tensors):
                out[name] = t.clone()
            continue
        magnitudes = torch.cat([t.abs().reshape(-1) for t in tensors])
        # the k-th largest magnitude is the (n - k + 1)-th smallest
        threshold = torch.kthvalue(magnitudes, n - k + 1).values
        for name, t in zip(group, tensors):
            out[name] = torch.where(t.abs() >= threshold, t, torch.zeros_like(t))
    return {name: out[name] for name in keys}


@torch.no_grad()
def ties_elect_signs(
    trimmed: Sequence[TaskVector], scope: str = "global", zero_sign: str = "total"
) -> dict:
    """TIES step 2: per entry, the sign (+1 / -1, in the tensors' dtype) of the sum of the
    trimmed task vectors; where that sum is exactly 0, the fallback of ``zero_sign`` (see the
    module docstring) computed over the same scope; a fallback of 0 becomes +1."""
    _check_choice(scope, TIES_SCOPES, "TIES scope")
    _check_choice(zero_sign, TIES_ZERO_SIGN_RULES, "TIES zero_sign")
    keys = _check_vectors(trimmed, "ties_elect_signs")
    sums = {k: torch.stack([tv[k].detach() for tv in trimmed]).sum(dim=0) for k in keys}
    out: dict[str, Tensor] = {}
    for group in _scopes(keys, scope):
        signs = {k: torch.sign(sums[k]) for k in group}
        if zero_sign == "total":
            fallback = torch.sign(sum(sums[k].sum(dtype=torch.float64) for k in group)).item()
        elif zero_sign == "majority":
            fallback = torch.sign(sum(signs[k].sum(dtype=torch.float64) for k in group)).item()
        else:
            fallback = 1.0
        if fallback == 0.0:
            fallback = 1.0
        for k in group:
            out[k] = torch.where(signs[k] == 0, torch.full_like(signs[k], fallback), signs[k])
    return {k: out[k] for k in keys}


@torch.no_grad()
def ties_disjoint_sum(trimmed: Sequence[TaskVector], signs: TaskVector) -> dict:
    """TIES step 3: per entry, the sum of the trimmed values whose sign equals the elected one."""
    keys = _check_vectors(list(trimmed) + [signs], "ties_disjoint_sum")
    out: dict[str, Tensor] = {}
    for k in keys:
        stacked = torch.stack([tv[k].detach() for tv in trimmed])
        agree = torch.sign(stacked) == signs[k].detach().unsqueeze(0)
        out[k] = torch.where(agree, stacked, torch.zeros_like(stacked)).sum(dim=0)
    return out


@torch.no_grad()
def ties_merge(
    task_vectors: Sequence[TaskVector],
    density: float = 0.2,
    scope: str = "global",
    zero_sign: str = "total",
) -> dict:
    """TIES-Merging with disjoint sum: trim, elect sign, disjoint sum (module docstring)."""
    _check_density(density)
    _check_choice(scope, TIES_SCOPES, "TIES scope")
    _check_choice(zero_sign, TIES_ZERO_SIGN_RULES, "TIES zero_sign")
    _check_vectors(task_vectors, "ties_merge")
    trimmed = [ties_trim(tv, density=density, scope=scope) for tv in task_vectors]
    signs = ties_elect_signs(trimmed, scope=scope, zero_sign=zero_sign)
    return ties_disjoint_sum(trimmed, signs)


def ties_pair(
    tau_t: TaskVector,
    tau_i: TaskVector,
    density: float = 0.2,
    scope: str = "global",
    zero_sign: str = "total",
) -> dict:
    """``ties_merge([tau_t, tau_i], ...)``: the source ``tau_i`` preprocessed with the target."""
    return ties_merge([tau_t, tau_i], density=density, scope=scope, zero_sign=zero_sign)


# --------------------------------------------------------------------------------------------
# Iso-C and Iso-CTS
# --------------------------------------------------------------------------------------------


def _svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        # LAPACK's default divide-and-conquer driver (gesdd) can fail to converge on
        # ill-conditioned matrices (seen on Iso-CTS's stacked bases); gesvd is slower but robust.
        import scipy.linalg

        u, s, vh = scipy.linalg.svd(a.detach().double().cpu().numpy(), full_matrices=False,
                                    lapack_driver="gesvd")
        return tuple(torch.from_numpy(x).to(dtype=a.dtype, device=a.device) for x in (u, s, vh))


def _polar(a: Tensor) -> Tensor:
    """The orthogonal polar factor ``P Q^T`` of ``a = P Sigma Q^T`` (orthonormal columns)."""
    p, _, qh = _svd(a)
    return p @ qh


def _iso_c_matrix(total: Tensor) -> Tensor:
    u, s, vh = _svd(total)
    return (u * s.mean()) @ vh


def iso_cts_sizes(r: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(k, s)``: the common-subspace size and the per-task size for a rank-``r`` layer and
    ``num_tasks`` tasks, with ``k + num_tasks * s == r`` (module docstring, Iso-CTS step 1)."""
    if r < 0 or num_tasks < 1:
        raise ConfigError(f"iso_cts_sizes: need r >= 0 and num_tasks >= 1, got {r}, {num_tasks}")
    f = _check_fraction(common_space_fraction)
    k0 = int(f * r)
    s = round((r - k0) / num_tasks)
    s = max(0, min(s, r // num_tasks))
    return r - num_tasks * s, s


def _check_fraction(fraction: float) -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ConfigError(
            f"Iso-CTS common_space_fraction must be a number in [0, 1], got {fraction!r}"
        ) from None
    if not (0.0 <= f <= 1.0):
        raise ConfigError(f"Iso-CTS common_space_fraction must lie in [0, 1], got {fraction!r}")
    return f


def _iso_cts_matrix(mats: list[Tensor], fraction: float) -> Tensor:
    total = torch.stack(mats).sum(dim=0)
    r = min(total.shape)
    k, s = iso_cts_sizes(r, len(mats), fraction)
    u, sv, vh = _svd(total)
    u_parts, v_parts, s_parts = [u[:, :k]], [vh[:k, :].T], [sv[:k]]
    if s > 0:
        u_c = u[:, :k]
        for d in mats:
            d_perp = d - u_c @ (u_c.T @ d)
            ut, st, vht = _svd(d_perp)
            u_parts.append(ut[:, :s])
            v_parts.append(vht[:s, :].T)
            s_parts.append(st[:s])
    u_star = torch.cat(u_parts, dim=1)
    v_star = torch.cat(v_parts, dim=1)
    sigma = torch.cat(s_parts).mean()
    if s > 0:  # U* and V* are orthonormal already when they are the SVD factors of M
        u_star = _polar(u_star)
        v_star = _polar(v_star)
    return (u_star * sigma) @ v_star.T


def _isotropic(task_vectors: Sequence[TaskVector], what: str, matrix_rule) -> dict:
    keys = _check_vectors(task_vectors, what)
    out: dict[str, Tensor] = {}
    for name in keys:
        ref = task_vectors[0][name]
        work = _work_dtype(ref.dtype)
        mats = [tv[name].detach().to(work) for tv in task_vectors]
        if ref.dim() == 2 and ref.numel() > 0:
            merged = matrix_rule(mats)
        else:
            merged = torch.stack(mats).mean(dim=0)
        out[name] = merged.to(ref.dtype)
    return out


@torch.no_grad()
def iso_c(task_vectors: Sequence[TaskVector]) -> dict:
    """Iso-C over ``n`` task vectors: for every 2-D tensor, the SVD of the sum with every
    singular value replaced by their mean; every other tensor: the mean (module docstring)."""
    return _isotropic(
        task_vectors, "iso_c", lambda mats: _iso_c_matrix(torch.stack(mats).sum(dim=0))
    )


def iso_c_pair(tau_t: TaskVector, tau_i: TaskVector) -> dict:
    """Iso-C of the target and one source: ``iso_c([tau_t, tau_i])``."""
    return iso_c([tau_t, tau_i])


@torch.no_grad()
def iso_cts(task_vectors: Sequence[TaskVector], common_space_fraction: float = 0.8) -> dict:
    """Iso-CTS over ``n`` task vectors: common subspace of the sum plus ``s`` task-specific
    directions per task, orthogonalised, isotropic spectrum; other tensors: the mean (module
    docstring lists every choice)."""
    f = _check_fraction(common_space_fraction)
    return _isotropic(task_vectors, "iso_cts", lambda mats: _iso_cts_matrix(mats, f))


def iso_cts_pair(tau_t: TaskVector, tau_i: TaskVector, common_space_fraction: float = 0.8) -> dict:
    """Iso-CTS of the target and one source (``T = 2``): ``iso_cts([tau_t, tau_i], f)``."""
    return iso_cts([tau_t, tau_i], common_space_fraction=common_space_fraction)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def preprocess_pairwise(
    tau_t: TaskVector, sources: Sequence[TaskVector], method: str, **kwargs
) -> list[dict]:
    """Replace every source task vector by its pairwise merge with the target's.

    ``method``: ``"ties"`` (kwargs of :func:`ties_pair`: ``density``, ``scope``, ``zero_sign``),
    ``"iso_c"`` (no kwargs), ``"iso_cts"`` (``common_space_fraction``) or ``"none"`` (copies of
    the sources, no kwargs). Returns a new list, in the order of ``sources``.
    """
    allowed = {
        "ties": {"density", "scope", "zero_sign"},
        "iso_c": set(),
        "iso_cts": {"common_space_fraction"},
        "none": set(),
    }
    _check_choice(method, PREPROCESS_METHODS, "preprocessing method")
    unknown = sorted(set(kwargs) - allowed[method])
    if unknown:
        raise ConfigError(
            f"preprocessing method {method!r} takes the options {sorted(allowed[method])}, "
            f"got unknown {unknown}"
        )
    if isinstance(sources, Mapping) or not isinstance(sources, Sequence):
        raise ConfigError("preprocess_pairwise: sources must be a list of task vectors")
    for j, src in enumerate(sources):
        _check_vectors([tau_t, src], f"preprocess_pairwise (source {j})")
    if method == "ties":
        return [ties_pair(tau_t, src, **kwargs) for src in sources]
    if method == "iso_c":
        return [iso_c_pair(tau_t, src) for src in sources]
    if method == "iso_cts":
        return [iso_cts_pair(tau_t, src, **kwargs) for src in sources]
    return [{k: src[k].detach().clone() for k in tau_t} for src in sources]
