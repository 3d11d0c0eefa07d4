"""What the quarter-turn forecast ensemble buys: test error of trained models forecasting alone and as the mean of
their four quarter-turned forecasts (``model.forecast_ensemble``, enfpde.forecaster.Forecaster.predict).

    python experiments/ensemble_gain.py runs/navier_stokes_cpu_3h_fit6@70848 \\
        experiments/results/navier_stokes_cpu_3h_fit6_from_60k/model --name ensemble_gain

Each model (a run or published model directory, ``@STEP`` for a checkpoint other than the latest) is scored on
its test split with the standard protocol (MSE in the data's units, t_in: lead times below the training horizon,
frame 0 included; t_out: the rest), once per ensemble, and the error per lead time is kept. The training is the
same for both rows of a model: the ensemble changes only how a forecast is made, at four times its cost.

Writes experiments/results/<name>.{md,json}; finished models are kept in the JSON, so a later call adds models.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from enfpde.data.trajectories import TrajectoryDataset, save_json_atomic
from enfpde.forecaster import Forecaster
from stage1_ablation import _cpu
from test_curve import score_model

RESULTS = Path(__file__).parent / "results"
ENSEMBLES = ("none", "quarter_turns")


def score(spec: str) -> dict:
    path, _, step = spec.partition("@")
    row = {"model": spec}
    for ensemble in ENSEMBLES:
        model = Forecaster.load(path, step=int(step) if step else None, ensemble=ensemble)
        test = TrajectoryDataset.open(model.config.data.test)
        start = time.perf_counter()
        standard = score_model(model, test, model.config.eval.batch_size)["model"]
        row["step"] = model.step
        row[ensemble] = {"t_in": standard["t_in"], "t_out": standard["t_out"], "per_frame": standard["per_frame"],
                         "seconds": time.perf_counter() - start}
        print(f"{spec} {ensemble}: t_in {standard['t_in']:.3e}, t_out {standard['t_out']:.3e}", flush=True)
    return row


def report(rows: list[dict], name: str) -> None:
    lines = [
        "# The quarter-turn forecast ensemble on trained Navier-Stokes models",
        "",
        f"Command: `python experiments/ensemble_gain.py <models> --name {name}`. Machine: {_cpu()}. Test split, standard",
        "protocol (MSE in the data's units); `none`: one forecast from the initial state; `quarter_turns`: the mean of",
        "the forecasts from the initial state turned 0-3 quarter turns, each turned back (4x the forecasting cost;",
        "the same trained model). Seconds: the whole test split's forecasts and scoring.",
        "",
        "| model (checkpoint) | one forecast: t_in / t_out | quarter-turn ensemble: t_in / t_out | ratio t_in / t_out | seconds (one / ensemble) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["none"], r["quarter_turns"]
        lines.append(
            f"| {r['model'].partition('@')[0]} ({r['step']}) | {a['t_in']:.2e} / {a['t_out']:.2e} | {b['t_in']:.2e} / {b['t_out']:.2e} | "
            f"{b['t_in'] / a['t_in']:.2f} / {b['t_out'] / a['t_out']:.2f} | {a['seconds']:.0f} / {b['seconds']:.0f} |"
        )
    lines += ["", "Error per lead time (frames 0, 1, 5, 9, 10, 19), one forecast -> ensemble:", ""]
    for r in rows:
        a, b = np.asarray(r["none"]["per_frame"]), np.asarray(r["quarter_turns"]["per_frame"])
        cells = ", ".join(f"{i}: {a[i]:.2e} -> {b[i]:.2e}" for i in (0, 1, 5, 9, 10, 19) if i < len(a))
        lines.append(f"- {r['model']}: {cells}")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="run or published model directories, optionally @STEP")
    parser.add_argument("--name", default="ensemble_gain")
    args = parser.parse_args()
    out = RESULTS / f"{args.name}.json"
    done = {r["model"]: r for r in json.loads(out.read_text())} if out.exists() else {}
    for spec in args.models:
        if spec not in done:
            done[spec] = score(spec)
            save_json_atomic(out, list(done.values()))
    report(list(done.values()), args.name)


if __name__ == "__main__":
    main()
