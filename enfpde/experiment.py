"""Workflows built from the library's parts: evaluate a run, forecast a file, the quickstart.

These are what the command line (:mod:`enfpde.cli`) and the experiment scripts call; each step writes into
the run directory and refuses to replace earlier output unless asked to.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from enfpde import checkpointing, distributed
from enfpde.config import REPOSITORY_ROOT, ConfigError, RunConfig, config_from_yaml, load_config
from enfpde.data.trajectories import TIME_DIM, SchemaError, TrajectoryDataset, open_dataset
from enfpde.evaluation import evaluate, render_markdown, write_report, write_text_atomic
from enfpde.forecaster import DEFAULT_MAX_STEPS, Forecaster, lead_times

EVAL_DIR = "eval"


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / config.name


def _variable_scales(config: RunConfig, variables: Sequence[str]) -> list[float] | None:
    scales = config.eval.variable_scales
    if not scales:
        return None
    unknown = sorted(set(scales) - set(variables))
    missing = [v for v in variables if v not in scales]
    if unknown or missing:
        raise ValueError(
            f"eval.variable_scales must give a factor for each of the variables {list(variables)}; "
            f"unknown {unknown}, missing {missing}."
        )
    return [float(scales[v]) for v in variables]


def evaluate_protocol(
    forecaster, config: RunConfig, *, name: str, horizon_time: float, progress: bool = True
) -> dict[str, dict]:
    """The evaluation protocol of a run's config for any forecaster (ENF or baseline): the test split with every
    setting the config enables (standard, ``test_fine`` dtau, sparse fractions, shifted, ``test_native``
    zero-shot) and the train split (standard, its first ``test.num_frames`` frames) when
    ``eval.train_split``; latitude weighting on latitude grids; ``eval.variable_scales``.

    Returns:
        ``{"test": results, "train": results}`` as :func:`enfpde.evaluation.evaluate` returns them.
    """
    d, ec = config.data, config.eval
    variables = list(forecaster.variables)
    test = TrajectoryDataset.open(d.test, variables)
    fine = TrajectoryDataset.open(d.test_fine, variables) if d.test_fine else None
    native = TrajectoryDataset.open(d.test_native, variables) if d.test_native else None
    common = dict(
        horizon_time=float(horizon_time),
        periodic_axes=tuple(d.periodic_axes) or None,
        latitude_weighted="latitude" in test.axes,
        variable_scales=_variable_scales(config, variables),
        seed=ec.seed,
        batch_size=ec.batch_size,
        progress=progress,
        name=name,
    )
    results = {
        "test": evaluate(
            forecaster, test, fine=fine, native=native, sparse_fractions=tuple(ec.sparse_fractions), shift=ec.shift,
            **common,
        )
    }
    if ec.train_split:
        if ec.train_trajectories is not None and ec.train_trajectories < 1:
            raise ConfigError(f"eval.train_trajectories must be >= 1 or null, found {ec.train_trajectories}.")
        train = TrajectoryDataset.open(d.train, variables).select(
            trajectories=slice(0, ec.train_trajectories), frames=slice(0, test.num_frames)
        )
        results["train"] = evaluate(forecaster, train, sparse_fractions=(), shift=False, **common)
    return results


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
    figures: bool = True,
    forecaster: Forecaster | None = None,
    out_name: str | None = None,
    ensemble: str | None = None,
) -> Path:
    """Evaluate a trained run on its test split (all protocol settings) and its train split (standard).

    Writes ``<run_dir>/<out_name>/{test,train}/metrics.{json,md}``, ``report.md`` (both tables), and with
    ``figures`` ``forecast_vs_truth.png``, ``rollout.gif`` and ``mse_per_lead_time.png`` there (``out_name``
    is ``eval`` by default, ``eval_<ensemble>`` when ``ensemble`` is given: the run's model forecasting with
    that ``model.forecast_ensemble`` instead of its own).

    Returns:
        The path of ``report.md``.
    """
    run_dir = Path(run_dir)
    config = config_from_yaml(run_dir / checkpointing.CONFIG_FILE)
    model = forecaster or Forecaster.load(run_dir, batch_size=config.eval.batch_size, ensemble=ensemble)
    meta = model.metadata
    out = run_dir / (out_name or (EVAL_DIR if ensemble is None else f"{EVAL_DIR}_{ensemble}"))
    report_path = out / "report.md"
    targets = [report_path, out / "test" / "metrics.json", out / "train" / "metrics.json"]
    if figures:
        targets += [out / "forecast_vs_truth.png", out / "rollout.gif", out / "mse_per_lead_time.png"]
        if config.data.test_native:
            targets.append(out / "forecast_vs_truth_zero_shot.png")
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"evaluation output exists ({', '.join(existing)}); pass --overwrite to replace it.")
    if not distributed.is_main_process():
        # Several processes (enfpde.distributed): every one runs the same forecasts (they are split between the
        # processes inside Forecaster.predict), and only process 0's files are kept.
        with tempfile.TemporaryDirectory() as scratch:
            _evaluate_into(model, config, run_dir, Path(scratch), meta, False, figures, overwrite=True)
        distributed.barrier("enfpde-evaluated")
        return report_path
    _evaluate_into(model, config, run_dir, out, meta, progress, figures, overwrite)
    distributed.barrier("enfpde-evaluated")
    return report_path


def _evaluate_into(model, config, run_dir, out: Path, meta, progress, figures, overwrite) -> None:
    report_path = out / "report.md"
    start = time.perf_counter()
    results = evaluate_protocol(model, config, name="ENF", horizon_time=meta["horizon_time"], progress=progress)
    elapsed = time.perf_counter() - start
    sections = [f"# Evaluation of `{run_dir}` (checkpoint step {model.step})\n"]
    for split, result in results.items():
        result["checkpoint_step"] = model.step
        write_report(result, out / split, title=f"{split} split", overwrite=overwrite)
        sections.append(render_markdown(result, title=f"{split} split"))
    sections.append(f"Evaluation took {elapsed:.1f} s.\n")
    if figures:
        d, variables = config.data, list(model.variables)
        splits = [TrajectoryDataset.open(p, variables) if p else None for p in (d.test, d.test_fine, d.test_native)]
        sections.append(_figures(model, *splits, results["test"], out, meta, overwrite))
    write_text_atomic(report_path, "\n".join(sections))


def _figures(model, test, fine, native, result, out: Path, meta: dict, overwrite: bool) -> str:
    """Forecast-versus-truth PNG and rollout GIF of the first test trajectory, MSE per lead time; with
    ``native``, also the forecast from the training-resolution frame 0 decoded on the native grid."""
    from enfpde.plotting import animate_rollout, grid_extent, grid_frames, plot_forecast_vs_truth, plot_mse_per_lead_time

    if test.grid_shape is None:
        return "Figures need a gridded test split; skipped.\n"
    horizon = meta["horizon_time"]
    labels = tuple(test.axes[::-1])
    variable, units = test.variables[0], test.units[0]
    times = test.times - test.times[0]
    # Forecast as many trajectories as one evaluation batch: the program compiled for the evaluation is reused.
    first = slice(0, min(model.batch_size, test.num_trajectories))
    pred = model.predict(test.coords, test.values[first, 0], times)
    extent = grid_extent(test)
    plot_forecast_vs_truth(
        grid_frames(test, test.values[0]), grid_frames(test, pred[0]), times, out / "forecast_vs_truth.png",
        horizon_time=horizon, variable=variable, units=units, extent=extent, axis_labels=labels, overwrite=overwrite,
    )
    movie = fine if fine is not None else test
    movie_times = movie.times - movie.times[0]
    pred = model.predict(movie.coords, movie.values[first, 0], movie_times)
    animate_rollout(
        grid_frames(movie, movie.values[0]), grid_frames(movie, pred[0]), movie_times, out / "rollout.gif",
        horizon_time=horizon, variable=variable, units=units, extent=extent, axis_labels=labels, overwrite=overwrite,
    )
    plot_mse_per_lead_time(result, out / "mse_per_lead_time.png", overwrite=overwrite)
    text = (
        "![forecast versus truth](forecast_vs_truth.png)\n\n![MSE per lead time](mse_per_lead_time.png)\n\n"
        "![rollout](rollout.gif)\n"
    )
    if native is not None and native.grid_shape is not None:
        pred = model.predict(test.coords, test.values[first, 0], times, native.coords)
        shape = "x".join(map(str, native.grid_shape))
        plot_forecast_vs_truth(
            grid_frames(native, native.values[0]), grid_frames(native, pred[0]), times,
            out / "forecast_vs_truth_zero_shot.png", horizon_time=horizon, variable=variable, units=units,
            extent=grid_extent(native), axis_labels=labels, overwrite=overwrite,
            title=f"zero-shot {shape}: observed on the {'x'.join(map(str, test.grid_shape))} grid",
        )
        text += f"\n![zero-shot forecast versus truth on the {shape} grid](forecast_vs_truth_zero_shot.png)\n"
    return text


def regular_grid(model: Forecaster, resolution: str) -> dict[str, np.ndarray]:
    """Coordinates of a regular grid ``"NxM"`` (one size per axis, in the model's axis order) on its domain."""
    try:
        sizes = [int(s) for s in resolution.lower().split("x")]
    except ValueError:
        raise ValueError(f"resolution must look like 128x128, found {resolution!r}.") from None
    if len(sizes) != len(model.axes) or min(sizes) < 1:
        raise ValueError(f"resolution {resolution!r} needs {len(model.axes)} positive sizes for axes {list(model.axes)}.")
    grid = {}
    for axis, n in zip(model.axes, sizes):
        if axis == "latitude":
            grid[axis] = -90.0 + (np.arange(n) + 0.5) * 180.0 / n  # cell centres, poles excluded
        elif axis == "longitude":
            grid[axis] = np.arange(n) * 360.0 / n
        else:
            period = model.config.data.periods[model.axes.index(axis)]
            grid[axis] = np.arange(n) * period / n
    return grid


def forecast_file(
    run_dir,
    input_path,
    output_path,
    *,
    times,
    at=None,
    resolution: str | None = None,
    variables=None,
    overwrite: bool = False,
    batch_size: int = 8,
    init_time=None,
    max_steps: int = DEFAULT_MAX_STEPS,
    ensemble: str | None = None,
) -> Path:
    """Forecast the initial state(s) in ``input_path`` (its first time) and write netCDF to ``output_path``.

    For a model trained on ERA5 (:mod:`enfpde.data.era5`), ``input_path`` may also be an ERA5 file as downloaded
    (GRIB, CDS netCDF, zarr): its fields are selected like the training data (levels, members, box, subsampling)
    at ``init_time`` (default: its first time), one trajectory per ensemble member.

    The output location is ``at`` (a netCDF/zarr whose coordinates give the grid or points), a regular grid
    of ``resolution``, or the input points. Every input is validated before anything is written, the output
    path before the model is even loaded, the lead times (against the solver's ``max_steps``) and the output's
    size (against the available memory) before any compute; the file is written to a temporary name and
    renamed, and an existing output is never replaced without ``overwrite``. ``ensemble`` overrides the run's
    ``model.forecast_ensemble`` (:meth:`Forecaster.predict`).
    """
    output_path = Path(output_path)
    check_output_path(output_path, overwrite=overwrite, flag="--overwrite")
    if at is not None and resolution is not None:
        raise ValueError("give either --at or --resolution, not both.")
    model = Forecaster.load(run_dir, batch_size=batch_size, ensemble=ensemble)
    times = lead_times(times)
    model.check_step_budget(times, max_steps)
    era5_config = _era5_dataset_config(model.config, input_path)
    if era5_config is not None and not _holds_variables(input_path, model.variables):
        from enfpde.data.era5 import initial_states

        initial = initial_states(input_path, era5_config, init_time)
    else:
        if init_time is not None:
            raise ValueError(
                "--init-time selects the analysis time of a raw ERA5 file for a model trained on ERA5; this input "
                "is a trajectory file (or the model was not trained on ERA5): its first time is used."
            )
        initial = _load_dataset(input_path, first_time_only=True)
    location = None
    if at is not None:
        location = _load_dataset(at)
    elif resolution is not None:
        location = regular_grid(model, resolution)
    forecast = model.forecast(initial, times, at=location, variables=variables, max_steps=max_steps)
    if not distributed.is_main_process():
        return output_path  # several processes: process 0 writes the forecast they computed together
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.tmp")
    try:
        forecast.to_netcdf(tmp, engine="netcdf4")
        os.replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return output_path


def check_output_path(path: Path, *, overwrite: bool, flag: str) -> None:
    """Refuse an output path that cannot be written, before any work: an existing file without ``overwrite``,
    a directory, a parent that is a file, or a directory without write permission."""
    if path.is_dir():
        raise IsADirectoryError(f"output '{path}' is a directory; give a file path, e.g. '{path / 'forecast.nc'}'.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output '{path}' exists; pass {flag} to replace it.")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot write '{path}': '{ancestor}' is a file, not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write '{path}': no write permission in '{ancestor}'.")


def _load_dataset(path, *, first_time_only: bool = False):
    """Open and load a netCDF/zarr file; a file that opens but cannot be read (cut short) is a clear error."""
    with open_dataset(path) as ds:
        if first_time_only and TIME_DIM in ds.dims and ds.sizes[TIME_DIM] > 1:
            ds = ds.isel({TIME_DIM: [0]})
        try:
            return ds.load()
        except (OSError, RuntimeError, ValueError) as error:
            raise SchemaError(
                f"cannot read the data in '{path}' ({type(error).__name__}: {str(error)[:200]}): the file is damaged "
                f"or cut short."
            ) from None


def _era5_dataset_config(config: RunConfig, input_path):
    """The ERA5 dataset config a run was trained on (recorded in its training file, else its dataset YAML), with
    ``source`` set to ``input_path``; None for a run not trained on ERA5."""
    from enfpde.data import dataset_generator
    from enfpde.data.era5 import dataset_config_of, load_config as load_era5_config

    recorded = dataset_config_of(config.data.train) if config.data.train else None
    if recorded is not None:
        return load_era5_config(recorded, overrides={"source": str(Path(input_path).absolute())})
    if config.dataset:
        yaml_path = Path(config.dataset)
        yaml_path = yaml_path if yaml_path.exists() else REPOSITORY_ROOT / yaml_path
        if yaml_path.exists() and dataset_generator(yaml_path) == "era5":
            return load_era5_config(yaml_path, overrides={"source": str(Path(input_path).absolute())})
    return None


def _holds_variables(path, variables: Sequence[str]) -> bool:
    """Whether ``path`` is a netCDF/zarr file holding every one of ``variables`` (a trajectory file)."""
    try:
        with open_dataset(path) as ds:
            return all(v in ds.data_vars for v in variables)
    except (OSError, ValueError):  # e.g. GRIB, which only the ERA5 reader opens
        return False


def ensure_dataset(config: RunConfig, *, progress: bool = True) -> None:
    """Generate the run's dataset from ``config.dataset`` (a dataset YAML in datasets/, Navier-Stokes or
    shallow water) if its files are missing.

    The files go to the directory of ``config.data.train``; existing files are reused, never replaced.
    """
    from enfpde.data import generate_dataset

    d = config.data
    files = [Path(p) for p in (d.train, d.test, d.test_fine, d.test_native) if p]
    if all(p.exists() for p in files):
        return
    if not config.dataset:
        raise FileNotFoundError(f"missing data files {[str(p) for p in files if not p.exists()]} and no dataset YAML to generate them.")
    dataset_yaml = Path(config.dataset)
    if not dataset_yaml.is_absolute() and not dataset_yaml.exists():
        dataset_yaml = REPOSITORY_ROOT / dataset_yaml
    existing = [p for p in files if p.exists()]
    if existing:
        raise FileExistsError(
            f"some data files exist ({[str(p) for p in existing]}) but others are missing; remove them or "
            f"regenerate with `enfpde generate {dataset_yaml} --overwrite`."
        )
    if distributed.is_main_process():
        generate_dataset(dataset_yaml, output_dir=files[0].parent, progress=progress)
    distributed.barrier("enfpde-dataset")  # the other processes wait for process 0's files
    generated = {p.stem: p for p in files[0].parent.glob("*.nc")}
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{dataset_yaml} generated {sorted(map(str, generated.values()))} but the config expects {missing}.")


def run_experiment(
    config: RunConfig, run_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> Path:
    """Data (generated if missing), training (or resuming), evaluation; returns the report's path."""
    from enfpde.trainer import train

    run_dir = Path(run_dir)
    print(f"[data] {config.data.train}", flush=True)
    ensure_dataset(config, progress=progress)
    print(f"[train] {config.name} into {run_dir}", flush=True)
    train(config, run_dir, resume=resume, overwrite=overwrite, progress=progress)
    out_name = EVAL_DIR
    if resume and not overwrite and (run_dir / EVAL_DIR).exists():
        out_name = f"{EVAL_DIR}_step{_latest_step(run_dir)}"  # keep the earlier evaluation
    print(f"[evaluate] against persistence into {run_dir / out_name}", flush=True)
    report = evaluate_run(run_dir, overwrite=overwrite, progress=progress, out_name=out_name)
    print(_summary_table(run_dir, out_name))
    return report


def _latest_step(run_dir: Path) -> int | None:
    manager = checkpointing.checkpoint_manager(run_dir, max_to_keep=None)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def quickstart(workdir: Path = Path("."), *, overwrite: bool = False, progress: bool = True) -> Path:
    """Generate a small Navier-Stokes dataset, train the ``quick`` preset, evaluate it against persistence,
    and write a forecast netCDF (2x resolution, frames every 0.25) and figures (README: measured times).

    Returns the run directory.
    """
    start = time.perf_counter()
    workdir = Path(workdir)
    data_dir = workdir / "data" / "navier_stokes_quick"
    run_dir = workdir / "runs" / "quickstart"
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"'{run_dir}' exists from an earlier quickstart; pass --overwrite to redo it.")
    splits = {name: data_dir / f"{name}.nc" for name in ("train", "test", "test_fine")}
    config = load_config(
        "quick",
        [f"data.{name}={path}" for name, path in splits.items()],
    )
    report = run_experiment(config, run_dir, overwrite=overwrite, progress=progress)
    print("[forecast] test initial states at 128 x 128, every 0.25 time units", flush=True)
    forecast_path = forecast_file(
        run_dir, splits["test"], run_dir / "forecast.nc", times=np.arange(0.0, 19.01, 0.25), resolution="128x128",
        overwrite=overwrite, batch_size=config.eval.batch_size,
    )
    elapsed = time.perf_counter() - start
    print(
        f"\nquickstart finished in {elapsed / 60:.1f} min\n"
        f"report:   {report}\nforecast: {forecast_path}\nfigures:  {run_dir / EVAL_DIR}/*.png, rollout.gif"
    )
    return run_dir


def _summary_table(run_dir: Path, out_name: str = EVAL_DIR) -> str:
    import json

    lines = ["| split | ENF t_in | ENF t_out | persistence t_in | persistence t_out |", "|---|---|---|---|---|"]
    for split in ("test", "train"):
        path = run_dir / out_name / split / "metrics.json"
        if path.exists():
            s = json.loads(path.read_text())["settings"]["standard"]
            m, p = s["model"], s["persistence"]
            cells = [m["t_in"], m["t_out"], p["t_in"], p["t_out"]]  # None: no frame beyond (or inside) the horizon
            lines.append(f"| {split} | " + " | ".join("—" if v is None else f"{v:.3e}" for v in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Comparison of several evaluated runs (ablations, baselines)
# ---------------------------------------------------------------------------------------------------------


def training_summary(run_dir: str | os.PathLike) -> dict:
    """Epochs reached per stage, steps and training wall time (s) of a run, from its metrics log.

    The wall time is the log's ``elapsed_s`` summed over resumed processes (:func:`cumulative_seconds`)."""
    records = checkpointing.read_metrics(run_dir)
    # A resumed run repeats the steps after its last checkpoint: the last record of a step counts.
    by_step = {r["step"]: r for r in records}
    epochs: dict[str, set] = {}
    for r in by_step.values():
        epochs.setdefault(r["stage"], set()).add(int(r["epoch"]))  # the log's epochs count across stages
    wall = float(cumulative_seconds(records)[-1]) if records else 0.0
    return {"epochs": {stage: len(e) for stage, e in epochs.items()}, "steps": len(by_step), "wall_s": wall}


def cumulative_seconds(records: list[dict], key: str = "elapsed_s") -> np.ndarray:
    """Seconds since the start of training at each record of a metrics log, across resumed processes.

    ``key`` is ``elapsed_s`` (wall time) or ``cpu_s`` (CPU time of the training process). A resumed process
    continues both from the log's last line; logs written before that restarted them from 0 in every resumed
    process, and each such restart closes a segment here (time spent killed is not counted either way)."""
    out, offset, previous = [], 0.0, 0.0
    for r in records:
        value = float(r.get(key, np.nan))
        if value < previous:  # a new process
            offset += previous
        previous = value
        out.append(offset + value)
    return np.asarray(out)


def _load_metrics(run_dir: Path, out_name: str, split: str) -> dict | None:
    import json

    path = run_dir / out_name / split / "metrics.json"
    return json.loads(path.read_text())["settings"] if path.exists() else None


def _pair(settings: dict | None, key: str, who: str, kind: str | None, sep: str = " | ") -> str:
    """``t_in`` and ``t_out`` of one entry of an evaluation's settings as table cells (— where missing)."""
    entry = (settings or {}).get(key)
    values = None if entry is None else (entry[who] if kind is None else entry[who].get(kind))
    if values is None:
        return sep.join(["—", "—"])
    return sep.join("—" if values[p] is None else f"{values[p]:.2e}" for p in ("t_in", "t_out"))


def mse_tables(results: dict[str, tuple[dict, dict | None]]) -> list[str]:
    """Markdown lines comparing models evaluated on the same data: MSE t_in / t_out on train and test (plain,
    and latitude-weighted when present), zero-shot rows, and the other protocols of the test split.

    Args:
        results: row label -> (test settings, train settings or None), the ``"settings"`` of
            :func:`enfpde.evaluation.evaluate`'s results. Persistence comes from the first row (the same for
            every model: same data, seed and points).
    """
    if not results:
        raise ValueError("a comparison needs at least one evaluated model.")
    first_test, first_train = next(iter(results.values()))
    kinds = [(None, "Plain MSE")]
    if "lat_weighted" in first_test["standard"]["model"]:
        kinds.append(("lat_weighted", "Latitude-weighted MSE (cos latitude, mean weight 1)"))
    lines = []
    for kind, heading in kinds:
        lines += [f"## {heading}", "", "| model | t_in train | t_out train | t_in test | t_out test |", "|---|---|---|---|---|"]
        for label, (test, train) in results.items():
            lines.append(f"| {label} | {_pair(train, 'standard', 'model', kind)} | {_pair(test, 'standard', 'model', kind)} |")
            if "zero_shot" in test:
                lines.append(f"| {label}, {test['zero_shot']['label']} | — | — | {_pair(test, 'zero_shot', 'model', kind)} |")
        lines.append(f"| persistence | {_pair(first_train, 'standard', 'persistence', kind)} | "
                     f"{_pair(first_test, 'standard', 'persistence', kind)} |")
        if "zero_shot" in first_test:
            lines.append(f"| persistence, {first_test['zero_shot']['label']} | — | — | "
                         f"{_pair(first_test, 'zero_shot', 'persistence', kind)} |")
        lines.append("")
    others = [k for k in first_test if k not in ("standard", "zero_shot")]
    if others:
        lines += ["## Other protocols (test, plain MSE t_in / t_out)", "",
                  "| model | " + " | ".join(first_test[k]["label"] for k in others) + " |",
                  "|---|" + "---|" * len(others)]
        for label, (test, _) in results.items():
            lines.append(f"| {label} | " + " | ".join(_pair(test, k, "model", None, " / ") for k in others) + " |")
        lines += ["| persistence | " + " | ".join(_pair(first_test, k, "persistence", None, " / ") for k in others) + " |", ""]
    return lines


def comparison_markdown(
    runs: dict[str, str | os.PathLike], *, title: str, paper_table: str | None = None, out_name: str = EVAL_DIR
) -> str:
    """One markdown report comparing evaluated runs: :func:`mse_tables` of their evaluations, and each run's
    epochs and training time; ``paper_table`` beside.

    Args:
        runs: row label -> run directory, each evaluated by :func:`evaluate_run` into ``out_name``.
    """
    evaluated = {label: (Path(d), _load_metrics(Path(d), out_name, "test"), _load_metrics(Path(d), out_name, "train"))
                 for label, d in runs.items()}
    missing = [str(d) for d, test, _ in evaluated.values() if test is None]
    if missing:
        raise FileNotFoundError(f"no evaluation ({out_name}/test/metrics.json) in {missing}; evaluate the runs first.")
    lines = [f"# {title}", ""] + mse_tables({label: (test, train) for label, (_, test, train) in evaluated.items()})
    lines += ["## Training", "", "| model | epochs reached | steps | training wall time |", "|---|---|---|---|"]
    for label, (run_dir, _, _) in evaluated.items():
        s = training_summary(run_dir)
        epochs = ", ".join(f"{stage} {n}" for stage, n in s["epochs"].items())
        lines.append(f"| {label} | {epochs} | {s['steps']} | {s['wall_s'] / 60:.1f} min |")
    if paper_table:
        lines += ["", "## The paper's numbers", "", paper_table.strip()]
    return "\n".join(lines) + "\n"
