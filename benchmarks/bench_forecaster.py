"""Speed and memory of the user-facing paths added with the training loop and the xarray interface.

Cases (each in its own process):
  batches     one training batch of the paper preset: 8 trajectories x 10 frames x 512 random points of a
              64 x 64 grid, normalised (the host-side work of every training step).
  forecast    `Forecaster.forecast` on an xarray Dataset: 8 initial states on the 64 x 64 grid, 77 lead times
              (every 0.25 up to 19), decoded on a 128 x 128 grid (twice the training resolution); paper model.
  evaluate    `enfpde.evaluation.evaluate` of the paper model on 16 test trajectories (standard protocol,
              sparse 50 % and 5 %, shifted), persistence included.
  shipped-once, shipped-quarter-turns
              the `forecast` case's call on the shipped Navier-Stokes model
              (experiments/results/navier_stokes_cpu_3h_fit6_quarter_turns/model), forecasting once and with its
              quarter-turn ensemble (model.forecast_ensemble, four forecasts averaged).

The model of the first three is the paper preset's, freshly initialised (timings do not depend on the weights).

Usage: python benchmarks/bench_forecaster.py [--cases batches forecast evaluate shipped-once shipped-quarter-turns] [--repeats N]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from bench_enf import measure, report

CASES = ("batches", "forecast", "evaluate", "shipped-once", "shipped-quarter-turns")
SHIPPED = Path(__file__).resolve().parents[1] / "experiments" / "results" / "navier_stokes_cpu_3h_fit6_quarter_turns" / "model"


def _navier_stokes_like(num_trajectories: int, num_frames: int = 20, resolution: int = 64):
    """A trajectory dataset with the shapes of the Navier-Stokes protocol (random values)."""
    import xarray as xr

    rng = np.random.default_rng(0)
    axis = np.arange(resolution) / resolution
    values = rng.normal(size=(num_trajectories, num_frames, resolution, resolution)).astype(np.float32)
    return xr.Dataset(
        {"vorticity": (("trajectory", "time", "y", "x"), values, {"units": "1"})},
        coords={"time": np.arange(float(num_frames)), "y": axis, "x": axis},
    )


def _paper_forecaster(batch_size: int = 8):
    from enfpde.config import load_config
    from enfpde.data.trajectories import Normalizer
    from enfpde.forecaster import Forecaster, build_modules, make_geometry

    config = load_config("paper")
    modules = build_modules(config.model, make_geometry(config.data), 1, seed=0)
    metadata = {
        "variables": ["vorticity"], "units": ["1"], "axes": ["y", "x"], "time_units": "1",
        "normalizer": Normalizer(np.zeros(1, np.float32), np.ones(1, np.float32)).to_dict(),
        "horizon_time": 10.0,
    }
    return Forecaster(config, metadata, *modules, batch_size=batch_size)


def run_case(name: str, repeats: int) -> dict:
    from enfpde.data.trajectories import BatchSampler, TrajectoryDataset

    if name == "batches":
        data = TrajectoryDataset.from_xarray(_navier_stokes_like(16))
        sampler = BatchSampler(data, data.fit_normalizer(), batch_size=8, num_points=512, frames=slice(0, 10))
        step = [0]

        def one():
            sampler(step[0])
            step[0] += 1
    elif name in ("forecast", "shipped-once", "shipped-quarter-turns"):
        from enfpde.forecaster import Forecaster

        if name == "forecast":
            model = _paper_forecaster()
        else:
            model = Forecaster.load(SHIPPED, ensemble="none" if name == "shipped-once" else "quarter_turns")
        initial = _navier_stokes_like(8).isel(time=[0])
        fine = np.arange(128) / 128
        times = np.arange(0.0, 19.01, 0.25)

        def one():
            model.forecast(initial, times, at={"y": fine, "x": fine})
    elif name == "evaluate":
        from enfpde.evaluation import evaluate

        model = _paper_forecaster()
        test = TrajectoryDataset.from_xarray(_navier_stokes_like(16))

        def one():
            evaluate(model, test, horizon_time=10.0, periodic_axes=("y", "x"), progress=False)
    else:
        raise ValueError(f"unknown case {name!r}; expected one of {CASES}")
    return measure(name, one, repeats)


if __name__ == "__main__":
    report(__file__, "Forecaster and data-path benchmark (paper preset; the shipped model)", "forecaster", CASES, {}, {})
