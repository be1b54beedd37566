"""Damaged artefacts: load_artefact and `steph predict` give one line naming the file and what is
wrong, never a library traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from steph.cli import main
from steph.data.features import write_features_h5
from steph.errors import RunError
from steph.inference import load_artefact, save_artefact
from steph.models import ABMIL
from steph.survival.bins import TimeBins

DIM = 6


@pytest.fixture
def artefact(tmp_path):
    torch.manual_seed(0)
    model = ABMIL(DIM, 4, hidden_dim=8, attn_dim=4)
    path = save_artefact(tmp_path / "run" / "model.safetensors", model, "abmil", model.hparams(),
                         TimeBins.uniform(4, 400.0), DIM)
    slide = write_features_h5(tmp_path / "slide.h5",
                              np.random.default_rng(0).normal(size=(5, DIM)).astype(np.float32))
    return path, slide, model


def _manifest(path):
    return path.with_suffix(".json")


def _edit_manifest(path, fn):
    m = json.loads(_manifest(path).read_text())
    fn(m)
    _manifest(path).write_text(json.dumps(m))


def test_manifest_records_the_weights_checksum_and_old_manifests_still_load(artefact):
    import hashlib

    path, _, model = artefact
    m = json.loads(_manifest(path).read_text())
    assert m["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    _edit_manifest(path, lambda m: m.pop("weights_sha256"))  # written before the checksum
    loaded, _ = load_artefact(path.parent)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                  model.state_dict().values()))


def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])


def _flip(path):
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1
    path.write_bytes(bytes(raw))


def _other_weights(path):
    from steph.utils.io import save_tensors

    torch.manual_seed(1)
    save_tensors(path, ABMIL(DIM, 4, hidden_dim=16, attn_dim=4).state_dict())


DAMAGE = {
    # name: (what to do to the artefact, the file the message names, what it says)
    "truncated weights": (lambda p: _truncate(p), "weights", "truncated"),
    "flipped bit": (lambda p: _flip(p), "weights", "checksum"),
    "weights without their manifest": (lambda p: _manifest(p).unlink(), "manifest",
                                       "manifest missing"),
    "manifest without its weights": (lambda p: p.unlink(), "weights", "weights file missing"),
    "manifest not JSON": (lambda p: _manifest(p).write_text("{'kind': abmil"), "manifest",
                          "not valid JSON"),
    "manifest a list": (lambda p: _manifest(p).write_text("[1, 2]"), "manifest",
                        "not an artefact manifest"),
    "kind missing": (lambda p: _edit_manifest(p, lambda m: m.pop("kind")), "manifest",
                     "field 'kind' missing"),
    "kind unknown": (lambda p: _edit_manifest(p, lambda m: m.update(kind="resnet")), "manifest",
                     "unknown model kind 'resnet'"),
    "kind a number": (lambda p: _edit_manifest(p, lambda m: m.update(kind=3)), "manifest",
                      "field 'kind' must be a string"),
    "settings a string": (lambda p: _edit_manifest(p, lambda m: m.update(settings="abmil")),
                          "manifest", "field 'settings' must be an object"),
    "settings unknown key": (lambda p: _edit_manifest(p, lambda m: m["settings"].update(x=1)),
                             "manifest", "field 'settings' does not describe a abmil model"),
    "bins broken": (lambda p: _edit_manifest(p, lambda m: m.update(bins={"edges": [5, 1]})),
                    "manifest", "field 'bins'"),
    "feature_dim text": (lambda p: _edit_manifest(p, lambda m: m.update(feature_dim="6")),
                         "manifest", "field 'feature_dim' must be a positive integer"),
    "format unknown": (lambda p: _edit_manifest(p, lambda m: m.update(format="other/9")),
                       "manifest", "unknown artefact format"),
    "weights of another model": (lambda p: (_other_weights(p), _edit_manifest(
        p, lambda m: m.pop("weights_sha256"))), "weights", "do not fit the abmil model"),
    "weights replaced": (lambda p: _other_weights(p), "weights", "checksum mismatch"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_artefact_is_one_line_naming_the_file(case, artefact, capsys):
    path, slide, _ = artefact
    damage, which, needle = DAMAGE[case]
    damage(path)
    named = path if which == "weights" else _manifest(path)
    with pytest.raises(RunError) as err:
        load_artefact(path.parent)
    msg = str(err.value)
    assert str(named) in msg and needle in msg and "\n" not in msg, msg
    # the same through the command line: exit 1, one line on stderr, no traceback
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", str(path.parent), str(slide)])
    out = capsys.readouterr()
    assert exc.value.code == 1
    assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert str(named) in out.err and needle in out.err and "Traceback" not in out.err


def test_intact_artefact_predicts(artefact, capsys):
    path, slide, _ = artefact
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", str(path.parent), str(slide)])
        raise SystemExit(0)
    assert exc.value.code == 0 and "slide" in capsys.readouterr().out
