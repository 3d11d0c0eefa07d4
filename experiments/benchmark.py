"""The benchmark of issue 6: ENF, FNO and DINo trained on the same data, scored by the same evaluation, one table.

    python experiments/benchmark.py --dataset ns --preset quick                  # minutes per model, 2 CPU cores
    python experiments/benchmark.py --dataset swe --preset paper --models enf dino
    python experiments/benchmark.py --dataset ns --preset quick fno.steps=100 dino.train.batch_size=2 \
        train.stage2.epochs=20                                                  # overrides

Presets: the ENF's experiments/configs/{quick,paper,shallow_water_quick,shallow_water_paper}.yaml (its data
and eval sections serve every model) and experiments/configs/baselines/<model>_<dataset>_<preset>.yaml.
Overrides prefixed ``fno.`` / ``dino.`` go to a baseline preset, the others (or ``enf.``-prefixed) to the ENF
config. Models go to <run-root>/benchmark_<dataset>_<preset>/<model>/; the table to --table (default
experiments/results/benchmark_<dataset>_<preset>.md), never replaced without --overwrite.
"""

import argparse
import shlex
import sys

from enfpde.benchmark import DATASETS, MODELS, run_benchmark


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="ns (Navier-Stokes) or swe (shallow water)")
    parser.add_argument("--preset", default="quick", choices=("quick", "paper"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"any of {' '.join(MODELS)} (default all)")
    parser.add_argument("--run-root", default="runs", help="parent of benchmark_<dataset>_<preset>/")
    parser.add_argument("--table", default=None, help="where to write the table (markdown)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing models and the table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="e.g. fno.steps=100 dino.model.code_dim=64 train.stage1.epochs=5")
    args = parser.parse_args(argv)
    command = "python experiments/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        table = run_benchmark(
            args.dataset, args.preset, models=args.models, run_root=args.run_root, table=args.table,
            overrides=args.overrides, overwrite=args.overwrite, progress=not args.quiet, command=command,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(table.read_text())
    print(f"table: {table}")


if __name__ == "__main__":
    main()
