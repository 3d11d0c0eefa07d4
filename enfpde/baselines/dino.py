"""The DINo baseline: a neural field decoded from per-channel codes, with an ODE on the codes
(Yin, Kirchmeyer et al., "Continuous PDE Dynamics Forecasting with Implicit Neural Representations", ICLR 2023).

Decoder (:class:`ModulatedMFN`): a multiplicative filter network with Fourier filters whose amplitudes are
modulated by the code ``alpha_c`` of output channel ``c``::

    g_i(x) = [sin(Omega_i x), cos(Omega_i x)]                        i = 0 .. L   (learned Omega_i)
    h_0 = g_0(x) * (A_0 alpha_c + b_0)
    h_i = g_i(x) * (B_i h_{i-1} + A_i alpha_c + b_i)                 i = 1 .. L
    u_c(x) = w . h_L + b                                             (weights shared by the channels)

``Omega_i`` starts uniform in ``+-frequency_scale / sqrt((L + 1) d)`` (``d`` the input dimension), so the
product of the ``L + 1`` filters spans frequencies up to about ``frequency_scale`` radians per unit input.
Inputs are the domain's (:class:`~enfpde.baselines.common.Domain`): ``(y / L_y, x / L_x)`` on the torus,
3-D unit vectors on the sphere.

Dynamics (:class:`CodeDynamics`): ``d alpha / dt = F(alpha)``, ``F`` an MLP on the concatenated codes of all
channels (``dynamics_layers`` hidden layers, Swish), integrated by classical RK4 through diffrax with one
step per training frame (time measured in frame intervals); outputs at any times come from
``diffrax.SaveAt(ts=...)`` (the solver's Hermite interpolation between steps).

Training (:func:`train`): auto-decoding. Every training trajectory and frame inside the horizon has a free
code (zeros at the start); each step draws a batch of trajectories at a random subset of points and

* fits codes and decoder to the frames: masked MSE of the decoded fields (codes Adam 1e-3, decoder Adam 1e-2);
* fits the dynamics to the codes (held fixed): MSE between the codes integrated from frame 0 and the
  auto-decoded codes of frames ``1 .. horizon - 1`` (dynamics Adam 1e-3), with teacher forcing: the
  integration towards frame ``k + 1`` restarts from the auto-decoded code of frame ``k`` with probability
  ``eps`` (drawn per trajectory and frame), ``eps(step) = eps0 * decay ** floor(step / every)``
  (``eps0 = decay = 0.99``, ``every = 100`` steps by default, as in DINo's code), set to 0 once below 1e-3.

Forecasting (:meth:`DINoForecaster.predict`): the frame-0 code is fitted from zero to the observed points
only (any points, any sparsity; ``fit_steps`` Adam steps at ``fit_learning_rate``, keeping the code of lowest
loss), integrated to the requested times and decoded at the query points.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Callable, ClassVar

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from enfpde.baselines import common
from enfpde.baselines.common import Domain
from enfpde.data.trajectories import BatchSampler, Normalizer, TrajectoryDataset
from enfpde.forecaster import XarrayForecast

__all__ = [
    "RK4",
    "CodeDynamics",
    "DINoConfig",
    "DINoForecaster",
    "DINoTrainConfig",
    "ModulatedMFN",
    "fit_codes",
    "integrate_codes",
    "rk4_step",
    "teacher_forcing_probability",
    "train",
]

Array = jax.Array


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------


def _check_positive(obj, names, integer: bool) -> None:
    for name in names:
        value = getattr(obj, name)
        bad = (not isinstance(value, (int, np.integer)) or isinstance(value, bool)) if integer else not isinstance(value, (int, float))
        if bad or not value > 0:
            kind = "a positive integer" if integer else "positive"
            raise ValueError(f"{type(obj).__name__}.{name} must be {kind}, found {value!r}.")


@dataclasses.dataclass(frozen=True)
class DINoConfig:
    """Sizes of DINo and its test-time code fitting.

    Attributes:
        code_dim: code size per output channel.
        width: hidden width of the decoder (even: half sine, half cosine filters).
        num_layers: modulated layers ``L`` of the decoder (``L + 1`` filters).
        frequency_scale: initial frequency range of the filters (DINo's ``input_scale``).
        dynamics_width, dynamics_layers: hidden width and number of hidden layers of the dynamics MLP.
        fit_steps, fit_learning_rate: Adam steps and step size fitting the frame-0 code of a new state.
    """

    code_dim: int = 100
    width: int = 64
    num_layers: int = 3
    frequency_scale: float = 64.0
    dynamics_width: int = 512
    dynamics_layers: int = 3
    fit_steps: int = 300
    fit_learning_rate: float = 1e-2

    def __post_init__(self):
        _check_positive(self, ("code_dim", "width", "num_layers", "dynamics_width", "dynamics_layers", "fit_steps"), True)
        _check_positive(self, ("frequency_scale", "fit_learning_rate"), False)
        if self.width % 2:
            raise ValueError(f"DINoConfig.width must be even (sine and cosine filters), found {self.width}.")

    @classmethod
    def for_navier_stokes(cls, **overrides) -> DINoConfig:
        """REFERENCE section 4: code 100, decoder width 64 with 3 layers, dynamics 3 x 512, 300 fitting steps."""
        return cls(**{"code_dim": 100, "width": 64, "num_layers": 3, "dynamics_width": 512, "dynamics_layers": 3,
                      "fit_steps": 300, **overrides})

    @classmethod
    def for_sphere(cls, **overrides) -> DINoConfig:
        """REFERENCE section 4 (shallow water): code 200 per channel, decoder width 256 with 6 layers,
        dynamics 3 x 800, 500 fitting steps; inputs are unit vectors."""
        return cls(**{"code_dim": 200, "width": 256, "num_layers": 6, "dynamics_width": 800, "dynamics_layers": 3,
                      "fit_steps": 500, **overrides})


@dataclasses.dataclass(frozen=True)
class DINoTrainConfig:
    """How DINo is trained (see the module doc).

    Attributes:
        batch_size: trajectories per step; num_points: random points per step (None: all).
        code_learning_rate, decoder_learning_rate, dynamics_learning_rate: the three Adam step sizes.
        teacher_forcing_start, teacher_forcing_decay, teacher_forcing_every: the schedule
            ``eps(step) = start * decay ** floor(step / every)`` (0 once below 1e-3).
    """

    batch_size: int = 8
    num_points: int | None = None
    code_learning_rate: float = 1e-3
    decoder_learning_rate: float = 1e-2
    dynamics_learning_rate: float = 1e-3
    teacher_forcing_start: float = 0.99
    teacher_forcing_decay: float = 0.99
    teacher_forcing_every: int = 100

    def __post_init__(self):
        _check_positive(self, ("batch_size", "teacher_forcing_every"), True)
        if self.num_points is not None:
            _check_positive(self, ("num_points",), True)
        _check_positive(self, ("code_learning_rate", "decoder_learning_rate", "dynamics_learning_rate"), False)
        if not (0 <= self.teacher_forcing_start <= 1 and 0 <= self.teacher_forcing_decay <= 1):
            raise ValueError("DINoTrainConfig: teacher_forcing_start and teacher_forcing_decay must lie in [0, 1].")


def teacher_forcing_probability(training: DINoTrainConfig, step: int) -> float:
    """``eps(step) = start * decay ** floor(step / every)``, 0 once below 1e-3."""
    eps = training.teacher_forcing_start * training.teacher_forcing_decay ** (step // training.teacher_forcing_every)
    return eps if eps >= 1e-3 else 0.0


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class FourierFilter(nnx.Module):
    """``x [..., d] -> [sin(x Omega), cos(x Omega)] [..., width]`` with learned ``Omega [d, width / 2]``."""

    def __init__(self, input_dim: int, width: int, scale: float, *, rngs: nnx.Rngs):
        self.omega = nnx.Param(scale * _uniform(rngs.params(), (input_dim, width // 2), 1.0 / math.sqrt(input_dim)))

    def __call__(self, x: Array) -> Array:
        z = x @ self.omega[...]
        return jnp.concatenate([jnp.sin(z), jnp.cos(z)], axis=-1)


class ModulatedMFN(nnx.Module):
    """The DINo decoder (see the module doc).

    Args:
        input_dim: dimension of the coordinate inputs.
        config: sizes (``code_dim``, ``width``, ``num_layers``, ``frequency_scale``).
    """

    def __init__(self, input_dim: int, config: DINoConfig, *, rngs: nnx.Rngs):
        L, w, k = config.num_layers, config.width, config.code_dim
        scale = config.frequency_scale / math.sqrt(L + 1)
        self.filters = nnx.List([FourierFilter(input_dim, w, scale, rngs=rngs) for _ in range(L + 1)])
        self.code_maps = nnx.Param(_uniform(rngs.params(), (L + 1, k, w), 1.0 / math.sqrt(k)))  # A_i
        self.hidden = nnx.Param(_uniform(rngs.params(), (L, w, w), 1.0 / math.sqrt(w)))  # B_i
        bias_bounds = jnp.asarray([1.0 / math.sqrt(input_dim)] + [1.0 / math.sqrt(w)] * L)[:, None]
        self.biases = nnx.Param(_uniform(rngs.params(), (L + 1, w), 1.0) * bias_bounds)  # b_i
        self.output = nnx.Linear(w, 1, rngs=rngs)

    def __call__(self, inputs: Array, codes: Array) -> Array:
        """Decode codes ``[..., C, code_dim]`` at ``inputs [Q, input_dim]``: ``[..., Q, C]``."""
        modulation = jnp.einsum("...ck,lkw->...lcw", codes, self.code_maps[...]) + self.biases[...][:, None, :]
        modulation = modulation[..., None, :]  # [..., L + 1, C, 1, W]
        h = self.filters[0](inputs) * modulation[..., 0, :, :, :]  # [..., C, Q, W]
        for i in range(1, len(self.filters)):
            h = self.filters[i](inputs) * (h @ self.hidden[...][i - 1] + modulation[..., i, :, :, :])
        return jnp.swapaxes(self.output(h)[..., 0], -1, -2)


class CodeDynamics(nnx.Module):
    """``d alpha / dt = F(alpha)``: an MLP on the flattened codes ``[..., C * code_dim]`` with
    ``num_hidden`` hidden layers of ``width`` and Swish activations."""

    def __init__(self, code_size: int, width: int, num_hidden: int, *, rngs: nnx.Rngs):
        sizes = [code_size] + [width] * num_hidden + [code_size]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, z: Array) -> Array:
        for layer in self.layers[:-1]:
            z = jax.nn.swish(layer(z))
        return self.layers[-1](z)


_RK4_TABLEAU = diffrax.ButcherTableau(
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    b_error=np.zeros(4),  # no embedded method: for constant step sizes only
    c=np.array([0.5, 0.5, 1.0]),
)


class RK4(diffrax.AbstractERK):
    """The classical 4th-order Runge-Kutta method (no error estimate: use ``diffrax.ConstantStepSize``).
    Dense output: cubic Hermite interpolation between steps."""

    tableau: ClassVar[diffrax.ButcherTableau] = _RK4_TABLEAU
    interpolation_cls: ClassVar[Callable[..., diffrax.ThirdOrderHermitePolynomialInterpolation]] = (
        diffrax.ThirdOrderHermitePolynomialInterpolation.from_k
    )

    def order(self, terms):
        return 4


def integrate_codes(dynamics: CodeDynamics, z0: Array, times: Array, *, max_steps: int = 4096) -> Array:
    """Integrate codes ``z0 [..., D]`` from time 0 to ``times [T]`` (increasing, ``>= 0``, in frame intervals)
    with one RK4 step per unit of time: ``[T, ..., D]``."""
    graphdef, state = nnx.split(dynamics)

    def vector_field(t, y, state):
        return nnx.merge(graphdef, state)(y)

    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), RK4(), t0=0.0, t1=times[-1], dt0=1.0, y0=z0, args=state,
        saveat=diffrax.SaveAt(ts=times), stepsize_controller=diffrax.ConstantStepSize(), max_steps=max_steps,
    )
    return solution.ys


def rk4_step(dynamics: CodeDynamics, z: Array, dt: float = 1.0) -> Array:
    """One RK4 step of length ``dt`` from ``z [..., D]``: the step :func:`integrate_codes` takes per frame,
    taken through the same diffrax solver's ``step`` (without ``diffeqsolve``'s loop machinery, which
    makes the teacher-forced training step several times slower to compile)."""
    graphdef, state = nnx.split(dynamics)
    term = diffrax.ODETerm(lambda t, y, state: nnx.merge(graphdef, state)(y))
    return RK4().step(term, 0.0, dt, z, state, None, False)[0]


def _masked_mse(pred: Array, target: Array, mask: Array, axes) -> Array:
    """Mean over the observed entries (``mask [..., P]``) of ``(pred - target)^2 [..., P, C]`` along ``axes``."""
    weights = mask[..., None].astype(pred.dtype)
    total = jnp.sum(weights * (pred - target) ** 2, axis=axes)
    return total / jnp.maximum(jnp.sum(weights, axis=axes) * pred.shape[-1], 1.0)


def fit_codes(decoder: ModulatedMFN, inputs: Array, values: Array, mask: Array, *, code_dim: int, steps: int,
              learning_rate: float) -> Array:
    """Fit codes ``[B, C, code_dim]`` from zero to ``values [B, M, C]`` at ``inputs [M, d]`` where
    ``mask [B, M]`` is True, with Adam (a ``lax.scan`` of ``steps`` steps); per state the code of lowest loss
    met on the way is returned (as in DINo). The decoder is not updated."""
    b, _, c = values.shape
    optimizer = optax.adam(learning_rate)
    values = jnp.where(mask[..., None], values, 0.0)

    def losses(codes):
        return _masked_mse(decoder(inputs, codes), values, mask, axes=(-2, -1))  # [B]

    def total(codes):
        per_state = losses(codes)
        return jnp.sum(per_state), per_state  # states are independent: the gradient is each one's own

    def step(carry, _):
        codes, opt_state, best, best_loss = carry
        (_, per_state), grads = jax.value_and_grad(total, has_aux=True)(codes)
        improved = per_state < best_loss
        best = jnp.where(improved[:, None, None], codes, best)
        best_loss = jnp.where(improved, per_state, best_loss)
        updates, opt_state = optimizer.update(grads, opt_state, codes)
        return (optax.apply_updates(codes, updates), opt_state, best, best_loss), None

    codes = jnp.zeros((b, c, code_dim), jnp.float32)
    init = (codes, optimizer.init(codes), codes, jnp.full((b,), jnp.inf))
    (codes, _, best, best_loss), _ = jax.lax.scan(step, init, None, length=steps)
    final = losses(codes)
    return jnp.where((final < best_loss)[:, None, None], codes, best)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _fit(graphdef, state, inputs, values, mask, code_dim, steps, learning_rate):
    return fit_codes(nnx.merge(graphdef, state), inputs, values, mask, code_dim=code_dim, steps=steps,
                     learning_rate=learning_rate)


@functools.partial(jax.jit, static_argnums=(0,))
def _integrate(graphdef, state, z0, times):
    return integrate_codes(nnx.merge(graphdef, state), z0, times)


@functools.partial(jax.jit, static_argnums=(0,))
def _decode(graphdef, state, inputs, codes):
    """``codes [T, B, C, k]`` at ``inputs [Q, d]`` -> ``[T, B, Q, C]``, one frame at a time (bounded memory)."""
    decoder = nnx.merge(graphdef, state)
    return jax.lax.map(lambda z: decoder(inputs, z), codes)


# ---------------------------------------------------------------------------------------------------------
# The forecaster
# ---------------------------------------------------------------------------------------------------------


class DINoForecaster(XarrayForecast):
    """A trained DINo with its domain, normalisation and time step; an
    :class:`~enfpde.evaluation.ArrayForecaster` in raw units, and ``forecast`` on xarray Datasets
    (:class:`~enfpde.forecaster.XarrayForecast`, as the ENF :class:`~enfpde.forecaster.Forecaster`).

    Args:
        decoder, dynamics: the trained modules; config: their sizes; domain: the data's domain.
        normalizer: the training split's statistics.
        variables, units, time_units: the data's metadata.
        frame_interval: the training frame interval (one RK4 step), in the data's time units.
        horizon: frames of the training horizon (``horizon_time = horizon * frame_interval``).
        batch_size: states per compiled call (a short last chunk is padded); query_chunk: query points
            decoded per compiled call (bounds memory at high resolution).
        training: the training config (kept with the checkpoint); training_log: per-step losses and the
            training time, when trained in this process (not saved).
    """

    def __init__(
        self,
        decoder: ModulatedMFN,
        dynamics: CodeDynamics,
        config: DINoConfig,
        domain: Domain,
        normalizer: Normalizer,
        *,
        variables: tuple[str, ...],
        units: tuple[str, ...],
        frame_interval: float,
        horizon: int,
        time_units: str = "1",
        batch_size: int = 8,
        query_chunk: int = 8192,
        training: DINoTrainConfig | None = None,
        training_log: dict | None = None,
    ):
        self.decoder, self.dynamics, self.config, self.domain = decoder, dynamics, config, domain
        self.normalizer = normalizer
        self.variables, self.units, self.time_units = tuple(variables), tuple(units), time_units
        self.frame_interval, self.horizon = float(frame_interval), int(horizon)
        self.batch_size, self.query_chunk = int(batch_size), int(query_chunk)
        self.training = training
        self.training_log = training_log or {}
        self._decoder_graphdef, self._decoder_state = nnx.split(decoder)
        self._dynamics_graphdef, self._dynamics_state = nnx.split(dynamics)

    @property
    def axes(self) -> tuple[str, str]:
        """The user coordinate axes, ``("y", "x")`` on the torus or ``("latitude", "longitude")`` on the sphere."""
        return self.domain.axes

    def _forecast_attrs(self) -> dict:
        return {"source": "enfpde DINo baseline"}

    @property
    def num_parameters(self) -> int:
        """Trainable parameters of the decoder and the dynamics (the training codes are not part of the model)."""
        return common.num_parameters(self.decoder, self.dynamics)

    @property
    def horizon_time(self) -> float:
        """The training horizon as a lead time: ``t < horizon_time`` is ``t_in``."""
        return self.horizon * self.frame_interval

    def fit_initial_codes(self, inputs: Array, normalized: np.ndarray, mask: np.ndarray) -> Array:
        """Codes ``[B, C, code_dim]`` fitted to normalised states ``[B, M, C]`` observed where ``mask [B, M]``."""
        c = self.config
        return _fit(self._decoder_graphdef, self._decoder_state, inputs, jnp.asarray(normalized), jnp.asarray(mask),
                    c.code_dim, c.fit_steps, float(c.fit_learning_rate))

    def _decode(self, query_inputs: np.ndarray, codes: Array) -> np.ndarray:
        q = query_inputs.shape[0]
        size = min(self.query_chunk, q)
        parts = []
        for start in range(0, q, size):
            index = np.arange(start, start + size)
            index = np.where(index < q, index, start)  # pad the last chunk: one program for every chunk
            out = _decode(self._decoder_graphdef, self._decoder_state, jnp.asarray(query_inputs[index]), codes)
            parts.append(np.asarray(out)[:, :, : q - start])
        return np.concatenate(parts, axis=2)  # [T, B, Q, C]

    def predict(self, coords, initial_values, times, query_coords) -> np.ndarray:
        """Forecast from observed initial states (the :class:`~enfpde.evaluation.ArrayForecaster` protocol).

        Args:
            coords: ``[M, 2]`` user coordinates of the observations (any points).
            initial_values: ``[B, M, C]`` raw units, NaN where not observed (those points are left out of the
                code fit).
            times: ``[T]`` strictly increasing lead times ``>= 0`` (any values).
            query_coords: ``[Q, 2]`` user coordinates to decode at.

        Returns:
            ``[B, T, Q, C]`` float32 in raw units.

        Raises:
            ValueError: wrong shapes or channels, unsupported times, coordinates outside the domain, a state
                with no observed point.
        """
        coords, values, times, query = common.check_forecast_inputs(
            coords, initial_values, times, query_coords, len(self.variables), type(self).__name__
        )
        inputs = jnp.asarray(self.domain.field_inputs(coords))
        query_inputs = self.domain.field_inputs(query)
        mask = np.all(np.isfinite(values), axis=-1)
        normalized = np.where(mask[..., None], self.normalizer.normalize(np.nan_to_num(values)), 0.0).astype(np.float32)
        frames = jnp.asarray(times / self.frame_interval, jnp.float32)
        n, c, k = values.shape[0], values.shape[-1], self.config.code_dim
        chunk = min(self.batch_size, n)
        outputs = []
        for start in range(0, n, chunk):
            index = np.arange(start, start + chunk)
            index = np.where(index < n, index, start)  # pad a short last chunk: one program for every chunk
            z0 = self.fit_initial_codes(inputs, normalized[index], mask[index])
            zs = _integrate(self._dynamics_graphdef, self._dynamics_state, z0.reshape(chunk, c * k), frames)
            out = self._decode(query_inputs, zs.reshape(times.size, chunk, c, k))  # [T, b, Q, C]
            outputs.append(out.swapaxes(0, 1)[: n - start])
        return self.normalizer.denormalize(np.concatenate(outputs)).astype(np.float32)

    # -- files -------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to the directory ``path`` (``baseline.json`` + orbax ``params/``)."""
        metadata = {
            "model": "dino",
            "config": dataclasses.asdict(self.config),
            "training": None if self.training is None else dataclasses.asdict(self.training),
            "normalizer": self.normalizer.to_dict(),
            "domain": self.domain.to_dict(),
            "variables": list(self.variables),
            "units": list(self.units),
            "time_units": self.time_units,
            "frame_interval": self.frame_interval,
            "horizon": self.horizon,
            "horizon_time": self.horizon_time,
            "num_parameters": self.num_parameters,
        }
        state = {"decoder": self._decoder_state, "dynamics": self._dynamics_state}
        return common.save_checkpoint(path, metadata, state, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, batch_size: int = 8, query_chunk: int = 8192) -> DINoForecaster:
        """The model saved in ``path`` by :meth:`save`."""
        meta = common.read_metadata(path, "dino")
        config = DINoConfig(**meta["config"])
        domain = common.domain_from_dict(meta["domain"])
        num_channels = len(meta["variables"])
        decoder, dynamics = nnx.eval_shape(lambda: _build(config, domain, num_channels, 0))
        (dec_graphdef, dec_abstract), (dyn_graphdef, dyn_abstract) = nnx.split(decoder), nnx.split(dynamics)
        state = common.load_checkpoint(path, {"decoder": dec_abstract, "dynamics": dyn_abstract})
        return cls(
            nnx.merge(dec_graphdef, state["decoder"]), nnx.merge(dyn_graphdef, state["dynamics"]), config, domain,
            Normalizer.from_dict(meta["normalizer"]), variables=tuple(meta["variables"]), units=tuple(meta["units"]),
            time_units=meta["time_units"], frame_interval=meta["frame_interval"], horizon=meta["horizon"],
            batch_size=batch_size, query_chunk=query_chunk,
            training=None if meta["training"] is None else DINoTrainConfig(**meta["training"]),
        )


def _build(config: DINoConfig, domain: Domain, num_channels: int, seed: int) -> tuple[ModulatedMFN, CodeDynamics]:
    rngs = nnx.Rngs(seed)
    decoder = ModulatedMFN(domain.input_dim, config, rngs=rngs)
    dynamics = CodeDynamics(num_channels * config.code_dim, config.dynamics_width, config.dynamics_layers, rngs=rngs)
    return decoder, dynamics


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

_ADAM_B1, _ADAM_B2, _ADAM_EPS = 0.9, 0.999, 1e-8


def _row_adam(codes, moments, rows, grads, learning_rate):
    """Adam on the rows ``rows`` of the code table only (the others keep their codes, moments and step
    counts, as PyTorch's Adam skips per-trajectory parameters without a gradient). ``moments = (m, v, count)``
    with ``count [N]`` the steps taken by each row."""
    m, v, count = moments
    n = count[rows] + 1
    m_rows = _ADAM_B1 * m[rows] + (1 - _ADAM_B1) * grads
    v_rows = _ADAM_B2 * v[rows] + (1 - _ADAM_B2) * grads**2
    shape = (-1,) + (1,) * (grads.ndim - 1)
    m_hat = m_rows / (1 - _ADAM_B1 ** n.astype(grads.dtype)).reshape(shape)
    v_hat = v_rows / (1 - _ADAM_B2 ** n.astype(grads.dtype)).reshape(shape)
    codes = codes.at[rows].add(-learning_rate * m_hat / (jnp.sqrt(v_hat) + _ADAM_EPS))
    return codes, (m.at[rows].set(m_rows), v.at[rows].set(v_rows), count.at[rows].set(n))


def make_train_step(decoder: ModulatedMFN, dynamics: CodeDynamics, training: DINoTrainConfig):
    """The jitted DINo train step (see the module doc).

    ``step(state, rows [B], inputs [P, d], values [B, T, P, C], mask [B, T, P], key, eps) ->
    (state, (reconstruction loss, dynamics loss))`` with ``state = (decoder params, dynamics params, codes
    [N, T, C, k], code moments, decoder opt state, dynamics opt state)``; ``rows`` must be distinct.

    Returns:
        ``(step, initial state without codes, (decoder graphdef, decoder rest), (dynamics graphdef, rest))``;
        build the state with :func:`initial_train_state`.
    """
    dec_graphdef, dec_params, dec_rest = nnx.split(decoder, nnx.Param, ...)
    dyn_graphdef, dyn_params, dyn_rest = nnx.split(dynamics, nnx.Param, ...)
    dec_opt, dyn_opt = optax.adam(training.decoder_learning_rate), optax.adam(training.dynamics_learning_rate)

    def reconstruction_loss(dec_params, codes, inputs, values, mask):
        pred = nnx.merge(dec_graphdef, dec_params, dec_rest)(inputs, codes)  # [B, T, P, C]
        return _masked_mse(pred, values, mask, axes=None)

    def dynamics_loss(dyn_params, codes, forced):
        model = nnx.merge(dyn_graphdef, dyn_params, dyn_rest)
        flat = codes.reshape(codes.shape[:2] + (-1,))  # [B, T, D]

        def advance(z, inputs):
            previous, force = inputs  # the auto-decoded code of frame k [B, D]; restart there where force [B]
            z = rk4_step(model, jnp.where(force[:, None], previous, z))
            return z, z

        _, pred = jax.lax.scan(advance, flat[:, 0], (flat[:, :-1].swapaxes(0, 1), forced.T))
        return jnp.mean((pred.swapaxes(0, 1) - flat[:, 1:]) ** 2)

    @jax.jit
    def step(state, rows, inputs, values, mask, key, eps):
        dec_params, dyn_params, codes, moments, dec_os, dyn_os = state
        rec, (g_dec, g_codes) = jax.value_and_grad(reconstruction_loss, argnums=(0, 1))(
            dec_params, codes[rows], inputs, values, mask
        )
        codes, moments = _row_adam(codes, moments, rows, g_codes, training.code_learning_rate)
        updates, dec_os = dec_opt.update(g_dec, dec_os, dec_params)
        dec_params = optax.apply_updates(dec_params, updates)
        forced = jax.random.bernoulli(key, eps, (rows.shape[0], values.shape[1] - 1))
        dyn, g_dyn = jax.value_and_grad(dynamics_loss)(dyn_params, jax.lax.stop_gradient(codes[rows]), forced)
        updates, dyn_os = dyn_opt.update(g_dyn, dyn_os, dyn_params)
        dyn_params = optax.apply_updates(dyn_params, updates)
        return (dec_params, dyn_params, codes, moments, dec_os, dyn_os), (rec, dyn)

    def initial_train_state(codes_shape):
        codes = jnp.zeros(codes_shape, jnp.float32)
        moments = (jnp.zeros_like(codes), jnp.zeros_like(codes), jnp.zeros(codes_shape[0], jnp.int32))
        return (dec_params, dyn_params, codes, moments, dec_opt.init(dec_params), dyn_opt.init(dyn_params))

    def modules(state):
        return nnx.merge(dec_graphdef, state[0], dec_rest), nnx.merge(dyn_graphdef, state[1], dyn_rest)

    return step, initial_train_state, modules


def train(
    dataset: TrajectoryDataset,
    config: DINoConfig = DINoConfig(),
    training: DINoTrainConfig = DINoTrainConfig(),
    *,
    horizon: int,
    steps: int,
    seed: int = 0,
    periods: tuple[float, float] | None = None,
    progress: bool = True,
) -> DINoForecaster:
    """Train DINo on the frames ``0 .. horizon - 1`` of a training split (grid or scattered points; missing
    values are left out of the losses).

    Each step takes ``batch_size`` trajectories (a fresh permutation every epoch) at ``num_points`` random
    points (:class:`~enfpde.data.trajectories.BatchSampler`), then updates codes and decoder on the
    reconstruction loss and the dynamics on the code-trajectory loss (see the module doc).

    Args:
        dataset: the training split; config, training: sizes and training settings.
        horizon: frames of the training horizon (e.g. 10 for Navier-Stokes).
        steps: optimisation steps.
        seed: initialisation, data order, point subsets and teacher forcing.
        periods: ``(L_y, L_x)`` of a torus when they cannot be read off a grid.
        progress: show a tqdm bar.

    Returns:
        The trained :class:`DINoForecaster`; ``training_log`` holds the per-step ``reconstruction`` and ``dynamics``
        losses and the teacher-forcing probability; ``codes`` the auto-decoded training codes
        ``[N, horizon, C, code_dim]`` (not saved with the model).

    Raises:
        ValueError: bad horizon or frame times, coordinates outside the domain, a non-finite loss.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, found {steps!r}.")
    data = common.training_frames(dataset, horizon)
    dt = common.frame_interval(dataset)
    domain = common.domain_for_dataset(dataset, periods)
    inputs_all = domain.field_inputs(dataset.coords)  # validates every coordinate once
    normalizer = data.fit_normalizer()
    sampler = BatchSampler(data, normalizer, training.batch_size, training.num_points, seed=seed)
    num_channels = len(dataset.variables)
    decoder, dynamics = _build(config, domain, num_channels, seed)
    step_fn, initial_train_state, modules = make_train_step(decoder, dynamics, training)
    state = initial_train_state((data.num_trajectories, horizon, num_channels, config.code_dim))
    base_key = jax.random.key(seed)
    log = {name: np.zeros(steps) for name in ("reconstruction", "dynamics", "teacher_forcing")}
    t_start = time.perf_counter()
    with tqdm(total=steps, desc="DINo", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for s in range(steps):
            batch = sampler(s)
            inputs = inputs_all if sampler.num_points == len(inputs_all) else domain.field_inputs(batch.coords)
            eps = teacher_forcing_probability(training, s)
            state, (rec, dyn) = step_fn(
                state, jnp.asarray(batch.trajectories), jnp.asarray(inputs), jnp.asarray(batch.values),
                jnp.asarray(batch.mask), jax.random.fold_in(base_key, s), jnp.float32(eps),
            )
            rec, dyn = float(rec), float(dyn)
            log["reconstruction"][s], log["dynamics"][s], log["teacher_forcing"][s] = rec, dyn, eps
            if not (math.isfinite(rec) and math.isfinite(dyn)):
                raise ValueError(
                    f"DINo training: non-finite loss (reconstruction {rec}, dynamics {dyn}) at step {s}; lower the "
                    "learning rates of DINoTrainConfig."
                )
            bar.update(1)
            bar.set_postfix(rec=f"{rec:.3e}", dyn=f"{dyn:.3e}", eps=f"{eps:.2f}")
    log["seconds"] = time.perf_counter() - t_start
    decoder, dynamics = modules(state)
    forecaster = DINoForecaster(
        decoder, dynamics, config, domain, normalizer, variables=dataset.variables, units=dataset.units,
        time_units=dataset.time_units, frame_interval=dt, horizon=horizon, training=training, training_log=log,
    )
    forecaster.codes = np.asarray(state[2])
    return forecaster
