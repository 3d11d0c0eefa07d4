"""The benchmark of issue 6: the ENF forecaster, FNO and DINo trained on the same data and scored by the same
evaluation code, in one table.

Every model reads the splits of one ENF :class:`~enfpde.config.RunConfig` (its ``data`` section; its ``eval``
section sets the protocol for all), is trained with its preset, saved under
``<run_root>/benchmark_<dataset>_<preset>/<model>/`` and evaluated by :func:`enfpde.evaluation.evaluate`
with the settings of :func:`enfpde.experiment.evaluate_run`. :func:`run_benchmark` chains the steps;
each is a function of its own:

* :func:`benchmark_configs` -- the ENF config and the baseline presets (YAML) with overrides;
* :func:`train_model` -- train one model into its directory, returning its training record;
* :func:`load_model` -- the trained forecaster of a directory;
* :func:`enfpde.experiment.evaluate_protocol` -- the protocol on the test split (all settings) and the train split (standard);
* :func:`time_inference` -- wall time of ``predict`` per test trajectory;
* :func:`benchmark_markdown` -- the comparison table.

Baseline presets live in ``experiments/configs/baselines/<model>_<dataset>_<preset>.yaml``::

    model: {...}     # FNOConfig / DINoConfig fields
    train: {...}     # FNOTrainConfig / DINoTrainConfig fields
    steps: 600       # optimisation steps
    seed: 0
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from enfpde.baselines import dino, fno
from enfpde.baselines.common import num_parameters as _count_parameters
from enfpde.config import PRESET_DIR, ConfigError, RunConfig, load_config, to_yaml
from enfpde.data.trajectories import TrajectoryDataset, save_json_atomic
from enfpde.evaluation import check_writable, write_report, write_text_atomic
from enfpde.experiment import evaluate_protocol, mse_tables
from enfpde.paper import paper_table

__all__ = [
    "BASELINE_PRESET_DIR",
    "DATASETS",
    "MODELS",
    "BaselinePreset",
    "benchmark_configs",
    "benchmark_dir",
    "benchmark_markdown",
    "check_models",
    "default_table",
    "finished_row",
    "load_baseline_preset",
    "load_model",
    "machine_line",
    "run_benchmark",
    "time_inference",
    "train_model",
]

MODELS = ("enf", "fno", "dino")
LABELS = {"enf": "ENF", "fno": "FNO", "dino": "DINo"}
DATASETS = ("ns", "swe")
DATASET_TITLES = {"ns": "Navier-Stokes on the torus", "swe": "Shallow water on the sphere"}
# The ENF presets of experiments/configs per (dataset, preset).
ENF_PRESETS = {
    ("ns", "quick"): "quick",
    ("ns", "paper"): "paper",
    ("swe", "quick"): "shallow_water_quick",
    ("swe", "paper"): "shallow_water_paper",
}
BASELINE_PRESET_DIR = PRESET_DIR / "baselines"
RECORD_FILE = "benchmark.json"
EVAL_DIR = "eval"
# The library of each baseline: its config classes, trainer and forecaster.
_BASELINES = {
    "fno": (fno.FNOConfig, fno.FNOTrainConfig, fno.train, fno.FNOForecaster),
    "dino": (dino.DINoConfig, dino.DINoTrainConfig, dino.train, dino.DINoForecaster),
}


@dataclasses.dataclass(frozen=True)
class BaselinePreset:
    """A baseline's sizes, training settings, number of steps and seed (one YAML preset)."""

    model: object
    train: object
    steps: int
    seed: int = 0


def check_models(models: Sequence[str]) -> tuple[str, ...]:
    """``models`` as a tuple without repeats, in the order given.

    Raises:
        ValueError: an unknown model name or none at all.
    """
    models = tuple(dict.fromkeys(models))
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ValueError(f"unknown model(s) {unknown}: the benchmark trains {list(MODELS)}; pick one or more of them.")
    return models


def _check_dataset(dataset: str, preset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}.")
    if (dataset, preset) not in ENF_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected 'quick' or 'paper'.")


def load_baseline_preset(
    model: str, dataset: str, preset: str, overrides: Sequence[str] = (), *, path: str | os.PathLike | None = None
) -> BaselinePreset:
    """The preset ``experiments/configs/baselines/<model>_<dataset>_<preset>.yaml`` (or ``path``) with
    ``key=value`` overrides (``model.width=16``, ``train.batch_size=2``, ``steps=10``).

    Raises:
        ConfigError: unknown keys, values of the wrong type or that the config classes reject.
        FileNotFoundError: no such preset.
    """
    model_cls, train_cls, _, _ = _BASELINES[model]
    path = Path(path) if path is not None else BASELINE_PRESET_DIR / f"{model}_{dataset}_{preset}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no baseline preset at '{path}'.")
    schema = OmegaConf.create(
        {"model": OmegaConf.structured(model_cls), "train": OmegaConf.structured(train_cls), "steps": 1, "seed": 0}
    )
    OmegaConf.set_struct(schema, True)  # unknown keys are errors at every level
    try:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like section.field=value, found {bad}.")
        merged = OmegaConf.merge(schema, OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        return BaselinePreset(
            model=OmegaConf.to_object(merged.model), train=OmegaConf.to_object(merged.train),
            steps=int(merged.steps), seed=int(merged.seed),
        )
    except (OmegaConfBaseException, ValueError) as error:
        raise ConfigError(f"invalid {model} preset '{path}': {error}") from None


def _split_overrides(overrides: Sequence[str]) -> dict[str, list[str]]:
    """``fno.train.batch_size=2`` -> the FNO preset's ``train.batch_size=2``; un-prefixed overrides (and
    ``enf.``-prefixed ones) go to the ENF config, whose ``data`` and ``eval`` sections every model shares."""
    split = {m: [] for m in MODELS}
    for o in overrides:
        head, _, rest = o.partition(".")
        if head in ("fno", "dino") and rest:
            split[head].append(rest)
        else:
            split["enf"].append(rest if head == "enf" and rest else o)
    return split


def benchmark_configs(
    dataset: str, preset: str, models: Sequence[str] = MODELS, overrides: Sequence[str] = ()
) -> tuple[RunConfig, dict[str, BaselinePreset]]:
    """The ENF config of ``(dataset, preset)`` (its data and eval sections serve every model) and the
    baseline presets of the baselines among ``models``, each with its overrides (see
    :func:`_split_overrides`).

    The ENF trains on the first ``data.horizon`` frames of every training trajectory, as the baselines do, even
    where its preset takes random windows of longer trajectories (``train.random_windows``; the quick
    Navier-Stokes preset): every model then learns from the same frames."""
    _check_dataset(dataset, preset)
    models = check_models(models)
    split = _split_overrides(overrides)
    config = load_config(ENF_PRESETS[dataset, preset], ["train.random_windows=false", *split["enf"]])
    baselines = {m: load_baseline_preset(m, dataset, preset, split[m]) for m in models if m in _BASELINES}
    return config, baselines


def benchmark_dir(run_root: str | os.PathLike, dataset: str, preset: str) -> Path:
    return Path(run_root) / f"benchmark_{dataset}_{preset}"


def default_table(dataset: str, preset: str) -> Path:
    return Path("experiments/results") / f"benchmark_{dataset}_{preset}.md"


def train_model(
    model: str,
    config: RunConfig,
    baseline: BaselinePreset | None,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Train ``model`` on ``config.data.train`` into ``out_dir`` (the ENF with the trainer of
    :func:`enfpde.experiment.run_experiment`, a baseline with its preset) and return its training record:
    ``{"model", "steps", "train_wall_s"}`` (wall time of the training loop, compilation included)."""
    out_dir = Path(out_dir)
    if model == "enf":
        from enfpde.experiment import training_summary
        from enfpde.trainer import train

        train(config, out_dir, overwrite=overwrite, progress=progress)
        summary = training_summary(out_dir)
        return {"model": model, "steps": summary["steps"], "train_wall_s": summary["wall_s"]}
    if baseline is None:
        raise ValueError(f"training {model} needs its BaselinePreset.")
    _, _, train_fn, _ = _BASELINES[model]
    data = TrajectoryDataset.open(config.data.train, config.data.variables)
    start = time.perf_counter()
    forecaster = train_fn(
        data, baseline.model, baseline.train, horizon=config.data.horizon, steps=baseline.steps, seed=baseline.seed,
        periods=tuple(config.data.periods), progress=progress,
    )
    wall = time.perf_counter() - start
    forecaster.save(out_dir, overwrite=overwrite)
    return {"model": model, "steps": baseline.steps, "train_wall_s": wall}


def load_model(model: str, out_dir: str | os.PathLike, *, batch_size: int = 8):
    """The trained forecaster of ``out_dir``: every one has ``predict``, ``forecast``, ``num_parameters``
    and ``horizon_time``."""
    if model == "enf":
        from enfpde.forecaster import Forecaster

        forecaster = Forecaster.load(out_dir, batch_size=batch_size)
        forecaster.num_parameters = _count_parameters(*forecaster.modules)
        forecaster.horizon_time = float(forecaster.metadata["horizon_time"])
        return forecaster
    return _BASELINES[model][3].load(out_dir, batch_size=batch_size)


def time_inference(forecaster, dataset: TrajectoryDataset, *, batch_size: int = 8, warmup: bool = True) -> float:
    """Wall seconds of ``predict`` per trajectory over ``dataset``'s standard setting (frame 0 fully observed,
    every frame's lead time, at the dataset's points), in batches of ``batch_size`` trajectories.

    With ``warmup`` the first batch is forecast once before timing, so compilation is not counted."""
    times = np.asarray(dataset.times, np.float64) - dataset.times[0]
    initial = np.asarray(dataset.values[:, 0])
    batches = [slice(i, i + batch_size) for i in range(0, dataset.num_trajectories, batch_size)]
    if warmup:
        forecaster.predict(dataset.coords, initial[batches[0]], times, dataset.coords)
    start = time.perf_counter()
    for batch in batches:
        np.asarray(forecaster.predict(dataset.coords, initial[batch], times, dataset.coords))
    return (time.perf_counter() - start) / dataset.num_trajectories


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------


def machine_line() -> str:
    """CPU model, cores, accelerator platform, Python and jax versions."""
    import jax

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return (
        f"{cpu or 'unknown CPU'}, {os.cpu_count()} cores, {jax.devices()[0].platform}; "
        f"Python {platform.python_version()}, jax {jax.__version__}"
    )


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def benchmark_markdown(
    rows: dict[str, dict],
    *,
    title: str,
    command: str | None = None,
    machine: str | None = None,
    paper_table: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The comparison table of benchmark rows, with the published numbers (``paper_table``) under it.

    Args:
        rows: label -> ``{"results": {"test": ..., "train": ...}`` (from :func:`enfpde.experiment.evaluate_protocol`),
            ``"num_parameters"``, ``"steps"``, ``"train_wall_s"``, ``"inference_s_per_trajectory"``}``.
            Persistence comes from the first row's evaluation (the same for all: same data, seed and points).
        command, machine, notes: written under the tables (``notes``: sentences, one paragraph each).
        paper_table: the published numbers (markdown), printed last under their own heading.
    """
    if not rows:
        raise ValueError("benchmark_markdown needs at least one evaluated model.")
    results = {
        label: (row["results"]["test"]["settings"], row["results"].get("train", {}).get("settings"))
        for label, row in rows.items()
    }
    lines = [f"# {title}", ""] + mse_tables(results)
    lines += [
        "## Cost", "",
        "| model | parameters | training steps | training wall time | inference per trajectory |",
        "|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        lines.append(
            f"| {label} | {row['num_parameters']:,} | {row['steps']} | {_duration(row['train_wall_s'])} | "
            f"{row['inference_s_per_trajectory'] * 1e3:.1f} ms |"
        )
    lines += [
        "",
        "Training wall time includes compilation. Inference: wall time of `predict` over the test split's "
        "standard setting (every frame, at the grid points), compiled beforehand, divided by the trajectories.",
    ]
    if command:
        lines += ["", f"Command: `{command}`"]
    for note in notes:
        lines += ["", note]
    if machine:
        lines += ["", f"Machine: {machine}."]
    if paper_table:
        lines += ["", "## The paper's numbers", "", paper_table.strip()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------------------------------------


def _json_ready(value):
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def finished_row(out_dir: str | os.PathLike) -> dict | None:
    """The benchmark row of a model directory a previous :func:`run_benchmark` finished (its training record
    and its evaluation), or None if the directory holds no finished model."""
    out_dir = Path(out_dir)
    record_path, test_path = out_dir / RECORD_FILE, out_dir / EVAL_DIR / "test" / "metrics.json"
    if not (record_path.exists() and test_path.exists()):
        return None
    results = {"test": json.loads(test_path.read_text())}
    train_path = out_dir / EVAL_DIR / "train" / "metrics.json"
    if train_path.exists():
        results["train"] = json.loads(train_path.read_text())
    return {**json.loads(record_path.read_text()), "results": results}


def run_benchmark(
    dataset: str,
    preset: str,
    *,
    models: Sequence[str] = MODELS,
    run_root: str | os.PathLike = "runs",
    table: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    generate_data: bool = True,
) -> Path:
    """Train, save, evaluate and time every model of ``models`` on ``(dataset, preset)``; write one table.

    Each model goes to ``<run_root>/benchmark_<dataset>_<preset>/<model>/`` with its evaluation in
    ``eval/{test,train}/metrics.{json,md}`` and its row in ``benchmark.json``; the table goes to ``table``
    (default ``experiments/results/benchmark_<dataset>_<preset>.md``). Models of :data:`MODELS` left out of
    ``models`` whose directory holds a finished run (:func:`finished_row`) keep their row in the table, so one
    model can be retrained (``--models dino --overwrite``) without retraining the others.

    Raises:
        ValueError: an unknown dataset, preset or model. ConfigError: bad overrides.
        FileExistsError: the table or a model directory exists and ``overwrite`` is False (checked before
            any training).
    """
    from enfpde.experiment import ensure_dataset

    models = check_models(models)
    config, baselines = benchmark_configs(dataset, preset, models, overrides)
    table = Path(table) if table is not None else default_table(dataset, preset)
    check_writable(table, overwrite)  # fail before hours of training, not after
    root = benchmark_dir(run_root, dataset, preset)
    existing = [str(root / m) for m in models if (root / m).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"benchmark output exists ({', '.join(existing)}); pass --overwrite to replace it.")
    if generate_data:
        ensure_dataset(config, progress=progress)
    rows = {}
    for model in models:
        out_dir = root / model
        print(f"=== {LABELS[model]}: {out_dir}", flush=True)
        record = train_model(model, config, baselines.get(model), out_dir, overwrite=overwrite, progress=progress)
        forecaster = load_model(model, out_dir, batch_size=config.eval.batch_size)
        results = evaluate_protocol(
            forecaster, config, name=LABELS[model], horizon_time=forecaster.horizon_time, progress=progress
        )
        for split, result in results.items():
            write_report(result, out_dir / EVAL_DIR / split, title=f"{LABELS[model]}, {split} split", overwrite=overwrite)
        test = TrajectoryDataset.open(config.data.test, list(forecaster.variables))
        record.update(
            num_parameters=int(forecaster.num_parameters),
            inference_s_per_trajectory=time_inference(forecaster, test, batch_size=config.eval.batch_size),
            config=to_yaml(config) if model == "enf" else _json_ready(dataclasses.asdict(baselines[model])),
        )
        save_json_atomic(out_dir / RECORD_FILE, _json_ready(record))
        rows[LABELS[model]] = {**record, "results": results}
    kept = [m for m in MODELS if m not in models and finished_row(root / m) is not None]
    rows.update({LABELS[m]: finished_row(root / m) for m in kept})
    rows = {LABELS[m]: rows[LABELS[m]] for m in MODELS if LABELS[m] in rows}  # the table's order
    notes = []
    if kept:
        notes.append(
            f"The rows of {', '.join(LABELS[m] for m in kept)} come from the finished runs in `{root}`, trained by an "
            f"earlier command; this one trained {', '.join(LABELS[m] for m in models)}."
        )
    title = f"Benchmark: {DATASET_TITLES[dataset]}, preset `{preset}`"
    text = benchmark_markdown(
        rows, title=title, command=command, machine=machine_line(), paper_table=paper_table(dataset), notes=notes
    )
    table.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(table, text)
    return table
