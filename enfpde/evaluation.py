"""The evaluation harness: the forecasting protocols of the ENF-PDE paper, for any model on arrays.

Every model (the ENF forecaster, the FNO and DINo baselines, :class:`Persistence`) is evaluated through the
:class:`ArrayForecaster` protocol: an observed initial state in, fields at any times and points out, all in
the data's raw units. :func:`evaluate` runs, on one split,

* ``standard``: the initial state is frame 0, fully observed; forecast every frame of the dataset;
* ``dtau_<d>``: zero-shot temporal super-resolution: the same trajectories sampled finely, evaluated on
  the frames whose lead times are multiples of ``d`` (the paper's Table 3: ``d`` = 1, 0.5, 0.25);
* ``sparse_<p>%``: only a random ``p`` % of the frame-0 points observed (the rest NaN);
* ``shifted``: every trajectory rolled periodically by a random whole number of grid cells, the model
  forecasting from the rolled frame 0 (an equivariant model scores as on ``standard``, up to the
  trajectories' own variation);
* ``zero_shot``: zero-shot spatial super-resolution: the initial state observed on the dataset's grid, the
  forecast queried on a finer grid holding the same trajectories (e.g. the native 192 x 96 shallow-water
  grid beside the 96 x 48 training grid) and scored against it;

each beside persistence (frame 0 held), the floor every table shows.

Metric (REFERENCE section 3): plain MSE in the data's units over all points and channels, averaged over
trajectories; ``t_in`` = the frames inside the training horizon including frame 0, ``t_out`` = the frames
after it. On latitude/longitude grids a latitude-weighted MSE (weights ``cos(latitude)`` normalised to mean
1 over the points) can be reported beside the plain one. ``variable_scales`` multiplies each channel's
error by a constant first, to report in other units than the file's (e.g. the shallow-water reference's
nondimensional units, metre -> 1/R and second -> 1/3600, see :mod:`enfpde.data.shallow_water`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from enfpde.data.trajectories import TrajectoryDataset, save_json_atomic

__all__ = [
    "ArrayForecaster",
    "Persistence",
    "evaluate",
    "latitude_weights",
    "mse_per_frame",
    "periodic_shifts",
    "roll_grid",
    "sparse_observation_masks",
    "split_mse",
    "write_report",
]

# Lead times closer than this (relative to the time scale) count as equal: fine grids written as float32
# or accumulated sums of dt are not exact multiples of dtau.
_TIME_RTOL = 1e-6


@typing.runtime_checkable
class ArrayForecaster(typing.Protocol):
    """A forecaster on arrays in the data's raw units; the interface :func:`evaluate` needs."""

    def predict(
        self, coords: np.ndarray, initial_values: np.ndarray, times: np.ndarray, query_coords: np.ndarray
    ) -> np.ndarray:
        """Forecast from an observed initial state.

        Args:
            coords: ``[M, D]`` user coordinates of the observed initial state.
            initial_values: ``[B, M, C]`` raw data units, NaN where a point is not observed.
            times: ``[T]`` output times measured from the initial state (dataset time units; ``times[0]``
                may be 0, and then the output at it is the reconstruction of the initial state).
            query_coords: ``[Q, D]`` user coordinates to forecast at.

        Returns:
            ``[B, T, Q, C]`` in raw units.
        """
        ...


def latlon_to_unit_vectors(coords: np.ndarray) -> np.ndarray:
    """``[..., 2]`` (latitude, longitude) in degrees -> ``[..., 3]`` unit vectors; chord distance between
    them is monotone in the great-circle distance, so nearest neighbours agree."""
    lat, lon = np.deg2rad(np.asarray(coords, np.float64)[..., 0]), np.deg2rad(np.asarray(coords, np.float64)[..., 1])
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)


@dataclasses.dataclass(frozen=True)
class Persistence:
    """The persistence forecast: the initial state held constant, ``u(t, x) = u(0, n(x))``.

    ``n(x)`` is ``x`` itself where ``x`` is an observed point, and otherwise the nearest observed point
    (a point counts as observed when all its channels are finite). Nearest means Euclidean distance in the
    user coordinates, with periodic axes wrapped (``scipy.spatial.cKDTree`` with ``boxsize``), or, with
    ``on_sphere``, great-circle distance between (latitude, longitude) in degrees. So sparse initial states
    and query points off the observed set get the nearest-neighbour interpolant of the initial state.

    Attributes:
        periods: the period of every coordinate axis, ``0`` for a non-periodic one, e.g. ``(1.0, 1.0)`` on
            the unit 2-torus; None: no axis periodic.
        on_sphere: coordinates are (latitude, longitude) in degrees (then ``periods`` must be None).
    """

    periods: tuple[float, ...] | None = None
    on_sphere: bool = False

    def __post_init__(self):
        if self.periods is not None:
            periods = tuple(float(p) for p in self.periods)
            if any(not (p >= 0 and math.isfinite(p)) for p in periods):
                raise ValueError(f"Persistence periods must be finite and >= 0 (0 = not periodic), found {periods}.")
            if self.on_sphere:
                raise ValueError("Persistence: pass either periods or on_sphere=True, not both.")
            object.__setattr__(self, "periods", periods)

    @classmethod
    def for_dataset(cls, dataset: TrajectoryDataset, periodic_axes: Sequence[str] = ()) -> Persistence:
        """Persistence matching a dataset's domain: great-circle nearest neighbours on (latitude, longitude)
        data; otherwise periodic along ``periodic_axes``, with periods read off the (uniform) grid."""
        if tuple(dataset.axes) == ("latitude", "longitude"):
            return cls(on_sphere=True)
        if not periodic_axes:
            return cls()
        periods = grid_periods(dataset, periodic_axes)
        return cls(periods=tuple(periods.get(a, 0.0) for a in dataset.axes))

    def _points(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        c = np.asarray(coords, np.float64)
        if self.on_sphere:
            return latlon_to_unit_vectors(c), None
        if self.periods is None:
            return c, None
        if len(self.periods) != c.shape[-1]:
            raise ValueError(f"Persistence has {len(self.periods)} periods but the coordinates have {c.shape[-1]} axes.")
        box = np.asarray(self.periods)
        wrapped = np.where(box > 0, np.mod(c, np.where(box > 0, box, 1.0)), c)
        # Rounding can land a wrapped value exactly on the period, which cKDTree rejects.
        wrapped = np.where((box > 0) & (wrapped >= box), 0.0, wrapped)
        return wrapped, box

    def predict(self, coords, initial_values, times, query_coords):
        """See :class:`ArrayForecaster`. Raises ValueError if a batch element has no observed point."""
        coords, values = np.asarray(coords), np.asarray(initial_values)
        times, query_coords = np.asarray(times), np.asarray(query_coords)
        if values.ndim != 3 or coords.ndim != 2 or values.shape[1] != coords.shape[0]:
            raise ValueError(
                f"expected coords [M, D] and initial_values [B, M, C]; found {coords.shape} and {values.shape}."
            )
        if query_coords.ndim != 2 or query_coords.shape[1] != coords.shape[1]:
            raise ValueError(f"query_coords must be [Q, {coords.shape[1]}], found {query_coords.shape}.")
        observed = np.all(np.isfinite(values), axis=-1)
        same_points = query_coords.shape == coords.shape and np.array_equal(query_coords, coords)
        points, box = self._points(coords)
        query_points, _ = self._points(query_coords)
        frames = np.empty((values.shape[0], query_coords.shape[0], values.shape[2]), values.dtype)
        lookup: dict[bytes, np.ndarray] = {}  # batch elements with the same mask share one tree
        for b in range(values.shape[0]):
            if same_points and observed[b].all():
                frames[b] = values[b]
                continue
            key = observed[b].tobytes()
            if key not in lookup:
                where = np.flatnonzero(observed[b])
                if where.size == 0:
                    raise ValueError(f"Persistence: initial state {b} has no observed point (all NaN).")
                tree = cKDTree(points[where], boxsize=box)
                lookup[key] = where[tree.query(query_points)[1]]
            frames[b] = values[b, lookup[key]]
        return np.repeat(frames[:, None], times.shape[0], axis=1)


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def _channel_sums(pred, truth, mask=None, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted squared-error sums and weight totals ``[B, T, C]`` over points, per channel (data units).

    Entries where the truth is missing (NaN) or ``mask`` is False carry no weight; a NaN prediction where
    the truth is observed makes the sum NaN (a diverged model is reported, not hidden).
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim != 4:
        raise ValueError(f"pred and truth must both be [B, T, Q, C]; found {pred.shape} and {truth.shape}.")
    valid = np.isfinite(truth)
    if mask is not None:
        mask = np.asarray(mask, bool)
        try:
            valid = valid & np.broadcast_to(mask[..., None], truth.shape)
        except ValueError:
            raise ValueError(f"mask of shape {mask.shape} does not broadcast to [B, T, Q] = {truth.shape[:3]}.") from None
    w = valid.astype(np.float64)
    if weights is not None:
        weights = np.asarray(weights, np.float64)
        if weights.shape != (truth.shape[2],):
            raise ValueError(f"weights must be [Q] = [{truth.shape[2]}], found {weights.shape}.")
        w = w * weights[:, None]
    # Missing truth gives zero error; a NaN prediction at an observed entry stays NaN.
    error = np.where(valid, pred.astype(np.float64) - np.where(valid, truth, 0.0), 0.0)
    return np.sum(w * error**2, axis=2), np.sum(w, axis=2)


def _frame_sums(channel_sums: np.ndarray, channel_totals: np.ndarray, scales=None) -> tuple[np.ndarray, np.ndarray]:
    """``[..., C]`` per-channel sums and totals -> ``[...]`` over channels; ``scales`` (``[C]``) multiplies each
    channel's error (so its squared error by ``scales**2``)."""
    if scales is not None:
        channel_sums = channel_sums * np.asarray(scales, np.float64) ** 2
    return channel_sums.sum(axis=-1), channel_totals.sum(axis=-1)


def _mean_over_trajectories(sums: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """``[N, T]`` sums and totals -> ``[T]``: each trajectory's MSE, averaged over the trajectories with an
    observed point in that frame (NaN for a frame with none)."""
    has = totals > 0
    per_trajectory = np.where(has, sums / np.where(has, totals, 1.0), 0.0)
    count = has.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, per_trajectory.sum(axis=0) / count, np.nan)


def mse_per_frame(pred, truth, mask=None, *, weights=None) -> np.ndarray:
    """MSE per frame, in the data's units: over points and channels, averaged over trajectories.

    Args:
        pred, truth: ``[B, T, Q, C]``; truth may be NaN where not observed (those entries are left out).
        mask: optional ``[B, T, Q]`` (or broadcastable, e.g. ``[Q]``): only True points count.
        weights: optional ``[Q]`` point weights (e.g. :func:`latitude_weights`); the MSE of a trajectory's
            frame is then ``sum w e^2 / sum w`` over the counted entries.

    Returns:
        ``[T]`` float64.
    """
    return _mean_over_trajectories(*_frame_sums(*_channel_sums(pred, truth, mask, weights)))


def _is_in(times: np.ndarray, horizon_time: float) -> np.ndarray:
    tol = _TIME_RTOL * max(1.0, abs(float(horizon_time)))
    return times < float(horizon_time) - tol


def split_mse(per_frame, times, horizon_time: float) -> dict:
    """Average a per-frame MSE over the training horizon and beyond it.

    Args:
        per_frame: ``[T]`` MSE of each frame; times: ``[T]`` lead times measured from the initial state.
        horizon_time: the training horizon: frames at ``t < horizon_time`` (frame 0 included) form
            ``t_in``, frames at ``t >= horizon_time`` form ``t_out`` (with a relative tolerance of 1e-6, so
            a time a rounding error below the horizon counts as at it).

    Returns:
        ``{"t_in": float | None, "t_out": float | None}``: the mean over the frames of each group, None for
        an empty group.
    """
    per_frame, times = np.asarray(per_frame, np.float64), np.asarray(times, np.float64)
    if per_frame.shape != times.shape or per_frame.ndim != 1:
        raise ValueError(f"per_frame and times must be [T] of equal length; found {per_frame.shape} and {times.shape}.")
    inside = _is_in(times, horizon_time)
    return {
        "t_in": float(per_frame[inside].mean()) if inside.any() else None,
        "t_out": float(per_frame[~inside].mean()) if (~inside).any() else None,
    }


def latitude_weights(dataset: TrajectoryDataset) -> np.ndarray:
    """``[M]`` weights ``cos(latitude)`` normalised to mean 1 over the dataset's points (latitude in degrees,
    the schema's convention), for the area-weighted MSE on latitude/longitude grids."""
    if "latitude" not in dataset.axes:
        raise ValueError(
            f"latitude weighting needs a 'latitude' axis; the dataset's axes are {tuple(dataset.axes)}. "
            "Pass latitude_weighted=False."
        )
    w = np.cos(np.deg2rad(np.asarray(dataset.coords, np.float64)[:, list(dataset.axes).index("latitude")]))
    w = np.clip(w, 0.0, None)  # cos of +-90 degrees in floating point is a tiny signed number
    if not w.sum() > 0:
        raise ValueError("latitude weighting: every point lies at a pole (all weights zero).")
    return w / w.mean()


# ---------------------------------------------------------------------------------------------------------
# Protocol transforms: sparse observation, periodic shifts
# ---------------------------------------------------------------------------------------------------------

# Separate random streams per transform, so adding a setting never changes another one's draws.
_SPARSE_STREAM, _SHIFT_STREAM = 1, 2


def sparse_observation_masks(dataset: TrajectoryDataset, fraction: float, seed: int = 0) -> np.ndarray:
    """``[N, M]`` masks of the frame-0 points kept observed in the sparse-initial-state protocol.

    Trajectory ``i`` keeps ``max(1, round(fraction * n_i))`` of its ``n_i`` observed frame-0 points, drawn
    without replacement from a generator seeded by ``(seed, fraction, i)``: the same points for every model
    and every batch size.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"sparse fraction must lie in (0, 1], found {fraction}.")
    observed = dataset.mask[:, 0]
    masks = np.zeros_like(observed)
    for i in range(observed.shape[0]):
        where = np.flatnonzero(observed[i])
        if where.size == 0:
            continue
        k = max(1, int(round(fraction * where.size)))
        rng = np.random.default_rng([int(seed), _SPARSE_STREAM, int(round(fraction * 1e9)), i])
        masks[i, rng.choice(where, k, replace=False)] = True
    return masks


def _grid_axis(dataset: TrajectoryDataset, name: str) -> int:
    if dataset.grid_shape is None:
        raise ValueError(
            "periodic shifts and periods need a grid; the dataset holds scattered points. Pass shift=False."
        )
    if name not in dataset.axes:
        raise ValueError(f"unknown periodic axis {name!r}; the dataset's axes are {tuple(dataset.axes)}.")
    return list(dataset.axes).index(name)


def grid_periods(dataset: TrajectoryDataset, periodic_axes: Sequence[str]) -> dict[str, float]:
    """The period of each periodic grid axis, ``n * spacing``; the axis must be uniformly spaced (and a
    longitude axis must span 360 degrees), otherwise rolling it is no symmetry and this raises."""
    periods = {}
    for name in periodic_axes:
        values = np.asarray(dataset.axis_values[_grid_axis(dataset, name)], np.float64)
        if values.size < 2:
            raise ValueError(f"periodic axis {name!r} has {values.size} point(s); a period needs at least two.")
        steps = np.diff(values)
        if not np.allclose(steps, steps[0], rtol=1e-4, atol=0.0):
            raise ValueError(
                f"periodic axis {name!r} is not uniformly spaced (steps from {steps.min():.6g} to {steps.max():.6g})."
            )
        period = abs(float(steps.mean())) * values.size
        if name == "longitude" and not math.isclose(period, 360.0, rel_tol=1e-4):
            raise ValueError(
                f"longitude spans {period:.6g} degrees, not the full 360: it is not periodic. Leave it out of "
                "periodic_axes or pass shift=False."
            )
        periods[name] = period
    return periods


def periodic_shifts(dataset: TrajectoryDataset, periodic_axes: Sequence[str], seed: int = 0) -> np.ndarray:
    """``[N, len(periodic_axes)]`` integer shifts in grid cells, each in ``[1, n_axis)`` (a genuine shift on
    every axis of more than one cell), drawn from a generator seeded by ``(seed, i)`` for trajectory ``i``."""
    sizes = [dataset.grid_shape[_grid_axis(dataset, a)] for a in periodic_axes]
    shifts = np.zeros((dataset.num_trajectories, len(sizes)), np.int64)
    for i in range(dataset.num_trajectories):
        rng = np.random.default_rng([int(seed), _SHIFT_STREAM, i])
        shifts[i] = [rng.integers(1, n) if n > 1 else 0 for n in sizes]
    return shifts


def roll_grid(values: np.ndarray, grid_shape: Sequence[int], axes: Sequence[int], shifts: Sequence[int]) -> np.ndarray:
    """Roll ``values [..., M, C]`` (points flattened from ``grid_shape`` in C order) by ``shifts[k]`` cells
    along grid axis ``axes[k]``: ``out[i] = values[i - shift]``, i.e. the field translated by
    ``+shift`` cells, periodically."""
    values = np.asarray(values)
    lead = values.shape[:-2]
    grid = values.reshape(*lead, *grid_shape, values.shape[-1])
    grid = np.roll(grid, tuple(int(s) for s in shifts), axis=tuple(len(lead) + a for a in axes))
    return grid.reshape(values.shape)


# ---------------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Setting:
    """One protocol setting: its source trajectories, frames, and how the initial state is changed."""

    key: str
    label: str
    source: TrajectoryDataset
    frames: np.ndarray  # indices into source.times; frames[0] == 0, the initial state
    sparse: np.ndarray | None = None  # [N, M] observed frame-0 points
    shifts: np.ndarray | None = None  # [N, len(axes)] cells
    shift_axes: tuple[int, ...] = ()
    query: TrajectoryDataset | None = None  # truth on other points (spatial super-resolution); None: source
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def lead_times(self) -> np.ndarray:
        return self.source.times[self.frames] - self.source.times[0]


def _fraction_key(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _multiples_of(times: np.ndarray, dtau: float) -> np.ndarray:
    """Indices of the lead times that are whole multiples of ``dtau`` (up to a relative tolerance)."""
    ratio = times / dtau
    return np.flatnonzero(np.abs(ratio - np.round(ratio)) < 1e-4)


def _check_fine(dataset: TrajectoryDataset, fine: TrajectoryDataset) -> None:
    if fine.values.shape[0] != dataset.values.shape[0] or fine.values.shape[2:] != dataset.values.shape[2:]:
        raise ValueError(
            f"the fine dataset must hold the same trajectories on the same points: found values of shape "
            f"{fine.values.shape} against the dataset's {dataset.values.shape} ([N, T, M, C], T may differ)."
        )
    if not np.allclose(fine.coords, dataset.coords, rtol=1e-5, atol=1e-6):
        raise ValueError("the fine dataset's coordinates differ from the dataset's: they must be the same points.")
    a, b = fine.values[:, 0], dataset.values[:, 0]
    scale = float(np.nanmax(np.abs(b))) if np.isfinite(b).any() else 1.0
    if not np.allclose(a, b, rtol=1e-4, atol=1e-5 * scale, equal_nan=True):
        raise ValueError(
            "the fine dataset's frame 0 differs from the dataset's: temporal super-resolution needs the same "
            "trajectories (same order) sampled at a finer frame interval."
        )


def _check_native(dataset: TrajectoryDataset, native: TrajectoryDataset) -> None:
    """``native`` must hold the same trajectories, frames and variables as ``dataset`` on other points."""
    if native.values.shape[0] != dataset.values.shape[0] or native.values.shape[1] != dataset.values.shape[1]:
        raise ValueError(
            f"the native dataset must hold the same trajectories and frames: found values of shape "
            f"{native.values.shape} against the dataset's {dataset.values.shape} ([N, T, M, C], M may differ)."
        )
    if tuple(native.variables) != tuple(dataset.variables) or tuple(native.axes) != tuple(dataset.axes):
        raise ValueError(
            f"the native dataset has variables {list(native.variables)} on axes {list(native.axes)}; expected "
            f"{list(dataset.variables)} on {list(dataset.axes)} like the dataset."
        )
    if not np.allclose(native.times - native.times[0], dataset.times - dataset.times[0], rtol=1e-5, atol=1e-6):
        raise ValueError("the native dataset's lead times differ from the dataset's: they must be the same frames.")


def _settings(
    dataset, fine, dtaus, sparse_fractions, shift, periodic_axes, seed, native=None
) -> list[_Setting]:
    every = np.arange(dataset.num_frames)
    settings = [_Setting("standard", "standard", dataset, every)]
    if fine is not None:
        _check_fine(dataset, fine)
        fine_lead = fine.times - fine.times[0]
        for dtau in dtaus:
            if not dtau > 0:
                raise ValueError(f"dtau must be positive, found {dtau}.")
            frames = _multiples_of(fine_lead, float(dtau))
            if frames.size < 2:
                raise ValueError(
                    f"the fine dataset has no frame at a multiple of dtau = {dtau} beyond frame 0; its lead times "
                    f"are {fine_lead[:6]}{'...' if fine_lead.size > 6 else ''}."
                )
            settings.append(_Setting(f"dtau_{dtau:g}", f"dtau {dtau:g}", fine, frames, extra={"dtau": float(dtau)}))
    for fraction in sparse_fractions:
        masks = sparse_observation_masks(dataset, float(fraction), seed)
        observed = dataset.mask[:, 0].sum(axis=1)
        settings.append(
            _Setting(
                f"sparse_{_fraction_key(fraction)}",
                f"sparse {_fraction_key(fraction).replace('%', ' %')}",
                dataset,
                every,
                sparse=masks,
                extra={
                    "fraction": float(fraction),
                    "observed_points": masks.sum(axis=1).tolist(),
                    "observed_fraction": float(np.mean(masks.sum(axis=1) / np.maximum(observed, 1))),
                },
            )
        )
    if shift:
        shifts = periodic_shifts(dataset, periodic_axes, seed)
        grid_periods(dataset, periodic_axes)  # validates that the axes are periodic
        settings.append(
            _Setting(
                "shifted",
                "shifted",
                dataset,
                every,
                shifts=shifts,
                shift_axes=tuple(_grid_axis(dataset, a) for a in periodic_axes),
                extra={"shift_axes": list(periodic_axes), "shifts_cells": shifts.tolist()},
            )
        )
    if native is not None:
        _check_native(dataset, native)
        shape = "x".join(map(str, native.grid_shape)) if native.grid_shape is not None else f"{native.coords.shape[0]} points"
        settings.append(
            _Setting(
                "zero_shot",
                f"zero-shot {shape}",
                dataset,
                every,
                query=native,
                extra={"query_points": int(native.coords.shape[0]), "query_grid_shape": native.grid_shape and list(native.grid_shape)},
            )
        )
    return settings


def _resolve_periodic_axes(dataset: TrajectoryDataset, periodic_axes, shift: bool) -> tuple[str, ...]:
    if periodic_axes is not None:
        periodic_axes = tuple(periodic_axes)
        for a in periodic_axes:
            _grid_axis(dataset, a)
        return periodic_axes
    if tuple(dataset.axes) == ("latitude", "longitude") and dataset.grid_shape is not None:
        return ("longitude",)
    if shift:
        raise ValueError(
            f"say which axes are periodic for the shifted protocol: the dataset's axes are {tuple(dataset.axes)}; "
            "pass e.g. periodic_axes=('y', 'x') on the torus, or shift=False."
        )
    return ()


def _check_prediction(pred, expected: tuple[int, ...], who: str) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.shape != expected:
        raise ValueError(f"{who}.predict returned shape {pred.shape}; expected [B, T, Q, C] = {expected}.")
    return pred


def _summary(sums, totals, times, horizon_time) -> dict:
    per_frame = _mean_over_trajectories(sums, totals)
    return {**split_mse(per_frame, times, horizon_time), "per_frame": per_frame.tolist()}


def _run_setting(
    s: _Setting, dataset, forecasters: dict, batches, latitude_weighted, scales, horizon_time, bar
) -> dict:
    """Forecast every batch of one setting with each forecaster; the setting's entry of the results."""
    n, t, coords, times = dataset.num_trajectories, len(s.frames), dataset.coords, s.lead_times
    target = s.query if s.query is not None else s.source
    query_coords = target.coords
    kinds = {"plain": None}
    if latitude_weighted:
        kinds["lat_weighted"] = latitude_weights(target)
    c = len(dataset.variables)
    # [forecaster][kind] -> [N, T, C] weighted squared-error sums and weight totals per channel (data units)
    acc = {who: {k: (np.zeros((n, t, c)), np.zeros((n, t, c))) for k in kinds} for who in forecasters}
    for idx in batches:
        truth = target.values[idx][:, s.frames]
        if s.shifts is not None:
            truth = np.stack(
                [roll_grid(truth[j], dataset.grid_shape, s.shift_axes, s.shifts[i]) for j, i in enumerate(idx)]
            )
        initial = (truth[:, 0] if s.query is None else s.source.values[idx][:, 0]).copy()
        if s.sparse is not None:
            initial[~s.sparse[idx]] = np.nan
        expected = (len(idx), t, query_coords.shape[0], truth.shape[-1])
        for who, (forecaster, label) in forecasters.items():
            pred = _check_prediction(forecaster.predict(coords, initial, times, query_coords), expected, label)
            for kind, w in kinds.items():
                sums, totals = _channel_sums(pred, truth, weights=w)
                acc[who][kind][0][idx], acc[who][kind][1][idx] = sums, totals
        bar.update(1)
    entry = {"label": s.label, "times": times.tolist()}
    for who in forecasters:
        entry[who] = _summary(*_frame_sums(*acc[who]["plain"], scales), times, horizon_time)
        if latitude_weighted:
            entry[who]["lat_weighted"] = _summary(*_frame_sums(*acc[who]["lat_weighted"], scales), times, horizon_time)
        entry[who]["per_variable"] = {
            var: {f"{kind}_per_frame": _mean_over_trajectories(*(a[..., j] for a in acc[who][kind])).tolist() for kind in kinds}
            for j, var in enumerate(dataset.variables)
        }
    entry.update(s.extra)
    return entry


def evaluate(
    model: ArrayForecaster,
    dataset: TrajectoryDataset,
    *,
    horizon_time: float,
    fine: TrajectoryDataset | None = None,
    dtaus: Sequence[float] = (1.0, 0.5, 0.25),
    sparse_fractions: Sequence[float] = (0.5, 0.05),
    shift: bool = True,
    periodic_axes: Sequence[str] | None = None,
    latitude_weighted: bool = False,
    native: TrajectoryDataset | None = None,
    variable_scales: Sequence[float] | None = None,
    persistence: ArrayForecaster | None = None,
    name: str | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Evaluate ``model`` and persistence on one split under every protocol setting (see the module doc).

    Args:
        model: any :class:`ArrayForecaster`; queried at the dataset's points, in batches of trajectories.
        dataset: the split; its frame 0 is the initial state, its times (minus ``times[0]``) the lead times.
        horizon_time: the training horizon as a lead time: ``t < horizon_time`` is ``t_in`` (frame 0
            included), the rest ``t_out``; e.g. 10.0 for Navier-Stokes with 20 frames at dt = 1.
        fine: the same trajectories (same order, points and frame 0) at a finer frame interval, e.g. 0.25:
            adds the temporal super-resolution settings ``dtau_<d>`` for ``d`` in ``dtaus``.
        sparse_fractions: adds ``sparse_<p>%`` for each fraction (see :func:`sparse_observation_masks`).
        shift: adds ``shifted`` (grids only): each trajectory rolled by :func:`periodic_shifts` cells along
            ``periodic_axes``.
        periodic_axes: the periodic grid axes, e.g. ``("y", "x")`` on the torus; None: ``("longitude",)`` on
            latitude/longitude grids, and required on other grids when ``shift``. Also sets the periods of
            the default persistence's nearest-neighbour search.
        latitude_weighted: also report the cos(latitude)-weighted MSE (grids with a 'latitude' axis).
        native: the same trajectories and frames on a finer grid (or other points): adds ``zero_shot``, the
            forecast from the dataset's frame 0 queried at ``native``'s points and scored against it.
        variable_scales: ``[C]`` factors multiplying each channel's error (report in other units than the
            file's); None: the file's units.
        persistence: the floor; default :meth:`Persistence.for_dataset`.
        name: the model's name in the results (default: its class name).
        seed: seeds the sparse masks and the shifts: the same for every model given the seed.
        batch_size: trajectories per ``predict`` call; progress: show a tqdm bar.

    Returns:
        A JSON-serialisable dict::

            {"model": str, "baseline": "persistence",
             "dataset": {"num_trajectories", "num_points", "grid_shape", "axes", "variables", "units",
                         "time_units", "times"},
             "protocol": {"horizon_time", "seed", "batch_size", "dtaus", "sparse_fractions",
                          "periodic_axes", "latitude_weighted", "variable_scales"},
             "settings": {key: {"label": str, "times": [T] lead times,
                                "model": {"t_in", "t_out", "per_frame": [T]
                                          [, "lat_weighted": {"t_in", "t_out", "per_frame"}],
                                          "per_variable": {variable: {"plain_per_frame": [T]
                                                           [, "lat_weighted_per_frame": [T]]}}},
                                "persistence": {same},
                                ...setting extras: dtau; fraction, observed_points, observed_fraction;
                                   shift_axes, shifts_cells}}}

        with keys ``standard``, ``dtau_1``, ``dtau_0.5``, ``dtau_0.25``, ``sparse_50%``, ``sparse_5%``,
        ``shifted``, ``zero_shot`` (those enabled), in that order. ``t_in``/``t_out`` are None for an empty group; a model
        that returns NaN where the truth is observed gets NaN. ``per_variable`` holds each variable's MSE per
        frame in the file's units (``variable_scales`` not applied); its square root is the RMSE.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, ArrayForecaster):
        raise ValueError(
            f"model must have a predict(coords, initial_values, times, query_coords) method; got {type(model).__name__}."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}.")
    if not math.isfinite(horizon_time):
        raise ValueError(f"horizon_time must be finite, found {horizon_time}.")
    periodic_axes = _resolve_periodic_axes(dataset, periodic_axes, shift)
    if latitude_weighted:
        latitude_weights(dataset)  # fails early on a dataset without latitude
    scales = None
    if variable_scales is not None:
        scales = np.asarray(variable_scales, np.float64)
        if scales.shape != (len(dataset.variables),) or not np.all(np.isfinite(scales)) or np.any(scales <= 0):
            raise ValueError(
                f"variable_scales must be {len(dataset.variables)} positive finite factors (one per variable "
                f"{list(dataset.variables)}), found {list(np.ravel(variable_scales))}."
            )
    if persistence is None:
        persistence = Persistence.for_dataset(dataset, periodic_axes)
    settings = _settings(dataset, fine, dtaus, sparse_fractions, shift, periodic_axes, seed, native)
    name = type(model).__name__ if name is None else str(name)

    n = dataset.num_trajectories
    batches = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    forecasters = {"model": (model, name), "persistence": (persistence, "persistence")}
    results = {}
    total = len(settings) * len(batches)
    with tqdm(total=total, desc=f"evaluate {name}", unit="batch", disable=not progress) as bar:
        for s in settings:
            bar.set_postfix_str(s.key)
            results[s.key] = _run_setting(s, dataset, forecasters, batches, latitude_weighted, scales, horizon_time, bar)

    return {
        "model": name,
        "baseline": "persistence",
        "dataset": {
            "num_trajectories": int(n),
            "num_points": int(dataset.coords.shape[0]),
            "grid_shape": None if dataset.grid_shape is None else list(dataset.grid_shape),
            "axes": list(dataset.axes),
            "variables": list(dataset.variables),
            "units": list(dataset.units),
            "time_units": dataset.time_units,
            "times": np.asarray(dataset.times).tolist(),
        },
        "protocol": {
            "horizon_time": float(horizon_time),
            "seed": int(seed),
            "batch_size": int(batch_size),
            "dtaus": [float(d) for d in dtaus] if fine is not None else [],
            "sparse_fractions": [float(f) for f in sparse_fractions],
            "periodic_axes": list(periodic_axes) if shift else [],
            "latitude_weighted": bool(latitude_weighted),
            "variable_scales": None if scales is None else scales.tolist(),
        },
        "settings": results,
    }


# ---------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------


def _time_units(data: dict) -> str:
    units = str(data.get("time_units", "1"))
    return "" if units in ("", "1") else f" ({units})"


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2e}"


def _metrics_table(settings: dict, kind: str | None) -> list[str]:
    lines = [
        "| setting | model t_in | model t_out | persistence t_in | persistence t_out |",
        "|---|---|---|---|---|",
    ]
    for entry in settings.values():
        m, p = entry["model"], entry["persistence"]
        if kind is not None:
            m, p = m[kind], p[kind]
        lines.append(f"| {entry['label']} | {_fmt(m['t_in'])} | {_fmt(m['t_out'])} | {_fmt(p['t_in'])} | {_fmt(p['t_out'])} |")
    return lines


def render_markdown(results: dict, *, title: str) -> str:
    """The report of :func:`evaluate`'s results as markdown: a table of the settings (MSE t_in / t_out of
    model and persistence), a latitude-weighted one when present, and the MSE per lead time."""
    settings = results["settings"]
    protocol, data = results.get("protocol", {}), results.get("dataset", {})
    horizon = protocol.get("horizon_time")
    lines = [f"# {title}", ""]
    lines.append(
        f"Model: **{results.get('model', '?')}** against persistence; {data.get('num_trajectories', '?')} trajectories, "
        f"{data.get('num_points', '?')} points, variables {', '.join(data.get('variables', []))} "
        f"({', '.join(data.get('units', []))}); training horizon: lead time < {horizon}{_time_units(data)}; "
        f"seed {protocol.get('seed')}."
    )
    scales = protocol.get("variable_scales")
    units = "the data's units" if not scales else "the data's units times the factors " + ", ".join(
        f"{v} x {f:.6g}" for v, f in zip(data.get("variables", []), scales)
    )
    lines += ["", f"Plain MSE in {units} over all points and channels, averaged over trajectories; "
              "t_in includes frame 0.", ""]
    lines += _metrics_table(settings, None)
    weighted = any("lat_weighted" in e["model"] for e in settings.values())
    if weighted:
        lines += ["", "## Latitude-weighted MSE (cos latitude, mean weight 1)", ""]
        lines += _metrics_table(settings, "lat_weighted")
    if "standard" in settings:
        s = settings["standard"]
        lines += ["", "## MSE per lead time (standard protocol)", ""]
        header = "| frame | lead time | part | model | persistence |"
        rule = "|---|---|---|---|---|"
        if weighted:
            header += " model (lat-weighted) | persistence (lat-weighted) |"
            rule += "---|---|"
        lines += [header, rule]
        for i, t in enumerate(s["times"]):
            part = "t_in" if horizon is None or _is_in(np.asarray([t]), horizon)[0] else "t_out"
            row = f"| {i} | {t:g} | {part} | {_fmt(s['model']['per_frame'][i])} | {_fmt(s['persistence']['per_frame'][i])} |"
            if weighted:
                row += (
                    f" {_fmt(s['model']['lat_weighted']['per_frame'][i])} |"
                    f" {_fmt(s['persistence']['lat_weighted']['per_frame'][i])} |"
                )
            lines.append(row)
    return "\n".join(lines) + "\n"


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Raise FileExistsError if ``path`` exists and ``overwrite`` is False; return it as a Path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' already exists; pass overwrite=True to replace it.")
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(results: dict, out_dir: str | os.PathLike, *, title: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``metrics.json`` (the results as they are) and ``metrics.md`` (:func:`render_markdown`) into
    ``out_dir`` (created if missing), each atomically.

    Raises:
        FileExistsError: naming the file, if either exists and ``overwrite`` is False (nothing is written).

    Returns:
        The paths of the JSON and markdown files.
    """
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "metrics.json", out_dir / "metrics.md"
    for p in (json_path, md_path):
        check_writable(p, overwrite)
    text = render_markdown(results, title=title)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json_atomic(json_path, results)
    write_text_atomic(md_path, text)
    return json_path, md_path
