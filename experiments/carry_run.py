"""Carry a training run across sessions whose work trees do not survive: save its resumable state into the
repository, and put it back.

    python experiments/carry_run.py save runs/navier_stokes_paper_full       # -> experiments/runs_in_progress/<name>/
    python experiments/carry_run.py restore runs/navier_stokes_paper_full    # <- the same, then train with --resume

A saved run is what `--resume` needs and nothing more: config.yaml, model.json, the metrics log and the newest
checkpoint (parameters and optimiser state; a few MB). Saving replaces the previous snapshot of the same run (it
is the same run, further on) unless that snapshot is newer; restoring never touches an existing run directory.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from enfpde import checkpointing

CARRIED = Path(__file__).parent / "runs_in_progress"
FILES = (checkpointing.CONFIG_FILE, checkpointing.MODEL_FILE, checkpointing.METRICS_FILE)


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = run_dir / checkpointing.CHECKPOINT_DIR
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def copy_run(source: Path, target: Path, step: int) -> None:
    """Copy the run files and checkpoint ``step`` of ``source`` into a fresh ``target`` (via a temporary folder,
    so an interrupted copy never leaves a half-written run where a whole one was)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / checkpointing.CHECKPOINT_DIR).mkdir(parents=True)
    for name in FILES:
        shutil.copy2(source / name, tmp / name)
    shutil.copytree(source / checkpointing.CHECKPOINT_DIR / str(step), tmp / checkpointing.CHECKPOINT_DIR / str(step))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("run_dir", type=Path, help="the run directory under runs/")
    args = parser.parse_args()
    run_dir, carried = args.run_dir, CARRIED / args.run_dir.name
    source, target = (run_dir, carried) if args.action == "save" else (carried, run_dir)
    missing = [name for name in FILES if not (source / name).exists()]
    steps = checkpoint_steps(source)
    if missing or not steps:
        print(f"error: '{source}' is not a run with a checkpoint (missing: {missing or 'checkpoints'}).", file=sys.stderr)
        return 1
    if args.action == "restore" and target.exists() and any(target.iterdir()):
        print(f"error: '{target}' exists; resume it as it is, or move it away to restore the saved step {steps[-1]}.",
              file=sys.stderr)
        return 1
    newest_there = max(checkpoint_steps(target), default=-1)
    if newest_there > steps[-1]:
        print(f"error: '{target}' already holds step {newest_there}, newer than step {steps[-1]} of '{source}'; "
              f"nothing copied.", file=sys.stderr)
        return 1
    copy_run(source, target, steps[-1])
    print(f"{args.action}d step {steps[-1]}: '{source}' -> '{target}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
