"""XLA:CPU setting applied when enfpde is imported (before JAX creates its CPU backend).

jaxlib 0.10's CPU compiler fuses whole chains of matmuls and element-wise ops of the decoder into single
YNNPACK fusions that run at a fraction of plain GEMM speed (in the profile of a 64 x 64 decode, one fusion
took 192 of 295 ms). Restricting YNNPACK to individual dots roughly halved the decode and the 20-frame
forecast on a 2-core CPU; the before/after figures are in benchmarks/README.md.

It is added to ``XLA_FLAGS`` only if the user has not set this flag, only for the jaxlib line it was
measured on (an unknown flag aborts the process), and not when ``ENFPDE_KEEP_XLA_FLAGS=1``. It takes effect
only if no JAX computation ran before ``import enfpde``.
"""

from __future__ import annotations

import os
from importlib import metadata

FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def apply_cpu_defaults() -> bool:
    """Add :data:`FLAG` to ``XLA_FLAGS`` where appropriate; returns whether it was added."""
    current = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("ENFPDE_KEEP_XLA_FLAGS") == "1" or "xla_cpu_experimental_ynn_fusion_type" in current:
        return False
    try:
        if not metadata.version("jaxlib").startswith("0.10."):
            return False
    except metadata.PackageNotFoundError:
        return False
    os.environ["XLA_FLAGS"] = f"{current} {FLAG}".strip()
    return True


apply_cpu_defaults()
