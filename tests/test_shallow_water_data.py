"""Shallow-water data: the solver's balance, conservation and dissipation, the output grid, coarsening and files.

The physics tests run the protocol's T63 solver for 2 to 14 model days (one compiled call each); the file tests
share one tiny config (T21 on a 64 x 32 grid, a few steps), generated once per module.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from dinosaur import shallow_water as dinosaur_sw

from enfpde.data import shallow_water as sw
from enfpde.data.trajectories import TrajectoryDataset

DATASETS = Path(__file__).parents[1] / "datasets"
DAY_STEPS = 72  # steps of 1200 s in a day

TINY = {
    "generator": "shallow_water",
    "name": "tiny",
    "truncation": 21,
    "latitude_nodes": 32,  # 64 x 32 native grid, 32 x 16 coarse
    "steps_per_snapshot": 6,
    "dropped_snapshots": 1,
    "num_frames": 3,
    "batch_size": 2,
    "splits": {
        "train": {"num_trajectories": 3, "seed_mode": "train"},  # 3 with batch 2: the last batch is padded
        "test": {"num_trajectories": 2, "seed_mode": "test"},
    },
    "native_splits": ["test"],
}


def _norm(fields: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Area-weighted L2 norm over the last two axes ``[lat, lon]`` with quadrature ``weights [lat, lon]``."""
    return np.sqrt(np.einsum("...ij,ij->...", np.asarray(fields, np.float64) ** 2, weights))


def _cell_areas(latitude_deg: np.ndarray) -> np.ndarray:
    """Exact areas (unit sphere, per radian of longitude) of regular cells centred at ``latitude_deg``."""
    half = abs(latitude_deg[1] - latitude_deg[0]) / 2
    return np.abs(np.sin(np.deg2rad(latitude_deg + half)) - np.sin(np.deg2rad(latitude_deg - half)))


# ------------------------------------------------------------------------------------------------ physics


@pytest.fixture(scope="module")
def inviscid_jet():
    """The unperturbed Galewsky jet at T63 without dissipation: (solver, initial state, state after 2 days)."""
    solver = sw.ShallowWaterSolver(dissipation=sw.Hyperdiffusion(0.0))
    state = solver.initial_state(np.zeros(1), np.full(1, 1 / 3), np.full(1, 1 / 15))
    final, _ = solver.advance(state, 1, 2 * DAY_STEPS)
    return solver, state, final


@pytest.fixture(scope="module")
def protocol_run():
    """The protocol solver (T63, hyperdiffusion) on [jet, jet + bump] for 14 days, a record every 2 days.

    Compiled with XLA's optimisations on (the suite turns most of them off, tests/conftest.py): running the 14 days
    is this fixture's cost, not compiling them (32 s with them off, 12 s with them on)."""
    import jax

    from conftest import optimized_compilation

    solver = sw.ShallowWaterSolver()
    state = solver.initial_state(np.array([0.0, 150.0]), np.array([1 / 3, 2 / 9]), np.array([1 / 15, 2 / 45]))
    with optimized_compilation():
        _, records = solver.advance(state, 7, 2 * DAY_STEPS)
        jax.block_until_ready(records)
    return solver, state, records


def test_balanced_jet_stays_steady_for_two_days(inviscid_jet):
    """Without the bump (and without dissipation, which slowly diffuses any jet) the balanced jet is a steady
    solution. Norm: area-weighted L2 over the solver's Gaussian grid (its exact quadrature); the change of h is
    measured against the height anomaly h - mean(h) (about 600 m), not the 10 km total depth, and u against u."""
    solver, state, final = inviscid_jet
    weights = np.asarray(solver.grid.quadrature_weights, np.float64).T  # [lat, lon]
    start, end = solver.nodal_fields(state, solver.grid), solver.nodal_fields(final, solver.grid)
    h0, h1 = np.asarray(start["height"][0], np.float64), np.asarray(end["height"][0], np.float64)
    anomaly = h0 - np.sum(h0 * weights) / weights.sum()
    assert _norm(h1 - h0, weights) / _norm(anomaly, weights) < 1e-3
    u0, u1 = np.asarray(start["u"][0]), np.asarray(end["u"][0])
    assert _norm(u1 - u0, weights) / _norm(u0, weights) < 1e-3
    assert _norm(np.asarray(end["v"][0]), weights) / _norm(u0, weights) < 1e-3  # and it stays zonal
    assert 75 < u0.max() <= 80.0 and _norm(anomaly, weights) > 100  # a real jet with a real balanced height


def test_total_mass_is_conserved(protocol_run):
    """The area integral of h (solver grid, exact quadrature) stays constant to 1e-6 over 14 days, through the
    jet's breakdown."""
    solver, state, records = protocol_run
    mass0 = solver.fluid_volume(state)  # [2]
    mass = solver.fluid_volume(records)  # [2, 7]
    expected = 4 * math.pi * sw.RADIUS**2 * 1e4  # the jet has mean depth H; the bump adds to it
    assert abs(mass0[0] / expected - 1) < 1e-6 and mass0[1] > mass0[0]
    assert np.abs(mass / mass0[:, None] - 1).max() < 1e-6
    assert np.isfinite(records.vorticity).all()


def test_hyperdiffusion_damps_each_mode_at_its_rate(protocol_run):
    """For the zonal jet the advection of vorticity vanishes, so its spectral vorticity decays mode by mode as
    exp(-t nu (l (l + 1) / R^2)^2): checks the hyperdiffusion coefficient and its units (a 7 % change in 2 days)."""
    solver, state, records = protocol_run
    nu = solver.dissipation.coefficient
    l = solver.grid.modal_axes[1]
    z0 = np.asarray(state.vorticity, np.float64)[0, 0]
    z1 = np.asarray(records.vorticity, np.float64)[0, 0, 0]  # after 2 days
    predicted = z0 * np.exp(-2 * 86400 * nu * (l * (l + 1) / sw.RADIUS**2) ** 2)
    assert np.linalg.norm(z1 - z0) / np.linalg.norm(z0) > 0.03
    assert np.linalg.norm(z1 - predicted) / np.linalg.norm(z0) < 1e-3


def test_output_grid_is_an_exact_synthesis_with_si_units():
    """Solid-body rotation u = u0 cos(lat) (vorticity 2 u0 sin(lat) / R) with h = H + dh sin(lat): both are
    in the truncated basis, so the equiangular fields equal the formulas at the equiangular latitudes (Gaussian
    values relabelled, or an interpolation, would be off by about 1 %)."""
    solver = sw.ShallowWaterSolver(truncation=21, latitude_nodes=32)
    grid, specs = solver.grid, solver.specs
    lon, sin_lat = grid.nodal_mesh
    u0, dh = 20.0, 50.0
    second = 1 / specs.dimensionalize(1.0, sw.UNITS.s).magnitude  # nondimensional time unit per second
    metre = 1 / specs.dimensionalize(1.0, sw.UNITS.m).magnitude
    vorticity = grid.to_modal(2 * u0 * sin_lat / sw.RADIUS / second)
    potential = grid.to_modal(specs.g * dh * metre * sin_lat)
    state = dinosaur_sw.State(vorticity[None, None], 0 * vorticity[None, None], potential[None, None])
    fields = {k: np.asarray(v[0]) for k, v in solver.nodal_fields(state).items()}  # [lat, lon]
    lat = np.deg2rad(solver.output_latitudes)[:, None]
    assert fields["u"].shape == (32, 64)
    np.testing.assert_allclose(fields["u"], np.broadcast_to(u0 * np.cos(lat), (32, 64)), rtol=0, atol=1e-5 * u0)
    np.testing.assert_allclose(fields["v"], 0, atol=1e-5 * u0)
    np.testing.assert_allclose(fields["height"], np.broadcast_to(1e4 + dh * np.sin(lat), (32, 64)), rtol=0, atol=2e-3)
    np.testing.assert_allclose(fields["vorticity"], np.broadcast_to(2 * u0 * np.sin(lat) / sw.RADIUS, (32, 64)), rtol=0, atol=1e-5 * u0 / sw.RADIUS)
    np.testing.assert_allclose(solver.output_latitudes, -90 + (np.arange(32) + 0.5) * 180 / 32)
    np.testing.assert_allclose(solver.longitudes, np.arange(64) * 360 / 64)


def test_bump_is_placed_as_specified():
    """The initial height anomaly of jet + bump minus the jet alone is the bump formula (projected on T63):
    centred at longitude 0 and latitude 45 degrees with amplitude hpert cos(45 deg)."""
    solver = sw.ShallowWaterSolver()
    hpert, alpha, beta = 150.0, 4 / 9, 4 / 45  # the widest bump, well resolved at T63
    state = solver.initial_state(np.array([0.0, hpert]), np.array([alpha, alpha]), np.array([beta, beta]))
    h = np.asarray(solver.nodal_fields(state)["height"], np.float64)
    bump = h[1] - h[0]  # [lat, lon] on the equiangular grid
    lat = np.deg2rad(solver.output_latitudes)[:, None]
    lon = np.deg2rad(np.where(solver.longitudes > 180, solver.longitudes - 360, solver.longitudes))[None, :]
    formula = hpert * np.cos(lat) * np.exp(-((lon / alpha) ** 2)) * np.exp(-(((np.pi / 4 - lat) / beta) ** 2))
    assert np.abs(bump - formula).max() < 0.02 * hpert


def test_simulate_does_not_retrace():
    config = sw.load_config(TINY)
    args = (config.num_frames, config.steps_per_snapshot, config.dropped_snapshots)
    solver = config.solver()
    first = solver.simulate(sw.draw_bump_parameters([0, 1]), *args)
    cache = solver._trajectories._cache_size()
    again = sw.load_config(TINY).solver().simulate(sw.draw_bump_parameters([2, 3]), *args)
    assert solver._trajectories._cache_size() == cache  # an equal solver and equal shapes: no new trace
    assert first["height"].shape == again["height"].shape == (2, 3, 32, 64)


# ------------------------------------------------------------------------------------------------ coarsening


def _grid_dataset(n_lat: int, values: np.ndarray, descending: bool = False) -> xr.Dataset:
    lat = -90 + (np.arange(n_lat) + 0.5) * 180 / n_lat
    lon = np.arange(2 * n_lat) * 180 / n_lat
    if descending:
        lat, values = lat[::-1], values[..., ::-1, :]
    return xr.Dataset(
        {"f": (("trajectory", "time", "latitude", "longitude"), values, {"units": "m"}), "tag": ("trajectory", np.arange(values.shape[0]))},
        coords={"latitude": lat, "longitude": lon, "time": np.arange(values.shape[1], dtype=float)},
        attrs={"title": "x"},
    )


@pytest.mark.parametrize("descending", [False, True], ids=["ascending", "descending"])
def test_coarsening_preserves_constants_and_area_integrals(descending):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 3, 96, 192))
    values[1] = 7.25  # a constant field
    ds = _grid_dataset(96, values, descending)
    before = ds.copy(deep=True)
    coarse = sw.coarsen_area_weighted(ds)
    xr.testing.assert_identical(ds, before)  # the input is not modified
    assert coarse["f"].shape == (2, 3, 48, 96) and coarse["f"].dtype == np.float64
    np.testing.assert_allclose(coarse["f"].values[1], 7.25, rtol=1e-14)
    fine_integral = np.einsum("...ij,i->...", ds["f"].values, _cell_areas(ds["latitude"].values))
    coarse_integral = np.einsum("...ij,i->...", coarse["f"].values, _cell_areas(coarse["latitude"].values))
    np.testing.assert_allclose(coarse_integral * 2, fine_integral, rtol=1e-12)  # coarse cells are twice as wide
    np.testing.assert_array_equal(coarse["tag"].values, ds["tag"].values)
    expected_lat = -90 + (np.arange(48) + 0.5) * 180 / 48
    np.testing.assert_allclose(coarse["latitude"].values, expected_lat[::-1] if descending else expected_lat, rtol=0, atol=1e-12)
    np.testing.assert_allclose(coarse["longitude"].values, 0.9375 + 3.75 * np.arange(96), rtol=0, atol=1e-12)
    assert coarse.attrs["title"] == "x" and "2 x 2 area-weighted" in coarse.attrs["coarsening"]


def test_coarsening_is_area_weighted_not_a_plain_mean():
    """Two fine rows next to the pole: the coarse value weights the equatorward row by its larger area."""
    values = np.zeros((1, 1, 4, 8))
    values[..., 0, :] = 1.0  # the southernmost row, -90..-45; the row above it covers -45..0
    coarse = sw.coarsen_area_weighted(_grid_dataset(4, values))["f"].values[0, 0, 0, 0]
    south, north = 1 - math.sin(math.pi / 4), math.sin(math.pi / 4)
    assert coarse == pytest.approx(south / (south + north), rel=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ds: ds.isel(latitude=slice(0, 95)), "not divisible by factor 2"),
        (lambda ds: ds.assign_coords(latitude=np.sort(np.r_[ds.latitude.values[:-1], 89.5])), "equally spaced"),
        (lambda ds: ds.assign_coords(latitude=ds.latitude.values * 1.1), "beyond"),
        (lambda ds: ds.rename(latitude="lat"), "'latitude'"),
    ],
    ids=["odd-size", "irregular", "not-cell-centred", "no-latitude"],
)
def test_coarsening_rejects_unsupported_grids(change, message):
    ds = _grid_dataset(96, np.zeros((1, 1, 96, 192)))
    with pytest.raises(ValueError, match=message):
        sw.coarsen_area_weighted(change(ds))


# ------------------------------------------------------------------------------------------------ configs


def test_shipped_configs_follow_the_protocol():
    paper = sw.load_config(DATASETS / "shallow_water.yaml")
    assert paper == sw.ShallowWaterConfig()  # the file spells out the defaults
    assert (paper.truncation, paper.latitude_nodes, paper.solver_dt, paper.num_frames) == (63, 96, 1200.0, 14)
    assert {s: c.num_trajectories for s, c in paper.splits.items()} == {"train": 512, "test": 128}
    assert paper.native_splits == ["test"] and paper.output_dir == "data/shallow_water"
    assert paper.first_frame_hours == 100.0 and paper.frame_times()[1] == pytest.approx(50 / 3)
    assert paper.seeds("train")[0] == 0 and paper.seeds("test")[0] == 2**31 - 1
    assert paper.solver().dissipation == sw.Hyperdiffusion(1e5 * sw.RADIUS**2 / 32**2, 2)
    quick = sw.load_config(DATASETS / "shallow_water_quick.yaml")
    assert quick.native_splits == ["test"] and quick.output_dir == "data/shallow_water_quick"
    assert dict(quick.splits) == {"train": sw.SplitConfig(32, sw.SeedMode.train), "test": sw.SplitConfig(8, sw.SeedMode.test)}
    assert quick.solver() == paper.solver() and quick.frame_times().tolist() == paper.frame_times().tolist()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"viscosity": 1e-3}, "viscosity"),
        ({"bump": {"hieght_min": 1.0}}, "hieght_min"),
        ({"truncation": "T63"}, "truncation"),
        ({"generator": "navier_stokes"}, "generator: expected 'shallow_water'"),
        ({"splits": {"train": {"num_trajectories": 0}}}, r"splits.train.num_trajectories: expected >= 1, found 0"),
        ({"native_splits": ["valid"]}, "native_splits"),
        ({"splits": {"test": {"seed_mode": "test"}, "test_native": {"seed_mode": "test"}}}, "collide"),
        ({"latitude_nodes": 28}, "alias-free"),
        ({"bump": {"alpha_min": 0.5}}, "bump.alpha_min"),
        ({"dissipation": {"kind": "spectral"}}, "kind"),
        ({"coarsen_factor": 5}, "coarsen_factor"),
    ],
    ids=["unknown-key", "unknown-nested-key", "wrong-type", "generator", "zero-trajectories", "native-split",
         "native-name-collision", "aliasing", "bump-range", "dissipation-kind", "coarsen-factor"],
)
def test_invalid_configs_are_rejected_naming_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        sw.load_config({**TINY, **change})


def test_seeds_are_disjoint_and_bumps_in_range():
    config = sw.load_config(DATASETS / "shallow_water.yaml")
    train, test = config.seeds("train"), config.seeds("test")
    assert not set(train.tolist()) & set(test.tolist())
    bumps = sw.draw_bump_parameters(np.concatenate([train, test]), config.bump)
    for values, (low, high) in [(bumps.height, (90, 150)), (bumps.alpha, (2 / 9, 4 / 9)), (bumps.beta, (2 / 45, 4 / 45))]:
        assert low <= values.min() and values.max() <= high
        assert len(np.unique(values)) == len(values)  # every trajectory draws its own
        assert values.max() - values.min() > 0.9 * (high - low)  # and they fill the range
    again = sw.draw_bump_parameters(train[5:7], config.bump)  # a bump depends on its seed only
    np.testing.assert_array_equal(again.height, bumps.height[5:7])


# ------------------------------------------------------------------------------------------------ files


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw")
    paths = sw.generate_dataset(TINY, root / "a", progress=False)
    return root, paths


def test_generate_writes_coarse_and_native_files(tiny_files):
    _, paths = tiny_files
    assert set(paths) == {"train", "test", "test_native"}
    assert [p.name for p in paths.values()] == ["train.nc", "test.nc", "test_native.nc"]
    native = TrajectoryDataset.open(paths["test_native"])
    coarse = TrajectoryDataset.open(paths["test"])
    assert native.axes == coarse.axes == ("latitude", "longitude")
    assert native.grid_shape == (32, 64) and coarse.grid_shape == (16, 32)
    assert native.variables == ("height", "u", "v", "vorticity") and native.units == ("m", "m s-1", "m s-1", "s-1")
    assert native.values.shape == (2, 3, 32 * 64, 4) and np.isfinite(native.values).all()
    assert native.time_units == "hours"
    np.testing.assert_allclose(native.times, np.arange(3) * 6 * 1200 / 3600)
    with xr.open_dataset(paths["train"]) as ds:
        assert ds.sizes == {"trajectory": 3, "time": 3, "latitude": 16, "longitude": 32}
        assert ds.attrs["Conventions"] == "CF-1.10" and ds.attrs["dinosaur_version"] == "1.5.1"
        assert ds.attrs["gravity_acceleration"] == 9.80616 and ds.attrs["mean_depth"] == 1e4
        assert ds.attrs["first_frame_hours_since_initialisation"] == 2.0
        assert "generator: shallow_water" in ds.attrs["config"] and "created" not in " ".join(ds.attrs)
        assert ds["height"].attrs["units"] == "m" and ds["u"].attrs["standard_name"] == "eastward_wind"
        assert ds["latitude"].attrs["units"] == "degrees_north" and ds["longitude"].attrs["units"] == "degrees_east"
        assert ds["height"].dtype == np.float32 and ds["height"].dims == ("trajectory", "time", "latitude", "longitude")
        np.testing.assert_array_equal(ds["seed"].values, [0, 1, 2])
        bumps = sw.draw_bump_parameters([0, 1, 2])
        np.testing.assert_array_equal(ds["bump_height"].values, bumps.height)
        np.testing.assert_array_equal(ds["bump_beta"].values, bumps.beta)


def test_files_reopen_identically_and_regenerate_byte_identically(tiny_files):
    root, paths = tiny_files
    in_memory = sw.generate_split(TINY, "test", native=True, workers=1)
    with xr.open_dataset(paths["test_native"]) as on_disk:
        xr.testing.assert_identical(on_disk.load(), in_memory)
    again = sw.generate_dataset(TINY, root / "b", progress=False, workers=1)
    for key, path in paths.items():
        assert path.read_bytes() == again[key].read_bytes(), key


def test_native_and_coarse_files_hold_the_same_trajectories(tiny_files):
    _, paths = tiny_files
    with xr.open_dataset(paths["test_native"]) as native, xr.open_dataset(paths["test"]) as coarse:
        recoarsened = sw.coarsen_area_weighted(native.load())
        for name in sw.VARIABLES:
            np.testing.assert_array_equal(recoarsened[name].values, coarse[name].values)
        for name in ("latitude", "longitude", "time", "seed", "bump_alpha"):
            np.testing.assert_array_equal(recoarsened[name].values, coarse[name].values)
        np.testing.assert_allclose(coarse["latitude"].values, -90 + (np.arange(16) + 0.5) * 180 / 16)
        np.testing.assert_allclose(coarse["longitude"].values, 360 / 64 / 2 + np.arange(32) * 360 / 32)


def _coarse(solver: sw.ShallowWaterSolver, values: np.ndarray) -> np.ndarray:
    dims = ("trajectory", "time", "latitude", "longitude")
    coords = {"latitude": solver.output_latitudes, "longitude": solver.longitudes}
    return sw.coarsen_area_weighted(xr.Dataset({"f": (dims, values)}, coords=coords))["f"].values


def test_trajectories_do_not_depend_on_batching(tiny_files):
    """For one batch size, a trajectory's values do not depend on its batch neighbours, its position in the
    batch, padding or the number of workers: bit for bit."""
    _, paths = tiny_files
    config = sw.load_config(TINY)
    solver = config.solver()
    with xr.open_dataset(paths["train"]) as train:
        heights = train["height"].values
    # in the file, trajectory 1 was second in [0, 1] and trajectory 2 alone in a padded batch [2, 2]
    fields = solver.simulate(sw.draw_bump_parameters([2, 1]), config.num_frames, config.steps_per_snapshot, config.dropped_snapshots)
    np.testing.assert_array_equal(_coarse(solver, fields["height"]), heights[[2, 1]])


def test_frames_follow_the_snapshot_rule(tiny_files):
    """Snapshot 0 is the initial state; frame k is snapshot dropped_snapshots + k."""
    _, paths = tiny_files
    config = sw.load_config(TINY)
    solver = config.solver()
    with xr.open_dataset(paths["train"]) as train:
        heights = train["height"].values
    bumps = sw.draw_bump_parameters([1, 2])
    snapshots = solver.simulate(bumps, 4, config.steps_per_snapshot, 0)  # snapshots 0..3
    coarse = _coarse(solver, snapshots["height"])
    # another compiled program (no spin-up), hence rounding-level differences
    np.testing.assert_allclose(coarse[:, 1:], heights[1:3], rtol=1e-6)  # frames 0..2 = snapshots 1..3
    assert np.abs(coarse[:, 0] - heights[1:3, 0]).max() > 1.0  # snapshot 0 was dropped
    initial = solver.nodal_fields(solver.initial_state(bumps.height, bumps.alpha, bumps.beta))
    for name in sw.VARIABLES:
        np.testing.assert_allclose(snapshots[name][:, 0], np.asarray(initial[name]), rtol=0, atol=1e-6 * np.abs(initial[name]).max())


def test_existing_files_are_not_overwritten(tmp_path):
    (tmp_path / "test_native.nc").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sw.generate_dataset(TINY, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_native.nc"]  # nothing computed or written
    assert (tmp_path / "test_native.nc").read_bytes() == b"keep me"
