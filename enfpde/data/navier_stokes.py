"""Navier-Stokes on the 2-torus: the vorticity solver, its random initial conditions, and the dataset generator.

The equation (REFERENCE.md section 3), on the periodic unit square ``[0, 1)^2``::

    d_t w + u . grad w = nu lap w + f,      u = (d_y psi, -d_x psi),      -lap psi = w,

with ``w`` the vorticity ``d_x u_y - d_y u_x``. Everything is nondimensional (domain length 1).

Numerics (after the data solver of Li et al. 2021, "Fourier neural operator for parametric PDEs", which
DINo and ENF-PDE use): pseudo-spectral in ``rfft2`` space; the advection term ``u . grad w`` is evaluated on
the grid and its spectrum truncated by the 2/3 rule; time stepping is Crank-Nicolson for the viscous term
and explicit Euler for advection and forcing,

    w_hat' = [(1 - dt nu l / 2) w_hat + dt (f_hat - D (u . grad w)_hat)] / (1 + dt nu l / 2),

where ``l = 4 pi^2 |k|^2`` and ``D`` the dealiasing mask ``|k_x|, |k_y| <= (2/3)(N/2)``. Time loops are
``jax.lax.scan`` (outer over record times, inner over solver steps) inside one jit, batched over a leading
trajectory axis.

Array conventions: fields are ``[B, N, N]`` indexed ``[trajectory, y, x]``; grid point ``[j, i]`` sits at
``(x, y) = (i / N, j / N)``. The solver's precision follows its input (float32, or float64 when JAX's x64
mode is on); the dataset generator always computes and stores float32.

Datasets: :func:`load_config` reads a dataset YAML against the typed schema :class:`NavierStokesConfig`
(unknown keys are errors), :func:`generate_split` returns one split as an ``xarray.Dataset`` with CF
metadata, and :func:`generate_dataset` writes one netCDF file per split. ``datasets/README.md`` documents
the YAML files and the file layout.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import enum
import functools
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from enfpde.data.trajectories import read_config_source, write_netcdf_atomic

Array = jax.Array

__all__ = [
    "CosineForcing",
    "DiagonalForcing",
    "Forcing",
    "ForcingConfig",
    "ForcingKind",
    "NavierStokesConfig",
    "NoForcing",
    "PRESETS",
    "SeedMode",
    "SplitConfig",
    "Variant",
    "VorticitySolver",
    "gaussian_random_field",
    "generate_dataset",
    "generate_split",
    "grf_sigma",
    "load_config",
    "split_seeds",
]

MAX_SEED = 2**31 - 1  # test trajectory i uses seed MAX_SEED - i (the reference's int32 maximum)


# ----------------------------------------------------------------------------------------------- forcing


class Forcing(abc.ABC):
    """A time-independent forcing ``f(x, y)`` of the vorticity equation, evaluated on grid coordinates."""

    @abc.abstractmethod
    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``f`` at points ``(x, y)`` (arrays of equal shape, nondimensional positions in ``[0, 1)``)."""

    @property
    @abc.abstractmethod
    def formula(self) -> str:
        """The forcing as a formula string (recorded in the dataset's attributes)."""


@dataclasses.dataclass(frozen=True)
class NoForcing(Forcing):
    """``f = 0`` (decaying turbulence)."""

    def __call__(self, x, y):
        return np.zeros_like(x)

    @property
    def formula(self) -> str:
        return "f(x, y) = 0"


@dataclasses.dataclass(frozen=True)
class CosineForcing(Forcing):
    """``f = A (cos(2 pi m x) + cos(2 pi m y))``; ENF-PDE's forcing is ``A = 0.3, m = 2``."""

    amplitude: float = 0.3
    wavenumber: int = 2

    def __call__(self, x, y):
        k = 2.0 * np.pi * self.wavenumber
        return self.amplitude * (np.cos(k * x) + np.cos(k * y))

    @property
    def formula(self) -> str:
        return f"f(x, y) = {self.amplitude:g} (cos({2 * self.wavenumber:g} pi x) + cos({2 * self.wavenumber:g} pi y))"


@dataclasses.dataclass(frozen=True)
class DiagonalForcing(Forcing):
    """``f = A (sin(2 pi m (x + y)) + cos(2 pi m (x + y)))``; Li et al.'s and DINo's is ``A = 0.1, m = 1``."""

    amplitude: float = 0.1
    wavenumber: int = 1

    def __call__(self, x, y):
        phase = 2.0 * np.pi * self.wavenumber * (x + y)
        return self.amplitude * (np.sin(phase) + np.cos(phase))

    @property
    def formula(self) -> str:
        k = f"{2 * self.wavenumber:g} pi"
        return f"f(x, y) = {self.amplitude:g} (sin({k} (x + y)) + cos({k} (x + y)))"


# ------------------------------------------------------------------------------------- initial conditions


def grf_sigma(alpha: float, tau: float) -> float:
    """The reference's default amplitude ``sigma = tau^(0.5 (2 alpha - d))`` for ``d = 2`` dimensions."""
    return tau ** (0.5 * (2.0 * alpha - 2.0))


def _wavenumbers(resolution: int) -> np.ndarray:
    """Integer wavenumbers of a full FFT axis: ``0, 1, ..., N/2 - 1, -N/2, ..., -1``."""
    return np.fft.fftfreq(resolution, d=1.0 / resolution)


def _grf_sqrt_eig(resolution: int, alpha: float, tau: float, sigma: float) -> np.ndarray:
    """``N^2 sqrt(2) sigma (4 pi^2 |k|^2 + tau^2)^(-alpha/2)`` on the full ``[N, N]`` FFT grid, zero at ``k = 0``."""
    k = _wavenumbers(resolution)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    sqrt_eig = resolution**2 * math.sqrt(2.0) * sigma * (4.0 * np.pi**2 * k2 + tau**2) ** (-alpha / 2.0)
    sqrt_eig[0, 0] = 0.0  # zero-mean field
    return sqrt_eig


def gaussian_random_field(
    key: Array,
    batch: int,
    resolution: int,
    *,
    alpha: float = 2.5,
    tau: float = 7.0,
    sigma: float | None = None,
    dtype=jnp.float32,
) -> Array:
    """Samples of the zero-mean Gaussian random field with covariance ``sigma^2 (-lap + tau^2)^-alpha`` on the torus.

    As in the reference generator: complex white noise ``c_k`` (``E|c_k|^2 = 1``) on the full ``[N, N]``
    wavenumber grid is scaled by ``sqrt_eig = N^2 sqrt(2) sigma (4 pi^2 |k|^2 + tau^2)^(-alpha/2)`` (zero at
    ``k = 0``), and the field is the real part of its inverse FFT. The expected power of mode ``k`` is therefore
    proportional to ``(4 pi^2 |k|^2 + tau^2)^(-alpha)``.

    Args:
      key: a typed PRNG key. A scalar key is split into ``batch`` keys; an array of ``batch`` keys gives one
        sample per key (the dataset generator passes ``jax.random.key(seed)`` per trajectory, so a
        trajectory's initial condition does not depend on the batch it was drawn in).
      batch: number of samples ``B``.
      resolution: grid size ``N`` (even).
      alpha, tau: spectral decay and inverse length scale (reference: 2.5 and 7).
      sigma: amplitude; ``None`` gives :func:`grf_sigma` ``(alpha, tau)``.
      dtype: real dtype of the result (``jnp.float64`` needs JAX's x64 mode).

    Returns:
      ``[B, N, N]`` real fields, indexed ``[sample, y, x]``.

    Raises:
      ValueError: if ``key`` is neither a scalar key nor ``batch`` keys, or ``resolution`` is odd.
    """
    if resolution < 2 or resolution % 2:
        raise ValueError(f"resolution: expected an even grid size >= 2, found {resolution}.")
    keys = jax.random.split(key, batch) if key.shape == () else key
    if keys.shape != (batch,):
        raise ValueError(f"key: expected a scalar key or {batch} keys (one per sample), found shape {key.shape}.")
    sigma = grf_sigma(alpha, tau) if sigma is None else sigma
    real = jnp.dtype(dtype)
    cplx = jnp.result_type(real, jnp.complex64)
    sqrt_eig = jnp.asarray(_grf_sqrt_eig(resolution, alpha, tau, sigma), real)
    noise = jax.vmap(lambda k: jax.random.normal(k, (resolution, resolution), cplx))(keys)
    return jnp.fft.ifft2(sqrt_eig * noise).real.astype(real)


# ------------------------------------------------------------------------------------------------ solver


@dataclasses.dataclass(frozen=True)
class VorticitySolver:
    """Pseudo-spectral solver of the forced vorticity equation on ``[0, 1)^2`` (see the module docstring).

    A frozen, hashable value: its methods are jitted with the solver as a static argument, so one solver
    compiles once per input shape and dtype.

    Attributes:
      resolution: grid size ``N`` (even).
      viscosity: ``nu`` (>= 0).
      forcing: a :class:`Forcing`.
      dt: solver time step.
    """

    resolution: int
    viscosity: float = 1e-3
    forcing: Forcing = CosineForcing()
    dt: float = 1e-3

    def __post_init__(self):
        if self.resolution < 4 or self.resolution % 2:
            raise ValueError(f"resolution: expected an even grid size >= 4, found {self.resolution}.")
        if not self.viscosity >= 0:
            raise ValueError(f"viscosity: expected a value >= 0, found {self.viscosity}.")
        if not self.dt > 0:
            raise ValueError(f"dt: expected a positive time step, found {self.dt}.")

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell positions ``(x, y)``, each ``[N, N]`` indexed ``[y, x]``: ``x[j, i] = i / N``, ``y[j, i] = j / N``."""
        s = np.arange(self.resolution) / self.resolution
        return np.meshgrid(s, s, indexing="xy")

    def _operators(self, dtype) -> dict[str, Array]:
        """Spectral operators on the ``[N, N/2 + 1]`` rfft2 grid (computed in float64, cast to ``dtype``)."""
        n = self.resolution
        ky = _wavenumbers(n)[:, None]
        kx = np.fft.rfftfreq(n, d=1.0 / n)[None, :]
        lap = 4.0 * np.pi**2 * (kx**2 + ky**2)  # minus the Laplacian's symbol
        inv_lap = np.where(lap > 0, 1.0 / np.where(lap > 0, lap, 1.0), 0.0)
        # First derivatives: the Nyquist wavenumber of an even grid is its own negative, so a real field's
        # Nyquist mode has no well-defined real derivative; it is zeroed (the usual choice).
        nyquist = n // 2
        dx = 2j * np.pi * np.where(np.abs(kx) == nyquist, 0.0, kx)
        dy = 2j * np.pi * np.where(np.abs(ky) == nyquist, 0.0, ky)
        dealias = (np.abs(kx) <= (2.0 / 3.0) * nyquist) & (np.abs(ky) <= (2.0 / 3.0) * nyquist)
        half = 0.5 * self.dt * self.viscosity * lap
        x, y = self.grid()
        forcing_hat = np.fft.rfft2(self.forcing(x, y))
        real = jnp.dtype(dtype)
        cplx = jnp.result_type(real, jnp.complex64)
        ops = {
            "decay": (1.0 - half) / (1.0 + half),  # Crank-Nicolson factor of the viscous term
            "advect": self.dt * dealias / (1.0 + half),  # explicit, dealiased advection
            "inv_lap": np.broadcast_to(inv_lap, lap.shape),
        }
        ops = {k: jnp.asarray(v, real) for k, v in ops.items()}
        ops["force"] = jnp.asarray(self.dt * forcing_hat / (1.0 + half), cplx)
        ops["dx"] = jnp.asarray(np.broadcast_to(dx, lap.shape), cplx)
        ops["dy"] = jnp.asarray(np.broadcast_to(dy, lap.shape), cplx)
        return ops

    def to_spectral(self, w: Array) -> Array:
        """``[..., N, N]`` grid values -> ``[..., N, N/2 + 1]`` rfft2 coefficients."""
        return jnp.fft.rfft2(w)

    def to_physical(self, w_hat: Array) -> Array:
        """``[..., N, N/2 + 1]`` rfft2 coefficients -> ``[..., N, N]`` grid values."""
        return jnp.fft.irfft2(w_hat, s=(self.resolution, self.resolution))

    def _advection(self, w_hat: Array, ops: dict[str, Array]) -> Array:
        """``(u . grad w)_hat`` (not yet dealiased), the product taken on the grid."""
        psi_hat = w_hat * ops["inv_lap"]
        # The four inverse transforms in one batched call: u = d_y psi, v = -d_x psi, d_x w, d_y w.
        spectra = jnp.stack([ops["dy"] * psi_hat, -ops["dx"] * psi_hat, ops["dx"] * w_hat, ops["dy"] * w_hat])
        u, v, w_x, w_y = self.to_physical(spectra)
        return self.to_spectral(u * w_x + v * w_y)

    def advection(self, w: Array) -> Array:
        """The advection term ``u . grad w`` on the grid, ``[..., N, N]`` -> ``[..., N, N]`` (not dealiased)."""
        ops = self._operators(jnp.asarray(w).dtype)
        return self.to_physical(self._advection(self.to_spectral(w), ops))

    def _step(self, w_hat: Array, ops: dict[str, Array]) -> Array:
        return ops["decay"] * w_hat + ops["force"] - ops["advect"] * self._advection(w_hat, ops)

    @functools.partial(jax.jit, static_argnums=(0, 2, 3))
    def advance(self, w_hat: Array, num_records: int, steps_per_record: int) -> tuple[Array, Array]:
        """Integrate ``num_records * steps_per_record`` steps from spectral state ``w_hat`` ``[B, N, N/2 + 1]``.

        Returns:
          ``(w_hat_end, records)``: the final spectral state and the grid fields after each block of
          ``steps_per_record`` steps, ``[B, num_records, N, N]`` (the initial state is not included).
        """
        ops = self._operators(jnp.finfo(w_hat.dtype).dtype)

        def block(w_hat, _):
            w_hat = jax.lax.scan(lambda w, _: (self._step(w, ops), None), w_hat, None, length=steps_per_record)[0]
            return w_hat, self.to_physical(w_hat)

        w_hat, records = jax.lax.scan(block, w_hat, None, length=num_records)
        return w_hat, jnp.moveaxis(records, 0, 1)

    def steps_for(self, duration: float, what: str = "duration") -> int:
        """The number of solver steps in ``duration``, which must be a positive multiple of ``dt``."""
        steps = round(duration / self.dt)
        if steps < 1 or abs(steps * self.dt - duration) > 1e-9 * max(1.0, abs(duration)):
            raise ValueError(f"{what}: expected a positive multiple of the solver step dt = {self.dt:g}, found {duration:g}.")
        return steps

    def simulate(self, w0: Array, num_records: int, record_interval: float) -> Array:
        """Trajectories from initial vorticity ``w0`` ``[B, N, N]``, recorded every ``record_interval``.

        Returns:
          ``[B, num_records, N, N]``: the states at ``t = 0, record_interval, ..., (num_records - 1) record_interval``
          (record 0 is ``w0`` itself, as the reference records a state before stepping from it).

        Raises:
          ValueError: if ``w0`` is not ``[B, N, N]``, ``num_records < 1`` or ``record_interval`` is not a
            multiple of ``dt``.
        """
        w0 = jnp.asarray(w0)
        if w0.ndim != 3 or w0.shape[1:] != (self.resolution, self.resolution):
            raise ValueError(f"w0: expected shape [B, {self.resolution}, {self.resolution}], found {w0.shape}.")
        if num_records < 1:
            raise ValueError(f"num_records: expected >= 1, found {num_records}.")
        if num_records == 1:
            return w0[:, None]
        steps = self.steps_for(record_interval, "record_interval")
        _, records = self.advance(self.to_spectral(w0), num_records - 1, steps)
        return jnp.concatenate([w0[:, None], records.astype(w0.dtype)], axis=1)


# ------------------------------------------------------------------------------------------------ config


class Variant(enum.Enum):
    """Named protocol presets (REFERENCE.md section 3)."""

    enfpde = "enfpde"
    dino = "dino"


class ForcingKind(enum.Enum):
    none = "none"
    cosine = "cosine"
    diagonal = "diagonal"


class SeedMode(enum.Enum):
    """``train``: trajectory i uses seed ``offset + i``; ``test``: seed ``2**31 - 1 - offset - i``."""

    train = "train"
    test = "test"


@dataclasses.dataclass(frozen=True)
class ForcingConfig:
    """``kind``: ``none`` | ``cosine`` (A (cos 2 pi m x + cos 2 pi m y)) | ``diagonal`` (A (sin + cos)(2 pi m (x + y)))."""

    kind: ForcingKind = ForcingKind.cosine
    amplitude: float = 0.3
    wavenumber: int = 2

    def build(self) -> Forcing:
        """The :class:`Forcing` object this config names (strings are resolved here, once)."""
        if self.kind is ForcingKind.none:
            return NoForcing()
        return {ForcingKind.cosine: CosineForcing, ForcingKind.diagonal: DiagonalForcing}[self.kind](
            amplitude=self.amplitude, wavenumber=self.wavenumber
        )


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """One split (one netCDF file).

    Attributes:
      num_trajectories: number of trajectories.
      seed_mode: ``train`` (seeds ``seed_offset + i``) or ``test`` (seeds ``2**31 - 1 - seed_offset - i``).
      seed_offset: first trajectory index of the seed rule (e.g. a validation split after the train seeds).
      frame_interval: time between frames; ``None`` takes the dataset's.
      num_frames: number of frames; ``None`` covers the dataset's time span
        ``[0, (num_frames - 1) * frame_interval]`` at this split's interval.
    """

    num_trajectories: int = 16
    seed_mode: SeedMode = SeedMode.train
    seed_offset: int = 0
    frame_interval: Optional[float] = None
    num_frames: Optional[int] = None


_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class NavierStokesConfig:
    """A Navier-Stokes dataset: physics, initial conditions, burn-in, frames and splits.

    Validated on construction (``ValueError`` naming the field). Defaults are the ENF-PDE protocol; see
    :data:`PRESETS` for the DINo variant and :func:`load_config` for YAML files.

    Attributes:
      name: dataset name (recorded in the files).
      variant: the protocol preset the YAML starts from (``enfpde`` or ``dino``).
      resolution: grid size ``N`` (even).
      viscosity: ``nu``.
      forcing: the forcing (:class:`ForcingConfig`).
      alpha, tau, sigma: Gaussian-random-field initial conditions; ``sigma = None`` is ``tau^(alpha - 1)``.
      solver_dt: solver time step.
      burn_in_duration, burn_in_records: the burn-in integrates the random field for ``burn_in_duration``
        recording ``burn_in_records`` states (at ``t = 0, T/R, ..., (R - 1) T/R``, the reference's recording
        rule); the last record (``t = 28.5`` for ``T = 30, R = 20``) is frame 0.
      frame_interval, num_frames: frames at ``t = 0, frame_interval, ...`` after the burn-in.
      window_frames: for datasets whose trajectories are cut into training windows (DINo: 40 frames in two
        windows of 20); recorded in the files, the loader cuts; ``None`` for none.
      batch_size: most trajectories per jitted solver call (an execution setting: results do not depend on it).
      splits: split name -> :class:`SplitConfig`; each becomes ``<output_dir>/<name>.nc``.
      output_dir: where the files go (relative paths are relative to the current working directory).
    """

    name: str = "navier_stokes"
    variant: Variant = Variant.enfpde
    resolution: int = 64
    viscosity: float = 1e-3
    forcing: ForcingConfig = dataclasses.field(default_factory=ForcingConfig)
    alpha: float = 2.5
    tau: float = 7.0
    sigma: Optional[float] = None
    solver_dt: float = 1e-3
    burn_in_duration: float = 30.0
    burn_in_records: int = 20
    frame_interval: float = 1.0
    num_frames: int = 20
    window_frames: Optional[int] = None
    batch_size: int = 16
    splits: Dict[str, SplitConfig] = dataclasses.field(
        default_factory=lambda: {
            "train": SplitConfig(16, SeedMode.train),
            "test": SplitConfig(16, SeedMode.test),
            "test_fine": SplitConfig(16, SeedMode.test, frame_interval=0.25),
        }
    )
    output_dir: str = "data/navier_stokes"

    def __post_init__(self):
        def fail(field: str, expected: str, found) -> None:
            raise ValueError(f"{field}: expected {expected}, found {found!r}.")

        solver = self.solver()  # validates resolution, viscosity, dt
        if not (self.alpha > 1.0 and self.tau > 0.0):
            fail("alpha/tau", "alpha > 1 (a square-integrable field) and tau > 0", (self.alpha, self.tau))
        if self.sigma is not None and not self.sigma > 0:
            fail("sigma", "a positive amplitude or null", self.sigma)
        if self.burn_in_records < 1:
            fail("burn_in_records", ">= 1", self.burn_in_records)
        if self.burn_in_duration < 0:
            fail("burn_in_duration", ">= 0", self.burn_in_duration)
        if self.burn_in_duration > 0:
            solver.steps_for(self.burn_in_interval, "burn_in_duration / burn_in_records")
        solver.steps_for(self.frame_interval, "frame_interval")
        if self.num_frames < 1:
            fail("num_frames", ">= 1", self.num_frames)
        if self.window_frames is not None and (self.window_frames < 1 or self.num_frames % self.window_frames):
            fail("window_frames", f"null or a divisor of num_frames = {self.num_frames}", self.window_frames)
        if self.batch_size < 1:
            fail("batch_size", ">= 1", self.batch_size)
        if not self.splits:
            fail("splits", "at least one split", self.splits)
        for name, split in self.splits.items():
            if not _SPLIT_NAME.match(name):
                fail("splits", "split names made of letters, digits, '_', '-', '.' (they become file names)", name)
            if split.num_trajectories < 1:
                fail(f"splits.{name}.num_trajectories", ">= 1", split.num_trajectories)
            if split.seed_offset < 0:
                fail(f"splits.{name}.seed_offset", ">= 0", split.seed_offset)
            if split.seed_offset + split.num_trajectories > 2**30:
                fail(f"splits.{name}", "seed_offset + num_trajectories <= 2**30 (train and test seeds stay disjoint)",
                     split.seed_offset + split.num_trajectories)
            if split.num_frames is not None and split.num_frames < 1:
                fail(f"splits.{name}.num_frames", ">= 1 or null", split.num_frames)
            self.frame_times(name)  # validates the frame interval and span

    @property
    def burn_in_interval(self) -> float:
        return self.burn_in_duration / self.burn_in_records

    @property
    def burn_in_end(self) -> float:
        """Time of the burn-in's last record, which becomes frame 0 (28.5 for the reference's T = 30, 20 records)."""
        return 0.0 if self.burn_in_duration == 0 else (self.burn_in_records - 1) * self.burn_in_interval

    @property
    def resolved_sigma(self) -> float:
        return grf_sigma(self.alpha, self.tau) if self.sigma is None else self.sigma

    def solver(self) -> VorticitySolver:
        return VorticitySolver(self.resolution, self.viscosity, self.forcing.build(), self.solver_dt)

    def split_frame_interval(self, split: str) -> float:
        """The time between a split's frames (its own ``frame_interval`` or the dataset's)."""
        s = self._split(split)
        return self.frame_interval if s.frame_interval is None else s.frame_interval

    def frame_times(self, split: str) -> np.ndarray:
        """The frame times of a split (``[T]`` float64, from 0)."""
        s = self._split(split)
        interval = self.split_frame_interval(split)
        self.solver().steps_for(interval, "frame_interval" if s.frame_interval is None else f"splits.{split}.frame_interval")
        if s.num_frames is not None:
            num = s.num_frames
        else:
            span = (self.num_frames - 1) * self.frame_interval
            num = round(span / interval) + 1
            if abs((num - 1) * interval - span) > 1e-9 * max(1.0, span):
                raise ValueError(
                    f"splits.{split}.frame_interval = {interval:g} does not divide the "
                    f"dataset's time span {span:g}; set splits.{split}.num_frames explicitly."
                )
        return np.arange(num) * interval

    def seeds(self, split: str) -> np.ndarray:
        """The split's seeds, ``[num_trajectories]`` int64."""
        s = self._split(split)
        return split_seeds(s.seed_mode, s.num_trajectories, s.seed_offset)

    def _split(self, split: str) -> SplitConfig:
        try:
            return self.splits[split]
        except KeyError:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; it has {sorted(self.splits)}.") from None


def split_seeds(mode: SeedMode, num_trajectories: int, offset: int = 0) -> np.ndarray:
    """Seeds of trajectories ``offset, ..., offset + num_trajectories - 1``: ``i`` (train) or ``2**31 - 1 - i`` (test)."""
    index = offset + np.arange(num_trajectories, dtype=np.int64)
    return index if mode is SeedMode.train else MAX_SEED - index


PRESETS: dict[Variant, NavierStokesConfig] = {
    Variant.enfpde: NavierStokesConfig(),
    Variant.dino: NavierStokesConfig(
        name="navier_stokes_dino",
        variant=Variant.dino,
        forcing=ForcingConfig(ForcingKind.diagonal, amplitude=0.1, wavenumber=1),
        num_frames=40,
        window_frames=20,
        splits={"train": SplitConfig(256, SeedMode.train), "test": SplitConfig(16, SeedMode.test)},
        output_dir="data/navier_stokes_dino",
    ),
}


def load_config(
    source: Union[str, os.PathLike, Mapping, NavierStokesConfig], overrides: Mapping | None = None
) -> NavierStokesConfig:
    """Read a dataset config: YAML file (or mapping) -> validated :class:`NavierStokesConfig`.

    The file's ``variant`` (default ``enfpde``) picks the preset in :data:`PRESETS` whose values the file then
    overrides. A ``splits`` entry in the file replaces the preset's splits as a whole; each split is a
    :class:`SplitConfig`. Unknown keys and values of the wrong type are errors.

    Args:
      source: a YAML path, a mapping with the same structure, or a config (returned with ``overrides`` applied).
      overrides: a mapping merged over the file, key by key (e.g. ``{"resolution": 16, "splits": {"train":
        {"num_trajectories": 2}}}``).

    Raises:
      ValueError: naming the file and the offending key or value.
    """
    where, user, _ = read_config_source(source, NavierStokesConfig)
    try:
        if overrides:
            user = OmegaConf.merge(user, OmegaConf.create(dict(overrides)))
        variant = user.get("variant", Variant.enfpde.value)
        variant = variant.value if isinstance(variant, Variant) else variant
        if variant not in Variant._value2member_map_:
            raise ValueError(f"{where}: variant: expected one of {[v.value for v in Variant]}, found {variant!r}.")
        base = OmegaConf.structured(PRESETS[Variant(variant)])
        if "splits" in user:
            OmegaConf.set_readonly(base, False)
            base.splits = {}
        merged = OmegaConf.merge(base, user)
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        key = getattr(error, "full_key", None)
        raise ValueError(f"{where}: {message}" + (f" (at {key!r})" if key else "") + ".") from None
    try:
        return OmegaConf.to_object(merged)  # runs NavierStokesConfig.__post_init__, the value checks
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


# ------------------------------------------------------------------------------------------------ generation


def _package_version() -> str:
    try:
        return metadata.version("enfpde")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _batches(num: int, batch_size: int, workers: int) -> list[slice]:
    """Split ``num`` trajectories into near-equal batches: at most ``batch_size`` each, and at least
    ``workers`` batches (when there are that many trajectories) so that every worker has one."""
    count = max(math.ceil(num / batch_size), min(workers, num))
    edges = np.linspace(0, num, count + 1).round().astype(int)
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def _default_workers() -> int:
    # Concurrent solver calls use the CPU cores (one XLA:CPU call runs mostly on one core); an accelerator
    # takes one batch at a time.
    return (os.cpu_count() or 1) if jax.default_backend() == "cpu" else 1


def _trajectories(
    config: NavierStokesConfig, seeds: np.ndarray, num_frames: int, steps_per_frame: int, tick: Callable[[int], None]
) -> np.ndarray:
    """Burn-in and trajectory of one batch of seeds: ``[B, num_frames, N, N]`` float32."""
    solver = config.solver()
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.int32))
    w0 = gaussian_random_field(
        keys, len(seeds), config.resolution, alpha=config.alpha, tau=config.tau, sigma=config.resolved_sigma, dtype=jnp.float32
    )
    w_hat = solver.to_spectral(w0)
    b = len(seeds)
    # Burn-in. The reference records the state *before* stepping, at t = 0, T/R, ..., (R - 1) T/R, and keeps the
    # last record: for T = 30 and R = 20 that is the state at t = 28.5 (its final 1.5 time units are integrated
    # and never used). We integrate the R - 1 record intervals, one jitted call per interval for progress.
    if config.burn_in_duration > 0:
        burn_steps = solver.steps_for(config.burn_in_interval)
        for _ in range(config.burn_in_records - 1):
            w_hat, _ = solver.advance(w_hat, 1, burn_steps)
            w_hat.block_until_ready()  # an honest progress bar; the next call waits for this state anyway
            tick(b * burn_steps)
    frames = [np.asarray(solver.to_physical(w_hat), np.float32)[:, None]]
    # Frames 1, 2, ...: calls of about 1000 solver steps each (a progress tick per call).
    per_call = max(1, 1000 // steps_per_frame)
    remaining = num_frames - 1
    while remaining > 0:
        n = min(per_call, remaining)
        w_hat, records = solver.advance(w_hat, n, steps_per_frame)
        frames.append(np.asarray(records, np.float32))
        tick(b * n * steps_per_frame)
        remaining -= n
    return np.concatenate(frames, axis=1)


def _metadata(config: NavierStokesConfig, split: str) -> dict:
    s = config.splits[split]
    times = config.frame_times(split)
    attrs = {
        "Conventions": "CF-1.10",
        "title": f"{config.name}: 2-D incompressible Navier-Stokes (vorticity form) on the periodic unit square, split {split!r}",
        "source": f"enfpde {_package_version()} pseudo-spectral solver",
        "references": "REFERENCE.md section 3; Li et al. 2021 (Fourier neural operator) data solver; Yin et al. 2023 (DINo); Knigge et al. 2024 (ENF-PDE)",
        "comment": "Nondimensional units: domain length 1, time as in the equation. Generated by enfpde.data.navier_stokes; the resolved config is in the attribute 'config'.",
        "equation": "d_t w + u . grad w = nu lap w + f, u = (d_y psi, -d_x psi), -lap psi = w, on [0, 1)^2 periodic",
        "numerics": "pseudo-spectral (rfft2), 2/3-rule dealiasing of u . grad w, Crank-Nicolson viscous term, explicit Euler advection and forcing",
        "dataset": config.name,
        "variant": config.variant.value,
        "split": split,
        "viscosity": config.viscosity,
        "forcing_kind": config.forcing.kind.value,
        "forcing_amplitude": config.forcing.amplitude,
        "forcing_wavenumber": config.forcing.wavenumber,
        "forcing_formula": config.forcing.build().formula,
        "initial_condition": "Gaussian random field: complex white noise times sqrt_eig = N^2 sqrt(2) sigma (4 pi^2 |k|^2 + tau^2)^(-alpha/2), zero mean, real part of the inverse FFT",
        "grf_alpha": config.alpha,
        "grf_tau": config.tau,
        "grf_sigma": config.resolved_sigma,
        "resolution": config.resolution,
        "solver_dt": config.solver_dt,
        "burn_in_duration": config.burn_in_duration,
        "burn_in_records": config.burn_in_records,
        "burn_in_end_time": config.burn_in_end,
        "frame_interval": config.split_frame_interval(split),
        "num_frames": len(times),
        "seed_mode": s.seed_mode.value,
        "seed_offset": s.seed_offset,
        "seed_rule": "initial condition of trajectory i drawn with jax.random.key(seed); train: seed = seed_offset + i, test: seed = 2**31 - 1 - seed_offset - i",
        "config": OmegaConf.to_yaml(OmegaConf.structured(config)),
    }
    if config.window_frames is not None:
        attrs["window_frames"] = config.window_frames
    return attrs


def _to_dataset(config: NavierStokesConfig, split: str, vorticity: np.ndarray) -> xr.Dataset:
    n = config.resolution
    cells = np.arange(n) / n
    seeds = config.seeds(split)
    return xr.Dataset(
        {
            "vorticity": (
                ("trajectory", "time", "y", "x"),
                vorticity,
                {"long_name": "vorticity (z-component of the curl of the velocity, d_x u_y - d_y u_x)", "units": "1"},
            )
        },
        coords={
            "trajectory": ("trajectory", np.arange(len(seeds), dtype=np.int64), {"long_name": "trajectory index"}),
            "time": (
                "time",
                config.frame_times(split),
                {"long_name": "time since the end of the burn-in (nondimensional)", "units": "1", "axis": "T"},
            ),
            "y": ("y", cells, {"long_name": "y position (cell position j/N on the periodic unit square)", "units": "1", "axis": "Y"}),
            "x": ("x", cells, {"long_name": "x position (cell position i/N on the periodic unit square)", "units": "1", "axis": "X"}),
            "seed": ("trajectory", seeds, {"long_name": "seed of the initial condition (jax.random.key(seed))"}),
        },
        attrs=_metadata(config, split),
    )


class _Cancelled(Exception):
    """Raised in a worker at its next progress tick once the generation has failed or been interrupted."""


def _run_split(config: NavierStokesConfig, split: str, progress: bool, workers: int | None) -> xr.Dataset:
    seeds = config.seeds(split)
    times = config.frame_times(split)
    solver = config.solver()
    steps_per_frame = solver.steps_for(config.split_frame_interval(split))
    burn_steps = 0 if config.burn_in_duration == 0 else (config.burn_in_records - 1) * solver.steps_for(config.burn_in_interval)
    workers = workers or _default_workers()
    batches = _batches(len(seeds), config.batch_size, workers)
    lock, stop = threading.Lock(), threading.Event()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(seeds) * (burn_steps + (len(times) - 1) * steps_per_frame)
        bar = tqdm(total=total, desc=split, unit=" traj-steps", unit_scale=True)

    def tick(n: int) -> None:
        if stop.is_set():
            raise _Cancelled
        if bar is not None:
            with lock:
                bar.update(n)

    out = np.empty((len(seeds), len(times), config.resolution, config.resolution), np.float32)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(len(batches), workers))
    try:
        futures = {pool.submit(_trajectories, config, seeds[b], len(times), steps_per_frame, tick): b for b in batches}
        for future in concurrent.futures.as_completed(futures):
            out[futures[future]] = future.result()
    except BaseException:
        stop.set()  # running batches stop at their next chunk instead of finishing (Ctrl-C returns promptly)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return _to_dataset(config, split, out)


def generate_split(
    config: Union[str, os.PathLike, Mapping, NavierStokesConfig],
    split: str,
    *,
    progress: bool = False,
    workers: int | None = None,
) -> xr.Dataset:
    """Generate one split in memory.

    Args:
      config: a :class:`NavierStokesConfig` or anything :func:`load_config` reads.
      split: the split's name in ``config.splits``.
      progress: show a tqdm bar (trajectory-steps).
      workers: concurrent solver calls (default: the CPU count on CPU, 1 on an accelerator). Results do not
        depend on it.

    Returns:
      An ``xarray.Dataset`` with ``vorticity`` ``[trajectory, time, y, x]`` float32, coordinates ``trajectory``,
      ``time``, ``y``, ``x`` and ``seed`` (on ``trajectory``), and the physical parameters as global attributes
      (CF-1.10).
    """
    config = config if isinstance(config, NavierStokesConfig) else load_config(config)
    config._split(split)
    return _run_split(config, split, progress, workers)


def _covering_split(config: NavierStokesConfig, split: str) -> str | None:
    """Another split whose trajectories and frames contain this one's (same seeds, a finer or equal frame
    interval dividing this one's, a time span at least as long), so that this split is a subsample of it."""
    s = config.splits[split]
    times = config.frame_times(split)
    names = list(config.splits)
    for other in names:
        o = config.splits[other]
        if other == split or o.seed_mode is not s.seed_mode or o.seed_offset != s.seed_offset:
            continue
        if o.num_trajectories < s.num_trajectories:
            continue
        other_times = config.frame_times(other)
        index = np.searchsorted(other_times, times - 1e-9)
        if np.any(index >= len(other_times)) or not np.allclose(other_times[index], times, rtol=0, atol=1e-9):
            continue
        same = o.num_trajectories == s.num_trajectories and len(other_times) == len(times)
        if same and names.index(other) > names.index(split):
            continue  # identical splits: the first one is computed
        return other
    return None


def _subsample(config: NavierStokesConfig, split: str, source: xr.Dataset) -> xr.Dataset:
    times = config.frame_times(split)
    index = np.searchsorted(source["time"].values, times - 1e-9)
    data = source["vorticity"].values[: config.splits[split].num_trajectories, index]
    return _to_dataset(config, split, np.ascontiguousarray(data))


def generate_dataset(
    config_path_or_config: Union[str, os.PathLike, Mapping, NavierStokesConfig],
    output_dir: Union[str, os.PathLike, None] = None,
    overwrite: bool = False,
    progress: bool = True,
    *,
    workers: int | None = None,
) -> dict[str, Path]:
    """Generate every split of a dataset config and write ``<output_dir>/<split>.nc`` (netCDF-4, CF-1.10).

    All target files are checked before anything is computed, and each file is written to a temporary file in
    the same directory and renamed into place, so an interrupted run leaves no partial file. A split whose
    trajectories and frames are contained in another split's (e.g. ``test`` in ``test_fine``: same seeds, frames
    every 0.25 instead of 1) is cut from it rather than integrated again. Files contain no timestamps: the
    same config gives the same file contents.

    Args:
      config_path_or_config: a dataset YAML path, a mapping, or a :class:`NavierStokesConfig`.
      output_dir: overrides the config's ``output_dir``; relative paths are relative to the working directory.
      overwrite: replace existing files.
      progress: show tqdm progress bars.
      workers: concurrent solver calls (see :func:`generate_split`).

    Returns:
      split name -> path of its file.

    Raises:
      FileExistsError: if a target file exists and ``overwrite`` is false (nothing is computed or written).
      ValueError: for an invalid config.
    """
    config = config_path_or_config
    config = config if isinstance(config, NavierStokesConfig) else load_config(config)
    directory = Path(config.output_dir if output_dir is None else output_dir)
    targets = {split: (directory / f"{split}.nc").absolute() for split in config.splits}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"refusing to overwrite existing file(s) {', '.join(existing)}; pass overwrite=True "
            "(enfpde generate --overwrite) to replace them, or choose another output_dir."
        )
    directory.mkdir(parents=True, exist_ok=True)

    sources = {split: _covering_split(config, split) for split in config.splits}
    computed: dict[str, xr.Dataset] = {}
    order = [s for s in config.splits if sources[s] is None] + [s for s in config.splits if sources[s] is not None]
    for position, split in enumerate(order):
        source = sources[split]
        if source is None:
            dataset = _run_split(config, split, progress, workers)
            computed[split] = dataset
        else:
            dataset = _subsample(config, split, computed[source])
        write_netcdf_atomic(dataset, targets[split], ["vorticity"], overwrite=overwrite)
        # Free computed splits no remaining split is cut from.
        for name in list(computed):
            if all(sources[s] != name for s in order[position + 1 :]):
                del computed[name]
    return targets
