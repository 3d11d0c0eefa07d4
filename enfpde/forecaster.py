"""Forecasting: fit ``z0`` to an initial state, integrate it to any times, decode at any coordinates
(zero-shot temporal and spatial super-resolution).

:func:`forecast_fields` works on arrays inside traced code; :class:`Forecaster` is the user-facing model
loaded from a run directory, with ``predict`` on NumPy arrays in raw units (the protocol the evaluation
harness uses) and ``forecast`` on xarray Datasets. :class:`XarrayForecast` is that xarray interface on its
own, shared with the baselines' forecasters (:mod:`enfpde.baselines`).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from flax import nnx

from enfpde import checkpointing, distributed
from enfpde.config import DataConfig, ModelConfig, RunConfig, check_forecast_ensemble, config_from_yaml
from enfpde.data.augmentation import turn_points
from enfpde.data.trajectories import POINT_DIM, TIME_DIM, TRAJECTORY_DIM, Normalizer, check_monotone_times, grid_points
from enfpde.dynamics import EquivariantDynamics
from enfpde.encoder import MetaSGDEncoder
from enfpde.field import EquivariantNeuralField
from enfpde.geometry import AbsolutePosition, AxialSphere, Geometry, Plane, Sphere, Torus
from enfpde.latents import Latents
from enfpde.rollout import rollout, solver_from_name

Array = jax.Array


def decode_trajectory(field: EquivariantNeuralField, zs: Latents, coords: Array, *, shared_poses: bool = False) -> Array:
    """Decode latents with batch ``[T, B]`` at ``coords [Q, D]``: returns ``[T, B, Q, C]``.

    One frame at a time (``lax.map``): memory and the decoder's working set stay those of one frame. With
    ``shared_poses`` (every frame has the first frame's poses and widths: dynamics with ``move_poses=False``)
    the pose-dependent part of the decoding is computed once for all frames (``field.decode_frames``).
    """
    if shared_poses:
        return field.decode_frames(coords, zs)
    return jax.lax.map(lambda z: field(coords, z), zs)


def forecast_fields(
    field: EquivariantNeuralField,
    encoder: MetaSGDEncoder,
    dynamics: EquivariantDynamics,
    coords: Array,
    initial_values: Array,
    times: Array,
    query_coords: Array,
    mask: Array | None = None,
    *,
    solver: diffrax.AbstractSolver | None = None,
    dt0: float | None = 1.0,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    key: Array | None = None,
    max_steps: int = 4096,
) -> Array:
    """Forecast fields from an observed initial state.

    Args:
        coords: internal coordinates of the observations ``[M, D]``.
        initial_values: the initial state ``[B, M, C]`` at time 0 (NaN allowed where ``mask`` is False).
        times: ``[T]`` increasing output times in the time units of the training data (any values, not
            only the training frames).
        query_coords: where to decode ``[Q, D]`` (any resolution).
        mask: ``[B, M]`` observed points.
        solver, dt0, stepsize_controller, max_steps: see :func:`enfpde.rollout.rollout`.

    Returns:
        ``[T, B, Q, C]``.
    """
    z0 = encoder(field, coords, initial_values, mask, key=key)
    zs = rollout(
        dynamics, z0, times, solver=solver, dt0=dt0, stepsize_controller=stepsize_controller, max_steps=max_steps
    )
    return decode_trajectory(field, zs, query_coords, shared_poses=not dynamics.move_poses)


# ---------------------------------------------------------------------------------------------------------
# Building the model from a run configuration
# ---------------------------------------------------------------------------------------------------------

def make_geometry(data: DataConfig) -> Geometry:
    """The geometry named by ``data.geometry`` (``torus``, ``plane``, ``sphere``, ``axial_sphere``,
    ``absolute`` (the torus without symmetry) or ``absolute_sphere``), regional on the sphere when
    ``data.region`` is set."""
    name = data.geometry
    region = tuple(data.region) if data.region is not None else None
    if region is not None and name not in ("sphere", "axial_sphere", "absolute_sphere"):
        raise ValueError(f"data.region is for the sphere geometries; data.geometry is {name!r}.")
    if name == "torus":
        return Torus(tuple(data.periods))
    if name == "plane":
        return Plane()
    if name == "sphere":
        return Sphere(region=region)
    if name == "axial_sphere":
        return AxialSphere(region=region)
    if name == "absolute":
        return AbsolutePosition(Torus(tuple(data.periods)))
    if name == "absolute_sphere":
        return AbsolutePosition(Sphere(region=region))
    raise ValueError(
        f"unknown geometry {name!r}; expected torus, plane, sphere, axial_sphere, absolute or absolute_sphere."
    )


def build_modules(
    model: ModelConfig, geometry: Geometry, num_channels: int, seed: int = 0
) -> tuple[EquivariantNeuralField, MetaSGDEncoder, EquivariantDynamics]:
    """Fresh decoder, encoder and dynamics for ``num_channels`` output channels, initialised from ``seed``."""
    rngs = nnx.Rngs(seed)
    field = EquivariantNeuralField(
        geometry,
        num_out=num_channels,
        latent_dim=model.latent_dim,
        num_hidden=model.num_hidden,
        num_heads=model.num_heads,
        num_frequencies=model.num_frequencies,
        query_std=model.query_std,
        value_std=model.value_std,
        context_stem=model.context_stem,
        full_width_heads=model.full_width_heads,
        embedding_mlp=model.embedding_mlp,
        value_ffn=model.value_ffn,
        value_mixer=model.value_mixer,
        deep_head=model.deep_head,
        k_nearest=model.k_nearest,
        chunk_size=model.chunk_size,
        rngs=rngs,
    )
    encoder = MetaSGDEncoder(
        geometry,
        num_latents=model.num_latents,
        latent_dim=model.latent_dim,
        num_inner_steps=model.inner_steps,
        fit_steps=model.fit_steps,
        inner_points=model.inner_points,
        pose_lr=model.pose_lr,
        context_lr=model.context_lr,
        learn_poses=model.learn_poses,
        first_order=model.first_order,
        disjoint_subsets=model.disjoint_subsets,
        outer_points=model.outer_points,
        width_factor=model.width_factor,
    )
    dynamics = EquivariantDynamics(
        geometry,
        latent_dim=model.latent_dim,
        num_hidden=model.dynamics_hidden,
        num_layers=model.dynamics_layers,
        num_frequencies=model.dynamics_frequencies,
        kernel_radius=model.kernel_radius,
        k_nearest=model.dynamics_k_nearest,
        output_scale=model.dynamics_output_scale,
        standardize_contexts=model.standardize_contexts,
        move_poses=model.dynamics_move_poses,
        rngs=rngs,
    )
    return field, encoder, dynamics


# ---------------------------------------------------------------------------------------------------------
# The user-facing forecaster
# ---------------------------------------------------------------------------------------------------------

DEFAULT_MAX_STEPS = 4096
# Initial states further than this from the training mean, in training standard deviations, are refused: such
# values are wrong units or corrupt data, and the Meta-SGD fit overflows float32 on them.
MAX_INPUT_DEVIATION = 1e4


class NonFiniteForecastError(ValueError):
    """A forecast went non-finite (NaN or infinite values); nothing is returned or written."""


def lead_times(times) -> np.ndarray:
    """Validate lead times given as a number or a 1-D sequence of numbers: ``[T]`` float64.

    Raises:
        TypeError: None, dates, durations, strings or complex numbers.
        ValueError: more than one dimension, or empty.
    """
    if times is None:
        raise TypeError("times: expected lead times (a number or a 1-D sequence of numbers), found None.")
    array = np.asarray(times)
    if np.issubdtype(array.dtype, np.datetime64) or np.issubdtype(array.dtype, np.timedelta64):
        raise TypeError(
            f"times: expected lead times as numbers in the model's time units, found {array.dtype} values; convert "
            f"them, e.g. (valid_times - initial_time) / np.timedelta64(1, 'h') for a model trained in hours."
        )
    if array.dtype.kind not in "iuf":
        raise TypeError(f"times: expected real numbers, found dtype {array.dtype} ({np.ravel(array)[:3].tolist()} ...).")
    if array.ndim > 1:
        raise ValueError(f"times: expected a number or a 1-D sequence of lead times, found shape {array.shape}.")
    array = array.astype(np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError("times: expected a non-empty sequence of lead times, found none.")
    return array


class XarrayForecast:
    """The xarray interface of a forecaster: :meth:`forecast` on an ``xr.Dataset``, built on the array method
    ``predict(coords, initial_values, times, query_coords) -> [B, T, Q, C]`` (raw units).

    A class mixing it in provides ``predict`` and the data's metadata as attributes: ``variables`` and
    ``units`` (one per channel), ``axes`` (the user coordinate axes, e.g. ``("y", "x")`` or
    ``("latitude", "longitude")``) and ``time_units``. :class:`Forecaster` and the baselines
    (:mod:`enfpde.baselines`) share it, so the same Dataset gives the same checks, errors and output layout
    whichever model answers; :meth:`_forecast_attrs` names the model in the output's attributes.
    """

    variables: tuple[str, ...]
    units: tuple[str, ...]
    axes: tuple[str, ...]
    time_units: str

    def _forecast_attrs(self) -> dict:
        """Global attributes of the forecast Dataset besides the CF convention (override to name the model)."""
        return {"source": f"enfpde {type(self).__name__}"}

    def forecast(
        self,
        initial_state: xr.Dataset,
        times,
        at: xr.Dataset | Mapping | None = None,
        *,
        variables: Sequence[str] | None = None,
        max_steps: int | None = None,
    ) -> xr.Dataset:
        """Forecast an ``xr.Dataset`` of initial states.

        Args:
            initial_state: the model's variables with dimensions ``([trajectory,] *space)`` (a ``time``
                dimension of size 1 is allowed and gives the initial time), where ``space`` is the grid
                ``{axes}`` or ``(point,)`` with coordinate variables per axis. An optional boolean ``mask``
                variable marks observed points; NaNs are allowed only where it is False.
            times: lead times from the initial state, increasing, >= 0, in the model's time units.
            at: where to decode: None (the input points), a mapping or Dataset with 1-D coordinates per axis
                (a grid, any resolution), or coordinates on a ``point`` dimension (scattered points).
            variables: which variables to return (default all).
            max_steps: the ODE solver's step budget (models with latent dynamics; default 4096): lead times that
                need more steps are refused before any work starts.

        Returns:
            ``xr.Dataset`` with dims ``(trajectory, time, *space)``, ``time`` the initial time plus the lead
            time and ``lead_time`` the lead time.
        """
        variables = self._check_variables(variables)
        ds = self._squeeze_time(initial_state)
        coords, values, mask_var = self._observations(ds)
        times = lead_times(times)
        n = values.shape[0]
        query, out_space_dims, out_space_shape, out_coords = self._query(ds, at, num_states=n, num_times=times.size)
        if mask_var is not None:
            values = np.where(mask_var[..., None], values, np.nan)
        options = {} if max_steps is None else {"max_steps": max_steps}
        prediction = self.predict(coords, values, times, query, **options)  # [B, T, Q, C]
        data_vars = {}
        for c, name in enumerate(self.variables):
            if name in variables:
                data = prediction[..., c].reshape((n, times.size, *out_space_shape))
                attrs = dict(initial_state[name].attrs)
                attrs.setdefault("units", self.units[c])
                data_vars[name] = ((TRAJECTORY_DIM, TIME_DIM, *out_space_dims), data, attrs)
        out_coords = dict(out_coords)
        if TRAJECTORY_DIM in ds.coords and ds[TRAJECTORY_DIM].ndim == 1:
            out_coords[TRAJECTORY_DIM] = ((TRAJECTORY_DIM,), ds[TRAJECTORY_DIM].values)
        lead_units = self.time_units.split(" since ")[0]  # a duration: "hours since 2020-01-01" -> "hours"
        out_coords["lead_time"] = ((TIME_DIM,), times, {"units": lead_units, "long_name": "time since the initial state"})
        time_attrs = dict(initial_state[TIME_DIM].attrs) if TIME_DIM in initial_state.coords else {"units": self.time_units}
        out_coords[TIME_DIM] = ((TIME_DIM,), self._valid_times(initial_state, times), time_attrs)
        attrs = {"Conventions": "CF-1.10", **self._forecast_attrs()}
        return xr.Dataset(data_vars, coords=out_coords, attrs=attrs)

    def _check_variables(self, variables):
        if variables is None:
            return self.variables
        unknown = [v for v in variables if v not in self.variables]
        if unknown:
            raise KeyError(f"unknown variable(s) {unknown}: the model forecasts {list(self.variables)}.")
        return tuple(variables)

    def _squeeze_time(self, ds: xr.Dataset) -> xr.Dataset:
        if not isinstance(ds, xr.Dataset):
            raise TypeError(f"initial_state must be an xarray.Dataset, found {type(ds).__name__}.")
        if TIME_DIM in ds.dims:
            if ds.sizes[TIME_DIM] != 1:
                raise ValueError(
                    f"initial_state has {ds.sizes[TIME_DIM]} times; a forecast starts from one state per trajectory: "
                    f"select it, e.g. ds.isel(time=[0])."
                )
            ds = ds.isel({TIME_DIM: 0})
        return ds

    def _space_layout(self, ds, dims: tuple[str, ...], what: str):
        if dims == tuple(self.axes):
            return "grid"
        if dims == (POINT_DIM,):
            missing = [a for a in self.axes if a not in ds.variables]
            if missing:
                raise ValueError(f"{what}: scattered points need coordinate variables {list(self.axes)} on '{POINT_DIM}'; missing {missing}.")
            return "points"
        raise ValueError(
            f"{what}: spatial dimensions {list(dims)} do not match the model's grid {list(self.axes)} "
            f"or scattered points ['{POINT_DIM}']."
        )

    def _observations(self, ds: xr.Dataset):
        missing = [v for v in self.variables if v not in ds.data_vars]
        if missing:
            raise KeyError(
                f"initial_state lacks variable(s) {missing} the model was trained on; found {sorted(map(str, ds.data_vars))}."
            )
        first = ds[self.variables[0]]
        lead = (TRAJECTORY_DIM,) if TRAJECTORY_DIM in first.dims else ()
        if first.dims[: len(lead)] != lead:
            raise ValueError(f"'{TRAJECTORY_DIM}' must be the first dimension of the variables, found {first.dims}.")
        if lead and ds.sizes[TRAJECTORY_DIM] == 0:
            raise ValueError(f"initial_state has 0 trajectories: the '{TRAJECTORY_DIM}' dimension is empty.")
        space = first.dims[len(lead):]
        self._space_layout(ds, space, "initial_state")
        for v in self.variables:
            if ds[v].dims != first.dims:
                raise ValueError(f"variable '{v}' has dimensions {ds[v].dims}, expected {first.dims} like '{self.variables[0]}'.")
            _require_real(ds[v].dtype, f"variable '{v}'")
        axis_values = [_axis_values(ds, a, "initial_state") for a in self.axes]
        if space == tuple(self.axes):
            coords = grid_points(axis_values)
        else:
            coords = np.stack(axis_values, axis=-1)
            _require_distinct_points(coords, "initial_state")
        if 0 in first.shape:
            raise ValueError(f"initial_state has no points: its dimensions are {dict(first.sizes)}.")
        values = np.stack([ds[v].values.astype(np.float32) for v in self.variables], axis=-1)
        if not lead:
            values = values[None]
        values = values.reshape(values.shape[0], -1, len(self.variables))
        mask = None
        if "mask" in ds.variables:  # a data variable or a coordinate
            mask_da = ds["mask"]
            if mask_da.dtype != bool:
                raise ValueError(f"'mask' must be boolean (True = observed), found dtype {mask_da.dtype}.")
            extra = [d for d in mask_da.dims if d not in first.dims]
            if extra:
                raise ValueError(
                    f"'mask' has dimension(s) {extra} that the fields lack; expected a subset of {list(first.dims)}."
                )
            mask = np.broadcast_to(mask_da.broadcast_like(first).transpose(*first.dims).values, first.shape).reshape(values.shape[:2])
        observed = np.ones(values.shape[:2], bool) if mask is None else mask
        bad = ~np.isfinite(values).all(-1) & observed
        if bad.any():
            raise ValueError(
                f"initial_state has {int(bad.sum())} non-finite value(s) at observed points"
                + (" (where 'mask' is True)" if mask is not None else "")
                + ": add a boolean 'mask' variable that is False at missing points, or drop them."
            )
        if not observed.any(axis=1).all():
            empty = np.flatnonzero(~observed.any(axis=1))[:5].tolist()
            raise ValueError(f"'mask' leaves initial state(s) {empty} with no observed point.")
        return coords, values, mask

    def _check_output_size(self, num_states: int, num_times: int, num_points: int, budget_fraction: float = 0.5) -> None:
        """Refuse, before any allocation, a forecast whose output would take more than ``budget_fraction`` of the
        memory available now (the float32 forecast, its copy in the Dataset, and the query coordinates)."""
        channels, axes = len(self.variables), len(self.axes)
        needed = 8 * num_states * num_times * num_points * channels + 16 * num_points * axes
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if needed > budget_fraction * available:
            raise MemoryError(
                f"this forecast needs about {needed / 2**30:.1f} GiB ({num_states} states x {num_times} times x "
                f"{num_points} points x {channels} channels in float32, and the query coordinates) and "
                f"{available / 2**30:.1f} GiB of memory is available: ask for fewer times, a coarser resolution or "
                f"fewer states per call."
            )

    def _query(self, ds: xr.Dataset, at, *, num_states: int, num_times: int):
        """Query coordinates [Q, D], output spatial dims, shape and coordinate variables."""
        if at is None:
            first = ds[self.variables[0]]
            space = first.dims[1:] if TRAJECTORY_DIM in first.dims else first.dims
            values = [_axis_values(ds, a, "initial_state") for a in self.axes]
        else:
            if not isinstance(at, (xr.Dataset, xr.DataArray, xr.Coordinates, Mapping)):
                raise TypeError(f"'at' must be None, a mapping of coordinates or an xarray Dataset, found {type(at).__name__}.")
            missing = [a for a in self.axes if a not in at]
            if missing:
                raise KeyError(f"'at' lacks coordinate(s) {missing}; expected {list(self.axes)}.")
            arrays = [at[a] if isinstance(at[a], xr.DataArray) else xr.DataArray(np.asarray(at[a])) for a in self.axes]
            named = [isinstance(at[a], xr.DataArray) for a in self.axes]
            if all(array.dims == (POINT_DIM,) for array in arrays):
                space = (POINT_DIM,)
                if len({array.size for array in arrays}) != 1:
                    raise ValueError(f"'at': the point coordinates have different lengths {[a.size for a in arrays]}.")
            elif all(array.ndim == 1 and (not n or array.dims == (a,)) for array, n, a in zip(arrays, named, self.axes)):
                space = tuple(self.axes)
            else:
                found = {a: array.dims for a, array in zip(self.axes, arrays)}
                raise ValueError(
                    f"'at': coordinates must be 1-D per grid axis, each on its own dimension {list(self.axes)}, or all on "
                    f"'{POINT_DIM}'; found dimensions {found}."
                )
            values = [np.asarray(array.values) for array in arrays]
            for a, v in zip(self.axes, values):
                _require_real(v.dtype, f"'at' coordinate '{a}'")
                if v.size == 0:
                    raise ValueError(f"'at': coordinate '{a}' is empty; give at least one value per axis.")
                if not np.all(np.isfinite(v)):
                    raise ValueError(f"'at': coordinate '{a}' has non-finite values.")
                if space != (POINT_DIM,) and np.unique(v).size != v.size:
                    raise ValueError(f"'at': grid coordinate '{a}' has duplicate values.")
            if space == (POINT_DIM,):
                _require_distinct_points(np.stack(values, axis=-1), "'at'")
        num_points = values[0].size if space == (POINT_DIM,) else int(np.prod([float(v.size) for v in values]))
        self._check_output_size(num_states, num_times, num_points)
        if space == tuple(self.axes):
            coords = {a: ((a,), v, _axis_attrs(ds, a)) for a, v in zip(self.axes, values)}
            return grid_points(values), space, tuple(v.size for v in values), coords
        coords = {a: ((POINT_DIM,), v, _axis_attrs(ds, a)) for a, v in zip(self.axes, values)}
        return np.stack(values, axis=-1), space, (values[0].size,), coords

    def _valid_times(self, ds: xr.Dataset, lead: np.ndarray):
        if TIME_DIM in ds.coords and ds[TIME_DIM].size == 1:
            t0 = ds[TIME_DIM].values.reshape(-1)[0]
            if np.issubdtype(np.asarray(t0).dtype, np.datetime64):
                if self.time_units.split(" since ")[0].strip() not in ("hours", "hour", "h"):
                    raise ValueError(
                        f"the initial time is a date ({t0}) but the model was trained with times in "
                        f"'{self.time_units}', not hours: give a numeric initial time or none."
                    )
                return t0 + (lead * 3600.0).astype("timedelta64[s]")
            return float(t0) + lead
        return lead


class Forecaster(XarrayForecast):
    """A trained ENF forecaster: encoder + dynamics + decoder with the data's normalisation and metadata.

    Load one with :meth:`load`. All inputs and outputs are in the data's raw units; coordinates are user
    coordinates (``(y, x)`` on the torus, ``(latitude, longitude)`` in degrees on the sphere) and times are
    lead times from the initial state in the units the model was trained with.

    Args:
        config: the run's configuration; metadata: the run's ``model.json`` contents;
        field, encoder, dynamics: the trained modules.
        ensemble: how :meth:`predict` forecasts (``model.forecast_ensemble``): ``none`` or ``quarter_turns``;
            None takes the run's setting.
    """

    def __init__(self, config: RunConfig, metadata: Mapping, field, encoder, dynamics, *, batch_size: int = 8,
                 ensemble: str | None = None):
        self.ensemble = config.model.forecast_ensemble if ensemble is None else ensemble
        check_forecast_ensemble(config, self.ensemble)
        if self.ensemble == "quarter_turns" and not isinstance(field.geometry, Torus):
            raise ValueError(f"the quarter-turn forecast ensemble needs a torus model; this one's geometry is {type(field.geometry).__name__}.")
        self.config = config
        self.metadata = dict(metadata)
        self.geometry = field.geometry
        self.normalizer = Normalizer.from_dict(metadata["normalizer"])
        self.variables = tuple(metadata["variables"])
        self.units = tuple(metadata["units"])
        self.axes = tuple(metadata["axes"])
        self.time_units = metadata.get("time_units", "1")
        self.batch_size = batch_size
        # Fit initial states chunk by chunk: the inner steps' gradients on every observed point would otherwise
        # hold each (point, latent) pair's activations at once (about 1 GB per 64 x 64 state with the released
        # decoder).
        encoder.grad_chunk_size = field.chunk_size
        self.modules = (field, encoder, dynamics)
        graphdef, state = nnx.split(self.modules)
        self._state = state
        solver = solver_from_name(config.model.solver)
        dt0 = config.model.dt0

        @functools.partial(jax.jit, static_argnames="max_steps")
        def predict_normalized(state, coords, values, mask, times, query, max_steps):
            field, encoder, dynamics = nnx.merge(graphdef, state)
            out = forecast_fields(
                field, encoder, dynamics, coords, values, times, query, mask, solver=solver, dt0=dt0,
                key=jax.random.key(0), max_steps=max_steps,
            )
            return out.swapaxes(0, 1)

        self._predict_normalized = predict_normalized

    @classmethod
    def load(cls, run_dir: str | os.PathLike, *, step: int | None = None, batch_size: int = 8,
             ensemble: str | None = None) -> Forecaster:
        """The model of a run directory at its latest checkpoint (or ``step``), forecasting with ``ensemble``
        (None: the run's ``model.forecast_ensemble``)."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"no run directory at '{run_dir}'.")
        metadata = checkpointing.read_model_metadata(run_dir)
        config = config_from_yaml(run_dir / checkpointing.CONFIG_FILE)
        # Shapes only: the checkpoint holds every variable, so initialising them first would only cost time (every
        # initialiser compiled on its own: 6.5 s for the quick preset's modules). The target names this process's
        # device, whatever topology wrote the checkpoint (orbax would otherwise restore onto the saved one).
        modules = nnx.eval_shape(
            lambda: build_modules(config.model, make_geometry(config.data), len(metadata["variables"]), config.train.seed)
        )
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.state(modules))
        manager = checkpointing.checkpoint_manager(run_dir, max_to_keep=None)
        try:
            steps = manager.all_steps()
            if not steps:
                raise FileNotFoundError(f"run '{run_dir}' has no checkpoint yet.")
            if step is None:
                # The newest checkpoint that restores: a damaged latest one never makes a run unusable.
                step, restored, _, skipped = checkpointing.restore_newest(manager, target, run_dir=f"'{run_dir}'")
                if skipped:
                    warnings.warn(f"{run_dir}: {checkpointing.describe_skipped(skipped)}; loaded step {step}.", stacklevel=2)
            elif step not in steps:
                raise FileNotFoundError(f"run '{run_dir}' has no checkpoint at step {step}; it has {sorted(steps)}.")
            else:
                restored, _ = checkpointing.restore(manager, step, target)
        finally:
            manager.close()
        nnx.update(modules, restored)
        forecaster = cls(config, metadata, *modules, batch_size=batch_size, ensemble=ensemble)
        forecaster.step = step
        return forecaster

    # -- arrays ------------------------------------------------------------------------------------------

    def predict(self, coords, initial_values, times, query_coords=None, *, max_steps: int = DEFAULT_MAX_STEPS) -> np.ndarray:
        """Forecast from observed initial states.

        Args:
            coords: ``[M, D]`` user coordinates of the observations.
            initial_values: ``[B, M, C]`` raw units; NaN where a point is not observed (every channel of a
                point must be observed or missing together).
            times: ``[T]`` increasing lead times >= 0.
            query_coords: ``[Q, D]`` where to decode (default: ``coords``).
            max_steps: the ODE solver's step budget. With the model's fixed step ``model.dt0`` (in units of
                ``model.time_unit``) a lead time ``t`` needs ``ceil(t / (time_unit * dt0))`` steps; a lead time
                past the budget is refused before any work starts.

        Returns:
            ``[B, T, Q, C]`` in raw units. With the ``quarter_turns`` ensemble, the mean of the forecasts from the
            observations and query points turned by 0, 1, 2 and 3 quarter turns (each such forecast is one of the
            turned initial state, read back at the points' images): a forecast that is exactly equivariant under
            the turns, whose errors partly average out, for 4x the cost.

        Raises:
            ValueError: bad shapes, times or observations, a lead time past ``max_steps``.
            NonFiniteForecastError: the forecast went non-finite (typically inputs far outside the training data).
        """
        coords_internal = self.geometry.coords_from_user(coords)
        query_internal = coords_internal if query_coords is None else self.geometry.coords_from_user(query_coords)
        values = np.asarray(initial_values, np.float32)
        num_channels = len(self.variables)
        if values.ndim != 3 or values.shape[1:] != (coords_internal.shape[0], num_channels):
            raise ValueError(
                f"initial_values: expected shape [B, {coords_internal.shape[0]}, {num_channels}] (batch, points, "
                f"channels {list(self.variables)}), found {values.shape}."
            )
        times = np.asarray(times, np.float64)
        check_monotone_times(times, "forecast times")
        if times[0] < 0:
            raise ValueError(f"forecast times are lead times and must be >= 0, found {times[0]}.")
        self.check_step_budget(times, max_steps)
        finite = np.isfinite(values)
        mask = finite.all(-1)
        if np.any(finite.any(-1) & ~mask):
            raise ValueError("initial_values: some points have only part of their channels observed.")
        if not mask.any(axis=1).all():
            raise ValueError("initial_values: a state has no observed point.")
        normalized = np.where(mask[..., None], self.normalizer.normalize(np.nan_to_num(values)), 0.0).astype(np.float32)
        reach = np.max(np.abs(normalized), axis=(1, 2), initial=0.0)  # [B], in training standard deviations
        if np.any(reach > MAX_INPUT_DEVIATION) or not np.all(np.isfinite(normalized)):
            far = np.flatnonzero(~(reach <= MAX_INPUT_DEVIATION))
            raise ValueError(
                f"initial state(s) {far[:5].tolist()}{' ...' if far.size > 5 else ''} reach "
                f"{float(np.max(reach[far])):.3g} standard deviations from the training data's mean (variables "
                f"{list(self.variables)}, mean {self.normalizer.mean.tolist()}, std {self.normalizer.std.tolist()}); "
                f"more than {MAX_INPUT_DEVIATION:g} is not data this model can forecast: check the units and scale."
            )
        num_states = values.shape[0]
        chunk_size = min(self.batch_size, num_states)
        starts = list(range(0, num_states, chunk_size))

        # (observation points, query points) of each forecast averaged, on the device once for every chunk
        turns = range(4) if self.ensemble == "quarter_turns" else range(1)
        views = [
            (jnp.asarray(turn_points(coords_internal, self.geometry.periods, k)) if k else coords_internal,
             jnp.asarray(turn_points(query_internal, self.geometry.periods, k)) if k else query_internal)
            for k in turns
        ]

        def run(start: int) -> np.ndarray:
            chunk = np.arange(start, start + chunk_size)
            # Pad a short last chunk with copies of its first state: one compiled program serves every chunk.
            chunk = np.where(chunk < num_states, chunk, start)
            out = 0.0
            for observed_at, decoded_at in views:
                out = out + np.asarray(self._predict_normalized(
                    self._state, observed_at, jnp.asarray(normalized[chunk]), jnp.asarray(mask[chunk]),
                    jnp.asarray(times / self.config.model.time_unit, jnp.float32), decoded_at, max_steps=int(max_steps),
                ))
            return out / len(views)  # [chunk_size, T, Q, C]

        count = jax.process_count()
        if count == 1:
            outputs = [run(start) for start in starts]
        else:
            # Several processes (enfpde.distributed): process p forecasts chunks p, p + count, ...; every process
            # then receives all of them in order.
            mine = [run(start) for start in starts[jax.process_index() :: count]]
            per_process = -(-len(starts) // count)
            mine += [np.zeros_like(mine[0] if mine else run(starts[0]))] * (per_process - len(mine))
            gathered = distributed.gather(np.stack(mine))  # [count, per_process, chunk_size, T, Q, C]
            outputs = [gathered[i % count, i // count] for i in range(len(starts))]
        outputs = [out[: num_states - start] for out, start in zip(outputs, starts)]
        prediction = self.normalizer.denormalize(np.concatenate(outputs, axis=0)).astype(np.float32)
        self._check_finite(prediction, normalized, mask, times)
        return prediction

    def check_step_budget(self, times: np.ndarray, max_steps) -> None:
        """Raise ValueError if the last of ``times`` (lead times, data units) needs more than ``max_steps`` solver
        steps of the model's fixed step."""
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, found {max_steps!r}.")
        step = self.config.model.time_unit * self.config.model.dt0  # data time units per solver step
        needed = int(np.ceil(times[-1] / step - 1e-6))
        if needed > max_steps:
            units = "" if self.time_units in ("", "1") else f" {self.time_units}"
            raise ValueError(
                f"lead time {times[-1]:g}{units} needs {needed} solver steps of {step:g}{units}, more than "
                f"max_steps = {max_steps}: pass a larger max_steps (CLI: --max-steps), or check the times' units "
                f"(the model's horizon was {self.metadata.get('horizon_time', '?')})."
            )

    def _check_finite(self, prediction: np.ndarray, normalized: np.ndarray, mask: np.ndarray, times: np.ndarray) -> None:
        """Refuse a forecast with non-finite values, naming where and how far the inputs were from the data."""
        bad = ~np.isfinite(prediction).all(axis=(2, 3))  # [B, T]
        if not bad.any():
            return
        states = np.flatnonzero(bad.any(axis=1))
        first = {int(b): float(times[np.argmax(bad[b])]) for b in states[:5]}
        reach = [float(np.max(np.abs(normalized[b][mask[b]]), initial=0.0)) for b in states[:5]]
        cause = (
            "the model cannot extrapolate that far: check the inputs' units and scale"
            if max(reach) > 10.0
            else "the inputs are within the training data's range, so the model itself diverged (unstable latent "
            "dynamics at these lead times, or damaged parameters)"
        )
        raise NonFiniteForecastError(
            f"the forecast is non-finite for {states.size} of {bad.shape[0]} initial state(s) (indices "
            f"{states[:5].tolist()}{' ...' if states.size > 5 else ''}), from lead time(s) {list(first.values())} on. "
            f"Their inputs reach {', '.join(f'{r:.3g}' for r in reach)} standard deviations from the training mean; "
            f"{cause}. Nothing was returned or written."
        )

    def _forecast_attrs(self) -> dict:
        return {"source": "enfpde Forecaster", "model_step": int(getattr(self, "step", -1))}


def _require_real(dtype, what: str) -> None:
    if np.dtype(dtype).kind not in "iuf":
        raise TypeError(f"{what}: expected real numbers, found dtype {dtype}.")


def _axis_values(ds: xr.Dataset, axis: str, what: str) -> np.ndarray:
    """The values of a coordinate axis, which must be a real coordinate variable without duplicates on a grid."""
    if axis not in ds.variables:
        raise ValueError(
            f"{what}: the dimension '{axis}' has no coordinate variable; assign one, e.g. "
            f"ds.assign_coords({axis}=values) (in the model's units)."
        )
    values = np.asarray(ds[axis].values)
    _require_real(values.dtype, f"{what}: coordinate '{axis}'")
    if ds[axis].dims == (axis,) and np.unique(values).size != values.size:
        raise ValueError(f"{what}: grid coordinate '{axis}' has duplicate values.")
    return values


def _require_distinct_points(points: np.ndarray, what: str) -> None:
    if np.unique(points, axis=0).shape[0] != points.shape[0]:
        raise ValueError(f"{what}: some scattered points appear more than once (same coordinates on every axis).")


def _axis_attrs(ds: xr.Dataset, axis: str) -> dict:
    return dict(ds[axis].attrs) if axis in ds.variables else {}
