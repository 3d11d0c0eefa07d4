"""Do bfloat16 matmuls speed up XLA:CPU on this machine? GEMMs of the released decoder's shapes, float32 vs bf16.

The decoder's per-(query, latent) work is dense layers on ``pairs x width`` matrices: at the stage-1 step of
the Navier-Stokes protocol (16 fields x 512 points x 4 latents) that is 32768 rows of width 128 or 256. Each
case times ``x @ w`` jitted, with the inputs cast inside the jit (as a bf16 model would), output float32.
The CPU's bf16 instructions (``avx512_bf16``, ``amx_bf16`` in /proc/cpuinfo) are listed with the results.

Usage: python benchmarks/bench_matmul_dtype.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

RESULTS = Path(__file__).parent / "results"
# (rows, inner, outer): pair embeddings (128 -> 128), value modulation (128 -> 2 x 2 heads x 128), per-head mixer
# (128 -> 128 over 2 heads), and the per-query head (256 -> 256) at 16 fields x 512 points.
SHAPES = [(32768, 128, 128), (32768, 128, 512), (65536, 128, 128), (8192, 256, 256)]


def cpu_flags() -> list[str]:
    try:
        flags = next(l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def time_matmul(rows: int, inner: int, outer: int, dtype, repeats: int) -> float:
    x = jax.random.normal(jax.random.key(0), (rows, inner))
    w = jax.random.normal(jax.random.key(1), (inner, outer))
    f = jax.jit(lambda x, w: jnp.matmul(x.astype(dtype), w.astype(dtype)).astype(jnp.float32))
    f(x, w).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(x, w).block_until_ready()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        f32 = time_matmul(*shape, jnp.float32, args.repeats)
        bf16 = time_matmul(*shape, jnp.bfloat16, args.repeats)
        rows.append({"shape": list(shape), "float32_ms": f32 * 1e3, "bfloat16_ms": bf16 * 1e3, "speedup": f32 / bf16})
        print(f"{shape}: float32 {f32 * 1e3:.2f} ms, bfloat16 {bf16 * 1e3:.2f} ms, speedup {f32 / bf16:.2f}x", flush=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    meta = {"cpu": cpu, "bf16_flags": cpu_flags(), "python": platform.python_version(), "jax": jax.__version__,
            "repeats": args.repeats}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "matmul_dtype.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# bfloat16 vs float32 matmuls on XLA:CPU",
        "",
        f"Machine: {cpu}, CPU bf16 flags: {', '.join(meta['bf16_flags']) or 'none'}; Python {meta['python']}, "
        f"jax {meta['jax']}. Command: `python benchmarks/bench_matmul_dtype.py --repeats {args.repeats}` (median of "
        "the repeats, inputs cast inside the jit, float32 output).",
        "",
        "| rows x inner x outer | float32 | bfloat16 | bf16 speed-up |",
        "|---|---|---|---|",
    ] + [
        f"| {' x '.join(map(str, r['shape']))} | {r['float32_ms']:.2f} ms | {r['bfloat16_ms']:.2f} ms | {r['speedup']:.2f}x |"
        for r in rows
    ]
    (RESULTS / "matmul_dtype.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'matmul_dtype.md'}")


if __name__ == "__main__":
    main()
