"""What the FNO and DINo baselines share: the data's domain and grid, the checks of ``predict``'s inputs, the
training split, and checkpoint files.

* :class:`Domain` (:class:`TorusDomain`, :class:`SphereDomain`) says what a coordinate means: the inputs of a
  coordinate network (DINo), the coordinate features of a grid model (FNO), which grid axes are periodic and
  which observed point is nearest to a query. :func:`domain_for_dataset` picks one from a dataset's axes,
  once, at the boundary.
* :class:`Grid` is a regular 2-D grid on a domain: bilinear interpolation to any points (periodic along
  periodic axes) and the filling of sparse observations onto the grid (linear on a Delaunay triangulation
  with periodic images, nearest observed point outside it).
* :func:`save_checkpoint` / :func:`load_checkpoint` write and read a baseline directory::

      <path>/baseline.json   model name, model and training configs, normaliser, domain, grid, metadata
      <path>/params/          orbax StandardCheckpointer of the model's NNX state
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from scipy.interpolate import LinearNDInterpolator
from scipy.spatial import Delaunay, QhullError, cKDTree

from enfpde.data.trajectories import TrajectoryDataset, check_monotone_times, grid_points, save_json_atomic
from enfpde.geometry import Sphere, Torus

__all__ = [
    "Domain",
    "Grid",
    "SphereDomain",
    "TorusDomain",
    "check_forecast_inputs",
    "domain_for_dataset",
    "domain_from_dict",
    "frame_interval",
    "load_checkpoint",
    "num_parameters",
    "read_metadata",
    "save_checkpoint",
    "training_frames",
]

METADATA_FILE = "baseline.json"
PARAMS_DIR = "params"


# ---------------------------------------------------------------------------------------------------------
# Domains
# ---------------------------------------------------------------------------------------------------------


class Domain(abc.ABC):
    """The meaning of 2-D user coordinates ``[..., 2]`` for the baselines (see the module doc)."""

    @abc.abstractmethod
    def field_inputs(self, coords) -> np.ndarray:
        """Validated user coordinates ``[M, 2]`` -> inputs of a coordinate network ``[M, input_dim]`` float32.

        Raises:
            ValueError: coordinates outside the domain or of the wrong shape (the geometry's message).
        """

    @property
    @abc.abstractmethod
    def axes(self) -> tuple[str, str]:
        """Names of the two user coordinate axes (the dataset's ``axes``)."""

    @property
    @abc.abstractmethod
    def input_dim(self) -> int:
        """Dimension of :meth:`field_inputs`."""

    @abc.abstractmethod
    def grid_features(self, axis_values) -> np.ndarray:
        """Coordinate features ``[H, W, F]`` of the grid spanned by the two 1-D ``axis_values``."""

    @property
    @abc.abstractmethod
    def num_grid_features(self) -> int:
        """``F`` of :meth:`grid_features`."""

    @property
    @abc.abstractmethod
    def periods(self) -> tuple[float | None, float | None]:
        """The period of each coordinate axis in user units, None for a non-periodic axis."""

    @abc.abstractmethod
    def nearest(self, points: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Index into ``points [P, 2]`` of the point nearest to each of ``query [Q, 2]`` (the domain's distance)."""

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """JSON description; :func:`domain_from_dict` inverts it."""


@dataclasses.dataclass(frozen=True)
class TorusDomain(Domain):
    """The periodic box ``[0, L_y) x [0, L_x)``, user coordinates ``(y, x)``.

    * Coordinate-network inputs: ``(y / L_y, x / L_x)`` in ``[0, 1)^2`` (raw normalised coordinates, as DINo
      uses them: its decoder is not periodic by construction, it learns the periodic field from the data).
    * Grid features: ``sin, cos(2 pi y / L_y)`` and ``sin, cos(2 pi x / L_x)`` (4 channels): periodic, so the
      grid model sees no artificial seam at the box edge.
    * Distances: the shortest periodic difference.
    """

    periods_yx: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self):
        periods = tuple(float(p) for p in self.periods_yx)
        if len(periods) != 2 or not all(p > 0 and math.isfinite(p) for p in periods):
            raise ValueError(f"TorusDomain periods must be two positive numbers (L_y, L_x), found {self.periods_yx}.")
        object.__setattr__(self, "periods_yx", periods)

    def field_inputs(self, coords):
        internal = np.asarray(Torus(self.periods_yx).coords_from_user(coords))
        return (internal / np.asarray(self.periods_yx, np.float32)).astype(np.float32)

    axes = ("y", "x")
    input_dim = 2
    num_grid_features = 4

    def grid_features(self, axis_values):
        y, x = (np.asarray(a, np.float64) for a in axis_values)
        py, px = (2 * np.pi * a / L for a, L in zip((y, x), self.periods_yx))
        py, px = np.meshgrid(py, px, indexing="ij")
        return np.stack([np.sin(py), np.cos(py), np.sin(px), np.cos(px)], -1).astype(np.float32)

    @property
    def periods(self):
        return self.periods_yx

    def _wrapped(self, c):
        box = np.asarray(self.periods_yx)
        wrapped = np.mod(np.asarray(c, np.float64), box)
        return np.where(wrapped >= box, 0.0, wrapped)  # mod can round up to the period, which cKDTree rejects

    def nearest(self, points, query):
        return cKDTree(self._wrapped(points), boxsize=np.asarray(self.periods_yx)).query(self._wrapped(query))[1]

    def to_dict(self):
        return {"kind": "torus", "periods": list(self.periods_yx)}


@dataclasses.dataclass(frozen=True)
class SphereDomain(Domain):
    """The sphere, user coordinates ``(latitude, longitude)`` in degrees.

    * Coordinate-network inputs: 3-D unit vectors (as DINo on the sphere).
    * Grid features: ``sin, cos(longitude)`` and ``sin(latitude)`` (3 channels).
    * Periodic axes: longitude (360 degrees); latitude is not periodic. Distances: great-circle.
    """

    def field_inputs(self, coords):
        return np.asarray(Sphere().coords_from_user(coords), np.float32)

    axes = ("latitude", "longitude")
    input_dim = 3
    num_grid_features = 3

    def grid_features(self, axis_values):
        lat, lon = (np.deg2rad(np.asarray(a, np.float64)) for a in axis_values)
        lat, lon = np.meshgrid(lat, lon, indexing="ij")
        return np.stack([np.sin(lon), np.cos(lon), np.sin(lat)], -1).astype(np.float32)

    @property
    def periods(self):
        return (None, 360.0)

    def nearest(self, points, query):
        return cKDTree(_unit_vectors(points)).query(_unit_vectors(query))[1]

    def to_dict(self):
        return {"kind": "sphere"}


def _unit_vectors(coords) -> np.ndarray:
    lat, lon = (np.deg2rad(np.asarray(coords, np.float64)[..., i]) for i in (0, 1))
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)


def domain_from_dict(d: dict) -> Domain:
    """Inverse of :meth:`Domain.to_dict`."""
    kind = d.get("kind")
    if kind == "torus":
        return TorusDomain(tuple(d["periods"]))
    if kind == "sphere":
        return SphereDomain()
    raise ValueError(f"unknown domain kind {kind!r} in a baseline checkpoint; expected 'torus' or 'sphere'.")


def _uniform_period(values: np.ndarray, name: str) -> float:
    values = np.asarray(values, np.float64)
    steps = np.diff(values)
    if values.size < 2 or not np.allclose(steps, steps[0], rtol=1e-4, atol=0.0):
        raise ValueError(
            f"cannot infer the period of axis {name!r}: it needs at least two uniformly spaced values, found "
            f"{values.size} value(s){'' if values.size < 2 else f' with steps from {steps.min():.6g} to {steps.max():.6g}'}. "
            "Pass periods=(L_y, L_x)."
        )
    return abs(float(steps.mean())) * values.size


def domain_for_dataset(dataset: TrajectoryDataset, periods: tuple[float, float] | None = None) -> Domain:
    """The domain of a dataset: the sphere for ``(latitude, longitude)`` axes, the torus for ``(y, x)`` axes
    with the given ``periods`` or, on a grid, ``n * spacing`` per axis (the grid must be uniform).

    Raises:
        ValueError: other axes, or a torus whose periods cannot be inferred (scattered points).
    """
    axes = tuple(dataset.axes)
    if axes == ("latitude", "longitude"):
        return SphereDomain()
    if axes == ("y", "x"):
        if periods is None:
            if dataset.axis_values is None:
                raise ValueError("the dataset holds scattered (y, x) points: pass periods=(L_y, L_x) of the torus.")
            periods = tuple(_uniform_period(v, a) for v, a in zip(dataset.axis_values, axes))
        return TorusDomain(tuple(periods))
    raise ValueError(f"the baselines support axes ('y', 'x') (torus) or ('latitude', 'longitude') (sphere); found {axes}.")


# ---------------------------------------------------------------------------------------------------------
# The grid: bilinear interpolation and filling of sparse observations
# ---------------------------------------------------------------------------------------------------------


def _stencil(axis: np.ndarray, q: np.ndarray, period: float | None):
    """Linear-interpolation stencil along one axis: indices ``i0, i1`` into ``axis`` and the weight ``w`` of
    ``i1``. ``axis`` may be in any order (ascending, descending) and non-uniform. Periodic: ``q`` is wrapped
    and the cell between the last and the first value is used. Otherwise ``q`` is clamped to the axis range
    (constant extrapolation)."""
    order = np.argsort(axis)
    a = axis[order]
    n = a.size
    q = np.asarray(q, np.float64)
    if n == 1:
        zero = np.zeros(q.shape, np.int64)
        return zero, zero, np.zeros(q.shape)
    if period is not None:
        ext = np.append(a, a[0] + period)
        qq = a[0] + np.mod(q - a[0], period)
        j = np.clip(np.searchsorted(ext, qq, side="right") - 1, 0, n - 1)
        w = (qq - ext[j]) / (ext[j + 1] - ext[j])
        return order[j], order[(j + 1) % n], np.clip(w, 0.0, 1.0)
    qq = np.clip(q, a[0], a[-1])
    j = np.clip(np.searchsorted(a, qq, side="right") - 1, 0, n - 2)
    w = (qq - a[j]) / (a[j + 1] - a[j])
    return order[j], order[j + 1], np.clip(w, 0.0, 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Grid:
    """A regular 2-D grid of a :class:`Domain`: ``axis_values`` are the two 1-D coordinate axes (in the order
    of the user coordinates), points are flattened row-major (``grid_points``)."""

    domain: Domain
    axis_values: tuple[np.ndarray, np.ndarray]

    def __post_init__(self):
        values = tuple(np.asarray(v, np.float64).reshape(-1) for v in self.axis_values)
        if len(values) != 2:
            raise ValueError(f"a Grid needs two axes, found {len(values)}.")
        for v in values:
            if v.size < 1 or not np.all(np.isfinite(v)) or np.unique(v).size != v.size:
                raise ValueError("grid axes must be non-empty, finite and without repeated values.")
        object.__setattr__(self, "axis_values", values)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(v.size for v in self.axis_values)

    @property
    def points(self) -> np.ndarray:
        """``[H * W, 2]`` user coordinates of the nodes."""
        return grid_points(self.axis_values)

    def features(self) -> np.ndarray:
        """``[H, W, F]`` coordinate features of the nodes (see the domain)."""
        return self.domain.grid_features(self.axis_values)

    def interpolate(self, grid_values: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Bilinear interpolation of ``grid_values [..., H, W, C]`` at ``query [Q, 2]`` -> ``[..., Q, C]``;
        periodic along periodic axes, constant beyond the ends of a non-periodic axis (e.g. towards the
        poles beyond the outermost latitudes). Exact at the nodes."""
        grid_values = np.asarray(grid_values)
        if grid_values.shape[-3:-1] != self.shape:
            raise ValueError(f"grid values must be [..., {self.shape[0]}, {self.shape[1]}, C], found {grid_values.shape}.")
        query = np.asarray(query, np.float64)
        (i0, i1, wy), (k0, k1, wx) = (
            _stencil(a, query[:, d], p) for d, (a, p) in enumerate(zip(self.axis_values, self.domain.periods))
        )
        wy, wx = wy[:, None].astype(grid_values.dtype), wx[:, None].astype(grid_values.dtype)
        v = lambda i, k: grid_values[..., i, k, :]
        return (1 - wy) * ((1 - wx) * v(i0, k0) + wx * v(i0, k1)) + wy * ((1 - wx) * v(i1, k0) + wx * v(i1, k1))

    def locate(self, coords: np.ndarray, rtol: float = 1e-3) -> np.ndarray:
        """``[M]`` flat node index of each of ``coords [M, 2]`` that lies on a node (within ``rtol`` of the
        local spacing, periodic images included), -1 for the others."""
        coords = np.asarray(coords, np.float64)
        flat = np.zeros(coords.shape[0], np.int64)
        on = np.ones(coords.shape[0], bool)
        for d, (a, period) in enumerate(zip(self.axis_values, self.domain.periods)):
            i0, i1, w = _stencil(a, coords[:, d], period)
            idx = np.where(w < 0.5, i0, i1)
            diff = coords[:, d] - a[idx]
            if period is not None:
                diff = np.mod(diff + 0.5 * period, period) - 0.5 * period
            spacing = np.min(np.abs(np.diff(np.sort(a)))) if a.size > 1 else 1.0
            on &= np.abs(diff) <= rtol * spacing
            flat = flat * a.size + idx
        return np.where(on, flat, -1)

    def fill(self, coords: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Observations ``values [B, M, C]`` at ``coords [M, 2]`` (NaN = not observed) -> ``[B, H, W, C]``.

        Nodes that are observed keep their value. The others get the piecewise-linear interpolant of the
        observed points on their Delaunay triangulation in the (axis 0, axis 1) coordinate plane, to which
        copies of the points shifted by one period along each periodic axis are added (so the triangulation
        wraps around the torus, and around the longitude seam of the sphere); nodes outside its hull (or
        all, when fewer than three non-collinear points are observed) get the value of the nearest observed
        point in the domain's distance. Every filled value is thus a convex combination of observed values.

        Raises:
            ValueError: a state with no observed point.
        """
        coords, values = np.asarray(coords, np.float64), np.asarray(values)
        observed = np.all(np.isfinite(values), axis=-1)
        node = self.locate(coords)
        nodes = self.points
        out = np.empty((values.shape[0], nodes.shape[0], values.shape[-1]), np.float32)
        interpolators: dict[bytes, tuple] = {}  # states with the same mask share one triangulation
        for b in range(values.shape[0]):
            obs = observed[b]
            if not obs.any():
                raise ValueError(f"initial state {b} has no observed point (all NaN): nothing to forecast from.")
            grid = np.full((nodes.shape[0], values.shape[-1]), np.nan, np.float64)
            on = obs & (node >= 0)
            grid[node[on]] = values[b, on]
            missing = ~np.all(np.isfinite(grid), axis=-1)
            if missing.any():
                key = obs.tobytes() + missing.tobytes()
                if key not in interpolators:
                    interpolators[key] = self._scattered(coords[obs], nodes[missing])
                triangulation, source, fallback = interpolators[key]
                src = values[b, obs].astype(np.float64)
                filled = np.full((int(missing.sum()), values.shape[-1]), np.nan)
                if triangulation is not None:
                    filled = LinearNDInterpolator(triangulation, src[source])(nodes[missing])
                outside = ~np.all(np.isfinite(filled), axis=-1)
                filled[outside] = src[fallback[outside]]
                grid[missing] = filled
            out[b] = grid
        return out.reshape(values.shape[0], *self.shape, values.shape[-1])

    def _scattered(self, points: np.ndarray, targets: np.ndarray):
        """Triangulation of ``points`` with their periodic images near the grid (or None), the index of the
        original point of every image, and the nearest observed point of every target."""
        images, index = points, np.arange(points.shape[0])
        for d, period in enumerate(self.domain.periods):
            if period is None:
                continue
            lo, hi = self.axis_values[d].min(), self.axis_values[d].max()
            shifted, shifted_index = [images], [index]
            for s in (-period, period):
                moved = images.copy()
                moved[:, d] += s
                near = (moved[:, d] >= lo - 0.5 * period) & (moved[:, d] <= hi + 0.5 * period)
                shifted.append(moved[near])
                shifted_index.append(index[near])
            images, index = np.concatenate(shifted), np.concatenate(shifted_index)
        fallback = self.domain.nearest(points, targets)
        try:
            triangulation = Delaunay(images)
        except (QhullError, ValueError):  # fewer than 3 points, or all collinear
            triangulation = None
        return triangulation, index, fallback

    def to_dict(self) -> dict:
        return {"axis_values": [v.tolist() for v in self.axis_values]}


# ---------------------------------------------------------------------------------------------------------
# Inputs of predict, the training split
# ---------------------------------------------------------------------------------------------------------


def check_forecast_inputs(coords, initial_values, times, query_coords, num_channels: int, who: str):
    """Validate the arguments of ``predict`` (the :class:`~enfpde.evaluation.ArrayForecaster` protocol).

    Returns:
        ``coords [M, 2]`` float64, ``initial_values [B, M, C]`` float32, ``times [T]`` float64,
        ``query_coords [Q, 2]`` float64.

    Raises:
        ValueError: wrong shapes, a number of channels other than ``num_channels``, times that are not
            strictly increasing lead times ``>= 0``, points with only part of their channels observed, or a
            state without an observed point.
    """
    coords = np.asarray(coords, np.float64)
    values = np.asarray(initial_values, np.float32)
    query = np.asarray(query_coords, np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"{who}.predict: coords must be [M, 2] user coordinates, found shape {coords.shape}.")
    if values.ndim != 3 or values.shape[1:] != (coords.shape[0], num_channels):
        raise ValueError(
            f"{who}.predict: initial_values must be [B, M, C] = [B, {coords.shape[0]}, {num_channels}] (batch, the "
            f"points of coords, the model's channels), found shape {values.shape}."
        )
    if values.shape[0] == 0:
        raise ValueError(f"{who}.predict: initial_values holds no state (B = 0).")
    if query.ndim != 2 or query.shape[1] != 2 or query.shape[0] == 0:
        raise ValueError(f"{who}.predict: query_coords must be [Q, 2] with Q >= 1, found shape {query.shape}.")
    times = np.asarray(times, np.float64)
    check_monotone_times(times, f"{who}.predict: times")
    if times[0] < 0:
        raise ValueError(f"{who}.predict: times are lead times from the initial state and must be >= 0, found {times[0]}.")
    finite = np.isfinite(values)
    if np.any(finite.any(-1) & ~finite.all(-1)):
        raise ValueError(f"{who}.predict: some points of initial_values have only part of their channels observed (NaN).")
    empty = ~finite.all(-1).any(-1)
    if empty.any():
        raise ValueError(
            f"{who}.predict: initial state(s) {np.flatnonzero(empty).tolist()} have no observed point (all NaN)."
        )
    return coords, values, times, query


def frame_interval(dataset: TrajectoryDataset) -> float:
    """The (uniform) interval between the dataset's frames.

    Raises:
        ValueError: fewer than two frames or non-uniform frame times."""
    times = np.asarray(dataset.times, np.float64)
    if times.size < 2:
        raise ValueError(f"the training data needs at least two frames, found {times.size}.")
    steps = np.diff(times)
    if not np.allclose(steps, steps[0], rtol=1e-5, atol=0.0):
        raise ValueError(
            f"the training frames must be equally spaced in time; found intervals from {steps.min():.6g} to "
            f"{steps.max():.6g}."
        )
    return float(steps.mean())


def training_frames(dataset: TrajectoryDataset, horizon: int) -> TrajectoryDataset:
    """The frames ``0 .. horizon - 1`` (the training horizon, ``t_in``) of the training split.

    Raises:
        ValueError: ``horizon`` outside ``[2, num_frames]``."""
    if not isinstance(horizon, (int, np.integer)) or not 2 <= horizon <= dataset.num_frames:
        raise ValueError(
            f"horizon = {horizon!r} must be an integer number of frames in [2, {dataset.num_frames}] (the frames "
            "of the training data), e.g. 10 for the Navier-Stokes protocol."
        )
    return dataset.select(frames=slice(0, int(horizon)))


def num_parameters(*modules: nnx.Module) -> int:
    """Number of real trainable parameters (``nnx.Param`` entries) of the modules."""
    return int(sum(np.size(x) for m in modules for x in jax.tree.leaves(nnx.state(m, nnx.Param))))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, metadata: dict, state, *, overwrite: bool = False) -> Path:
    """Write a baseline directory: ``baseline.json`` (``metadata``) and ``params/`` (orbax, ``state``).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False, or it exists and is not a baseline
            directory (never deleted).
    """
    path = Path(path).resolve()
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"'{path}' already exists; pass overwrite=True to replace it.")
        if not (path / METADATA_FILE).exists():
            raise FileExistsError(f"'{path}' exists and is not a baseline directory ({METADATA_FILE} missing): not replacing it.")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(path / PARAMS_DIR, state)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    save_json_atomic(path / METADATA_FILE, metadata)  # last: a directory with it is complete
    return path


def read_metadata(path: str | os.PathLike, model: str) -> dict:
    """``baseline.json`` of a baseline directory, checking that it holds a ``model`` ("fno", "dino")."""
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"'{path}' is not a baseline directory: {METADATA_FILE} is missing.")
    metadata = json.loads(meta_path.read_text())
    if metadata.get("model") != model:
        raise ValueError(f"'{path}' holds a {metadata.get('model')!r} baseline, not {model!r}.")
    return metadata


def load_checkpoint(path: str | os.PathLike, abstract_state):
    """Restore the NNX state of ``path/params`` into the structure of ``abstract_state``
    (e.g. ``nnx.state(nnx.eval_shape(lambda: Model(...)))``)."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(Path(path).resolve() / PARAMS_DIR, abstract_state)
    finally:
        checkpointer.close()
