"""The quick preset's recipe study on Navier-Stokes: what made its dynamics learn, as curves and one table.

Each variant is a run of `experiments/navier_stokes.py --preset quick` with overrides (listed in VARIANTS and
in the table); this script runs the ones whose directory is missing (or only reports, `--report-only`) and
writes experiments/results/quick_recipe.{md,png}: the stage-2 training loss against machine minutes (CPU
seconds of the training process / cores / 60) and the evaluation of every finished run beside persistence.

    python experiments/quick_recipe.py               # run what is missing, then report
    python experiments/quick_recipe.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from stage1_ablation import _cpu

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]

# name -> (overrides of the quick preset, description). Rows of earlier studies (earlier presets: qs_l64 ... of commit
# 64907a7 and before, qs_windows_curriculum of 4bc2701, qs_knn16_900 of 0ac05ec) are kept in results/quick_recipe.json
# with the overrides and descriptions they had then; they are reported, not rerun (their overrides were relative to
# the preset of their day).
VARIANTS = {
    "qs_fixed_poses_1200": (
        [],
        "the quick preset of commit bea4e55: dynamics of 2 blocks that keep the fitted poses, each latent hearing its "
        "16 nearest; 1200 stage-2 steps, frames 0-2 for the first 600",
    ),
    "qs_layers4_1200": (
        ["model.dynamics_layers=4"],
        "the same with dynamics of 4 blocks instead of 2 (experiments/results/stage2_depth.md)",
    ),
    "qs_layers4_900": (
        ["model.dynamics_layers=4", "train.stage2.epochs=150", "train.stage2_frames_steps=450"],
        "4 blocks and 900 stage-2 steps (frames 0-2 for the first 450): about the 2-block stage 2's time",
    ),
}


def stage2_curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Machine minutes since the start of stage 2 and the stage-2 loss (normalised units) of every step."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = next(i for i, r in enumerate(records) if r["stage"] == "stage2")
    start = records[first - 1]["cpu_s"] if first else 0.0
    s2 = records[first:]
    cores = os.cpu_count() or 1
    return np.array([(r["cpu_s"] - start) / cores / 60 for r in s2]), np.array([r["loss"] for r in s2])


def smooth(x: np.ndarray, n: int = 40) -> np.ndarray:
    return np.convolve(x, np.ones(n) / n, mode="valid") if len(x) >= n else x


def summary(run_dir: Path, split: str) -> dict | None:
    path = run_dir / "eval" / split / "metrics.json"
    if not path.exists():
        return None
    s = json.loads(path.read_text())["settings"]["standard"]
    return {"model": s["model"], "persistence": s["persistence"]}


def run_summary(run_dir: Path) -> dict | None:
    """What the report needs of a finished run: its stage-2 curve and the test and train evaluations."""
    if not (run_dir / "metrics.jsonl").exists():
        return None
    minutes, loss = stage2_curve(run_dir)
    return {"minutes": minutes.tolist(), "loss": loss.tolist(), "test": summary(run_dir, "test"), "train": summary(run_dir, "train")}


def report(runs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Runs of earlier sessions live on in the committed JSON (rows without a curve: their logs are gone);
    # a run found under ``runs`` replaces its entry.
    saved = RESULTS / "quick_recipe.json"
    entries = json.loads(saved.read_text()) if saved.exists() else {}
    for name, (overrides, description) in VARIANTS.items():
        found = run_summary(runs / name)
        if found is not None:
            entries[name] = {**found, "overrides": overrides, "description": description}
    lines = [
        "| run | stage-2 steps | stage-2 machine min | stage-2 loss, last 80 steps | test t_in | test t_out | train t_in | train t_out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    persistence = None
    for name, e in entries.items():
        if e.get("loss"):
            minutes, loss = np.asarray(e["minutes"]), np.asarray(e["loss"])
            ax.plot(minutes[len(minutes) - len(smooth(loss)):], smooth(loss), label=name)
            steps, last_minute, last_loss = len(loss), minutes[-1], loss[-80:].mean()
        else:
            steps, last_minute, last_loss = e["stage2_steps"], e["stage2_machine_min"], e["loss_last80"]
        test, train = e["test"], e["train"]
        cell = lambda s, part: "" if s is None else f"{s['model'][part]:.3f}"
        lines.append(
            f"| {name} | {steps} | {last_minute:.1f} | {last_loss:.3f} | {cell(test, 't_in')} | {cell(test, 't_out')} | "
            f"{cell(train, 't_in')} | {cell(train, 't_out')} |"
        )
        persistence = persistence or (test if test and "persistence" in test else None)
    ax.set_xlabel("machine minutes of stage 2 (CPU s / cores / 60)")
    ax.set_ylabel("stage-2 loss (normalised, mean of 40 steps)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "quick_recipe.png", dpi=120)
    saved.write_text(json.dumps(entries, indent=1))
    variants = "\n".join(
        f"- `{name}`: {e['description']}." + (f" Overrides: `{' '.join(e['overrides'])}`." if e["overrides"] else "")
        for name, e in entries.items()
    )
    reference = (
        f"Persistence on the same test split: t_in {persistence['persistence']['t_in']:.3f}, t_out "
        f"{persistence['persistence']['t_out']:.3f}; forecasting the mean state scores about 1.05 (mean w^2)."
        if persistence else ""
    )
    (RESULTS / "quick_recipe.md").write_text(
        f"""# The quick preset's recipe: what made the dynamics learn (Navier-Stokes)

Command: `python experiments/quick_recipe.py` (each run is `experiments/navier_stokes.py --preset quick` with the
overrides below, into runs/<name>/). Machine: {_cpu()}, {os.cpu_count()} cores, Python {platform.python_version()},
jax {jax.__version__}; other jobs shared the machine during these runs, so compare machine minutes (CPU time),
not wall time. Test: the quick dataset's 4 test trajectories; MSE in raw units (mean w^2 about 1.05), standard
protocol, t_in frames 0-9 (frame 0 included), t_out frames 10-19. {reference}

| run | stage-2 steps | stage-2 machine min | stage-2 loss, last 80 steps | test t_in | test t_out | train t_in | train t_out |
|---|---|---|---|---|---|---|---|
{chr(10).join(lines[2:])}

Variants:
{variants}

What it shows: with raw contexts the dynamics hardly learned (stage-2 loss 0.44 -> 0.36 in 804 steps): Meta-SGD
fits every field by small moves (about 0.07) away from the shared initial context 1, so the network's input is
a large constant plus a small field-dependent part. Standardised per channel with statistics of fitted training
latents, the same run's loss falls to 0.13 and its train t_in to 0.11, but on the test split it gains little
(t_in 0.443 against 0.455) and t_out gets worse (1.03 against 0.86): most of what it learned is the 24
training trajectories. With 64 trajectories and quarter turns (the PDE and its forcing are invariant) the
training loss falls as slowly as the raw run's and the test errors stay where they were (t_in 0.470, t_out
0.816, below persistence and the mean state). In every run the dynamics mostly smooth the field towards the
mean: frame 1 is no better than persistence. Learning the advection itself needs more steps and data than
a few minutes give (the `cpu` preset, experiments/results/navier_stokes_cpu.md, has more of both).

`qs_windows_curriculum` was the quick preset until commit 4bc2701, chosen to fit the quickstart into 10 minutes
(it took 8.8 min in all on 2026-12-02, against 12.7): fewer, longer training trajectories cost half the
generation time (every trajectory pays 28.5 time units of burn-in) and give as many random 10-frame windows;
stage 1 fits 2 frames per window (8 fields per step, 0.47 s); stage 2 starts on 5 frames
(experiments/results/stage2_frames.md). Its test t_in is a little better than the previous preset's (0.426
against 0.470) and its t_out worse (0.922 against 0.816): 450 stage-2 steps end where the base run's stage-2
loss is still in its slow first phase. The train and test errors agree (train windows 0.405), so more steps, not
more data, is what it lacks.

`qs_knn16_900` was the quick preset from commit 0ac05ec to bea4e55: with each latent's dynamics hearing its 16
nearest latents a stage-2 step costs about half as much (experiments/results/stage2_knn.md), and twice the steps
cost 1.16x the old stage 2 (8.1 against 7.0 machine minutes, measured the same day). Test t_in / t_out 0.271 / 0.778 (0.40x / 0.64x
persistence), train 0.224 / 0.818. The whole quickstart took 20.1 min on 2026-12-03, a day on which the machine
ran 2.0x to 2.9x slower than on 2026-12-02 (benchmarks/bench_enf.py); it has not been timed on a faster day.

`qs_fixed_poses_1200` is the quick preset now (commit bea4e55; the README's quickstart section has its timings),
rerun on 2026-12-05 with the same scores as on 2026-12-03 (test t_in / t_out 0.191 / 0.603): 1200 stage-2 steps in 1.5
machine minutes (the training took 141 s wall on this day). Dynamics of 4 blocks, which at the `cpu_3h` scale learned
more per step and per minute than 2 (experiments/results/stage2_depth.md, the shipped `cpu_3h_layers4_long` model),
do not help in the quickstart's budget: with the same 1200 steps test t_in / t_out 0.200 / 0.638 (1.9 machine
minutes), with 900 steps, about the 2-block stage 2's time, 0.296 / 0.712. At the `cpu_3h` scale too the 4-block
dynamics were behind 2 blocks after 1152 steps (test t_in 0.458 against 0.400, stage2_solver_width.md) and ahead
only from about 2000 steps on: a deeper network needs more steps before its depth pays. The quick preset keeps 2 blocks.

![stage-2 loss](quick_recipe.png)
"""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS),
                        help="the variants to run when missing (default: all)")
    args = parser.parse_args()
    runs = Path(args.runs)
    if not args.report_only:
        for name in args.variants:
            overrides = VARIANTS[name][0]
            if not (runs / name / "eval" / "report.md").exists():
                command = [sys.executable, str(ROOT / "experiments" / "navier_stokes.py"), "--preset", "quick",
                           "--run-dir", str(runs / name), "--overwrite", *overrides]
                subprocess.run(command, check=True)
    report(runs)


if __name__ == "__main__":
    main()
