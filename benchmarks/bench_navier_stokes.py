"""Speed and memory of the Navier-Stokes data solver (enfpde.data.navier_stokes) at the protocol's 64 x 64 grid.

Cases (each in its own process, so that peak memory is the case's own):
  solver-b16       one jitted call of 1000 solver steps (dt = 1e-3, one time unit) for a batch of 16
                   trajectories, float32, ENF-PDE forcing.
  solver-2x8       the same 16 trajectories as two batches of 8 run concurrently from two threads, as the
                   generator does on a CPU (one XLA:CPU call uses about one core).
  generate-quick   the whole datasets/navier_stokes_quick.yaml (24 train + 4 test trajectories integrated over
                   28.5 burn-in + 19 time units, 4 of them recorded every 0.25; three netCDF files), progress off.
                   Timed calls re-run it in the same process (compiled); the first call includes compilation.

Usage:
  python benchmarks/bench_navier_stokes.py                 # all cases, writes results/navier_stokes_solver.{json,md}
  python benchmarks/bench_navier_stokes.py --cases solver-b16 --repeats 5

Reported: median wall time of the calls after the first, the first call's time, the process's peak resident
memory (ru_maxrss), and for the solver cases the compile time and the throughput in solver steps per second.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from bench_enf import RESULTS, measure, report

CASES = ("solver-b16", "solver-2x8", "generate-quick")
STEPS, BATCH, RESOLUTION = 1000, 16, 64
STEM = "navier_stokes_solver"
REFERENCE: dict = {}
TARGET = {"generate-quick": {"median_s": 30.0}}  # the quickstart budget: well under a minute on 2 cores
QUICK = Path(__file__).parents[1] / "datasets" / "navier_stokes_quick.yaml"


def run_case(name: str, repeats: int) -> dict:
    import concurrent.futures

    import jax

    from enfpde.data.navier_stokes import VorticitySolver, gaussian_random_field, generate_dataset

    if name.startswith("solver"):
        solver = VorticitySolver(RESOLUTION)
        w_hat = solver.to_spectral(gaussian_random_field(jax.random.key(0), BATCH, RESOLUTION))
        halves = 2 if name == "solver-2x8" else 1
        parts = [w_hat[i * BATCH // halves : (i + 1) * BATCH // halves] for i in range(halves)]
        start = time.perf_counter()
        compiled = type(solver).advance.lower(solver, parts[0], 1, STEPS).compile()
        compile_s = time.perf_counter() - start
        pool = concurrent.futures.ThreadPoolExecutor(halves)

        def one():
            for future in [pool.submit(lambda p: compiled(p)[0].block_until_ready(), p) for p in parts]:
                future.result()

        result = measure(name, one, repeats)
        result.update(
            compile_s=compile_s,
            steps_per_call=STEPS,
            batch=BATCH,
            steps_per_s=STEPS / result["median_s"],
            trajectory_steps_per_s=BATCH * STEPS / result["median_s"],
        )
        return result
    if name == "generate-quick":
        with tempfile.TemporaryDirectory() as directory:

            def one():
                generate_dataset(QUICK, directory, overwrite=True, progress=False)

            return measure(name, one, min(repeats, 2))  # about 30 s a call on 2 idle cores
    raise ValueError(f"unknown case {name!r}; expected one of {CASES}")


def _append_throughput() -> None:
    """Add the solver throughput and compile times (kept in the JSON) below the table ``report`` wrote."""
    results = json.loads((RESULTS / f"{STEM}.json").read_text())["results"]
    lines = [
        "",
        f"Solver throughput ({RESOLUTION} x {RESOLUTION}, batch {BATCH}, {STEPS} steps per call, float32):",
        "",
        "| case | solver steps/s | trajectory-steps/s | compile |",
        "|---|---|---|---|",
    ]
    for r in results:
        if "steps_per_s" in r:
            lines.append(f"| {r['case']} | {r['steps_per_s']:.0f} | {r['trajectory_steps_per_s']:.3g} | {r['compile_s']:.2f} s |")
    with open(RESULTS / f"{STEM}.md", "a") as md:
        md.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    report(__file__, "Navier-Stokes data solver benchmark (64 x 64, dt = 1e-3)", STEM, CASES, REFERENCE, TARGET)
    if "--run-case" not in sys.argv:
        _append_throughput()
