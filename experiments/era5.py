"""ERA5 on the sphere (REFERENCE.md section 3): read an ERA5 archive, train ENF forecasters (full rotations and
rotations about the polar axis), report reconstruction and forecast errors beside persistence.

    python experiments/era5.py --preset quick                          # the real sample beside the project, minutes
    python experiments/era5.py --source /data/era5_1deg.zarr              # hourly preset, 1-hour lead: a WB2-style zarr
    python experiments/era5.py --source downloads/ --lead-hours 6         # a directory of CDS files, 6-hour lead
    python experiments/era5.py --source era5.zarr era5.coarsen=2 train.stage2.epochs=50
    python experiments/era5.py --preset regional --source area.grib       # hourly t2m etc. of a CDS `area` download

Steps: the dataset YAML ``datasets/era5_<preset>.yaml`` (with ``--source``, ``--lead-hours`` and ``era5.KEY=VALUE``
overrides) is cut into ``<data-dir>/{train,test}.nc`` by :mod:`enfpde.data.era5` (reused when they exist and
were made from the same config); the run preset ``experiments/configs/era5_<preset>.yaml`` (with any other
``KEY=VALUE`` overrides) trains one ENF per ``--geometries`` into ``<run-root>/<name>_<geometry>/`` and evaluates it.
Each trajectory is ``T_t, T_t+lead, ...``: frame 0 measures the reconstruction of the fitted initial state,
frame 1 the forecast at the lead time. Errors are reported in units of each field's standard deviation over the
training split (the stored normalisation), the latitude-weighted RMSE per field in its own units. The table goes
to --table (default experiments/results/<name>.md), never replaced without --overwrite.
"""

import argparse
import math
import shlex
import sys
from pathlib import Path

import xarray as xr
from omegaconf import OmegaConf

from enfpde import distributed
from enfpde.baselines.common import num_parameters
from enfpde.benchmark import machine_line
from enfpde.cli import add_distributed_arguments
from enfpde.config import REPOSITORY_ROOT, load_config
from enfpde.data import era5
from enfpde.evaluation import check_writable, write_text_atomic
from enfpde.experiment import EVAL_DIR, run_experiment, training_summary
from enfpde.forecaster import Forecaster
from enfpde.paper import paper_table

GEOMETRIES = ("sphere", "axial_sphere")
LABELS = {"sphere": "ENF full rotations", "axial_sphere": "ENF axial", "absolute_sphere": "ENF absolute position"}
DATASET_PREFIX = "era5."


def dataset_config(preset: str, source: str | None, lead_hours: float | None, overrides: list[str]) -> era5.Era5Config:
    """The ERA5 dataset config of ``preset`` with the command line's source, lead time and ``era5.`` overrides."""
    yaml_path = REPOSITORY_ROOT / "datasets" / f"era5_{preset}.yaml" if preset in ("quick", "hourly", "regional") else Path(preset)
    changes = OmegaConf.to_container(OmegaConf.from_dotlist(overrides)) if overrides else {}
    if source is not None:
        changes["source"] = str(Path(source).expanduser().absolute())
    if lead_hours is not None:
        changes["lead_hours"] = float(lead_hours)
    return era5.load_config(yaml_path, overrides=changes)


def ensure_era5_files(config: era5.Era5Config, data_dir: Path, *, overwrite: bool, progress: bool) -> dict[str, Path]:
    """``<data_dir>/<split>.nc`` for every split of ``config``: generated if missing, reused if they record the
    same config, refused (nothing replaced) if they record another one and ``overwrite`` is False."""
    files = {split: data_dir / f"{split}.nc" for split in config.splits}
    present = [p for p in files.values() if p.exists()]
    wanted = OmegaConf.to_yaml(OmegaConf.structured(config))
    if present and not overwrite:
        stale = []
        for path in present:
            with xr.open_dataset(path, engine="netcdf4") as ds:
                if ds.attrs.get("config") != wanted:
                    stale.append(str(path))
        if stale or len(present) != len(files):
            raise FileExistsError(
                f"{', '.join(stale) or ', '.join(map(str, present))} in {data_dir} were made from another ERA5 config "
                "(source, fields, lead time, splits ...) or are incomplete; pass --overwrite-data to regenerate them, "
                "or --data-dir to use another directory."
            )
        return files
    return era5.generate_dataset(config, output_dir=data_dir, overwrite=overwrite, progress=progress)


def run_overrides(config: era5.Era5Config, files: dict[str, Path], yaml_dataset: str) -> list[str]:
    """Run-config overrides that tie a run to the ERA5 files: paths, the lead time as the model's time unit,
    errors in units of each field's standard deviation, no periodic shift on a regional box."""
    with xr.open_dataset(files["train"], engine="netcdf4") as ds:
        stats = era5.read_normalization(ds)
    scales = ", ".join(f"{name}: {1.0 / s['std']!r}" for name, s in stats.items())
    overrides = [
        f"data.train={files['train']}", f"data.test={files['test']}", f"dataset={yaml_dataset}",
        f"data.horizon={config.num_frames}", f"model.time_unit={float(config.lead_hours)!r}",
        f"eval.variable_scales={{{scales}}}",
    ]
    global_longitudes = config.lon_range is None or (config.lon_range[1] - config.lon_range[0]) % 360 == 0
    if not global_longitudes:
        overrides += ["data.periodic_axes=[]", "eval.shift=false"]
    return overrides


def _fmt(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2e}"


def era5_markdown(runs: dict[str, Path], config: era5.Era5Config, *, title: str, command: str) -> str:
    """One table per quantity over the runs: normalised MSE per frame (reconstruction at frame 0, forecasts after)
    beside persistence on the test and train splits, the other protocols, and the latitude-weighted RMSE per field."""
    import json

    lead = config.lead_hours
    frames = ["T_t (reconstruction)"] + [f"T_t+{k * lead:g} h" for k in range(1, config.num_frames)]
    evals = {label: {split: json.loads((run / EVAL_DIR / split / "metrics.json").read_text())
                     for split in ("test", "train") if (run / EVAL_DIR / split / "metrics.json").exists()}
             for label, run in runs.items()}
    lines = [f"# {title}", ""]
    for split in ("test", "train"):
        lines += [f"## MSE per frame, {split} split (in units of each field's training standard deviation)", "",
                  "| model | " + " | ".join(frames) + " | lat-weighted " + " | lat-weighted ".join(frames) + " |",
                  "|---|" + "---|" * (2 * len(frames))]
        persistence = None
        for label, results in evals.items():
            if split not in results:
                continue
            standard = results[split]["settings"]["standard"]
            cells = [_fmt(v) for v in standard["model"]["per_frame"]]
            cells += [_fmt(v) for v in standard["model"].get("lat_weighted", {}).get("per_frame", [None] * len(frames))]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
            persistence = persistence or standard["persistence"]
        if persistence is not None:
            cells = [_fmt(v) for v in persistence["per_frame"]]
            cells += [_fmt(v) for v in persistence.get("lat_weighted", {}).get("per_frame", [None] * len(frames))]
            lines.append("| persistence | " + " | ".join(cells) + " |")
        lines.append("")
    first = next(iter(evals.values()))["test"]  # the data and persistence are the same for every run
    other = [k for k in first["settings"] if k != "standard"]
    if other:
        lines += ["## Other protocols (test, MSE at T_t / at T_t+lead, in standard deviations)", "",
                  "| model | " + " | ".join(first["settings"][k]["label"] for k in other) + " |", "|---|" + "---|" * len(other)]
        for label, results in evals.items():
            s = results["test"]["settings"]
            lines.append(f"| {label} | " + " | ".join(
                f"{_fmt(s[k]['model']['per_frame'][0])} / {_fmt(s[k]['model']['per_frame'][min(1, len(frames) - 1)])}" for k in other) + " |")
        s = first["settings"]
        lines.append("| persistence | " + " | ".join(
            f"{_fmt(s[k]['persistence']['per_frame'][0])} / {_fmt(s[k]['persistence']['per_frame'][min(1, len(frames) - 1)])}"
            for k in other) + " |")
        lines.append("")
    variables, units = first["dataset"]["variables"], first["dataset"]["units"]
    last = len(frames) - 1
    for quantity, transform, unit in (("RMSE", math.sqrt, lambda u: u), ("MSE", lambda v: v, lambda u: f"({u})^2")):
        lines += [f"## {quantity} at {frames[last]} (test), each field in its own units: plain / latitude-weighted", "",
                  "| model | " + " | ".join(f"{v} [{unit(u)}]" for v, u in zip(variables, units)) + " |",
                  "|---|" + "---|" * len(variables)]

        def row(label, entry):
            per_variable = entry["per_variable"]
            return f"| {label} | " + " | ".join(
                f"{transform(per_variable[v]['plain_per_frame'][last]):.4g} / "
                f"{transform(per_variable[v]['lat_weighted_per_frame'][last]):.4g}" for v in variables) + " |"

        for label, results in evals.items():
            lines.append(row(label, results["test"]["settings"]["standard"]["model"]))
        lines.append(row("persistence", first["settings"]["standard"]["persistence"]))
        lines.append("")
    lines += ["## Training", "", "| model | parameters | steps | training wall time |", "|---|---|---|---|"]
    for label, run in runs.items():
        summary, parameters = training_summary(run), num_parameters(*Forecaster.load(run).modules)
        lines.append(f"| {label} | {parameters:,} | {summary['steps']} | {summary['wall_s'] / 60:.1f} min |")
    lines += [
        "",
        f"Data: {config.source} ({', '.join(variables)}), {first['dataset']['num_trajectories']} test trajectories of "
        f"{config.num_frames} frames {lead:g} h apart on a {' x '.join(map(str, first['dataset']['grid_shape']))} "
        f"latitude-longitude grid; splits {', '.join(f'{k} {v.start} to {v.end}' for k, v in config.splits.items())}.",
        "RMSE: the square root of the MSE (plain, or cos(latitude)-weighted), averaged over test trajectories.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine_line()}.",
        "",
        "## The paper's numbers",
        "",
        paper_table("era5").strip(),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="hourly",
        help="hourly (default: an archive given by --source, 1-hour lead time), regional (an hourly single-level CDS "
        "`area` download given by --source), quick (the sample), or a dataset YAML",
    )
    parser.add_argument("--run-preset", default=None, help="run config preset (default experiments/configs/era5_<preset>.yaml)")
    parser.add_argument("--source", default=None, help="ERA5 file, directory of files or zarr store (default: the preset's)")
    parser.add_argument("--lead-hours", type=float, default=None, help="lead time in hours (default: the preset's; hourly: 1)")
    parser.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=list(LABELS))
    parser.add_argument("--data-dir", default=None, help="where the train/test files go (default data/<dataset name>)")
    parser.add_argument("--run-root", default="runs", help="parent of the run directories")
    parser.add_argument("--table", default=None, help="where to write the table (markdown)")
    parser.add_argument("--resume", action="store_true", help="continue the runs from their last checkpoints")
    parser.add_argument("--overwrite", action="store_true", help="replace existing runs and the table")
    parser.add_argument("--overwrite-data", action="store_true", help="regenerate the train/test files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="era5.KEY=VALUE (dataset) or SECTION.KEY=VALUE (run config)")
    add_distributed_arguments(parser)
    args = parser.parse_args(argv)
    distributed.initialize_from_args(args)
    if args.preset in ("hourly", "regional") and args.source is None:
        parser.error(f"the {args.preset} preset reads your ERA5 data: give --source PATH (a zarr store, a directory of "
                     "CDS files or one file), or run --preset quick on the sample beside the project.")
    command = "python experiments/era5.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    dataset_overrides = [o[len(DATASET_PREFIX):] for o in args.overrides if o.startswith(DATASET_PREFIX)]
    run_overrides_cli = [o for o in args.overrides if not o.startswith(DATASET_PREFIX)]
    try:
        config = dataset_config(args.preset, args.source, args.lead_hours, dataset_overrides)
        run_preset = args.run_preset or (f"era5_{args.preset}" if args.preset in ("quick", "hourly", "regional") else "era5_quick")
        base = load_config(run_preset, run_overrides_cli)
        table = Path(args.table or f"experiments/results/{base.name}.md")
        check_writable(table, args.overwrite or args.resume)  # fail before training, not after
        data_dir = Path(args.data_dir or f"data/{config.name}")
        if distributed.is_main_process():  # several processes: process 0 cuts the archive, the others wait
            ensure_era5_files(config, data_dir, overwrite=args.overwrite_data, progress=not args.quiet)
        distributed.barrier("enfpde-era5-files")
        files = ensure_era5_files(config, data_dir, overwrite=False, progress=False)
        tied = run_overrides(config, files, base.dataset or "")
        runs = {}
        for geometry in args.geometries:
            run_config = load_config(
                run_preset, tied + run_overrides_cli + [f"data.geometry={geometry}", f"name={base.name}_{geometry}"]
            )
            run_dir = Path(args.run_root) / run_config.name
            print(f"=== {LABELS[geometry]}: {run_dir}", flush=True)
            run_experiment(run_config, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
            runs[LABELS[geometry]] = run_dir
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    report = era5_markdown(runs, config, title=f"ERA5, preset `{args.preset}`, lead time {config.lead_hours:g} h", command=command)
    if not distributed.is_main_process():
        return  # several processes: process 0 writes the table
    table.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(table, report)
    print(report)
    print(f"table: {table}")


if __name__ == "__main__":
    main()
