"""Domains and their symmetry groups.

Everything symmetry-specific lives here, behind the :class:`Geometry` interface, so that the decoder,
the encoder and the dynamics never branch on the domain. A geometry knows

* how user coordinates map to internal ones (:meth:`Geometry.coords_from_user`, validated);
* the bi-invariant ``a(x, p)`` between a query and a pose, and between two poses;
* the squared distance used by the attention window;
* a regular initial arrangement of ``N`` poses and a window width from its spacing;
* the relative displacement of one pose seen from another, the directions the group leaves fixed,
  and how a pose moves along a tangent velocity;
* its group action on coordinates, poses and tangent vectors, and how to sample group elements.

Conventions. Internal query coordinates have shape ``[..., coord_dim]``, poses ``[..., pose_dim]``,
tangent vectors at a pose ``[..., tangent_dim]``. Group elements are arrays whose layout is private to
each geometry; they are only made by :meth:`Geometry.sample_group_element` and :meth:`Geometry.identity`.

Steerability of the neural field, ``f(g^-1 x; z) = f(x; g z)``, holds because the decoder sees poses only
through :meth:`Geometry.bi_invariant` and :meth:`Geometry.squared_distance`, both invariant under
``(x, p) -> (g x, g p)``; the tests check this for every geometry.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Adding this before a square root keeps its gradient finite at zero while changing values only at the
# 1e-12 level in float32 arithmetic on quantities of order one.
_SQRT_EPS = 1e-12


def _safe_norm(v: Array, axis: int = -1, keepdims: bool = False) -> Array:
    """Euclidean norm with a finite (zero) gradient at ``v = 0``."""
    squared = jnp.sum(v * v, axis=axis, keepdims=keepdims)
    is_zero = squared <= 0.0
    safe = jnp.where(is_zero, 1.0, squared)
    return jnp.where(is_zero, 0.0, jnp.sqrt(safe))


def _balanced_factors(n: int, num_factors: int, aspect: tuple[float, ...] | None = None) -> list[int]:
    """Split ``n`` into ``num_factors`` integer factors whose product is ``n``, as close as possible to
    proportional to ``aspect`` (equal by default). Used to lay latents on a regular grid."""
    aspect = aspect or (1.0,) * num_factors
    best, best_cost = None, math.inf

    def search(remaining: int, prefix: list[int]) -> None:
        nonlocal best, best_cost
        if len(prefix) == num_factors - 1:
            factors = prefix + [remaining]
            scale = (n / math.prod(aspect)) ** (1.0 / num_factors)
            cost = sum((math.log(f / (a * scale))) ** 2 for f, a in zip(factors, aspect))
            if cost < best_cost - 1e-12:
                best, best_cost = factors, cost
            return
        for f in range(1, remaining + 1):
            if remaining % f == 0:
                search(remaining // f, prefix + [f])

    search(n, [])
    assert best is not None
    return best


def _check_finite(name: str, values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        bad = int(np.sum(~np.isfinite(values)))
        raise ValueError(f"{name}: found {bad} non-finite value(s) (NaN or inf); coordinates must be finite.")


def _check_last_axis(name: str, values: np.ndarray, expected: int, meaning: str) -> None:
    if values.ndim < 1 or values.shape[-1] != expected:
        raise ValueError(
            f"{name}: expected an array of shape [..., {expected}] ({meaning}), found shape {values.shape}."
        )


def _wrap_angle(theta: Array) -> Array:
    """Angle in [-pi, pi)."""
    return jnp.mod(theta + jnp.pi, 2.0 * jnp.pi) - jnp.pi


def _rotation_2d(theta: Array) -> Array:
    """Rotation matrices ``[..., 2, 2]`` for angles ``[...]`` (radians)."""
    c, s = jnp.cos(theta), jnp.sin(theta)
    return jnp.stack([jnp.stack([c, -s], -1), jnp.stack([s, c], -1)], -2)


class Geometry(abc.ABC):
    """A domain with a symmetry group acting on it. Subclasses are small frozen dataclasses (hashable,
    so a geometry can be a static argument of ``jax.jit``)."""

    #: Dimension of internal query coordinates.
    coord_dim: int
    #: Dimension of a pose.
    pose_dim: int
    #: Dimension of a tangent vector (pose velocity) at a pose.
    tangent_dim: int
    #: Dimension of the query-pose bi-invariant ``a(x, p)``.
    invariant_dim: int
    #: Dimension of the pose-pose bi-invariant ``a(p, q)``.
    pose_invariant_dim: int

    # ----- user boundary -------------------------------------------------------------------------
    @abc.abstractmethod
    def coords_from_user(self, coords) -> Array:
        """Validate user coordinates ``[..., user_dim]`` and return internal ones ``[..., coord_dim]``.

        Raises:
            ValueError: wrong last dimension, non-finite values or coordinates outside the domain.
        """

    @abc.abstractmethod
    def coords_to_user(self, coords: Array) -> Array:
        """Inverse of :meth:`coords_from_user`."""

    # ----- invariants and distances ----------------------------------------------------------------
    @abc.abstractmethod
    def bi_invariant(self, x: Array, p: Array) -> Array:
        """``a(x, p)`` with ``a(g x, g p) = a(x, p)``. Shapes ``[..., coord_dim]``, ``[..., pose_dim]``
        (broadcast against each other) to ``[..., invariant_dim]``."""

    @abc.abstractmethod
    def pose_bi_invariant(self, p: Array, q: Array) -> Array:
        """``a(p, q)`` between two poses, invariant under ``(p, q) -> (g p, g q)``; ``[..., pose_invariant_dim]``."""

    @abc.abstractmethod
    def squared_distance(self, x: Array, p: Array) -> Array:
        """Squared distance ``[...]`` between query and pose position, used by the attention window."""

    # ----- latent arrangement ------------------------------------------------------------------------
    @abc.abstractmethod
    def initial_poses(self, num_latents: int) -> Array:
        """A regular arrangement of ``num_latents`` poses covering the domain, ``[N, pose_dim]``."""

    @abc.abstractmethod
    def sample_coords(self, key: Array, num_points: int) -> Array:
        """Random internal coordinates ``[num_points, coord_dim]``, uniform over the domain (over the
        latents' extent on the plane)."""

    @abc.abstractmethod
    def latent_spacing(self, num_latents: int) -> float:
        """Typical distance between neighbouring latents of :meth:`initial_poses` (domain units)."""

    def initial_widths(self, num_latents: int, factor: float = 1.0) -> Array:
        """Gaussian window widths ``[N]``: ``factor`` times the latent spacing."""
        return jnp.full((num_latents,), factor * self.latent_spacing(num_latents), jnp.float32)

    # ----- motion of poses ---------------------------------------------------------------------------
    @abc.abstractmethod
    def relative_displacement(self, p: Array, q: Array) -> Array:
        """Tangent vector at ``p`` pointing to ``q`` (log map / shortest difference), ``[..., tangent_dim]``.
        Equivariant: ``disp(g p, g q) = g . disp(p, q)`` with the action of :meth:`act_on_tangents`."""

    def fixed_directions(self, p: Array) -> Array:
        """Tangent vectors ``[..., K, tangent_dim]`` at ``p`` that the group leaves fixed
        (``dirs(g p) = g . dirs(p)``); empty (K = 0) unless the symmetry is reduced."""
        return jnp.zeros(p.shape[:-1] + (0, self.tangent_dim), p.dtype)

    @abc.abstractmethod
    def move(self, p: Array, v: Array) -> Array:
        """Move pose ``p`` along tangent vector ``v`` and return a pose on the domain (retraction)."""

    @abc.abstractmethod
    def project(self, p: Array) -> Array:
        """Bring a pose back onto the domain (wrap periodic coordinates, normalise unit vectors)."""

    def project_tangent(self, p: Array, v: Array) -> Array:
        """Project an ambient vector onto the tangent space at ``p`` (identity on flat domains)."""
        del p
        return v

    # ----- group action ------------------------------------------------------------------------------
    @abc.abstractmethod
    def identity(self) -> Array:
        """The identity element."""

    @abc.abstractmethod
    def sample_group_element(self, key: Array) -> Array:
        """A random group element."""

    @abc.abstractmethod
    def act_on_coords(self, g: Array, x: Array) -> Array:
        """``g x`` for internal coordinates ``[..., coord_dim]``."""

    @abc.abstractmethod
    def act_on_poses(self, g: Array, p: Array) -> Array:
        """``g p`` for poses ``[..., pose_dim]``."""

    def act_on_tangents(self, g: Array, p: Array, v: Array) -> Array:
        """Push a tangent vector ``v`` at ``p`` forward to ``g p`` (identity for translations)."""
        del g, p
        return v


# =====================================================================================================
# Flat and periodic domains
# =====================================================================================================


@dataclasses.dataclass(frozen=True)
class Torus(Geometry):
    """The periodic box ``[0, L_1) x ... x [0, L_d)`` with periodic translations.

    Bi-invariant per axis: ``cos(2 pi (x - p) / L), sin(2 pi (x - p) / L)``; distance: the shortest
    periodic difference. Coordinates are in physical units.

    Args:
        periods: the period ``L`` of every axis, e.g. ``(1.0, 1.0)`` for the unit 2-torus.
    """

    periods: tuple[float, ...] = (1.0, 1.0)

    def __post_init__(self):
        if len(self.periods) < 1 or any(not (L > 0) for L in self.periods):
            raise ValueError(f"Torus periods must be positive, found {self.periods}.")
        object.__setattr__(self, "periods", tuple(float(L) for L in self.periods))

    @property
    def coord_dim(self) -> int:
        return len(self.periods)

    pose_dim = tangent_dim = coord_dim
    invariant_dim = property(lambda self: 2 * self.coord_dim)
    pose_invariant_dim = invariant_dim

    @property
    def _L(self) -> Array:
        return jnp.asarray(self.periods, jnp.float32)

    def coords_from_user(self, coords) -> Array:
        c = np.asarray(coords, np.float32)
        _check_last_axis("torus coordinates", c, self.coord_dim, "one coordinate per axis")
        _check_finite("torus coordinates", c)
        L = np.asarray(self.periods, np.float32)
        if np.any(c < 0) or np.any(c > L):
            raise ValueError(
                f"torus coordinates must lie in [0, L) per axis with periods L = {self.periods}; found the range "
                f"[{c.min():.4g}, {c.max():.4g}]. Wrap them with `coords % L` if they are periodic images."
            )
        return jnp.asarray(c)

    def coords_to_user(self, coords: Array) -> Array:
        return coords

    def _difference(self, x: Array, p: Array) -> Array:
        """Shortest periodic difference ``x - p`` per axis, in ``[-L/2, L/2)``."""
        L = self._L
        return jnp.mod(x - p + 0.5 * L, L) - 0.5 * L

    def bi_invariant(self, x, p):
        phase = 2.0 * jnp.pi * (x - p) / self._L
        return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1)

    pose_bi_invariant = bi_invariant

    def squared_distance(self, x, p):
        return jnp.sum(self._difference(x, p) ** 2, axis=-1)

    def _grid_counts(self, num_latents: int) -> list[int]:
        return _balanced_factors(num_latents, self.coord_dim, self.periods)

    def initial_poses(self, num_latents):
        counts = self._grid_counts(num_latents)
        axes = [(np.arange(n) + 0.5) * L / n for n, L in zip(counts, self.periods)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, self.coord_dim)
        return jnp.asarray(grid, jnp.float32)

    def sample_coords(self, key, num_points):
        return jax.random.uniform(key, (num_points, self.coord_dim)) * self._L

    def latent_spacing(self, num_latents):
        return float((math.prod(self.periods) / num_latents) ** (1.0 / self.coord_dim))

    def relative_displacement(self, p, q):
        return self._difference(q, p)

    def move(self, p, v):
        return self.project(p + v)

    def project(self, p):
        return jnp.mod(p, self._L)

    def identity(self):
        return jnp.zeros((self.coord_dim,), jnp.float32)

    def sample_group_element(self, key):
        return jax.random.uniform(key, (self.coord_dim,)) * self._L

    def act_on_coords(self, g, x):
        return jnp.mod(x + g, self._L)

    act_on_poses = act_on_coords


@dataclasses.dataclass(frozen=True)
class Plane(Geometry):
    """The plane ``R^2`` with translations. Bi-invariant ``x - p``; Euclidean distance.

    Args:
        extent: ``(low, high)`` of the square on which the initial latents are laid out; queries may lie
            anywhere in the plane.
    """

    extent: tuple[float, float] = (-1.0, 1.0)

    coord_dim = pose_dim = tangent_dim = 2
    invariant_dim = pose_invariant_dim = 2

    def __post_init__(self):
        lo, hi = self.extent
        if not hi > lo:
            raise ValueError(f"Plane extent must be (low, high) with high > low, found {self.extent}.")

    def coords_from_user(self, coords):
        c = np.asarray(coords, np.float32)
        _check_last_axis("plane coordinates", c, 2, "(x, y)")
        _check_finite("plane coordinates", c)
        return jnp.asarray(c)

    def coords_to_user(self, coords):
        return coords

    def bi_invariant(self, x, p):
        return x - p

    pose_bi_invariant = bi_invariant

    def squared_distance(self, x, p):
        return jnp.sum((x[..., :2] - p[..., :2]) ** 2, axis=-1)

    def _grid(self, num_latents):
        lo, hi = self.extent
        nx, ny = _balanced_factors(num_latents, 2)
        xs = lo + (np.arange(nx) + 0.5) * (hi - lo) / nx
        ys = lo + (np.arange(ny) + 0.5) * (hi - lo) / ny
        return np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)

    def initial_poses(self, num_latents):
        return jnp.asarray(self._grid(num_latents), jnp.float32)

    def sample_coords(self, key, num_points):
        lo, hi = self.extent
        return jax.random.uniform(key, (num_points, 2), minval=lo, maxval=hi)

    def latent_spacing(self, num_latents):
        lo, hi = self.extent
        return float((hi - lo) / math.sqrt(num_latents))

    def relative_displacement(self, p, q):
        return q - p

    def move(self, p, v):
        return p + v

    def project(self, p):
        return p

    def identity(self):
        return jnp.zeros((2,), jnp.float32)

    def sample_group_element(self, key):
        lo, hi = self.extent
        return jax.random.uniform(key, (2,), minval=lo - hi, maxval=hi - lo)

    def act_on_coords(self, g, x):
        return x + g

    act_on_poses = act_on_coords


@dataclasses.dataclass(frozen=True)
class PlaneSE2(Plane):
    """The plane with roto-translations: poses ``(x, y, theta)`` carry an orientation (radians).

    Bi-invariant of a query: ``R(theta)^T (x - p)``, the query in the latent's own frame. Between poses:
    ``R(theta_p)^T (q - p)`` and ``cos, sin`` of the relative angle. Tangent vectors ``(v_x, v_y, omega)``
    hold a velocity in the global frame (rotated by the group) and an angular velocity (invariant).
    Group elements are ``(t_x, t_y, phi)``: ``x -> R(phi) x + t``.
    """

    pose_dim = tangent_dim = 3
    invariant_dim = 2
    pose_invariant_dim = 4

    def bi_invariant(self, x, p):
        rel = x - p[..., :2]
        c, s = jnp.cos(p[..., 2]), jnp.sin(p[..., 2])
        return jnp.stack([c * rel[..., 0] + s * rel[..., 1], -s * rel[..., 0] + c * rel[..., 1]], -1)

    def pose_bi_invariant(self, p, q):
        local = self.bi_invariant(q[..., :2], p)
        dtheta = q[..., 2] - p[..., 2]
        return jnp.concatenate([local, jnp.cos(dtheta)[..., None], jnp.sin(dtheta)[..., None]], -1)

    def initial_poses(self, num_latents):
        grid = self._grid(num_latents)
        return jnp.asarray(np.concatenate([grid, np.zeros((num_latents, 1))], -1), jnp.float32)

    def relative_displacement(self, p, q):
        return jnp.concatenate([q[..., :2] - p[..., :2], _wrap_angle(q[..., 2:] - p[..., 2:])], -1)

    def fixed_directions(self, p):
        # The latent's own frame (heading and its normal) rotates with the group: an equivariant basis.
        c, s, zero = jnp.cos(p[..., 2]), jnp.sin(p[..., 2]), jnp.zeros_like(p[..., 2])
        heading = jnp.stack([c, s, zero], -1)
        normal = jnp.stack([-s, c, zero], -1)
        return jnp.stack([heading, normal], -2)

    def move(self, p, v):
        return self.project(p + v)

    def project(self, p):
        return jnp.concatenate([p[..., :2], _wrap_angle(p[..., 2:])], -1)

    def identity(self):
        return jnp.zeros((3,), jnp.float32)

    def sample_group_element(self, key):
        k1, k2 = jax.random.split(key)
        lo, hi = self.extent
        t = jax.random.uniform(k1, (2,), minval=lo - hi, maxval=hi - lo)
        return jnp.concatenate([t, jax.random.uniform(k2, (1,), minval=-jnp.pi, maxval=jnp.pi)])

    def act_on_coords(self, g, x):
        return jnp.einsum("ij,...j->...i", _rotation_2d(g[2]), x) + g[:2]

    def act_on_poses(self, g, p):
        xy = self.act_on_coords(g, p[..., :2])
        return jnp.concatenate([xy, _wrap_angle(p[..., 2:] + g[2])], -1)

    def act_on_tangents(self, g, p, v):
        del p
        vxy = jnp.einsum("ij,...j->...i", _rotation_2d(g[2]), v[..., :2])
        return jnp.concatenate([vxy, v[..., 2:]], -1)


# =====================================================================================================
# The sphere
# =====================================================================================================


def _latlon_to_unit(latlon_deg: np.ndarray) -> np.ndarray:
    lat, lon = np.deg2rad(latlon_deg[..., 0]), np.deg2rad(latlon_deg[..., 1])
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)


def _rotation_z(angle: Array) -> Array:
    c, s = jnp.cos(angle), jnp.sin(angle)
    zero, one = jnp.zeros_like(c), jnp.ones_like(c)
    return jnp.stack(
        [jnp.stack([c, -s, zero], -1), jnp.stack([s, c, zero], -1), jnp.stack([zero, zero, one], -1)], -2
    )


@dataclasses.dataclass(frozen=True)
class LatLonBox:
    """A latitude-longitude box in degrees: ``south <= latitude <= north`` and longitudes from ``west``
    eastwards to ``east`` (it may cross the 0 / 360 meridian: ``west=350, east=20``; ``east - west`` of 360
    is a full latitude band). Stored as ``[south, north, west, east]`` in configs."""

    south: float
    north: float
    west: float
    east: float

    def __post_init__(self):
        values = (self.south, self.north, self.west, self.east)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"region: expected finite [south, north, west, east] in degrees, found {list(values)}.")
        if not -90.0 <= self.south < self.north <= 90.0:
            raise ValueError(
                f"region: expected -90 <= south < north <= 90 degrees, found south {self.south}, north {self.north}."
            )
        if not 0.0 < self.lon_extent <= 360.0:
            raise ValueError(f"region: west {self.west} and east {self.east} leave no longitude range.")

    @classmethod
    def from_list(cls, values) -> "LatLonBox":
        values = [float(v) for v in values]
        if len(values) != 4:
            raise ValueError(f"region: expected [south, north, west, east] in degrees, found {values}.")
        return cls(*values)

    def as_list(self) -> list[float]:
        return [self.south, self.north, self.west, self.east]

    @property
    def lon_extent(self) -> float:
        """Degrees of longitude from west to east (360 for a full band)."""
        extent = self.east - self.west
        return extent if 0.0 < extent <= 360.0 else float(np.mod(extent, 360.0)) or 360.0

    @property
    def area(self) -> float:
        """Solid angle (steradians) of the box on the unit sphere."""
        return (math.sin(math.radians(self.north)) - math.sin(math.radians(self.south))) * math.radians(self.lon_extent)

    def contains(self, latlon_deg, tolerance_deg: float = 1e-6) -> np.ndarray:
        """Whether each ``(latitude, longitude)`` point ``[..., 2]`` lies in the box."""
        c = np.asarray(latlon_deg, np.float64)
        lat_ok = (c[..., 0] >= self.south - tolerance_deg) & (c[..., 0] <= self.north + tolerance_deg)
        offset = np.mod(c[..., 1] - self.west + tolerance_deg, 360.0)
        return lat_ok & (offset <= self.lon_extent + 2 * tolerance_deg)

    def grid_shape(self, num_latents: int) -> tuple[int, int]:
        """``(n_lat, n_lon)`` with ``n_lat * n_lon = N`` and cells as square as the factors of ``N`` allow
        (the longitude extent measured at the box's mid-latitude)."""
        mid = math.cos(math.radians(0.5 * (self.south + self.north)))
        aspect = (self.north - self.south, max(self.lon_extent * mid, 1e-6))
        n_lat, n_lon = _balanced_factors(num_latents, 2, aspect)
        return n_lat, n_lon

    def grid(self, num_latents: int) -> np.ndarray:
        """Cell centres ``[N, 2]`` (latitude, longitude) of an ``n_lat x n_lon = N`` grid over the box, with
        cells as square as the factors of ``N`` allow (longitude extent measured at the box's mid-latitude)."""
        n_lat, n_lon = self.grid_shape(num_latents)
        # Equal-area latitude rows: cell centres at the middle of equal slices of sin(latitude).
        z = np.sin(np.deg2rad(self.south)) + (np.arange(n_lat) + 0.5) / n_lat * (
            np.sin(np.deg2rad(self.north)) - np.sin(np.deg2rad(self.south))
        )
        lat = np.rad2deg(np.arcsin(z))
        lon = self.west + (np.arange(n_lon) + 0.5) * self.lon_extent / n_lon
        grid_lat, grid_lon = np.meshgrid(lat, lon, indexing="ij")
        return np.stack([grid_lat.ravel(), np.mod(grid_lon.ravel(), 360.0)], -1)

    @classmethod
    def around(cls, latlon_deg) -> "LatLonBox | None":
        """The smallest box holding the points ``[..., 2]``, widened by half a grid step on every side (cells
        centred on the edge points lie inside); ``None`` when the points cover the globe (every longitude
        without a gap wider than two grid steps, and latitudes from within 15 degrees of either pole)."""
        c = np.asarray(latlon_deg, np.float64).reshape(-1, 2)
        lat = np.unique(c[:, 0])
        lon = np.unique(np.mod(c[:, 1], 360.0))
        lat_step = float(np.median(np.diff(lat))) if lat.size > 1 else 1.0
        if lon.size > 1:
            gaps = np.diff(np.concatenate([lon, lon[:1] + 360.0]))  # gap after each longitude, eastwards
            widest = int(np.argmax(gaps))
            lon_step = float(np.median(gaps))
            full_circle = gaps[widest] <= 2.0 * lon_step
        else:
            widest, lon_step, full_circle, gaps = 0, 1.0, False, np.array([360.0])
        if full_circle and lat[0] <= -75.0 and lat[-1] >= 75.0:
            return None
        south = max(-90.0, lat[0] - 0.5 * lat_step)
        north = min(90.0, lat[-1] + 0.5 * lat_step)
        if full_circle:
            west, extent = 0.0, 360.0
        else:
            # From half a step before the first longitude after the widest gap, eastwards over the data.
            west = float(np.mod(lon[(widest + 1) % lon.size] - 0.5 * lon_step, 360.0))
            extent = 360.0 - float(gaps[widest]) + lon_step
        return cls(float(south), float(north), west, west + extent)


@dataclasses.dataclass(frozen=True)
class _SphereBase(Geometry):
    """The unit sphere. User coordinates are ``(latitude, longitude)`` in degrees (CF convention,
    latitude in [-90, 90], longitude in [-180, 360]); internal coordinates and poses are unit vectors in
    ``R^3``; tangent vectors are ambient vectors orthogonal to the pose. Distances are great-circle angles
    (radians); window widths are in radians.

    ``region`` (``[south, north, west, east]`` degrees, see :class:`LatLonBox`) makes the domain regional:
    the initial latents form a grid over that box, spaced for the box (so window widths fit it too), and
    random coordinates are drawn in it. The decoder may still be queried anywhere, and it stays steerable
    under every rotation of the group; but the initial arrangement is fixed to the box, so fitting a
    rotated field gives rotated latents only for rotations that map the box onto itself (see the README).
    """

    coord_dim = pose_dim = tangent_dim = 3
    region: tuple[float, float, float, float] | None = None

    def __post_init__(self):
        if self.region is not None:
            object.__setattr__(self, "region", tuple(LatLonBox.from_list(self.region).as_list()))

    @property
    def box(self) -> LatLonBox | None:
        return None if self.region is None else LatLonBox(*self.region)

    def _regional_poses(self, num_latents: int) -> Array:
        return jnp.asarray(_latlon_to_unit(self.box.grid(num_latents)), jnp.float32)

    def coords_from_user(self, coords):
        c = np.asarray(coords, np.float64)
        _check_last_axis("sphere coordinates", c, 2, "(latitude, longitude) in degrees")
        _check_finite("sphere coordinates", c)
        lat, lon = c[..., 0], c[..., 1]
        if np.any(np.abs(lat) > 90.0):
            raise ValueError(
                f"latitude must lie in [-90, 90] degrees, found the range [{lat.min():.4g}, {lat.max():.4g}]; "
                "are latitude and longitude swapped, or given in radians?"
            )
        if np.any(lon < -180.0) or np.any(lon > 360.0):
            raise ValueError(
                f"longitude must lie in [-180, 360] degrees, found the range [{lon.min():.4g}, {lon.max():.4g}]."
            )
        return jnp.asarray(_latlon_to_unit(c), jnp.float32)

    def coords_to_user(self, coords):
        lat = jnp.rad2deg(jnp.arcsin(jnp.clip(coords[..., 2], -1.0, 1.0)))
        lon = jnp.rad2deg(jnp.arctan2(coords[..., 1], coords[..., 0]))
        return jnp.stack([lat, lon], -1)

    def _angle(self, x, p):
        """Great-circle angle; ``atan2(|x cross p|, x . p)`` is accurate at all angles."""
        return jnp.arctan2(_safe_norm(jnp.cross(x, p)), jnp.sum(x * p, -1))

    def squared_distance(self, x, p):
        return self._angle(x, p) ** 2

    def sample_coords(self, key, num_points):
        if self.region is None:
            return self.project(jax.random.normal(key, (num_points, 3)))
        # Uniform over the box's area: sin(latitude) and longitude uniform.
        box = self.box
        k_lat, k_lon = jax.random.split(key)
        z = jax.random.uniform(k_lat, (num_points,), minval=math.sin(math.radians(box.south)), maxval=math.sin(math.radians(box.north)))
        lon = jnp.deg2rad(box.west + box.lon_extent * jax.random.uniform(k_lon, (num_points,)))
        r = jnp.sqrt(jnp.clip(1.0 - z**2, 0.0, 1.0))
        return jnp.stack([r * jnp.cos(lon), r * jnp.sin(lon), z], -1)

    def latent_spacing(self, num_latents):
        area = 4.0 * math.pi if self.region is None else self.box.area
        return float(math.sqrt(area / num_latents))

    def relative_displacement(self, p, q):
        # Log map at p: direction of q projected on the tangent plane, scaled to the great-circle angle.
        tangent = self.project_tangent(p, q)
        norm = _safe_norm(tangent, keepdims=True)
        angle = self._angle(p, q)[..., None]
        return tangent * angle / jnp.maximum(norm, _SQRT_EPS)

    def project_tangent(self, p, v):
        return v - jnp.sum(v * p, -1, keepdims=True) * p

    def move(self, p, v):
        # Exponential map along the tangent part of v: cos|v| p + sin|v| v/|v|.
        v = self.project_tangent(p, v)
        speed = _safe_norm(v, keepdims=True)
        sinc = jnp.where(speed > 1e-6, jnp.sin(speed) / jnp.maximum(speed, 1e-6), 1.0 - speed**2 / 6.0)
        return self.project(jnp.cos(speed) * p + sinc * v)

    def project(self, p):
        return p / _safe_norm(p, keepdims=True)

    def act_on_coords(self, g, x):
        return jnp.einsum("ij,...j->...i", self._matrix(g), x)

    act_on_poses = act_on_coords

    def act_on_tangents(self, g, p, v):
        del p
        return self.act_on_coords(g, v)

    @abc.abstractmethod
    def _matrix(self, g: Array) -> Array:
        """The 3 x 3 rotation matrix of group element ``g``."""


@dataclasses.dataclass(frozen=True)
class Sphere(_SphereBase):
    """The sphere with the full rotation group SO(3). Bi-invariant: ``<x, p>`` (the cosine of the
    great-circle angle). Initial latents: a Fibonacci lattice. Group elements: 3 x 3 rotation matrices."""

    invariant_dim = pose_invariant_dim = 1

    def bi_invariant(self, x, p):
        return jnp.sum(x * p, -1, keepdims=True)

    pose_bi_invariant = bi_invariant

    def initial_poses(self, num_latents):
        if self.region is not None:
            return self._regional_poses(num_latents)
        k = np.arange(num_latents) + 0.5
        z = 1.0 - 2.0 * k / num_latents
        lon = np.pi * (1.0 + 5.0**0.5) * k
        r = np.sqrt(1.0 - z**2)
        return jnp.asarray(np.stack([r * np.cos(lon), r * np.sin(lon), z], -1), jnp.float32)

    def identity(self):
        return jnp.eye(3, dtype=jnp.float32)

    def sample_group_element(self, key):
        # A uniformly random unit quaternion gives a Haar-random rotation.
        w, x, y, z = jax.random.normal(key, (4,))
        n = jnp.sqrt(w * w + x * x + y * y + z * z)
        w, x, y, z = w / n, x / n, y / n, z / n
        return jnp.array(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
            ]
        )

    def _matrix(self, g):
        return g


@dataclasses.dataclass(frozen=True)
class AxialSphere(_SphereBase):
    """The sphere with rotations about the polar axis only (a rotating planet: Coriolis breaks the full
    symmetry).

    Bi-invariant: ``(z_x, z_p, <x_h, p_h>, (x_h cross p_h)_z)`` where ``z = sin(latitude)`` and ``x_h`` is the
    horizontal (equatorial-plane) part of the unit vector. It carries the information of the reference
    choice ``(lat_x, lat_p, cos dlon, sin dlon)``, with the longitude terms scaled by ``cos lat_x cos lat_p``,
    which keeps it smooth at the poles where longitude is undefined.

    Initial latents: rings at equal-area latitudes with the same number of equally spaced longitudes on
    every ring (alternate rings staggered by half a step), so rotations by ``360 / n_lon`` degrees map the
    arrangement onto itself (:meth:`arrangement_symmetry_deg`). Group elements: an angle (radians).
    """

    invariant_dim = pose_invariant_dim = 4

    def bi_invariant(self, x, p):
        dot_h = x[..., 0] * p[..., 0] + x[..., 1] * p[..., 1]
        cross_z = x[..., 0] * p[..., 1] - x[..., 1] * p[..., 0]
        z_x, z_p = jnp.broadcast_to(x[..., 2], dot_h.shape), jnp.broadcast_to(p[..., 2], dot_h.shape)
        return jnp.stack([z_x, z_p, dot_h, cross_z], -1)

    pose_bi_invariant = bi_invariant

    def _ring_counts(self, num_latents):
        # Longitude spans twice the latitude range: aim for n_lon ~ 2 n_lat.
        n_lat, n_lon = _balanced_factors(num_latents, 2, (1.0, 2.0))
        return n_lat, n_lon

    def arrangement_symmetry_deg(self, num_latents: int) -> float | None:
        """Smallest longitude rotation (degrees) that maps :meth:`initial_poses` onto itself; ``None`` for a
        regional box that is not a full latitude band (no rotation maps it onto itself)."""
        if self.region is not None:
            box = self.box
            if box.lon_extent < 360.0:
                return None
            return 360.0 / box.grid_shape(num_latents)[1]
        return 360.0 / self._ring_counts(num_latents)[1]

    def initial_poses(self, num_latents):
        if self.region is not None:
            return self._regional_poses(num_latents)
        n_lat, n_lon = self._ring_counts(num_latents)
        points = []
        for i in range(n_lat):
            z = -1.0 + (2.0 * i + 1.0) / n_lat
            r = math.sqrt(1.0 - z * z)
            offset = 0.5 * (i % 2)
            lon = 2.0 * np.pi * (np.arange(n_lon) + offset) / n_lon
            points.append(np.stack([r * np.cos(lon), r * np.sin(lon), np.full(n_lon, z)], -1))
        return jnp.asarray(np.concatenate(points, 0), jnp.float32)

    def fixed_directions(self, p):
        # The polar axis and the eastward direction (z cross p) are preserved by rotations about z.
        pole = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0], p.dtype), p.shape)
        north = self.project_tangent(p, pole)
        east = jnp.cross(pole, p)
        return jnp.stack([north, east], -2)

    def identity(self):
        return jnp.zeros((), jnp.float32)

    def sample_group_element(self, key):
        return jax.random.uniform(key, (), minval=-jnp.pi, maxval=jnp.pi)

    def _matrix(self, g):
        return _rotation_z(g)


# =====================================================================================================
# No symmetry (the ablation)
# =====================================================================================================


@dataclasses.dataclass(frozen=True)
class AbsolutePosition(Geometry):
    """No symmetry: the decoder sees absolute positions. The ablation "a^0" of the paper.

    Wraps a ``domain`` geometry, from which it takes the coordinates, the latent arrangement, the window
    distance and the motion of poses; the bi-invariant is replaced by ``(x, p)`` concatenated, which is
    invariant under the trivial group only.
    """

    domain: Geometry = dataclasses.field(default_factory=Torus)

    coord_dim = property(lambda self: self.domain.coord_dim)
    pose_dim = property(lambda self: self.domain.pose_dim)
    tangent_dim = property(lambda self: self.domain.tangent_dim)
    invariant_dim = property(lambda self: self.domain.coord_dim + self.domain.pose_dim)
    pose_invariant_dim = property(lambda self: 2 * self.domain.pose_dim)

    def coords_from_user(self, coords):
        return self.domain.coords_from_user(coords)

    def coords_to_user(self, coords):
        return self.domain.coords_to_user(coords)

    def bi_invariant(self, x, p):
        shape = jnp.broadcast_shapes(x.shape[:-1], p.shape[:-1])
        return jnp.concatenate(
            [jnp.broadcast_to(x, shape + x.shape[-1:]), jnp.broadcast_to(p, shape + p.shape[-1:])], -1
        )

    pose_bi_invariant = bi_invariant

    def squared_distance(self, x, p):
        return self.domain.squared_distance(x, p)

    def initial_poses(self, num_latents):
        return self.domain.initial_poses(num_latents)

    def sample_coords(self, key, num_points):
        return self.domain.sample_coords(key, num_points)

    def latent_spacing(self, num_latents):
        return self.domain.latent_spacing(num_latents)

    def relative_displacement(self, p, q):
        return self.domain.relative_displacement(p, q)

    def fixed_directions(self, p):
        # Every direction is fixed by the trivial group: hand over the coordinate axes.
        axes = jnp.broadcast_to(jnp.eye(self.tangent_dim, dtype=p.dtype), p.shape[:-1] + (self.tangent_dim,) * 2)
        return self.domain.project_tangent(p[..., None, :], axes)

    def move(self, p, v):
        return self.domain.move(p, v)

    def project(self, p):
        return self.domain.project(p)

    def project_tangent(self, p, v):
        return self.domain.project_tangent(p, v)

    def identity(self):
        return jnp.zeros((0,), jnp.float32)

    def sample_group_element(self, key):
        del key
        return self.identity()

    def act_on_coords(self, g, x):
        del g
        return x

    act_on_poses = act_on_coords
