"""Geometries: invariance of everything the decoder sees, equivariance of pose motion, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enfpde import geometry as G
from enfpde.testing import assert_invariant, relative_error

SEEDS = range(2)


def _poses(geometry, key, n=7):
    p0 = geometry.initial_poses(n)
    v = geometry.project_tangent(p0, 0.5 * geometry.latent_spacing(n) * jax.random.normal(key, p0.shape))
    return geometry.move(p0, v)


@pytest.mark.parametrize("seed", SEEDS)
def test_bi_invariant_and_window_distance_are_invariant(geometry, seed):
    kx, kp, kg = jax.random.split(jax.random.key(seed), 3)
    x = geometry.sample_coords(kx, 11)[:, None]  # [11, 1, D]
    p = _poses(geometry, kp)[None]  # [1, 7, P]
    assert geometry.bi_invariant(x, p).shape == (11, 7, geometry.invariant_dim)
    assert_invariant(geometry.bi_invariant, geometry, x, p, kg)
    assert_invariant(geometry.squared_distance, geometry, x, p, kg)


@pytest.mark.parametrize("seed", SEEDS)
def test_pose_bi_invariant_is_invariant(geometry, seed):
    kp, kq, kg = jax.random.split(jax.random.key(seed), 3)
    p, q = _poses(geometry, kp)[:, None], _poses(geometry, kq)[None]
    assert geometry.pose_bi_invariant(p, q).shape == (7, 7, geometry.pose_invariant_dim)
    assert_invariant(geometry.pose_bi_invariant, geometry, p, q, kg, act_x=geometry.act_on_poses)


@pytest.mark.parametrize("seed", SEEDS)
def test_displacements_directions_and_motion_are_equivariant(geometry, seed):
    kp, kq, kg, kv = jax.random.split(jax.random.key(seed), 4)
    p, q = _poses(geometry, kp), _poses(geometry, kq)
    g = geometry.sample_group_element(kg)
    gp, gq = geometry.act_on_poses(g, p), geometry.act_on_poses(g, q)
    disp = geometry.relative_displacement(p, q)
    assert relative_error(geometry.relative_displacement(gp, gq), geometry.act_on_tangents(g, p, disp)) < 1e-5
    dirs = geometry.fixed_directions(p)
    moved_dirs = geometry.act_on_tangents(g, p[:, None], dirs)
    if dirs.shape[-2]:
        assert relative_error(geometry.fixed_directions(gp), moved_dirs) < 1e-5
    v = geometry.project_tangent(p, 0.2 * jax.random.normal(kv, p.shape))
    moved = geometry.move(gp, geometry.act_on_tangents(g, p, v))
    expected = geometry.act_on_poses(g, geometry.move(p, v))
    assert float(jnp.max(jnp.abs(geometry.relative_displacement(expected, moved)))) < 1e-5


def test_displacement_points_to_the_target():
    torus = G.Torus((1.0, 2.0))
    p, q = jnp.array([0.9, 0.1]), jnp.array([0.1, 1.9])
    np.testing.assert_allclose(torus.relative_displacement(p, q), [0.2, -0.2], atol=1e-6)
    np.testing.assert_allclose(torus.move(p, torus.relative_displacement(p, q)), q, atol=1e-6)
    sphere = G.Sphere()
    p, q = jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 1.0, 0.0])
    np.testing.assert_allclose(sphere.relative_displacement(p, q), [0.0, np.pi / 2, 0.0], atol=1e-6)
    np.testing.assert_allclose(sphere.move(p, sphere.relative_displacement(p, q)), q, atol=1e-6)
    np.testing.assert_allclose(sphere.squared_distance(p, q), (np.pi / 2) ** 2, rtol=1e-6)


def test_projection_keeps_poses_on_the_domain():
    key = jax.random.key(0)
    torus = G.Torus((2.0, 0.5))
    p = torus.move(torus.initial_poses(9), 10.0 * jax.random.normal(key, (9, 2)))
    assert bool(jnp.all((p >= 0) & (p < jnp.array([2.0, 0.5]))))
    sphere = G.Sphere()
    p = sphere.initial_poses(9)
    for _ in range(100):
        p = sphere.move(p, sphere.project_tangent(p, 0.3 * jax.random.normal(key, p.shape)))
        key = jax.random.split(key)[0]
    np.testing.assert_allclose(jnp.linalg.norm(p, axis=-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("n", [1, 4, 6, 8, 12])
def test_initial_arrangement(geometry, n):
    p = geometry.initial_poses(n)
    assert p.shape == (n, geometry.pose_dim)
    np.testing.assert_allclose(geometry.project(p), p, atol=1e-6)  # on the domain
    w = geometry.initial_widths(n)
    assert w.shape == (n,) and bool(jnp.all(w > 0))
    if n > 1:  # distinct poses
        d = geometry.squared_distance(p[:, None, : geometry.coord_dim], p[None])
        assert float(jnp.min(d + jnp.eye(n) * 1e9)) > 1e-4


def test_torus_grid_follows_the_periods():
    p = G.Torus((4.0, 1.0)).initial_poses(8)
    assert sorted(set(np.round(np.asarray(p[:, 0]), 4))) == [0.5, 1.5, 2.5, 3.5]
    assert sorted(set(np.round(np.asarray(p[:, 1]), 4))) == [0.25, 0.75]


def test_axial_arrangement_is_mapped_onto_itself():
    axial = G.AxialSphere()
    for n in (4, 8, 18):
        p = axial.initial_poses(n)
        angle = np.deg2rad(axial.arrangement_symmetry_deg(n))
        rotated = axial.act_on_poses(jnp.asarray(angle), p)
        d = np.min(np.linalg.norm(np.asarray(rotated)[:, None] - np.asarray(p)[None], axis=-1), axis=1)
        assert d.max() < 1e-5


def test_sphere_user_coordinates_round_trip():
    sphere = G.AxialSphere()
    latlon = np.array([[90.0, 0.0], [-45.0, 30.0], [10.0, 350.0], [0.0, -170.0]])
    x = sphere.coords_from_user(latlon)
    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, atol=1e-6)
    back = np.asarray(sphere.coords_to_user(x))
    np.testing.assert_allclose(back[1:, 0], latlon[1:, 0], atol=1e-4)
    np.testing.assert_allclose(np.mod(back[1:, 1], 360), np.mod(latlon[1:, 1], 360), atol=1e-4)
    np.testing.assert_allclose(x[2], [np.cos(np.deg2rad(10)) * np.cos(np.deg2rad(350)), np.cos(np.deg2rad(10)) * np.sin(np.deg2rad(350)), np.sin(np.deg2rad(10))], atol=1e-6)


@pytest.mark.parametrize(
    "geometry, coords, message",
    [
        (G.Torus((1.0, 1.0)), np.zeros((5, 3)), r"expected an array of shape \[\.\.\., 2\].*found shape \(5, 3\)"),
        (G.Torus((1.0, 1.0)), np.array([[0.5, 1.5]]), r"\[0, L\).*found the range"),
        (G.Torus((1.0, 1.0)), np.array([[0.5, np.nan]]), r"non-finite"),
        (G.Sphere(), np.array([[120.0, 10.0]]), r"latitude must lie in \[-90, 90\]"),
        (G.AxialSphere(), np.array([[10.0, 400.0]]), r"longitude must lie in"),
        (G.Sphere(), np.zeros((4, 3)), r"\(latitude, longitude\) in degrees"),
        (G.Plane(), np.array([[np.inf, 0.0]]), r"non-finite"),
    ],
)
def test_bad_user_coordinates_raise_clear_errors(geometry, coords, message):
    with pytest.raises(ValueError, match=message):
        geometry.coords_from_user(coords)


def test_bad_geometry_parameters_raise():
    with pytest.raises(ValueError, match="periods must be positive"):
        G.Torus((1.0, -1.0))
    with pytest.raises(ValueError, match="high > low"):
        G.Plane(extent=(1.0, 0.0))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 3))
def test_balanced_factors_multiply_to_n(n, num_factors):
    factors = G._balanced_factors(n, num_factors)
    assert len(factors) == num_factors and math.prod(factors) == n


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 0.999), st.floats(0.0, 0.999), st.floats(0.5, 5.0))
def test_torus_difference_is_the_shortest_periodic_image(x, p, period):
    torus = G.Torus((period,))
    x, p = x * period, p * period
    d = float(torus.relative_displacement(jnp.array([p]), jnp.array([x]))[0])
    assert -period / 2 - 1e-5 <= d < period / 2 + 1e-5
    assert min(abs(d - (x - p) - k * period) for k in (-1, 0, 1)) < 1e-4
