"""Stage 2 warm-started on latent targets: the dynamics first learn to carry the fitted latents of frame s to
the fitted latents of frames s+1..s+T-1, with no decoder in the loss, then train on the fields as usual.

    python experiments/latent_warmup.py runs/navier_stokes_cpu_3h_layers4_released_decoder \\
        --latent-steps 3000 --field-steps 1024 2048 --name latent_warmup

Why: a field-space stage-2 step fits frame 0 on the window's training points and decodes every frame inside the
step, and its loss reaches the dynamics only through the decoder. The decoder and encoder are frozen in stage 2,
so the Meta-SGD latents of every training frame can be fitted once (``--fit-points`` random grid points per
field) and the dynamics regressed onto them (the latent autodecoding targets of DINo, here from
the frozen Meta-SGD encoder). experiments/results/navier_stokes_cpu_3h_error_budget.md measured the bound this
aims at: frame t's Meta-SGD contexts placed at frame 0's poses decode as well as frame t's own fit, so dynamics
that keep the fitted poses (``model.dynamics_move_poses: false``, required here) can in principle forecast as
well as the encoder fits. A latent step is not much cheaper: with 4 dynamics blocks over 64 latents a step of 8
windows costs about 0.25 machine s here, a field-space step of 4 windows with the released decoder's parts 0.27.

The run starts from the base run's decoder and encoder at the end of its stage 1 and from the base run's fresh
dynamics initialisation (as in experiments/stage2_recipe.py), in ``<base>_s2_<name>``. The latent loss is
the mean squared error of the contexts standardised per channel with the dynamics' own context statistics. After
the latent steps the usual stage 2 of the base config may continue (``--field-steps``; fresh optimiser, its
schedule, ``--override`` to change it) and the test split is scored (standard protocol) at each
``--latent-scores``, after the latent phase and at each ``--field-steps``. Machine minutes count
the fitting of the targets and the latent steps (CPU time of this process / cores) on top of the base run's
stage 1, so the curve compares with the base run's test curve (experiments/results/<base>_test_curve.json).

Writes experiments/results/<name>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from enfpde import checkpointing
from enfpde.config import config_from_yaml
from enfpde.data.trajectories import TrajectoryDataset
from enfpde.experiment import cumulative_seconds
from enfpde.forecaster import Forecaster
from enfpde.latent_targets import context_scale, fit_latent_targets, latent_windows, make_latent_stage2_step
from enfpde.latents import Latents
from enfpde.plotting import _new_figure
from enfpde.rollout import solver_from_name
from enfpde.trainer import Trainer
from enfpde.training import default_optimizer, learning_rate_schedule
from stage1_ablation import _cpu
from stage2_recipe import start_variant, stage1_end
from test_curve import score, score_model

RESULTS = Path(__file__).parent / "results"
WARMUP_FILE = "latent_warmup.json"  # in the run directory: the latent phase's log and cost
CHECKPOINT_EVERY = 1024  # besides the checkpoint at each scored step (the end of each training call)


def machine_seconds() -> float:
    """CPU seconds of this process divided by the cores (the unit of every curve in experiments/results)."""
    return time.process_time() / (os.cpu_count() or 1)


def train_on_latents(
    dynamics, config, times, targets: Latents, steps: int, batch_size: int, learning_rate: float, seed: int,
    score_at: tuple[int, ...] = (), on_score=None, metric: np.ndarray | None = None,
) -> tuple[list[float], dict[int, float]]:
    """Fit ``dynamics`` (in place) so that the rollout from frame s's latents matches the contexts fitted to frames
    s+1..s+T-1 (T = ``config.data.horizon``; ``times`` the lead times of the frames), windows drawn at random. The
    step and loss are the Trainer's (``train.stage2_targets: latents``); the schedule is this script's own (50
    warmup steps, cosine decay to 2 % of ``learning_rate``). ``metric``: None (the contexts' squared error) or the
    ``[L d, L d]`` root of :func:`enfpde.latent_targets.decoder_metric`.

    After each step in ``score_at``, ``on_score(step)`` runs with the dynamics updated. Returns the losses and the
    machine minutes of latent training (scoring excluded) at each step of ``score_at`` and at the end."""
    mc, tc = config.model, config.train
    horizon = config.data.horizon
    times = times[:horizon]
    scale = jnp.asarray(context_scale(dynamics, targets))
    _, params, rest = nnx.split(dynamics, nnx.Param, ...)
    optimizer = default_optimizer(
        learning_rate_schedule(learning_rate, steps, warmup_steps=50, decay="cosine", final_fraction=0.02),
        tc.clip_norm, tc.weight_decay,
    )
    opt_state = optimizer.init(params)
    step = make_latent_stage2_step(dynamics, optimizer, solver=solver_from_name(mc.solver), dt0=mc.dt0)

    n, f = targets.contexts.shape[:2]
    rng = np.random.default_rng([seed, 11])
    losses, t0, scoring, minutes_at = [], machine_seconds(), 0.0, {}
    for k in range(steps):
        rows = rng.choice(n, batch_size, replace=False)
        starts = rng.integers(0, f - horizon + 1, batch_size)
        z0, target_contexts = latent_windows(targets, rows, starts, horizon)
        params, opt_state, loss = step(params, opt_state, rest, z0, target_contexts, times, scale, metric)
        losses.append(float(loss))
        if not np.isfinite(losses[-1]):
            raise SystemExit(f"latent phase: non-finite loss at step {k}; lower --latent-lr.")
        if k % 250 == 0 or k == steps - 1:
            print(f"latent step {k}: loss {losses[-1]:.4f} ({(machine_seconds() - t0 - scoring) / 60:.2f} machine min)", flush=True)
        if k + 1 in score_at or k + 1 == steps:
            minutes_at[k + 1] = (machine_seconds() - t0 - scoring) / 60
        if k + 1 in score_at and on_score is not None:
            nnx.update(dynamics, params, rest)
            t_score = machine_seconds()
            on_score(k + 1)
            scoring += machine_seconds() - t_score
    nnx.update(dynamics, params, rest)
    return losses, minutes_at


def start_with_latent_warmup(base: Path, run_dir: Path, args) -> int:
    """Make ``run_dir`` (the base run at its stage-1 end) with dynamics warm-started on latent targets."""

    def warm_start(trainer, boundary):
        if trainer.config.model.dynamics_move_poses:
            raise SystemExit("latent targets need model.dynamics_move_poses: false (the poses stay where frame s fitted them).")
        t0 = machine_seconds()
        trainer._set_context_statistics(boundary)  # the same statistics the Trainer sets at the stage-2 start
        # The fit depends only on the base run's stage 1 and the points: kept beside the base run for other variants.
        cache = base.parent / f"{base.name}_latent_targets_{args.fit_points}.npz"
        if cache.exists():
            with np.load(cache) as saved:
                targets, fit_min = Latents(saved["poses"], saved["contexts"], saved["widths"]), float(saved["fit_machine_min"])
        else:
            field, encoder, _ = trainer.modules
            targets = fit_latent_targets(
                field, encoder, trainer.geometry.coords_from_user(trainer.sampler.coords), trainer.sampler.values,
                points=args.fit_points, fields_per_call=args.fields_per_call, seed=trainer.config.train.seed,
            )
            fit_min = (machine_seconds() - t0) / 60
            np.savez(cache, poses=targets.poses, contexts=targets.contexts, widths=targets.widths, fit_machine_min=fit_min)
        print(f"fitted {targets.contexts.shape[0] * targets.contexts.shape[1]} training fields in {fit_min:.1f} machine min", flush=True)
        test = TrajectoryDataset.open(trainer.config.data.test)
        metadata = json.loads((run_dir / checkpointing.MODEL_FILE).read_text())
        latent_scores = {}

        def on_score(step):
            field, encoder, dynamics = nnx.clone(trainer.modules)  # the Forecaster sets evaluation-time options
            field.chunk_size = trainer.config.model.chunk_size
            model = Forecaster(trainer.config, metadata, field, encoder, dynamics, batch_size=trainer.config.eval.batch_size)
            scored = score_model(model, test, trainer.config.eval.batch_size)["model"]
            latent_scores[step] = {"t_in": scored["t_in"], "t_out": scored["t_out"]}
            print(f"latent step {step}: test t_in {scored['t_in']:.3e}, t_out {scored['t_out']:.3e}", flush=True)

        losses, minutes_at = train_on_latents(
            trainer.modules[2], trainer.config, trainer.times, targets, args.latent_steps, args.latent_batch,
            args.latent_lr, trainer.config.train.seed,
            score_at=tuple(s for s in args.latent_scores if s < args.latent_steps), on_score=on_score,
        )
        (run_dir / WARMUP_FILE).write_text(json.dumps({
            "fit_points": args.fit_points, "latent_steps": args.latent_steps, "latent_batch": args.latent_batch,
            "latent_lr": args.latent_lr, "fit_machine_min": fit_min, "latent_machine_min": minutes_at[args.latent_steps],
            "latent_scores": [{"latent_steps": k, "latent_machine_min": minutes_at[k], **v} for k, v in sorted(latent_scores.items())],
            "losses": losses,
        }))

    overrides = dict(item.split("=", 1) for item in args.override)
    return start_variant(base, run_dir, overrides, CHECKPOINT_EVERY, before_save=warm_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="a run whose stage 1 is finished (its checkpoint there kept)")
    parser.add_argument("--latent-steps", type=int, default=3000)
    parser.add_argument("--latent-batch", type=int, default=8, help="windows per latent step")
    parser.add_argument("--latent-lr", type=float, default=2e-3, help="peak learning rate of the latent phase (cosine)")
    parser.add_argument("--latent-scores", type=int, nargs="*", default=[],
                        help="also score the test split after these latent steps (their time is not counted)")
    parser.add_argument("--fit-points", type=int, default=1024, help="grid points each training field is fitted on")
    parser.add_argument("--fields-per-call", type=int, default=64)
    parser.add_argument("--field-steps", type=int, nargs="*", default=[],
                        help="field-space stage-2 steps after the latent phase at which the test split is scored")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="stage-2 settings of the field-space phase that differ from the base run's, e.g. "
                             "train.stage2_frames=null train.stage2.learning_rate=5e-4")
    parser.add_argument("--name", default="latent_warmup")
    args = parser.parse_args()

    run_dir = args.base.parent / f"{args.base.name}_s2_{args.name}"
    if not (run_dir / WARMUP_FILE).exists():
        if run_dir.exists():
            raise SystemExit(f"'{run_dir}' exists without {WARMUP_FILE} (an interrupted start): move it away first.")
        start_with_latent_warmup(args.base, run_dir, args)
    warmup = json.loads((run_dir / WARMUP_FILE).read_text())
    config = config_from_yaml(run_dir / checkpointing.CONFIG_FILE)
    boundary = stage1_end(config)

    steps = sorted(args.field_steps)
    for s in steps:  # one training call per scored step, each ending with a checkpoint there
        done = [r for r in checkpointing.read_metrics(run_dir) if r["stage"] == "stage2"]
        if len(done) < s:
            Trainer(config, run_dir, resume=True, progress=True).run(stop_after=boundary + s)
    records = [r for r in checkpointing.read_metrics(run_dir) if r["stage"] == "stage2"]

    base_records = checkpointing.read_metrics(args.base)
    stage1_min = cumulative_seconds([r for r in base_records if r["stage"] == "stage1"], "cpu_s")[-1] / (os.cpu_count() or 1) / 60
    field_min = cumulative_seconds(records, "cpu_s") / (os.cpu_count() or 1) / 60 if records else np.zeros(0)
    warm_min = warmup["fit_machine_min"] + warmup["latent_machine_min"]
    test = TrajectoryDataset.open(config.data.test)
    cache_path = run_dir / "test_scores.json"
    cache = {int(k): v for k, v in json.loads(cache_path.read_text()).items()} if cache_path.exists() else {}
    rows = [{"latent_steps": r["latent_steps"], "field_steps": 0, "machine_min": stage1_min + warmup["fit_machine_min"] + r["latent_machine_min"],
             "t_in": r["t_in"], "t_out": r["t_out"]} for r in warmup.get("latent_scores", [])]
    for s in [0] + steps:
        if s not in cache:
            scored = score(run_dir, boundary + s, test, config.eval.batch_size)
            cache[s] = {"t_in": scored["model"]["t_in"], "t_out": scored["model"]["t_out"]}
            cache_path.write_text(json.dumps(cache, indent=1))
        minutes = stage1_min + warm_min + (float(field_min[s - 1]) if s else 0.0)
        rows.append({"latent_steps": warmup["latent_steps"], "field_steps": s, "machine_min": minutes, **cache[s]})
        print(f"after {s} field steps ({minutes:.1f} machine min): test t_in {cache[s]['t_in']:.3e}, t_out {cache[s]['t_out']:.3e}")

    curve_path = RESULTS / f"{args.base.name}_test_curve.json"
    base_curve = json.loads(curve_path.read_text()) if curve_path.exists() else []
    report(args, warmup, rows, base_curve, stage1_min, config)


def describe_stage2(config) -> str:
    tc = config.train
    frames = (f"frames 0-{tc.stage2_frames - 1} for the first {tc.stage2_frames_steps} steps, then 0-{config.data.horizon - 1}"
              if tc.stage2_frames and tc.stage2_frames_steps else
              f"frames 0-{(tc.stage2_frames or config.data.horizon) - 1}")
    return (f"{frames}; peak learning rate {tc.stage2.learning_rate:g}, {tc.stage2.warmup_steps} warmup steps, "
            f"{tc.stage2.decay} decay over {tc.stage2.epochs} epochs")


def report(args, warmup: dict, rows: list[dict], base_curve: list[dict], stage1_min: float, config) -> None:
    # The latent phase's settings are those it ran with (a later call only adds field steps and scores).
    command = (f"python experiments/latent_warmup.py {args.base} --latent-steps {warmup['latent_steps']} --latent-batch "
               f"{warmup['latent_batch']} --latent-lr {warmup['latent_lr']} --fit-points {warmup['fit_points']}"
               + "".join(f" --{flag} {' '.join(map(str, values))}" for flag, values in
                         (("latent-scores", args.latent_scores), ("field-steps", args.field_steps), ("override", args.override))
                         if values)
               + f" --name {args.name}")
    losses = np.asarray(warmup["losses"])
    window = max(1, len(losses) // 6)
    lines = [
        f"# Stage 2 warm-started on latent targets, from `{args.base}`",
        "",
        f"Command: `{command}` (machine: {_cpu()}, {os.cpu_count()} cores, jax {jax.__version__}).",
        "See the docstring of experiments/latent_warmup.py for the method. Machine minutes: CPU time / cores, from",
        f"the start of the base run (its stage 1: {stage1_min:.1f}).",
        "",
        f"Latent phase: {warmup['fit_points']} points per training field, targets fitted in {warmup['fit_machine_min']:.1f} machine min; "
        f"{warmup['latent_steps']} steps of {warmup['latent_batch']} windows in {warmup['latent_machine_min']:.1f} machine min. "
        "Mean latent loss (standardised contexts) per sixth: "
        + ", ".join(f"{losses[i:i + window].mean():.4f}" for i in range(0, len(losses) - window + 1, window)) + ".",
        "",
        f"Field-space phase: the base run's stage 2 ({describe_stage2(config)}), "
        + (f"with {', '.join(args.override)}." if args.override else "unchanged."),
        "",
        "| latent steps | field-space stage-2 steps after them | machine min | test t_in | test t_out |",
        "|---|---|---|---|---|",
        *[f"| {r['latent_steps']} | {r['field_steps']} | {r['machine_min']:.1f} | {r['t_in']:.3e} | {r['t_out']:.3e} |" for r in rows],
        "",
        "The base run (field-space stage 2 from a fresh dynamics model) at its kept checkpoints:",
        "",
        "| step | machine min | test t_in | test t_out |",
        "|---|---|---|---|",
        *[f"| {r['step']} | {r['machine_min']:.1f} | {r['model']['t_in']:.3e} | {r['model']['t_out']:.3e} |" for r in base_curve],
        "",
        f"![curves]({args.name}.png)",
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command, "warmup": warmup, "rows": rows}, indent=1))
    fig = _new_figure(6.4, 4.0, 100)
    ax = fig.subplots()
    for part, marker in (("t_in", "o"), ("t_out", "s")):
        ax.plot([r["machine_min"] for r in rows], [r[part] for r in rows], marker=marker, label=f"latent warm start {part}")
        if base_curve:
            ax.plot([r["machine_min"] for r in base_curve], [r["model"][part] for r in base_curve], marker=marker,
                    linestyle="--", label=f"base {part}")
    ax.set_yscale("log")
    ax.set_xlabel("training cost (machine minutes: CPU time / cores)")
    ax.set_ylabel("test MSE (data units)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
