"""The trajectory schema: datasets of fields over time on a fixed set of points, read through xarray.

A trajectory dataset is an ``xr.Dataset`` whose data variables have the dimensions
``(trajectory, time, *space)``, where ``space`` is either

* a grid: two dimensions with 1-D coordinate variables, e.g. ``(y, x)`` on the torus or
  ``(latitude, longitude)`` on the sphere; or
* scattered points: one dimension (``point``) with one coordinate variable per axis on it, e.g.
  ``x(point)``, ``y(point)`` or ``latitude(point)``, ``longitude(point)``.

A dataset without a ``trajectory`` dimension is read as a single trajectory. ``time`` is a float (in the
units its attribute gives) or a ``datetime64`` (converted to hours since the first time). NaN values are
missing observations: :attr:`TrajectoryDataset.mask` is False there and they never enter a loss.

Coordinates are flattened to ``coords [M, D]`` in the order of the spatial dimensions (``(y, x)`` or
``(latitude, longitude)``), the user-coordinate convention of :mod:`enfpde.geometry`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import xarray as xr
from omegaconf import DictConfig, OmegaConf

TRAJECTORY_DIM = "trajectory"
TIME_DIM = "time"
POINT_DIM = "point"

# Recognised names of spatial axes, in the order coordinates are given to geometries.
GRID_AXES = (("y", "x"), ("latitude", "longitude"))


class SchemaError(ValueError):
    """A dataset does not follow the trajectory schema; the message says what was found and expected."""


def open_dataset(path: str | os.PathLike) -> xr.Dataset:
    """Open a netCDF file (``.nc``) or a zarr store (``.zarr`` directory) lazily with xarray."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at '{path}': expected a netCDF file (.nc) or a zarr store (.zarr).")
    is_zarr_store = path.is_dir() and ((path / "zarr.json").exists() or (path / ".zgroup").exists())
    if path.is_dir() and not (path.suffix == ".zarr" or is_zarr_store):
        raise SchemaError(f"'{path}' is a directory but not a zarr store (no zarr.json or .zgroup inside).")
    if not path.is_dir() and path.stat().st_size == 0:
        raise SchemaError(f"'{path}' is empty (0 bytes): expected a netCDF file or a zarr store.")
    try:
        if path.is_dir():
            return xr.open_zarr(path)
        return xr.open_dataset(path, engine="netcdf4")
    except PermissionError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        kind = "zarr store" if path.is_dir() else "netCDF file"
        raise SchemaError(
            f"cannot read '{path}' as a {kind} ({type(error).__name__}: {str(error)[:200]}): is it complete, and a "
            f"netCDF-3/4 file or zarr store rather than GRIB or text?"
        ) from None


def grid_points(axis_values) -> np.ndarray:
    """The points of the grid spanned by 1-D ``axis_values`` (one array per axis), row-major: ``[M, D]``."""
    mesh = np.meshgrid(*axis_values, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=-1)


def _spatial_layout(ds: xr.Dataset, dims: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """Return the names of the coordinate axes and the grid shape (None for scattered points)."""
    if dims == (POINT_DIM,):
        for axes in GRID_AXES:
            if all(a in ds.variables and ds[a].dims == (POINT_DIM,) for a in axes):
                return axes, None
        raise SchemaError(
            f"scattered points need one coordinate variable per axis on the '{POINT_DIM}' dimension, one of "
            f"{[list(a) for a in GRID_AXES]}; found variables {sorted(map(str, ds.variables))}."
        )
    if dims in GRID_AXES:
        for d in dims:
            if d not in ds.coords or ds[d].dims != (d,):
                raise SchemaError(f"grid dimension '{d}' needs a 1-D coordinate variable '{d}({d})'.")
        return dims, tuple(ds.sizes[d] for d in dims)
    raise SchemaError(
        f"unrecognised spatial dimensions {list(dims)}: expected a grid {[list(a) for a in GRID_AXES]} or "
        f"scattered points ['{POINT_DIM}']."
    )


def _times_as_float(time: xr.DataArray) -> tuple[np.ndarray, str]:
    """Times as float64 and their units; datetimes become hours since the first time."""
    values = time.values
    if np.issubdtype(values.dtype, np.datetime64):
        hours = (values - values[0]) / np.timedelta64(1, "h")
        return hours.astype(np.float64), f"hours since {np.datetime_as_string(values[0], unit='s')}"
    if not np.issubdtype(values.dtype, np.number):
        raise SchemaError(f"'time' must be numeric or datetime64, found dtype {values.dtype}.")
    return values.astype(np.float64), str(time.attrs.get("units", "1"))


def check_monotone_times(times: np.ndarray, what: str = "time") -> None:
    """Raise if ``times`` is not a finite, strictly increasing 1-D array."""
    times = np.asarray(times)
    if times.ndim != 1 or times.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array, found shape {times.shape}.")
    if not np.all(np.isfinite(times)):
        raise ValueError(f"{what} must be finite, found {times[~np.isfinite(times)][:5]}.")
    if times.size > 1 and np.any(np.diff(times) <= 0):
        i = int(np.argmax(np.diff(times) <= 0))
        raise ValueError(f"{what} must be strictly increasing, found {times[i]} followed by {times[i + 1]} at index {i}.")


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Per-channel affine normalisation ``(v - mean) / std``, fitted on the training split.

    Attributes:
        mean, std: ``[C]`` in the data's units.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> Normalizer:
        """Statistics of ``values [..., C]`` over every axis but the last, ignoring NaNs (missing points)."""
        flat = np.asarray(values, np.float64).reshape(-1, values.shape[-1])
        mean, std = np.nanmean(flat, axis=0), np.nanstd(flat, axis=0)
        if not np.all(np.isfinite(mean)):
            raise ValueError("cannot fit normalisation statistics: a channel has no finite value.")
        return cls(mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32))

    def normalize(self, values):
        return (values - self.mean) / self.std

    def denormalize(self, values):
        return values * self.std + self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


@dataclasses.dataclass
class TrajectoryDataset:
    """Trajectories of a multi-channel field on a fixed set of points, loaded into memory.

    Attributes:
        values: ``[N, T, M, C]`` float32 in the data's units; NaN where not observed.
        coords: ``[M, D]`` user coordinates in the order of ``axes``.
        times: ``[T]`` float64, strictly increasing, in ``time_units``.
        variables: the ``C`` variable names; ``units`` their units.
        axes: the spatial axis names, e.g. ``("y", "x")``; ``grid_shape`` the grid, or None for points.
        attrs: the file's global attributes.
    """

    values: np.ndarray
    coords: np.ndarray
    times: np.ndarray
    variables: tuple[str, ...]
    units: tuple[str, ...]
    axes: tuple[str, ...]
    grid_shape: tuple[int, ...] | None
    time_units: str = "1"
    attrs: dict = dataclasses.field(default_factory=dict)
    axis_values: tuple[np.ndarray, ...] | None = None  # the 1-D grid coordinates, for grids

    @property
    def mask(self) -> np.ndarray:
        """``[N, T, M]``: True where every channel is observed."""
        return np.all(np.isfinite(self.values), axis=-1)

    @property
    def num_trajectories(self) -> int:
        return self.values.shape[0]

    @property
    def num_frames(self) -> int:
        return self.values.shape[1]

    @classmethod
    def open(cls, path: str | os.PathLike, variables: Sequence[str] | None = None) -> TrajectoryDataset:
        """Read a netCDF file or zarr store; see :func:`from_xarray`."""
        ds = open_dataset(path)
        try:
            return cls.from_xarray(ds, variables, source=str(path))
        finally:
            ds.close()

    @classmethod
    def from_xarray(
        cls, ds: xr.Dataset, variables: Sequence[str] | None = None, *, source: str = "the dataset"
    ) -> TrajectoryDataset:
        """Validate ``ds`` against the schema and load the selected variables (all by default)."""
        if TIME_DIM not in ds.dims:
            raise SchemaError(f"{source} has no '{TIME_DIM}' dimension; found dimensions {list(ds.dims)}.")
        if TRAJECTORY_DIM not in ds.dims:
            ds = ds.expand_dims(TRAJECTORY_DIM)
        # Fields are floating-point variables over (trajectory, time, *space); a boolean 'mask' is not one.
        candidates = [
            name
            for name, v in ds.data_vars.items()
            if v.dims[:2] == (TRAJECTORY_DIM, TIME_DIM) and v.ndim > 2 and np.issubdtype(v.dtype, np.floating)
        ]
        if variables is None:
            variables = candidates
        missing = [v for v in variables if v not in ds.data_vars]
        if missing:
            raise KeyError(f"unknown variable(s) {missing} in {source}; available: {candidates}.")
        if not variables:
            raise SchemaError(f"{source} has no variable with dimensions ({TRAJECTORY_DIM}, {TIME_DIM}, ...).")
        dims = ds[variables[0]].dims
        for v in variables:
            if ds[v].dims != dims:
                raise SchemaError(f"variable '{v}' has dimensions {ds[v].dims}; expected {dims} like '{variables[0]}'.")
        if dims[:2] != (TRAJECTORY_DIM, TIME_DIM):
            raise SchemaError(f"variables must have dimensions ({TRAJECTORY_DIM}, {TIME_DIM}, *space); found {dims}.")
        axes, grid_shape = _spatial_layout(ds, dims[2:])
        times, time_units = _times_as_float(ds[TIME_DIM])
        check_monotone_times(times, f"'time' in {source}")
        if grid_shape is None:
            coords = np.stack([ds[a].values for a in axes], axis=-1)
            axis_values = None
        else:
            axis_values = tuple(ds[a].values.astype(np.float64) for a in axes)
            coords = grid_points(axis_values)
        if not np.all(np.isfinite(coords)):
            raise SchemaError(f"coordinates of {source} contain non-finite values.")
        n, t = ds.sizes[TRAJECTORY_DIM], ds.sizes[TIME_DIM]
        values = np.stack([ds[v].values.astype(np.float32).reshape(n, t, -1) for v in variables], axis=-1)
        return cls(
            values=values,
            coords=coords.astype(np.float32),
            times=times,
            variables=tuple(variables),
            units=tuple(str(ds[v].attrs.get("units", "1")) for v in variables),
            axes=axes,
            grid_shape=grid_shape,
            time_units=time_units,
            attrs=dict(ds.attrs),
            axis_values=axis_values,
        )

    def select(self, trajectories=None, frames=None) -> TrajectoryDataset:
        """A view on some trajectories (index array or slice) and frames."""
        trajectories = slice(None) if trajectories is None else trajectories
        frames = slice(None) if frames is None else frames
        return dataclasses.replace(self, values=self.values[trajectories][:, frames], times=self.times[frames])

    def fit_normalizer(self) -> Normalizer:
        """Per-channel statistics over all trajectories, frames and points of this (training) split."""
        return Normalizer.fit(self.values)

    def to_xarray(self, values: np.ndarray | None = None, times: np.ndarray | None = None) -> xr.Dataset:
        """This dataset (or other ``values [N, T, M, C]`` on the same points) as an xarray Dataset."""
        values = self.values if values is None else values
        times = self.times if times is None else times
        n, t = values.shape[:2]
        if self.grid_shape is None:
            space_dims, space_shape = (POINT_DIM,), (values.shape[2],)
            coords = {a: ((POINT_DIM,), self.coords[:, i]) for i, a in enumerate(self.axes)}
        else:
            space_dims, space_shape = self.axes, self.grid_shape
            coords = {a: ((a,), v) for a, v in zip(self.axes, self.axis_values)}
        data_vars = {
            name: ((TRAJECTORY_DIM, TIME_DIM, *space_dims), values[..., c].reshape(n, t, *space_shape), {"units": u})
            for c, (name, u) in enumerate(zip(self.variables, self.units))
        }
        coords[TIME_DIM] = ((TIME_DIM,), times, {"units": self.time_units})
        return xr.Dataset(data_vars, coords=coords, attrs=self.attrs)


@dataclasses.dataclass(frozen=True)
class Batch:
    """A training batch at a random subset of points shared by all fields.

    Attributes:
        coords: ``[P, D]`` user coordinates; values: ``[B, T, P, C]`` normalised, missing points zero;
        mask: ``[B, T, P]`` observed points; trajectories: ``[B]`` indices into the dataset;
        start_frames: ``[B]`` the frame (of the sampler's frames) each trajectory's window starts at.
    """

    coords: np.ndarray
    values: np.ndarray
    mask: np.ndarray
    trajectories: np.ndarray
    start_frames: np.ndarray


class BatchSampler:
    """Deterministic batches of trajectories at random point subsets.

    The batch of step ``s`` is a pure function of ``(seed, s)``: trajectories follow a fresh permutation every
    epoch (incomplete last batches are dropped, so every batch has the same shape and one compiled step
    serves all), and points a fresh random subset every step. A resumed run therefore continues exactly the
    sequence an uninterrupted one would have seen.

    Args:
        dataset: the training split; normalizer: applied to the values.
        batch_size: trajectories per batch; num_points: points per batch (all points if None or >= M).
        frames: which frames to use (e.g. the training horizon ``slice(0, 10)``).
        seed: the data seed.
        permutations: ``[K, M]`` point permutations of a symmetry of the data (e.g.
            ``augmentation.quarter_turn_permutations``); each trajectory of a batch is then transformed by a random
            one of them (a pure function of ``(seed, step)`` too). None: no augmentation.
        window: each trajectory contributes this many consecutive frames (of ``frames``) from a random start,
            drawn per trajectory and step (a pure function of ``(seed, step)`` too); None: all of ``frames``. For
            dynamics that do not depend on absolute time, every window of a trajectory is a training sample.
    """

    def __init__(
        self,
        dataset: TrajectoryDataset,
        normalizer: Normalizer,
        batch_size: int,
        num_points: int | None,
        frames=slice(None),
        seed: int = 0,
        permutations: np.ndarray | None = None,
        window: int | None = None,
    ):
        if batch_size > dataset.num_trajectories:
            raise ValueError(
                f"batch size {batch_size} exceeds the {dataset.num_trajectories} trajectories of the training split."
            )
        self.values = np.nan_to_num(normalizer.normalize(dataset.values[:, frames]), nan=0.0).astype(np.float32)
        self.mask = dataset.mask[:, frames]
        self.coords = dataset.coords
        self.batch_size = batch_size
        m = dataset.coords.shape[0]
        self.num_points = m if num_points is None or num_points >= m else int(num_points)
        self.seed = int(seed)
        self.steps_per_epoch = dataset.num_trajectories // batch_size
        if permutations is not None and (permutations.ndim != 2 or permutations.shape[1] != m):
            raise ValueError(f"permutations must be [K, {m}] (one per symmetry, over the file's points); found {permutations.shape}.")
        self.permutations = permutations
        num_frames = self.values.shape[1]
        if window is not None and not 1 <= window <= num_frames:
            raise ValueError(f"window must be in [1, {num_frames}] (the sampler's frames), found {window}.")
        self.window = window

    def __call__(self, step: int, rows: slice = slice(None)) -> Batch:
        """The batch of ``step``; with ``rows``, only those rows of it (the share of one process of a
        multi-process run: the batch's trajectories and points are those of the whole batch)."""
        epoch, index = divmod(int(step), self.steps_per_epoch)
        order = np.random.default_rng([self.seed, 0, epoch]).permutation(self.values.shape[0])
        trajectories = np.sort(order[index * self.batch_size : (index + 1) * self.batch_size])
        m = self.coords.shape[0]
        points = np.random.default_rng([self.seed, 1, step]).choice(m, self.num_points, replace=False) if self.num_points < m else np.arange(m)
        # Draws for the whole batch, then this process's rows: every process sees the same batch.
        starts = np.zeros(len(trajectories), np.int64)
        if self.window is not None:
            starts = np.random.default_rng([self.seed, 3, step]).integers(self.values.shape[1] - self.window + 1, size=len(trajectories))
        if self.permutations is not None:
            symmetry = np.random.default_rng([self.seed, 2, step]).integers(len(self.permutations), size=len(trajectories))[rows]
        trajectories, starts = trajectories[rows], starts[rows]
        if self.window is None:
            values, mask = self.values[trajectories], self.mask[trajectories]  # [b, T, M, C], [b, T, M]
        else:
            frames = starts[:, None] + np.arange(self.window)  # [b, W]
            values, mask = self.values[trajectories[:, None], frames], self.mask[trajectories[:, None], frames]
        if self.permutations is None:
            values, mask = values[:, :, points], mask[:, :, points]
        else:  # the value at a point is the untransformed field's at the permuted point
            source = self.permutations[symmetry][:, points]  # [b, P]
            values = np.take_along_axis(values, source[:, None, :, None], axis=2)
            mask = np.take_along_axis(mask, source[:, None, :], axis=2)
        return Batch(coords=self.coords[points], values=values, mask=mask, trajectories=trajectories, start_frames=starts)

    def iterate(self, first_step: int, last_step: int) -> Iterator[tuple[int, Batch]]:
        for step in range(first_step, last_step):
            yield step, self(step)


def save_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def write_netcdf_atomic(dataset: xr.Dataset, target: Path, fields: Sequence[str], *, overwrite: bool) -> None:
    """Write ``dataset`` as netCDF-4 next to ``target`` under a temporary name, then rename it into place.

    ``fields`` (variables ``[trajectory, time, ...]``) are stored one trajectory per chunk with shuffle + zlib
    level 1, which saves about 20 % on smooth fields at little cost; no variable gets a fill value. A file
    that appears at ``target`` meanwhile is not replaced unless ``overwrite``; the temporary file never stays.
    """
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    encoding = {name: {"_FillValue": None} for name in list(dataset.variables)}
    for name in fields:
        chunks = (1, *dataset[name].shape[1:])
        encoding[name].update(chunksizes=chunks, zlib=True, complevel=1, shuffle=True)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates the file private; give it the usual permissions
        dataset.to_netcdf(temporary, engine="netcdf4", format="NETCDF4", encoding=encoding)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} appeared while it was being generated; pass overwrite=True to replace it.")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_config_source(source, config_type: type) -> tuple[str, DictConfig, Optional[Path]]:
    """The raw node of a dataset config given as a ``config_type`` instance, a mapping or a YAML path.

    Returns ``(where, node, base)``: ``where`` names the source for error messages ("config 'name'",
    "dataset config", "dataset config path.yaml"), ``node`` is the unvalidated OmegaConf node, and ``base`` is
    the YAML file's directory (``None`` for a config or a mapping), against which relative paths in it resolve.

    Raises:
      ValueError: a path that is no file, or a YAML file whose top level is not a mapping.
    """
    if isinstance(source, config_type):
        return f"config {source.name!r}", OmegaConf.structured(source), None
    if isinstance(source, Mapping):
        return "dataset config", OmegaConf.create(dict(source)), None
    where = f"dataset config {os.fspath(source)}"
    if not Path(source).is_file():
        raise ValueError(f"{where}: no such file.")
    node = OmegaConf.load(source)
    if not isinstance(node, Mapping):
        raise ValueError(f"{where}: expected a mapping at the top level, found a list.")
    return where, node, Path(source).resolve().parent


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")
