"""Published numbers to compare against, as markdown tables (REFERENCE.md sections 3 and 4).

They are printed under the tables this package measures (:mod:`enfpde.benchmark`, experiments/) so that a
reader sees both at once. They are the papers' own figures, measured with the papers' code and protocols;
each table says which protocol it belongs to.
"""

from __future__ import annotations

__all__ = ["PAPER_TABLES", "paper_table"]

_NAVIER_STOKES = """\
ENF-PDE paper, Navier-Stokes on the torus (released protocol: 16 train / 16 test trajectories, 400 + 1600
epochs), MSE:

| model | t_in train | t_out train | t_in test | t_out test |
|---|---|---|---|---|
| FNO | 9.43e-05 | 2.11e-03 | 8.44e-05 | 1.60e-03 |
| G-FNO | 3.13e-05 | 3.49e-04 | 3.15e-05 | 3.52e-04 |
| DINo | 8.20e-03 | 6.85e-02 | 1.11e-02 | 9.08e-02 |
| ENF, absolute position | 1.41e-02 | 1.67e-01 | 2.60e-02 | 2.14e-01 |
| ENF, periodic | 1.45e-03 | 9.14e-03 | 1.57e-03 | 1.16e-02 |

Sparse initial states (test t_in / t_out):

| model | 50 % observed | 5 % observed |
|---|---|---|
| FNO | 3.20e-02 / 1.47e-01 | 3.84e-01 / 7.07e-01 |
| G-FNO | 2.32e-02 / 1.01e-01 | 3.40e-01 / 6.47e-01 |
| DINo | 3.74e-02 / 2.83e-01 | 3.94e-02 / 2.91e-01 |
| ENF, periodic | 5.75e-03 / 5.03e-02 | 3.44e-02 / 1.61e-01 |

Zero-shot temporal super-resolution (test t_in / t_out; trained at dtau = 1):

| model | dtau 1 | dtau 0.5 | dtau 0.25 |
|---|---|---|---|
| DINo | 1.19e-02 / 8.82e-02 | 3.85e-02 / 2.19e-01 | 3.98e-02 / 2.22e-01 |
| ENF | 1.76e-03 / 1.42e-02 | 1.86e-03 / 1.49e-02 | 1.91e-03 / 1.52e-02 |
"""

_SHALLOW_WATER = """\
ENF-PDE paper, shallow water on the sphere (512 train / 128 test trajectories, 500 + 1000 epochs), MSE in
the reference's units (metre -> 1/R, second -> 1/3600):

| model | t_in train | t_out train | t_in test | t_out test |
|---|---|---|---|---|
| DINo (train resolution) | 1.75e-04 | 1.36e-03 | 2.01e-04 | 1.37e-03 |
| ENF axial (train resolution) | 9.94e-05 | 1.89e-03 | 1.09e-04 | 1.87e-03 |
| DINo (zero-shot 2x) | 3.03e-04 | 2.03e-03 | 3.37e-04 | 2.03e-03 |
| ENF axial (zero-shot 2x) | 1.58e-04 | 1.96e-03 | 1.61e-04 | 1.93e-03 |
"""

_ERA5 = """\
ENF paper (Table 6), ERA5, reconstruction MSE at T_t and 1-hour forecast MSE at T_t+1:

| model | reconstruction T_t | forecast T_t+1 |
|---|---|---|
| persistence (T_t copied to T_t+1) | — | 2.42e-05 |
| Functa | 5.75e-05 | 3.45e-03 |
| ENF | 8.04e-06 | 9.44e-06 |
"""

# Dataset key (as in experiments/benchmark.py --dataset, plus era5) -> the published table.
PAPER_TABLES = {"ns": _NAVIER_STOKES, "swe": _SHALLOW_WATER, "era5": _ERA5}


def paper_table(dataset: str) -> str:
    """The published table of ``dataset`` (``ns``, ``swe`` or ``era5``) as markdown.

    Raises:
        ValueError: an unknown dataset key.
    """
    if dataset not in PAPER_TABLES:
        raise ValueError(f"no published numbers for {dataset!r}; known: {sorted(PAPER_TABLES)}.")
    return PAPER_TABLES[dataset]
