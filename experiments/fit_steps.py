"""How much a few more encoder steps buy: the test error of the fit of frame 0 against ``model.fit_steps``.

    python experiments/fit_steps.py experiments/results/navier_stokes_cpu_3h_latent_targets_83k/model \\
        --steps 3 4 5 6 8 13 --forecast-steps 3 6 --name fit_steps

The Meta-SGD encoder is meta-trained for its ``inner_steps`` steps; ``fit_steps`` repeats the same learned step
sizes for longer whenever a state is fitted outside the stage-1 loss (forecasts, latent targets). For each
step count this fits frame 0 of every test trajectory from three kinds of observation and scores the decoded field on
the full grid (MSE in the data's units): the whole 64 x 64 grid (the standard protocol's initial state), 1024
random points (how the latent targets are fitted: ``train.latent_targets.points``) and 5 % of the points (the
sparse protocol; mean over 3 draws). Cost: machine seconds (CPU time / cores) of one fit of 64 fields on 1024
points, compiled once before timing: the price of fitting latent targets with that many steps.

With ``--forecast-steps``, the model's forecasts (standard protocol, t_in / t_out) are also scored with the initial
state fitted in that many steps and the dynamics unchanged: what the steps give a model whose dynamics were
trained on fits of another step count.

Writes experiments/results/<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from enfpde.data.trajectories import TrajectoryDataset
from enfpde.forecaster import Forecaster
from stage1_ablation import _cpu
from test_curve import score_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a trained run or published model")
    parser.add_argument("--steps", type=int, nargs="+", default=[3, 4, 5, 6, 8, 13])
    parser.add_argument("--forecast-steps", type=int, nargs="*", default=[], help="also score forecasts with these steps")
    parser.add_argument("--name", default="fit_steps")
    args = parser.parse_args()

    model = Forecaster.load(args.model)
    field, encoder, _ = model.modules
    test = TrajectoryDataset.open(model.config.data.test)
    coords = jnp.asarray(model.geometry.coords_from_user(test.coords))
    values = jnp.asarray(model.normalizer.normalize(np.asarray(test.values[:, 0], np.float32)))  # [N, M, C]
    variance = jnp.asarray(model.normalizer.std, jnp.float32) ** 2
    n, m = values.shape[:2]
    rng = np.random.default_rng(0)
    draws = {"1024": [np.sort(rng.choice(m, 1024, replace=False))],
             "5%": [np.sort(rng.choice(m, round(0.05 * m), replace=False)) for _ in range(3)]}
    timing_values = jnp.tile(values, (-(-64 // n), 1, 1))[:64]

    @nnx.jit(static_argnames="steps")
    def fit(field, encoder, c, v, steps):
        return encoder(field, c, v, steps=steps)

    @jax.jit
    def grid_error(z):
        return (((field(coords, z) - values) ** 2) * variance).mean()

    rows = []
    inner = model.config.model.inner_steps
    z_inner = fit(field, encoder, coords, values, inner)
    rms = lambda x: float(jnp.sqrt(jnp.mean(x**2)))
    for steps in args.steps:
        row = {"steps": steps}
        z = fit(field, encoder, coords, values, steps)  # on the whole grid
        row["grid"] = float(grid_error(z))
        for name, subsets in draws.items():
            row[name] = float(np.mean([grid_error(fit(field, encoder, coords[i], values[:, i], steps)) for i in subsets]))
        row["context_change"] = rms(z.contexts - z_inner.contexts) / rms(z_inner.contexts)
        idx = draws["1024"][0]
        jax.block_until_ready(fit(field, encoder, coords[idx], timing_values[:, idx], steps))
        start = time.process_time()
        for _ in range(3):
            jax.block_until_ready(fit(field, encoder, coords[idx], timing_values[:, idx], steps))
        row["machine_s_per_64_fields"] = (time.process_time() - start) / 3 / (os.cpu_count() or 1)
        rows.append(row)
        print(row, flush=True)

    forecasts = []
    for steps in args.forecast_steps:
        encoder.fit_steps = steps  # a Forecaster compiles its modules as it finds them: build one per step count
        config = dataclasses.replace(model.config, model=dataclasses.replace(model.config.model, fit_steps=steps))
        forecaster = Forecaster(config, model.metadata, field, encoder, model.modules[2], batch_size=config.eval.batch_size)
        scored = score_model(forecaster, TrajectoryDataset.open(config.data.test), config.eval.batch_size)["model"]
        forecasts.append({"steps": steps, "t_in": scored["t_in"], "t_out": scored["t_out"]})
        print(forecasts[-1], flush=True)

    trained = model.config.model.fit_steps or inner
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"model": str(args.model), "inner_steps": inner, "fit_steps": trained, "rows": rows, "forecasts": forecasts}, indent=1))
    forecast_flag = f"--forecast-steps {' '.join(map(str, args.forecast_steps))} " if args.forecast_steps else ""
    lines = [
        f"# Test error of the frame-0 fit against the encoder's steps: `{args.model}` (meta-trained for {inner})",
        "",
        f"Command: `python experiments/fit_steps.py {args.model} --steps {' '.join(map(str, args.steps))} "
        f"{forecast_flag}--name {args.name}` "
        f"(machine: {_cpu()}, jax {jax.__version__}).",
        f"See the docstring of experiments/fit_steps.py. Test split, {n} trajectories, frame 0; MSE in the data's units on the",
        "full grid whatever the points fitted (mean w^2 is about 1.05).",
        "",
        "| steps | fitted on the grid | fitted on 1024 points | fitted on 5 % of the points (3 draws) | machine s per 64 fields on 1024 points "
        f"| contexts moved from the {inner}-step fit (grid; RMS of the change / RMS of the contexts) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['steps']}{' (inner_steps)' if r['steps'] == inner else ''} | {r['grid']:.2e} | {r['1024']:.2e} | "
                     f"{r['5%']:.2e} | {r['machine_s_per_64_fields']:.2f} | {r['context_change']:.3f} |")
    if forecasts:
        lines += ["", f"Forecasts of the same model (its dynamics trained on fits of {trained} steps), standard protocol of the test split:",
                  "", "| steps of the initial fit | t_in | t_out |", "|---|---|---|"]
        lines += [f"| {f['steps']} | {f['t_in']:.2e} | {f['t_out']:.2e} |" for f in forecasts]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
