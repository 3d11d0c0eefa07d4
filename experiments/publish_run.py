"""Publish an evaluated run under experiments/results/: its report with a header (command, machine, training
time), its figures and training-loss curve, and optionally the model itself (config.yaml, model.json and the
final checkpoint only, loadable with `Forecaster.load`).

    python experiments/publish_run.py runs/navier_stokes_cpu --name navier_stokes_cpu --ship-model \
        --command "python experiments/navier_stokes.py --preset cpu"

A run resumed in a new directory from another published run's last checkpoint (with a longer schedule) logs
only its own processes: ``--continues NAME`` names that run (experiments/results/NAME.md and its test curve,
NAME_test_curve.json, which must reach the step this run starts from), and the header adds its training time.

``--eval-dir`` reads another evaluation of the run than ``eval/`` (``eval_quarter_turns/``, written by
``enfpde evaluate RUN --ensemble quarter_turns``: the same model forecasting with the quarter-turn ensemble).

Writes experiments/results/<name>.md and experiments/results/<name>/ (figures; model/ with --ship-model).
Existing files are replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from collections import Counter
from pathlib import Path

import jax

from enfpde import checkpointing
from enfpde.experiment import cumulative_seconds
from enfpde.plotting import plot_training_loss
from stage1_ablation import _cpu
from test_curve import row_at

RESULTS = Path(__file__).parent / "results"
FIGURES = ("forecast_vs_truth.png", "mse_per_lead_time.png")


def training_time(records: list[dict]) -> tuple[float, float]:
    """Wall seconds and machine seconds (CPU seconds / cores) of training, summed over resumed segments."""
    if not records:
        return 0.0, 0.0
    wall = float(cumulative_seconds(records, "elapsed_s")[-1])
    cpu = float(cumulative_seconds([{"cpu_s": r.get("cpu_s", 0.0)} for r in records], "cpu_s")[-1])
    return wall, cpu / (os.cpu_count() or 1)


def continued_run(name: str, first_step: int, wall: float, machine: float) -> str:
    """The header line of a run that continues the published run ``name`` from ``first_step``: that run's cost up
    to there (from its test curve), its machine, and the totals with this run's ``wall`` and ``machine`` seconds."""
    base = row_at(json.loads((RESULTS / f"{name}_test_curve.json").read_text()), first_step)
    lines = (RESULTS / f"{name}.md").read_text().splitlines()
    machine_line = next((line[len("- Machine: "):] for line in lines if line.startswith("- Machine: ")), "not recorded")
    return (f"- Continues [`{name}`]({name}.md) from its step {first_step}: {base['machine_min']:.1f} machine minutes, "
            f"{base['wall_min']:.1f} min wall there (machine: {machine_line.rstrip('.')}). With them: "
            f"{base['machine_min'] + machine / 60:.1f} machine minutes, {base['wall_min'] + wall / 60:.1f} min wall.")


def publish(run_dir: Path, name: str, command: str, ship_model: bool, overwrite: bool, continues: str | None = None,
            eval_dir: str = "eval") -> Path:
    report = run_dir / eval_dir / "report.md"
    if not report.exists():
        raise FileNotFoundError(f"'{run_dir}' has no evaluation ({report}); evaluate it first (enfpde evaluate).")
    out_md, out_dir = RESULTS / f"{name}.md", RESULTS / name
    if not overwrite and (out_md.exists() or out_dir.exists()):
        raise FileExistsError(f"{out_md} or {out_dir} exists; pass --overwrite to replace them.")
    records = checkpointing.read_metrics(run_dir)
    wall, machine = training_time(records)
    stages = Counter(r["stage"] for r in records)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for figure in FIGURES:
        if (run_dir / eval_dir / figure).exists():
            shutil.copy2(run_dir / eval_dir / figure, out_dir / figure)
    plot_training_loss(records, out_dir / "training_loss.png")
    if ship_model:
        step = max(int(p.name) for p in (run_dir / checkpointing.CHECKPOINT_DIR).iterdir() if p.name.isdigit())
        model = out_dir / "model"
        model.mkdir()
        for file in (checkpointing.CONFIG_FILE, checkpointing.MODEL_FILE):
            shutil.copy2(run_dir / file, model / file)
        shutil.copytree(run_dir / checkpointing.CHECKPOINT_DIR / str(step), model / checkpointing.CHECKPOINT_DIR / str(step))
    header = [
        f"# {name}",
        "",
        f"- Command: `{command}`; published with `python experiments/publish_run.py {run_dir} --name {name}"
        f"{' --ship-model' if ship_model else ''}{' --continues ' + continues if continues else ''}"
        f"{' --eval-dir ' + eval_dir if eval_dir != 'eval' else ''}`.",
        f"- Steps: " + ", ".join(f"{stage} {n}" for stage, n in stages.items()) + ".",
        f"- Training time: {wall / 60:.1f} min wall, {machine / 60:.1f} machine minutes (CPU time of the training "
        f"process / {os.cpu_count()} cores; other jobs shared the machine at times, which inflates wall time more).",
        f"- Machine: {_cpu()}, {os.cpu_count()} cores, no GPU; Python {platform.python_version()}, jax {jax.__version__}.",
    ]
    if eval_dir != "eval":
        header.append(f"- Evaluation: `{run_dir}/{eval_dir}/` (written by `enfpde evaluate {run_dir} --ensemble "
                      f"{eval_dir.removeprefix('eval_')}`), not the run's own `eval/`.")
    if continues:
        header.append(continued_run(continues, min(int(r["step"]) for r in records), wall, machine))
    if ship_model:
        header.append(
            f"- The model: [{name}/model]({name}/model) (config.yaml, model.json, checkpoint {step}); "
            f"`Forecaster.load(\"experiments/results/{name}/model\")` or `enfpde forecast experiments/results/{name}/model ...`."
        )
    header += ["", f"![training loss]({name}/training_loss.png)", ""]
    figures = [f"![{f[:-4]}]({name}/{f})" for f in FIGURES if (out_dir / f).exists()]
    # The report's own image links point into the run's eval/ folder; the published figures are linked below.
    body = "\n".join(line for line in report.read_text().splitlines() if not line.startswith("!["))
    out_md.write_text("\n".join(header) + "\n" + body + "\n\n" + "\n".join(figures) + "\n")
    for split in ("test", "train"):
        metrics = run_dir / eval_dir / split / "metrics.json"
        if metrics.exists():
            shutil.copy2(metrics, out_dir / f"{split}_metrics.json")
    return out_md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", required=True, help="file name under experiments/results/")
    parser.add_argument("--command", required=True, help="the command that trained the run (for the header)")
    parser.add_argument("--ship-model", action="store_true", help="copy config, metadata and the final checkpoint")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--continues", default=None, metavar="NAME", help="the published run this one was resumed from")
    parser.add_argument("--eval-dir", default="eval", help="the run's evaluation to publish (default eval/)")
    args = parser.parse_args()
    print(publish(args.run_dir, args.name, args.command, args.ship_model, args.overwrite, args.continues, args.eval_dir))


if __name__ == "__main__":
    main()
