"""Tests of steph.merging.preprocess: TIES (disjoint sum), Iso-C, Iso-CTS, pairwise dispatch.

Expected values are worked out by hand in the comments or are properties that hold by definition
(flat spectra, subspaces, agreement with peft's merge utilities where the semantics agree); no
expected number below was obtained by running the code under test.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from steph.errors import ConfigError, DataError
from steph.merging.preprocess import (
    iso_c,
    iso_c_pair,
    iso_cts,
    iso_cts_pair,
    iso_cts_sizes,
    preprocess_pairwise,
    ties_disjoint_sum,
    ties_elect_signs,
    ties_merge,
    ties_pair,
    ties_trim,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _load_peft_merge_utils():
    """peft's merge_utils.py loaded on its own: `import peft` pulls in transformers (~6 s) while
    the module itself only needs torch. The file is peft's, unchanged."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "merge_utils.py"
    if not path.is_file():
        return None
    mod_spec = importlib.util.spec_from_file_location("_peft_merge_utils_standalone", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


PEFT = _load_peft_merge_utils()
needs_peft = pytest.mark.skipif(PEFT is None, reason="peft is not installed")


def _abmil_like(seed: int, scale: float = 1.0, dtype=torch.float32) -> dict:
    """A small stand-in for the 8 MIL-encoder tensors (same names, reduced sizes)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return {
        "feat_proj.0.weight": r(24, 40),
        "feat_proj.0.bias": r(24),
        "attention.a.0.weight": r(16, 24),
        "attention.a.0.bias": r(16),
        "attention.b.0.weight": r(16, 24),
        "attention.b.0.bias": r(16),
        "attention.score.weight": r(1, 16),
        "attention.score.bias": r(1),
    }


def _clone(tv: dict) -> dict:
    return {k: v.clone() for k, v in tv.items()}


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k, v in a.items():
        assert v.dtype == b[k].dtype and v.shape == b[k].shape
        assert torch.equal(v, b[k]), k


def _t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _col_projector(a: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """Orthogonal projector on the column space of `a` (numerical rank by tolerance)."""
    u, s, _ = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
    rank = int((s > tol * s.max()).sum())
    u = u[:, :rank]
    return u @ u.T


# ---------------------------------------------------------------------------------------------
# TIES: hand-worked cases
# ---------------------------------------------------------------------------------------------


def test_ties_hand_worked_1x6_density_half():
    # density 0.5, n = 6 entries -> k = int(0.5 * 6) = 3 entries kept per vector.
    tau_t = {"w": _t([3.0, -1.0, 0.5, -4.0, 2.0, 0.25])}
    tau_i = {"w": _t([-5.0, 1.0, 0.5, -2.0, 0.1, -3.0])}
    # trim tau_t: magnitudes 3, 1, 0.5, 4, 2, 0.25 -> top 3 are 4 (idx 3), 3 (idx 0), 2 (idx 4)
    #   -> [3, 0, 0, -4, 2, 0]
    # trim tau_i: magnitudes 5, 1, 0.5, 2, 0.1, 3 -> top 3 are 5 (idx 0), 3 (idx 5), 2 (idx 3)
    #   -> [-5, 0, 0, -2, 0, -3]
    exp_t = _t([3.0, 0.0, 0.0, -4.0, 2.0, 0.0])
    exp_i = _t([-5.0, 0.0, 0.0, -2.0, 0.0, -3.0])
    assert torch.equal(ties_trim(tau_t, density=0.5)["w"], exp_t)
    assert torch.equal(ties_trim(tau_i, density=0.5)["w"], exp_i)
    # elect: sums = [-2, 0, 0, -6, 2, -3]; idx 1 and 2 sum to exactly 0 -> fallback = sign of
    # the total sum (-2 + 0 + 0 - 6 + 2 - 3 = -9) = -1
    # signs = [-1, -1, -1, -1, +1, -1]
    signs = ties_elect_signs([{"w": exp_t}, {"w": exp_i}])
    assert torch.equal(signs["w"], _t([-1.0, -1.0, -1.0, -1.0, 1.0, -1.0]))
    # disjoint sum: idx 0: only -5 agrees with '-' (3 dropped) -> -5
    #               idx 1, 2: nothing kept -> 0
    #               idx 3: -4 + -2 = -6 (both agree)  [peft's mean would give -3]
    #               idx 4: 2 (agrees with '+')
    #               idx 5: -3
    expected = _t([-5.0, 0.0, 0.0, -6.0, 2.0, -3.0])
    assert torch.equal(ties_pair(tau_t, tau_i, density=0.5)["w"], expected)
    assert torch.equal(ties_merge([tau_t, tau_i], density=0.5)["w"], expected)


def test_ties_hand_worked_1x5_density_0p4():
    # density 0.4, n = 5 -> k = int(0.4 * 5) = int(2.0) = 2
    tau_t = {"w": _t([3.0, -1.0, 0.5, -4.0, 2.0])}
    tau_i = {"w": _t([-5.0, 1.0, 0.5, 2.0, -3.0])}
    # trimmed tau_t: top 2 magnitudes 4 (idx 3) and 3 (idx 0) -> [3, 0, 0, -4, 0]
    # trimmed tau_i: top 2 magnitudes 5 (idx 0) and 3 (idx 4) -> [-5, 0, 0, 0, -3]
    # sums [-2, 0, 0, -4, -3] -> signs [-, fallback, fallback, -, -], total -9 -> fallback -
    # merged: [-5, 0, 0, -4, -3]
    out = ties_pair(tau_t, tau_i, density=0.4)
    assert torch.equal(out["w"], _t([-5.0, 0.0, 0.0, -4.0, -3.0]))


def test_ties_zero_sum_fallback_rules():
    # density 1 (no trimming). sums = [2 - 2, 1 + 0, 1 + 0, -4 - 1] = [0, 1, 1, -5]
    tau_t = {"w": _t([2.0, 1.0, 1.0, -4.0])}
    tau_i = {"w": _t([-2.0, 0.0, 0.0, -1.0])}
    # "total": total sum = 0 + 1 + 1 - 5 = -3 -> idx 0 elects '-' -> keeps tau_i's -2
    out = ties_pair(tau_t, tau_i, density=1.0)
    assert torch.equal(out["w"], _t([-2.0, 1.0, 1.0, -5.0]))
    # "majority" (TIES authors / STEPH release): sum of the elected signs = 0 + 1 + 1 - 1 = +1
    # -> idx 0 elects '+' -> keeps tau_t's 2
    out = ties_pair(tau_t, tau_i, density=1.0, zero_sign="majority")
    assert torch.equal(out["w"], _t([2.0, 1.0, 1.0, -5.0]))
    # "positive" (peft): '+' -> 2
    out = ties_pair(tau_t, tau_i, density=1.0, zero_sign="positive")
    assert torch.equal(out["w"], _t([2.0, 1.0, 1.0, -5.0]))


def test_ties_zero_total_falls_back_to_plus():
    # sums = [0, 0], total = 0 and no elected sign -> every rule ends at +1 -> keeps the +1's
    tau_t = {"w": _t([1.0, -3.0])}
    tau_i = {"w": _t([-1.0, 3.0])}
    for rule in ("total", "majority", "positive"):
        out = ties_pair(tau_t, tau_i, density=1.0, zero_sign=rule)
        assert torch.equal(out["w"], _t([1.0, 3.0])), rule


def test_ties_tie_rule_keeps_all_entries_tied_with_kth():
    # density 0.4, n = 5 -> k = 2; the 2nd largest magnitude is 3 and three entries have |x| = 3
    # rule: keep every entry with |x| >= the k-th largest magnitude -> 3 entries kept (k + 1 tie)
    tv = {"w": _t([3.0, -3.0, 1.0, 3.0, 0.5])}
    out = ties_trim(tv, density=0.4)["w"]
    assert torch.equal(out, _t([3.0, -3.0, 0.0, 3.0, 0.0]))
    assert int((out != 0).sum()) == 3


def test_ties_global_vs_per_tensor_scope():
    tv = {"a": _t([10.0, 9.0]), "b": _t([1.0, 2.0])}
    # global: n = 4, density 0.5 -> k = 2: the two largest are 10 and 9, both in "a"
    g = ties_trim(tv, density=0.5, scope="global")
    assert torch.equal(g["a"], _t([10.0, 9.0])) and torch.equal(g["b"], _t([0.0, 0.0]))
    # per tensor: n = 2 each -> k = 1: "a" keeps 10, "b" keeps 2
    p = ties_trim(tv, density=0.5, scope="per_tensor")
    assert torch.equal(p["a"], _t([10.0, 0.0])) and torch.equal(p["b"], _t([0.0, 2.0]))


def test_ties_density_zero_keeps_nothing_and_k_truncates():
    tv = {"w": _t([1.0, 2.0, 3.0])}
    assert torch.equal(ties_trim(tv, density=0.0)["w"], _t([0.0, 0.0, 0.0]))
    # density 0.3, n = 3 -> int(0.9) = 0 entries
    assert torch.equal(ties_trim(tv, density=0.3)["w"], _t([0.0, 0.0, 0.0]))
    # density 0.34 -> int(1.02) = 1 entry: the 3
    assert torch.equal(ties_trim(tv, density=0.34)["w"], _t([0.0, 0.0, 3.0]))


# ---------------------------------------------------------------------------------------------
# TIES: invariants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.5])
def test_ties_trim_keeps_exactly_k_without_ties(scope, density):
    tv = _abmil_like(0)  # continuous random values: no ties (almost surely)
    out = ties_trim(tv, density=density, scope=scope)
    if scope == "global":
        n = sum(t.numel() for t in tv.values())
        assert sum(int((t != 0).sum()) for t in out.values()) == int(density * n)
        kept = torch.cat([out[k].abs().reshape(-1) for k in out])
        dropped = torch.cat([tv[k].abs().reshape(-1)[out[k].reshape(-1) == 0] for k in out])
        # every kept magnitude >= every dropped one
        assert kept[kept > 0].min() >= dropped.max()
    else:
        for k, t in tv.items():
            assert int((out[k] != 0).sum()) == int(density * t.numel()), k
    for k in tv:  # kept values are unchanged
        mask = out[k] != 0
        assert torch.equal(out[k][mask], tv[k][mask])


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_merged_sign_equals_elected_sign(scope):
    a, b = _abmil_like(1), _abmil_like(2)
    trimmed = [ties_trim(a, 0.3, scope), ties_trim(b, 0.3, scope)]
    signs = ties_elect_signs(trimmed, scope=scope)
    merged = ties_merge([a, b], density=0.3, scope=scope)
    for k in merged:
        nz = merged[k] != 0
        assert torch.equal(torch.sign(merged[k][nz]), signs[k][nz]), k
        assert set(torch.unique(signs[k]).tolist()) <= {-1.0, 1.0}
    # and disjoint sum from the public steps equals the one-shot merge
    _assert_same(ties_disjoint_sum(trimmed, signs), merged)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_self_merge_is_twice_the_trimmed(scope):
    a = _abmil_like(3)
    out = ties_pair(a, a, density=0.2, scope=scope)
    trimmed = ties_trim(a, density=0.2, scope=scope)
    for k in a:
        assert torch.equal(out[k], 2 * trimmed[k]), k


def test_ties_density_one_with_agreeing_signs_is_plain_sum():
    g = torch.Generator().manual_seed(4)
    vectors = []
    for _ in range(3):
        tv = {
            k: torch.rand(v.shape, generator=g, dtype=torch.float64) + 0.1
            for k, v in _abmil_like(0).items()
        }
        vectors.append(tv)
    signs = {
        k: torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0).double()
        for k, v in vectors[0].items()
    }
    vectors = [{k: v * signs[k] for k, v in tv.items()} for tv in vectors]
    out = ties_merge(vectors, density=1.0)
    for k in out:
        torch.testing.assert_close(out[k], vectors[0][k] + vectors[1][k] + vectors[2][k])


def test_ties_single_vector_is_its_trimmed_version():
    a = _abmil_like(5)
    _assert_same(ties_merge([a], density=0.2), ties_trim(a, density=0.2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_ties_preserves_keys_shapes_dtypes_and_inputs(dtype):
    a, b = _abmil_like(6, dtype=dtype), _abmil_like(7, dtype=dtype)
    a0, b0 = _clone(a), _clone(b)
    out = ties_pair(a, b)
    assert list(out) == list(a)
    for k in a:
        assert out[k].shape == a[k].shape and out[k].dtype == dtype
        assert out[k].data_ptr() not in (a[k].data_ptr(), b[k].data_ptr())
    _assert_same(a, a0)
    _assert_same(b, b0)


def test_ties_under_autograd_inputs_gives_no_graph():
    a = {k: v.requires_grad_() for k, v in _abmil_like(8).items()}
    b = _abmil_like(9)
    out = ties_pair(a, b)
    assert not any(v.requires_grad for v in out.values())


# ---------------------------------------------------------------------------------------------
# TIES vs peft.utils.merge_utils (where the semantics agree)
# ---------------------------------------------------------------------------------------------


@needs_peft
@pytest.mark.parametrize("density", [0.0, 0.1, 0.2, 0.5, 1.0])
def test_per_tensor_trim_matches_peft_prune(density):
    # agreement: per-tensor scope, k = int(density * numel), no ties in random data.
    # difference: peft keeps exactly k with topk (ties broken arbitrarily), we keep ties;
    # peft's prune returns the tensor untouched (with a warning) at density >= 1.
    tv = _abmil_like(10)
    ours = ties_trim(tv, density=density, scope="per_tensor")
    for k, t in tv.items():
        with pytest.warns(UserWarning) if density >= 1 else contextlib.nullcontext():
            ref = PEFT.prune(t, density, method="magnitude")
        assert torch.equal(ours[k], ref), k


@needs_peft
def test_sign_mask_matches_peft_majority_sign_mask():
    # agreement: the elected sign of the *sum* ('total' method) and the mask "value has the
    # elected sign" (zeros never agree). difference: where the sum is exactly 0 peft elects +1
    # (sum >= 0): identical to zero_sign="positive"; our default uses the total-sum sign.
    a, b, c = _abmil_like(11), _abmil_like(12), _abmil_like(13)
    trimmed = [ties_trim(v, 0.2, "per_tensor") for v in (a, b, c)]
    for rule in ("positive", "total"):
        signs = ties_elect_signs(trimmed, scope="per_tensor", zero_sign=rule)
        for k in a:
            stacked = torch.stack([t[k] for t in trimmed])
            ref_mask = PEFT.calculate_majority_sign_mask(stacked, method="total")
            ours_mask = torch.sign(stacked) == signs[k].unsqueeze(0)
            assert torch.equal(ours_mask, ref_mask), (rule, k)
            # magnitude_prune with unit weights is the sum of the trimmed vectors
            summed = PEFT.magnitude_prune([a[k], b[k], c[k]], torch.ones(3), 0.2)
            nz = summed != 0
            assert torch.equal(torch.sign(summed[nz]), signs[k][nz])


@needs_peft
def test_sign_mask_differs_from_peft_only_on_zero_sums():
    # sums [0, 1, 1, -5] (see test_ties_zero_sum_fallback_rules): peft elects '+' at idx 0,
    # our default elects the total-sum sign '-'.
    stacked = torch.stack([_t([2.0, 1.0, 1.0, -4.0]), _t([-2.0, 0.0, 0.0, -1.0])])
    ref = PEFT.calculate_majority_sign_mask(stacked, method="total")
    signs = ties_elect_signs([{"w": stacked[0]}, {"w": stacked[1]}])["w"]
    ours = torch.sign(stacked) == signs.unsqueeze(0)
    # stacked has shape (2 tasks, 1, 4): entry idx is [..., idx]
    assert torch.equal(ours[..., 1:], ref[..., 1:])
    assert ours[:, 0, 0].tolist() == [False, True] and ref[:, 0, 0].tolist() == [True, False]


@needs_peft
def test_disjoint_sum_is_peft_disjoint_mean_times_count():
    # difference: peft's disjoint_merge divides by the number of agreeing entries (min 1);
    # TIES AM uses the sum: sum = mean * count.
    a, b, c = _abmil_like(14), _abmil_like(15), _abmil_like(16)
    trimmed = [ties_trim(v, 0.2, "per_tensor") for v in (a, b, c)]
    signs = ties_elect_signs(trimmed, scope="per_tensor", zero_sign="positive")
    ours = ties_disjoint_sum(trimmed, signs)
    for k in a:
        stacked = torch.stack([t[k] for t in trimmed])
        mask = PEFT.calculate_majority_sign_mask(stacked, method="total")
        mean = PEFT.disjoint_merge(stacked, mask)
        torch.testing.assert_close(ours[k], mean * mask.sum(dim=0))


@needs_peft
def test_full_ties_matches_peft_ties_times_count_per_tensor():
    a, b = _abmil_like(17), _abmil_like(18)
    ours = ties_merge([a, b], density=0.2, scope="per_tensor", zero_sign="positive")
    for k in a:
        ref_mean = PEFT.ties([a[k], b[k]], torch.ones(2), density=0.2)
        pruned = torch.stack([PEFT.prune(t, 0.2, "magnitude") for t in (a[k], b[k])])
        count = PEFT.calculate_majority_sign_mask(pruned, method="total").sum(dim=0)
        torch.testing.assert_close(ours[k], ref_mean * count)


# ---------------------------------------------------------------------------------------------
# Iso-C
# ---------------------------------------------------------------------------------------------


def test_iso_c_hand_diagonal_2x2():
    # M = diag(3, 0) + diag(1, 2) = diag(4, 2): S = (4, 2), mean 3, U = V = I -> diag(3, 3)
    out = iso_c_pair({"w": torch.diag(_t(3.0, 0.0))}, {"w": torch.diag(_t(1.0, 2.0))})
    torch.testing.assert_close(out["w"], torch.diag(_t(3.0, 3.0)))
    # M = diag(4, -2): S = (4, 2), U = I, V = diag(1, -1) -> 3 * diag(1, -1) = diag(3, -3)
    out = iso_c_pair({"w": torch.diag(_t(3.0, -1.0))}, {"w": torch.diag(_t(1.0, -1.0))})
    torch.testing.assert_close(out["w"], torch.diag(_t(3.0, -3.0)))


def test_iso_c_bias_is_average_and_1xd_is_the_sum():
    tau_t = {"b": _t(1.0, 2.0), "s": _t([1.0, 2.0, 2.0])}
    tau_i = {"b": _t(3.0, 6.0), "s": _t([1.0, 0.0, 0.0])}
    out = iso_c_pair(tau_t, tau_i)
    torch.testing.assert_close(out["b"], _t(2.0, 4.0))
    # a 1 x d matrix has one singular value, so its isotropic version is M itself (the sum)
    torch.testing.assert_close(out["s"], _t([2.0, 2.0, 2.0]))


@pytest.mark.parametrize("shape", [(20, 12), (7, 15), (9, 9)])
def test_iso_c_flat_spectrum_with_mean_value_and_same_subspaces(shape):
    g = torch.Generator().manual_seed(20)
    tau_t = {"w": torch.randn(shape, generator=g, dtype=torch.float64)}
    tau_i = {"w": torch.randn(shape, generator=g, dtype=torch.float64)}
    m = tau_t["w"] + tau_i["w"]
    out = iso_c_pair(tau_t, tau_i)["w"]
    s_out = torch.linalg.svdvals(out)
    s_m = torch.linalg.svdvals(m)
    torch.testing.assert_close(s_out, torch.full_like(s_out, s_m.mean().item()))
    # same column and row spaces as M (compare the orthogonal projectors)
    torch.testing.assert_close(_col_projector(out), _col_projector(m))
    torch.testing.assert_close(_col_projector(out.T), _col_projector(m.T))
    # and Iso-C is "M with its singular values replaced": U^T out V is diagonal
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(
        u.T @ out @ vh.T, torch.eye(min(shape), dtype=torch.float64) * s_m.mean()
    )


def test_iso_c_rank_deficient_input_has_no_nan():
    tau_t = _abmil_like(21)
    tau_i = _clone(tau_t)
    for k, v in tau_i.items():  # tau_i = -tau_t on the first half of the rows
        v[: max(1, v.shape[0] // 2)] *= -1
    out = iso_c_pair(tau_t, tau_i)
    for k, v in out.items():
        assert torch.isfinite(v).all(), k
        if v.dim() == 2 and v.shape[0] > 1:
            s = torch.linalg.svdvals(v.double())
            torch.testing.assert_close(s, torch.full_like(s, s.mean().item()), atol=1e-5, rtol=1e-5)
    # exactly opposite task vectors: M = 0, every singular value 0 -> zero output
    zero = iso_c_pair(tau_t, {k: -v for k, v in tau_t.items()})
    for k, v in zero.items():
        assert torch.isfinite(v).all() and torch.count_nonzero(v) == 0, k


def test_iso_c_n_tasks():
    vs = [_abmil_like(s, dtype=torch.float64) for s in (22, 23, 24)]
    out = iso_c(vs)
    for k in out:
        total = vs[0][k] + vs[1][k] + vs[2][k]
        if out[k].dim() == 2 and min(out[k].shape) > 1:
            s = torch.linalg.svdvals(out[k])
            torch.testing.assert_close(s, torch.full_like(s, torch.linalg.svdvals(total).mean()))
        elif out[k].dim() == 1:
            torch.testing.assert_close(out[k], total / 3)
    _assert_same(iso_c([vs[0], vs[1]]), iso_c_pair(vs[0], vs[1]))


@pytest.mark.parametrize("fn", [iso_c_pair, iso_cts_pair])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_iso_preserves_keys_shapes_dtypes_and_inputs(fn, dtype):
    a, b = _abmil_like(25, dtype=dtype), _abmil_like(26, dtype=dtype)
    a0, b0 = _clone(a), _clone(b)
    out = fn(a, b)
    assert list(out) == list(a)
    for k in a:
        assert out[k].shape == a[k].shape and out[k].dtype == dtype, k
        assert torch.isfinite(out[k].float()).all()
    _assert_same(a, a0)
    _assert_same(b, b0)


# ---------------------------------------------------------------------------------------------
# Iso-CTS
# ---------------------------------------------------------------------------------------------


def test_iso_cts_sizes_hand_worked():
    # r = 384, T = 2, f = 0.8: int(307.2) = 307; (384 - 307) / 2 = 38.5 -> round half to even
    # = 38 per task; common = 384 - 76 = 308
    assert iso_cts_sizes(384, 2, 0.8) == (308, 38)
    # r = 512: int(409.6) = 409; 103 / 2 = 51.5 -> 52; common = 512 - 104 = 408
    assert iso_cts_sizes(512, 2, 0.8) == (408, 52)
    # r = 1: int(0.8) = 0; 1 / 2 = 0.5 -> 0; common = 1
    assert iso_cts_sizes(1, 2, 0.8) == (1, 0)
    # r = 10, T = 3, f = 0: 10 / 3 = 3.33 -> 3; common = 1
    assert iso_cts_sizes(10, 3, 0.0) == (1, 3)
    # r = 2, T = 3, f = 0: 2 / 3 -> round 1, but 3 tasks x 1 > 2: capped at 2 // 3 = 0
    assert iso_cts_sizes(2, 3, 0.0) == (2, 0)
    for r in range(40):
        for t in (1, 2, 3, 5):
            for f in (0.0, 0.3, 0.8, 1.0):
                k, s = iso_cts_sizes(r, t, f)
                assert k + t * s == r and k >= 0 and s >= 0


def test_iso_cts_hand_diagonal_4x4():
    # f = 0.5, r = 4, T = 2: int(2.0) = 2, (4 - 2) / 2 = 1 per task, common = 2
    tau_t = {"w": torch.diag(_t(5.0, 0.0, 2.0, 0.25))}
    tau_i = {"w": torch.diag(_t(3.0, 1.0, 0.0, 0.5))}
    # M = diag(8, 1, 2, 0.75): common subspace = top 2 = e1 (8), e3 (2)
    # tau_t minus its e1/e3 part = diag(0, 0, 0, 0.25): top direction e4, sigma 0.25
    # tau_i minus its e1/e3 part = diag(0, 1, 0, 0.5): top direction e2, sigma 1
    # combined spectrum (8, 2, 0.25, 1), mean 11.25 / 4 = 2.8125; U* = V* = [e1, e3, e4, e2]
    # (orthonormal, signs paired) -> output 2.8125 * I
    out = iso_cts_pair(tau_t, tau_i, common_space_fraction=0.5)
    torch.testing.assert_close(out["w"], 2.8125 * torch.eye(4, dtype=torch.float64))
    # Iso-C would give mean(8, 2, 1, 0.75) = 2.9375 instead
    torch.testing.assert_close(
        iso_c_pair(tau_t, tau_i)["w"], 2.9375 * torch.eye(4, dtype=torch.float64)
    )


@pytest.mark.parametrize("shape", [(30, 10), (10, 30), (12, 12)])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.8])
def test_iso_cts_flat_spectrum(shape, fraction):
    g = torch.Generator().manual_seed(30)
    a = {"w": torch.randn(shape, generator=g, dtype=torch.float64)}
    b = {"w": torch.randn(shape, generator=g, dtype=torch.float64)}
    out = iso_cts_pair(a, b, common_space_fraction=fraction)["w"]
    s = torch.linalg.svdvals(out)
    # all min(m, n) singular values equal: out / sigma = U V^T with orthonormal U and V
    torch.testing.assert_close(s, torch.full_like(s, s[0].item()))
    assert s[0] > 0
    u, _, vh = torch.linalg.svd(out / s[0], full_matrices=False)
    torch.testing.assert_close(out / s[0], u @ vh)


def _top(a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n left and right singular vectors (as columns)."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :n], vh[:n, :].T


@pytest.mark.parametrize("shape", [(30, 10), (10, 30)])
def test_iso_cts_subspaces_contain_common_and_task_specific_directions(shape):
    # r = 10, f = 0.6 -> common 6, 2 per task. The tall case tests the left side (a 10-dim
    # subspace of R^30), the wide case the right side; the other side is the whole space.
    g = torch.Generator().manual_seed(31)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    out = iso_cts_pair({"w": a}, {"w": b}, common_space_fraction=0.6)["w"]
    left, right = _col_projector(out), _col_projector(out.T)
    assert torch.linalg.matrix_rank(left) == torch.linalg.matrix_rank(right) == 10
    u_c, v_c = _top(a + b, 6)
    torch.testing.assert_close(left @ u_c, u_c)
    torch.testing.assert_close(right @ v_c, v_c)
    specific = []
    for d in (a, b):
        d_perp = d - u_c @ (u_c.T @ d)  # orthogonal to the common subspace, on the left
        u_s, v_s = _top(d_perp, 2)
        torch.testing.assert_close(left @ u_s, u_s)
        torch.testing.assert_close(right @ v_s, v_s)
        specific.append((u_s, v_s))
    # whereas Iso-C keeps the column / row space of M, which does not contain them
    iso = iso_c_pair({"w": a}, {"w": b})["w"]
    u_s, v_s = specific[0]
    if shape[0] > shape[1]:
        assert not torch.allclose(_col_projector(iso) @ u_s, u_s, atol=1e-3)
    else:
        assert not torch.allclose(_col_projector(iso.T) @ v_s, v_s, atol=1e-3)


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (1, 16)])
def test_iso_cts_fraction_one_is_iso_c(shape):
    g = torch.Generator().manual_seed(32)
    a = {"w": torch.randn(shape, generator=g, dtype=torch.float64), "b": torch.randn(4)}
    b = {"w": torch.randn(shape, generator=g, dtype=torch.float64), "b": torch.randn(4)}
    cts = iso_cts_pair(a, b, common_space_fraction=1.0)
    c = iso_c_pair(a, b)
    for k in c:
        torch.testing.assert_close(cts[k], c[k])


def test_iso_cts_low_rank_inputs_have_no_nan():
    g = torch.Generator().manual_seed(33)
    x = torch.randn(24, 1, generator=g) @ torch.randn(1, 16, generator=g)  # rank 1
    cases = [
        ({"w": x}, {"w": x.clone()}),  # identical: duplicate task-specific directions
        ({"w": x}, {"w": -x}),  # M = 0
        ({"w": x}, {"w": torch.zeros_like(x)}),
        ({"w": torch.zeros(24, 16)}, {"w": torch.zeros(24, 16)}),
    ]
    for tau_t, tau_i in cases:
        for f in (0.0, 0.5, 0.8):
            out = iso_cts_pair(tau_t, tau_i, common_space_fraction=f)["w"]
            assert torch.isfinite(out).all()
            s = torch.linalg.svdvals(out.double())
            torch.testing.assert_close(s, torch.full_like(s, s.mean().item()), atol=1e-5, rtol=1e-5)


def test_iso_cts_n_tasks_flat_and_biases_mean():
    vs = [_abmil_like(s, dtype=torch.float64) for s in (34, 35, 36)]
    out = iso_cts(vs, common_space_fraction=0.5)
    for k, v in out.items():
        if v.dim() == 2 and min(v.shape) > 1:
            s = torch.linalg.svdvals(v)
            torch.testing.assert_close(s, torch.full_like(s, s[0].item()))
        elif v.dim() == 1:
            torch.testing.assert_close(v, (vs[0][k] + vs[1][k] + vs[2][k]) / 3)
    _assert_same(iso_cts(vs[:2], 0.8), iso_cts_pair(vs[0], vs[1], 0.8))


# ---------------------------------------------------------------------------------------------
# dispatch, determinism, errors
# ---------------------------------------------------------------------------------------------


def test_preprocess_pairwise_dispatch_and_purity():
    tau_t = _abmil_like(40)
    sources = [_abmil_like(41), _abmil_like(42)]
    t0, s0 = _clone(tau_t), [_clone(s) for s in sources]
    out = preprocess_pairwise(tau_t, sources, "ties", density=0.3, scope="per_tensor")
    for o, s in zip(out, sources):
        _assert_same(o, ties_pair(tau_t, s, density=0.3, scope="per_tensor"))
    out = preprocess_pairwise(tau_t, sources, "iso_c")
    for o, s in zip(out, sources):
        _assert_same(o, iso_c_pair(tau_t, s))
    out = preprocess_pairwise(tau_t, sources, "iso_cts", common_space_fraction=0.5)
    for o, s in zip(out, sources):
        _assert_same(o, iso_cts_pair(tau_t, s, 0.5))
    out = preprocess_pairwise(tau_t, sources, "none")
    for o, s in zip(out, sources):
        _assert_same(o, s)
        assert all(o[k].data_ptr() != s[k].data_ptr() for k in s)  # copies, not aliases
    _assert_same(tau_t, t0)
    for s, s_0 in zip(sources, s0):
        _assert_same(s, s_0)


def test_deterministic():
    a, b = _abmil_like(43), _abmil_like(44)
    for fn in (ties_pair, iso_c_pair, iso_cts_pair):
        _assert_same(fn(a, b), fn(a, b))


def test_errors():
    a, b = _abmil_like(45), _abmil_like(46)
    with pytest.raises(ConfigError, match="method"):
        preprocess_pairwise(a, [b], "dare")
    with pytest.raises(ConfigError, match="density"):
        preprocess_pairwise(a, [b], "iso_c", density=0.2)
    with pytest.raises(ConfigError, match="density"):
        ties_pair(a, b, density=1.5)
    with pytest.raises(ConfigError, match="density"):
        ties_pair(a, b, density=math.nan)
    with pytest.raises(ConfigError, match="scope"):
        ties_pair(a, b, scope="layer")
    with pytest.raises(ConfigError, match="zero_sign"):
        ties_pair(a, b, zero_sign="frequency")
    with pytest.raises(ConfigError, match="common_space_fraction"):
        iso_cts_pair(a, b, common_space_fraction=-0.1)
    with pytest.raises(ConfigError):
        ties_merge([])
    missing = {k: v for k, v in b.items() if k != "attention.score.bias"}
    with pytest.raises(DataError, match="attention.score.bias"):
        iso_c_pair(a, missing)
    bad_shape = _clone(b)
    bad_shape["feat_proj.0.bias"] = torch.zeros(3)
    with pytest.raises(DataError, match="feat_proj.0.bias"):
        ties_pair(a, bad_shape)
    bad_dtype = _clone(b)
    bad_dtype["feat_proj.0.bias"] = bad_dtype["feat_proj.0.bias"].double()
    with pytest.raises(DataError, match="dtype"):
        iso_cts_pair(a, bad_dtype)


def test_svd_falls_back_when_lapack_fails_to_converge(monkeypatch):
    """gesdd can fail on ill-conditioned input; the result must then come from gesvd."""
    import steph.merging.preprocess as pp

    a = torch.randn(7, 5, dtype=torch.float64)
    expected = torch.linalg.svd(a, full_matrices=False)

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", failing)
    u, s, vh = pp._svd(a)
    torch.testing.assert_close(s, expected.S)
    torch.testing.assert_close((u * s) @ vh, a)
