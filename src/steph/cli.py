"""The ``steph`` command line: thin wrappers over the package's functions.

Errors caused by input (a missing data root, a bad config key, an unknown method, a broken
feature file) print one clear message and exit non-zero; ``--debug`` anywhere on the command
line shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from steph.errors import ConfigError, StephError
from steph.utils.logs import configure_logging

log = logging.getLogger("steph")


def _split_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


# config keys that have a command-line shortcut of their own
_SHORTCUTS = {"train.epochs": "--epochs", "train.seed": "--seed"}


def _load_cfg(config: str | None, sets: Sequence[str], **direct: Any):
    """The settings of --config, then --set, then the shortcuts (--epochs, --seed). Two values
    for one key are an error naming both: two --set, or a shortcut and --set / --config."""
    from steph.config import load_config, parse_override

    overrides: dict[str, Any] = {}
    given: dict[str, str] = {}
    for text in sets:
        key, value = parse_override(text)
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"--set {given[key]} and --set {text} give {key} two values; "
                              "give one")
        overrides[key], given[key] = value, text
    in_file = _config_file_values(config) if any(v is not None for v in direct.values()) else {}
    for key, value in direct.items():
        if value is None:
            continue
        flag = _SHORTCUTS.get(key, key)
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"{flag} {value} and --set {given[key]} give {key} two values; "
                              "give one")
        found = _dotted_get(in_file, key)
        if found is not None and found != value:
            raise ConfigError(f"{flag} {value} and {key}: {found} in {config} give {key} two "
                              f"values; give one (leave {flag} out, or change {config})")
        overrides[key] = value
    return load_config(config, overrides)


def _config_file_values(config: str | None) -> dict[str, Any]:
    """The config file's mapping ({} when there is none or it cannot be read: load_config
    reports that)."""
    import yaml

    if config is None:
        return {}
    try:
        data = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _dotted_get(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _common_run_options(fn):
    fn = click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                      help="Override one config value, e.g. --set train.lr=3e-4 (repeatable).")(fn)
    fn = click.option("--config", type=click.Path(dir_okay=False), default=None,
                      help="YAML config file (sections data, bins, model, train, steph, merge).")(fn)
    fn = click.option("--epochs", type=click.IntRange(min=1), default=None,
                      help="Training epochs (default 20).")(fn)
    fn = click.option("--seed", type=int, default=None, help="Training seed (default 0).")(fn)
    fn = click.option("--quiet", is_flag=True, help="No progress bars.")(fn)
    return fn


def _wait_option(fn):
    from steph.experiments.executors import DEFAULT_WAIT_FOR_HELD

    return click.option(
        "--wait-for-held", type=click.FloatRange(min=0), default=DEFAULT_WAIT_FOR_HELD,
        show_default=True, metavar="SECONDS",
        help="A run another steph process is training (e.g. a second `steph cv` on the same "
             "--out) is waited for this long, then read; the other runs go on meanwhile.")(fn)


def _print_table(summary, methods: Sequence[str] | None = None,
                 runs_root: str | None = None) -> None:
    from steph.experiments.summary import input_runs_line, markdown_table

    click.echo(markdown_table(summary, methods))
    line = input_runs_line(runs_root) if runs_root is not None else ""
    if line:
        click.echo(line + "\n")


def _print_comparisons(runs_root: str) -> None:
    import pandas as pd

    from steph.experiments.compare import comparison_markdown
    from steph.runs import RunsFolder

    path = RunsFolder(runs_root) / RunsFolder.COMPARISONS_CSV
    if path.exists():
        comp = pd.read_csv(path)
        if len(comp):
            click.echo(comparison_markdown(comp))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="steph")
def cli() -> None:
    """steph: cross-cancer knowledge transfer for WSI survival prediction (STEPH and baselines).

    Add --debug anywhere to see full tracebacks.
    """


# -- synthetic data ----------------------------------------------------------------------------

@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Data root to write.")
# the names of steph.data.synthetic.PRESETS (listed here so that --help does not import numpy;
# tests/test_cli.py checks that the two agree)
@click.option("--preset", default="demo", show_default=True,
              type=click.Choice(["demo", "transfer", "tcga13", "calibrated", "calibrated-null"]),
              help="calibrated: 13 TCGA-named cohorts whose prognostic tissue only a trained "
                   "encoder sees; calibrated-null: its negative control (sources carry nothing "
                   "for a target). See docs/calibration.md.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--feature-dim", type=click.IntRange(min=2), default=None,
              help="Feature dimension (preset default: demo 256, transfer 512, tcga13 1536, "
                   "calibrated 64).")
@click.option("--patch-scale", type=click.FloatRange(min=0, min_open=True), default=None,
              help="tcga13 / calibrated only: bag sizes as a fraction of Table S1's (default "
                   "0.01 / 0.005).")
@click.option("--layout", type=click.Choice(["contiguous", "trident"]), default=None,
              help="HDF5 layout of the feature files (trident: one-row chunks).")
@click.option("--overwrite", is_flag=True, help="Replace cohorts that already exist.")
def synth(out: str, preset: str, seed: int, feature_dim: int | None, patch_scale: float | None,
          layout: str | None, overwrite: bool) -> None:
    """Write synthetic cohorts in the layout users bring (labels.csv + features/*.h5)."""
    from steph.data import synthetic

    cfg = synthetic.preset(preset, feature_dim=feature_dim, patch_scale=patch_scale, layout=layout)
    synthetic.generate(cfg, out, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {len(cfg.cohorts)} cohort(s) ({', '.join(c.name for c in cfg.cohorts)}) "
               f"to {out}")


# -- data ------------------------------------------------------------------------------------------

@cli.group()
def data() -> None:
    """Inspect a data root; pack its features for fast reading."""


def _load_cohorts(root: str, cohorts: str | None, cfg, check: str | None = None,
                  skip: bool | None = None, use_pack: bool = True):
    from steph.data.cohort import Cohort, discover_cohorts

    names = _split_list(cohorts) or discover_cohorts(root, cfg.data.labels)
    if not names:
        raise ConfigError(f"no cohort found under {root} (expected <cohort>/{cfg.data.labels})")
    d = cfg.data
    bad = "skip" if (skip if skip is not None else d.on_bad_slide == "skip") else "raise"
    return [Cohort.from_config(Path(root) / n, d, on_bad_slide=bad, check=check or d.check,
                               use_pack=use_pack) for n in names]


@data.command("summary")
@click.option("--data", "data_root", required=True, type=click.Path(), help="Data root.")
@click.option("--cohorts", default=None, help="Comma-separated cohorts (default: all).")
@click.option("--config", type=click.Path(dir_okay=False), default=None)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write a CSV.")
def data_summary(data_root: str, cohorts: str | None, config: str | None, out: str | None) -> None:
    """Cohort characteristics like the appendix's Table S1."""
    import pandas as pd

    from steph.data.summary import summarize_cohorts
    from steph.utils.io import write_csv

    cfg = _load_cfg(config, [])
    table = summarize_cohorts(_load_cohorts(data_root, cohorts, cfg))
    shown = table.copy()
    for col in shown.columns:  # one decimal on screen; the CSV keeps every digit
        if shown[col].dtype.kind == "f":
            shown[col] = shown[col].map(lambda v: "–" if pd.isna(v) else f"{v:,.1f}")
    click.echo(shown.to_string(index=False))
    if out:
        write_csv(out, table)


@data.command("check")
@click.option("--data", "data_root", required=True, type=click.Path(), help="Data root.")
@click.option("--cohorts", default=None, help="Comma-separated cohorts (default: all).")
@click.option("--full", is_flag=True, help="Also read every value (NaN / inf), not only shapes.")
@click.option("--skip-bad-slides", is_flag=True,
              help="Exit 0 when the only problems are bad slides (training with "
                   "--set data.on_bad_slide=skip leaves them out); they are listed either way.")
@click.option("--config", type=click.Path(dir_okay=False), default=None)
def data_check(data_root: str, cohorts: str | None, full: bool, skip_bad_slides: bool,
               config: str | None) -> None:
    """Check label tables, feature files and split files of every cohort; report every problem
    found (one line each), then exit 1 if there is any."""
    from steph.data.check import check_data_root

    cfg = _load_cfg(config, [])
    report = check_data_root(data_root, _split_list(cohorts), cfg.data,
                             check="full" if full else "shape")
    for line in report.lines:
        click.echo(line)
    if report.cohort_problems or (report.slide_problems and not skip_bad_slides):
        sys.exit(1)


@data.command("pack")
@click.option("--data", "data_root", required=True, type=click.Path(), help="Data root.")
@click.option("--cohorts", default=None, help="Comma-separated cohorts (default: all).")
@click.option("--force", is_flag=True, help="Rewrite packs that are still fresh.")
@click.option("--no-coords", is_flag=True, help="Leave patch coordinates out of the pack.")
@click.option("--skip-bad-slides", is_flag=True,
              help="Pack without the slides that cannot be read (as data.on_bad_slide=skip).")
@click.option("--config", type=click.Path(dir_okay=False), default=None)
def data_pack(data_root: str, cohorts: str | None, force: bool, no_coords: bool,
              skip_bad_slides: bool, config: str | None) -> None:
    """Pack each cohort's features into one memory-mapped file (<cohort>/.steph-pack).

    Training and prediction then read bags from the pack while it is fresh: a source file
    changed, added or removed after packing makes it stale (a warning, the source files are
    read) until this command is run again. Needs about as much free disk as the float16
    features take (float32 when a cohort has float32 feature files: packs never round)."""
    from steph.data.pack import write_pack

    cfg = _load_cfg(config, [])
    for c in _load_cohorts(data_root, cohorts, cfg, skip=skip_bad_slides or None,
                           use_pack=False):
        r = write_pack(c.pack_source(), coords=not no_coords, force=force)
        state = "packed" if r.written else "up to date"
        click.echo(f"{c.name}: {state}, {r.slides} slides, {r.rows} patches, {r.dtype}, "
                   f"{r.bytes / 1e6:,.1f} MB, {r.seconds:.1f} s -> {r.folder}")


# -- training and cross-validation -----------------------------------------------------------------

@cli.command()
@click.option("--data", "data_root", required=True, type=click.Path(), help="Data root.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Runs directory.")
@click.option("--cohort", required=True, help="Cohort to train on.")
@click.option("--fold", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--method", default="abmil", show_default=True, help="Method name (steph methods).")
@click.option("--sources", default=None, help="Comma-separated source cohorts (default: all others).")
@_wait_option
@_common_run_options
def train(data_root: str, out: str, cohort: str, fold: int, method: str, sources: str | None,
          wait_for_held: float, sets: Sequence[str], config: str | None, epochs: int | None,
          seed: int | None, quiet: bool) -> None:
    """Train one cohort x fold (and, for transfer methods, the models it needs)."""
    from steph.experiments.cv import Experiment
    from steph.experiments.executors import LocalExecutor
    from steph.runs import RunRef

    cfg = _load_cfg(config, sets, **{"train.epochs": epochs, "train.seed": seed})
    exp = Experiment(data_root, out, cfg, sources=_split_list(sources), progress=not quiet)
    exp.workspace.check_cohorts([cohort], "target")
    exp.workspace.split(cohort, fold)  # fails early on a bad fold
    refs = exp.plan([method], [cohort], [fold])
    exp.workspace.check_inputs([j for j in refs if not exp.is_finished(j)])
    exp.record_request([method], [cohort], [fold], command="train")
    metrics = exp.run_all(refs, LocalExecutor(wait_for_held=wait_for_held))[-1]
    click.echo(f"{RunRef(cohort, method, fold)}: test C-index {metrics['c_index']:.4f} "
               f"(train {metrics['train_c_index']:.4f})")


@cli.command()
@click.option("--data", "data_root", required=True, type=click.Path(), help="Data root.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Runs directory.")
@click.option("--methods", default="abmil", show_default=True,
              help="Comma-separated methods (see `steph methods`).")
@click.option("--targets", default=None, help="Comma-separated target cohorts (default: all).")
@click.option("--folds", default=None, help="Folds, e.g. 0-4 or 0,2 (default: all).")
@click.option("--sources", default=None, help="Comma-separated source cohorts (default: all others).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repeat the cross-validation with this many split seeds (data.split_seed + r).")
@click.option("--baseline", default="abmil", show_default=True,
              help="Method every other method is compared with (paired, same test folds).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              show_default=True,
              help="local: the runs one after another in this process; ray: the grid as a Ray "
                   "task graph (pip install 'steph[ray]').")
@click.option("--address", default=None, metavar="auto|HOST:PORT",
              help="ray: join a running Ray cluster (default: start a local Ray instance).")
@click.option("--cpus-per-run", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPUs per run, also its thread count (ray default: 1; local default: torch's).")
@click.option("--gpus-per-run", type=click.FloatRange(min=0), default=None,
              help="ray: GPUs per run; a fraction shares a GPU, e.g. 0.25 (default 0).")
@click.option("--memory-per-run", default=None, metavar="SIZE",
              help="ray: memory Ray reserves per run, e.g. 8G (default: none).")
@click.option("--retries", type=click.IntRange(min=0), default=None,
              help="ray: retries of a run whose worker or node died (default 2); a run that "
                   "fails on its input is not retried.")
@_wait_option
@_common_run_options
def cv(data_root: str, out: str, methods: str, targets: str | None, folds: str | None,
       sources: str | None, repeats: int, baseline: str, executor: str, address: str | None,
       cpus_per_run: float | None, gpus_per_run: float | None, memory_per_run: str | None,
       retries: int | None, wait_for_held: float, sets: Sequence[str], config: str | None,
       epochs: int | None, seed: int | None, quiet: bool) -> None:
    """Cross-validate methods on target cohorts; write summary.csv / summary.md / summary.png.

    A run that fails fails only the runs that need it; the command then writes the summary of
    the finished runs, lists the failed ones and exits with status 1.
    """
    from steph.experiments.cv import run_cv
    from steph.experiments.executors import GridError, LocalExecutor, RayExecutor
    from steph.methods import resolve_methods

    cfg = _load_cfg(config, sets, **{"train.epochs": epochs, "train.seed": seed})
    names = resolve_methods(methods)
    if executor == "ray":
        runner = RayExecutor(address=address, cpus_per_run=cpus_per_run or 1.0,
                             gpus_per_run=gpus_per_run or 0.0, memory_per_run=memory_per_run,
                             retries=2 if retries is None else retries,
                             wait_for_held=wait_for_held)
    else:
        ray_only = {"--address": address, "--gpus-per-run": gpus_per_run,
                    "--memory-per-run": memory_per_run, "--retries": retries}
        given = [k for k, v in ray_only.items() if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --executor ray")
        runner = LocalExecutor(cpus_per_run=cpus_per_run, wait_for_held=wait_for_held)
    try:
        summary = run_cv(data_root, out, names, targets=_split_list(targets), folds=folds,
                         cfg=cfg, sources=_split_list(sources), progress=not quiet,
                         repeats=repeats, baseline=baseline, executor=runner)
    except GridError as err:
        if err.summary is not None:  # what finished, before the list of failed runs
            _print_table(err.summary, names, out)
            _print_comparisons(out)
        raise
    _print_table(summary, names, out)
    _print_comparisons(out)
    click.echo(f"summary: {Path(out) / 'summary.csv'}, {Path(out) / 'summary.md'}; figures and "
               f"analyses: steph report --out {out} --data {data_root}")


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Runs directory.")
@click.option("--data", "data_root", default=None, type=click.Path(),
              help="Data root (adds the oracle row for synthetic cohorts).")
@click.option("--baseline", default="abmil", show_default=True,
              help="Method every other method is compared with (paired, same test folds).")
def summarize(out: str, data_root: str | None, baseline: str) -> None:
    """Rebuild summary.csv / comparisons.csv / summary.md / summary.png from finished runs."""
    from steph.data.cohort import require_data_root
    from steph.experiments.summary import write_summary

    if not Path(out).is_dir():
        raise ConfigError(f"runs folder not found: {out}")
    if data_root is not None:
        require_data_root(data_root)
    summary = write_summary(out, data_root=data_root, baseline=baseline)
    _print_table(summary, runs_root=out)
    _print_comparisons(out)


@cli.command()
def methods() -> None:
    """List the methods `steph cv` knows."""
    from steph.methods import get_method, list_methods, method_patterns

    for name in list_methods():
        click.echo(f"{name:18s} {get_method(name).summary}")
    for hint, summary in method_patterns():
        click.echo(f"{hint:18s} {summary}")


# -- prediction ------------------------------------------------------------------------------------

def _device_option(fn):
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA, else Apple mps, else CPU), cpu, cuda, cuda:N or mps.")(fn)


def _patients_from_inputs(slides: Sequence[str], features: str | None, labels: str | None):
    from steph.data.features import iter_feature_files, strip_wsi_extension
    from steph.data.labels import read_labels

    files = [Path(s) for s in slides]
    if features:
        if not Path(features).is_dir():
            raise ConfigError(f"--features {features}: folder not found")
        found = list(iter_feature_files(features))
        if not found:
            raise ConfigError(f"--features {features}: no feature file (.h5 / .pt) in this "
                              "folder (nor in its h5_files/, pt_files/ subfolders)")
        files += found
    if not files:
        raise ConfigError("give feature files with --slides or a folder with --features")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ConfigError(f"feature file(s) not found: {', '.join(missing[:5])}")
    if labels is None:  # one patient per file
        return [(f.stem, [f]) for f in files]
    table = read_labels(labels)
    by_stem = {f.stem: f for f in files}
    patients: dict[str, list[Path]] = {}
    for pid, sid in zip(table["patient_id"], table["slide_id"]):
        f = by_stem.get(strip_wsi_extension(sid))
        if f is not None:
            patients.setdefault(pid, []).append(f)
    if not patients:
        raise ConfigError(f"no feature file matches a slide of {labels}")
    return list(patients.items())


@cli.command()
@click.option("--model", required=True, type=click.Path(),
              help="Artefact: a run directory or its model.safetensors.")
@click.option("--slides", multiple=True, type=click.Path(),
              help="Feature files (.h5 / .pt); repeat the option or list several.")
@click.argument("more_slides", nargs=-1, type=click.Path())
@click.option("--features", default=None, type=click.Path(file_okay=False),
              help="A folder of feature files.")
@click.option("--labels", default=None, type=click.Path(dir_okay=False),
              help="A label/slide table to group slides into patients (else one file = one patient).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write a CSV here.")
@_device_option
def predict(model: str, slides: Sequence[str], more_slides: Sequence[str], features: str | None,
            labels: str | None, out: str | None, device: str) -> None:
    """Risk and survival curve per patient with a saved model."""
    from steph.inference import predict_patients
    from steph.utils.io import write_csv

    patients = _patients_from_inputs([*slides, *more_slides], features, labels)
    table = predict_patients(model, patients, device=device)
    n_enc = table.attrs.get("encoders_per_bag", 1)
    if out:
        write_csv(out, table)
        click.echo(f"wrote {len(table)} prediction(s) to {out}")
    else:
        click.echo(table[["patient_id", "n_patches", "risk"]].to_string(index=False))
    click.echo(f"ran {n_enc} MIL encoder{'s' if n_enc != 1 else ''} per bag")
    if labels:
        _echo_labelled_c_index(model, table, labels)


def _echo_labelled_c_index(model: str, table, labels: str) -> None:
    """The C-index of the predictions against --labels, with a warning when the patients
    include the model's training patients (then also the C-index without them)."""
    from steph.data.labels import read_labels
    from steph.inference import labelled_c_index, training_patients

    frame = read_labels(labels)
    c, n, events = labelled_c_index(table, frame)
    click.echo(f"C-index against {labels}: {c:.4f} ({n} patient(s), {events} event(s))")
    trained = training_patients(model)
    if trained is None:
        click.echo("note: this artefact does not record its training patients (no "
                   "predictions.csv beside it): make sure none of these patients trained it")
        return
    ids, where = trained
    seen = sorted(set(table["patient_id"].astype(str)) & ids)
    if seen:
        c_new, n_new, _ = labelled_c_index(table, frame, exclude=seen)
        log.warning("%d of %d patient(s) trained this model (split 'train' in %s), e.g. %s: "
                    "the C-index above is not a test measure; without them: %.4f (%d "
                    "patient(s))", len(seen), len(table), where, ", ".join(seen[:3]), c_new,
                    n_new)


@cli.command()
@click.option("--model", required=True, type=click.Path(), help="A STEPH artefact or run directory.")
@click.argument("slides", nargs=-1, type=click.Path(), required=True)
@click.option("--patient", "one_bag", is_flag=True,
              help="The slides are one patient's: explain them as one bag (concatenated, as "
                   "training does). Without it, each slide is explained on its own.")
@_device_option
def explain(model: str, slides: Sequence[str], one_bag: bool, device: str) -> None:
    """Show STEPH's merge weights w, mixup coefficients lambda and selected sources for a bag
    (one per slide, or one for all the slides with --patient)."""
    import numpy as np
    import torch

    from steph.data.bag_inputs import inputs_from_files
    from steph.data.features import read_features_stored
    from steph.inference import load_artefact
    from steph.training.trainer import model_device

    missing = [s for s in slides if not Path(s).is_file()]
    if missing:
        raise ConfigError(f"feature file(s) not found: {', '.join(missing[:5])}")
    module, manifest = load_artefact(model, device=device)
    if manifest["kind"] != "steph":
        raise ConfigError(f"{model} is a {manifest['kind']} model; explain needs a STEPH model")
    dim = int(manifest["feature_dim"])
    arrays = {}
    for s in slides:
        arrays[s] = read_features_stored(Path(s))
        if arrays[s].shape[1] != dim:
            raise ConfigError(f"{s}: feature dimension {arrays[s].shape[1]}, but the model "
                              f"{model} was trained on {dim}-dimensional features")
    bags = [list(slides)] if one_bag else [[s] for s in slides]
    where = model_device(module)
    for i, files in enumerate(bags):
        bag = torch.from_numpy(np.concatenate([arrays[s] for s in files]))
        if i:
            click.echo("")
        if len(slides) > 1:
            what = (f"one bag of {len(files)} slides ({', '.join(Path(f).stem for f in files)})"
                    if one_bag else Path(files[0]).stem)
            click.echo(f"{what}: {bag.shape[0]} patches")
        ex = module.explain(bag.to(where).float(),
                            **{k: v.to(where)
                               for k, v in inputs_from_files(module.bag_inputs, files).items()})
        _echo_explanation(module, ex)


def _echo_explanation(module, ex) -> None:
    click.echo(f"selected sources: {', '.join(ex.selected)}")
    click.echo(f"{'source':12s} {'w':>8s} {'lambda':>8s} {'coef':>8s}")
    for i, name in enumerate(module.source_names):
        click.echo(f"{name:12s} {float(ex.w[i]):8.4f} {float(ex.lam[i]):8.4f} "
                   f"{ex.coefficients[name]:8.4f}")
    click.echo(f"{'target':12s} {'':8s} {'':8s} {ex.coefficients[module.target_name]:8.4f}")


# -- measurements ------------------------------------------------------------------------------

@cli.group()
def bench() -> None:
    """Measurements of the methods themselves (Table S4)."""


@bench.command("efficiency")
@click.option("--methods", default=None,
              help="Comma-separated methods (default: every method with a cost model).")
@click.option("--instances", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Patches of the measured bag.")
@click.option("--dim", type=click.IntRange(min=1), default=1536, show_default=True,
              help="Feature dimension.")
@click.option("--bins", "n_bins", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--sources", type=click.IntRange(min=1), default=12, show_default=True,
              help="m, the source models of a transfer method.")
@click.option("--arch", default="abmil", show_default=True,
              help="Backbone of the transfer methods (model.arch).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda:0.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed rounds (candidates interleaved); the median is reported.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write a CSV here.")
def bench_efficiency(methods: str | None, instances: int, dim: int, n_bins: int, sources: int,
                     arch: str, device: str, repeats: int, warmup: int, threads: int | None,
                     out: str | None) -> None:
    """Learnable parameters, inference GFLOPs and latency of every method on one bag."""
    import torch

    from steph.experiments.efficiency import efficiency_markdown, measure_efficiency
    from steph.methods import CostSpec
    from steph.models import model_class
    from steph.utils.io import write_csv

    model_class(arch)  # an unknown network: one clear error
    if threads:
        torch.set_num_threads(threads)
    spec = CostSpec(in_dim=dim, n_bins=n_bins, n_sources=sources, n_instances=instances,
                    arch=arch)
    table = measure_efficiency(_split_list(methods), spec, device=device, repeats=repeats,
                               warmup=warmup)
    click.echo(f"bag {instances} x {dim}, {n_bins} bins, m = {sources} sources over {arch}, "
               f"{device}, {torch.get_num_threads()} thread(s), median of {repeats}")
    click.echo(efficiency_markdown(table))
    if out:
        write_csv(out, table.assign(instances=instances, dim=dim, n_sources=sources,
                                    device=device, threads=torch.get_num_threads()))
        click.echo(f"wrote {out}")


# -- report and analyses -----------------------------------------------------------------------

@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, exists=True),
              help="Runs directory.")
@click.option("--data", "data_root", default=None, type=click.Path(file_okay=False),
              help="Data root: adds the analyses that need features (selections on the test "
                   "patients, loss landscapes, attention maps) and the oracle row.")
@click.option("--html", "html_path", default=None, type=click.Path(dir_okay=False),
              help="The page to write (default RUNS/report.html); figures go beside it.")
@click.option("--baseline", default="abmil", show_default=True,
              help="Method every other method is compared with.")
@click.option("--method", "steph_method", default="steph", show_default=True,
              help="The STEPH method (or variant) whose analyses the report shows.")
@click.option("--top-sources", type=click.IntRange(min=1), default=2, show_default=True,
              help="Loss landscapes per target: the sources with the largest final w.")
@click.option("--slide", "slides", multiple=True,
              help="Attention maps of this test slide (repeatable; default: two chosen slides).")
@click.option("--device", default="cpu", show_default=True,
              help="torch device of the loss landscape's evaluations, e.g. cuda:0.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def report(out: str, data_root: str | None, html_path: str | None, baseline: str,
           steph_method: str, top_sources: int, slides: Sequence[str], device: str,
           quiet: bool) -> None:
    """One self-contained HTML report of a runs folder: results, survival curves, STEPH's
    dynamics and selections, loss landscape, SAR, attention maps, efficiency, settings.

    Long analyses are cached under RUNS/.cache/analysis: an interrupted report resumes, and a
    report of runs that are not all finished lists the missing ones."""
    from steph.report import ReportOptions, build_report
    from steph.report.commands import check_device

    check_device(device)
    opts = ReportOptions(baseline=baseline, steph=steph_method, top_sources=top_sources,
                         slides=list(slides) or None, device=device, progress=not quiet)
    result = build_report(out, data_root, html_path, opts)
    fig_dir = next(iter(result.figures.values()))["png"].parent if result.figures else None
    click.echo(f"wrote {result.path} ({len(result.figures)} figures"
               + (f", PNG and SVG in {fig_dir}" if fig_dir else "") + ")")
    for section, notes in result.notes.items():
        click.echo(f"  {section}: {len(notes)} note(s), see the page")


@cli.group()
def analyze() -> None:
    """The paper's analyses of a runs folder, one at a time (tables as CSV, figures as PNG and
    SVG in RUNS/analysis; cached like the report's)."""


def _echo_written(written) -> None:
    for line in written.lines:
        click.echo(line)
    for path in written.files:
        click.echo(f"wrote {path}")


@analyze.command("landscape")
@click.option("--out", required=True, type=click.Path(file_okay=False, exists=True),
              help="Runs directory.")
@click.option("--data", "data_root", required=True, type=click.Path(file_okay=False),
              help="Data root (the test patients' features).")
@click.option("--target", required=True, help="Target cohort (of a finished STEPH run).")
@click.option("--fold", type=click.IntRange(min=0), default=None,
              help="Fold (default: the lowest finished fold of the STEPH run).")
@click.option("--sources", default=None, help="Comma-separated sources (default: --top).")
@click.option("--top", type=click.IntRange(min=1), default=2, show_default=True,
              help="The sources with the largest final merge weight w.")
@click.option("--method", "steph_method", default="steph", show_default=True)
@click.option("--step", type=click.FloatRange(min=0, min_open=True, max=1), default=0.04,
              show_default=True, help="Grid step of C_s and C_t.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda:0.")
@click.option("--dest", default=None, type=click.Path(file_okay=False),
              help="Output folder (default RUNS/analysis).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def analyze_landscape(out: str, data_root: str, target: str, fold: int | None, sources: str | None,
                      top: int, steph_method: str, step: float, device: str, dest: str | None,
                      quiet: bool) -> None:
    """Test loss of theta_0 + C_s tau_s + C_t tau_t on a grid (appendix C.2.3), with the path
    of STEPH's lambda."""
    from steph.report.commands import analyze_landscape as run

    _echo_written(run(out, data_root, target, fold, _split_list(sources), top, steph_method,
                      step, device, not quiet, dest))


@analyze.command("sar")
@click.option("--out", required=True, type=click.Path(file_okay=False, exists=True),
              help="Runs directory.")
@click.option("--target", required=True, help="Target cohort (of a finished STEPH run).")
@click.option("--fold", type=click.IntRange(min=0), default=None,
              help="Fold (default: the lowest finished fold of the STEPH run).")
@click.option("--method", "steph_method", default="steph", show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Energy kept by the dominant subspace.")
@click.option("--dest", default=None, type=click.Path(file_okay=False),
              help="Output folder (default RUNS/analysis).")
def analyze_sar(out: str, target: str, fold: int | None, steph_method: str, alpha: float,
                dest: str | None) -> None:
    """Subspace alignment ratio of lambda tau_t + (1 - lambda) tau_s with tau_t (Figure 5)."""
    from steph.report.commands import analyze_sar as run

    _echo_written(run(out, target, fold, steph_method, alpha, dest))


@analyze.command("transferability")
@click.option("--out", required=True, type=click.Path(file_okay=False, exists=True),
              help="Runs directory (with every cohort's cancer-specific runs).")
@click.option("--data", "data_root", required=True, type=click.Path(file_okay=False),
              help="Data root (the targets' features).")
@click.option("--arch", default="abmil", show_default=True,
              help="The network whose cancer-specific runs are the models.")
@click.option("--targets", default=None, help="Comma-separated targets (default: all).")
@click.option("--sources", default=None, help="Comma-separated sources (default: all).")
@click.option("--probes", is_flag=True,
              help="Also fixed-merge probes: theta_0 + tau_t + tau_s per target fold and source.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (1 is fastest for small bags on a busy machine).")
@click.option("--dest", default=None, type=click.Path(file_okay=False),
              help="Output folder (default RUNS/analysis).")
@click.option("--quiet", is_flag=True, help="No progress messages.")
def analyze_transferability(out: str, data_root: str, arch: str, targets: str | None,
                            sources: str | None, probes: bool, threads: int | None,
                            dest: str | None, quiet: bool) -> None:
    """Which cohorts can help which: every source's fold-0 model applied unchanged to every
    target's folds (zero-shot C-index; test patients for the report, training patients for
    choices), as a CSV matrix and a heatmap, with its statistics."""
    import torch

    from steph.report.commands import analyze_transferability as run

    if threads is not None:
        torch.set_num_threads(threads)
    _echo_written(run(out, data_root, arch, _split_list(targets), _split_list(sources), probes,
                      not quiet, dest))


@analyze.command("attention")
@click.option("--out", required=True, type=click.Path(file_okay=False, exists=True),
              help="Runs directory.")
@click.option("--data", "data_root", required=True, type=click.Path(file_okay=False),
              help="Data root (the slides' features and coordinates).")
@click.option("--slide", "slides", multiple=True, required=True,
              help="A test slide id (repeatable).")
@click.option("--target", default=None, help="Target cohort (default: found from the slide).")
@click.option("--fold", type=click.IntRange(min=0), default=None,
              help="Fold (default: the fold whose test patients include the slide's patient).")
@click.option("--method", "steph_method", default="steph", show_default=True)
@click.option("--dest", default=None, type=click.Path(file_okay=False),
              help="Output folder (default RUNS/analysis).")
def analyze_attention(out: str, data_root: str, slides: Sequence[str], target: str | None,
                      fold: int | None, steph_method: str, dest: str | None) -> None:
    """Attention maps of the target model and STEPH on test slides: PNG / SVG side by side and a
    per-patch CSV (x, y, attention of each model) for slide viewers."""
    from steph.report.commands import analyze_attention as run

    _echo_written(run(out, data_root, slides, target, fold, steph_method, dest))


# -- demo --------------------------------------------------------------------------------------------

@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--methods", default=None, help="Comma-separated methods (default: every method).")
@click.option("--folds", default=None, help="Folds (default: 0-4).")
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out: str, methods: str | None, folds: str | None, epochs: int | None, quiet: bool) -> None:
    """Generate the demo cohorts and cross-validate every method on them (minutes on 2 cores)."""
    from steph.analysis.transferability import zero_shot_text
    from steph.experiments.demo import run_demo

    run_demo(out, methods=_split_list(methods), folds=folds, epochs=epochs, progress=not quiet,
             echo=click.echo, zero_shot_text=zero_shot_text)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    configure_logging(logging.DEBUG if debug else logging.INFO)
    try:
        cli.main(args=args, prog_name="steph", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except StephError as err:
        if debug:
            raise
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to resume", err=True)
        sys.exit(130)
    except Exception as err:  # a bug, or an input we failed to validate
        if debug:
            raise
        click.echo(f"error: {type(err).__name__}: {err} (run again with --debug for the traceback)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
