"""Stage-1 recipe study on Navier-Stokes: what buys test reconstruction per minute of CPU.

Each variant changes the training recipe of the `paper` preset's stage 1 (learning rate and schedule, first-
or second-order inner gradients, frames and points per step, batch, latents, training-set size, ...), keeps the
released decoder, and trains for its own number of steps, chosen so that every variant gets roughly the same
CPU budget. Every `--eval-every` steps the checkpoint is scored like the decoder ablation
(stage1_ablation.py): the test split's frame 0 fitted with the inner steps on the full 64 x 64 grid, MSE in
raw units. The cost axis is the CPU time of the training process (all its threads) divided by the number of
cores, i.e. minutes of the whole 2-core machine; it is much less inflated than wall time when other jobs share
the machine, and wall time is recorded too.

    python experiments/stage1_recipe.py --variants lr1e-3_cosine first_order_lr1e-3_cosine
    python experiments/stage1_recipe.py --report-only

Runs go to runs/stage1_recipe/<variant>_s<seed>/; the table and plot to experiments/results/stage1_recipe.{md,png,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import jax
import numpy as np

from enfpde.data.trajectories import save_json_atomic
from stage1_ablation import _cpu, mean_around, train_and_score

RESULTS = Path(__file__).parent / "results"
DEFAULT_RUNS = "runs/stage1_recipe"

COSINE = {"train.stage1.warmup_steps": 10, "train.stage1.decay": "cosine", "train.stage1.final_lr_fraction": 0.05}
FIRST_ORDER = {"model.first_order": True}
TRAIN256 = {"dataset": "datasets/navier_stokes_train256.yaml", "data.train": "data/navier_stokes_train256/train.nc"}
RELEASED_DECODER_PARTS = ("context_stem", "full_width_heads", "embedding_mlp", "value_ffn", "value_mixer", "deep_head")
# variant -> (overrides, steps, description). Steps: about 15 minutes of the 2-core machine for each.
VARIANTS = {
    "released": ({}, 90, "the released recipe: AdamW 1e-4, second-order inner gradients, 2 frames x 512 points"),
    "lr3e-4": ({"train.stage1.learning_rate": 3e-4}, 90, "learning rate 3e-4"),
    "lr1e-3": ({"train.stage1.learning_rate": 1e-3}, 90, "learning rate 1e-3"),
    "lr1e-3_cosine": (
        {"train.stage1.learning_rate": 1e-3, **COSINE}, 90,
        "learning rate 1e-3, 10 warmup steps, cosine decay to 5e-5 at the last step",
    ),
    "first_order": (FIRST_ORDER, 300, "first-order inner gradients (no gradient through the inner steps' gradients)"),
    "first_order_lr1e-3_cosine": (
        {**FIRST_ORDER, "train.stage1.learning_rate": 1e-3, **COSINE}, 300,
        "first-order inner gradients, learning rate 1e-3 with warmup and cosine decay",
    ),
    "first_order_lr3e-3_cosine": (
        {**FIRST_ORDER, "train.stage1.learning_rate": 3e-3, **COSINE}, 300,
        "first-order inner gradients, learning rate 3e-3 with warmup and cosine decay",
    ),
    "latents16_k4_first_order_lr1e-3_cosine": (
        {**FIRST_ORDER, "train.stage1.learning_rate": 1e-3, **COSINE, "model.num_latents": 16, "model.k_nearest": 4}, 300,
        "16 latents (a 4 x 4 grid, widths for its spacing), each point attends to its 4 nearest; first-order, "
        "learning rate 1e-3 with warmup and cosine decay",
    ),
    "latents64_k4_first_order_lr1e-3_cosine": (
        {**FIRST_ORDER, "train.stage1.learning_rate": 1e-3, **COSINE, "model.num_latents": 64, "model.k_nearest": 4}, 300,
        "64 latents (8 x 8), 4 nearest per point; first-order, learning rate 1e-3 with warmup and cosine decay",
    ),
    "latents16_k4_lr3e-4": (
        {"train.stage1.learning_rate": 3e-4, "model.num_latents": 16, "model.k_nearest": 4}, 90,
        "16 latents (a 4 x 4 grid, widths for its spacing), each point attends to its 4 nearest; learning rate 3e-4",
    ),
    "latents64_k4_lr3e-4": (
        {"train.stage1.learning_rate": 3e-4, "model.num_latents": 64, "model.k_nearest": 4}, 90,
        "64 latents (8 x 8), 4 nearest per point; learning rate 3e-4",
    ),
    "train256": (
        TRAIN256, 90, "256 training trajectories instead of 16 (datasets/navier_stokes_train256.yaml; same test split)",
    ),
    "first_order_lr1e-3_cosine_train256": (
        {**FIRST_ORDER, "train.stage1.learning_rate": 1e-3, **COSINE, **TRAIN256}, 300,
        "first-order inner gradients, learning rate 1e-3 with warmup and cosine decay, 256 training trajectories",
    ),
    # Capacity, on top of the `cpu_3h` preset (`--preset cpu_3h --name stage1_capacity`): its stage-1 training loss
    # stopped falling after a few hundred of its 2432 steps, so the question is what the decoder can represent.
    "cap_base": ({}, 1000, "the `cpu_3h` preset as it is"),
    "cap_hidden128": ({"model.num_hidden": 128}, 1000, "decoder width 128 instead of 64"),
    "cap_latent_dim32": ({"model.latent_dim": 32}, 1000, "context vectors of 32 instead of 16"),
    "cap_latents144": ({"model.num_latents": 144}, 1000, "144 latents (12 x 12) instead of 64"),
    "cap_latents256": ({"model.num_latents": 256}, 1000, "256 latents (16 x 16) instead of 64"),
    "cap_latents400": ({"model.num_latents": 400}, 1000, "400 latents (20 x 20) instead of 64"),
    "cap_k9": ({"model.k_nearest": 9}, 1000, "each point attends to its 9 nearest latents instead of 4"),
    "cap_released_decoder": (
        {f"model.{part}": True for part in RELEASED_DECODER_PARTS},
        1000, "the released decoder's parts (context stem, full-width heads, embedding MLP, value FFN and mixer, deep head)",
    ),
    "cap_lr3e-3": ({"train.stage1.learning_rate": 3e-3}, 1000, "learning rate 3e-3 instead of 1e-3"),
    # Points per frame: the inner steps fit the step's points and the loss is measured on the same points, so with
    # 256 points for 64 latents x 16 context channels the fit can pass through the points and miss the field between
    # them; the test fits all 4096.
    "cap_points512": ({"train.num_points": 512}, 1000, "512 random points per frame instead of 256"),
    "cap_points1024": ({"train.num_points": 1024}, 1000, "1024 random points per frame instead of 256"),
}

# What each base preset is, for the report's header.
PRESETS = {
    "paper": "16 training trajectories, batch 8, 4 latents x 16, the released decoder",
    "cpu_3h": (
        "256 training trajectories, random 10-frame windows, batch 4, 256 points per frame, 64 latents x 16, each point "
        "attends to its 4 nearest, the lean decoder, learning rate 1e-3 with warmup and cosine decay over the variant's steps"
    ),
}


def scaled_steps(steps: int, args) -> int:
    """A variant's steps times ``--budget-scale``, rounded to a multiple of ``--eval-every``."""
    return max(args.eval_every, int(round(steps * args.budget_scale / args.eval_every)) * args.eval_every)


def run(name: str, seed: int, args) -> dict:
    overrides, steps, _ = VARIANTS[name]
    return train_and_score(Path(args.runs) / f"{name}_s{seed}", name, overrides, seed, scaled_steps(steps, args), args)


def machine_minutes(scores: dict) -> dict[int, float] | None:
    """Minutes of the whole machine (CPU seconds of the training process / cores / 60) at each scored step."""
    cpu = scores.get("cpu_s_at")
    if cpu is None:
        return None
    return {int(k): v / (os.cpu_count() or 1) / 60 for k, v in cpu.items()}


def report(all_scores: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(VARIANTS)
    all_scores = sorted(all_scores, key=lambda s: (order.index(s["variant"]) if s["variant"] in order else len(order), s["seed"]))
    lines = [
        "| variant | seed | steps | machine min / 100 steps | wall min / 100 steps | train loss, last 10 steps | "
        "test frame-0 MSE at (step, machine minutes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for sc in all_scores:
        minutes = machine_minutes(sc)
        steps = sorted(int(s) for s in sc["test_frame0_mse"])
        last = steps[-1]
        per100 = f"{minutes[last] / last * 100:.1f}" if minutes else ""
        wall100 = f"{sc['wall_s_at'][str(last)] / 60 / last * 100:.1f}"
        points = ", ".join(
            f"{sc['test_frame0_mse'][str(s)]:.3g} ({s}, {minutes[s]:.1f})" if minutes else f"{sc['test_frame0_mse'][str(s)]:.3g} ({s})"
            for s in steps
        )
        losses = np.asarray(sc["train_loss_raw"])
        lines.append(
            f"| {sc['variant']} | {sc['seed']} | {last} | {per100} | {wall100} | {mean_around(losses, len(losses)):.3f} | {points} |"
        )
    used = {sc["variant"] for sc in all_scores}
    descriptions = "\n".join(
        f"- `{k}` ({scaled_steps(v[1], args)} steps): {v[2]}." for k, v in VARIANTS.items() if k in used
    )
    extra = (f" --budget-scale {args.budget_scale:g}" if args.budget_scale != 1 else "") + (
        f" --runs {args.runs}" if args.runs != DEFAULT_RUNS else ""
    )
    text = f"""# Stage-1 recipe study (Navier-Stokes, preset `{args.preset}`)

Command: `python experiments/stage1_recipe.py --preset {args.preset} --name {args.name} --eval-every {args.eval_every}{extra}
--variants <names>` (finished runs are kept; the table collects every run under {args.runs}).

Machine: {_cpu()}, {os.cpu_count()} cores, Python {platform.python_version()}, jax {jax.__version__}.
Stage 1 of preset `{args.preset}` ({PRESETS.get(args.preset, "see experiments/configs")}),
{args.frames} random frames per trajectory per step unless the variant says otherwise. Test frame-0: MSE in raw
units on the 16 test trajectories, frame 0 fitted with the 3 Meta-SGD steps on the full 64 x 64 grid (mean w^2 is
about 1.05). Machine minutes: CPU seconds of the training process / {os.cpu_count()} cores / 60, evaluation
excluded; wall minutes are given beside them (other jobs shared the machine during some runs, which inflates
wall time much more than CPU time). Training loss: raw units, on the fitted points.

{chr(10).join(lines)}

Variants:
{descriptions}

![curves]({args.name}.png)
"""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    save_json_atomic(RESULTS / f"{args.name}.json", all_scores)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, sc in enumerate(all_scores):
        color, label = f"C{order.index(sc['variant']) % 10}", f"{sc['variant']} s{sc['seed']}"
        steps = sorted(int(s) for s in sc["test_frame0_mse"])
        mse = [sc["test_frame0_mse"][str(s)] for s in steps]
        ax1.plot(steps, mse, "o-", color=color, label=label)
        minutes = machine_minutes(sc)
        if minutes:
            ax2.plot([minutes[s] for s in steps], mse, "o-", color=color, label=label)
    ax1.set(xlabel="stage-1 step", ylabel="test frame-0 MSE (raw units)", yscale="log")
    ax2.set(xlabel=f"machine minutes (CPU time / {os.cpu_count()} cores)", ylabel="test frame-0 MSE (raw units)", yscale="log")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=120)
    print(f"wrote {RESULTS / args.name}.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every variant's steps")
    parser.add_argument("--frames", type=int, default=2, help="random frames per trajectory in a stage-1 step")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--name", default="stage1_recipe", help="results go to experiments/results/<name>.{md,json,png}")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        for seed in args.seeds:
            for name in args.variants:
                run(name, seed, args)
    found = [json.loads(p.read_text()) for p in sorted(Path(args.runs).glob("*/scores.json"))]
    report(found, args)


if __name__ == "__main__":
    main()
