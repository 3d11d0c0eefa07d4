"""The ``enfpde`` command: generate datasets, train, evaluate, forecast, and the quickstart.

Run ``enfpde <command> --help`` for the options of each command. An error prints one line naming what was
found and what was expected, and exits with code 2; ``--debug`` (or ``ENFPDE_DEBUG=1``) shows the traceback
instead, for bug reports.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from pathlib import Path

import numpy as np

from enfpde.config import FORECAST_ENSEMBLES


def _parse_times(text: str) -> np.ndarray:
    """``"0,0.5,1"`` (a list) or ``"start:stop:step"`` (stop included when it falls on the grid)."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            return np.round(np.arange(start, stop + 0.5 * step, step), 10)
        return np.asarray([float(v) for v in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid times {text!r}: expected a comma-separated list (0,1,2) or start:stop:step (0:19:0.25)."
        ) from None


def _cmd_generate(args) -> int:
    from enfpde.data import generate_dataset

    paths = generate_dataset(args.config, output_dir=args.output_dir, overwrite=args.overwrite, progress=not args.quiet)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def _cmd_train(args) -> int:
    from enfpde.config import load_config
    from enfpde.experiment import default_run_dir
    from enfpde.trainer import train

    config = load_config(args.preset, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config)
    train(config, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print(f"trained: {run_dir}")
    return 0


def _cmd_evaluate(args) -> int:
    from enfpde.experiment import evaluate_run

    report = evaluate_run(args.run_dir, overwrite=args.overwrite, progress=not args.quiet, figures=not args.no_figures,
                          ensemble=args.ensemble)
    print(report.read_text())
    return 0


def _cmd_forecast(args) -> int:
    from enfpde.experiment import forecast_file

    path = forecast_file(
        args.run_dir,
        args.input,
        args.output,
        times=args.times,
        at=args.at,
        resolution=args.resolution,
        variables=args.variables,
        overwrite=args.overwrite,
        init_time=args.init_time,
        max_steps=args.max_steps,
        ensemble=args.ensemble,
    )
    print(f"forecast written to {path}")
    return 0


def _cmd_quickstart(args) -> int:
    from enfpde.experiment import quickstart

    quickstart(workdir=Path(args.workdir), overwrite=args.overwrite)
    return 0


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that make a command one process of a multi-process job (enfpde.distributed.initialize)."""
    group = parser.add_argument_group("multi-process runs (jax.distributed; also from SLURM or the ENFPDE_* variables)")
    group.add_argument("--coordinator", default=None, help="host:port of process 0, reachable from every process")
    group.add_argument("--num-processes", type=int, default=None, help="number of processes in the job")
    group.add_argument("--process-id", type=int, default=None, help="this process's index, 0 ... num-processes - 1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enfpde", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also ENFPDE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate a dataset from its YAML definition (datasets/*.yaml)")
    p.add_argument("config", help="dataset YAML, e.g. datasets/navier_stokes.yaml")
    p.add_argument("--output-dir", default=None, help="override the YAML's output directory")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("train", help="train a forecaster from a preset with key=value overrides")
    p.add_argument("--preset", default="quick", help="preset name in experiments/configs or a YAML path")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --run-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.stage1.epochs=10")
    add_distributed_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a run on its test split (and train split): tables and figures")
    p.add_argument("run_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing evaluation")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG and GIF figures")
    p.add_argument("--ensemble", choices=FORECAST_ENSEMBLES, default=None,
                   help="forecast with this ensemble instead of the run's model.forecast_ensemble; written to eval_<ENSEMBLE>/")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_distributed_arguments(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("forecast", help="forecast the initial states of a netCDF/zarr (or, ERA5 models, GRIB) file; write netCDF")
    p.add_argument("run_dir", help="a trained run directory")
    p.add_argument("input", help="netCDF or zarr with the initial state(s); the first time is used if it has several")
    p.add_argument("-o", "--output", required=True, help="output netCDF path")
    p.add_argument("--times", type=_parse_times, required=True, help="lead times: 0,1,2 or start:stop:step")
    p.add_argument("--at", default=None, help="netCDF/zarr whose coordinates give the output grid or points")
    p.add_argument("--resolution", default=None, help="output grid size per axis, e.g. 128x128 (regular grid)")
    p.add_argument("--variables", nargs="+", default=None, help="variables to write (default all)")
    p.add_argument(
        "--init-time", default=None,
        help="models trained on ERA5: the analysis time of a raw ERA5 input (GRIB, CDS netCDF, zarr) to start from, "
        "e.g. 2017-01-02T00 (default its first time)",
    )
    p.add_argument(
        "--max-steps", type=_positive_int, default=4096,
        help="the ODE solver's step budget (default 4096); lead times needing more steps are refused up front",
    )
    p.add_argument("--ensemble", choices=FORECAST_ENSEMBLES, default=None,
                   help="forecast with this ensemble instead of the run's model.forecast_ensemble (quarter_turns: 4x the cost)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_distributed_arguments(p)
    p.set_defaults(func=_cmd_forecast)

    p = sub.add_parser("quickstart", help="generate small Navier-Stokes data, train, evaluate, forecast (minutes on 2 CPU cores)")
    p.add_argument("--workdir", default=".", help="where data/ and runs/ go (default: here)")
    p.add_argument("--overwrite", action="store_true", help="redo everything, replacing earlier quickstart output")
    p.set_defaults(func=_cmd_quickstart)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}.")
    return value


_NEGATIVE_NUMBERS = re.compile(r"^-\d|^-\.\d")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--times -1,0,1`` -> ``--times=-1,0,1``: argparse would read a value that starts with '-' as an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--times" and i + 1 < len(argv) and _NEGATIVE_NUMBERS.match(argv[i + 1]):
            out.append(f"--times={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _join_negative_values(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("ENFPDE_DEBUG", "") not in ("", "0")
    try:
        if hasattr(args, "process_id"):
            from enfpde import distributed

            distributed.initialize_from_args(args)  # several processes if the flags, ENFPDE_* or SLURM say so
        return args.func(args)
    except KeyboardInterrupt:
        print(f"enfpde {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure is one line for the user; --debug shows where it came from
        if debug:
            traceback.print_exc()
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        kind = "" if isinstance(error, (ValueError, KeyError, TypeError, OSError)) else f"{type(error).__name__}: "
        text = " ".join(str(message).split()) or type(error).__name__
        hint = "" if debug else " (run with --debug for the traceback)" if kind else ""
        print(f"enfpde {args.command}: error: {kind}{text}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
