"""experiments/era5.py and `enfpde forecast` on ERA5 end to end, on a small synthetic hourly archive in the
WeatherBench2 zarr layout (long names, latitude ascending): data files cut and reused, both sphere geometries
trained (tiny sizes) and evaluated, one table; a forecast from the raw archive at a chosen analysis time."""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import enfpde  # noqa: F401  (XLA settings first)

from conftest import TINY_OVERRIDES
from enfpde.config import REPOSITORY_ROOT
from enfpde.data import era5
from enfpde.experiment import forecast_file

TIMES = pd.date_range("2020-01-01T00", periods=30, freq="h").values
LAT = np.linspace(-90.0, 90.0, 13)
LON = np.arange(0.0, 360.0, 15.0)
SPLITS = (
    'era5.splits={train: {start: "2020-01-01T00", end: "2020-01-01T19"}, '
    'test: {start: "2020-01-01T20", end: "2020-01-02T05"}}'
)


def _experiment_module():
    spec = importlib.util.spec_from_file_location("era5_experiment", REPOSITORY_ROOT / "experiments" / "era5.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_hourly_wb2(path):
    """Geopotential and temperature at 500 and 850 hPa: a zonal-mean profile plus a wave travelling east at
    15 degrees per hour, so one hour moves it by one grid column."""
    hours = (TIMES - TIMES[0]) / np.timedelta64(1, "h")
    lat, lon = np.deg2rad(LAT)[None, :, None], np.deg2rad(LON)[None, None, :]
    phase = 3 * lon - np.deg2rad(15.0) * 3 * hours[:, None, None]
    wave = np.cos(lat) ** 2 * np.cos(phase)
    levels = np.array([500, 850])
    z = np.stack([5.5e4 - 4e3 * np.sin(lat) ** 2 + 600 * wave, 1.4e4 - 1e3 * np.sin(lat) ** 2 + 200 * wave], axis=1)
    t = np.stack([255 - 25 * np.sin(lat) ** 2 + 3 * wave, 285 - 30 * np.sin(lat) ** 2 + 4 * wave], axis=1)
    dims = ("time", "level", "latitude", "longitude")
    ds = xr.Dataset(
        {
            "geopotential": (dims, z.astype(np.float32), {"units": "m2 s-2"}),
            "temperature": (dims, t.astype(np.float32), {"units": "K"}),
        },
        coords={"time": TIMES, "level": levels, "latitude": LAT, "longitude": LON},
    )
    ds.to_zarr(path, mode="w", zarr_format=2, consolidated=True)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_hourly_wb2(tmp_path_factory.mktemp("era5") / "hourly.zarr")


def _arguments(archive, root, *extra):
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("data.horizon")]
    return [
        "--preset", "hourly", "--source", str(archive), "--data-dir", str(root / "data"), "--run-root", str(root / "runs"),
        "--table", str(root / "table.md"), "--quiet", *extra,
        "era5.coarsen=1", "era5.variables=[z,t]", "era5.start_every_hours=2", SPLITS,
        *tiny, "model.num_latents=6", "eval.batch_size=5", "eval.sparse_fractions=[0.5]",
    ]


@pytest.fixture(scope="module")
def experiment(archive, tmp_path_factory):
    root = tmp_path_factory.mktemp("era5_experiment")
    _experiment_module().main(_arguments(archive, root))
    return root


def test_experiment_cuts_the_archive_and_trains_both_geometries(experiment):
    with xr.open_dataset(experiment / "data" / "train.nc") as train, xr.open_dataset(experiment / "data" / "test.nc") as test:
        assert sorted(train.data_vars) == ["t500", "t850", "z500", "z850"]
        assert train.sizes["trajectory"] == 10 and test.sizes["trajectory"] == 5  # starts every 2 h, 2 frames 1 h apart
        assert train["time"].values.tolist() == [0.0, 1.0]
        assert set(train["valid_time"].values.ravel()).isdisjoint(test["valid_time"].values.ravel())
        stats = era5.read_normalization(train)
    for geometry in ("sphere", "axial_sphere"):
        config = (experiment / "runs" / f"era5_hourly_{geometry}" / "config.yaml").read_text()
        assert f"geometry: {geometry}" in config and "time_unit: 1.0" in config
        metrics = json.loads((experiment / "runs" / f"era5_hourly_{geometry}" / "eval" / "test" / "metrics.json").read_text())
        scales = metrics["protocol"]["variable_scales"]
        variables = metrics["dataset"]["variables"]
        np.testing.assert_allclose(scales, [1.0 / stats[v]["std"] for v in variables])
        assert metrics["protocol"]["horizon_time"] == 2.0  # both frames inside the training horizon
        standard = metrics["settings"]["standard"]
        # Persistence at T_t+1 h: the wave moved one column; its normalised error is positive, at T_t zero.
        assert standard["persistence"]["per_frame"][0] == 0.0 and standard["persistence"]["per_frame"][1] > 1e-3


def test_table_reports_reconstruction_forecast_and_rmse_beside_persistence(experiment):
    text = experiment.joinpath("table.md").read_text()
    assert "| model | T_t (reconstruction) | T_t+1 h |" in text
    for label in ("ENF full rotations", "ENF axial"):
        assert text.count(f"| {label} |") == 6, label  # test, train, other protocols, RMSE, MSE, training
    assert text.count("| persistence |") == 5
    rmse = text.split("## RMSE at T_t+1 h (test), each field in its own units: plain / latitude-weighted")[1].split("##")[0]
    mse = text.split("## MSE at T_t+1 h (test), each field in its own units: plain / latitude-weighted")[1].split("##")[0]
    assert "z500 [m2 s-2]" in rmse and "t850 [K]" in rmse and "t850 [(K)^2]" in mse
    persistence = [float(v) for cell in rmse.split("| persistence |")[1].split("\n")[0].split("|")[:-1] for v in cell.split(" / ")]
    assert len(persistence) == 8 and all(v > 0 for v in persistence)  # plain and latitude-weighted for 4 fields
    assert "Command: `python experiments/era5.py --preset hourly" in text and "ENF paper (Table 6)" in text


def test_existing_files_of_another_config_are_refused(archive, experiment):
    with pytest.raises(SystemExit) as error:
        _experiment_module().main(_arguments(archive, experiment, "--lead-hours", "2"))
    assert error.value.code == 2
    assert (experiment / "data" / "train.nc").exists()  # not replaced


def test_forecast_from_the_raw_archive_at_an_analysis_time(archive, experiment, tmp_path):
    run = experiment / "runs" / "era5_hourly_sphere"
    out = forecast_file(run, archive, tmp_path / "fc.nc", times=[0.0, 1.0, 3.0], init_time="2020-01-01T22")
    with xr.open_dataset(out) as fc:
        assert sorted(fc.data_vars) == ["t500", "t850", "z500", "z850"]
        assert fc["z500"].dims == ("trajectory", "time", "latitude", "longitude") and fc["z500"].shape == (1, 3, 13, 24)
        expected = np.array(["2020-01-01T22", "2020-01-01T23", "2020-01-02T01"], dtype="datetime64[ns]")
        np.testing.assert_array_equal(fc["time"].values, expected)
        assert np.isfinite(fc["z500"].values).all()
    # The same state from the cut test file gives the same forecast as from the raw archive.
    with xr.open_dataset(experiment / "data" / "test.nc") as test:
        start = int(np.flatnonzero(test["init_time"].values == np.datetime64("2020-01-01T22"))[0])
        test.isel(trajectory=[start], time=[0]).to_netcdf(tmp_path / "state.nc")
    again = forecast_file(run, tmp_path / "state.nc", tmp_path / "fc2.nc", times=[0.0, 1.0, 3.0])
    with xr.open_dataset(out) as a, xr.open_dataset(again) as b:
        np.testing.assert_allclose(a["z500"].values, b["z500"].values, rtol=1e-5)


def test_forecast_errors_name_the_missing_time_and_the_misused_option(archive, experiment, tmp_path):
    run = experiment / "runs" / "era5_hourly_sphere"
    with pytest.raises(era5.Era5Error, match="2021"):
        forecast_file(run, archive, tmp_path / "x.nc", times=[1.0], init_time="2021-06-01T00")
    with pytest.raises(ValueError, match="--init-time"):
        forecast_file(run, experiment / "data" / "test.nc", tmp_path / "y.nc", times=[1.0], init_time="2020-01-01T22")
    assert not (tmp_path / "x.nc").exists() and not (tmp_path / "y.nc").exists()


def test_the_default_hourly_preset_needs_a_source(capsys):
    with pytest.raises(SystemExit) as error:
        _experiment_module().main([])
    assert error.value.code == 2 and "give --source PATH" in capsys.readouterr().err
