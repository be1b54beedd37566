"""Format versions of every record steph writes, and how older records are read.

Each record carries its format (``<name>/<version>``); a record without one was written before
formats existed and is version 1. Readers call the ``upgrade_*`` function of the record, which
returns it in today's layout, so no other module guesses from missing keys. A change of layout
bumps the version here and adds its upgrade step.

| record | file | format |
|---|---|---|
| run settings | ``<run>/config.yaml`` | ``steph-run-settings/2`` |
| results | ``<run>/metrics.json`` | ``steph-metrics/2`` |
| provenance | ``<run>/run.json`` | ``steph-run-record/2`` |
| artefact manifest | ``<run>/model.json``, any ``<name>.json`` beside weights | ``steph-artefact/2`` |
| shared initialisation | ``RUNS/theta0[-<arch>].json`` | ``steph-theta0/2`` |
| requests (results vs inputs) | ``RUNS/requests.json`` | ``steph-requests/1`` |

Version 1 records and what upgrading them does:

- settings: ``model.name`` is ``model.arch``; ABMIL's ``model.hidden_dim / attn_dim / dropout``
  and the other networks' untyped ``model.options`` become the typed ``model.options.<network>``
  (unset options: the network's defaults, unchanged since); keys added after the first runs
  take the value those runs had in effect (``data.eval_max_instances`` None, the whole bag;
  ``train.deterministic`` true; ``train.precision`` fp32); ``steph.gamma: null`` is the size
  rule.
- metrics: ``repeat`` 0 (runs written before repeats existed).
- artefacts: merging artefacts made before any network could be merged name ABMIL's
  hyper-parameters ``settings.abmil`` (today ``settings.arch`` + ``settings.network``) and hold
  their network's tensors under ``abmil.`` (today ``network.``); ABMIL's Surgery AM was the kind
  ``abmil_surgery`` (today ``mil_surgery`` for every network); STEPH artefacts without
  ``n_patients`` had 0; ROUPKT / read-out artefacts without ``seed`` had 0 and their expert
  banks without ``arch`` were ABMIL's.
- theta_0: without ``model``, it is ABMIL's.
- requests: version 1 is the first (a runs folder without the record has its results
  inferred from the runs, :func:`steph.runs.requests.infer_results`).
"""

from __future__ import annotations

from typing import Any

SETTINGS_FORMAT = "steph-run-settings/2"
METRICS_FORMAT = "steph-metrics/2"
RECORD_FORMAT = "steph-run-record/2"
ARTEFACT_FORMAT = "steph-artefact/2"
THETA0_FORMAT = "steph-theta0/2"
REQUESTS_FORMAT = "steph-requests/1"

# Keys added to the settings after version-1 runs were first written, with the value those
# earlier runs had in effect.
ADDED_LATER = {"data": {"eval_max_instances": None},
               "train": {"deterministic": True, "precision": "fp32"}}

def version(record: dict[str, Any], name: str) -> int:
    """The format version of ``record`` (1 when it has none); an error for another record's
    format or a version newer than this steph reads."""
    fmt = record.get("format") if isinstance(record, dict) else None
    if fmt is None:
        return 1
    prefix, _, number = str(fmt).rpartition("/")
    current = int(CURRENT[name].rpartition("/")[2])
    if prefix != CURRENT[name].rpartition("/")[0] or not number.isdigit():
        raise ValueError(f"not a steph {name} record; this steph reads {CURRENT[name]}")
    if int(number) > current:
        raise ValueError(f"format {fmt!r} is newer than this steph reads ({CURRENT[name]}): "
                         "upgrade steph")
    return int(number)


def upgrade_settings(found: dict[str, Any]) -> dict[str, Any]:
    """A run's ``config.yaml`` in today's layout (without its ``format`` key)."""
    v = version(found, "settings")
    out = {k: (dict(s) if isinstance(s, dict) else s) for k, s in found.items() if k != "format"}
    if v < 2:
        for section, keys in ADDED_LATER.items():
            if isinstance(out.get(section), dict):
                for key, value in keys.items():
                    out[section].setdefault(key, value)
        if isinstance(out.get("model"), dict):
            from steph.config import ModelConfig  # the schema moves and types the old keys

            out["model"] = ModelConfig.model_validate(out["model"]).model_dump(mode="json")
        if isinstance(out.get("steph"), dict) and out["steph"].get("gamma", "") is None:
            out["steph"]["gamma"] = "size_rule"
    return out


def upgrade_metrics(found: dict[str, Any]) -> dict[str, Any]:
    """A run's ``metrics.json`` in today's layout (without its ``format`` key)."""
    v = version(found, "metrics")
    out = {k: x for k, x in found.items() if k != "format"}
    if v < 2:
        out.setdefault("repeat", 0)
    return out


def upgrade_record(found: dict[str, Any]) -> dict[str, Any]:
    """A run's ``run.json`` in today's layout (without its ``format`` key)."""
    version(found, "record")
    return {k: x for k, x in found.items() if k != "format"}


def upgrade_manifest(found: dict[str, Any]) -> dict[str, Any]:
    """An artefact manifest in today's layout (format included: it names the artefact)."""
    v = version(found, "artefact")
    out = dict(found)
    if v < 2:
        settings = dict(out.get("settings") or {})
        if "abmil" in settings and "network" not in settings and out.get("kind") != "abmil":
            hparams = settings.pop("abmil")
            settings = {"arch": "abmil", "network": hparams, **settings}
        if out.get("kind") == "steph":
            settings.setdefault("n_patients", 0)
        if out.get("kind") in ("roupkt", "expert_readout"):
            settings.setdefault("seed", 0)
            if isinstance(settings.get("bank"), dict):
                settings["bank"] = {"arch": "abmil", **settings["bank"]}
        out["settings"] = settings
        if out.get("kind") == "abmil_surgery":
            out["kind"] = "mil_surgery"
        out["format"] = ARTEFACT_FORMAT
    return out


def upgrade_artefact_tensors(manifest: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The weights of a version-1 merging artefact under today's names (``abmil.`` ->
    ``network.``); others unchanged. ``manifest`` is the manifest as written (not upgraded)."""
    if version(manifest, "artefact") >= 2 or manifest.get("kind") == "abmil":
        return state
    return {("network." + k[len("abmil."):] if k.startswith("abmil.") else k): v
            for k, v in state.items()}


def upgrade_theta0(found: dict[str, Any]) -> dict[str, Any]:
    """The identity of a shared initialisation in today's layout (without ``format``)."""
    v = version(found, "theta0")
    out = {k: x for k, x in found.items() if k != "format"}
    if v < 2:
        out.setdefault("model", "abmil")
    return out


def upgrade_requests(found: dict[str, Any]) -> dict[str, Any]:
    """``RUNS/requests.json`` in today's layout (without ``format``)."""
    version(found, "requests")
    if not isinstance(found.get("requests"), list):
        raise TypeError("no list of requests")
    return {k: x for k, x in found.items() if k != "format"}


CURRENT = {"settings": SETTINGS_FORMAT, "metrics": METRICS_FORMAT, "record": RECORD_FORMAT,
           "artefact": ARTEFACT_FORMAT, "theta0": THETA0_FORMAT, "requests": REQUESTS_FORMAT}
