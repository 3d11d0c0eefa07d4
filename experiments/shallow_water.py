"""Shallow water on the sphere (REFERENCE.md section 3): generate the data if needed, train the axial-sphere
ENF and its ablations, evaluate each (training resolution and zero-shot 2x), write one comparison table.

    python experiments/shallow_water.py --preset quick                     # all three geometries, minutes each
    python experiments/shallow_water.py --preset paper --geometries axial_sphere
    python experiments/shallow_water.py --preset paper --resume            # continue killed runs
    python experiments/shallow_water.py --preset quick train.stage2.epochs=100   # any override

Geometries: ``axial_sphere`` (rotations about the polar axis, the paper's model for shallow water with
Coriolis), ``sphere`` (all rotations) and ``absolute_sphere`` (no symmetry, the ablation). Each trains into
runs/<preset name>_<geometry>/; the table goes to --table (default
experiments/results/shallow_water_<preset>.md), refusing to replace an existing one without --overwrite.
"""

import argparse
from pathlib import Path

from enfpde import distributed
from enfpde.benchmark import machine_line
from enfpde.cli import add_distributed_arguments
from enfpde.config import load_config
from enfpde.evaluation import check_writable, write_text_atomic
from enfpde.experiment import comparison_markdown, run_experiment
from enfpde.paper import paper_table

GEOMETRIES = ("axial_sphere", "sphere", "absolute_sphere")
LABELS = {"axial_sphere": "ENF axial", "sphere": "ENF full rotations", "absolute_sphere": "ENF absolute position"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", help="quick, paper, or a YAML path")
    parser.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=GEOMETRIES)
    parser.add_argument("--run-root", default="runs", help="parent of the run directories")
    parser.add_argument("--table", default=None, help="where to write the comparison (markdown)")
    parser.add_argument("--resume", action="store_true", help="continue the runs from their last checkpoints")
    parser.add_argument("--overwrite", action="store_true", help="replace existing runs and the table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.stage1.epochs=10")
    add_distributed_arguments(parser)
    args = parser.parse_args()
    distributed.initialize_from_args(args)

    preset = f"shallow_water_{args.preset}" if args.preset in ("quick", "paper") else args.preset
    base = load_config(preset, args.overrides)
    table = Path(args.table or f"experiments/results/{base.name}.md")
    check_writable(table, args.overwrite or args.resume)  # fail before hours of training, not after
    runs = {}
    for geometry in args.geometries:
        config = load_config(preset, args.overrides + [f"data.geometry={geometry}", f"name={base.name}_{geometry}"])
        run_dir = Path(args.run_root) / config.name
        print(f"=== {LABELS[geometry]}: {run_dir}", flush=True)
        run_experiment(config, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
        runs[LABELS[geometry]] = run_dir
    command = "python experiments/shallow_water.py " + " ".join(
        [f"--preset {args.preset}", "--geometries " + " ".join(args.geometries), *args.overrides]
    )
    report = comparison_markdown(
        runs, title=f"Shallow water on the sphere, preset `{args.preset}`", paper_table=paper_table("swe")
    )
    report += f"\nCommand: `{command}`. Errors in the reference's units (eval.variable_scales).\n"
    report += f"Machine: {machine_line()}.\n"
    if not distributed.is_main_process():
        return  # several processes: process 0 writes the table
    table.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(table, report)
    print(report)
    print(f"table: {table}")


if __name__ == "__main__":
    main()
