"""Navier-Stokes on the torus (REFERENCE.md section 3): generate the data if needed, train, evaluate.

    python experiments/navier_stokes.py --preset paper                 # the released protocol, 2000 epochs
    python experiments/navier_stokes.py --preset quick                 # a few minutes on 2 CPU cores
    python experiments/navier_stokes.py --preset paper --resume        # continue a killed run
    python experiments/navier_stokes.py --preset paper train.stage2.epochs=800   # any override

Writes runs/<name>/ (checkpoints, metrics.jsonl, eval/report.md with the tables and figures).
"""

import argparse
from pathlib import Path

from enfpde import distributed
from enfpde.cli import add_distributed_arguments
from enfpde.config import load_config
from enfpde.experiment import default_run_dir, run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", help="quick, paper, or a YAML path")
    parser.add_argument("--run-dir", default=None, help="default runs/<config name>")
    parser.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.stage1.epochs=10")
    add_distributed_arguments(parser)
    args = parser.parse_args()
    distributed.initialize_from_args(args)
    config = load_config(args.preset, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config)
    report = run_experiment(config, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print(f"report: {report}")


if __name__ == "__main__":
    main()
