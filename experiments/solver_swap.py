"""Does a trained model's latent dynamics behave as an ODE? Score it with other solvers and step sizes than it
was trained with.

    python experiments/solver_swap.py experiments/results/navier_stokes_cpu_3h/model runs/navier_stokes_cpu_3h_heun \
        --solvers euler:1 euler:0.5 heun:1 heun:0.5 tsit5:1 --name solver_swap

Each model is loaded once; for every ``solver:dt0`` the same decoder, encoder and dynamics integrate the test
split's initial states with that diffrax solver and fixed step (in units of ``model.time_unit``), and the standard
protocol is scored (MSE in the data's units). If the dynamics had learned a vector field that the training solver
integrates accurately, a finer step or a higher-order solver would change the forecast little; if they learned
the training solver's one-step map, the forecast moves away from the truth.

Writes experiments/results/<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from enfpde.data.trajectories import TrajectoryDataset
from enfpde.evaluation import evaluate
from enfpde.forecaster import Forecaster

RESULTS = Path(__file__).parent / "results"
SHOWN_FRAMES = 6


def parse_variant(text: str) -> tuple[str, float]:
    solver, sep, dt0 = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected solver:dt0 (e.g. heun:0.5), found {text!r}.")
    return solver, float(dt0)


def score(model: Forecaster, test: TrajectoryDataset, solver: str, dt0: float) -> dict:
    """Standard-protocol scores of ``model`` with its dynamics integrated by ``solver`` at fixed step ``dt0``."""
    model_config = dataclasses.replace(model.config.model, solver=solver, dt0=dt0)
    swapped = Forecaster(dataclasses.replace(model.config, model=model_config), model.metadata, *model.modules,
                         batch_size=model.batch_size)
    result = evaluate(swapped, test, horizon_time=model.metadata["horizon_time"], sparse_fractions=(), shift=False,
                      progress=False, batch_size=model.batch_size)
    standard = result["settings"]["standard"]["model"]
    return {"solver": solver, "dt0": dt0, "t_in": standard["t_in"], "t_out": standard["t_out"],
            "per_frame": standard["per_frame"]}


def markdown(rows: list[dict], command: str) -> str:
    frames = " | ".join(f"frame {i}" for i in range(SHOWN_FRAMES))
    lines = [
        "# Trained dynamics integrated with other solvers than their own",
        "",
        f"Command: `{command}`. Standard protocol of the test split (16 trajectories, MSE in the data's units); the",
        "first row of each model is the solver it was trained with.",
        "",
        f"| model | solver, step | t_in | t_out | {frames} |",
        "|---|---|---|---|" + "---|" * SHOWN_FRAMES,
    ]
    for r in rows:
        per_frame = " | ".join(f"{e:.2e}" for e in r["per_frame"][:SHOWN_FRAMES])
        lines.append(f"| {r['model']} | {r['solver']}, {r['dt0']:g} | {r['t_in']:.2e} | {r['t_out']:.2e} | {per_frame} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="run directories or shipped model directories")
    parser.add_argument("--solvers", nargs="+", type=parse_variant, required=True, help="solver:dt0 pairs")
    parser.add_argument("--name", required=True, help="results are written as experiments/results/<name>.*")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    rows = []
    for path in args.models:
        model = Forecaster.load(path, batch_size=args.batch_size)
        test = TrajectoryDataset.open(model.config.data.test)
        own = (model.config.model.solver, float(model.config.model.dt0))
        for solver, dt0 in [own] + [v for v in args.solvers if v != own]:
            row = {"model": str(path), **score(model, test, solver, dt0)}
            rows.append(row)
            print(f"{path} {solver}:{dt0:g}: t_in {row['t_in']:.3e}, t_out {row['t_out']:.3e}", flush=True)
    variants = " ".join(f"{s}:{d:g}" for s, d in args.solvers)
    command = (f"python experiments/solver_swap.py {' '.join(str(p) for p in args.models)} --solvers {variants} "
               f"--name {args.name}")
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, command))


if __name__ == "__main__":
    main()
