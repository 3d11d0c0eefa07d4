"""The trajectory schema, normalisation and batches (enfpde.data.trajectories)."""

import numpy as np
import pytest
import xarray as xr

from enfpde.data.trajectories import BatchSampler, Normalizer, SchemaError, TrajectoryDataset, check_monotone_times
from enfpde.testing import advected_waves_dataset


@pytest.fixture(scope="module")
def waves():
    return advected_waves_dataset(num_trajectories=5, num_frames=4, resolution=6)


def test_grid_dataset_flattens_in_dimension_order(waves):
    data = TrajectoryDataset.from_xarray(waves)
    assert data.values.shape == (5, 4, 36, 1) and data.coords.shape == (36, 2)
    assert data.axes == ("y", "x") and data.grid_shape == (6, 6) and data.variables == ("u",)
    # point m = (iy, ix) in row-major order: coords are (y, x) and the values agree with the grid.
    m = 2 * 6 + 3
    np.testing.assert_allclose(data.coords[m], [waves.y[2], waves.x[3]])
    np.testing.assert_array_equal(data.values[1, 2, m, 0], waves.u.values[1, 2, 2, 3])
    assert data.mask.all()


def test_netcdf_and_zarr_read_identically(waves, tmp_path):
    waves.to_netcdf(tmp_path / "w.nc")
    waves.to_zarr(tmp_path / "w.zarr")
    a, b = TrajectoryDataset.open(tmp_path / "w.nc"), TrajectoryDataset.open(tmp_path / "w.zarr")
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.times, b.times)
    # to_xarray inverts from_xarray
    xr.testing.assert_allclose(a.to_xarray()["u"], waves["u"].drop_vars("trajectory"))


def test_scattered_points_and_missing_values(waves):
    stacked = waves.stack(point=("y", "x")).reset_index("point")
    assert stacked.u.dims == ("trajectory", "time", "point")
    stacked["u"] = stacked.u.where(stacked.x != stacked.x[0])  # NaN = not observed
    data = TrajectoryDataset.from_xarray(stacked)
    assert data.grid_shape is None and data.axes == ("y", "x")
    assert data.mask.sum() == data.mask.size - 5 * 4 * 6
    stats = data.fit_normalizer()
    assert np.isfinite(stats.mean).all() and np.isfinite(stats.std).all()


def test_single_trajectory_without_trajectory_dim(waves):
    data = TrajectoryDataset.from_xarray(waves.isel(trajectory=0))
    assert data.values.shape[:2] == (1, 4)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda d: d.rename(time="t"), SchemaError, "no 'time' dimension"),
        (lambda d: d.rename(x="lon"), SchemaError, "unrecognised spatial dimensions"),
        (lambda d: d.assign_coords(time=[0.0, 2.0, 1.0, 3.0]), ValueError, "strictly increasing"),
        (lambda d: d.assign(v=d.u.transpose("trajectory", "time", "x", "y")), SchemaError, "has dimensions"),
    ],
)
def test_schema_errors(waves, mutate, error, message):
    with pytest.raises(error, match=message):
        TrajectoryDataset.from_xarray(mutate(waves))


def test_unknown_variable_and_missing_file(waves, tmp_path):
    with pytest.raises(KeyError, match=r"unknown variable\(s\) \['vorticity'\].*available: \['u'\]"):
        TrajectoryDataset.from_xarray(waves, ["vorticity"])
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        TrajectoryDataset.open(tmp_path / "absent.nc")


def test_monotone_times():
    check_monotone_times(np.array([0.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match="finite"):
        check_monotone_times(np.array([0.0, np.nan]))


def test_normalizer_round_trip():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, size=(4, 5, 100, 2)).astype(np.float32)
    stats = Normalizer.fit(values)
    z = stats.normalize(values)
    np.testing.assert_allclose(z.reshape(-1, 2).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.reshape(-1, 2).std(0), 1, atol=1e-5)
    again = Normalizer.from_dict(stats.to_dict())
    np.testing.assert_allclose(again.denormalize(z), values, rtol=1e-5, atol=1e-5)


def test_batch_sampler_is_a_pure_function_of_the_step(waves):
    data = TrajectoryDataset.from_xarray(waves)
    sampler = BatchSampler(data, data.fit_normalizer(), batch_size=2, num_points=10, frames=slice(0, 3), seed=7)
    assert sampler.steps_per_epoch == 2  # 5 trajectories, incomplete batch dropped
    a, b = sampler(3), BatchSampler(data, data.fit_normalizer(), 2, 10, slice(0, 3), seed=7)(3)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.coords, b.coords)
    assert a.values.shape == (2, 3, 10, 1) and a.mask.shape == (2, 3, 10) and a.coords.shape == (10, 2)
    # One epoch visits distinct trajectories; points differ between steps.
    epoch = np.concatenate([sampler(s).trajectories for s in range(2)])
    assert len(set(epoch.tolist())) == 4
    assert not np.array_equal(sampler(0).coords, sampler(1).coords)
    with pytest.raises(ValueError, match="exceeds"):
        BatchSampler(data, data.fit_normalizer(), batch_size=6, num_points=None)
