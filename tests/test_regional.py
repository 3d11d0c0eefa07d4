"""Regional domains on the sphere: a latitude-longitude box from the data's points, latents laid over it,
steerability kept, and regional downloads (netCDF and GRIB) read as a box."""

import jax
import numpy as np
import pytest
from flax import nnx

from enfpde import EquivariantNeuralField
from enfpde import geometry as G
from enfpde.config import ConfigError, load_config
from enfpde.data import era5
from enfpde.encoder import MetaSGDEncoder
from enfpde.forecaster import make_geometry
from enfpde.geometry import LatLonBox
from enfpde.testing import assert_steerable, random_latents
from test_era5_data import _grib_missing, _synthetic_raw, write_cds_new, write_grib

SPHERES = [G.Sphere, G.AxialSphere, lambda region: G.AbsolutePosition(G.Sphere(region=region))]


def grid_points(lat, lon) -> np.ndarray:
    return np.stack(np.meshgrid(lat, lon, indexing="ij"), -1).reshape(-1, 2)


def test_the_box_of_a_download_crossing_the_meridian_a_band_and_the_globe():
    # A CDS `area` of [52, -10, 44, 5] at 0.25 degrees: longitudes -10 ... 5 (written 350 ... 5 by some tools).
    box = LatLonBox.around(grid_points(np.arange(44, 52.001, 0.25), np.arange(-10, 5.001, 0.25)))
    assert (box.south, box.north, box.west, box.lon_extent) == pytest.approx((43.875, 52.125, 349.875, 15.25))
    assert box.contains([[48.0, -5.0], [48.0, 355.0], [44.0, 5.0]]).all()
    assert not box.contains([[48.0, 6.0], [43.0, 0.0], [48.0, 180.0]]).any()
    band = LatLonBox.around(grid_points(np.linspace(20, 70, 21), np.arange(0, 360, 3.0)))
    assert (band.south, band.north, band.lon_extent) == pytest.approx((18.75, 71.25, 360.0))
    assert LatLonBox.around(grid_points(np.linspace(-90, 90, 61), np.arange(0, 360, 3.0))) is None
    for bad in ([10, 5, 0, 20], [-95, 5, 0, 20], [0, 10, 0, float("nan")], [0, 10, 20]):
        with pytest.raises(ValueError, match="region"):
            LatLonBox.from_list(bad)


@pytest.mark.parametrize("make", SPHERES, ids=["sphere", "axial", "absolute"])
def test_latents_lie_in_the_box_spaced_for_it(make):
    region = (36.0, 60.0, 350.0, 25.0)  # crosses 0 degrees longitude
    geometry = make(region)
    box = LatLonBox(*region)
    poses = geometry.initial_poses(12)
    latlon = np.asarray(geometry.coords_to_user(poses))
    assert box.contains(latlon).all()
    n_lat, n_lon = box.grid_shape(12)
    assert len(np.unique(latlon[:, 0].round(4))) == n_lat and len(np.unique(latlon[:, 1].round(4))) == n_lon
    spacing = geometry.latent_spacing(12)
    assert spacing == pytest.approx(np.sqrt(box.area / 12))
    assert spacing < 0.2 * G.Sphere().latent_spacing(12)  # spaced for the box, not the globe
    # Nearest neighbours are about one spacing apart (square cells).
    unit = np.asarray(poses)
    angles = np.arccos(np.clip(unit @ unit.T, -1, 1)) + 10 * np.eye(12)
    np.testing.assert_allclose(angles.min(1), spacing, rtol=0.35)
    samples = np.asarray(geometry.coords_to_user(geometry.sample_coords(jax.random.key(0), 500)))
    assert box.contains(samples).all()


@pytest.mark.parametrize("make", SPHERES[:2], ids=["sphere", "axial"])
def test_the_decoder_of_a_regional_model_stays_steerable(make):
    """The decoder sees poses only through bi-invariants, so every rotation of the group still commutes with it;
    only the initial arrangement is regional."""
    geometry = make((36.0, 60.0, 350.0, 25.0))
    field = EquivariantNeuralField(geometry, num_out=2, latent_dim=8, num_hidden=32, query_std=0.5, value_std=0.5,
                                   rngs=nnx.Rngs(0))
    kz, kx, kg = jax.random.split(jax.random.key(1), 3)
    z = random_latents(geometry, kz, batch=2, num_latents=6, latent_dim=8)
    assert_steerable(field, z, geometry.sample_coords(kx, 40), kg, rtol=1e-5)


def test_a_full_band_keeps_equivariance_under_the_rotations_of_its_arrangement():
    """Axial sphere on the band 20-70 N: rotating the observed field by the arrangement's longitude step gives
    the rotated latents (the fit commutes with that rotation); a box that is not a band has no such rotation."""
    geometry = G.AxialSphere(region=(20.0, 70.0, 0.0, 360.0))
    step = geometry.arrangement_symmetry_deg(16)
    assert step == 360.0 / LatLonBox(20.0, 70.0, 0.0, 360.0).grid_shape(16)[1]
    assert G.AxialSphere(region=(20.0, 70.0, 350.0, 25.0)).arrangement_symmetry_deg(16) is None
    field = EquivariantNeuralField(geometry, num_out=1, latent_dim=8, num_hidden=32, query_std=0.5, value_std=0.5,
                                   rngs=nnx.Rngs(0))
    encoder = MetaSGDEncoder(geometry, num_latents=16, latent_dim=8)
    coords = geometry.sample_coords(jax.random.key(2), 300)
    values = jax.random.normal(jax.random.key(3), (1, 300, 1))
    g = jax.numpy.deg2rad(step)
    z = encoder(field, coords, values)
    z_rotated = encoder(field, geometry.act_on_coords(g, coords), values)
    # The rotated arrangement is the arrangement with its columns shifted by one.
    np.testing.assert_allclose(
        np.sort(np.asarray(geometry.act_on_poses(g, z.poses[0])), axis=0),
        np.sort(np.asarray(z_rotated.poses[0]), axis=0), atol=2e-4,
    )
    np.testing.assert_allclose(np.sort(np.asarray(z.contexts[0]), 0), np.sort(np.asarray(z_rotated.contexts[0]), 0), atol=2e-4)


def test_region_in_the_config():
    config = load_config(None, ["data.geometry=axial_sphere", "data.region=[36, 60, 350, 25]"])
    assert make_geometry(config.data).region == (36.0, 60.0, 350.0, 25.0)
    with pytest.raises(ConfigError, match="data.region is a latitude-longitude box for the sphere geometries"):
        load_config(None, ["data.region=[36, 60, 350, 25]"])  # the torus
    with pytest.raises(ConfigError, match="south < north"):
        load_config(None, ["data.geometry=sphere", "data.region=[60, 36, 350, 25]"])


@pytest.mark.parametrize("kind", ["netcdf", "grib"])
def test_a_regional_download_reads_as_its_box(kind, tmp_path):
    """A CDS download of `area` [60, 0, 36, 30] (north, west, south, east) as netCDF and as GRIB (eccodes)."""
    raw = _synthetic_raw().sel(latitude=slice(60, 36), longitude=slice(0, 30))
    if kind == "grib":
        if _grib_missing() is not None:
            pytest.skip(_grib_missing())
        path = write_grib(raw, tmp_path / "area.grib")
    else:
        path = write_cds_new(raw, tmp_path / "area.nc")
    ds = era5.open_era5(path)
    fields = era5.to_fields(ds.isel(time=[0]))
    latlon = grid_points(fields["latitude"].values, fields["longitude"].values)
    box = LatLonBox.around(latlon)
    assert (box.south, box.north, box.west, box.east) == pytest.approx((34.5, 61.5, 358.5, 391.5))
    assert box.contains(latlon).all()
    geometry = G.AxialSphere(region=tuple(box.as_list()))
    assert box.contains(np.asarray(geometry.coords_to_user(geometry.initial_poses(16)))).all()


@pytest.fixture(scope="module")
def regional_experiment(tmp_path_factory):
    """experiments/era5.py on a regional cut (30-66 N, 30 W - 42 E) of the ERA5 sample (the real file beside the
    project if present, else its synthetic GRIB stand-in), axial sphere, tiny sizes."""
    from conftest import TINY_OVERRIDES
    from test_era5_data import _sample_path
    from test_era5_experiment import _experiment_module

    root = tmp_path_factory.mktemp("regional")
    sample = _sample_path()
    if sample is None:
        if _grib_missing() is not None:
            pytest.skip(_grib_missing())
        sample = write_grib(_synthetic_raw(), root / "sample.grib")
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("data.horizon")]
    _experiment_module().main([
        "--preset", "quick", "--source", str(sample), "--data-dir", str(root / "data"), "--run-root", str(root / "runs"),
        "--table", str(root / "table.md"), "--quiet", "--geometries=axial_sphere",
        "era5.lat_range=[30, 66]", "era5.lon_range=[-30, 42]",
        *tiny, "model.num_latents=6", "eval.batch_size=5", "eval.sparse_fractions=[0.5]",
    ])
    return root


def test_a_regional_cut_of_the_sample_trains_with_its_box_and_forecasts_on_it(regional_experiment, tmp_path):
    import xarray as xr

    from enfpde.config import config_from_yaml
    from enfpde.experiment import forecast_file
    from enfpde.forecaster import Forecaster

    run = regional_experiment / "runs" / "era5_quick_axial_sphere"
    region = config_from_yaml(run / "config.yaml").data.region  # derived from the data, saved with the model
    np.testing.assert_allclose(region, [28.5, 67.5, 328.5, 403.5])
    model = Forecaster.load(run)
    assert model.geometry.region == tuple(region)
    poses = model.modules[1].initial(1).poses[0]
    assert LatLonBox(*region).contains(np.asarray(model.geometry.coords_to_user(poses))).all()
    # A forecast from a test state lands on the box's grid.
    with xr.open_dataset(regional_experiment / "data" / "test.nc") as test:
        test.isel(trajectory=[0], time=[0]).to_netcdf(tmp_path / "state.nc")
        lat, lon = test["latitude"].values, test["longitude"].values
    assert lat.min() == 30.0 and lat.max() == 66.0 and LatLonBox(*region).contains(grid_points(lat, lon)).all()
    out = forecast_file(run, tmp_path / "state.nc", tmp_path / "fc.nc", times=[0.0, 12.0])
    with xr.open_dataset(out) as fc:
        np.testing.assert_array_equal(fc["latitude"].values, lat)
        np.testing.assert_array_equal(fc["longitude"].values, lon)
        assert fc["t850"].shape == (1, 2, lat.size, lon.size) and np.isfinite(fc["t850"].values).all()
    table = (regional_experiment / "table.md").read_text()
    assert "## RMSE at T_t+12 h (test), each field in its own units: plain / latitude-weighted" in table


def write_hourly_area_netcdf(path):
    """Two days of hourly single-level fields (t2m, u10, v10, msl) over the CDS `area` [52, -5, 44, 8] at 0.5
    degrees, as the CDS writes netCDF since 2024 (valid_time, latitude north to south, longitudes -5 ... 8)."""
    import pandas as pd
    import xarray as xr

    times = pd.date_range("2020-01-01T00", periods=48, freq="h").values
    lat, lon = np.arange(52.0, 43.9, -0.5), np.arange(-5.0, 8.01, 0.5)
    hours = np.arange(times.size)[:, None, None]
    la, lo = np.deg2rad(lat)[None, :, None], np.deg2rad(lon)[None, None, :]
    diurnal = np.sin(2 * np.pi * hours / 24)
    front = np.tanh((lo - np.deg2rad(-5 + 0.4 * hours)) * 8)
    fields = {
        "t2m": (278 - 20 * (la - np.deg2rad(48)) + 3 * diurnal + 2 * front, "K"),
        "u10": (5 + 2 * np.cos(3 * lo) + front, "m s**-1"),
        "v10": (-1 + 2 * np.sin(2 * la) + 0.5 * diurnal + 0 * lo, "m s**-1"),
        "msl": (101300 + 800 * np.sin(3 * lo - 0.1 * hours) + 0 * la, "Pa"),
    }
    dims = ("valid_time", "latitude", "longitude")
    ds = xr.Dataset(
        {name: (dims, np.broadcast_to(v, (times.size, lat.size, lon.size)).astype(np.float32), {"units": u})
         for name, (v, u) in fields.items()},
        coords={"valid_time": times, "latitude": lat, "longitude": lon},
    )
    ds = ds.assign_coords(expver=("valid_time", np.array(["0001"] * times.size)))
    ds.to_netcdf(path)
    return path


def test_the_regional_preset_on_an_hourly_single_level_area_download(tmp_path):
    """experiments/era5.py --preset regional on a synthetic CDS `area` netCDF: the box is the download's, the
    latents lie in it, and the table has the per-field RMSE and MSE in their units beside persistence."""
    from conftest import TINY_OVERRIDES
    from enfpde.config import config_from_yaml
    from enfpde.forecaster import Forecaster
    from test_era5_experiment import _experiment_module

    source = write_hourly_area_netcdf(tmp_path / "area.nc")
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("data.horizon")]
    _experiment_module().main([
        "--preset", "regional", "--source", str(source), "--data-dir", str(tmp_path / "data"),
        "--run-root", str(tmp_path / "runs"), "--table", str(tmp_path / "table.md"), "--quiet", "--geometries=axial_sphere",
        'era5.splits={train: {start: "2020-01-01T00", end: "2020-01-01T23"}, test: {start: "2020-01-02T00", end: "2020-01-02T23"}}',
        *tiny, "model.num_latents=4",
    ])
    run = tmp_path / "runs" / "era5_regional_axial_sphere"
    region = config_from_yaml(run / "config.yaml").data.region
    np.testing.assert_allclose(region, [43.75, 52.25, 354.75, 368.25])
    model = Forecaster.load(run)
    assert model.variables == ("t2m", "u10", "v10", "msl")
    assert LatLonBox(*region).contains(np.asarray(model.geometry.coords_to_user(model.modules[1].initial(1).poses[0]))).all()
    table = (tmp_path / "table.md").read_text()
    rmse = table.split("## RMSE at T_t+1 h (test), each field in its own units: plain / latitude-weighted")[1].split("##")[0]
    assert "t2m [K]" in rmse and "msl [Pa]" in rmse and "| persistence |" in rmse
