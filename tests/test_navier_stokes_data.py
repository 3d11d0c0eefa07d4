"""Navier-Stokes data: the solver against closed forms, the initial-condition spectrum, and the files.

Small grids and few steps throughout; the dataset tests share one tiny config (16 x 16, a burn-in of 0.1).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

from enfpde.data import navier_stokes as ns

DATASETS = Path(__file__).parents[1] / "datasets"

TINY = {
    "name": "tiny",
    "resolution": 16,
    "burn_in_duration": 0.2,  # records at 0 and 0.1; frame 0 is the state at t = 0.1
    "burn_in_records": 2,
    "frame_interval": 0.02,
    "num_frames": 3,
    "splits": {
        "train": {"num_trajectories": 2, "seed_mode": "train"},
        "test": {"num_trajectories": 2, "seed_mode": "test"},
        "test_fine": {"num_trajectories": 2, "seed_mode": "test", "frame_interval": 0.01},
    },
}


# ------------------------------------------------------------------------------------------------ solver


def test_taylor_green_vortex_decays_at_the_viscous_rate():
    """w = 2 k cos(k x) cos(k y), k = 2 pi m, is a Laplacian eigenfunction: psi = w / (2 k^2), so u . grad w =
    J(psi, w) = J(w, w) / (2 k^2) = 0 and the exact solution is w(t) = w(0) exp(-2 nu k^2 t). Crank-Nicolson
    damps each step by (1 - z/2) / (1 + z/2) = exp(-z + O(z^3)), z = 2 nu k^2 dt, a relative error of about
    n z^3 / 12 ~ 1e-9 here; explicit Euler would be off by 3e-3."""
    m, nu, interval = 2, 1e-2, 0.25
    k = 2 * math.pi * m
    solver = ns.VorticitySolver(16, viscosity=nu, forcing=ns.NoForcing(), dt=1e-3)
    with jax.enable_x64(True):
        x, y = solver.grid()
        w0 = np.stack([a * 2 * k * np.cos(k * x) * np.cos(k * y) for a in (1.0, 3.0)])  # [2, 16, 16]
        out = np.asarray(solver.simulate(jnp.asarray(w0), 3, interval))
        cache = solver.advance._cache_size()
        solver.simulate(jnp.asarray(w0), 3, interval)  # an equal call does not retrace
        assert solver.advance._cache_size() == cache
    assert out.dtype == np.float64 and out.shape == (2, 3, 16, 16)
    for r in range(3):
        exact = w0 * math.exp(-2 * nu * k**2 * interval * r)
        np.testing.assert_allclose(out[:, r], exact, rtol=0, atol=1e-5 * np.abs(exact).max())


def test_advection_term_matches_the_closed_form():
    """w = A sin(2 pi x) + B cos(4 pi y): psi = A sin(2 pi x) / (4 pi^2) + B cos(4 pi y) / (16 pi^2), u = d_y psi =
    -B sin(4 pi y) / (4 pi), v = -d_x psi = -A cos(2 pi x) / (2 pi), and u . grad w = 1.5 A B cos(2 pi x) sin(4 pi y).
    Fixes the sign of the velocity and which array axis is x."""
    a, b = 0.7, -1.3
    solver = ns.VorticitySolver(16, forcing=ns.NoForcing())
    x, y = solver.grid()
    w = a * np.sin(2 * np.pi * x) + b * np.cos(4 * np.pi * y)
    expected = 1.5 * a * b * np.cos(2 * np.pi * x) * np.sin(4 * np.pi * y)
    np.testing.assert_allclose(np.asarray(solver.advection(jnp.asarray(w[None], jnp.float32)))[0], expected, atol=1e-5)


def test_initial_condition_spectrum_has_the_expected_slope_amplitude_and_zero_mean():
    """Per-mode power E|w_hat(k)|^2 = sqrt_eig(k)^2 / 2 (the real part keeps half the power of complex noise
    of unit variance), sqrt_eig = N^2 sqrt(2) sigma (4 pi^2 |k|^2 + tau^2)^(-alpha/2): its radial average
    falls with slope -2 alpha (times 4 pi^2 k^2 / (4 pi^2 k^2 + tau^2), 0.99 at the fitted shells)."""
    n, alpha, tau = 64, 2.5, 7.0
    w = np.asarray(ns.gaussian_random_field(jax.random.key(0), 32, n, alpha=alpha, tau=tau))
    assert w.shape == (32, n, n) and w.dtype == np.float32
    assert np.abs(w.mean(axis=(1, 2))).max() < 1e-6 * w.std()
    power = np.mean(np.abs(np.fft.fft2(w)) ** 2, axis=0)
    k = np.fft.fftfreq(n, 1.0 / n)
    shell = np.rint(np.hypot(k[:, None], k[None, :])).astype(int)
    shells = np.arange(8, 25)
    radial = np.array([power[shell == s].mean() for s in shells])
    slope = np.polyfit(np.log(shells), np.log(radial), 1)[0]
    assert abs(slope - (-2 * alpha)) < 0.15, slope
    sigma = ns.grf_sigma(alpha, tau)
    expected = np.array([np.mean((n**4 * sigma**2 * (4 * np.pi**2 * (k[:, None] ** 2 + k[None, :] ** 2) + tau**2) ** -alpha)[shell == s]) for s in shells])
    np.testing.assert_allclose(radial, expected, rtol=0.1)  # a few percent of sampling noise per shell


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    "name, splits, frames, forcing",
    [
        ("navier_stokes", {"train": (16, 20), "test": (16, 20), "test_fine": (16, 77)}, 20, "0.3 (cos(4 pi x) + cos(4 pi y))"),
        ("navier_stokes_dino", {"train": (256, 40), "test": (16, 40)}, 40, "0.1 (sin(2 pi (x + y)) + cos(2 pi (x + y)))"),
        ("navier_stokes_quick", {"train": (24, 50), "test": (4, 20), "test_fine": (4, 77)}, 20, "0.3 (cos(4 pi x) + cos(4 pi y))"),
    ],
    ids=["enfpde", "dino", "quick"],
)
def test_shipped_configs_follow_the_protocols(name, splits, frames, forcing):
    config = ns.load_config(DATASETS / f"{name}.yaml")
    assert (config.resolution, config.viscosity, config.solver_dt, config.burn_in_end) == (64, 1e-3, 1e-3, 28.5)
    assert config.num_frames == frames and config.forcing.build().formula.endswith(forcing)
    assert {s: (c.num_trajectories, len(config.frame_times(s))) for s, c in config.splits.items()} == splits
    assert config.seeds("train")[0] == 0 and config.seeds("test")[0] == 2**31 - 1
    if "test_fine" in splits:
        np.testing.assert_array_equal(config.frame_times("test_fine")[::4], config.frame_times("test"))


# ------------------------------------------------------------------------------------------------ files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = ns.load_config(TINY)
    root = tmp_path_factory.mktemp("ns")
    paths = [ns.generate_dataset(config, root / run, progress=False, workers=2) for run in ("a", "b")]
    return config, paths


def test_files_reopen_identically_and_are_reproducible(tiny):
    config, (first, second) = tiny
    assert sorted(first) == ["test", "test_fine", "train"]
    for split, path in first.items():
        assert path.read_bytes() == second[split].read_bytes()  # same seeds -> same file, no timestamps
        with xr.open_dataset(path) as reopened:
            reopened.load()
        direct = ns.generate_split(config, split, workers=1)  # one batch of 2 instead of two of 1
        xr.testing.assert_identical(reopened, direct)
        assert reopened["vorticity"].dims == ("trajectory", "time", "y", "x")
        assert reopened["vorticity"].dtype == np.float32 and np.isfinite(reopened["vorticity"].values).all()
        np.testing.assert_array_equal(reopened["x"].values, np.arange(16) / 16)
        assert reopened["x"].attrs["axis"] == "X" and reopened["vorticity"].attrs["units"] == "1"
        assert reopened.attrs["Conventions"] == "CF-1.10" and reopened.attrs["viscosity"] == 1e-3
        assert reopened.attrs["burn_in_end_time"] == pytest.approx(0.1) and reopened.attrs["split"] == split


def test_splits_seeds_and_frames(tiny):
    config, (paths, _) = tiny
    data = {s: xr.open_dataset(p).load() for s, p in paths.items()}
    np.testing.assert_array_equal(data["train"]["seed"], [0, 1])
    np.testing.assert_array_equal(data["test"]["seed"], [2**31 - 1, 2**31 - 2])
    assert not set(data["train"]["seed"].values) & set(data["test"]["seed"].values)
    np.testing.assert_allclose(data["test_fine"]["time"], [0, 0.01, 0.02, 0.03, 0.04])
    # test.nc was cut from test_fine.nc; integrating the test split on its own gives the same frames
    np.testing.assert_array_equal(data["test"]["vorticity"], data["test_fine"]["vorticity"][:, ::2])
    direct = ns.generate_split(config, "test", workers=1)["vorticity"].values
    np.testing.assert_allclose(direct, data["test"]["vorticity"], rtol=0, atol=1e-5)
    # frame 0 is the burnt-in state: the random field integrated to t = 0.1 (not the raw field)
    w0 = np.asarray(ns.gaussian_random_field(jax.vmap(jax.random.key)(jnp.arange(2)), 2, 16))
    burnt = np.asarray(config.solver().simulate(jnp.asarray(w0), 2, 0.1))[:, -1]
    np.testing.assert_allclose(data["train"]["vorticity"][:, 0], burnt, rtol=0, atol=1e-5)


def test_existing_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "test.nc").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"test\.nc.*overwrite=True"):
        ns.generate_dataset(TINY, tmp_path, progress=False)
    assert (tmp_path / "test.nc").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.nc"]  # nothing else written, no temporaries


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("viscosty: 1.0e-3\n", "viscosty"),
        ("splits:\n  train: {num_trajectores: 2}\n", "num_trajectores"),
        ("forcing: {kind: kolmogorov}\n", "kolmogorov"),
        ("frame_interval: 0.0015\n", "multiple of the solver step"),
        ("variant: fno\n", "variant"),
    ],
)
def test_invalid_config_is_rejected_with_the_key(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=message):
        ns.load_config(path)
