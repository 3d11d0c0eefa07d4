"""Forecasts on xarray data and the `enfpde forecast` command: outputs, resolutions, validation."""

import numpy as np
import pytest
import xarray as xr

from enfpde.cli import main as cli_main


# One set of lead times and grids throughout: every distinct shape is a separate compilation.
TIMES = [0.0, 0.5, 1.0, 3.0]


def test_forecast_on_the_input_grid_matches_predict(forecaster, initial):
    times = TIMES
    out = forecaster.forecast(initial, times)
    assert out.u.dims == ("trajectory", "time", "y", "x") and out.u.shape == (3, 4, 8, 8)
    np.testing.assert_allclose(out.lead_time, times)
    np.testing.assert_allclose(out.time, initial.time.values[0] + np.asarray(times))
    assert out.u.attrs["units"] == "1"
    coords = np.stack(np.meshgrid(initial.y, initial.x, indexing="ij"), -1).reshape(-1, 2)
    direct = forecaster.predict(coords, initial.u.values[:, 0].reshape(3, -1, 1), times)
    np.testing.assert_allclose(out.u.values.reshape(3, 4, -1), direct[..., 0], rtol=1e-6)
    # Batching (2 per call, the last chunk padded) does not change a trajectory's forecast.
    alone = forecaster.forecast(initial.isel(trajectory=[2]), times)
    np.testing.assert_allclose(alone.u.values[0], out.u.values[2], rtol=1e-5, atol=1e-6)


def test_other_grids_and_scattered_points_agree(forecaster, initial):
    fine_axis = np.arange(16) / 16
    fine = forecaster.forecast(initial, TIMES, at={"y": fine_axis, "x": fine_axis})
    assert fine.u.shape == (3, 4, 16, 16)
    # Scattered query points at every other fine grid node give the same values as the fine grid there.
    points = xr.Dataset(coords={"y": ("point", fine_axis[::2]), "x": ("point", fine_axis[::2])})
    scattered = forecaster.forecast(initial, TIMES, at=points)
    assert scattered.u.dims == ("trajectory", "time", "point")
    diagonal = fine.u.values[:, :, np.arange(0, 16, 2), np.arange(0, 16, 2)]
    np.testing.assert_allclose(scattered.u.values, diagonal, rtol=1e-5, atol=1e-6)
    # An initial state given on scattered points is accepted too.
    stacked = initial.isel(time=0).stack(point=("y", "x")).reset_index("point")
    from_points = forecaster.forecast(stacked, TIMES, at={"y": initial.y.values, "x": initial.x.values})
    np.testing.assert_allclose(from_points.u.values, forecaster.forecast(initial, TIMES).u.values, rtol=1e-5, atol=1e-6)


def test_masked_missing_points(forecaster, initial):
    holes = initial.copy()
    observed = xr.ones_like(initial.u.isel(trajectory=0, time=0), dtype=bool)
    observed[::2, :] = False
    holes["u"] = initial.u.where(observed)
    holes["mask"] = observed
    out = forecaster.forecast(holes, TIMES)
    assert np.isfinite(out.u.values).all()
    assert not np.allclose(out.u.values, forecaster.forecast(initial, TIMES).u.values)


@pytest.mark.parametrize(
    "change, times, error, message",
    [
        (lambda d: d.rename(u="v"), [0.0], KeyError, r"lacks variable\(s\) \['u'\]"),
        (lambda d: d.transpose("trajectory", "time", "x", "y"), [0.0], ValueError, r"do not match the model's grid \['y', 'x'\]"),
        (lambda d: d.assign(u=d.u.where(d.x > 0.1)), [0.0], ValueError, "non-finite value.*add a boolean 'mask'"),
        (lambda d: d, [0.0, 2.0, 1.0], ValueError, "strictly increasing"),
        (lambda d: d, [-1.0, 2.0], ValueError, ">= 0"),
        (lambda d: d, [], ValueError, "non-empty"),
        (lambda d: xr.concat([d, d.assign_coords(time=d.time + 1)], "time"), [0.0], ValueError, "has 2 times"),
    ],
)
def test_bad_input_errors(forecaster, initial, change, times, error, message):
    with pytest.raises(error, match=message):
        forecaster.forecast(change(initial), times)


def test_unknown_output_variable(forecaster, initial):
    with pytest.raises(KeyError, match=r"unknown variable\(s\) \['w'\].*forecasts \['u'\]"):
        forecaster.forecast(initial, [0.0], variables=["w"])


def test_forecast_command_writes_netcdf_and_never_overwrites(tiny_run, tiny_data, tmp_path, capsys):
    out = tmp_path / "forecast.nc"
    args = ["forecast", str(tiny_run), str(tiny_data / "test.nc"), "-o", str(out), "--times", "0,0.5,1,3", "--resolution", "16x12"]
    assert cli_main(args) == 0
    written = xr.open_dataset(out)
    assert written.u.shape == (3, 4, 16, 12)
    np.testing.assert_allclose(written.lead_time, TIMES)
    # --at: the output grid of another file (16 x 16, the shape compiled by the grid test above).
    axis = np.arange(16) / 16
    xr.Dataset(coords={"y": axis, "x": axis}).to_netcdf(tmp_path / "grid.nc")
    at_args = ["forecast", str(tiny_run), str(tiny_data / "test.nc"), "-o", str(tmp_path / "at.nc"), "--times", "0,0.5,1,3"]
    assert cli_main(at_args + ["--at", str(tmp_path / "grid.nc")]) == 0
    np.testing.assert_allclose(xr.open_dataset(tmp_path / "at.nc").y, axis)
    before = out.read_bytes()
    assert cli_main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    # Bad input writes nothing.
    bad = tmp_path / "bad.nc"
    xr.open_dataset(tiny_data / "test.nc").rename(u="v").to_netcdf(bad)
    target = tmp_path / "never.nc"
    assert cli_main(["forecast", str(tiny_run), str(bad), "-o", str(target), "--times", "0,1"]) == 2
    assert "lacks variable" in capsys.readouterr().err and not target.exists()
    assert cli_main(["forecast", str(tiny_run), str(tiny_data / "test.nc"), "-o", str(target), "--times", "1,0"]) == 2
    assert "strictly increasing" in capsys.readouterr().err and not target.exists()
    assert cli_main(["forecast", str(tiny_run), str(tmp_path / "absent.nc"), "-o", str(target), "--times", "0"]) == 2
    assert "no dataset at" in capsys.readouterr().err and not target.exists()
