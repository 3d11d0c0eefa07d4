"""Speed and memory of shallow-water training steps (axial sphere, 96 x 48 grid), through the real trainer.

Cases (each in its own process; each trains a throw-away run on data/shallow_water_quick, generated first if
missing, and reads the step times from its metrics log, so host-side batching is included):
  paper-stage1   the paper preset's stage-1 step: batch 1 x 10 frames, 4096 points, 8 latents x 32, width 128
  paper-stage2   its stage-2 step: encode frame 0, Euler over 10 frames, decode 4096 points, ODE width 256
  quick-stage1   the quick preset's stage-1 step: batch 2 x 10 frames, 512 points, 18 latents x 32, width 64
  quick-stage2   its stage-2 step

Usage: python benchmarks/bench_shallow_water_training.py [--cases ...] [--repeats N]
The paper preset's estimated training time on this machine is (500 x 512) stage-1 steps + (1000 x 512)
stage-2 steps at the medians measured here.
"""

from __future__ import annotations

import resource
import statistics
import tempfile

from bench_enf import report

CASES = ("paper-stage1", "paper-stage2", "quick-stage1", "quick-stage2")


def run_case(name: str, repeats: int) -> dict:
    from enfpde.checkpointing import read_metrics
    from enfpde.config import load_config
    from enfpde.experiment import ensure_dataset
    from enfpde.trainer import train

    preset, stage = name.split("-")
    data = "data/shallow_water_quick"
    epochs = ["train.stage1.epochs=1", "train.stage2.epochs=0"] if stage == "stage1" else ["train.stage1.epochs=0", "train.stage2.epochs=1"]
    config = load_config(
        f"shallow_water_{preset}",
        [f"data.train={data}/train.nc", f"data.test={data}/test.nc", f"data.test_native={data}/test_native.nc",
         "dataset=datasets/shallow_water_quick.yaml", "train.checkpoint_every=100000", *epochs],
    )
    ensure_dataset(config, progress=False)
    with tempfile.TemporaryDirectory() as run_dir:
        train(config, f"{run_dir}/run", progress=False, stop_after=repeats + 1)
        elapsed = [r["elapsed_s"] for r in read_metrics(f"{run_dir}/run")]
    steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return {
        "case": name,
        "median_s": statistics.median(steps),
        "min_s": min(steps),
        "first_call_s": elapsed[0],
        "repeats": len(steps),
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


if __name__ == "__main__":
    report(__file__, "Shallow-water training steps (axial sphere, 96 x 48)", "shallow_water_training", CASES, {}, {})
