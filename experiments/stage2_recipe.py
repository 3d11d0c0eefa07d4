"""Stage-2 variants trained from one finished stage 1: what buys dynamics accuracy per CPU minute.

    python experiments/stage2_recipe.py runs/navier_stokes_cpu_long --variants scale_0.1 --steps 256

Every variant starts from the same decoder and Meta-SGD encoder (the base run's checkpoint at the end of its
stage 1) and from the same fresh dynamics initialisation (the base run's seed), and trains stage 2 on the base
run's data and batches with the variant's overrides; only dynamics settings and the stage-2 schedule may
differ. The base run's own stage-2 log is the `base` variant. Each variant is a run directory
``<base>_s2_<variant>`` (kept: a second call continues or reuses it) with its training loss per step; the
report compares the mean training loss over windows of steps and the machine minutes spent.

Writes experiments/results/stage2_recipe.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from flax import nnx

from enfpde import checkpointing
from enfpde.config import config_from_yaml, load_config
from enfpde.data.trajectories import TrajectoryDataset
from enfpde.experiment import cumulative_seconds
from enfpde.plotting import _new_figure
from enfpde.trainer import Trainer

RESULTS = Path(__file__).parent / "results"

# variant -> (overrides, what it changes)
VARIANTS = {
    "scale_0.1": ({"model.dynamics_output_scale": 0.1}, "learned velocity scale starts at 0.1 instead of 1e-3"),
    "scale_1": ({"model.dynamics_output_scale": 1.0}, "learned velocity scale starts at 1 instead of 1e-3"),
    "heun": ({"model.solver": "heun"}, "Heun (2 evaluations per frame) instead of explicit Euler"),
    "lr_5e-3": ({"train.stage2.learning_rate": 5e-3}, "peak learning rate 5e-3 instead of 2e-3"),
    "width_128x3": ({"model.dynamics_hidden": 128, "model.dynamics_layers": 3}, "dynamics 128 wide, 3 blocks (the released size)"),
}
ALLOWED_PREFIXES = ("model.dynamics_", "model.solver", "model.dt0", "model.kernel_radius", "train.stage2.")


def stage1_end(config) -> int:
    """The global step at which the config's stage 1 ends."""
    steps_per_epoch = TrajectoryDataset.open(config.data.train).num_trajectories // config.train.batch_size
    return config.train.stage1.epochs * steps_per_epoch


def start_variant(base: Path, run_dir: Path, overrides: dict) -> int:
    """Make ``run_dir`` a run at the base run's stage-1 end with a fresh dynamics model; returns that step."""
    for key in overrides:
        if not key.startswith(ALLOWED_PREFIXES):
            raise SystemExit(f"{key}: only dynamics settings and train.stage2.* may differ from the base run.")
    config = load_config(base / checkpointing.CONFIG_FILE, [f"{k}={v}" for k, v in overrides.items()])
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, keep_checkpoints=1, checkpoint_every=10**6))
    boundary = stage1_end(config)
    trainer = Trainer(config, run_dir, progress=False)
    base_manager = checkpointing.checkpoint_manager(base, max_to_keep=None)
    if boundary not in base_manager.all_steps():
        raise SystemExit(f"'{base}' has no checkpoint at the end of stage 1 (step {boundary}).")
    restored, _ = checkpointing.restore(base_manager, boundary, nnx.state(trainer.modules))
    base_manager.close()
    field, encoder, _ = trainer.modules  # the dynamics keep their fresh initialisation
    nnx.update(field, restored[0])
    nnx.update(encoder, restored[1])
    manager = checkpointing.checkpoint_manager(run_dir, max_to_keep=1)
    trainer._save(manager, boundary)
    manager.wait_until_finished()
    manager.close()
    return boundary


def train_variant(base: Path, name: str, overrides: dict, steps: int) -> list[dict]:
    run_dir = base.parent / f"{base.name}_s2_{name}"
    if not (run_dir / checkpointing.CONFIG_FILE).exists():
        boundary = start_variant(base, run_dir, overrides)
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
    return {"window_means": means, "machine_min": float(cpu[-1]) if len(cpu) else 0.0, "losses": losses.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="a run whose stage 1 is finished (its checkpoint there kept)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--steps", type=int, default=256, help="stage-2 steps per variant")
    parser.add_argument("--window", type=int, default=64, help="steps per mean in the table")
    args = parser.parse_args()

    base_records = [r for r in checkpointing.read_metrics(args.base) if r["stage"] == "stage2"][: args.steps]
    if len(base_records) < args.steps:
        raise SystemExit(f"'{args.base}' has {len(base_records)} stage-2 steps logged; {args.steps} are needed for the comparison.")
    results = {"base": {"overrides": {}, "what": "the base run's own stage 2", **summary(base_records, args.window)}}
    for name in args.variants:
        overrides, what = VARIANTS[name]
        results[name] = {"overrides": overrides, "what": what, **summary(train_variant(args.base, name, overrides, args.steps), args.window)}

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stage2_recipe.json").write_text(json.dumps({"base": str(args.base), "steps": args.steps, "results": results}, indent=1))
    header = " | ".join(f"steps {i * args.window}-{(i + 1) * args.window - 1}" for i in range(args.steps // args.window))
    lines = [
        "# Stage-2 variants from one stage 1",
        "",
        f"Command: `python experiments/stage2_recipe.py {args.base} --variants {' '.join(args.variants)} --steps {args.steps}`.",
        "Every variant starts from the base run's decoder and encoder at the end of its stage 1 and from the same fresh",
        "dynamics; same batches. Mean stage-2 training loss (normalised units) over windows of steps.",
        "",
        f"| variant | what | {header} | machine min |",
        "|---|---|" + "---|" * (args.steps // args.window) + "---|",
    ]
    for name, r in results.items():
        means = " | ".join(f"{m:.3f}" for m in r["window_means"])
        lines.append(f"| {name} | {r['what']} | {means} | {r['machine_min']:.1f} |")
    (RESULTS / "stage2_recipe.md").write_text("\n".join(lines) + "\n\n![curves](stage2_recipe.png)\n")

    fig = _new_figure(6.4, 4.0, 100)
    ax = fig.subplots()
    for name, r in results.items():
        losses = np.asarray(r["losses"])
        smooth = np.convolve(losses, np.ones(16) / 16, mode="valid")
        ax.plot(np.arange(len(smooth)) + 8, smooth, label=name)
    ax.set(xlabel="stage-2 step", ylabel="training loss (normalised, 16-step mean)", yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(RESULTS / "stage2_recipe.png")


if __name__ == "__main__":
    main()
