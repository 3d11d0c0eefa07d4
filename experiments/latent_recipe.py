"""Latent-target dynamics recipe study: what buys test accuracy per machine minute in stage 2 on latent targets.

    python experiments/latent_recipe.py experiments/results/navier_stokes_cpu_3h_latent_targets_60k/model \\
        --targets runs/ns60k_to_88k/latent_targets.npz --steps 6000 --scores 2000 4000 \\
        --variants base width_128 --name latent_recipe

Every variant trains fresh dynamics (initialised from the run's seed, as the Trainer does) on the same latent
targets, from the same frozen decoder and encoder: those of a trained run with ``train.stage2_targets: latents``
(its stage 1). The targets file is a run's ``latent_targets.npz``, fitted by the Trainer from that same stage 1
(``[K N, F]`` latents of every training frame and symmetry copy); the dynamics' input statistics are the run's own.
Each step draws ``--batch`` random windows of ``data.horizon`` frames from the targets (every variant the same
windows) and takes the Trainer's latent step; the schedule is 50 warmup steps and cosine decay to 2 % of the
peak over the variant's steps. The test split is scored (standard protocol, MSE in the data's units) at each
``--scores`` step and at the end. Machine minutes: CPU time of the latent steps / cores (scoring excluded); the
stage 1 and the target fit are the same for every variant and not counted.

Writes experiments/results/<name>.{md,json,png}; finished variants are kept in the JSON, so a later call adds
variants without training the others again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from enfpde.data.trajectories import TrajectoryDataset, save_json_atomic
from enfpde.forecaster import Forecaster, build_modules
from enfpde.latent_targets import context_scale, decoder_metric
from enfpde.latents import Latents
from enfpde.plotting import _new_figure
from latent_warmup import machine_seconds, train_on_latents
from stage1_ablation import _cpu
from test_curve import score_model

RESULTS = Path(__file__).parent / "results"

# variant -> (model overrides, peak learning rate or None for --lr, description)
VARIANTS = {
    "base": ({}, None, "the run's own dynamics settings"),
    "width_128": ({"dynamics_hidden": 128}, None, "dynamics 128 wide instead of 64"),
    "layers_6": ({"dynamics_layers": 6}, None, "6 dynamics blocks instead of 4"),
    "knn_8": ({"dynamics_k_nearest": 8}, None, "each latent hears its 8 nearest latents instead of 16"),
    "knn_32": ({"dynamics_k_nearest": 32}, None, "each latent hears its 32 nearest latents instead of 16"),
    "lr_4e-3": ({}, 4e-3, "peak learning rate 4e-3 instead of --lr"),
    "lr_1e-3": ({}, 1e-3, "peak learning rate 1e-3 instead of --lr"),
    "decoder_metric": ({}, None, "contexts' error weighted by the decoder's Gauss-Newton metric, ridge 0.01"),
    "decoder_metric_ridge_0.1": ({}, None, "contexts' error weighted by the decoder's Gauss-Newton metric, ridge 0.1"),
    "decoder_metric_ridge_0.001": ({}, None, "contexts' error weighted by the decoder's Gauss-Newton metric, ridge 0.001"),
}
# variant -> ridge of its decoder metric (enfpde.latent_targets.decoder_metric); the others use the plain loss
METRIC_RIDGE = {"decoder_metric": 0.01, "decoder_metric_ridge_0.1": 0.1, "decoder_metric_ridge_0.001": 0.001}


def train_variant(model: Forecaster, targets: Latents, name: str, args) -> dict:
    """Train the variant's fresh dynamics on ``targets`` and score it; returns its row of the results."""
    overrides, lr, what = VARIANTS[name]
    config = dataclasses.replace(model.config, model=dataclasses.replace(model.config.model, **overrides))
    field, encoder, trained = model.modules
    _, _, dynamics = build_modules(config.model, model.geometry, len(model.variables), config.train.seed)
    if dynamics.context_mean is not None:  # the input statistics the run's Trainer set from its stage-1 latents
        dynamics.context_mean[...] = trained.context_mean[...]
        dynamics.context_std[...] = trained.context_std[...]
    train_times = TrajectoryDataset.open(config.data.train).times[: config.data.horizon]
    times = jnp.asarray((train_times - train_times[0]) / config.model.time_unit, jnp.float32)
    test = TrajectoryDataset.open(config.data.test)
    scores = {}

    def on_score(step):
        forecaster = Forecaster(config, model.metadata, *nnx.clone((field, encoder, dynamics)), batch_size=config.eval.batch_size)
        scored = score_model(forecaster, test, config.eval.batch_size)["model"]
        scores[step] = {"t_in": scored["t_in"], "t_out": scored["t_out"]}
        print(f"{name} step {step}: test t_in {scored['t_in']:.3e}, t_out {scored['t_out']:.3e}", flush=True)

    metric, metric_min = None, 0.0
    if name in METRIC_RIDGE:
        t0 = machine_seconds()
        coords = model.geometry.coords_from_user(test.coords)
        metric = decoder_metric(field, targets, coords, context_scale(dynamics, targets), ridge=METRIC_RIDGE[name],
                                seed=config.train.seed)
        metric_min = (machine_seconds() - t0) / 60
        print(f"{name}: decoder metric in {metric_min:.2f} machine min", flush=True)
    losses, minutes_at = train_on_latents(
        dynamics, config, times, targets, args.steps, args.batch, lr or args.lr, config.train.seed,
        score_at=tuple(s for s in args.scores if s < args.steps), on_score=on_score, metric=metric,
    )
    on_score(args.steps)
    return {"variant": name, "what": what, "overrides": overrides, "learning_rate": lr or args.lr, "batch": args.batch,
            "steps": args.steps, "losses": losses, "metric_machine_min": metric_min,
            "scores": [{"step": s, "machine_min": minutes_at[s], **scores[s]} for s in sorted(scores)]}


def report(rows: list[dict], args) -> None:
    steps = sorted({s["step"] for r in rows for s in r["scores"]})
    lines = [
        f"# Latent-target dynamics variants from `{args.model}`",
        "",
        f"Command: `python experiments/latent_recipe.py {args.model} --targets {args.targets} --steps {args.steps} "
        f"--scores {' '.join(map(str, args.scores))} --batch {args.batch} --lr {args.lr:g} --variants <names> --name {args.name}`.",
        f"Machine: {_cpu()}. See the docstring of experiments/latent_recipe.py for the protocol: fresh dynamics per",
        "variant on the same latent targets and windows; test split, standard protocol (MSE in the data's units);",
        "machine minutes of the latent steps only (CPU time / cores). The latent loss of the decoder-metric variants is",
        "the weighted one, not comparable with the others'; their metric's one-off cost is not counted (about 1.2 machine min).",
        "",
        "| variant | what | " + " | ".join(f"step {s}: t_in / t_out (machine min)" for s in steps) + " | latent loss, last 500 steps |",
        "|---|---|" + "---|" * (len(steps) + 1),
    ]
    for r in rows:
        at = {s["step"]: s for s in r["scores"]}
        cells = [f"{at[s]['t_in']:.2e} / {at[s]['t_out']:.2e} ({at[s]['machine_min']:.1f})" if s in at else "" for s in steps]
        lines.append(f"| {r['variant']} | {r['what']} | " + " | ".join(cells) + f" | {np.mean(r['losses'][-500:]):.4f} |")
    lines += ["", f"![curves]({args.name}.png)"]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")

    fig = _new_figure(6.4, 4.0, 100)
    ax = fig.subplots()
    for r in rows:
        ax.plot([s["machine_min"] for s in r["scores"]], [s["t_in"] for s in r["scores"]], marker="o", label=r["variant"])
    ax.set_yscale("log")
    ax.set_xlabel("latent-stage cost (machine minutes: CPU time / cores)")
    ax.set_ylabel("test t_in MSE (data units)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(RESULTS / f"{args.name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a trained run or published model with train.stage2_targets: latents")
    parser.add_argument("--targets", type=Path, required=True, help="the latent_targets.npz the Trainer fitted from that stage 1")
    parser.add_argument("--variants", nargs="+", default=["base"], choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--scores", type=int, nargs="*", default=[], help="also score the test split after these steps")
    parser.add_argument("--batch", type=int, default=8, help="windows per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (variants may set their own)")
    parser.add_argument("--name", default="latent_recipe")
    args = parser.parse_args()

    model = Forecaster.load(args.model)
    if model.config.model.dynamics_move_poses:
        raise SystemExit(f"'{args.model}' has model.dynamics_move_poses: true; latent targets need fixed poses.")
    if not args.targets.exists():
        raise SystemExit(f"no latent targets at '{args.targets}': train the run's stage 2 (it writes them) first.")
    with np.load(args.targets) as saved:
        targets = Latents(saved["poses"], saved["contexts"], saved["widths"])
    if targets.contexts.shape[-1] != model.config.model.latent_dim or targets.contexts.shape[1] < model.config.data.horizon:
        raise SystemExit(f"'{args.targets}': contexts of shape {targets.contexts.shape} do not fit this model "
                         f"(latent_dim {model.config.model.latent_dim}, horizon {model.config.data.horizon}).")

    out = RESULTS / f"{args.name}.json"
    done = {r["variant"]: r for r in json.loads(out.read_text())} if out.exists() else {}
    for name in args.variants:
        if name in done:
            continue
        done[name] = train_variant(model, targets, name, args)
        save_json_atomic(out, list(done.values()))
    report(list(done.values()), args)


if __name__ == "__main__":
    main()
