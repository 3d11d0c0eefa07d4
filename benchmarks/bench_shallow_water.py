"""Speed of the shallow-water data generator (enfpde.data.shallow_water) at the benchmark's T63 protocol.

Cases (each in its own process, so that peak memory is the case's own):
  simulate-b1 ... simulate-b8   one jitted ShallowWaterSolver.simulate call for a batch of B trajectories of the
                                protocol: 950 steps of 1200 s (snapshots 0-19 every 50 steps, 14 kept), T63 on the
                                192 x 96 Gaussian grid, the 14 frames synthesised on the 192 x 96 equiangular grid.
  simulate-2x2, simulate-2x4    two such calls (B = 2 or 4 each) run concurrently from two threads, as the
                                generator does on a CPU (one XLA:CPU call keeps about 1.5 cores busy).
  generate-quick                the whole datasets/shallow_water_quick.yaml (its train and test splits, coarse
                                files and the native test file), progress off. Timed calls re-run it in the same
                                process (compiled); the first call includes compilation.

Usage:
  python benchmarks/bench_shallow_water.py                  # all cases, writes results/shallow_water.{json,md}
  python benchmarks/bench_shallow_water.py --cases simulate-b4 --repeats 3

Reported: median wall time of the calls after the first, the first call's time (compile + run), the process's
peak resident memory (ru_maxrss), and for the simulate cases the throughput in trajectories per second, the
process CPU time per trajectory (less sensitive to other jobs on a shared machine than wall time) and the time
of the paper dataset (512 train + 128 test trajectories) at that throughput; the 1-minute load average at the
end of each case says how busy the machine was.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_enf import RESULTS, measure, report

CASES = ("simulate-b1", "simulate-b2", "simulate-b4", "simulate-b8", "simulate-2x2", "simulate-2x4", "generate-quick")
STEM = "shallow_water"
REFERENCE: dict = {}
TARGET = {"generate-quick": {"median_s": 120.0}}  # the quick set: 1 to 2 minutes on 2 cores
QUICK = Path(__file__).parents[1] / "datasets" / "shallow_water_quick.yaml"
PAPER_TRAJECTORIES = 512 + 128


def run_case(name: str, repeats: int) -> dict:
    import concurrent.futures

    import numpy as np

    from enfpde.data.shallow_water import ShallowWaterSolver, draw_bump_parameters, generate_dataset

    if name.startswith("simulate"):
        spec = name.split("-")[1]
        calls, batch = (int(spec[0]), int(spec[2:])) if "x" in spec else (1, int(spec[1:]))
        solver = ShallowWaterSolver()
        bumps = [draw_bump_parameters(np.arange(c * batch, (c + 1) * batch)) for c in range(calls)]
        start = time.perf_counter()
        solver.simulate(bumps[0])  # compile (and one run)
        compile_s = time.perf_counter() - start
        pool = concurrent.futures.ThreadPoolExecutor(calls)
        cpu = []

        def one():
            start = time.process_time()
            for future in [pool.submit(solver.simulate, b) for b in bumps]:
                future.result()
            cpu.append(time.process_time() - start)

        result = measure(name, one, min(repeats, 3))  # 1 to 8 s a call
        trajectories = calls * batch
        cpu_per_trajectory = sorted(cpu[1:])[len(cpu[1:]) // 2] / trajectories
        result.update(
            first_call_s=compile_s,
            trajectories_per_call=trajectories,
            steps=950,
            trajectories_per_s=trajectories / result["median_s"],
            paper_dataset_estimate_s=PAPER_TRAJECTORIES * result["median_s"] / trajectories,
            cpu_s_per_trajectory=cpu_per_trajectory,
            load_average=os.getloadavg()[0],
        )
        return result
    if name == "generate-quick":
        with tempfile.TemporaryDirectory() as directory:

            def one():
                generate_dataset(QUICK, directory, overwrite=True, progress=False)

            result = measure(name, one, min(repeats, 2))
            result["load_average"] = os.getloadavg()[0]
            return result
    raise ValueError(f"unknown case {name!r}; expected one of {CASES}")


def _append_throughput() -> None:
    """Add the throughput table (kept in the JSON) below the table ``report`` wrote."""
    results = json.loads((RESULTS / f"{STEM}.json").read_text())["results"]
    lines = [
        "",
        "Generator throughput (T63, 950 steps of 1200 s, 14 frames synthesised at 192 x 96, float32):",
        "",
        "| case | trajectories per call | trajectories/s | CPU s per trajectory | paper dataset (640 trajectories) at this rate | load average |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "trajectories_per_s" in r:
            lines.append(
                f"| {r['case']} | {r['trajectories_per_call']} | {r['trajectories_per_s']:.2f} | {r['cpu_s_per_trajectory']:.2f} | "
                f"{r['paper_dataset_estimate_s'] / 60:.1f} min | {r['load_average']:.1f} |"
            )
    chosen = next((r for r in results if r["case"] == "simulate-2x2"), None)  # the generator's setting
    if chosen is not None:
        idle_min = PAPER_TRAJECTORIES * chosen["cpu_s_per_trajectory"] / 2 / 60
        lines += [
            "",
            "The generator's setting is batch_size 2 with two concurrent calls (simulate-2x2). The wall times above",
            "were taken with other jobs using the machine (load average in the table). At the CPU time per trajectory of",
            f"simulate-2x2 ({chosen['cpu_s_per_trajectory']:.2f} s), both cores of an idle machine would generate the paper",
            f"dataset (640 trajectories) in about {idle_min:.0f} min. That figure is an estimate, not a measurement; at the",
            f"measured loaded rate it takes {chosen['paper_dataset_estimate_s'] / 60:.0f} min.",
        ]
    with open(RESULTS / f"{STEM}.md", "a") as md:
        md.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    report(__file__, "Shallow-water data generator benchmark (T63, 192 x 96, dt = 1200 s)", STEM, CASES, REFERENCE, TARGET)
    if "--run-case" not in sys.argv:
        _append_throughput()
