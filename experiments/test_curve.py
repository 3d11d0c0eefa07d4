"""Test error against training cost: evaluate every kept checkpoint of a run on its test split.

    python experiments/test_curve.py runs/navier_stokes_cpu_long --name navier_stokes_cpu_long

For each checkpoint (or the ``--steps`` given) the run's model is loaded at that step and scored on the
standard protocol of the test split (frame 0 of every trajectory fitted, rolled out, MSE in the data's units
at the test points; t_in: lead times below the training horizon, frame 0 included; t_out: the rest). The cost
of reaching a checkpoint is read from the run's metrics log: machine minutes (CPU seconds of the training
process / cores, what another job on the machine inflates least) and wall minutes, summed over resumed
processes.

A run continued from another run's last checkpoint in a new directory (a published model resumed with a longer
schedule) has only its own processes in its log: ``--continues NAME`` adds the test curve of the run it continues
(experiments/results/NAME_test_curve.json, which must reach the step it started from), whose rows come first and
whose cost at that step is added to every cost of this run.

Writes experiments/results/<name>_test_curve.{json,md,png}; finished steps are kept in the JSON, so an
interrupted call continues where it stopped and a later call adds the new checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from enfpde import checkpointing
from enfpde.config import config_from_yaml
from enfpde.data.trajectories import TrajectoryDataset
from enfpde.evaluation import evaluate
from enfpde.experiment import cumulative_seconds
from enfpde.forecaster import Forecaster
from enfpde.plotting import _new_figure

RESULTS = Path(__file__).parent / "results"


def checkpoint_costs(run_dir: Path) -> dict[int, dict]:
    """Step -> stage, machine minutes and wall minutes spent until that step was done (from metrics.jsonl)."""
    records = checkpointing.read_metrics(run_dir)
    if not records:
        raise ValueError(f"'{run_dir}' has no training records.")
    cpu = cumulative_seconds(records, "cpu_s") / (os.cpu_count() or 1) / 60.0
    wall = cumulative_seconds(records, "elapsed_s") / 60.0
    # A resumed run repeats the steps after its last checkpoint: the last record of a step counts.
    return {int(r["step"]) + 1: {"stage": r["stage"], "machine_min": float(c), "wall_min": float(w)}
            for r, c, w in zip(records, cpu, wall)}


def row_at(base_rows: list[dict], first_step: int) -> dict:
    """The row of a continued run's test curve at ``first_step``, where the run continuing it starts."""
    at = {r["step"]: r for r in base_rows}
    if first_step not in at:
        raise SystemExit(f"the continued run's curve has no row at step {first_step}, where this run starts; it has "
                         f"{sorted(at)}.")
    return at[first_step]


def continue_costs(costs: dict[int, dict], base_rows: list[dict], first_step: int) -> dict[int, dict]:
    """``costs`` of a run that started from step ``first_step`` of the run whose test-curve rows are ``base_rows``:
    shifted by the base's machine and wall minutes at that step."""
    base = row_at(base_rows, first_step)
    return {step: {**c, "machine_min": c["machine_min"] + base["machine_min"], "wall_min": c["wall_min"] + base["wall_min"]}
            for step, c in costs.items()}


def score(run_dir: Path, step: int, test: TrajectoryDataset, batch_size: int) -> dict:
    """Standard-protocol t_in / t_out of the model at ``step`` and of persistence on ``test``."""
    return score_model(Forecaster.load(run_dir, step=step, batch_size=batch_size), test, batch_size)


def score_model(model: Forecaster, test: TrajectoryDataset, batch_size: int) -> dict:
    """Standard-protocol t_in / t_out of ``model`` and of persistence on ``test``."""
    result = evaluate(model, test, horizon_time=model.metadata["horizon_time"], sparse_fractions=(), shift=False, progress=False,
                      batch_size=batch_size)
    standard = result["settings"]["standard"]
    return {"model": standard["model"], "persistence": standard["persistence"]}


def plot(rows: list[dict], path: Path, title: str) -> None:
    fig = _new_figure(6.4, 4.0, 100)
    ax = fig.subplots()
    minutes = [r["machine_min"] for r in rows]
    for part, marker in (("t_in", "o"), ("t_out", "s")):
        ax.plot(minutes, [r["model"][part] for r in rows], marker=marker, label=f"model {part}")
        ax.axhline(rows[-1]["persistence"][part], linestyle=":", color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("training cost (machine minutes: CPU time / cores)")
    ax.set_ylabel("test MSE (data units)")
    ax.set_title(title + "  (dotted: persistence)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(path)


def markdown(rows: list[dict], run_dir: Path) -> str:
    lines = [
        f"# Test error against training cost: `{run_dir}`",
        "",
        "Command: `python experiments/test_curve.py " + str(run_dir) + " ...`. Standard protocol of the test split",
        "(MSE in the data's units); machine minutes are CPU seconds of the training process divided by the cores.",
        "",
        "| step | stage | machine min | wall min | test t_in | test t_out | persistence t_in | persistence t_out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, p = r["model"], r["persistence"]
        lines.append(f"| {r['step']} | {r['stage']} | {r['machine_min']:.1f} | {r['wall_min']:.1f} | {m['t_in']:.3e} | "
                     f"{m['t_out']:.3e} | {p['t_in']:.3e} | {p['t_out']:.3e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", required=True, help="results are written as experiments/results/<name>_test_curve.*")
    parser.add_argument("--steps", type=int, nargs="*", default=None, help="checkpoint steps (default: every kept one)")
    parser.add_argument("--continues", default=None, metavar="NAME",
                        help="the test curve (experiments/results/NAME_test_curve.json) of the run this one continues")
    args = parser.parse_args()

    run_dir = args.run_dir
    config = config_from_yaml(run_dir / checkpointing.CONFIG_FILE)
    costs = checkpoint_costs(run_dir)
    manager = checkpointing.checkpoint_manager(run_dir, max_to_keep=None)
    available = sorted(manager.all_steps())
    manager.close()
    steps = sorted(args.steps) if args.steps else available
    base_rows = []
    if args.continues:
        base_rows = json.loads((RESULTS / f"{args.continues}_test_curve.json").read_text())
        first_step = min(int(r["step"]) for r in checkpointing.read_metrics(run_dir))  # the step it resumed at
        costs = continue_costs(costs, base_rows, first_step)
        base_rows = [r for r in base_rows if r["step"] <= first_step]
        steps = [s for s in steps if s > first_step]
    missing = [s for s in steps if s not in available]
    if missing:
        raise SystemExit(f"'{run_dir}' has no checkpoint at steps {missing}; it has {available}.")

    out_json = RESULTS / f"{args.name}_test_curve.json"
    done = {r["step"]: r for r in json.loads(out_json.read_text())} if out_json.exists() else {}
    done.update({r["step"]: r for r in base_rows})
    test = TrajectoryDataset.open(config.data.test)
    for step in steps:
        if step in done:
            continue
        row = {"step": step, **costs[step], **score(run_dir, step, test, config.eval.batch_size)}
        done[step] = row
        print(f"step {step} ({row['stage']}, {row['machine_min']:.1f} machine min): "
              f"t_in {row['model']['t_in']:.3e}, t_out {row['model']['t_out']:.3e}", flush=True)
        out_json.write_text(json.dumps([done[s] for s in sorted(done)], indent=1))
    rows = [done[s] for s in sorted(done)]
    (RESULTS / f"{args.name}_test_curve.md").write_text(markdown(rows, run_dir))
    plot(rows, RESULTS / f"{args.name}_test_curve.png", args.name)


if __name__ == "__main__":
    main()
