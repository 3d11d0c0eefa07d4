"""Rotating shallow water on the sphere: the ENF-PDE benchmark's solver, initial conditions and dataset generator.

The equations (REFERENCE.md section 3) are the rotating shallow-water equations on an Earth-sized sphere,

    d_t v + (zeta + f) k x v + grad(g h + |v|^2 / 2) = D(v),      d_t h + div(h v) = D(h),

with dissipation ``D = -nu (-lap)^p`` (applied to vorticity, divergence and ``h``), ``f = 2 Omega sin(lat)``,
``g = 9.80616 m/s^2``, ``Omega = 7.292e-5 1/s``, ``R = 6.37122e6 m`` and mean depth ``H = 1e4 m``. They are
solved with dinosaur (``dinosaur.shallow_water``): a spectral transform method in vorticity-divergence form on
the Gaussian T63 grid (triangular truncation at total wavenumber 63, 192 x 96 Gaussian nodes, alias-free for
quadratic terms), time stepping ``imex_rk_sil3`` (semi-implicit gravity waves) with ``dt = 1200 s``, all in
dinosaur's nondimensional units (``ShallowWaterSpecs.from_si()``: radius 1, time ``1 / (2 Omega)``).
Trajectories are batched with ``jax.vmap`` inside one ``jax.jit`` per batch.

Dissipation. The default is ``del^4`` hyperdiffusion (``p = 2``), applied after every step as the exact
integrating factor ``exp(-dt nu (l (l + 1) / R^2)^p)`` of each spectral mode
(``time_integration.horizontal_diffusion_step_filter``, unconditionally stable), with
``nu = 1e5 m^2/s * R^2 / 32^2 = 3.96e15 m^4/s``: the hyperdiffusion of the Dedalus Galewsky example
("matched at l = 32" to a ``1e5 m^2/s`` Laplacian viscosity), the set-up whose bump parameters the DINo and
ENF-PDE ranges are centred on. A physical coefficient keeps the physics of the data independent of the
truncation and the time step, unlike dinosaur's exponential filter (:class:`ExponentialFilter`, kept as an
option), whose damping is tied to the highest resolved wavenumber and to ``dt``.

Initial state. The barotropically unstable jet of Galewsky et al. (2004): zonal wind
``u_max / e_n exp(1 / ((lat - lat_0)(lat - lat_1)))`` between ``lat_0 = pi/7`` and ``lat_1 = pi/2 - pi/7``,
``u_max = 80 m/s``, with the height in exact (discrete, spectral) gradient-wind balance
(``shallow_water_states.multi_layer``) and global mean depth ``H``; plus a localised bump
``hpert cos(lat) exp(-(lon / alpha)^2) exp(-((pi/4 - lat) / beta)^2)`` (lon in ``(-pi, pi]``) with
``hpert ~ U(90, 150) m``, ``alpha ~ U(2/9, 4/9)``, ``beta ~ U(2/45, 4/45)`` drawn per trajectory from its seed
(``numpy.random.default_rng(seed)``, in that order). The bump is projected onto the truncated basis.

Snapshots. Snapshot ``k`` is the state after ``k * 50`` steps (snapshot 0 is the initial state), i.e. every
``50 * 1200 s = 16.67 h``. The first 6 snapshots (``t < 100 h``, while the instability develops) are dropped and
the next 14 kept: frames are the states at ``t = 100 h, 116.7 h, ..., 316.7 h`` after initialisation (950 steps
in all). The stored time coordinate is hours since the first kept frame (``0, 16.67, ..., 216.67``).

Output grid. Fields are sampled on an EQUIANGULAR, cell-centred latitude-longitude grid of the same size as the
solver's (192 x 96): longitude ``i * 360/192`` degrees, latitude ``-90 + (j + 0.5) * 180/96`` degrees, ascending.
The solver runs on Gaussian latitudes; the equiangular fields are an exact spectral synthesis of its modal
state at the equiangular nodes (a dinosaur ``Grid`` with the same wavenumbers and
``latitude_spacing="equiangular"``: the same spherical-harmonic expansion evaluated at other latitudes), not an
interpolation. Why equiangular: a regular grid is what FNO-type baselines and plots expect, its cells tile the
sphere exactly so the 2 x 2 area-weighted coarsening to the 96 x 48 training grid (:func:`coarsen_area_weighted`)
is exact bookkeeping (coarse cells are unions of fine cells, coarse centres on the regular 3.75 degree grid).

Variables (float32, CF metadata): ``height`` (total fluid depth ``h``, m), ``u`` and ``v`` (eastward and northward
wind, m/s), ``vorticity`` (relative vorticity, 1/s), dims ``(trajectory, time, latitude, longitude)``.

Datasets: :func:`load_config` reads a dataset YAML (``generator: shallow_water``) against the typed schema
:class:`ShallowWaterConfig`; :func:`generate_split` returns one split as an ``xarray.Dataset``;
:func:`generate_dataset` writes ``<split>.nc`` at the coarse training resolution for every split and
``<split>_native.nc`` at the native resolution for the splits in ``native_splits`` (the same trajectories and
frames). ``datasets/README.md`` documents the YAML files and the file layout.

Reference: Galewsky, Scott & Polvani (2004), "An initial-value problem for testing numerical models of the
global shallow-water equations", Tellus 56A, 429-440.
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
from typing import Dict, List, Union

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from dinosaur import coordinate_systems, layer_coordinates, scales
from dinosaur import shallow_water as sw
from dinosaur import shallow_water_states as sws
from dinosaur import spherical_harmonic as sh
from dinosaur import time_integration as ti
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from enfpde.data.navier_stokes import SeedMode, split_seeds
from enfpde.data.trajectories import read_config_source, write_netcdf_atomic

Array = jax.Array

__all__ = [
    "BumpParameters",
    "BumpConfig",
    "DissipationConfig",
    "DissipationKind",
    "ExponentialFilter",
    "Hyperdiffusion",
    "ShallowWaterConfig",
    "ShallowWaterSolver",
    "SpectralFilter",
    "SplitConfig",
    "VARIABLES",
    "coarsen_area_weighted",
    "draw_bump_parameters",
    "generate_dataset",
    "generate_split",
    "load_config",
]

GENERATOR = "shallow_water"  # the dataset YAML's ``generator`` key that selects this module
UNITS = scales.units
# Physical constants: dinosaur's (scales.py), which are the protocol's. One place, recorded in every file.
GRAVITY = scales.GRAVITY_ACCELERATION.to("m/s^2").magnitude  # 9.80616
OMEGA = scales.ANGULAR_VELOCITY.to("1/s").magnitude  # 7.292e-5
RADIUS = scales.RADIUS.to("m").magnitude  # 6.37122e6
_GALEWSKY = sws.get_default_parameters()
JET_SOUTHERN_LAT = float(_GALEWSKY.jet_southern_lat.to("radian").magnitude)  # pi / 7
JET_NORTHERN_LAT = float(_GALEWSKY.jet_northern_lat.to("radian").magnitude)  # pi / 2 - pi / 7
BUMP_LON, BUMP_LAT = 0.0, math.pi / 4  # centre of the height bump (radians)
# nu = 1e5 m^2/s matched at l = 32 (the Dedalus Galewsky example): nu_4 = 1e5 R^2 / 32^2 m^4/s.
DEFAULT_HYPERDIFFUSION = 1e5 * RADIUS**2 / 32**2

# name -> (long_name, standard_name, units)
VARIABLES: dict[str, tuple[str, str, str]] = {
    "height": ("total fluid depth h (height of the free surface above the flat bottom)", "sea_floor_depth_below_sea_surface", "m"),
    "u": ("eastward wind", "eastward_wind", "m s-1"),
    "v": ("northward wind", "northward_wind", "m s-1"),
    "vorticity": ("relative vorticity (vertical component of the curl of the wind)", "atmosphere_relative_vorticity", "s-1"),
}


def _dinosaur_version() -> str:
    try:
        return metadata.version("dinosaur")
    except metadata.PackageNotFoundError:
        return "unknown"


def _package_version() -> str:
    try:
        return metadata.version("enfpde")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


# ------------------------------------------------------------------------------------------------ dissipation


class SpectralFilter(abc.ABC):
    """Scale-selective dissipation applied to the spectral state after every time step."""

    @abc.abstractmethod
    def step_filter(self, grid: sh.Grid, dt: float, specs: sw.ShallowWaterSpecs) -> Callable:
        """A dinosaur step filter ``(u, u_next) -> u_next`` for nondimensional step ``dt`` on ``grid``."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """The filter as a formula string (recorded in the dataset's attributes)."""


@dataclasses.dataclass(frozen=True)
class Hyperdiffusion(SpectralFilter):
    """``-nu (-lap)^order`` on every prognostic variable, integrated exactly per step.

    Mode ``(m, l)`` is multiplied by ``exp(-dt nu (l (l + 1) / R^2)^order)`` after each step
    (``dinosaur.time_integration.horizontal_diffusion_step_filter``).

    Attributes:
      coefficient: ``nu`` in ``m^(2 order) / s``; default ``1e5 R^2 / 32^2 = 3.96e15 m^4/s`` (order 2).
      order: power of the Laplacian (2: ``del^4`` hyperdiffusion).
    """

    coefficient: float = DEFAULT_HYPERDIFFUSION
    order: int = 2

    def __post_init__(self):
        if not self.coefficient >= 0:
            raise ValueError(f"dissipation.hyperdiffusion_coefficient: expected a value >= 0, found {self.coefficient!r}.")
        if self.order < 1:
            raise ValueError(f"dissipation.hyperdiffusion_order: expected an integer >= 1, found {self.order!r}.")

    def e_folding_time(self, truncation: int) -> float:
        """Seconds in which the highest kept total wavenumber ``l = truncation`` decays by ``e``."""
        if self.coefficient == 0:
            return math.inf
        return (RADIUS**2 / (truncation * (truncation + 1))) ** self.order / self.coefficient

    def step_filter(self, grid, dt, specs):
        if self.coefficient == 0:
            return lambda u, u_next: u_next
        # dinosaur parametrises the filter by the e-folding time tau of its top total wavenumber L (the
        # clipped one, L = truncation + 1): rate(l) = (l (l + 1) / (L (L + 1)))^p / tau = nu (l (l + 1) / R^2)^p.
        top = grid.total_wavenumbers - 1
        tau_si = (RADIUS**2 / (top * (top + 1))) ** self.order / self.coefficient
        tau = specs.nondimensionalize(tau_si * UNITS.s)
        return ti.horizontal_diffusion_step_filter(grid, dt, tau=tau, order=self.order)

    @property
    def description(self) -> str:
        return f"hyperdiffusion -nu (-lap)^{self.order} on vorticity, divergence and height, nu = {self.coefficient:.6g} m^{2 * self.order}/s"


@dataclasses.dataclass(frozen=True)
class ExponentialFilter(SpectralFilter):
    """dinosaur's exponential filter: mode ``l`` times ``exp(-(dt / timescale) ((k - c) / (1 - c))^(2 order))``
    for ``k = l / L > c``, ``L`` the top total wavenumber (``time_integration.exponential_step_filter``).

    Attributes:
      timescale: seconds; dinosaur's default 75 s is an attenuation of 16 per 20-minute step.
      order: filter order.
      cutoff: fraction of ``L`` below which modes are untouched.
    """

    timescale: float = 0.010938 / (2 * OMEGA)  # dinosaur's default, in seconds (75.0 s)
    order: int = 18
    cutoff: float = 0.0

    def __post_init__(self):
        if not self.timescale > 0:
            raise ValueError(f"dissipation.exponential_timescale: expected a positive time in seconds, found {self.timescale!r}.")
        if self.order < 1:
            raise ValueError(f"dissipation.exponential_order: expected an integer >= 1, found {self.order!r}.")
        if not 0 <= self.cutoff < 1:
            raise ValueError(f"dissipation.exponential_cutoff: expected a value in [0, 1), found {self.cutoff!r}.")

    def step_filter(self, grid, dt, specs):
        tau = specs.nondimensionalize(self.timescale * UNITS.s)
        return ti.exponential_step_filter(grid, dt, tau=tau, order=self.order, cutoff=self.cutoff)

    @property
    def description(self) -> str:
        return (
            f"exponential filter exp(-(dt / {self.timescale:.6g} s) ((k - {self.cutoff:g}) / (1 - {self.cutoff:g}))^{2 * self.order}), "
            "k = total wavenumber / top total wavenumber"
        )


# ------------------------------------------------------------------------------------------------ solver


@dataclasses.dataclass(frozen=True)
class BumpParameters:
    """Per-trajectory bump parameters, each ``[B]`` float64: ``height`` (hpert, m), ``alpha`` and ``beta``
    (longitudinal and latitudinal widths, radians)."""

    height: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray

    def __post_init__(self):
        shapes = {np.shape(self.height), np.shape(self.alpha), np.shape(self.beta)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"bump parameters: expected three 1-D arrays of equal length, found shapes {sorted(shapes)}.")

    def __len__(self) -> int:
        return len(self.height)

    def __getitem__(self, index) -> BumpParameters:
        return BumpParameters(self.height[index], self.alpha[index], self.beta[index])


@dataclasses.dataclass(frozen=True)
class ShallowWaterSolver:
    """The rotating shallow-water equations on the Earth-sized sphere, solved with dinosaur (module docstring).

    A frozen, hashable value: its methods are jitted with the solver as a static argument, so one solver
    compiles once per input shape.

    Attributes:
      truncation: triangular truncation ``T`` (highest total wavenumber kept); 63 for the benchmark.
      latitude_nodes: Gaussian latitudes of the solver grid (longitudes: twice as many); 96 for the benchmark.
        Quadratic terms are alias-free when ``2 * latitude_nodes >= 3 T + 1``.
      dt: time step, seconds.
      mean_depth: ``H``, metres.
      jet_max_velocity: ``u_max`` of the Galewsky jet, m/s.
      dissipation: a :class:`SpectralFilter`.
    """

    truncation: int = 63
    latitude_nodes: int = 96
    dt: float = 1200.0
    mean_depth: float = 1e4
    jet_max_velocity: float = 80.0
    dissipation: SpectralFilter = Hyperdiffusion()

    def __post_init__(self):
        if self.truncation < 2:
            raise ValueError(f"truncation: expected an integer >= 2, found {self.truncation!r}.")
        if self.latitude_nodes < 4 or self.latitude_nodes % 2:
            raise ValueError(f"latitude_nodes: expected an even number >= 4, found {self.latitude_nodes!r}.")
        if 2 * self.latitude_nodes < 3 * self.truncation + 1:
            raise ValueError(
                f"latitude_nodes: expected >= (3 T + 1) / 2 = {(3 * self.truncation + 1) / 2:g} for alias-free "
                f"quadratic terms at truncation T = {self.truncation}, found {self.latitude_nodes}; "
                "raise latitude_nodes or lower truncation."
            )
        if not self.dt > 0:
            raise ValueError(f"solver_dt: expected a positive time step in seconds, found {self.dt!r}.")
        if not self.mean_depth > 0:
            raise ValueError(f"mean_depth: expected a positive depth in metres, found {self.mean_depth!r}.")
        if not self.jet_max_velocity >= 0:
            raise ValueError(f"jet_max_velocity: expected a value >= 0 in m/s, found {self.jet_max_velocity!r}.")

    # --- grids and units -----------------------------------------------------------------------------------

    @functools.cached_property
    def grid(self) -> sh.Grid:
        """The solver grid: Gaussian latitudes (ascending), ``2 n`` longitudes from 0, radius 1."""
        return sh.Grid.construct(
            max_wavenumber=self.truncation,
            gaussian_nodes=self.latitude_nodes // 2,
            spherical_harmonics_impl=sh.FastSphericalHarmonics,
        )

    @functools.cached_property
    def output_grid(self) -> sh.Grid:
        """The same spectral basis synthesised at equiangular cell-centre latitudes (ascending)."""
        return dataclasses.replace(self.grid, latitude_spacing="equiangular")

    @functools.cached_property
    def specs(self) -> sw.ShallowWaterSpecs:
        return sw.ShallowWaterSpecs.from_si()

    @property
    def longitudes(self) -> np.ndarray:
        """Longitudes of both grids in degrees, ``i * 360 / n_lon``."""
        return np.arange(2 * self.latitude_nodes) * (360.0 / (2 * self.latitude_nodes))

    @property
    def output_latitudes(self) -> np.ndarray:
        """Equiangular cell-centre latitudes in degrees, ``-90 + (j + 0.5) * 180 / n_lat`` (ascending)."""
        return -90.0 + (np.arange(self.latitude_nodes) + 0.5) * (180.0 / self.latitude_nodes)

    def _scale(self, unit) -> float:
        """SI value of one nondimensional unit of ``unit``."""
        return float(self.specs.dimensionalize(1.0, unit).magnitude)

    @property
    def _dt(self) -> float:
        return float(self.specs.nondimensionalize(self.dt * UNITS.s))

    @property
    def _reference_potential(self) -> np.ndarray:
        return np.array([self.specs.nondimensionalize(self.mean_depth * UNITS.m) * self.specs.g])

    def _coords(self) -> coordinate_systems.CoordinateSystem:
        return coordinate_systems.CoordinateSystem(self.grid, layer_coordinates.LayerCoordinates(1))

    def _step(self) -> Callable[[sw.State], sw.State]:
        equation = sw.ShallowWaterEquations(self._coords(), self.specs, None, self._reference_potential)
        step = ti.imex_rk_sil3(equation, self._dt)
        return ti.step_with_filters(step, [self.dissipation.step_filter(self.grid, self._dt, self.specs)])

    # --- initial state -------------------------------------------------------------------------------------

    def _balanced_jet(self) -> sw.State:
        """The Galewsky jet in discrete gradient-wind balance, modal ``[1, M, L]`` (global-mean depth ``H``)."""
        params = _GALEWSKY._replace(jet_max_velocity=np.array(self.jet_max_velocity) * UNITS.m / UNITS.s)
        params = jax.tree.map(self.specs.nondimensionalize, params)
        latitude = np.arcsin(self.grid.nodal_axes[1])
        u = sws.get_zonal_velocity(latitude, params)
        return sws.multi_layer(jnp.stack([u]), np.ones(1), self._coords())

    @functools.partial(jax.jit, static_argnums=0)
    def initial_state(self, height: Array, alpha: Array, beta: Array) -> sw.State:
        """The balanced jet plus one bump per trajectory.

        Args:
          height, alpha, beta: ``[B]`` bump amplitude (m) and widths (radians); a zero height gives the
            unperturbed jet.

        Returns:
          A modal ``State`` with leaves ``[B, 1, M, L]`` (the top total wavenumber zeroed, as the solver does).
        """
        jet = self._balanced_jet()
        lon, sin_lat = self.grid.nodal_mesh
        lat = np.arcsin(sin_lat)
        # longitude offset from the bump centre, wrapped to [-pi, pi) by dinosaur's periodic difference (only its
        # square enters, so this is the protocol's lon in (-pi, pi])
        dlon = sws.subtract_longitudes(lon, BUMP_LON)
        to_nd = float(self.specs.nondimensionalize(1.0 * UNITS.m)) * self.specs.g  # metres of depth -> potential

        def one(h, a, b):
            bump = h * np.cos(lat) * jnp.exp(-((dlon / a) ** 2)) * jnp.exp(-(((BUMP_LAT - lat) / b) ** 2))
            state = sw.State(jet.vorticity, jet.divergence, jet.potential + self.grid.to_modal(to_nd * bump)[None])
            return self.grid.clip_wavenumbers(state)

        f32 = lambda x: jnp.asarray(x, jnp.float32)
        return jax.vmap(one)(f32(height), f32(alpha), f32(beta))

    # --- time stepping -------------------------------------------------------------------------------------

    @functools.partial(jax.jit, static_argnums=(0, 2, 3))
    def advance(self, state: sw.State, num_records: int, steps_per_record: int) -> tuple[sw.State, sw.State]:
        """Integrate ``num_records * steps_per_record`` steps from the batched modal ``state`` (leaves ``[B, ...]``).

        Returns:
          ``(final, records)``: the final state and the states after each block of ``steps_per_record`` steps,
          leaves ``[B, num_records, ...]`` (the input state is not included).
        """
        trajectory = ti.trajectory_from_step(self._step(), num_records, steps_per_record)
        return jax.vmap(trajectory)(state)

    # --- output --------------------------------------------------------------------------------------------

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def nodal_fields(self, state: sw.State, grid: sh.Grid | None = None) -> dict[str, Array]:
        """Dimensional fields of modal states (leaves ``[..., 1, M, L]``) synthesised on ``grid``.

        Args:
          state: modal states with any leading batch dimensions.
          grid: a grid with the solver's spectral basis: :attr:`output_grid` (default; equiangular) or
            :attr:`grid` (the solver's Gaussian grid).

        Returns:
          ``{"height": m, "u": m/s, "v": m/s, "vorticity": 1/s}``, each ``[..., n_lat, n_lon]`` float32 with
          latitude ascending and longitude ``i * 360 / n_lon``.
        """
        grid = self.output_grid if grid is None else grid
        if (grid.longitude_wavenumbers, grid.total_wavenumbers) != (self.grid.longitude_wavenumbers, self.grid.total_wavenumbers):
            raise ValueError("grid: expected a grid with the solver's spectral basis (solver.grid or solver.output_grid).")
        lead = state.vorticity.shape[:-3]
        flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[-3:])[:, 0], state)  # [N, M, L]

        def one(s):
            u, v = sh.vor_div_to_uv_nodal(grid, s.vorticity, s.divergence)
            clipped = grid.clip_wavenumbers(s)
            return {
                "height": self.mean_depth + grid.to_nodal(clipped.potential) * (self._scale(UNITS.m**2 / UNITS.s**2) / GRAVITY),
                "u": u * self._scale(UNITS.m / UNITS.s),
                "v": v * self._scale(UNITS.m / UNITS.s),
                "vorticity": grid.to_nodal(clipped.vorticity) * self._scale(1 / UNITS.s),
            }

        fields = jax.vmap(one)(flat)  # [N, n_lon, n_lat]
        return {k: jnp.swapaxes(f, -1, -2).reshape(lead + f.shape[-1:] + f.shape[-2:-1]).astype(jnp.float32) for k, f in fields.items()}

    def fluid_volume(self, state: sw.State) -> np.ndarray:
        """The area integral of ``h`` (m^3; the mass divided by the density) by the solver grid's quadrature,
        which is exact for the truncated fields: ``[...]`` float64 for modal states with leaves ``[..., 1, M, L]``."""
        h = np.asarray(self.nodal_fields(state, self.grid)["height"], np.float64)  # [..., lat, lon]
        w = np.asarray(self.grid.quadrature_weights, np.float64).T  # [lat, lon], sums to 4 pi
        return np.einsum("...ij,ij->...", h, w) * RADIUS**2

    @functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
    def _trajectories(self, height, alpha, beta, first_snapshot: int, num_frames: int, steps_per_snapshot: int):
        state = self.initial_state(height, alpha, beta)
        if first_snapshot:
            step = ti.repeated(self._step(), first_snapshot * steps_per_snapshot)
            state = jax.vmap(step)(state)
        frames = jax.tree.map(lambda x: x[:, None], state)
        if num_frames > 1:
            _, records = self.advance(state, num_frames - 1, steps_per_snapshot)
            frames = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), frames, records)
        return self.nodal_fields(frames)

    def simulate(
        self, bumps: BumpParameters, num_frames: int = 14, steps_per_snapshot: int = 50, first_snapshot: int = 6
    ) -> dict[str, np.ndarray]:
        """Trajectories from the jet plus ``bumps``, sampled on the equiangular output grid.

        Snapshot ``k`` is the state after ``k * steps_per_snapshot`` steps (snapshot 0: the initial state);
        snapshots ``first_snapshot, ..., first_snapshot + num_frames - 1`` are returned, in one jitted call.

        Returns:
          ``{"height", "u", "v", "vorticity"}``, each ``[B, num_frames, n_lat, n_lon]`` float32 (SI units).

        Raises:
          ValueError: for ``num_frames < 1``, ``steps_per_snapshot < 1`` or ``first_snapshot < 0``.
        """
        if num_frames < 1 or steps_per_snapshot < 1 or first_snapshot < 0:
            raise ValueError(
                "expected num_frames >= 1, steps_per_snapshot >= 1 and first_snapshot >= 0, found "
                f"{num_frames}, {steps_per_snapshot} and {first_snapshot}."
            )
        out = self._trajectories(
            np.asarray(bumps.height), np.asarray(bumps.alpha), np.asarray(bumps.beta), first_snapshot, num_frames, steps_per_snapshot
        )
        return {k: np.asarray(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ coarsening


def _cell_edges(centres: np.ndarray, name: str, limit: float | None) -> np.ndarray:
    """Edges of a regular cell-centred axis (degrees), ``[n + 1]``, in the axis's own order."""
    centres = np.asarray(centres, np.float64)
    if centres.ndim != 1 or centres.size < 2:
        raise ValueError(f"{name}: expected a 1-D coordinate with at least 2 values, found shape {centres.shape}.")
    step = (centres[-1] - centres[0]) / (centres.size - 1)
    if step == 0 or not np.allclose(np.diff(centres), step, rtol=0, atol=1e-6 * abs(step)):
        raise ValueError(f"{name}: expected equally spaced cell centres (a regular grid), found spacings {np.unique(np.diff(centres))[:5]}.")
    edges = np.concatenate([centres - step / 2, centres[-1:] + step / 2])
    if limit is not None and np.abs(edges).max() > limit + 1e-6 * abs(step):
        raise ValueError(f"{name}: cells reach beyond +-{limit:g} degrees (edges {edges[0]:g} ... {edges[-1]:g}); expected cell centres.")
    return np.clip(edges, -limit, limit) if limit is not None else edges


def _coarsen_values(values: np.ndarray, lat_edges: np.ndarray, factor: int) -> np.ndarray:
    """Area-weighted ``factor x factor`` means of ``values [..., n_lat, n_lon]`` (computed in float64, summed in
    a fixed order, so equal inputs give bitwise-equal outputs whatever the leading shape)."""
    area = np.abs(np.diff(np.sin(np.deg2rad(lat_edges))))  # [n_lat], proportional to the exact cell areas
    area = area.reshape(-1, factor)
    total = area.sum(axis=1) * factor  # [n_lat / factor]: the coarse cells' areas, in the same units
    x = np.asarray(values, np.float64)
    out = np.zeros(x.shape[:-2] + (x.shape[-2] // factor, x.shape[-1] // factor))
    for i in range(factor):
        for j in range(factor):
            out += x[..., i::factor, j::factor] * area[:, i, None]
    return (out / total[:, None]).astype(values.dtype)


def coarsen_area_weighted(ds: xr.Dataset, factor: int = 2) -> xr.Dataset:
    """Coarsen a regular, cell-centred latitude-longitude grid by ``factor`` in each direction, area-weighted.

    Each coarse cell is the union of ``factor x factor`` fine cells and its value is their mean weighted by the
    exact cell areas (``R^2 dlon (sin(lat_north) - sin(lat_south))``), so area integrals and constants are
    preserved. Coarse coordinates are the coarse cells' centres (for the 192 x 96 grid and ``factor = 2``:
    latitude ``-90 + (j + 0.5) * 3.75``, longitude ``0.9375 + 3.75 i``).

    Args:
      ds: a Dataset with 1-D coordinates ``latitude`` and ``longitude`` (degrees, equally spaced cell centres, in
        either order); every data variable or coordinate on both dimensions is coarsened (they must be the last
        two dimensions, in either order), everything else is copied. The input is not modified.
      factor: cells per coarse cell along each axis; must divide both grid sizes.

    Returns:
      The coarsened Dataset (same variables, dtypes and attributes; a ``coarsening`` global attribute added).

    Raises:
      ValueError: if the grid is not regular, a size is not divisible by ``factor``, or a variable has the grid
        dimensions in an unsupported place.
    """
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor: expected a positive integer, found {factor!r}.")
    for dim in ("latitude", "longitude"):
        if dim not in ds.dims or dim not in ds.coords or ds[dim].dims != (dim,):
            raise ValueError(f"expected a dimension '{dim}' with a 1-D coordinate variable; found dimensions {list(ds.dims)}.")
        if ds.sizes[dim] % factor:
            raise ValueError(f"{dim}: {ds.sizes[dim]} cells are not divisible by factor {factor}.")
    lat_edges = _cell_edges(ds["latitude"].values, "latitude", 90.0)
    lon_edges = _cell_edges(ds["longitude"].values, "longitude", None)
    coarse_lat_edges, coarse_lon_edges = lat_edges[::factor], lon_edges[::factor]
    coarse_lat = (coarse_lat_edges[:-1] + coarse_lat_edges[1:]) / 2
    coarse_lon = (coarse_lon_edges[:-1] + coarse_lon_edges[1:]) / 2

    out = ds.drop_vars([n for n, v in ds.variables.items() if {"latitude", "longitude"} & set(v.dims)])
    for name, var in ds.variables.items():
        dims = var.dims
        if name in ("latitude", "longitude") or not {"latitude", "longitude"} & set(dims):
            continue
        if dims[-2:] not in (("latitude", "longitude"), ("longitude", "latitude")):
            raise ValueError(f"variable '{name}' has dimensions {dims}; expected (..., latitude, longitude) as its last two.")
        if not np.issubdtype(var.dtype, np.floating):
            raise ValueError(f"variable '{name}' has dtype {var.dtype}; only floating-point fields can be averaged.")
        values = var.values
        swap = dims[-1] == "latitude"
        if swap:
            values = np.swapaxes(values, -1, -2)
        coarse = _coarsen_values(values, lat_edges, factor)
        if swap:
            coarse = np.swapaxes(coarse, -1, -2)
        target = out.coords if name in ds.coords else out
        target[name] = (dims, coarse, dict(var.attrs))
    out = out.assign_coords(
        latitude=("latitude", coarse_lat, dict(ds["latitude"].attrs)),
        longitude=("longitude", coarse_lon, dict(ds["longitude"].attrs)),
    )
    out = out[list(ds.data_vars)]  # original variable order
    for name in ds.data_vars:
        out[name].encoding = {}
    out.attrs = dict(ds.attrs)
    out.attrs["coarsening"] = (
        f"{factor} x {factor} area-weighted mean (weights: exact cell areas) of the {ds.sizes['longitude']} x "
        f"{ds.sizes['latitude']} (longitude x latitude) grid"
    )
    return out


# ------------------------------------------------------------------------------------------------ config


class DissipationKind(enum.Enum):
    hyperdiffusion = "hyperdiffusion"
    exponential = "exponential"


@dataclasses.dataclass(frozen=True)
class DissipationConfig:
    """``kind``: ``hyperdiffusion`` (:class:`Hyperdiffusion`, the default) or ``exponential``
    (:class:`ExponentialFilter`); the fields of the other kind are ignored."""

    kind: DissipationKind = DissipationKind.hyperdiffusion
    hyperdiffusion_coefficient: float = DEFAULT_HYPERDIFFUSION
    hyperdiffusion_order: int = 2
    exponential_timescale: float = ExponentialFilter.timescale
    exponential_order: int = 18
    exponential_cutoff: float = 0.0

    def build(self) -> SpectralFilter:
        """The :class:`SpectralFilter` this config names (the string is resolved here, once)."""
        if self.kind is DissipationKind.hyperdiffusion:
            return Hyperdiffusion(self.hyperdiffusion_coefficient, self.hyperdiffusion_order)
        return ExponentialFilter(self.exponential_timescale, self.exponential_order, self.exponential_cutoff)


@dataclasses.dataclass(frozen=True)
class BumpConfig:
    """Uniform ranges of the bump ``height cos(lat) exp(-(lon / alpha)^2) exp(-((pi/4 - lat) / beta)^2)``:
    ``height`` in metres, ``alpha`` and ``beta`` in radians."""

    height_min: float = 90.0
    height_max: float = 150.0
    alpha_min: float = 2.0 / 9.0
    alpha_max: float = 4.0 / 9.0
    beta_min: float = 2.0 / 45.0
    beta_max: float = 4.0 / 45.0

    def __post_init__(self):
        for name in ("height", "alpha", "beta"):
            low, high = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            positive = name != "height"
            if not (low <= high and (low > 0 if positive else low >= 0)):
                raise ValueError(
                    f"bump.{name}_min/{name}_max: expected {'0 < ' if positive else '0 <= '}min <= max, found ({low!r}, {high!r})."
                )


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """One split: ``num_trajectories`` with seeds ``seed_offset + i`` (``seed_mode: train``) or
    ``2**31 - 1 - seed_offset - i`` (``test``)."""

    num_trajectories: int = 16
    seed_mode: SeedMode = SeedMode.train
    seed_offset: int = 0


_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class ShallowWaterConfig:
    """A shallow-water dataset: physics, numerics, initial conditions, frames, grids and splits.

    Validated on construction (``ValueError`` naming the field). Defaults are the ENF-PDE protocol.

    Attributes:
      generator: must be ``shallow_water`` (the key the CLI dispatches dataset YAMLs on).
      name: dataset name (recorded in the files).
      truncation, latitude_nodes: the solver's spectral truncation and Gaussian grid (T63 on 192 x 96); the
        native output grid is equiangular with the same size.
      solver_dt: seconds (1200).
      mean_depth, jet_max_velocity: ``H`` (m) and ``u_max`` (m/s) of the Galewsky jet.
      dissipation: :class:`DissipationConfig`.
      bump: :class:`BumpConfig`, the ranges of the random bump.
      steps_per_snapshot, dropped_snapshots, num_frames: snapshot ``k`` is the state after
        ``k * steps_per_snapshot`` steps (snapshot 0 the initial state); snapshots ``dropped_snapshots, ...,
        dropped_snapshots + num_frames - 1`` are the frames.
      coarsen_factor: the training grid is the native grid coarsened ``factor x factor`` (area-weighted).
      batch_size: trajectories per jitted solver call. Part of the recipe: XLA's matmul blocking, hence the
        round-off, depends on the batch shape, and the flow amplifies round-off (another batch size changes the
        last frame by up to 0.6 m of height and 0.06 m/s of wind). Each call is padded to exactly
        ``batch_size``, so a trajectory's values never depend on its neighbours, its position, the split size or
        the number of workers.
      splits: split name -> :class:`SplitConfig`; each becomes ``<output_dir>/<name>.nc`` (coarse grid).
      native_splits: splits also written at the native grid, as ``<output_dir>/<name>_native.nc``.
      output_dir: where the files go (relative paths are relative to the current working directory).
    """

    generator: str = GENERATOR
    name: str = "shallow_water"
    truncation: int = 63
    latitude_nodes: int = 96
    solver_dt: float = 1200.0
    mean_depth: float = 1e4
    jet_max_velocity: float = 80.0
    dissipation: DissipationConfig = dataclasses.field(default_factory=DissipationConfig)
    bump: BumpConfig = dataclasses.field(default_factory=BumpConfig)
    steps_per_snapshot: int = 50
    dropped_snapshots: int = 6
    num_frames: int = 14
    coarsen_factor: int = 2
    batch_size: int = 2
    splits: Dict[str, SplitConfig] = dataclasses.field(
        default_factory=lambda: {"train": SplitConfig(512, SeedMode.train), "test": SplitConfig(128, SeedMode.test)}
    )
    native_splits: List[str] = dataclasses.field(default_factory=lambda: ["test"])
    output_dir: str = "data/shallow_water"

    def __post_init__(self):
        def fail(field: str, expected: str, found) -> None:
            raise ValueError(f"{field}: expected {expected}, found {found!r}.")

        if self.generator != GENERATOR:
            fail("generator", f"{GENERATOR!r} (this file is read by enfpde.data.shallow_water)", self.generator)
        self.solver()  # validates the grid, dt, depth, jet and dissipation
        if self.steps_per_snapshot < 1:
            fail("steps_per_snapshot", ">= 1", self.steps_per_snapshot)
        if self.dropped_snapshots < 0:
            fail("dropped_snapshots", ">= 0", self.dropped_snapshots)
        if self.num_frames < 1:
            fail("num_frames", ">= 1", self.num_frames)
        if self.coarsen_factor < 1 or self.latitude_nodes % self.coarsen_factor:
            fail("coarsen_factor", f"a positive divisor of latitude_nodes = {self.latitude_nodes}", self.coarsen_factor)
        if self.batch_size < 1:
            fail("batch_size", ">= 1", self.batch_size)
        if not self.splits:
            fail("splits", "at least one split", dict(self.splits))
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
        for name in self.native_splits:
            if name not in self.splits:
                fail("native_splits", f"names of splits in {sorted(self.splits)}", name)
            if f"{name}_native" in self.splits:
                fail("native_splits", f"no split named '{name}_native' beside it (the file names would collide)", name)
        if len(set(self.native_splits)) != len(self.native_splits):
            fail("native_splits", "each split at most once", list(self.native_splits))

    def solver(self) -> ShallowWaterSolver:
        return ShallowWaterSolver(
            self.truncation, self.latitude_nodes, self.solver_dt, self.mean_depth, self.jet_max_velocity, self.dissipation.build()
        )

    @property
    def frame_interval_hours(self) -> float:
        return self.steps_per_snapshot * self.solver_dt / 3600.0

    @property
    def first_frame_hours(self) -> float:
        """Model time of frame 0 (hours since the initial state)."""
        return self.dropped_snapshots * self.frame_interval_hours

    def frame_times(self) -> np.ndarray:
        """Frame times in hours since the first kept frame, ``[num_frames]`` float64."""
        return np.arange(self.num_frames) * self.frame_interval_hours

    def seeds(self, split: str) -> np.ndarray:
        s = self._split(split)
        return split_seeds(s.seed_mode, s.num_trajectories, s.seed_offset)

    def _split(self, split: str) -> SplitConfig:
        try:
            return self.splits[split]
        except KeyError:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; it has {sorted(self.splits)}.") from None


def draw_bump_parameters(seeds, bump: BumpConfig = BumpConfig()) -> BumpParameters:
    """The bump of each trajectory: ``numpy.random.default_rng(seed)`` draws ``height, alpha, beta`` (in that
    order) uniformly from ``bump``'s ranges. A trajectory's bump depends on its seed only."""
    draws = np.array(
        [np.random.default_rng(int(s)).uniform(size=3) for s in np.asarray(seeds).reshape(-1)], np.float64
    ).reshape(-1, 3)
    lerp = lambda u, low, high: low + u * (high - low)
    return BumpParameters(
        lerp(draws[:, 0], bump.height_min, bump.height_max),
        lerp(draws[:, 1], bump.alpha_min, bump.alpha_max),
        lerp(draws[:, 2], bump.beta_min, bump.beta_max),
    )


def load_config(
    source: Union[str, os.PathLike, Mapping, ShallowWaterConfig], overrides: Mapping | None = None
) -> ShallowWaterConfig:
    """Read a dataset config: YAML file (or mapping) -> validated :class:`ShallowWaterConfig`.

    Keys not in the file take the protocol defaults. A ``splits`` entry replaces the default splits as a
    whole. Unknown keys and values of the wrong type are errors.

    Args:
      source: a YAML path, a mapping with the same structure, or a config (returned with ``overrides`` applied).
      overrides: a mapping merged over the file, key by key (e.g. ``{"splits": {"train": {"num_trajectories": 2}}}``).

    Raises:
      ValueError: naming the file and the offending key or value.
    """
    where, user, _ = read_config_source(source, ShallowWaterConfig)
    try:
        if overrides:
            user = OmegaConf.merge(user, OmegaConf.create(dict(overrides)))
        base = OmegaConf.structured(ShallowWaterConfig)
        OmegaConf.set_readonly(base, False)
        if "splits" in user:
            base.splits = {}
        merged = OmegaConf.merge(base, user)
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        key = getattr(error, "full_key", None)
        raise ValueError(f"{where}: {message}" + (f" (at {key!r})" if key else "") + ".") from None
    try:
        return OmegaConf.to_object(merged)  # runs ShallowWaterConfig.__post_init__, the value checks
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


# ------------------------------------------------------------------------------------------------ generation


def _batches(num: int, batch_size: int) -> list[slice]:
    """Consecutive batches of ``batch_size`` trajectories (the last one may be shorter; it is padded when run)."""
    return [slice(a, min(a + batch_size, num)) for a in range(0, num, batch_size)]


def _default_workers() -> int:
    # One XLA:CPU call of this solver keeps about 1.5 of 2 cores busy; two concurrent calls fill the machine
    # (benchmarks/results/shallow_water.md). An accelerator takes one batch at a time.
    return min(os.cpu_count() or 1, 2) if jax.default_backend() == "cpu" else 1


def _metadata(config: ShallowWaterConfig, split: str, native: bool) -> dict:
    s = config.splits[split]
    solver = config.solver()
    n_lat = config.latitude_nodes
    n_lon = 2 * n_lat
    f = config.coarsen_factor
    grid_text = (
        f"equiangular cell-centred {n_lon} x {n_lat} (longitude x latitude): longitude i * {360 / n_lon:g} deg, "
        f"latitude -90 + (j + 0.5) * {180 / n_lat:g} deg, ascending; exact spectral synthesis of the solver state"
    )
    if not native:
        grid_text = (
            f"equiangular cell-centred {n_lon // f} x {n_lat // f} (longitude x latitude), latitude ascending: each cell "
            f"the area-weighted mean (weights: exact cell areas) of its {f} x {f} cells of the native grid, which is "
            + grid_text
        )
    b = config.bump
    return {
        "Conventions": "CF-1.10",
        "title": f"{config.name}: rotating shallow water on the sphere, Galewsky jet with a random bump, split {split!r}"
        + (" (native grid)" if native else ""),
        "source": f"enfpde {_package_version()} with dinosaur {_dinosaur_version()} (spectral shallow-water equations)",
        "references": "REFERENCE.md section 3; Galewsky, Scott & Polvani 2004 (Tellus 56A); Yin et al. 2023 (DINo); Knigge et al. 2024 (ENF-PDE)",
        "comment": "Generated by enfpde.data.shallow_water; the resolved config is in the attribute 'config'.",
        "equation": "d_t v + (zeta + f) k x v + grad(g h + |v|^2/2) = D(v), d_t h + div(h v) = D(h), f = 2 Omega sin(lat)",
        "numerics": (
            f"dinosaur spectral transform, vorticity-divergence form, triangular truncation T{config.truncation} on a "
            f"{n_lon} x {n_lat} Gaussian grid, imex_rk_sil3, dt = {config.solver_dt:g} s, float32"
        ),
        "dissipation": solver.dissipation.description,
        "dataset": config.name,
        "split": split,
        "grid": grid_text,
        "attribute_units": "gravity_acceleration m s-2, angular_velocity s-1, radius m, mean_depth m, jet_max_velocity m s-1, "
        "latitudes and longitudes radian, bump_height_range m, bump_alpha_range and bump_beta_range radian",
        "gravity_acceleration": GRAVITY,
        "angular_velocity": OMEGA,
        "radius": RADIUS,
        "mean_depth": config.mean_depth,
        "jet_max_velocity": config.jet_max_velocity,
        "jet_southern_latitude": JET_SOUTHERN_LAT,
        "jet_northern_latitude": JET_NORTHERN_LAT,
        "bump_center_longitude": BUMP_LON,
        "bump_center_latitude": BUMP_LAT,
        "bump_formula": "hpert cos(lat) exp(-(lon / alpha)^2) exp(-((pi/4 - lat) / beta)^2), lon in (-pi, pi], radians",
        "bump_height_range": np.array([b.height_min, b.height_max]),
        "bump_alpha_range": np.array([b.alpha_min, b.alpha_max]),
        "bump_beta_range": np.array([b.beta_min, b.beta_max]),
        "truncation": config.truncation,
        "solver_grid": f"Gaussian {n_lon} x {n_lat}",
        "solver_dt_seconds": config.solver_dt,
        "steps_per_snapshot": config.steps_per_snapshot,
        "dropped_snapshots": config.dropped_snapshots,
        "snapshot_rule": "snapshot k = state after k * steps_per_snapshot steps (snapshot 0 = initial state); frames = snapshots dropped_snapshots, ...",
        "first_frame_hours_since_initialisation": config.first_frame_hours,
        "frame_interval_hours": config.frame_interval_hours,
        "num_frames": config.num_frames,
        "coarsen_factor": 1 if native else f,
        "seed_mode": s.seed_mode.value,
        "seed_offset": s.seed_offset,
        "seed_rule": "train: seed = seed_offset + i, test: seed = 2**31 - 1 - seed_offset - i; bump (hpert, alpha, beta) = "
        "numpy.random.default_rng(seed).uniform(size=3) mapped to the ranges",
        "dinosaur_version": _dinosaur_version(),
        "config": OmegaConf.to_yaml(OmegaConf.structured(config)),
    }


def _to_dataset(config: ShallowWaterConfig, split: str, fields: dict[str, np.ndarray], bumps: BumpParameters, native: bool) -> xr.Dataset:
    solver = config.solver()
    lat, lon = solver.output_latitudes, solver.longitudes
    if not native:
        f = config.coarsen_factor
        lat_edges = _cell_edges(lat, "latitude", 90.0)[::f]
        lon_edges = _cell_edges(lon, "longitude", None)[::f]
        lat, lon = (lat_edges[:-1] + lat_edges[1:]) / 2, (lon_edges[:-1] + lon_edges[1:]) / 2
    seeds = config.seeds(split)
    dims = ("trajectory", "time", "latitude", "longitude")
    data = {}
    for name, (long_name, standard_name, units) in VARIABLES.items():
        attrs = {"long_name": long_name, "standard_name": standard_name, "units": units}
        if not native:
            attrs["cell_methods"] = "area: mean"
        data[name] = (dims, fields[name], attrs)
    return xr.Dataset(
        data,
        coords={
            "trajectory": ("trajectory", np.arange(len(seeds), dtype=np.int64), {"long_name": "trajectory index"}),
            "time": (
                "time",
                config.frame_times(),
                {"long_name": f"time since the first kept frame ({config.first_frame_hours:g} h after initialisation)", "units": "hours", "axis": "T"},
            ),
            "latitude": ("latitude", lat, {"long_name": "latitude (cell centre)", "standard_name": "latitude", "units": "degrees_north", "axis": "Y"}),
            "longitude": ("longitude", lon, {"long_name": "longitude (cell centre)", "standard_name": "longitude", "units": "degrees_east", "axis": "X"}),
            "seed": ("trajectory", seeds, {"long_name": "seed of the trajectory's random bump"}),
            "bump_height": ("trajectory", bumps.height, {"long_name": "amplitude hpert of the initial height bump", "units": "m"}),
            "bump_alpha": ("trajectory", bumps.alpha, {"long_name": "longitudinal width alpha of the initial height bump", "units": "radian"}),
            "bump_beta": ("trajectory", bumps.beta, {"long_name": "latitudinal width beta of the initial height bump", "units": "radian"}),
        },
        attrs=_metadata(config, split, native),
    )


class _Cancelled(Exception):
    """Raised in a worker before its next batch once the generation has failed or been interrupted."""


def _run_split(
    config: ShallowWaterConfig, split: str, keep_native: bool, progress: bool, workers: int | None
) -> tuple[xr.Dataset, xr.Dataset | None]:
    """Integrate one split: (coarse Dataset, native Dataset or None). Batches are coarsened as they finish, so
    only the coarse fields of a split that is not kept native are held in memory."""
    solver = config.solver()
    seeds = config.seeds(split)
    bumps = draw_bump_parameters(seeds, config.bump)
    n, t = len(seeds), config.num_frames
    n_lat, n_lon = config.latitude_nodes, 2 * config.latitude_nodes
    f = config.coarsen_factor
    lat_edges = _cell_edges(solver.output_latitudes, "latitude", 90.0)
    coarse = {k: np.empty((n, t, n_lat // f, n_lon // f), np.float32) for k in VARIABLES}
    native = {k: np.empty((n, t, n_lat, n_lon), np.float32) for k in VARIABLES} if keep_native else None
    workers = workers or _default_workers()
    batches = _batches(n, config.batch_size)
    stop = threading.Event()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=split, unit=" traj")

    def run(batch: slice) -> None:
        if stop.is_set():
            raise _Cancelled
        # Every call gets exactly batch_size trajectories (the last batch padded with copies of its last one):
        # one compiled shape, and a trajectory's bits depend on the batch size only, never on its neighbours,
        # its position or the number of workers (XLA's matmul blocking, hence rounding, depends on the shape).
        index = np.minimum(np.arange(batch.start, batch.start + config.batch_size), batch.stop - 1)
        fields = solver.simulate(bumps[index], config.num_frames, config.steps_per_snapshot, config.dropped_snapshots)
        count = batch.stop - batch.start
        for k, values in fields.items():
            values = values[:count]
            coarse[k][batch] = _coarsen_values(values, lat_edges, f)
            if native is not None:
                native[k][batch] = values

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(len(batches), workers))
    try:
        futures = {pool.submit(run, b): b for b in batches}
        for future in concurrent.futures.as_completed(futures):
            future.result()
            if bar is not None:
                b = futures[future]
                bar.update(b.stop - b.start)
    except BaseException:
        stop.set()  # batches not yet started are skipped (Ctrl-C returns after the running ones)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    coarse_ds = _to_dataset(config, split, coarse, bumps, native=False)
    native_ds = None if native is None else _to_dataset(config, split, native, bumps, native=True)
    return coarse_ds, native_ds


def generate_split(
    config: Union[str, os.PathLike, Mapping, ShallowWaterConfig],
    split: str,
    *,
    native: bool = False,
    progress: bool = False,
    workers: int | None = None,
) -> xr.Dataset:
    """Generate one split in memory.

    Args:
      config: a :class:`ShallowWaterConfig` or anything :func:`load_config` reads.
      split: the split's name in ``config.splits``.
      native: return the native-grid fields (192 x 96) instead of the coarse training grid (96 x 48).
      progress: show a tqdm bar (trajectories).
      workers: concurrent solver calls (default: 2 on a CPU, 1 on an accelerator). Results do not depend on it.

    Returns:
      An ``xarray.Dataset`` with ``height``, ``u``, ``v``, ``vorticity`` ``[trajectory, time, latitude,
      longitude]`` float32; coordinates ``trajectory``, ``time`` (hours), ``latitude``, ``longitude`` (degrees),
      and ``seed``, ``bump_height``, ``bump_alpha``, ``bump_beta`` on ``trajectory``; the physical parameters as
      global attributes (CF-1.10).
    """
    config = config if isinstance(config, ShallowWaterConfig) else load_config(config)
    config._split(split)
    coarse, fine = _run_split(config, split, native, progress, workers)
    return fine if native else coarse


def generate_dataset(
    config_path_or_config: Union[str, os.PathLike, Mapping, ShallowWaterConfig],
    output_dir: Union[str, os.PathLike, None] = None,
    overwrite: bool = False,
    progress: bool = True,
    *,
    workers: int | None = None,
) -> dict[str, Path]:
    """Generate every split of a dataset config: ``<output_dir>/<split>.nc`` on the coarse training grid, and
    ``<output_dir>/<split>_native.nc`` on the native grid for the splits in ``native_splits`` (netCDF-4, CF-1.10).

    The native and coarse files of a split hold the same trajectories and frames (the coarse file is the
    :func:`coarsen_area_weighted` of the native one). All target files are checked before anything is computed,
    and each file is written to a temporary file in the same directory and renamed into place, so an interrupted
    run leaves no partial file. Files contain no timestamps: the same config gives byte-identical files.

    Args:
      config_path_or_config: a dataset YAML path, a mapping, or a :class:`ShallowWaterConfig`.
      output_dir: overrides the config's ``output_dir``; relative paths are relative to the working directory.
      overwrite: replace existing files.
      progress: show tqdm progress bars (trajectories per split).
      workers: concurrent solver calls (see :func:`generate_split`).

    Returns:
      file key (``"train"``, ``"test"``, ``"test_native"``, ...) -> path of its file.

    Raises:
      FileExistsError: if a target file exists and ``overwrite`` is false (nothing is computed or written).
      ValueError: for an invalid config.
    """
    config = config_path_or_config
    config = config if isinstance(config, ShallowWaterConfig) else load_config(config)
    directory = Path(config.output_dir if output_dir is None else output_dir)
    targets: dict[str, Path] = {}
    for split in config.splits:
        targets[split] = (directory / f"{split}.nc").absolute()
        if split in config.native_splits:
            targets[f"{split}_native"] = (directory / f"{split}_native.nc").absolute()
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"refusing to overwrite existing file(s) {', '.join(existing)}; pass overwrite=True "
            "(enfpde generate --overwrite) to replace them, or choose another output_dir."
        )
    directory.mkdir(parents=True, exist_ok=True)
    for split in config.splits:
        coarse, native = _run_split(config, split, split in config.native_splits, progress, workers)
        write_netcdf_atomic(coarse, targets[split], list(VARIABLES), overwrite=overwrite)
        if native is not None:
            write_netcdf_atomic(native, targets[f"{split}_native"], list(VARIABLES), overwrite=overwrite)
    return targets
