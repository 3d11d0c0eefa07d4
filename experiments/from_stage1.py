"""Start a run of a preset from another run's finished stage 1, when both presets train the same stage 1.

    python experiments/from_stage1.py runs/navier_stokes_cpu_3h_layers4_released_decoder \
        --preset cpu_3h_latent_targets --run-dir runs/navier_stokes_cpu_3h_latent_targets
    python experiments/navier_stokes.py --preset cpu_3h_latent_targets \
        --run-dir runs/navier_stokes_cpu_3h_latent_targets --resume

Stage 1 is a pure function of the settings it reads (the batches and keys of a step depend on the seed and the
step only), so two presets that differ only after it would train the same decoder and encoder twice. This
writes the preset's run directory as the preset would have left it at the end of stage 1: its own config.yaml
and model.json, the base run's checkpoint at that step (decoder, encoder, the dynamics' initialisation, the
optimiser states) and the base run's stage-1 log, whose CPU seconds then count in the run's training cost. It
refuses when any setting other than those of the dynamics stages, the evaluation or the bookkeeping differs,
and never touches an existing directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from enfpde import checkpointing
from enfpde.config import config_from_yaml, load_config
from enfpde.data.trajectories import TrajectoryDataset
from enfpde.trainer import Trainer, _flatten_dict

# Settings that stage 1 never reads: the dynamics stages' schedule and targets, evaluation, bookkeeping.
AFTER_STAGE1 = ("name", "eval.", "train.stage2", "train.latent_targets.", "train.joint.", "train.checkpoint_every",
                "train.keep_checkpoints")


def stage1_differences(base, preset) -> list[str]:
    a, b = _flatten_dict(dataclasses.asdict(base)), _flatten_dict(dataclasses.asdict(preset))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not k.startswith(AFTER_STAGE1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="a run whose stage 1 is finished, its checkpoint there kept")
    parser.add_argument("--preset", required=True, help="the preset to start (a name or a YAML path)")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args()

    if args.run_dir.exists():
        raise SystemExit(f"'{args.run_dir}' exists; this never replaces a run. Pick another directory.")
    base_config = config_from_yaml(args.base / checkpointing.CONFIG_FILE)
    config = load_config(args.preset)
    differences = stage1_differences(base_config, config)
    if differences:
        raise SystemExit(f"the presets train different stage 1s; they differ in {differences}.")
    boundary = config.train.stage1.epochs * (TrajectoryDataset.open(config.data.train).num_trajectories // config.train.batch_size)
    source = args.base / checkpointing.CHECKPOINT_DIR / str(boundary)
    if not source.is_dir():
        raise SystemExit(f"'{args.base}' has no checkpoint at the end of stage 1 (step {boundary}).")
    records = [r for r in checkpointing.read_metrics(args.base) if r["step"] < boundary]
    if [r["step"] for r in records] != list(range(boundary)):
        raise SystemExit(f"'{args.base}' lacks part of its stage-1 log (steps 0-{boundary - 1}).")
    Trainer(config, args.run_dir, progress=False)  # writes the preset's config.yaml and model.json
    shutil.copytree(source, args.run_dir / checkpointing.CHECKPOINT_DIR / str(boundary))
    (args.run_dir / checkpointing.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"'{args.run_dir}': the preset {args.preset} at the end of its stage 1 (step {boundary}, from '{args.base}'). "
          f"Continue with: python experiments/navier_stokes.py --preset {args.preset} --run-dir {args.run_dir} --resume")


if __name__ == "__main__":
    main()
