"""The Navier-Stokes model shipped in the repository (the `cpu_3h_fit6` preset's run, forecasting with the quarter-turn
ensemble) loads from a clean clone and forecasts: shapes and finiteness only; its accuracy is measured in
experiments/results/navier_stokes_cpu_3h_fit6_quarter_turns.md."""

from pathlib import Path

import numpy as np
import xarray as xr

from enfpde.forecaster import Forecaster

SHIPPED = Path(__file__).resolve().parents[1] / "experiments" / "results" / "navier_stokes_cpu_3h_fit6_quarter_turns" / "model"


def test_the_shipped_model_forecasts_an_initial_state_at_other_times_and_resolution():
    model = Forecaster.load(SHIPPED, batch_size=2)
    assert model.variables == ("vorticity",)
    assert model.ensemble == "quarter_turns"  # its config forecasts with the quarter-turn ensemble
    n = 64
    y, x = np.meshgrid(np.arange(n) / n, np.arange(n) / n, indexing="ij")
    vorticity = np.sin(2 * np.pi * x) * np.cos(4 * np.pi * y) + 0.5 * np.sin(2 * np.pi * (x + y))  # [y, x]
    initial = xr.Dataset(
        {"vorticity": (("trajectory", "y", "x"), np.stack([vorticity, -vorticity.T]).astype(np.float32))},
        coords={"trajectory": [0, 1], "y": np.arange(n) / n, "x": np.arange(n) / n},
    )
    out = model.forecast(initial, [0.0, 0.5, 3.0], at={"y": np.arange(32) / 32, "x": np.arange(48) / 48})
    assert out.vorticity.dims == ("trajectory", "time", "y", "x")
    assert out.vorticity.shape == (2, 3, 32, 48)
    assert np.isfinite(out.vorticity.values).all()
    np.testing.assert_allclose(out.lead_time.values, [0.0, 0.5, 3.0])
