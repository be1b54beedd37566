"""The trainer on its device and data pipeline: the same weights with 0 or 2 worker processes
(and across a resume that changes the count), device-independent checkpoints, mixed precision on
the CPU, and a corrupt file met by a worker mid-run: a clean stop, then a resume once fixed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from steph.config import TrainConfig
from steph.data.cohort import Cohort
from steph.data.dataset import BagDataset
from steph.data.features import read_features_stored, write_features_h5
from steph.errors import DataError
from steph.models import ABMIL
from steph.survival import TimeBins
from steph.training.trainer import _load_checkpoint, _save_checkpoint, fit, parameter_groups
from steph.runs import RunDir
from steph.utils.io import load_tensor_metadata

from .test_trainer import make_bags, small_model

CFG = {"epochs": 3, "bags_per_step": 4, "warmup_epochs": 1, "lr": 1e-2, "device": "cpu", "eval_every": 1}


def _datasets(root):
    cohort = Cohort.load(root)
    ids = cohort.patient_ids
    bins = TimeBins.uniform(4, 4000.0)
    train = BagDataset(cohort, ids[:20], bins, max_instances=12, seed=0)
    return train, BagDataset(cohort, ids[20:26], bins)


def _model(seed=0):
    torch.manual_seed(seed)
    return ABMIL(16, 4, hidden_dim=8, attn_dim=4, dropout=0.25)


def _strip(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


class Stop(Exception):
    pass


def test_zero_or_two_workers_give_bit_identical_weights(tiny_data, tmp_path):
    """Same seed -> same bag order, same patch subsets, same weights and log, whatever the
    number of workers; a run interrupted with 2 workers and resumed with 0 ends the same."""
    train, test = _datasets(tiny_data / "TGT")
    cfg = TrainConfig(head_init="fit", **CFG)  # the head start reads the bags too
    ref = _model()
    ref_res = fit(ref, train, cfg, tmp_path / "w0", test=test, progress=False, workers=0)
    two = _model()
    res = fit(two, train, cfg, tmp_path / "w2", test=test, progress=False, workers=2)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, two.state_dict()[k]), k
    assert _strip(res.history) == _strip(ref_res.history)
    assert {r["device"] for r in res.history} == {"cpu"}

    def stop(row):
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(_model(), train, cfg, tmp_path / "mixed", test=test, progress=False, workers=2,
            on_epoch_end=stop)
    resumed = _model(seed=5)
    res = fit(resumed, train, cfg, tmp_path / "mixed", test=test, progress=False, workers=0)
    assert res.resumed_from == 1
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_checkpoint_restores_onto_the_devices_of_the_model(tmp_path):
    """Checkpoints hold CPU tensors; loading puts the weights and the optimiser state wherever
    the new model lives (here the meta device stands for "another device")."""
    model = small_model()
    opt = torch.optim.AdamW(parameter_groups(model, 1e-5), lr=1e-3)
    bag = make_bags(1)[0]
    model(bag["features"]).sum().backward()
    opt.step()
    path = tmp_path / RunDir.CHECKPOINT
    _save_checkpoint(path, model, opt, epoch=1, step=1, history=[{"epoch": 1}])
    with torch.device("meta"):
        elsewhere = small_model()
    opt2 = torch.optim.AdamW(parameter_groups(elsewhere, 1e-5), lr=1e-3)
    ckpt = _load_checkpoint(tmp_path, elsewhere, opt2)
    assert (ckpt.epoch, ckpt.step, ckpt.history) == (1, 1, [{"epoch": 1}])
    states = [opt2.state[p] for g in opt2.param_groups for p in g["params"]]
    assert states and all(s["exp_avg"].device.type == "meta" for s in states)
    assert all(float(s["step"]) == 1.0 for s in states)
    back = small_model(seed=3)  # and onto the CPU again: the very same values
    opt3 = torch.optim.AdamW(parameter_groups(back, 1e-5), lr=1e-3)
    _load_checkpoint(tmp_path, back, opt3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    for p, q in zip(model.parameters(), back.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt3.state[q]["exp_avg_sq"])


def test_bf16_on_cpu_trains_close_to_fp32(tmp_path):
    bags, test = make_bags(16), make_bags(8, seed=1)
    runs = {}
    for precision in ("fp32", "bf16"):
        model = small_model(dropout=0.0)
        # the fitted head start solves a ridge problem on bf16 embeddings: its small rounding
        # differences would be compared too; the training is what this test is about
        cfg = TrainConfig(**CFG, precision=precision, head_init="baseline")
        res = fit(model, bags, cfg, tmp_path / precision, test=test, progress=False)
        runs[precision] = (model, res.history)
    (m32, h32), (m16, h16) = runs["fp32"], runs["bf16"]
    for row in h16:
        assert all(np.isfinite(row[k]) for k in ("train_loss", "test_loss", "test_cindex"))
        assert abs(row["train_loss"] - h32[row["epoch"] - 1]["train_loss"]) < 0.05
    assert any(not torch.equal(a, b) for a, b in zip(m32.parameters(), m16.parameters()))
    for (name, a), b in zip(m32.named_parameters(), m16.parameters()):
        assert a.dtype == b.dtype == torch.float32, name  # autocast never changes the weights
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)


def test_fp16_keeps_its_gradient_scaler_across_a_resume(tmp_path):
    bags = make_bags(8)
    cfg = TrainConfig(**{**CFG, "eval_every": 0}, precision="fp16")
    ref = small_model()
    fit(ref, bags, cfg, tmp_path / "ref", progress=False)

    def stop(row):
        if row["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(small_model(), bags, cfg, tmp_path / "run", progress=False, on_epoch_end=stop)
    meta = load_tensor_metadata(tmp_path / "run" / RunDir.CHECKPOINT)
    scaler = json.loads(meta["grad_scaler"])
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 4  # 2 epochs x 2 clean steps
    resumed = small_model(seed=9)
    fit(resumed, bags, cfg, tmp_path / "run", progress=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_corrupt_file_in_a_worker_stops_the_run_cleanly_and_it_resumes_once_fixed(
        tiny_data, tmp_path):
    root = tmp_path / "TGT"
    shutil.copytree(tiny_data / "TGT", root)
    train, test = _datasets(root)
    cfg = TrainConfig(**CFG)
    ref = _model()
    fit(ref, train, cfg, tmp_path / "ref", test=test, progress=False, workers=1)

    pid = train.patient_ids[3]
    slide = train.cohort.slide_paths(pid)[0]
    pristine = slide.read_bytes()

    def corrupt(row):
        if row["epoch"] == 1:
            x = read_features_stored(slide).astype(np.float32)
            x[0, 0] = np.nan
            write_features_h5(slide, x)

    run = tmp_path / "run"
    with pytest.raises(DataError) as err:
        fit(_model(), train, cfg, run, test=test, progress=False, workers=1,
            on_epoch_end=corrupt)
    msg = str(err.value)
    assert f"cohort 'TGT', patient '{pid}'" in msg and slide.name in msg and "NaN" in msg
    assert "\n" not in msg and "DataLoader" not in msg
    assert load_tensor_metadata(run / RunDir.CHECKPOINT)["epoch"] == "1"  # the last epoch intact
    assert len((run / RunDir.LOG).read_text().splitlines()) == 1

    slide.write_bytes(pristine)  # the file is fixed: the same command resumes and finishes
    resumed = _model(seed=4)
    res = fit(resumed, train, cfg, run, test=test, progress=False, workers=1)
    assert res.resumed_from == 1
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
