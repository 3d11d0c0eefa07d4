"""The Fourier neural operator baseline (FNO-2D, autoregressive in time; Li et al., ICLR 2021).

Model. One step maps the last ``history`` frames to the next one::

    v_0 = P(u_{t-h+1}, ..., u_t, features(x))          lifting: pointwise linear, width channels
    v_{l+1} = GELU(K_l v_l + W_l v_l)                   l = 0 .. depth-1 (no GELU after the last layer)
    u_{t+1} = u_t + Q(v_depth)                          projection: pointwise MLP; a residual update

with the spectral convolution ``K v = irfft2(R . rfft2(v))``: ``R`` a learned complex matrix
(``width x width``) per retained Fourier mode, the modes ``|k_0| < modes`` (positive and negative
frequencies) along the first grid axis and ``0 <= k_1 < modes`` along the second (the ``rfft`` axis), all
other modes zero. ``K`` and the pointwise maps commute with periodic grid shifts; the coordinate features
do not (they are inputs that move with the grid, see :meth:`FNO.__call__`).

Coordinate features (:class:`~enfpde.baselines.common.Domain`): on the torus ``sin, cos`` of ``2 pi y / L_y``
and ``2 pi x / L_x``, periodic like the domain (raw coordinates would put a jump at the box edge); on the
sphere ``sin, cos`` of the longitude and ``sin`` of the latitude. ``FNOConfig(coordinate_features=False)``
leaves them out; the model is then exactly equivariant to periodic grid shifts.

On the sphere the FNO runs on the equiangular latitude-longitude grid as on a plain 2-D periodic FFT grid:
it is **not** a spherical operator (the latitude axis is treated as periodic by the FFT, poles and grid
convergence are ignored).

Time. The model advances one training frame interval ``dt`` per step. At the initial state only one frame
is known: the window is padded by repeating frame 0 (``[u_0, ..., u_0]``), in training (windows that start
before frame 0) as in forecasting. Forecasts are made at the frames ``k dt``; at other lead times
:meth:`FNOForecaster.predict` interpolates linearly in time between the two neighbouring frames, or, with
``interpolate_in_time=False``, raises. Time 0 returns the (filled) initial state itself.

Training: rollouts of ``rollout_steps`` steps from random start frames of the training horizon, unrolled
with ``jax.lax.scan``, MSE of every predicted frame in normalised channels (the data layer's
:class:`~enfpde.data.trajectories.Normalizer`); AdamW with cosine learning-rate decay and global-norm
clipping. The FNO needs the full grid: training data must be fully observed.

Sparse or off-grid initial states are filled onto the training grid first
(:meth:`~enfpde.baselines.common.Grid.fill`: linear interpolation on a periodic-aware Delaunay
triangulation, nearest observed point outside it); forecasts at query points off the grid are bilinear
(periodic) interpolations of the forecast grid (:meth:`~enfpde.baselines.common.Grid.interpolate`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from enfpde.baselines import common
from enfpde.baselines.common import Grid
from enfpde.data.trajectories import BatchSampler, Normalizer, TrajectoryDataset
from enfpde.forecaster import XarrayForecast

__all__ = ["FNO", "FNOConfig", "FNOForecaster", "FNOTrainConfig", "SpectralConv2d", "rollout", "train"]

Array = jax.Array

# Lead times within this fraction of a frame interval of a frame count as that frame.
_FRAME_RTOL = 1e-4


def _check_positive_ints(obj, names) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, found {value!r}.")


@dataclasses.dataclass(frozen=True)
class FNOConfig:
    """Sizes of the FNO.

    Attributes:
        modes: Fourier modes kept per axis (``|k_0| < modes`` and ``0 <= k_1 < modes``); the grid needs
            ``H >= 2 modes - 1`` and ``W >= 2 (modes - 1)``.
        width: channels of the hidden layers.
        depth: spectral-convolution layers.
        history: past frames in the input window (channels stacked).
        projection_width: hidden width of the output projection.
        coordinate_features: append the domain's coordinate features to the input.
    """

    modes: int = 12
    width: int = 32
    depth: int = 4
    history: int = 1
    projection_width: int = 128
    coordinate_features: bool = True

    def __post_init__(self):
        _check_positive_ints(self, ("modes", "width", "depth", "history", "projection_width"))

    @classmethod
    def for_navier_stokes(cls, **overrides) -> FNOConfig:
        """REFERENCE section 4: 12 modes per axis, width 32, 4 layers (64 x 64 torus grid)."""
        return cls(**{"modes": 12, "width": 32, "depth": 4, **overrides})

    @classmethod
    def for_sphere(cls, **overrides) -> FNOConfig:
        """12 modes per axis, width 32, 4 layers on the 48 x 96 latitude-longitude grid."""
        return cls(**{"modes": 12, "width": 32, "depth": 4, **overrides})


@dataclasses.dataclass(frozen=True)
class FNOTrainConfig:
    """How the FNO is trained.

    Attributes:
        batch_size: trajectories per step.
        rollout_steps: steps unrolled per sample (the loss covers every one); None: ``horizon - 1``, i.e.
            the whole training horizon from frame 0. With fewer, each sample starts at a random frame.
        learning_rate: peak AdamW step, decayed by a cosine to ``final_learning_rate_fraction`` of it.
        weight_decay, clip_norm: AdamW weight decay; global-norm gradient clipping.
    """

    batch_size: int = 8
    rollout_steps: int | None = None
    learning_rate: float = 1e-3
    final_learning_rate_fraction: float = 1e-2
    weight_decay: float = 1e-4
    clip_norm: float = 1.0

    def __post_init__(self):
        _check_positive_ints(self, ("batch_size",))
        if self.rollout_steps is not None:
            _check_positive_ints(self, ("rollout_steps",))
        for name in ("learning_rate", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FNOTrainConfig.{name} must be positive, found {getattr(self, name)}.")
        if not 0 <= self.final_learning_rate_fraction <= 1 or not self.weight_decay >= 0:
            raise ValueError("FNOTrainConfig: final_learning_rate_fraction must lie in [0, 1] and weight_decay be >= 0.")


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------


def check_modes(modes: int, grid_shape: tuple[int, int]) -> None:
    """Raise ValueError if ``modes`` do not fit the grid (``H >= 2 modes - 1``, ``W // 2 + 1 >= modes``)."""
    h, w = grid_shape
    if 2 * modes - 1 > h or modes > w // 2 + 1:
        raise ValueError(
            f"FNO modes = {modes} do not fit the {h} x {w} grid: it needs H >= 2 * modes - 1 and W // 2 + 1 >= modes "
            f"(at most {min((h + 1) // 2, w // 2 + 1)} modes here). Lower FNOConfig.modes."
        )


class SpectralConv2d(nnx.Module):
    """``v -> irfft2(R . rfft2(v))`` over the grid axes of ``v [..., H, W, in]``, keeping the Fourier modes
    ``|k_0| < m`` (positive and negative frequencies along the first grid axis) and ``0 <= k_1 < m`` (the
    ``rfft`` axis); the others are set to zero.

    Multiplication per Fourier mode commutes with periodic grid shifts: ``K(roll(v)) = roll(K(v))``.
    The truncation is symmetric, so a real plane wave passes whole or not at all (the reference code also
    keeps ``k_0 = -m``, half of a wave). Weights: ``R = real + i imag`` of shape ``[2m - 1, m, in, out]``
    (rows ordered ``k_0 = 0 .. m-1, -(m-1) .. -1``), initialised uniform in ``[0, 1 / (in out))`` like the
    reference implementation.
    """

    def __init__(self, in_features: int, out_features: int, modes: int, *, rngs: nnx.Rngs):
        self.modes = modes
        scale = 1.0 / (in_features * out_features)
        shape = (2 * modes - 1, modes, in_features, out_features)
        self.weight_real = nnx.Param(scale * jax.random.uniform(rngs.params(), shape))
        self.weight_imag = nnx.Param(scale * jax.random.uniform(rngs.params(), shape))

    def __call__(self, v: Array) -> Array:
        h, w = v.shape[-3], v.shape[-2]
        m = self.modes
        check_modes(m, (h, w))
        rows = np.concatenate([np.arange(m), np.arange(h - m + 1, h)])  # k_0 = 0 .. m-1, -(m-1) .. -1
        weights = jax.lax.complex(self.weight_real[...], self.weight_imag[...])
        spectrum = jnp.fft.rfft2(v, axes=(-3, -2))  # [..., H, W // 2 + 1, in]
        kept = jnp.einsum("...xyi,xyio->...xyo", spectrum[..., rows, :m, :], weights)
        out = jnp.zeros(spectrum.shape[:-1] + (weights.shape[-1],), spectrum.dtype)
        out = out.at[..., rows, :m, :].set(kept)
        return jnp.fft.irfft2(out, s=(h, w), axes=(-3, -2)).astype(v.dtype)


class FNO(nnx.Module):
    """One autoregressive FNO step (see the module doc).

    Args:
        num_channels: ``C``, the field's channels.
        num_features: ``F``, coordinate-feature channels given to :meth:`__call__` (0: none).
        config: sizes.
    """

    def __init__(self, num_channels: int, num_features: int, config: FNOConfig, *, rngs: nnx.Rngs):
        self.num_channels, self.num_features, self.history = num_channels, num_features, config.history
        width = config.width
        self.lift = nnx.Linear(config.history * num_channels + num_features, width, rngs=rngs)
        self.spectral = nnx.List([SpectralConv2d(width, width, config.modes, rngs=rngs) for _ in range(config.depth)])
        self.pointwise = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(config.depth)])
        self.project_hidden = nnx.Linear(width, config.projection_width, rngs=rngs)
        self.project_out = nnx.Linear(config.projection_width, num_channels, rngs=rngs)

    def __call__(self, window: Array, features: Array | None = None) -> Array:
        """The next frame.

        Args:
            window: ``[B, history, H, W, C]`` the last frames, oldest first (normalised units).
            features: ``[H, W, F]`` coordinate features of the grid, or None when ``num_features == 0``.
                Rolling ``window`` and ``features`` together rolls the output (exact shift equivariance of
                the map of both).

        Returns:
            ``[B, H, W, C]``.
        """
        b, h, hh, ww, c = window.shape
        if (h, c) != (self.history, self.num_channels):
            raise ValueError(f"FNO window must be [B, {self.history}, H, W, {self.num_channels}], found {window.shape}.")
        x = jnp.moveaxis(window, 1, -2).reshape(b, hh, ww, h * c)
        if self.num_features:
            if features is None or features.shape != (hh, ww, self.num_features):
                found = None if features is None else features.shape
                raise ValueError(f"FNO features must be [{hh}, {ww}, {self.num_features}], found {found}.")
            x = jnp.concatenate([x, jnp.broadcast_to(features, (b, hh, ww, self.num_features)).astype(x.dtype)], -1)
        elif features is not None:
            raise ValueError("this FNO was built without coordinate features (num_features = 0); pass features=None.")
        v = self.lift(x)
        for i, (spectral, pointwise) in enumerate(zip(self.spectral, self.pointwise)):
            v = spectral(v) + pointwise(v)
            if i < len(self.spectral) - 1:
                v = jax.nn.gelu(v)
        return window[:, -1] + self.project_out(jax.nn.gelu(self.project_hidden(v)))


def initial_window(frame0: Array, history: int) -> Array:
    """``[B, H, W, C]`` -> the window ``[B, history, H, W, C]`` padded by repeating frame 0."""
    return jnp.repeat(frame0[:, None], history, axis=1)


def rollout(model: FNO, window: Array, features: Array | None, num_steps: int) -> Array:
    """``num_steps`` autoregressive steps from ``window [B, h, H, W, C]``: ``[B, num_steps, H, W, C]``
    (a ``lax.scan``; each prediction enters the window of the next step)."""

    def step(window, _):
        frame = model(window, features)
        return jnp.concatenate([window[:, 1:], frame[:, None]], axis=1), frame

    _, frames = jax.lax.scan(step, window, None, length=num_steps)
    return frames.swapaxes(0, 1)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forecast_frames(graphdef, state, frame0, features, num_steps):
    """Frames ``0 .. num_steps`` ``[B, num_steps + 1, H, W, C]`` from ``frame0 [B, H, W, C]`` (normalised)."""
    model = nnx.merge(graphdef, state)
    frames = rollout(model, initial_window(frame0, model.history), features, num_steps)
    return jnp.concatenate([frame0[:, None], frames], axis=1)


# ---------------------------------------------------------------------------------------------------------
# The forecaster
# ---------------------------------------------------------------------------------------------------------


class FNOForecaster(XarrayForecast):
    """A trained FNO with its grid, normalisation and time step; an
    :class:`~enfpde.evaluation.ArrayForecaster` in raw units, and ``forecast`` on xarray Datasets
    (:class:`~enfpde.forecaster.XarrayForecast`, as the ENF :class:`~enfpde.forecaster.Forecaster`).

    Args:
        model: the trained :class:`FNO`; config: its sizes; grid: the training grid.
        normalizer: the training split's statistics.
        variables, units, time_units: the data's metadata.
        frame_interval: ``dt`` of one model step, in the data's time units.
        horizon: frames of the training horizon (``horizon_time = horizon * frame_interval``).
        interpolate_in_time: lead times between frames are linear interpolations of the neighbouring frames
            (True) or an error (False).
        batch_size: states per compiled forecast call (a short last chunk is padded).
        training: the training config (kept with the checkpoint); training_log: per-step losses and the
            training time, when trained in this process (not saved).
    """

    def __init__(
        self,
        model: FNO,
        config: FNOConfig,
        grid: Grid,
        normalizer: Normalizer,
        *,
        variables: tuple[str, ...],
        units: tuple[str, ...],
        frame_interval: float,
        horizon: int,
        time_units: str = "1",
        interpolate_in_time: bool = True,
        batch_size: int = 8,
        training: FNOTrainConfig | None = None,
        training_log: dict | None = None,
    ):
        self.model, self.config, self.grid, self.normalizer = model, config, grid, normalizer
        self.variables, self.units, self.time_units = tuple(variables), tuple(units), time_units
        self.frame_interval, self.horizon = float(frame_interval), int(horizon)
        self.interpolate_in_time, self.batch_size = bool(interpolate_in_time), int(batch_size)
        self.training = training
        self.training_log = training_log or {}
        self._graphdef, self._state = nnx.split(model)
        self._features = jnp.asarray(grid.features()) if config.coordinate_features else None

    @property
    def axes(self) -> tuple[str, str]:
        """The user coordinate axes, ``("y", "x")`` on the torus or ``("latitude", "longitude")`` on the sphere."""
        return self.grid.domain.axes

    def _forecast_attrs(self) -> dict:
        return {"source": "enfpde FNO baseline"}

    @property
    def num_parameters(self) -> int:
        """Real trainable parameters (a complex weight counts twice)."""
        return common.num_parameters(self.model)

    @property
    def horizon_time(self) -> float:
        """The training horizon as a lead time: ``t < horizon_time`` is ``t_in``."""
        return self.horizon * self.frame_interval

    def _frame_positions(self, times: np.ndarray) -> np.ndarray:
        """Lead times in frames, snapped to whole frames within :data:`_FRAME_RTOL`."""
        steps = times / self.frame_interval
        whole = np.round(steps)
        on_frame = np.abs(steps - whole) <= _FRAME_RTOL
        if not self.interpolate_in_time and not on_frame.all():
            bad = times[~on_frame]
            raise ValueError(
                f"FNOForecaster forecasts only at multiples of the training frame interval dt = {self.frame_interval:g}; "
                f"found lead times {bad[:5].tolist()}{'...' if bad.size > 5 else ''}. Ask for times k * dt, or load "
                "the model with interpolate_in_time=True to interpolate linearly between frames."
            )
        return np.where(on_frame, whole, steps)

    def forecast_grid(self, frame0: np.ndarray, num_steps: int) -> np.ndarray:
        """Frames ``0 .. num_steps`` ``[B, num_steps + 1, H, W, C]`` from full grids ``frame0 [B, H, W, C]``,
        both in raw units."""
        normalized = np.asarray(self.normalizer.normalize(frame0), np.float32)
        if num_steps == 0:
            return np.asarray(frame0, np.float32)[:, None]
        outputs, n = [], normalized.shape[0]
        chunk = min(self.batch_size, n)
        for start in range(0, n, chunk):
            index = np.arange(start, start + chunk)
            index = np.where(index < n, index, start)  # pad a short last chunk: one program for every chunk
            out = _forecast_frames(self._graphdef, self._state, jnp.asarray(normalized[index]), self._features, int(num_steps))
            outputs.append(np.asarray(out)[: n - start])
        frames = self.normalizer.denormalize(np.concatenate(outputs)).astype(np.float32)
        frames[:, 0] = frame0  # exactly the initial state (no normalisation round trip)
        return frames

    def predict(self, coords, initial_values, times, query_coords) -> np.ndarray:
        """Forecast from observed initial states (the :class:`~enfpde.evaluation.ArrayForecaster` protocol).

        Args:
            coords: ``[M, 2]`` user coordinates of the observations (the grid's or any others).
            initial_values: ``[B, M, C]`` raw units, NaN where not observed (filled onto the grid first).
            times: ``[T]`` strictly increasing lead times ``>= 0``; multiples of the frame interval, or any
                with ``interpolate_in_time``.
            query_coords: ``[Q, 2]`` user coordinates to forecast at (bilinear interpolation off the grid).

        Returns:
            ``[B, T, Q, C]`` float32 in raw units.

        Raises:
            ValueError: wrong shapes or channels, unsupported times, coordinates outside the domain, a state
                with no observed point.
        """
        coords, values, times, query = common.check_forecast_inputs(
            coords, initial_values, times, query_coords, len(self.variables), type(self).__name__
        )
        self.grid.domain.field_inputs(coords)  # validates the coordinates against the domain
        self.grid.domain.field_inputs(query)
        steps = self._frame_positions(times)
        num_steps = int(math.ceil(steps[-1]))
        frames = self.forecast_grid(self.grid.fill(coords, values), num_steps)
        lower = np.floor(steps).astype(np.int64)
        upper = np.minimum(lower + 1, num_steps)
        w = (steps - lower).astype(np.float32)[None, :, None, None, None]
        on_grid = np.where(w == 0, frames[:, lower], (1 - w) * frames[:, lower] + w * frames[:, upper])
        return self.grid.interpolate(on_grid, query).astype(np.float32)

    # -- files -------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to the directory ``path`` (``baseline.json`` + orbax ``params/``)."""
        metadata = {
            "model": "fno",
            "config": dataclasses.asdict(self.config),
            "training": None if self.training is None else dataclasses.asdict(self.training),
            "normalizer": self.normalizer.to_dict(),
            "domain": self.grid.domain.to_dict(),
            "grid": self.grid.to_dict(),
            "variables": list(self.variables),
            "units": list(self.units),
            "time_units": self.time_units,
            "frame_interval": self.frame_interval,
            "horizon": self.horizon,
            "horizon_time": self.horizon_time,
            "num_parameters": self.num_parameters,
        }
        return common.save_checkpoint(path, metadata, self._state, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, interpolate_in_time: bool = True, batch_size: int = 8) -> FNOForecaster:
        """The model saved in ``path`` by :meth:`save`."""
        meta = common.read_metadata(path, "fno")
        config = FNOConfig(**meta["config"])
        domain = common.domain_from_dict(meta["domain"])
        grid = Grid(domain, tuple(np.asarray(v) for v in meta["grid"]["axis_values"]))
        num_features = domain.num_grid_features if config.coordinate_features else 0
        abstract = nnx.eval_shape(lambda: FNO(len(meta["variables"]), num_features, config, rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        model = nnx.merge(graphdef, common.load_checkpoint(path, abstract_state))
        return cls(
            model, config, grid, Normalizer.from_dict(meta["normalizer"]),
            variables=tuple(meta["variables"]), units=tuple(meta["units"]), time_units=meta["time_units"],
            frame_interval=meta["frame_interval"], horizon=meta["horizon"], interpolate_in_time=interpolate_in_time,
            batch_size=batch_size, training=None if meta["training"] is None else FNOTrainConfig(**meta["training"]),
        )


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def make_train_step(model: FNO, optimizer: optax.GradientTransformation):
    """A jitted step ``step(params, opt_state, rest, window [B, h, H, W, C], targets [B, K, H, W, C], features)
    -> (params, opt_state, loss)``: the MSE of a ``K``-step rollout from ``window`` against ``targets``.

    Returns ``(step, params, rest, graphdef)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, window, targets, features):
        pred = rollout(nnx.merge(graphdef, params, rest), window, features, targets.shape[1])
        return jnp.mean((pred - targets) ** 2)

    @jax.jit
    def step(params, opt_state, rest, window, targets, features):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, window, targets, features)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, rest, graphdef


def train(
    dataset: TrajectoryDataset,
    config: FNOConfig = FNOConfig(),
    training: FNOTrainConfig = FNOTrainConfig(),
    *,
    horizon: int,
    steps: int,
    seed: int = 0,
    periods: tuple[float, float] | None = None,
    progress: bool = True,
) -> FNOForecaster:
    """Train an FNO on the frames ``0 .. horizon - 1`` of a gridded training split.

    Each step draws ``batch_size`` trajectories (a fresh permutation every epoch, as
    :class:`~enfpde.data.trajectories.BatchSampler`) and, per trajectory, a start frame ``s`` uniform in
    ``[0, horizon - 1 - K]`` (``K = rollout_steps``); the window holds frames ``s - history + 1 .. s``
    (frame 0 repeated before the start) and the loss covers the ``K`` predicted frames ``s + 1 .. s + K``.

    Args:
        dataset: the training split on a 2-D grid, fully observed inside the horizon.
        config, training: model sizes and training settings.
        horizon: frames of the training horizon (e.g. 10 for Navier-Stokes).
        steps: optimisation steps.
        seed: initialisation and data order.
        periods: ``(L_y, L_x)`` of a torus when they cannot be read off the grid.
        progress: show a tqdm bar.

    Returns:
        The trained :class:`FNOForecaster`; its ``training_log["loss"]`` holds the loss of every step.

    Raises:
        ValueError: scattered points, missing values, modes too large for the grid, ``rollout_steps`` beyond
            the horizon, a non-finite loss.
    """
    if dataset.grid_shape is None or len(dataset.grid_shape) != 2:
        raise ValueError("the FNO needs data on a 2-D grid; this dataset holds scattered points. Use DINo instead.")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, found {steps!r}.")
    data = common.training_frames(dataset, horizon)
    if not data.mask.all():
        raise ValueError(
            f"the FNO trains on fully observed grids; the training frames 0..{horizon - 1} miss "
            f"{int((~data.mask).sum())} point values. Fill or drop those trajectories."
        )
    dt = common.frame_interval(dataset)
    grid = Grid(common.domain_for_dataset(dataset, periods), dataset.axis_values)
    check_modes(config.modes, grid.shape)
    k = horizon - 1 if training.rollout_steps is None else training.rollout_steps
    if k > horizon - 1:
        raise ValueError(f"rollout_steps = {k} exceeds the {horizon - 1} steps inside the horizon of {horizon} frames.")
    normalizer = data.fit_normalizer()
    sampler = BatchSampler(data, normalizer, training.batch_size, None, seed=seed)
    num_channels = len(dataset.variables)
    features = jnp.asarray(grid.features()) if config.coordinate_features else None
    model = FNO(num_channels, 0 if features is None else features.shape[-1], config, rngs=nnx.Rngs(seed))
    schedule = optax.cosine_decay_schedule(training.learning_rate, steps, alpha=training.final_learning_rate_fraction)
    optimizer = optax.chain(
        optax.clip_by_global_norm(training.clip_norm), optax.adamw(schedule, weight_decay=training.weight_decay)
    )
    step_fn, params, rest, graphdef = make_train_step(model, optimizer)
    opt_state = optimizer.init(params)
    offsets = np.arange(-config.history + 1, 1)
    losses = np.zeros(steps)
    t_start = time.perf_counter()
    with tqdm(total=steps, desc="FNO", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for s in range(steps):
            batch = sampler(s)
            values = batch.values.reshape(batch.values.shape[:2] + grid.shape + (num_channels,))  # [B, T, H, W, C]
            starts = np.random.default_rng([seed, 2, s]).integers(0, horizon - k, size=values.shape[0])
            rows = np.arange(values.shape[0])[:, None]
            window = values[rows, np.maximum(starts[:, None] + offsets, 0)]
            targets = values[rows, starts[:, None] + np.arange(1, k + 1)]
            params, opt_state, loss = step_fn(params, opt_state, rest, jnp.asarray(window), jnp.asarray(targets), features)
            losses[s] = float(loss)
            if not math.isfinite(losses[s]):
                raise ValueError(
                    f"FNO training: non-finite loss ({losses[s]}) at step {s}; lower FNOTrainConfig.learning_rate or clip_norm."
                )
            bar.update(1)
            bar.set_postfix(loss=f"{losses[s]:.3e}")
    model = nnx.merge(graphdef, params, rest)
    return FNOForecaster(
        model, config, grid, normalizer,
        variables=dataset.variables, units=dataset.units, time_units=dataset.time_units,
        frame_interval=dt, horizon=horizon, training=training,
        training_log={"loss": losses, "seconds": time.perf_counter() - t_start},
    )
