"""Self-contained model artefacts and prediction for new patients.

An artefact is ``<name>.safetensors`` (every tensor of the module, buffers included: a STEPH
artefact carries theta_0 and the stacked task vectors, so no source checkpoint is needed) plus
``<name>.json``, a small manifest naming the kind of model, its settings, the time bins and the
feature dimension.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from steph.data.bag_inputs import inputs_from_files
from steph.errors import CorruptFileError, DataError, RunError
from steph.models.module import SurvivalModule, as_output
from steph.models.registry import artefact_kinds, build_artefact
from steph.runs import RunDir, migrations
from steph.survival.bins import TimeBins
from steph.survival.risk import risk_from_logits, survival_from_logits
from steph.training.trainer import model_device
from steph.utils.device import resolve_device
from steph.utils.io import file_sha256, load_tensors, read_json, save_tensors, write_json

FORMAT = migrations.ARTEFACT_FORMAT


def _kinds_registered() -> None:
    """Every module registers its artefact kind where it is defined: import those packages."""
    import steph.merging  # STEPH, the merged baselines
    import steph.models  # the MIL networks
    import steph.transfer  # noqa: F401  (ROUPKT, the expert read-outs)


def save_artefact(path: str | Path, module: SurvivalModule, kind: str, settings: dict[str, Any],
                  bins: TimeBins, feature_dim: int, info: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (.safetensors) and its manifest ``path.with_suffix('.json')``, which
    records the SHA-256 of the weights file (``weights_sha256``)."""
    path = Path(path)
    _kinds_registered()
    if kind not in artefact_kinds():
        raise RunError(f"no artefact builder for model kind {kind!r}")
    save_tensors(path, module.state_dict(), metadata={"format": FORMAT, "kind": kind})
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "settings": settings,
        "bins": bins.to_dict(),
        "feature_dim": int(feature_dim),
        "info": info or {},
        "weights_sha256": file_sha256(path),
    }
    write_json(path.with_suffix(".json"), manifest)
    return path


def resolve_artefact(path: str | Path) -> Path:
    """Accept a run directory, the .safetensors file or its .json manifest."""
    path = Path(path)
    if not path.exists() and not path.with_suffix(".json").exists() \
            and not path.with_suffix(".safetensors").exists():
        raise RunError(f"{path}: not found (give a finished run directory, e.g. "
                       "RUNS/<cohort>/<method>/fold0, or its model.safetensors)")
    if path.is_dir():
        if not RunDir(path).weights.exists() and not RunDir(path).manifest.exists():
            state = ("not finished (no metrics.json)" if not RunDir(path).is_finished()
                     else "without a model")
            raise RunError(f"{path}: no {RunDir.WEIGHTS} in this folder: a run directory "
                           f"{state}? (give a finished run directory or a .safetensors file)")
        path = RunDir(path).weights
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    manifest = path.with_suffix(".json")
    if not path.exists() and not manifest.exists():
        raise RunError(f"no model artefact at {path} (expected {path.name} and {manifest.name})")
    if not manifest.exists():
        raise RunError(f"{manifest}: manifest missing (the weights {path.name} are there, but "
                       "not what model they belong to)")
    if not path.exists():
        raise RunError(f"{path}: weights file missing (its manifest {manifest.name} is there)")
    return path


# manifest field -> (accepted types, description)
_MANIFEST_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "format": ((str,), "a string"),
    "kind": ((str,), "a string"),
    "settings": ((dict,), "an object"),
    "bins": ((dict,), "an object"),
    "feature_dim": ((int,), "a positive integer"),
}


def _check_manifest(manifest: Any, where: Path) -> dict[str, Any]:
    """The manifest if its fields have the right types; RunError naming the field if not."""
    if not isinstance(manifest, dict):
        raise RunError(f"{where}: not an artefact manifest (a JSON object expected, got "
                       f"{type(manifest).__name__})")
    try:
        manifest = migrations.upgrade_manifest(manifest)
    except ValueError as e:
        raise RunError(f"{where}: unknown artefact format {manifest.get('format')!r} ({e})"
                       ) from None
    for key, (types, what) in _MANIFEST_FIELDS.items():
        if key not in manifest:
            raise RunError(f"{where}: field {key!r} missing")
        value = manifest[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise RunError(f"{where}: field {key!r} must be {what}, got {value!r:.80}")
    if manifest["feature_dim"] < 1:
        raise RunError(f"{where}: field 'feature_dim' must be a positive integer, got "
                       f"{manifest['feature_dim']}")
    try:
        TimeBins.from_dict(manifest["bins"])
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{where}: field 'bins' is not a valid set of time bins ({e})") from None
    checksum = manifest.get("weights_sha256")
    if checksum is not None and not isinstance(checksum, str):
        raise RunError(f"{where}: field 'weights_sha256' must be a string, got {checksum!r:.80}")
    return manifest


def load_artefact(path: str | Path, device: torch.device | str = "cpu"
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """The module (eval mode, on ``device``: a name as ``train.device`` takes, e.g. ``auto``
    or ``cuda:1``; artefacts hold CPU tensors and load on any device) and its manifest.

    Raises a RunError naming the file and what is wrong for a missing or malformed manifest
    (not JSON, a field missing or of the wrong type, an unknown kind), weights that are
    truncated, damaged or not those the manifest recorded (checksum), or weights that do not
    fit the model the manifest describes."""
    if not isinstance(device, torch.device):
        device = resolve_device(device, option="device")  # before anything is read
    path = resolve_artefact(path)
    where = path.with_suffix(".json")
    written = read_json(where)
    manifest = _check_manifest(written, where)
    kind = manifest["kind"]
    _kinds_registered()
    if kind not in artefact_kinds():
        raise RunError(f"{where}: unknown model kind {kind!r} (known: "
                       f"{', '.join(artefact_kinds())})")
    state = load_tensors(path)  # truncated or damaged: CorruptFileError naming the file
    expected = manifest.get("weights_sha256")
    if expected is not None and file_sha256(path) != expected:
        raise CorruptFileError(f"{path}: not the weights its manifest {where.name} recorded "
                               "(checksum mismatch): the file was damaged or replaced")
    try:
        module = build_artefact(kind, manifest["settings"])
    except Exception as e:  # noqa: BLE001 - any builder failure means settings it cannot use
        raise RunError(f"{where}: field 'settings' does not describe a {kind} model "
                       f"({type(e).__name__}: {e})") from None
    state = migrations.upgrade_artefact_tensors(written, state)
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ
        detail = " ".join(str(e).split())
        raise RunError(f"{path}: tensors do not fit the {kind} model of {where.name} "
                       f"({detail[:300]})") from None
    if missing or unexpected:
        raise RunError(f"{path}: tensors do not fit the {kind} model of {where.name} (missing "
                       f"{missing[:3]}, unexpected {unexpected[:3]})")
    module.to(device)
    module.eval()
    return module, manifest


@torch.no_grad()
def predict_bag(module: nn.Module, bag: torch.Tensor, **bag_inputs: torch.Tensor
                ) -> tuple[float, np.ndarray]:
    """Risk (higher = worse) and survival curve S_j at the end of each bin, for one bag (plus
    the extra per-bag inputs the module declares, see :mod:`steph.data.bag_inputs`), moved to
    the module's device (the bag as float32)."""
    where = model_device(module)
    bag_inputs = {k: v.to(where) for k, v in bag_inputs.items()}
    logits = as_output(module(bag.to(where).float(), **bag_inputs)).logits.float()
    return float(risk_from_logits(logits)[0]), survival_from_logits(logits)[0].cpu().numpy()


def predict_patients(path: str | Path, patients: Iterable[tuple[str, Sequence[str | Path]]],
                     progress: bool = False, graph_cache: str | Path | None = None,
                     device: torch.device | str = "auto") -> pd.DataFrame:
    """Predict with a saved artefact for patients given as (patient_id, [feature files]), on
    ``device`` (default: CUDA, else mps, else CPU); bags are read in their stored dtype and
    become float32 on the device.

    A model that needs patch graphs (Patch-GCN, or STEPH / a merge over it) gets each patient's
    k-NN graph built from the files' ``coords`` (cached in ``graph_cache`` when given); a file
    without coordinates is an error naming it.

    Returns one row per patient: patient_id, n_patches, risk, then the survival probability at
    the end of every time bin (``S@<days>`` columns); ``attrs["encoders_per_bag"]`` is how many
    MIL encoders the model ran per bag."""
    from tqdm.auto import tqdm

    from steph.data.features import read_features_stored

    module, manifest = load_artefact(path, device=device)
    bins = TimeBins.from_dict(manifest["bins"])
    dim = int(manifest["feature_dim"])
    rows = []
    patients = list(patients)
    for pid, files in tqdm(patients, desc="predict", unit="patient", disable=None if progress else True):
        if not files:
            raise DataError(f"patient {pid!r}: no feature file given")
        arrays = [read_features_stored(Path(f)) for f in files]
        for f, a in zip(files, arrays):
            if a.shape[1] != dim:
                raise DataError(f"{f}: feature dimension {a.shape[1]}, the model expects {dim}")
        bag = torch.from_numpy(np.concatenate(arrays, axis=0))
        extra = inputs_from_files(module.bag_inputs, files, graph_cache)
        risk, curve = predict_bag(module, bag, **extra)
        rows.append([pid, bag.shape[0], risk, *curve.tolist()])
    cols = ["patient_id", "n_patches", "risk"] + [f"S@{int(t)}" for t in bins.end_times]
    table = pd.DataFrame(rows, columns=cols)
    table.attrs["encoders_per_bag"] = module.encoders_per_bag()
    return table


def training_patients(path: str | Path) -> tuple[set[str], Path] | None:
    """The patients a run's model was trained on (its ``predictions.csv``, split ``train``) and
    that file; None for an artefact outside a run directory (they are not recorded)."""
    weights = resolve_artefact(path)
    run = RunDir(weights.parent)
    if weights.name != RunDir.WEIGHTS or not run.predictions.exists():
        return None
    pred = run.read_predictions()
    return set(pred.loc[pred["split"] == "train", "patient_id"].astype(str)), run.predictions


def labelled_c_index(table: pd.DataFrame, labels: pd.DataFrame,
                     exclude: Iterable[str] = ()) -> tuple[float, int, int]:
    """Harrell's C-index of ``table``'s risks against the patients' labels (a label frame of
    :func:`steph.data.labels.read_labels`), leaving out ``exclude``: (C, patients, events);
    NaN when fewer than two patients or no comparable pair."""
    from steph.survival.metrics import concordance_index_or_nan

    per_patient = labels.drop_duplicates("patient_id").set_index("patient_id")
    keep = table[table["patient_id"].isin(per_patient.index)
                 & ~table["patient_id"].isin(set(exclude))]
    if len(keep) < 2:
        return float("nan"), len(keep), 0
    time = per_patient.loc[keep["patient_id"], "time"].to_numpy(float)
    event = per_patient.loc[keep["patient_id"], "event"].to_numpy(int)
    c = concordance_index_or_nan(time, event, keep["risk"].to_numpy(float))
    return float(c), len(keep), int(event.sum())
