"""Speed and memory of the ENF core at the reference Navier-Stokes configuration (REFERENCE.md section 5).

Cases (each in its own process, so that peak memory is the case's own). The decoder is the released one (the
model defaults, 531k parameters) unless the case says lean (every switch of enfpde.field off, 79k):
  stage1           Meta-SGD reconstruction train step: 8 trajectories x 10 frames = 80 fields, 512 points,
                   4 latents x 16, width 128, 2 heads, 3 inner steps, second order (8 micro-batches of 10).
  stage1-16        8 trajectories x 2 frames = 16 fields, one batch, every step on the same 512 points.
  stage1-draws     the paper preset: stage1-16 on the whole 64 x 64 grid, each inner step fitting its own random 512
                   points and the loss on a fourth 512 (the released code's draws).
  stage1-first     stage1-16 with first-order inner gradients.
  stage1-subset    stage1-16 with the inner steps on random subsets of 128 of the 512 points.
  stage1-lean      stage1 with the lean decoder.
  stage1-lean-16   stage1-16 with the lean decoder.
  decode           decode a full 64 x 64 field for a batch of 8 fitted states (one jit, default chunks of 512).
  decode-lean      decode with the lean decoder.

Usage:
  python benchmarks/bench_enf.py                      # all cases, writes benchmarks/results/enf_core.{json,md}
  python benchmarks/bench_enf.py --cases decode --repeats 5
  python benchmarks/bench_enf.py --costs              # XLA's operation counts -> benchmarks/results/enf_costs.md

Reported: median wall time of the steps after the first, the first call's time (compile + one run), and the
process's peak resident memory (ru_maxrss, which includes about 0.4 GB of Python + JAX runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CASES = ("stage1", "stage1-16", "stage1-draws", "stage1-first", "stage1-subset", "stage1-lean", "stage1-lean-16", "decode", "decode-lean")

REFERENCE = {  # REFERENCE.md section 5, the reference implementation on this machine type
    "stage1": {"median_s": 7.6, "peak_gb": 5.8, "compile_s": 42.0},
    "decode": {"median_s": 1.1, "peak_gb": 1.0},
}
TARGET = {"stage1": {"median_s": 2.5, "peak_gb": 2.0}, "decode": {"median_s": 0.35}}


def _build(first_order=False, inner_points=None, lean=False, outer_points=None):
    import jax
    from flax import nnx

    from enfpde import EquivariantNeuralField, MetaSGDEncoder, Torus
    from enfpde.field import LEAN_DECODER as LEAN
    from enfpde.training import NeuralFieldAutoencoder

    torus = Torus((1.0, 1.0))
    field = EquivariantNeuralField(
        torus, num_out=1, latent_dim=16, num_hidden=128, num_heads=2, rngs=nnx.Rngs(0), **(LEAN if lean else {})
    )
    encoder = MetaSGDEncoder(torus, num_latents=4, latent_dim=16, num_inner_steps=3, first_order=first_order, inner_points=inner_points,
                             outer_points=outer_points)
    return jax, torus, NeuralFieldAutoencoder(field, encoder)


def _time(fn, repeats):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def measure(name: str, one, repeats: int) -> dict:
    """Time ``one()`` (first call, then ``repeats`` timed calls) and read the process's peak memory."""
    first, times = _time(one, repeats)
    return {
        "case": name,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "first_call_s": first,
        "repeats": repeats,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def case_program(name: str):
    """The jitted function a case times and the arguments of its first call."""
    from enfpde.training import default_optimizer, make_stage1_step

    if name.startswith("stage1"):
        draws = name == "stage1-draws"
        jax, torus, model = _build(
            first_order=name == "stage1-first", inner_points={"stage1-subset": 128, "stage1-draws": 512}.get(name),
            lean="lean" in name, outer_points=512 if draws else None,
        )
        fields = 80 if name in ("stage1", "stage1-lean") else 16
        step, state, _ = make_stage1_step(model, default_optimizer(), num_microbatches=fields // 10 if fields == 80 else 1)
        points = 4096 if draws else 512
        coords = torus.sample_coords(jax.random.key(0), points)
        values = jax.random.normal(jax.random.key(1), (fields, points, 1))
        return step, (state.params, state.opt_state, state.rest, coords, values, jax.random.key(0))
    if name.startswith("decode"):
        import jax.numpy as jnp
        from flax import nnx

        jax, torus, model = _build(lean=name == "decode-lean")
        grid = (jnp.arange(64) + 0.5) / 64
        coords = jnp.stack(jnp.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
        z = model.encoder.initial(8)
        z = z.replace(contexts=jax.random.normal(jax.random.key(2), z.contexts.shape))
        graphdef, params = nnx.split(model.field)
        decode = jax.jit(lambda params, coords, z: nnx.merge(graphdef, params)(coords, z))
        return decode, (params, coords, z)
    raise ValueError(f"unknown case {name!r}; expected one of {CASES}")


def run_case(name: str, repeats: int) -> dict:
    import jax

    fn, args = case_program(name)
    if name.startswith("stage1"):
        carry = [args[0], args[1], 0]

        def one():  # every step continues from the previous one's parameters, with a fresh key
            params, opt_state, i = carry
            params, opt_state, loss = fn(params, opt_state, *args[2:5], jax.random.key(i))
            loss.block_until_ready()
            carry[:] = [params, opt_state, i + 1]

    else:

        def one():
            fn(*args).block_until_ready()

    return measure(name, one, repeats)


def xla_cost(name: str) -> dict:
    """XLA's own count of a case's floating-point operations and bytes accessed (one call, after compilation)."""
    fn, args = case_program(name)
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"case": name, "gflop": cost.get("flops", 0.0) / 1e9, "gbytes": cost.get("bytes accessed", 0.0) / 1e9}


# Cases whose program has no loop: XLA's cost analysis counts a loop's body once, whatever its trip count, so the
# micro-batched 80-field steps and the chunked decodes would be undercounted.
LOOP_FREE_CASES = ("stage1-16", "stage1-draws", "stage1-first", "stage1-subset", "stage1-lean-16")


def report_costs(cases) -> None:
    """``--costs``: XLA's operation counts of the (loop-free) cases beside their recorded median times
    (results/enf_core.json), written to results/enf_costs.md: the rate each case reaches at that median."""
    recorded = {r["case"]: r for r in json.loads((RESULTS / "enf_core.json").read_text())["results"]}
    lines = [
        "| case | GFLOP per call | GB accessed per call | recorded median | GFLOP/s at that median |",
        "|---|---|---|---|---|",
    ]
    for case in cases:
        cost = xla_cost(case)
        median = recorded.get(case, {}).get("median_s")
        rate = f"{cost['gflop'] / median:.0f}" if median else "-"
        shown = f"{median:.2f} s" if median else "-"
        lines.append(f"| {case} | {cost['gflop']:.1f} | {cost['gbytes']:.1f} | {shown} | {rate} |")
        print(lines[-1], flush=True)
    info = machine()
    text = "\n".join([
        "# ENF core: XLA's operation counts",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']}. Command: `python benchmarks/bench_enf.py --costs`. "
        "Counts from `jax.jit(...).lower(...).compile().cost_analysis()` (one call; XLA counts a multiply-add as 2 "
        "operations) of the code as it is; medians as recorded in enf_core.md, where they may be older than the code. "
        "Only the cases without a loop: XLA counts a loop's body "
        "once, so the micro-batched 80-field steps and the chunked decodes are left out.",
        "",
        *lines,
    ])
    (RESULTS / "enf_costs.md").write_text(text + "\n")


def machine() -> dict:
    import flax
    import jax
    import optax

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }


def report(script: str, title: str, stem: str, cases, reference: dict, target: dict, argv=None) -> None:
    """Command-line driver shared by the benchmarks: runs each case in its own process (``--run-case``),
    merges the results into ``results/<stem>.json`` and writes ``results/<stem>.md``."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(cases), choices=cases)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls after the first (default 10)")
    parser.add_argument("--run-case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_case:
        print(json.dumps(sys.modules["__main__"].run_case(args.run_case, args.repeats)))
        return

    results = []
    for case in args.cases:
        print(f"running {case} ...", flush=True)
        out = subprocess.run(
            [sys.executable, script, "--run-case", case, "--repeats", str(args.repeats)],
            check=True, capture_output=True, text=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)

    info = machine()
    RESULTS.mkdir(exist_ok=True)
    previous = RESULTS / f"{stem}.json"
    if previous.exists():  # keep the recorded cases that were not re-run
        ran = {r["case"] for r in results}
        kept = [r for r in json.loads(previous.read_text())["results"] if r["case"] not in ran]
        results = sorted(kept + results, key=lambda r: list(cases).index(r["case"]))
    previous.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    lines = [
        f"# {title}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, jax {info['jax']}, "
        f"flax {info['flax']}, optax {info['optax']}. Command: `python benchmarks/{Path(script).name}` (timed calls per case below).",
        "",
        "| case | median step | first call (compile + run) | peak RSS | timed calls | reference | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = reference.get(r["case"], {})
        tgt = target.get(r["case"], {})
        ref_s = f"{ref['median_s']} s, {ref.get('peak_gb', '-')} GB" if ref else "-"
        tgt_s = ", ".join(f"{v} {'GB' if k == 'peak_gb' else 's'}" + (" compile" if k == "compile_s" else "") for k, v in tgt.items()) or "-"
        lines.append(f"| {r['case']} | {r['median_s']:.2f} s | {r['first_call_s']:.1f} s | {r['peak_gb']:.2f} GB | {r['repeats']} | {ref_s} | {tgt_s} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if "--costs" in sys.argv:
        report_costs(LOOP_FREE_CASES)
    else:
        report(__file__, "ENF core benchmark (reference Navier-Stokes configuration)", "enf_core", CASES, REFERENCE, TARGET)
