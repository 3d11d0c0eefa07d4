"""Compile and run time of the package's hot paths under different XLA:CPU flags.

The test suite runs with ``--xla_cpu_use_fusion_emitters=false`` (tests/conftest.py): jaxlib 0.10 compiles each
fusion into an LLVM module of its own, and the classic element-wise emitters compiled a tiny training run's steps
in less than half the time. Whether the package should set the flag for its users depends on what it does to
the run time of real-size steps, not only to compiling; this benchmark measures both. Each (setting, case) runs
in a fresh process (``bench_enf.py`` / ``bench_dynamics.py --run-case``), so its first call includes the whole
compilation; no persistent compilation cache is used.

Settings (added to the ``XLA_FLAGS`` that ``import enfpde`` sets up; enfpde/_xla.py):
  default            the package's defaults (MLIR fusion emitters)
  no-fusion-emitters ``--xla_cpu_use_fusion_emitters=false``

Cases: stage1-16 and decode (benchmarks/bench_enf.py), stage2-quick and forecast (benchmarks/bench_dynamics.py).

Usage: python benchmarks/bench_xla_flags.py [--cases stage1-16 decode] [--repeats 3]
Writes benchmarks/results/xla_flags.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_enf import machine

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SETTINGS = {"default": "", "no-fusion-emitters": "--xla_cpu_use_fusion_emitters=false"}
CASES = {"stage1-16": "bench_enf.py", "decode": "bench_enf.py", "stage2-quick": "bench_dynamics.py",
         "forecast": "bench_dynamics.py"}


def run(case: str, flags: str, repeats: int) -> dict:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    out = subprocess.run([sys.executable, str(HERE / CASES[case]), "--run-case", case, "--repeats", str(repeats)],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first (default 3)")
    args = parser.parse_args()

    rows = []
    for case in args.cases:
        for setting, flags in SETTINGS.items():  # alternate settings case by case: drifts of the machine hit both
            result = run(case, flags, args.repeats)
            rows.append({"setting": setting, **result})
            print(f"{case} [{setting}]: first call {result['first_call_s']:.1f} s, median {result['median_s']:.3f} s, "
                  f"{result['peak_gb']:.2f} GB", flush=True)

    info = machine()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "xla_flags.json").write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")
    lines = [
        "# XLA:CPU flags: compile and run time of the hot paths",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, jax {info['jax']}. Command: "
        f"`python benchmarks/bench_xla_flags.py --repeats {args.repeats}` (each case and setting in a fresh process, "
        "no compilation cache; first call = compile + one run).",
        "",
        "| case | setting | first call (compile + run) | median call | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['setting']} | {r['first_call_s']:.1f} s | {r['median_s']:.3f} s | "
                     f"{r['peak_gb']:.2f} GB |")
    (RESULTS / "xla_flags.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
