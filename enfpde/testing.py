"""Equivariance checks shipped with the library, for the tests and for users' own components.

``assert_steerable(field, z, coords, key)`` draws a random group element ``g`` of the field's geometry
and checks ``f(g x; g z) = f(x; z)`` (equivalently ``f(g^-1 x; z) = f(x; g z)``) to a relative tolerance.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from enfpde.geometry import Geometry
from enfpde.latents import Latents, initial_latents

Array = jax.Array


def relative_error(actual, expected) -> float:
    """``max |actual - expected| / max |expected|`` (with the denominator floored at 1e-30)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def random_latents(geometry: Geometry, key: Array, *, batch: int, num_latents: int, latent_dim: int, spread: float = 0.3) -> Latents:
    """Latents scattered around the regular arrangement with random contexts and widths: a generic test
    input (no symmetry of the arrangement to hide a bug behind)."""
    k_move, k_ctx, k_width = jax.random.split(key, 3)
    z = initial_latents(geometry, num_latents, latent_dim, batch_shape=(batch,))
    step = spread * geometry.latent_spacing(num_latents)
    v = geometry.project_tangent(z.poses, step * jax.random.normal(k_move, z.poses.shape))
    widths = z.widths * jax.random.uniform(k_width, z.widths.shape, minval=0.7, maxval=1.5)
    return Latents(geometry.move(z.poses, v), jax.random.normal(k_ctx, z.contexts.shape), widths)


@jax.jit(static_argnums=0)
def _decode(graphdef, state, coords, z):
    return nnx.merge(graphdef, state)(coords, z)


def jit_decoder(field):
    """``decode(coords, z)``, compiled once per model structure and input shapes (shared across calls)."""
    graphdef, state = nnx.split(field)
    return lambda coords, z: _decode(graphdef, state, coords, z)


def assert_steerable(field, z: Latents, coords: Array, key: Array, *, rtol: float = 1e-5) -> float:
    """Check ``f(g x; g z) = f(x; z)`` for a random ``g``; returns the relative error.

    Raises:
        AssertionError: if the relative error exceeds ``rtol``.
    """
    geometry = field.geometry
    g = geometry.sample_group_element(key)
    decode = jit_decoder(field)
    reference = decode(coords, z)
    moved = decode(geometry.act_on_coords(g, coords), z.transform(geometry, g))
    err = relative_error(moved, reference)
    assert err <= rtol, f"{type(geometry).__name__}: f(g x; g z) differs from f(x; z) by {err:.3g} relative (> {rtol:.1g})"
    return err


def assert_invariant(fn, geometry: Geometry, x: Array, p: Array, key: Array, *, rtol: float = 1e-5, act_x=None) -> float:
    """Check ``fn(g x, g p) = fn(x, p)`` for a random ``g``; ``act_x`` acts on ``x`` (coordinates by default)."""
    g = geometry.sample_group_element(key)
    act_x = act_x or geometry.act_on_coords
    err = relative_error(fn(act_x(g, x), geometry.act_on_poses(g, p)), fn(x, p))
    assert err <= rtol, f"{type(geometry).__name__}: not invariant, relative error {err:.3g} (> {rtol:.1g})"
    return err


def all_geometries() -> dict[str, Geometry]:
    """One instance of every geometry, for parametrised tests."""
    from enfpde import geometry as G

    return {
        "torus": G.Torus((1.0, 1.0)),
        "torus-anisotropic": G.Torus((2.0, 0.5)),
        "plane": G.Plane(),
        "plane-se2": G.PlaneSE2(),
        "sphere": G.Sphere(),
        "axial-sphere": G.AxialSphere(),
        "absolute-torus": G.AbsolutePosition(G.Torus()),
        "absolute-sphere": G.AbsolutePosition(G.Sphere()),
    }


def advected_waves_dataset(
    num_trajectories: int = 4,
    num_frames: int = 6,
    resolution: int = 8,
    *,
    frame_interval: float = 1.0,
    velocity: tuple[float, float] = (0.05, 0.03),
    seed: int = 0,
):
    """Exact solutions of linear advection ``d_t u + c . grad u = 0`` on the unit torus, as a trajectory
    ``xr.Dataset`` with dims ``(trajectory, time, y, x)`` and variable ``u``: a few random Fourier modes
    translated with velocity ``c = (c_y, c_x)``. Small, analytic data for tests of the data layer and the loop."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    axis = np.arange(resolution) / resolution
    times = np.arange(num_frames) * frame_interval
    y, x = np.meshgrid(axis, axis, indexing="ij")
    values = np.zeros((num_trajectories, num_frames, resolution, resolution), np.float32)
    for n in range(num_trajectories):
        for ky, kx in [(1, 0), (0, 1), (1, 1)]:
            amplitude, phase = rng.normal(), rng.uniform(0, 2 * np.pi)
            for t, tau in enumerate(times):
                shifted = ky * (y - velocity[0] * tau) + kx * (x - velocity[1] * tau)
                values[n, t] += amplitude * np.cos(2 * np.pi * shifted + phase)
    return xr.Dataset(
        {"u": (("trajectory", "time", "y", "x"), values, {"units": "1", "long_name": "advected scalar"})},
        coords={"trajectory": np.arange(num_trajectories), "time": ("time", times, {"units": "1"}), "y": axis, "x": axis},
        attrs={"title": "linear advection test data"},
    )
