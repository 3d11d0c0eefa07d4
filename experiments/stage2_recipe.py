"""Stage-2 variants trained from one finished stage 1: what buys dynamics accuracy per CPU minute.

    python experiments/stage2_recipe.py runs/navier_stokes_cpu_long --variants scale_0.1 --steps 256

Every variant starts from the same decoder and Meta-SGD encoder (the base run's checkpoint at the end of its
stage 1) and from the same fresh dynamics initialisation (the base run's seed), and trains stage 2 on the base
run's data and batches with the variant's overrides; only dynamics settings and the stage-2 schedule may
differ (and the points per frame, which only the finished stage 1 used before). The base run's own stage-2 log
is the `base` variant. Each variant is a run directory
``<base>_s2_<variant>`` (kept: a second call continues or reuses it) with its training loss per step; the
report compares the mean training loss over windows of steps and the machine minutes spent.

Writes experiments/results/stage2_recipe.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
from flax import nnx

from enfpde import checkpointing
from enfpde.config import config_from_yaml, load_config
from enfpde.data.trajectories import TrajectoryDataset
from enfpde.experiment import cumulative_seconds
from enfpde.forecaster import build_modules
from enfpde.plotting import _new_figure
from enfpde.trainer import Trainer

RESULTS = Path(__file__).parent / "results"

# The quick preset's stage 2 (experiments/configs/quick.yaml) as overrides of a base run made before it.
QUICK_STAGE2 = {"model.dynamics_k_nearest": 16, "train.stage2.epochs": 150, "train.stage2_frames": 5, "train.stage2_frames_steps": 512}

# variant -> (overrides, what it changes)
VARIANTS = {
    "scale_0.1": ({"model.dynamics_output_scale": 0.1}, "learned velocity scale starts at 0.1 instead of 1e-3"),
    "scale_1": ({"model.dynamics_output_scale": 1.0}, "learned velocity scale starts at 1 instead of 1e-3"),
    "heun": ({"model.solver": "heun"}, "Heun (2 evaluations per frame) instead of explicit Euler"),
    "euler_dt0.5": ({"model.dt0": 0.5}, "explicit Euler with 2 steps per frame instead of 1"),
    "lr_5e-3": ({"train.stage2.learning_rate": 5e-3}, "peak learning rate 5e-3 instead of 2e-3"),
    "width_128x3": ({"model.dynamics_hidden": 128, "model.dynamics_layers": 3}, "dynamics 128 wide, 3 blocks (the released size)"),
    "layers_4": ({"model.dynamics_layers": 4}, "dynamics with 4 blocks instead of 2 (Euler): as many blocks per frame as Heun's two evaluations"),
    "frames_3": ({"train.stage2_frames": 3}, "trains on frames 0-2 of each trajectory (2 Euler steps) instead of 0-9"),
    "frames_5": ({"train.stage2_frames": 5}, "trains on frames 0-4 of each trajectory (4 Euler steps) instead of 0-9"),
    "frames_5_then_10": (
        {"train.stage2_frames": 5, "train.stage2_frames_steps": 384},
        "frames 0-4 for the first 384 steps, then frames 0-9 (a short-horizon start)",
    ),
    "knn_9": ({"model.dynamics_k_nearest": 9}, "each latent's dynamics hear only its 9 nearest latents instead of all"),
    "knn_16": ({"model.dynamics_k_nearest": 16}, "each latent's dynamics hear only its 16 nearest latents instead of all"),
    "points_128": ({"train.num_points": 128}, "128 random points per frame in the loss instead of 256"),
    "points_1024": (
        {"train.num_points": 1024},
        "1024 random points per frame instead of 256: frame 0 fitted on 1024 points (a forecast from a 256-point fit is "
        "worse than from 1024: navier_stokes_cpu_3h_error_budget.md) and the loss on 1024",
    ),
    "quick_900": (QUICK_STAGE2, "the quick preset's stage 2: 16 nearest latents, 900 steps, frames 0-4 for the first 512"),
    "quick_900_frames_3": ({**QUICK_STAGE2, "train.stage2_frames": 3}, "the same with frames 0-2 (2 Euler steps) for the first 512 steps"),
    "quick_900_frames_3_points_128": (
        {**QUICK_STAGE2, "train.stage2_frames": 3, "train.stage2_points": 128},
        "frames 0-2 for the first 512 steps, and 128 of the 256 points of each frame (encoder and loss)",
    ),
    "quick_900_frames_3_for_700": (
        {**QUICK_STAGE2, "train.stage2_frames": 3, "train.stage2_frames_steps": 700},
        "frames 0-2 for the first 700 steps, then 0-9",
    ),
    "quick_900_frames_3_fixed_poses": (
        {**QUICK_STAGE2, "train.stage2_frames": 3, "model.dynamics_move_poses": False},
        "frames 0-2 for the first 512 steps; the dynamics evolve the contexts only, every pose stays where it was fitted",
    ),
    "quick_1200_fixed_poses": (
        {**QUICK_STAGE2, "train.stage2.epochs": 200, "train.stage2_frames": 3, "train.stage2_frames_steps": 600,
         "model.dynamics_move_poses": False},
        "the quick preset's stage 2 now: fixed poses, 1200 steps, frames 0-2 for the first 600",
    ),
    "frames_5_points_128": (
        {"train.stage2_frames": 5, "train.num_points": 128}, "frames 0-4 and 128 points per frame (both of the above)"
    ),
}
ALLOWED_PREFIXES = ("model.dynamics_", "model.solver", "model.dt0", "model.kernel_radius", "train.stage2.", "train.stage2_frames",
                    "train.num_points", "train.stage2_points")


def stage1_end(config) -> int:
    """The global step at which the config's stage 1 ends."""
    steps_per_epoch = TrajectoryDataset.open(config.data.train).num_trajectories // config.train.batch_size
    return config.train.stage1.epochs * steps_per_epoch


def start_variant(base: Path, run_dir: Path, overrides: dict, checkpoint_every: int, before_save=None) -> int:
    """Make ``run_dir`` a run at the base run's stage-1 end with a fresh dynamics model; returns that step.

    ``before_save(trainer, boundary)``, if given, may change the dynamics (a warm start) before that checkpoint
    is written."""
    for key in overrides:
        if not key.startswith(ALLOWED_PREFIXES):
            raise SystemExit(f"{key}: only dynamics settings and train.stage2.* may differ from the base run.")
    config = load_config(base / checkpointing.CONFIG_FILE, [f"{k}={v}" for k, v in overrides.items()])
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, keep_checkpoints=1000, checkpoint_every=checkpoint_every)
    )
    boundary = stage1_end(config)
    trainer = Trainer(config, run_dir, progress=False)
    base_manager = checkpointing.checkpoint_manager(base, max_to_keep=None)
    if boundary not in base_manager.all_steps():
        raise SystemExit(f"'{base}' has no checkpoint at the end of stage 1 (step {boundary}).")
    # The checkpoint holds the base run's dynamics, whose shapes a variant may change (its width, its blocks): the
    # restore target is the base run's modules, of which the decoder and encoder are kept.
    base_config = config_from_yaml(base / checkpointing.CONFIG_FILE)
    base_modules = nnx.eval_shape(
        lambda: build_modules(base_config.model, trainer.geometry, len(trainer.train_data.variables), base_config.train.seed)
    )
    restored, _ = checkpointing.restore(base_manager, boundary, nnx.state(base_modules))
    base_manager.close()
    field, encoder, _ = trainer.modules  # the dynamics keep their fresh initialisation
    nnx.update(field, restored[0])
    nnx.update(encoder, restored[1])
    if before_save is not None:
        before_save(trainer, boundary)
    manager = checkpointing.checkpoint_manager(run_dir, max_to_keep=1)
    trainer._save(manager, boundary)
    manager.wait_until_finished()
    manager.close()
    return boundary


def train_variant(base: Path, name: str, overrides: dict, steps: int, checkpoint_every: int) -> list[dict]:
    """Train (or continue) the variant's run to ``steps`` stage-2 steps, keeping a checkpoint every
    ``checkpoint_every``; returns its stage-2 log."""
    run_dir = base.parent / f"{base.name}_s2_{name}"
    if not (run_dir / checkpointing.CONFIG_FILE).exists():
        boundary = start_variant(base, run_dir, overrides, checkpoint_every)
    else:
        boundary = stage1_end(config_from_yaml(run_dir / checkpointing.CONFIG_FILE))
    done = [r for r in checkpointing.read_metrics(run_dir) if r["stage"] == "stage2"]
    if len(done) < steps:
        config = config_from_yaml(run_dir / checkpointing.CONFIG_FILE)
        Trainer(config, run_dir, resume=True, progress=True).run(stop_after=boundary + steps)
    return [r for r in checkpointing.read_metrics(run_dir) if r["stage"] == "stage2"][:steps]


def summary(records: list[dict], window: int) -> dict:
    losses = np.array([r["loss"] for r in records])
    # CPU seconds since the first stage-2 record (the log's clock also counts stage 1 in the base run)
    cpu = (lambda c: c - c[0])(cumulative_seconds(records, "cpu_s")) / (os.cpu_count() or 1) / 60.0
    means = [float(losses[i : i + window].mean()) for i in range(0, len(losses) - window + 1, window)]
    return {"window_means": means, "machine_min": float(cpu[-1]) if len(cpu) else 0.0, "losses": losses.tolist(),
            "cpu_minutes": cpu.tolist()}


def test_scores(run_dir: Path, boundary: int, steps: list[int], cpu_at: dict[int, float]) -> list[dict]:
    """Standard-protocol test t_in / t_out of ``run_dir`` at stage-2 steps ``steps`` (counted from ``boundary``),
    with the stage-2 machine minutes spent to reach them (``cpu_at``: stage-2 step -> minutes)."""
    from test_curve import score  # the scoring of experiments/test_curve.py, so the curves compare

    config = config_from_yaml(run_dir / checkpointing.CONFIG_FILE)
    test = TrajectoryDataset.open(config.data.test)
    cache_path = run_dir / "stage2_test_scores.json"  # a step is scored once, however often the report is made
    cache = {int(k): v for k, v in json.loads(cache_path.read_text()).items()} if cache_path.exists() else {}
    rows = []
    for step in steps:
        if boundary + step not in cache:
            scored = score(run_dir, boundary + step, test, config.eval.batch_size)
            cache[boundary + step] = {"t_in": scored["model"]["t_in"], "t_out": scored["model"]["t_out"],
                                      "persistence_t_in": scored["persistence"]["t_in"]}
            cache_path.write_text(json.dumps(cache, indent=1))
        rows.append({"stage2_step": step, "machine_min": cpu_at[step], **cache[boundary + step]})
        print(f"{run_dir.name} stage-2 step {step}: test t_in {rows[-1]['t_in']:.3e}, t_out {rows[-1]['t_out']:.3e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="a run whose stage 1 is finished (its checkpoint there kept)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--steps", type=int, default=256, help="stage-2 steps per variant")
    parser.add_argument("--window", type=int, default=64, help="steps per mean in the table")
    parser.add_argument(
        "--test-every", type=int, default=0,
        help="score the test split every this many stage-2 steps (checkpoints kept there; the base run must have "
             "checkpoints at the same steps); 0: no test scores",
    )
    parser.add_argument("--test-steps", type=int, nargs="+", default=None,
                        help="score the test split at these stage-2 steps instead of every --test-every")
    parser.add_argument("--name", default="stage2_recipe", help="results go to experiments/results/<name>.{md,json,png}")
    args = parser.parse_args()

    base_records = [r for r in checkpointing.read_metrics(args.base) if r["stage"] == "stage2"][: args.steps]
    if not base_records:
        raise SystemExit(f"'{args.base}' has no stage-2 steps logged: its stage 1 must be finished.")
    boundary = base_records[0]["step"]
    test_steps = list(range(args.test_every, args.steps + 1, args.test_every)) if args.test_every else []
    if args.test_steps:
        test_steps = sorted(set(args.test_steps))
    # Checkpoints are kept at multiples of the global step, so that every test step (counted from the stage-1
    # end) lands on one: every gcd(stage-1 end, test steps) steps.
    keep_every = math.gcd(boundary, *test_steps) if test_steps else 10**6
    # The base run's own stage 2 is a row only when it is as long as the variants'.
    runs = {"base": (args.base, {}, "the base run's own stage 2", base_records)} if len(base_records) == args.steps else {}
    for name in args.variants:
        overrides, what = VARIANTS[name]
        records = train_variant(args.base, name, overrides, args.steps, keep_every)
        runs[name] = (args.base.parent / f"{args.base.name}_s2_{name}", overrides, what, records)
    results = {}
    for name, (run_dir, overrides, what, records) in runs.items():
        results[name] = {"overrides": overrides, "what": what, **summary(records, args.window)}
        if test_steps:
            cpu = summary(records, 1)["cpu_minutes"]
            results[name]["test"] = test_scores(run_dir, boundary, test_steps, {s: cpu[s - 1] for s in test_steps})

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"base": str(args.base), "steps": args.steps, "results": results}, indent=1))
    header = " | ".join(f"steps {i * args.window}-{(i + 1) * args.window - 1}" for i in range(args.steps // args.window))
    command = f"python experiments/stage2_recipe.py {args.base} --variants {' '.join(args.variants)} --steps {args.steps}"
    command += f" --window {args.window}" + (f" --test-every {args.test_every}" if args.test_every else "")
    command += f" --test-steps {' '.join(map(str, args.test_steps))}" if args.test_steps else ""
    command += "" if args.name == "stage2_recipe" else f" --name {args.name}"
    lines = [
        "# Stage-2 variants from one stage 1",
        "",
        f"Command: `{command}`.",
        "Every variant starts from the base run's decoder and encoder at the end of its stage 1 and from the same fresh",
        "dynamics; same batches. Mean stage-2 training loss (normalised units) over windows of steps; variants that",
        "train on fewer frames or points have losses over those only, so compare them by the test scores.",
        "",
        f"| variant | what | {header} | machine min |",
        "|---|---|" + "---|" * (args.steps // args.window) + "---|",
    ]
    for name, r in results.items():
        means = " | ".join(f"{m:.3f}" for m in r["window_means"])
        lines.append(f"| {name} | {r['what']} | {means} | {r['machine_min']:.1f} |")
    if test_steps:
        lines += [
            "",
            "Test split, standard protocol (MSE in the data's units), at stage-2 steps: t_in / t_out (stage-2 machine minutes,",
            f"CPU time of training / cores). Persistence: t_in {next(iter(results.values()))['test'][0]['persistence_t_in']:.3f}.",
            "",
            "| variant | " + " | ".join(f"step {s}" for s in test_steps) + " |",
            "|---|" + "---|" * len(test_steps),
        ]
        for name, r in results.items():
            cells = " | ".join(f"{t['t_in']:.3f} / {t['t_out']:.3f} ({t['machine_min']:.1f})" for t in r["test"])
            lines.append(f"| {name} | {cells} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + f"\n\n![curves]({args.name}.png)\n")

    fig = _new_figure(11 if test_steps else 6.4, 4.0, 100)
    axes = fig.subplots(1, 2 if test_steps else 1)
    ax = axes[0] if test_steps else axes
    for name, r in results.items():
        losses = np.asarray(r["losses"])
        smooth = np.convolve(losses, np.ones(16) / 16, mode="valid")
        ax.plot(np.arange(len(smooth)) + 8, smooth, label=name)
    ax.set(xlabel="stage-2 step", ylabel="training loss (normalised, 16-step mean)", yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    if test_steps:
        for name, r in results.items():
            axes[1].plot([t["machine_min"] for t in r["test"]], [t["t_in"] for t in r["test"]], "o-", label=name)
        axes[1].set(xlabel="stage-2 machine minutes", ylabel="test t_in MSE", yscale="log")
        axes[1].grid(alpha=0.3, which="both")
        axes[1].legend()
    fig.savefig(RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
