"""Where a trained Navier-Stokes model's test error comes from: the decoder, the 3-step fit or the dynamics.

    python experiments/error_budget.py experiments/results/navier_stokes_cpu_3h/model --name navier_stokes_cpu_3h

On the run's test split (MSE in the data's units on the full test grid, mean over trajectories):

1. *Meta-SGD fit*: each frame fitted on its own with the model's inner steps, as frame 0 is fitted before a forecast.
2. *Decoder bound*: that fit's contexts refined by ``--refine-steps`` Adam steps with the decoder frozen, poses kept:
   how well the decoder represents the fields at all (an upper bound on its best error, not the best itself).
3. *Frame-0 poses*: the same with every latent's pose replaced by the pose fitted to frame 0, which is all that
   dynamics that keep the fitted poses (``model.dynamics_move_poses: false``) can use.
4. *Forecast from n points*: the model's forecast from frame 0 observed on ``n`` random grid points (the dynamics
   stages fit frame 0 on ``train.num_points`` points of each training window), ``n`` = the whole grid being the
   standard protocol.

Writes experiments/results/<name>_error_budget.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from enfpde.data.trajectories import TrajectoryDataset
from enfpde.evaluation import sparse_observation_masks
from enfpde.forecaster import Forecaster

RESULTS = Path(__file__).parent / "results"


def context_refiner(field, coords, steps: int, learning_rate: float):
    """A jitted ``refine(z, values) -> z``: ``steps`` Adam steps of rate ``learning_rate`` on the contexts of latents
    ``z`` (batch ``[B]``, poses kept, decoder frozen) against the normalised ``values [B, M, C]`` at ``coords [M, D]``."""
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def refine(z, values):
        def loss(contexts):
            return jnp.mean((field(coords, z.replace(contexts=contexts)) - values) ** 2)

        def step(carry, _):
            contexts, state = carry
            updates, state = optimizer.update(jax.grad(loss)(contexts), state, contexts)
            return (contexts + updates, state), None

        (contexts, _), _ = jax.lax.scan(step, (z.contexts, optimizer.init(z.contexts)), None, length=steps)
        return z.replace(contexts=contexts)

    return refine


def fit_errors(model: Forecaster, test: TrajectoryDataset, frames: list[int], refine_steps: int, learning_rate: float) -> dict:
    """Per frame: MSE of the Meta-SGD fit, of its refined contexts with its own poses and with frame 0's poses."""
    field, encoder, _ = model.modules
    coords = jnp.asarray(model.geometry.coords_from_user(test.coords))
    normalized = jnp.asarray(model.normalizer.normalize(np.asarray(test.values, np.float32)))  # [N, T, M, C]
    variance = jnp.asarray(model.normalizer.std, jnp.float32) ** 2  # back to the data's units, per channel
    refine = context_refiner(field, coords, refine_steps, learning_rate)

    @jax.jit
    def meta_sgd(values):
        return encoder(field, coords, values)

    @jax.jit
    def raw_mse(z, values):
        return jnp.mean((field(coords, z) - values) ** 2 * variance)

    z0 = meta_sgd(normalized[:, 0])
    rows = {}
    for t in frames:
        values = normalized[:, t]
        z = meta_sgd(values)
        frame0_poses = z.replace(poses=z0.poses)
        rows[t] = {
            "meta_sgd": float(raw_mse(z, values)),
            "refined": float(raw_mse(refine(z, values), values)),
            "frame0_poses": float(raw_mse(frame0_poses, values)),
            "frame0_poses_refined": float(raw_mse(refine(frame0_poses, values), values)),
        }
        print(f"frame {t}: " + ", ".join(f"{k} {v:.3e}" for k, v in rows[t].items()), flush=True)
    return rows


def forecast_errors(model: Forecaster, test: TrajectoryDataset, points: list[int], horizon: int, seed: int) -> dict:
    """Per number of observed frame-0 points: the forecast's per-frame MSE over the first ``horizon`` frames. The
    points are drawn like the sparse-initial-state protocol's (``enfpde.evaluation.sparse_observation_masks``)."""
    values = np.asarray(test.values, np.float32)
    num_points = values.shape[2]
    lead = np.asarray(test.times[:horizon] - test.times[0], np.float64)
    out = {}
    for n in points:
        observed = sparse_observation_masks(test, n / num_points, seed)
        initial = np.where(observed[..., None], values[:, 0], np.nan)
        pred = model.predict(test.coords, initial, lead, test.coords)
        out[n] = ((pred - values[:, :horizon]) ** 2).mean(axis=(0, 2, 3)).tolist()
        print(f"forecast from {n} points: t_in {np.mean(out[n]):.3e}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory (or a published model directory)")
    parser.add_argument("--name", required=True, help="results go to experiments/results/<name>_error_budget.{md,json}")
    parser.add_argument("--frames", type=int, nargs="+", default=[0, 1, 2, 5, 9])
    parser.add_argument("--points", type=int, nargs="+", default=[256, 1024], help="observed frame-0 points (the whole grid is added)")
    parser.add_argument("--refine-steps", type=int, default=150)
    parser.add_argument("--refine-lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = Forecaster.load(args.run)
    config = model.config
    test = TrajectoryDataset.open(config.data.test)
    horizon = config.data.horizon
    fits = fit_errors(model, test, args.frames, args.refine_steps, args.refine_lr)
    # the whole grid is always one of them: the standard protocol's forecast
    points = sorted(set(args.points) | {int(test.coords.shape[0])})
    forecasts = forecast_errors(model, test, points, horizon, args.seed)
    results = {"run": str(args.run), "step": int(model.step), "test": config.data.test, "fits": fits,
               "forecasts": forecasts, "refine_steps": args.refine_steps, "refine_lr": args.refine_lr,
               "machine": f"{platform.processor() or platform.machine()}, jax {jax.__version__}"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}_error_budget.json").write_text(json.dumps(results, indent=1))

    command = f"python experiments/error_budget.py {args.run} --name {args.name}"
    lines = [
        f"# Error budget of `{args.name}` (step {model.step}) on its test split",
        "",
        f"Command: `{command}`. MSE in the data's units on the full test grid ({test.num_trajectories} trajectories; mean",
        "w^2 is about 1.05). See the docstring of experiments/error_budget.py for what each column is.",
        "",
        f"| frame | Meta-SGD fit | + {args.refine_steps} Adam steps on the contexts | frame-0 poses, Meta-SGD contexts "
        f"| frame-0 poses + {args.refine_steps} Adam steps | forecast from frame 0 |",
        "|---|---|---|---|---|---|",
    ]
    full = forecasts[max(forecasts)]
    for t, row in fits.items():
        forecast = f"{full[t]:.2e}" if t < len(full) else ""
        lines.append(f"| {t} | {row['meta_sgd']:.2e} | {row['refined']:.2e} | {row['frame0_poses']:.2e} "
                     f"| {row['frame0_poses_refined']:.2e} | {forecast} |")
    lines += [
        "",
        "Forecast from frame 0 observed on n random grid points (the rest missing), per frame of the horizon:",
        "",
        "| n | " + " | ".join(f"frame {t}" for t in range(horizon)) + " | t_in |",
        "|---|" + "---|" * (horizon + 1),
    ]
    for n, per_frame in forecasts.items():
        lines.append(f"| {n} | " + " | ".join(f"{e:.2e}" for e in per_frame) + f" | {np.mean(per_frame):.2e} |")
    (RESULTS / f"{args.name}_error_budget.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
