"""ERA5 reanalysis as trajectory datasets: read ERA5 as users get it, select, normalise, cut into windows.

The pipeline, each step a Dataset in and a Dataset out (inputs are never modified):

1. :func:`open_era5` reads a GRIB file (through cfgrib), a Copernicus CDS netCDF file (old or new layout), a
   WeatherBench2-style zarr store, or a directory of netCDF/GRIB files, into ONE canonical layout: variables
   named by ERA5 short name (``z``, ``t``, ``t2m`` ...; :data:`VARIABLES`), dims
   ``(member, time, level, latitude, longitude)`` (``member`` only for ensembles, ``level`` only for
   pressure-level variables), latitude ascending from the south, longitude ascending in ``[0, 360)``,
   ``time`` datetime64[ns] strictly increasing, ``level`` in hPa (int64). It stays lazy for single files.
2. :func:`select` applies an :class:`Era5Selection` (variables, levels, members, time range and stride, a
   latitude-longitude box, subsampling).
3. :func:`to_fields` flattens pressure levels into 2-D fields ``z500``, ``t850`` ... ``(member?, time, latitude,
   longitude)`` float32.
4. :func:`normalization` computes per-field mean and standard deviation; :func:`attach_normalization` stores them.
5. :func:`windows` cuts the fields into trajectories of ``num_frames`` frames ``lead_hours`` apart, in the
   package's trajectory schema (:mod:`enfpde.data.trajectories`).

:func:`generate_dataset` runs the pipeline for every split of a dataset YAML (``generator: era5``, schema
:class:`Era5Config`) and writes ``<output_dir>/<split>.nc``. The ``datasets/era5_quick.yaml`` set reads the
real ERA5 sample shipped beside the project (``ENFPDE_ERA5_SAMPLE`` overrides its path).

GRIB needs the optional extra ``pip install 'enfpde[grib]'`` (cfgrib + eccodes), imported only when a GRIB
file is read.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import pandas as pd
import xarray as xr
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from enfpde.data.trajectories import TIME_DIM, TRAJECTORY_DIM, Normalizer, read_config_source, write_netcdf_atomic

__all__ = [
    "Era5Config",
    "Era5Error",
    "Era5Selection",
    "Era5Variable",
    "TimeRange",
    "VARIABLES",
    "attach_normalization",
    "dataset_config_of",
    "generate_dataset",
    "generate_split",
    "initial_states",
    "load_config",
    "normalization",
    "normalizer",
    "open_era5",
    "read_normalization",
    "select",
    "to_fields",
    "windows",
]

GENERATOR = "era5"  # the dataset YAML's ``generator`` key that selects this module
CANONICAL_DIMS = ("member", "time", "level", "latitude", "longitude")
GRIB_SUFFIXES = (".grib", ".grib2", ".grb", ".grb2")
NETCDF_SUFFIXES = (".nc", ".nc4")
_DEGREE_TOLERANCE = 1e-6  # grid coordinates are compared to box edges and poles within this many degrees


class Era5Error(ValueError):
    """ERA5 input that cannot be read or selected as asked; the message says what was found and expected."""


# ------------------------------------------------------------------------------------------------ variables


@dataclasses.dataclass(frozen=True)
class Era5Variable:
    """One ERA5 parameter: its ``short`` name (GRIB/CDS), ``long`` name (WeatherBench2), SI ``units`` as ECMWF
    gives them, and whether ERA5 distributes it on pressure levels (the file's dims decide what a variable is:
    CDS calls the surface geopotential ``z`` too)."""

    short: str
    long: str
    units: str
    pressure_level: bool


VARIABLES: dict[str, Era5Variable] = {
    v.short: v
    for v in (
        # pressure levels
        Era5Variable("z", "geopotential", "m2 s-2", True),
        Era5Variable("t", "temperature", "K", True),
        Era5Variable("u", "u_component_of_wind", "m s-1", True),
        Era5Variable("v", "v_component_of_wind", "m s-1", True),
        Era5Variable("w", "vertical_velocity", "Pa s-1", True),
        Era5Variable("q", "specific_humidity", "kg kg-1", True),
        Era5Variable("r", "relative_humidity", "%", True),
        Era5Variable("vo", "vorticity", "s-1", True),
        Era5Variable("d", "divergence", "s-1", True),
        Era5Variable("pv", "potential_vorticity", "K m2 kg-1 s-1", True),
        # single levels
        Era5Variable("t2m", "2m_temperature", "K", False),
        Era5Variable("d2m", "2m_dewpoint_temperature", "K", False),
        Era5Variable("u10", "10m_u_component_of_wind", "m s-1", False),
        Era5Variable("v10", "10m_v_component_of_wind", "m s-1", False),
        Era5Variable("msl", "mean_sea_level_pressure", "Pa", False),
        Era5Variable("sp", "surface_pressure", "Pa", False),
        Era5Variable("tp", "total_precipitation", "m", False),
        Era5Variable("tcwv", "total_column_water_vapour", "kg m-2", False),
        Era5Variable("sst", "sea_surface_temperature", "K", False),
        Era5Variable("skt", "skin_temperature", "K", False),
        Era5Variable("tcc", "total_cloud_cover", "1", False),
        Era5Variable("tisr", "toa_incident_solar_radiation", "J m-2", False),
        Era5Variable("lsm", "land_sea_mask", "1", False),
    )
}
_SHORT_BY_LONG = {v.long: v.short for v in VARIABLES.values()}


def _unit_key(units: str) -> str:
    """A spelling-independent key: ``m**2 s**-2``, ``m^2 s^-2`` and ``m2 s-2`` agree; ``(0 - 1)`` is ``1``."""
    key = re.sub(r"[\s*^.]", "", str(units))
    return {"(0-1)": "1", "~": "1", "dimensionless": "1", "": "1"}.get(key, key)


# ------------------------------------------------------------------------------------------------ reading


def open_era5(path: str | os.PathLike) -> xr.Dataset:
    """Open ERA5 data in the canonical layout, whatever the source format.

    Sources: a GRIB file (``.grib``, ``.grib2``, ``.grb``, ``.grb2``; needs ``enfpde[grib]``), a CDS netCDF file
    (``.nc``; ``valid_time``/``pressure_level`` or ``time``/``level``; an ``expver`` axis of mixed ERA5/ERA5T
    files is merged), a zarr store (a ``.zarr`` directory, or any directory with ``zarr.json``/``.zgroup``), or a
    directory of netCDF and GRIB files, concatenated along time in time order (lazily when dask is
    installed, otherwise in memory).

    Canonical layout: data variables by short name (long names such as ``2m_temperature`` are renamed; names
    not in :data:`VARIABLES` are kept), with attrs ``long_name`` and ``units`` only, dims in the order
    ``(member, time, level, latitude, longitude)``:

    * ``member`` [int64]: ensemble members, only when the file has a ``number`` or ``member`` dimension;
    * ``time`` [datetime64[ns]]: the valid time, strictly increasing (a single time is an axis of length 1);
    * ``level`` [int64, hPa, ascending]: only on pressure-level variables;
    * ``latitude`` [float64, degrees_north]: regular, ascending (south pole first);
    * ``longitude`` [float64, degrees_east]: regular, in ``[0, 360)``, ascending (a regional file across 0
      degrees, e.g. -10..20, becomes two runs 0..20 and 350..357.5; ``Era5Selection.lon_range`` joins them).

    Non-index coordinates (``step``, ``expver``, a scalar ``number``, ``surface`` ...) are dropped, as are
    variables that are not on the latitude-longitude grid (bounds) and static fields without a time axis (their
    names go to the attribute ``static_variables``). Global attrs: ``era5_source`` (the path) and
    ``era5_format``.

    Raises:
      FileNotFoundError: nothing at ``path``.
      ImportError: a GRIB file without cfgrib installed.
      Era5Error: an unknown file type; no regular latitude-longitude grid (no 1-D latitude/longitude, unsorted or
        irregular spacing); no time axis, or times that are not strictly increasing (a single file is never
        reordered); overlapping files in a directory; units that contradict the variable's ERA5 units.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no ERA5 data at '{path}': expected a GRIB file ({', '.join(GRIB_SUFFIXES)}), a netCDF file "
            f"({', '.join(NETCDF_SUFFIXES)}), a zarr store, or a directory of netCDF/GRIB files."
        )
    if _is_zarr(path):
        ds, fmt = _canonicalise(xr.open_dataset(path, engine="zarr", chunks=None), str(path)), "zarr"
    elif path.is_dir():
        ds, fmt = _open_directory(path), "directory"
    else:
        ds, fmt = _read_file(path), "grib" if path.suffix.lower() in GRIB_SUFFIXES else "netcdf"
    if "member" in ds.dims:
        without = [name for name, v in ds.data_vars.items() if "member" not in v.dims]
        if without:
            raise Era5Error(f"{path}: variables {without} have no ensemble members while the others have; expected one member axis for all.")
    return ds.assign_attrs(era5_source=str(path), era5_format=fmt)


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and (path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists())


def _read_file(path: Path, chunks=None) -> xr.Dataset:
    """One GRIB or netCDF file in the canonical layout (lazy)."""
    suffix = path.suffix.lower()
    if suffix in NETCDF_SUFFIXES:
        return _canonicalise(xr.open_dataset(path, engine="netcdf4", chunks=chunks), str(path))
    if suffix not in GRIB_SUFFIXES:
        raise Era5Error(
            f"unknown file type '{path.suffix}' of '{path}': expected GRIB ({', '.join(GRIB_SUFFIXES)}), netCDF "
            f"({', '.join(NETCDF_SUFFIXES)}), a zarr store, or a directory of such files."
        )
    try:
        cfgrib = importlib.import_module("cfgrib")  # optional: only GRIB needs it
    except ImportError as error:
        raise ImportError(f"reading the GRIB file '{path}' needs cfgrib and eccodes: pip install 'enfpde[grib]' ({error}).") from None
    # cfgrib.open_datasets gives one dataset per hypercube of messages (e.g. one per level type), where
    # xr.open_dataset(engine="cfgrib") would skip the messages that do not fit the first one with only a log
    # message. indexpath="": no .idx file beside the data (which may be read-only or shared).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="cfgrib")  # cfgrib's own xr.merge call
        cubes = cfgrib.open_datasets(str(path), backend_kwargs={"indexpath": ""}, chunks=chunks)
    parts = [_canonicalise(cube, str(path)) for cube in cubes if cube.data_vars]
    if not parts:
        raise Era5Error(f"'{path}' holds no GRIB field that cfgrib can read.")
    if len(parts) == 1:
        return parts[0]
    try:
        return xr.merge(parts, join="exact", compat="no_conflicts", combine_attrs="drop_conflicts")
    except ValueError as error:  # xr.MergeError and alignment errors
        raise Era5Error(
            f"the GRIB messages of '{path}' form {len(parts)} sets ({[sorted(p.data_vars) for p in parts]}) that do not "
            f"share their times, members and grid ({str(error).splitlines()[0]}); split the file, e.g. with grib_copy."
        ) from None


def _open_directory(path: Path) -> xr.Dataset:
    """A directory of netCDF/GRIB files, each canonicalised. Files holding the same variables are concatenated in
    time order (overlaps raise); groups of different variables, e.g. the pressure-level and the single-level
    downloads of the same period from the CDS, are merged and must share their times, members and grid."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in GRIB_SUFFIXES + NETCDF_SUFFIXES and not p.name.startswith("."))
    if not files:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise Era5Error(
            f"the directory '{path}' holds no netCDF ({', '.join(NETCDF_SUFFIXES)}) or GRIB ({', '.join(GRIB_SUFFIXES)}) "
            f"file and is not a zarr store; found {found}."
        )
    # Without dask, xr.concat would read every file into memory; with it, the result stays lazy.
    chunks = {} if importlib.util.find_spec("dask") is not None else None
    groups: dict[frozenset, list] = {}
    for f in files:
        ds = _read_file(f, chunks)
        groups.setdefault(frozenset(map(str, ds.data_vars)), []).append((ds, f))
    combined = [_concat_in_time(sorted(parts, key=lambda p: p[0].time.values[0]), path) for parts in groups.values()]
    if len(combined) == 1:
        return combined[0]
    try:
        return xr.merge(combined, join="exact", compat="no_conflicts", combine_attrs="drop_conflicts")
    except ValueError as error:  # xr.MergeError and alignment errors
        sets = [sorted(map(str, ds.data_vars)) for ds in combined]
        raise Era5Error(
            f"the files of '{path}' hold different sets of variables {sets} whose times, members or grids differ "
            f"({str(error).splitlines()[0]}); download every set for the same period and grid."
        ) from None


def _concat_in_time(parts: list, path: Path) -> xr.Dataset:
    """Files of the same variables, sorted by first time, concatenated along time; overlaps and differing
    member, level or grid axes raise."""
    first, first_file = parts[0]
    for (previous, previous_file), (ds, file) in zip(parts, parts[1:]):
        if ds.time.values[0] <= previous.time.values[-1]:
            raise Era5Error(
                f"files overlap in time: '{previous_file.name}' ends at {_iso(previous.time.values[-1])} and "
                f"'{file.name}' starts at {_iso(ds.time.values[0])} in '{path}'; remove duplicated times."
            )
        for dim in ("member", "level", "latitude", "longitude"):
            a, b = first.coords.get(dim), ds.coords.get(dim)
            if (a is None) != (b is None) or (a is not None and not np.array_equal(a.values, b.values)):
                raise Era5Error(f"'{file.name}' and '{first_file.name}' in '{path}' differ in their '{dim}' axis.")
    if len(parts) == 1:
        return first
    return xr.concat([p[0] for p in parts], dim=TIME_DIM, data_vars="all", coords="minimal", compat="override", join="exact")


def _iso(t) -> str:
    return np.datetime_as_string(np.datetime64(t, "ns"), unit="s")


def _canonicalise(raw: xr.Dataset, source: str) -> xr.Dataset:
    ds = _canonical_grid_names(raw, source)
    ds = _merge_expver(ds)
    ds = _canonical_time(ds, source)
    ds = _canonical_members(ds, source)
    ds = _canonical_levels(ds, source)
    ds = _canonical_variables(ds, source)
    return _canonical_grid(ds, source)


def _canonical_grid_names(ds: xr.Dataset, source: str) -> xr.Dataset:
    """Rename ``lat``/``lon`` to ``latitude``/``longitude``, check they are 1-D axes, keep the grid variables."""
    for lat, lon in (("latitude", "longitude"), ("lat", "lon")):
        if lat in ds.variables and lon in ds.variables:
            break
    else:
        raise Era5Error(
            f"{source} has no latitude/longitude coordinates (expected 'latitude' and 'longitude', or 'lat' and "
            f"'lon'); found variables {sorted(map(str, ds.variables))}."
        )
    for name in (lat, lon):
        if ds[name].dims != (name,):
            raise Era5Error(
                f"{source}: '{name}' has dimensions {ds[name].dims}; expected a regular latitude-longitude grid with "
                f"1-D coordinates '{name}({name})' (a reduced Gaussian or curvilinear grid must be regridded first)."
            )
    ds = ds.rename({lat: "latitude", lon: "longitude"}) if lat != "latitude" else ds
    on_grid = [name for name, v in ds.data_vars.items() if {"latitude", "longitude"} <= set(v.dims)]
    if not on_grid:
        raise Era5Error(f"{source} has no variable on the latitude-longitude grid; found {sorted(map(str, ds.data_vars))}.")
    return ds[on_grid]


def _merge_expver(ds: xr.Dataset) -> xr.Dataset:
    """Old CDS netCDF files mixing final ERA5 (expver 1) and preliminary ERA5T (expver 5) data have an
    ``expver`` axis, each time filled in one version and NaN in the other: take the first non-NaN value."""
    if "expver" not in ds.dims:
        return ds
    parts = [ds.isel(expver=i, drop=True) for i in range(ds.sizes["expver"])]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.combine_first(part)
    return merged


def _canonical_time(ds: xr.Dataset, source: str) -> xr.Dataset:
    """One ``time`` axis of valid times, strictly increasing, datetime64[ns]."""
    if "step" in ds.dims:
        if ds.sizes["step"] > 1:
            raise Era5Error(
                f"{source} has {ds.sizes['step']} forecast steps; expected analyses (one valid time per field). "
                "Select one step, e.g. with cfgrib filter_by_keys, first."
            )
        ds = ds.squeeze("step")
    if "valid_time" in ds.dims:  # new CDS netCDF
        ds = ds.drop_vars([n for n in ("time",) if n in ds.variables]).rename({"valid_time": TIME_DIM})
    elif TIME_DIM in ds.dims:
        if "valid_time" in ds.coords:  # cfgrib: time is the analysis time, valid_time = time + step
            if ds["valid_time"].dims == (TIME_DIM,):
                ds = ds.assign_coords(time=ds["valid_time"].values)
            ds = ds.drop_vars("valid_time")
    else:  # one time, which cfgrib (and some writers) keep as a scalar coordinate
        names = [n for n in ("valid_time", TIME_DIM) if n in ds.coords and ds[n].ndim == 0]
        if not names:
            raise Era5Error(
                f"{source} has no time axis: expected a dimension 'time' or 'valid_time' (or a scalar time coordinate); "
                f"found dimensions {dict(ds.sizes)}."
            )
        value = ds[names[0]].values
        ds = ds.drop_vars([n for n in ("valid_time", TIME_DIM) if n in ds.variables]).expand_dims({TIME_DIM: [value]})
    times = ds[TIME_DIM].values
    if not np.issubdtype(times.dtype, np.datetime64):
        raise Era5Error(f"{source}: time has dtype {times.dtype}; expected datetimes (CF-encoded times decode to datetime64).")
    times = times.astype("datetime64[ns]")
    steps = np.diff(times)
    if np.any(steps <= np.timedelta64(0, "ns")):
        i = int(np.argmax(steps <= np.timedelta64(0, "ns")))
        what = "a duplicated time" if steps[i] == np.timedelta64(0, "ns") else "times out of order"
        raise Era5Error(
            f"{source}: times must be strictly increasing; found {what}: {_iso(times[i])} followed by "
            f"{_iso(times[i + 1])} (index {i}). Fix the file (sort it and drop duplicates); a single file is "
            "never reordered silently."
        )
    static = [name for name, v in ds.data_vars.items() if TIME_DIM not in v.dims]
    ds = ds.drop_vars(static).assign_coords(time=times)
    if not static:
        return ds
    return ds.assign_attrs(static_variables=",".join(sorted(_SHORT_BY_LONG.get(str(n), str(n)) for n in static)))


def _canonical_members(ds: xr.Dataset, source: str) -> xr.Dataset:
    """``number``/``member`` dimension -> ``member`` (int); a scalar member number (deterministic data) is dropped."""
    dims = [n for n in ("number", "member") if n in ds.dims]
    if len(dims) > 1:
        raise Era5Error(f"{source} has both 'number' and 'member' dimensions; expected one ensemble axis.")
    ds = ds.drop_vars([n for n in ("number", "member") if n in ds.coords and n not in ds.dims])
    if not dims:
        return ds
    ds = ds.rename({dims[0]: "member"}) if dims[0] != "member" else ds
    if "member" not in ds.coords:
        return ds.assign_coords(member=np.arange(ds.sizes["member"], dtype=np.int64))
    members = ds["member"].values
    if not np.issubdtype(members.dtype, np.number) or np.any(members != np.round(members)):
        raise Era5Error(f"{source}: ensemble members must be integer numbers, found {members[:10]}.")
    return ds.assign_coords(member=members.astype(np.int64))


_LEVEL_NAMES = ("isobaricInhPa", "pressure_level", "level")


def _canonical_levels(ds: xr.Dataset, source: str) -> xr.Dataset:
    """The pressure axis (cfgrib ``isobaricInhPa``, new CDS ``pressure_level``, old CDS/WB2 ``level``) -> ``level``
    in hPa (int64, ascending); a scalar level coordinate (a single-level GRIB subset) becomes an axis of length 1."""
    names = [n for n in _LEVEL_NAMES if n in ds.variables]
    if len(names) > 1:
        raise Era5Error(f"{source} has several pressure axes {names}; expected one of {list(_LEVEL_NAMES)}.")
    if not names:
        return ds
    name = names[0]
    coord = ds[name]
    values = np.atleast_1d(coord.values).astype(np.float64)
    if str(coord.attrs.get("units", "")).strip() == "Pa":
        values = values / 100.0
    if np.any(values != np.round(values)) or np.any(values <= 0):
        raise Era5Error(f"{source}: pressure levels must be positive whole hPa values, found {values[:10]} ({name}).")
    if coord.ndim == 0:
        ds = ds.drop_vars(name).expand_dims(level=values.astype(np.int64))
    else:
        ds = ds.rename({name: "level"}) if name != "level" else ds
        ds = ds.assign_coords(level=values.astype(np.int64))
    levels = ds["level"].values
    if len(np.unique(levels)) != len(levels):
        raise Era5Error(f"{source}: duplicated pressure levels {levels.tolist()}.")
    return ds.sortby("level") if np.any(np.diff(levels) < 0) else ds


def _canonical_variables(ds: xr.Dataset, source: str) -> xr.Dataset:
    """Short names, ``long_name``/``units`` attrs (checked against :data:`VARIABLES`), canonical dim order."""
    renames, variables = {}, {}  # source name -> short name, short name -> source name
    for name, da in ds.data_vars.items():
        extra = [d for d in da.dims if d not in CANONICAL_DIMS]
        if extra:
            raise Era5Error(
                f"{source}: variable '{name}' has dimensions {da.dims}; {extra} cannot be read (expected a subset of "
                f"{list(CANONICAL_DIMS)} after renaming)."
            )
        short = _SHORT_BY_LONG.get(str(name), str(name))
        if short in variables:
            raise Era5Error(f"{source} holds '{short}' twice (as '{variables[short]}' and '{name}').")
        variables[short] = name
        renames[name] = short
    data = {}
    for name, short in renames.items():
        da = ds[name]
        known = VARIABLES.get(short)
        file_units = da.attrs.get("units")
        if known is not None:
            if file_units is not None and _unit_key(file_units) != _unit_key(known.units):
                raise Era5Error(
                    f"{source}: variable '{name}' has units '{file_units}'; ERA5 {known.long} is in "
                    f"'{known.units}'. Convert it, or rename the variable if it is another quantity."
                )
            attrs = {"long_name": known.long.replace("_", " "), "units": known.units}
        else:
            attrs = {"long_name": str(da.attrs.get("long_name", short)), "units": str(file_units or "1")}
        variable = da.variable.transpose(*[d for d in CANONICAL_DIMS if d in da.dims]).copy(deep=False)
        variable.attrs, variable.encoding = attrs, {}  # drop GRIB_* and packing attributes of the source
        data[short] = variable
    # Only index coordinates survive: step, expver, surface, heightAboveGround ... are dropped.
    coords = {d: ds[d].variable for d in CANONICAL_DIMS if d in ds.dims}
    attrs = {k: v for k, v in ds.attrs.items() if k == "static_variables"}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _regular_axis(values: np.ndarray, name: str, source: str) -> float:
    """The signed spacing of a strictly monotone, regularly spaced 1-D axis (0 for a single point)."""
    if values.size == 0:
        raise Era5Error(f"{source}: the {name} axis is empty.")
    if not np.all(np.isfinite(values)):
        raise Era5Error(f"{source}: {name} has non-finite values.")
    if values.size == 1:
        return 0.0
    steps = np.diff(values)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        i = int(np.argmax(np.sign(steps) != np.sign(steps[0])))
        raise Era5Error(
            f"{source}: {name} is not sorted: {values[i]} and {values[i + 1]} break the order of {values[0]}, "
            f"{values[1]}, ...; expected a strictly monotone axis."
        )
    if not np.allclose(steps, steps[0], rtol=1e-5, atol=_DEGREE_TOLERANCE):
        i = int(np.argmax(~np.isclose(steps, steps[0], rtol=1e-5, atol=_DEGREE_TOLERANCE)))
        raise Era5Error(
            f"{source}: {name} is irregularly spaced ({steps[0]:g} degrees, then {steps[i]:g} after {values[i]}); "
            "expected a regular latitude-longitude grid (Gaussian or reduced grids must be regridded first)."
        )
    return float(steps[0])


def _canonical_grid(ds: xr.Dataset, source: str) -> xr.Dataset:
    """Latitude ascending in ``[-90, 90]``; longitude wrapped into ``[0, 360)`` and ascending."""
    lat = ds["latitude"].values.astype(np.float64)
    if _regular_axis(lat, "latitude", source) < 0:
        ds, lat = ds.isel(latitude=slice(None, None, -1)), lat[::-1]
    if lat[0] < -90 - _DEGREE_TOLERANCE or lat[-1] > 90 + _DEGREE_TOLERANCE:
        raise Era5Error(f"{source}: latitudes {lat[0]}..{lat[-1]} leave [-90, 90].")
    lon = ds["longitude"].values.astype(np.float64)
    if _regular_axis(lon, "longitude", source) < 0:
        ds, lon = ds.isel(longitude=slice(None, None, -1)), lon[::-1]
    wrapped = np.mod(lon, 360.0)
    order = np.argsort(wrapped, kind="stable")
    if np.any(np.diff(wrapped[order]) <= _DEGREE_TOLERANCE):
        raise Era5Error(
            f"{source}: longitudes {lon[0]}..{lon[-1]} repeat a meridian once wrapped into [0, 360) "
            "(e.g. both 0 and 360); drop the duplicated column."
        )
    if np.any(order != np.arange(order.size)):
        ds = ds.isel(longitude=order)
    return ds.assign_coords(
        latitude=("latitude", lat, {"units": "degrees_north", "standard_name": "latitude"}),
        longitude=("longitude", wrapped[order], {"units": "degrees_east", "standard_name": "longitude"}),
    )


# ------------------------------------------------------------------------------------------------ selection


def _as_datetime(value, what: str) -> np.datetime64:
    """An ISO string, datetime or datetime64 as datetime64[ns] (UTC; a time zone is converted to UTC)."""
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as error:
        raise Era5Error(f"{what}: cannot read {value!r} as a time ({error}); expected an ISO time like '2017-01-01T00:00'.") from None
    if stamp is pd.NaT:
        raise Era5Error(f"{what}: expected a time, found {value!r}.")
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp.to_datetime64().astype("datetime64[ns]")


@dataclasses.dataclass(frozen=True)
class Era5Selection:
    """What :func:`select` keeps of a canonical ERA5 dataset (``None`` keeps everything).

    Attributes:
      variables: short (``"z"``, ``"t2m"``) or long (``"geopotential"``, ``"2m_temperature"``) names, in the
        order the fields should have.
      levels: pressure levels in hPa, applied to the pressure-level variables.
      members: ensemble member numbers (only for files with members).
      start, end: the time range, inclusive: ISO strings (``"2017-01-01T12"``; a date alone is midnight) or
        datetime64; both must lie within the data's times.
      stride: keep every ``stride``-th time of the range, starting with its first.
      lat_range: ``(south, north)`` in degrees, inclusive.
      lon_range: ``(west, east)`` in degrees, inclusive, eastwards from ``west``: ``(350, 20)`` or ``(-10, 20)``
        crosses 0 degrees and gives the contiguous axis ``-10, ..., 20`` (longitudes west of 0 become negative,
        down to ``west - 360``: below -180 when ``west < 180``, which :class:`enfpde.geometry.Sphere` rejects);
        a span of 360 degrees or more is global.
      coarsen: keep every ``coarsen``-th latitude and longitude, from the southern and western edge (subsampling,
        not averaging). A grid from pole to pole keeps both poles, so ``coarsen`` must divide its ``n - 1``
        intervals (60 for 3 degrees, 720 for 0.25 degrees); a global longitude axis must have a multiple of
        ``coarsen`` points, so the spacing across 0 degrees stays regular. A regional box is subsampled from its
        south-west corner, and its last row or column may fall short of the box's northern or eastern edge.
    """

    variables: Optional[Sequence[str]] = None
    levels: Optional[Sequence[int]] = None
    members: Optional[Sequence[int]] = None
    start: Union[str, np.datetime64, None] = None
    end: Union[str, np.datetime64, None] = None
    stride: int = 1
    lat_range: Optional[Sequence[float]] = None
    lon_range: Optional[Sequence[float]] = None
    coarsen: int = 1

    def __post_init__(self):
        for name in ("variables", "levels", "members", "lat_range", "lon_range"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
                    raise Era5Error(f"{name}: expected a list, found {value!r}.")
                object.__setattr__(self, name, tuple(value))  # frozen and hashable
        if self.variables is not None and len(self.variables) == 0:
            raise Era5Error("variables: expected at least one name (or None for all).")
        for name in ("levels", "members"):
            value = getattr(self, name)
            if value is not None and (not value or any(int(v) != v for v in value)):
                raise Era5Error(f"{name}: expected a non-empty list of integers, found {list(value)}.")
        for name in ("stride", "coarsen"):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise Era5Error(f"{name}: expected an integer >= 1, found {value!r}.")
        if self.lat_range is not None:
            if len(self.lat_range) != 2 or not -90 <= self.lat_range[0] <= self.lat_range[1] <= 90:
                raise Era5Error(f"lat_range: expected (south, north) with -90 <= south <= north <= 90, found {self.lat_range}.")
        if self.lon_range is not None:
            if len(self.lon_range) != 2 or not all(math.isfinite(v) for v in self.lon_range):
                raise Era5Error(f"lon_range: expected (west, east) in degrees, found {self.lon_range}.")
        start = None if self.start is None else _as_datetime(self.start, "start")
        end = None if self.end is None else _as_datetime(self.end, "end")
        if start is not None and end is not None:
            if start > end:
                raise Era5Error(f"start {self.start!r} is after end {self.end!r}.")


def _source(ds: xr.Dataset) -> str:
    return ds.attrs.get("era5_source", "the dataset")


def _variable_list(ds: xr.Dataset) -> list[str]:
    return [f"{v} ({VARIABLES[v].long})" if v in VARIABLES else str(v) for v in ds.data_vars]


def _resolve_variable(ds: xr.Dataset, name: str) -> str:
    short = _SHORT_BY_LONG.get(name, name)
    if short in ds.data_vars:
        return short
    static = ds.attrs.get("static_variables", "")
    if short in static.split(","):
        raise Era5Error(f"variable {name!r} of {_source(ds)} is a static field (no time axis) and cannot be forecast.")
    raise Era5Error(f"variable {name!r} is not in {_source(ds)}; it has {_variable_list(ds)}.")


def select(ds: xr.Dataset, selection: Era5Selection) -> xr.Dataset:
    """The part of a canonical ERA5 dataset (from :func:`open_era5`) that ``selection`` names, still canonical
    (and lazy where ``ds`` is): variables, then levels, members, times, the latitude-longitude box, subsampling.

    Raises:
      Era5Error: a variable, level, member or time that the data does not have (the message lists what it has),
        levels for data with no pressure-level variable, members for data without members, an empty
        latitude or longitude box, or a ``coarsen`` that would break the grid (see :class:`Era5Selection`).
    """
    source = _source(ds)
    if selection.variables is not None:
        names = [_resolve_variable(ds, v) for v in selection.variables]
        if len(set(names)) != len(names):
            raise Era5Error(f"variables {list(selection.variables)} name the same variable twice.")
        ds = ds[names]
    if selection.levels is not None:
        if "level" not in ds.dims:
            raise Era5Error(f"levels {list(selection.levels)} were given but no selected variable of {source} has pressure levels: {_variable_list(ds)}.")
        missing = [lv for lv in selection.levels if lv not in ds["level"].values]
        if missing:
            raise Era5Error(f"pressure level(s) {missing} hPa not in {source}; it has {ds['level'].values.tolist()} hPa.")
        ds = ds.sel(level=[int(lv) for lv in selection.levels])
    if selection.members is not None:
        if "member" not in ds.dims:
            raise Era5Error(f"members {list(selection.members)} were given but {source} has no ensemble members.")
        missing = [m for m in selection.members if m not in ds["member"].values]
        if missing:
            raise Era5Error(f"ensemble member(s) {missing} not in {source}; it has {ds['member'].values.tolist()}.")
        ds = ds.sel(member=[int(m) for m in selection.members])
    ds = _select_times(ds, selection, source)
    ds = _select_box(ds, selection, source)
    return _subsample(ds, selection.coarsen, source)


def _select_times(ds: xr.Dataset, selection: Era5Selection, source: str) -> xr.Dataset:
    times = ds[TIME_DIM].values
    first, last = times[0], times[-1]
    start = first if selection.start is None else _as_datetime(selection.start, "start")
    end = last if selection.end is None else _as_datetime(selection.end, "end")
    span = f"{source} has {times.size} times from {_iso(first)} to {_iso(last)}"
    if start < first or end > last:
        raise Era5Error(f"time range {_iso(start)}..{_iso(end)} is not within the data: {span}.")
    inside = np.flatnonzero((times >= start) & (times <= end))
    if inside.size == 0:
        raise Era5Error(f"no time in {_iso(start)}..{_iso(end)}: {span}.")
    return ds.isel(time=slice(inside[0], inside[-1] + 1, selection.stride))  # times are sorted: a contiguous run


def _select_box(ds: xr.Dataset, selection: Era5Selection, source: str) -> xr.Dataset:
    eps = _DEGREE_TOLERANCE
    if selection.lat_range is not None:
        south, north = selection.lat_range
        lat = ds["latitude"].values
        inside = np.flatnonzero((lat >= south - eps) & (lat <= north + eps))
        if inside.size == 0:
            raise Era5Error(
                f"lat_range ({south}, {north}) holds no grid latitude of {source}; it has {lat.size} latitudes from "
                f"{lat[0]} to {lat[-1]}."
            )
        ds = ds.isel(latitude=slice(inside[0], inside[-1] + 1))
    if selection.lon_range is not None and selection.lon_range[1] - selection.lon_range[0] < 360:
        west, east = (float(np.mod(v, 360.0)) for v in selection.lon_range)
        lon = np.mod(ds["longitude"].values, 360.0)
        crosses = west > east
        inside = (lon >= west - eps) | (lon <= east + eps) if crosses else (lon >= west - eps) & (lon <= east + eps)
        # Across 0 degrees the western part is shifted by -360 so the axis stays ascending and contiguous.
        shifted = np.where(crosses & (lon >= west - eps), lon - 360.0, lon)
        index = np.flatnonzero(inside)
        if index.size == 0:
            raise Era5Error(
                f"lon_range {tuple(selection.lon_range)} holds no grid longitude of {source}; it has "
                f"{lon.size} longitudes from {lon.min()} to {lon.max()}."
            )
        index = index[np.argsort(shifted[index], kind="stable")]
        ds = ds.isel(longitude=index).assign_coords(longitude=("longitude", shifted[index], ds["longitude"].attrs))
    return ds


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _subsample(ds: xr.Dataset, k: int, source: str) -> xr.Dataset:
    if k == 1:
        return ds
    lat, lon = ds["latitude"].values, ds["longitude"].values
    both_poles = abs(lat[0] + 90) < _DEGREE_TOLERANCE and abs(lat[-1] - 90) < _DEGREE_TOLERANCE
    if both_poles and (lat.size - 1) % k:
        raise Era5Error(
            f"coarsen={k} would drop the north pole: the {lat.size} latitudes of {source} run from pole to pole in "
            f"{lat.size - 1} intervals, so coarsen must divide {lat.size - 1}: one of {_divisors(lat.size - 1)}."
        )
    spacing = lon[1] - lon[0] if lon.size > 1 else 0.0
    if lon.size > 1 and abs(lon.size * spacing - 360.0) < 1e-3 and lon.size % k:
        raise Era5Error(
            f"coarsen={k} does not divide the {lon.size} longitudes of the global grid of {source} (the spacing "
            f"across 0 degrees would be uneven); choose one of {_divisors(lon.size)}."
        )
    return ds.isel(latitude=slice(None, None, k), longitude=slice(None, None, k))


# ------------------------------------------------------------------------------------------------ fields


def to_fields(ds: xr.Dataset) -> xr.Dataset:
    """Flatten pressure levels: variable ``z`` on levels 500 and 850 becomes fields ``z500`` and ``z850``.

    Args:
      ds: canonical ERA5 (from :func:`open_era5` or :func:`select`).

    Returns:
      A Dataset of float32 fields ``[member?, time, latitude, longitude]`` in the units of ERA5, named
      ``<short><level>`` for pressure-level variables (levels in ``ds``'s order) and ``<short>`` for single-level
      ones, with attrs ``long_name``, ``units`` and, on pressure levels, ``level`` (hPa). The data is read into
      memory here (each variable once): select first.
    """
    fields: dict[str, xr.DataArray] = {}
    for name, da in ds.data_vars.items():
        base = {"long_name": da.attrs.get("long_name", name), "units": da.attrs.get("units", "1")}
        # Read each variable once, all its levels together: a store's chunks hold every level, so reading level
        # by level would decompress each chunk once per level.
        da = da.astype(np.float32, copy=False).load()
        if "level" in da.dims:
            parts = [(f"{name}{int(lv)}", da.isel(level=i, drop=True), int(lv)) for i, lv in enumerate(ds["level"].values)]
        else:
            parts = [(str(name), da, None)]
        for field, values, level in parts:
            if field in fields:
                raise Era5Error(f"two fields would be called '{field}'; rename one of the variables of {_source(ds)}.")
            attrs = dict(base)
            if level is not None:
                attrs.update(long_name=f"{base['long_name']} at {level} hPa", level=np.int64(level), level_units="hPa")
            fields[field] = values.assign_attrs(attrs)
    return xr.Dataset(fields, attrs=dict(ds.attrs))


# ------------------------------------------------------------------------------------------------ normalisation


def normalization(fields: xr.Dataset) -> dict[str, dict[str, float]]:
    """Per-field mean and standard deviation over every member, time and grid point, NaNs ignored.

    Plain (unweighted) statistics over grid points, the same as :meth:`enfpde.data.trajectories.Normalizer.fit`:
    on a latitude-longitude grid the polar rows count as much as equatorial ones, which only scales the loss;
    area weighting is not needed to make the fields order one.

    Returns:
      field name -> ``{"mean": float, "std": float}`` in the field's units (float64 accumulation).

    Raises:
      Era5Error: a field with no finite value, or a constant one (std 0).
    """
    stats = {}
    for name, da in fields.data_vars.items():
        values = np.asarray(da.values)
        if not np.isfinite(values).any():
            raise Era5Error(f"cannot normalise '{name}': it has no finite value in the selection.")
        # float64 accumulation without a float64 copy of the field (a year of hourly fields is gigabytes)
        mean, std = float(np.nanmean(values, dtype=np.float64)), float(np.nanstd(values, dtype=np.float64))
        if not std > 0:
            raise Era5Error(f"cannot normalise '{name}': it is constant ({mean:g}) over the selection; select more times or points.")
        stats[str(name)] = {"mean": mean, "std": std}
    return stats


def attach_normalization(ds: xr.Dataset, stats: Mapping[str, Mapping[str, float]], split: str = "train") -> xr.Dataset:
    """A copy of ``ds`` carrying ``stats`` (from :func:`normalization` on the ``split`` named): attrs
    ``normalization_mean``/``normalization_std`` on each field, and the global attrs ``normalization`` (JSON of
    ``stats``) and ``normalization_split``. Every data variable needs statistics, and every statistic a variable."""
    if set(stats) != set(map(str, ds.data_vars)):
        raise Era5Error(f"normalisation statistics for {sorted(stats)} do not match the fields {sorted(map(str, ds.data_vars))}.")
    out = ds.copy()  # shallow: new attrs dicts, shared data
    for name, s in stats.items():
        out[name].attrs.update(normalization_mean=float(s["mean"]), normalization_std=float(s["std"]))
    ordered = {name: {"mean": float(stats[name]["mean"]), "std": float(stats[name]["std"])} for name in ds.data_vars}
    out.attrs.update(normalization=json.dumps(ordered), normalization_split=split)
    return out


def read_normalization(ds: xr.Dataset) -> dict[str, dict[str, float]]:
    """The statistics :func:`attach_normalization` stored in ``ds`` (e.g. a file written by :func:`generate_dataset`).

    Raises:
      Era5Error: no statistics, or per-variable attrs that disagree with the global JSON.
    """
    if "normalization" not in ds.attrs:
        raise Era5Error("the dataset has no 'normalization' attribute; generate it with enfpde.data.era5.generate_dataset.")
    stats = json.loads(ds.attrs["normalization"])
    for name, s in stats.items():
        attrs = ds[name].attrs if name in ds.data_vars else {}
        if (attrs.get("normalization_mean"), attrs.get("normalization_std")) != (s["mean"], s["std"]):
            raise Era5Error(f"normalisation of '{name}': the variable's attrs disagree with the global 'normalization' attribute.")
    return stats


def normalizer(stats: Mapping[str, Mapping[str, float]], variables: Sequence[str]) -> Normalizer:
    """The package's :class:`~enfpde.data.trajectories.Normalizer` for ``variables`` (channel order)."""
    missing = [v for v in variables if v not in stats]
    if missing:
        raise Era5Error(f"no normalisation statistics for {missing}; they cover {sorted(stats)}.")
    return Normalizer(
        np.asarray([stats[v]["mean"] for v in variables], np.float32), np.asarray([stats[v]["std"] for v in variables], np.float32)
    )


# ------------------------------------------------------------------------------------------------ windows


def _nanoseconds(hours: float) -> int:
    return int(round(float(hours) * 3600e9))


def windows(fields: xr.Dataset, lead_hours: float, num_frames: int, start_every_hours: float | None = None) -> xr.Dataset:
    """Cut fields into forecast trajectories in the package's trajectory schema.

    A window starting at ``t0`` has the frames ``t0, t0 + lead, ..., t0 + (num_frames - 1) lead``; start times are
    ``t_first + j * start_every_hours`` (``j >= 0``) with ``t_first`` the first time of ``fields``, and a window is
    kept when all its frames are among the times of ``fields`` (gaps in the times are skipped). Every member
    gives its own trajectory.

    Args:
      fields: ``[member?, time, latitude, longitude]`` (from :func:`to_fields`); it is read into memory.
      lead_hours: hours between frames; a multiple of the time spacing of ``fields``.
      num_frames: frames per trajectory (``>= 1``).
      start_every_hours: hours between window starts (default ``lead_hours``); a multiple of the time spacing.

    Returns:
      Dataset with the fields ``[trajectory, time, latitude, longitude]`` float32 (attrs kept), ``N = starts x
      members`` trajectories ordered by start time, then member; coordinates ``time [T]`` float64 in hours since
      the window's first frame (attrs ``units = "hours"``), ``latitude``/``longitude`` in degrees,
      ``trajectory [N]`` int64 (index), ``init_time [N]`` datetime64 (first frame), ``valid_time [N, T]``
      datetime64 (every frame) and, for ensembles, ``member [N]`` int64. Memory: ``N x T`` frames per field.

    Raises:
      Era5Error: ``lead_hours`` or ``start_every_hours`` not a multiple of the time spacing, or no window fits.
    """
    if not (isinstance(num_frames, (int, np.integer)) and num_frames >= 1):
        raise Era5Error(f"num_frames: expected an integer >= 1, found {num_frames!r}.")
    start_every_hours = lead_hours if start_every_hours is None else start_every_hours
    for name, value in (("lead_hours", lead_hours), ("start_every_hours", start_every_hours)):
        if not value > 0:
            raise Era5Error(f"{name}: expected a positive number of hours, found {value!r}.")
    times = fields[TIME_DIM].values.astype("datetime64[ns]")
    stamps = times.astype(np.int64)
    span = f"{times.size} times from {_iso(times[0])} to {_iso(times[-1])}"
    lead, every = _nanoseconds(lead_hours), _nanoseconds(start_every_hours)
    spacing = int(np.gcd.reduce(np.diff(stamps))) if times.size > 1 else None
    if spacing is not None:
        span += f" every {spacing / 3600e9:g} h"
        for name, value, ns in (("lead_hours", lead_hours, lead), ("start_every_hours", start_every_hours, every)):
            if ns % spacing:
                raise Era5Error(f"{name}={value:g} is not a multiple of the time spacing of the data: {span}.")
    position = {int(t): i for i, t in enumerate(stamps)}
    starts, frames = [], []
    for t0 in range(int(stamps[0]), int(stamps[-1]) + 1, every):
        index = [position.get(t0 + k * lead) for k in range(num_frames)]
        if None not in index:
            starts.append(t0)
            frames.append(index)
    if not starts:
        raise Era5Error(f"no window of {num_frames} frames {lead_hours:g} h apart (starting every {start_every_hours:g} h) fits in the {span}.")
    frames = np.asarray(frames)  # [S, T]
    has_members = "member" in fields.dims
    members = fields["member"].values if has_members else np.zeros(1, np.int64)
    num_starts, num_members = len(starts), len(members)
    data = {}
    for name, da in fields.data_vars.items():
        values = np.asarray(da.transpose(*(("member",) if has_members else ()), TIME_DIM, "latitude", "longitude").values, np.float32)
        values = values if has_members else values[None]
        stacked = values[:, frames]  # [M, S, T, lat, lon]
        stacked = np.swapaxes(stacked, 0, 1).reshape(num_starts * num_members, num_frames, *values.shape[2:])
        data[name] = ((TRAJECTORY_DIM, TIME_DIM, "latitude", "longitude"), stacked, dict(da.attrs))
    init = np.repeat(np.asarray(starts, np.int64), num_members).astype("datetime64[ns]")
    offsets = (np.arange(num_frames, dtype=np.int64) * lead).astype("timedelta64[ns]")
    coords = {
        TRAJECTORY_DIM: (TRAJECTORY_DIM, np.arange(num_starts * num_members, dtype=np.int64)),
        TIME_DIM: (TIME_DIM, np.arange(num_frames, dtype=np.float64) * float(lead_hours),
                   {"units": "hours", "long_name": "hours since the window's first frame (init_time)", "axis": "T"}),
        "latitude": ("latitude", fields["latitude"].values.astype(np.float64), {"units": "degrees_north", "standard_name": "latitude"}),
        "longitude": ("longitude", fields["longitude"].values.astype(np.float64), {"units": "degrees_east", "standard_name": "longitude"}),
        "init_time": (TRAJECTORY_DIM, init, {"long_name": "valid time of the window's first frame (UTC)"}),
        "valid_time": ((TRAJECTORY_DIM, TIME_DIM), init[:, None] + offsets, {"long_name": "valid time of each frame (UTC)"}),
    }
    if has_members:
        coords["member"] = (TRAJECTORY_DIM, np.tile(members.astype(np.int64), num_starts), {"long_name": "ensemble member number"})
    attrs = {k: v for k, v in fields.attrs.items() if k in ("era5_source", "era5_format")}
    attrs.update(frame_interval_hours=float(lead_hours), num_frames=int(num_frames), start_every_hours=float(start_every_hours))
    return xr.Dataset(data, coords=coords, attrs=attrs)


# ------------------------------------------------------------------------------------------------ forecasts


def initial_states(path: str | os.PathLike, config: "Era5Config", init_time=None) -> xr.Dataset:
    """Initial states for a forecast, read from an ERA5 file as users get it (any format :func:`open_era5` reads)
    and selected like the dataset ``config`` a model was trained on: the same fields, levels, members, box and
    subsampling, at one analysis time.

    Args:
      path: a GRIB/netCDF file, zarr store or directory.
      config: the training dataset's config (its splits and source are not used).
      init_time: the analysis time to start from (ISO string or datetime64); None: the file's first time.

    Returns:
      The fields ``[trajectory, time=1, latitude, longitude]``, one trajectory per ensemble member (the
      ``trajectory`` coordinate holds the member numbers; a single trajectory 0 without members), ``time``
      the analysis time (datetime64), ready for :meth:`enfpde.forecaster.Forecaster.forecast`.

    Raises:
      Era5Error: the file lacks a field, level, member or the time (see :func:`select`).
    """
    data = open_era5(path)
    if init_time is None:
        init_time = data["time"].values[0]
    selection = dataclasses.replace(
        config.selection("train"), start=_as_datetime(init_time, "init_time"), end=_as_datetime(init_time, "init_time"), stride=1
    )
    fields = to_fields(select(data, selection)).load()
    if "member" in fields.dims:
        fields = fields.rename({"member": TRAJECTORY_DIM})
    else:
        fields = fields.expand_dims({TRAJECTORY_DIM: [0]})
    fields[TRAJECTORY_DIM].attrs.update(long_name="ensemble member number" if "member" in data.dims else "trajectory")
    return fields.transpose(TRAJECTORY_DIM, TIME_DIM, "latitude", "longitude")


def dataset_config_of(path: str | os.PathLike) -> "Era5Config | None":
    """The :class:`Era5Config` a file written by :func:`generate_dataset` records (its ``config`` attribute), with
    ``source`` set to the file itself (the original source may have moved); None for any other file."""
    path = Path(path)
    if not path.exists():
        return None
    with xr.open_dataset(path, engine="netcdf4") as ds:
        text = ds.attrs.get("config")
    if not text:
        return None
    raw = OmegaConf.to_container(OmegaConf.create(text))
    if not isinstance(raw, dict) or raw.get("generator") != GENERATOR:
        return None
    return load_config(raw, overrides={"source": str(path.absolute())})


# ------------------------------------------------------------------------------------------------ config


_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class TimeRange:
    """An inclusive range of valid times, ISO strings (quote them in YAML): ``{start: "2017-01-01T00", end: ...}``."""

    start: str = MISSING
    end: str = MISSING


@dataclasses.dataclass(frozen=True)
class Era5Config:
    """An ERA5 dataset: what to read, how to select it, how to cut windows, which splits to write.

    Validated on construction (``ValueError`` naming the field); names, levels, members and times are checked
    against the data when it is read.

    Attributes:
      generator: must be ``era5`` (the key the CLI dispatches dataset YAMLs on).
      name: dataset name (recorded in the files).
      source: a GRIB/netCDF file, a zarr store or a directory (see :func:`open_era5`). :func:`load_config` resolves a
        relative path against the YAML file's directory first, then the working directory.
      variables: short or long names; levels: hPa (None: all); members: member numbers (None: all).
      lat_range, lon_range: ``[south, north]``, ``[west, east]`` degrees (None: global); see :class:`Era5Selection`.
      coarsen: keep every ``coarsen``-th latitude and longitude; stride: keep every ``stride``-th time.
      lead_hours, num_frames, start_every_hours: the windows (see :func:`windows`).
      splits: split name -> :class:`TimeRange`; each becomes ``<output_dir>/<name>.nc``. Windows lie inside their
        split's range and the ranges may not overlap, so no frame is in two splits. A ``train`` split is required:
        the normalisation is computed on it and stored in every file.
      output_dir: where the files go (a relative path is relative to the working directory).
    """

    generator: str = GENERATOR
    name: str = "era5"
    source: str = MISSING
    variables: List[str] = MISSING
    levels: Optional[List[int]] = None
    members: Optional[List[int]] = None
    lat_range: Optional[List[float]] = None
    lon_range: Optional[List[float]] = None
    coarsen: int = 1
    stride: int = 1
    lead_hours: float = MISSING
    num_frames: int = MISSING
    start_every_hours: Optional[float] = None
    splits: Dict[str, TimeRange] = MISSING
    output_dir: str = "data/era5"

    def __post_init__(self):
        def fail(field: str, expected: str, found) -> None:
            raise ValueError(f"{field}: expected {expected}, found {found!r}.")

        if self.generator != GENERATOR:
            fail("generator", f"{GENERATOR!r} (this file is read by enfpde.data.era5)", self.generator)
        for field in ("source", "variables", "lead_hours", "num_frames", "splits"):
            if isinstance(getattr(self, field), str) and getattr(self, field) in (MISSING, ""):
                fail(field, "a value (the key is required)", getattr(self, field))
        for split in self.splits:
            if not _SPLIT_NAME.match(split):
                fail("splits", "split names made of letters, digits, '_', '-', '.' (they become file names)", split)
        if "train" not in self.splits:
            fail("splits", "a 'train' split (the normalisation is computed on it)", sorted(self.splits))
        for split in self.splits:
            self.selection(split)  # checks variables, levels, members, ranges, coarsen, stride, times
        if not (isinstance(self.num_frames, int) and self.num_frames >= 1):
            fail("num_frames", "an integer >= 1", self.num_frames)
        if not self.lead_hours > 0:
            fail("lead_hours", "a positive number of hours", self.lead_hours)
        if self.start_every_hours is not None and not self.start_every_hours > 0:
            fail("start_every_hours", "a positive number of hours (or null: lead_hours)", self.start_every_hours)
        ranges = sorted((_as_datetime(r.start, f"splits.{n}.start"), _as_datetime(r.end, f"splits.{n}.end"), n) for n, r in self.splits.items())
        for (_, end_a, a), (start_b, _, b) in zip(ranges, ranges[1:]):
            if start_b <= end_a:
                fail("splits", f"disjoint time ranges (splits '{a}' and '{b}' overlap, so they would share frames)",
                     {a: dataclasses.asdict(self.splits[a]), b: dataclasses.asdict(self.splits[b])})

    def selection(self, split: str) -> Era5Selection:
        """The :class:`Era5Selection` of one split."""
        if split not in self.splits:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; it has {sorted(self.splits)}.")
        r = self.splits[split]
        return Era5Selection(
            variables=list(self.variables), levels=self.levels, members=self.members,
            start=_as_datetime(r.start, f"splits.{split}.start"), end=_as_datetime(r.end, f"splits.{split}.end"),
            stride=self.stride, lat_range=self.lat_range, lon_range=self.lon_range, coarsen=self.coarsen,
        )


def _resolve_source(source: str, base: Path | None) -> str:
    """An absolute path for ``source``: relative paths are tried against ``base`` (the YAML's directory), then
    the working directory."""
    path = Path(source).expanduser()
    if path.is_absolute():
        return str(path)
    candidates = ([base / path] if base is not None else []) + [Path.cwd() / path]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate.resolve())
    raise ValueError(f"source {source!r}: not found; looked for {' and '.join(str(c) for c in candidates)}.")


def load_config(source: Union[str, os.PathLike, Mapping, Era5Config], overrides: Mapping | None = None) -> Era5Config:
    """Read an ERA5 dataset config: YAML file (or mapping) -> validated :class:`Era5Config`.

    The ``source`` key may use OmegaConf interpolation, e.g. ``${oc.env:ENFPDE_ERA5_SAMPLE,sample.grib}`` (an
    environment variable with a default). A relative ``source`` is resolved against the YAML file's directory
    first, then the working directory (for a mapping or a config: the working directory), and stored absolute.

    Args:
      source: a YAML path, a mapping with the same structure, or a config (returned with ``overrides`` applied).
      overrides: a mapping merged over the file, key by key (e.g. ``{"coarsen": 2}``); a ``splits`` entry replaces
        the file's splits as a whole.

    Raises:
      ValueError: naming the file and the offending key or value (also a missing required key: ``source``,
        ``variables``, ``lead_hours``, ``num_frames``, ``splits``), or a relative ``source`` found nowhere.
    """
    where, user, base = read_config_source(source, Era5Config)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Era5Config), user)
        OmegaConf.set_readonly(merged, False)  # a frozen dataclass gives a read-only config
        if overrides:
            overrides = dict(overrides)
            merged = OmegaConf.merge(merged, {k: v for k, v in overrides.items() if k != "splits"})
            if "splits" in overrides:  # replaces the splits as a whole
                merged.splits = {}
                merged = OmegaConf.merge(merged, {"splits": overrides["splits"]})
        if not OmegaConf.is_missing(merged, "source"):
            merged.source = _resolve_source(str(merged.source), base)
        return OmegaConf.to_object(merged)  # runs Era5Config.__post_init__, the value checks
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        key = getattr(error, "full_key", None)
        raise ValueError(f"{where}: {message}" + (f" (at {key!r})" if key else "") + ".") from None
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


# ------------------------------------------------------------------------------------------------ generation


def _package_version() -> str:
    try:
        return metadata.version("enfpde")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def generate_split(config: Era5Config, split: str, data: xr.Dataset | None = None) -> tuple[xr.Dataset, xr.Dataset]:
    """One split's windows (not yet normalised) and its fields.

    Args:
      config: the dataset config; split: a split name of it.
      data: the canonical data (:func:`open_era5` of ``config.source``), to open the source once for all splits.

    Returns:
      ``(windows, fields)``: :func:`windows` of the split and the :func:`to_fields` (in memory) they are cut from.
    """
    data = open_era5(config.source) if data is None else data
    fields = to_fields(select(data, config.selection(split))).load()
    return windows(fields, config.lead_hours, config.num_frames, config.start_every_hours), fields


def _metadata(config: Era5Config, split: str, data: xr.Dataset) -> dict:
    r = config.splits[split]
    return {
        "Conventions": "CF-1.10",
        "title": f"ERA5 {config.name}: {split} split",
        "source": f"ERA5 reanalysis (ECMWF / Copernicus Climate Change Service) read by enfpde {_package_version()}",
        "references": "Hersbach et al. (2020), The ERA5 global reanalysis, Q. J. R. Meteorol. Soc. 146, 1999-2049",
        "dataset": config.name,
        "split": split,
        "split_start": _iso(_as_datetime(r.start, "start")),
        "split_end": _iso(_as_datetime(r.end, "end")),
        "era5_source": data.attrs.get("era5_source", config.source),
        "era5_format": data.attrs.get("era5_format", ""),
        "coarsen": int(config.coarsen),
        "stride": int(config.stride),
        "normalization_method": "mean and std over every member, time and grid point of the train split (unweighted)",
        "config": OmegaConf.to_yaml(OmegaConf.structured(config)),
    }


def generate_dataset(
    config_path_or_config: Union[str, os.PathLike, Mapping, Era5Config],
    output_dir: Union[str, os.PathLike, None] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Write every split of an ERA5 dataset config as ``<output_dir>/<split>.nc`` (netCDF-4, trajectory schema).

    Each file holds the split's :func:`windows` with the normalisation statistics of the ``train`` split
    (:func:`attach_normalization`) and the config as YAML. All target files are checked before the data is read,
    and every split's selection and windows before the first file is written; each file is written under a
    temporary name and renamed into place (``write_netcdf_atomic``).

    Args:
      config_path_or_config: a dataset YAML path, a mapping, or an :class:`Era5Config`.
      output_dir: overrides the config's ``output_dir``; relative paths are relative to the working directory.
      overwrite: replace existing files.
      progress: show a tqdm bar (splits).

    Returns:
      split name -> path of its file.

    Raises:
      FileExistsError: a target file exists and ``overwrite`` is false (nothing is read or written).
      ValueError: an invalid config; Era5Error (a ValueError) for data that does not fit it.
    """
    config = config_path_or_config
    config = config if isinstance(config, Era5Config) else load_config(config)
    directory = Path(config.output_dir if output_dir is None else output_dir)
    targets = {split: (directory / f"{split}.nc").absolute() for split in config.splits}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"refusing to overwrite existing file(s) {', '.join(existing)}; pass overwrite=True "
            "(enfpde generate --overwrite) to replace them, or choose another output_dir."
        )
    data = open_era5(config.source)
    order = ["train"] + [s for s in config.splits if s != "train"]  # the statistics come from train
    from tqdm.auto import tqdm

    # Validate every split (selection and windows, on one grid point per time) before the first file is written,
    # so a config whose test range lies outside the data fails without leaving a train file behind.
    for split in order:
        try:
            probe = to_fields(select(data, config.selection(split))).isel(latitude=slice(0, 1), longitude=slice(0, 1))
            windows(probe, config.lead_hours, config.num_frames, config.start_every_hours)
        except Era5Error as error:
            raise Era5Error(f"split '{split}': {error}") from None
    directory.mkdir(parents=True, exist_ok=True)
    stats = None
    for split in tqdm(order, desc=config.name, unit=" split", disable=not progress):
        trajectories, fields = generate_split(config, split, data)
        if stats is None:
            stats = normalization(fields)
        trajectories = attach_normalization(trajectories, stats, "train")
        trajectories.attrs.update(_metadata(config, split, data))
        write_netcdf_atomic(trajectories, targets[split], list(trajectories.data_vars), overwrite=overwrite)
    return targets
