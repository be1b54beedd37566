"""The experts' inputs are computed once per run directory, equal a direct forward of each model
file, are reused on resume and computed again when a model file changes."""

from __future__ import annotations

import torch

from steph.merging.pool import ModelPool
from steph.models import ABMIL
from steph.transfer import CACHE_FILE, ExpertBank, expert_embeddings, state_digest
from steph.utils.io import load_tensors, save_tensors

HP = {"in_dim": 10, "n_bins": 4, "hidden_dim": 8, "attn_dim": 4}


def _write_models(root, names=("TGT", "A", "B")):
    torch.manual_seed(0)
    theta0 = ABMIL(**HP).state_dict()
    save_tensors(root / "theta0.safetensors", theta0)
    paths = {}
    for n in names:
        state = {k: v + 0.1 * torch.randn_like(v) for k, v in theta0.items()}
        paths[n] = root / f"{n}.safetensors"
        save_tensors(paths[n], state)
    return paths


def _pool(root, paths):
    return ModelPool.from_files(root / "theta0.safetensors", ("TGT", paths["TGT"]),
                                [(n, p) for n, p in paths.items() if n != "TGT"], hparams=HP)


class Bags:
    """Bags of varying size by patient id, counting the loads."""

    def __init__(self, n=6):
        g = torch.Generator().manual_seed(1)
        self.bags = {f"P{i}": torch.randn(5 + 3 * i, HP["in_dim"], generator=g) for i in range(n)}
        self.loads = 0

    def __call__(self, pid):
        self.loads += 1
        return self.bags[pid]


def test_embeddings_are_cached_once_and_equal_direct_forwards(tmp_path):
    paths = _write_models(tmp_path)
    bank = ExpertBank.from_pool(_pool(tmp_path, paths))
    assert bank.names == ["TGT", "A", "B"]  # the self expert first
    bags, run = Bags(), tmp_path / "run"
    emb = expert_embeddings(bank, list(bags.bags), bags, run)
    assert emb.computed and bags.loads == 6 and (run / CACHE_FILE).exists()
    for j, name in enumerate(bank.names):  # a direct forward of each model file, eval mode
        model = ABMIL(**HP)
        model.load_state_dict(load_tensors(paths[name]))
        model.eval()
        for pid, bag in bags.bags.items():
            with torch.no_grad():
                assert torch.equal(emb[pid][j], model.embed(bag)[0][0]), (name, pid)

    # resume / rerun: read back, no bag loaded, identical values; a subset of patients too
    again = expert_embeddings(ExpertBank.from_pool(_pool(tmp_path, paths)), list(bags.bags),
                              bags, run)
    assert not again.computed and bags.loads == 6
    assert torch.equal(again.values, emb.values)
    part = expert_embeddings(bank, ["P4", "P1"], bags, run)
    assert not part.computed and torch.equal(part.of(["P4", "P1"]), emb.of(["P4", "P1"]))


def test_a_changed_model_file_invalidates_the_cache(tmp_path):
    paths = _write_models(tmp_path)
    bags, run = Bags(), tmp_path / "run"
    first = expert_embeddings(ExpertBank.from_pool(_pool(tmp_path, paths)), list(bags.bags), bags,
                              run)
    state = load_tensors(paths["A"])  # source A is retrained
    state["feat_proj.0.weight"] = state["feat_proj.0.weight"] * 1.5
    save_tensors(paths["A"], state)
    bank = ExpertBank.from_pool(_pool(tmp_path, paths))
    second = expert_embeddings(bank, list(bags.bags), bags, run)
    assert second.computed and bags.loads == 12
    assert not torch.equal(second.values[:, 1], first.values[:, 1])  # A changed
    assert torch.equal(second.values[:, [0, 2]], first.values[:, [0, 2]])  # TGT and B did not
    # the file now holds the new embeddings: a third call reads them back
    third = expert_embeddings(bank, list(bags.bags), bags, run)
    assert not third.computed and torch.equal(third.values, second.values)


def test_patients_outside_the_cache_recompute(tmp_path):
    paths = _write_models(tmp_path)
    bank = ExpertBank.from_pool(_pool(tmp_path, paths))
    bags, run = Bags(), tmp_path / "run"
    expert_embeddings(bank, ["P0", "P1"], bags, run)
    more = expert_embeddings(bank, ["P0", "P1", "P2"], bags, run)
    assert more.computed and bags.loads == 5


def test_state_digest_sees_every_change():
    state = ABMIL(**HP).state_dict()
    d = state_digest(state)
    assert d == state_digest({k: v.clone() for k, v in reversed(list(state.items()))})
    bumped = dict(state)
    bumped["head.bias"] = state["head.bias"].clone()
    bumped["head.bias"][0] += 1e-6
    assert state_digest(bumped) != d
