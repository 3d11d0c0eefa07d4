"""Forecasting with encoder + dynamics + decoder on arrays: fit ``z0`` to an initial state, integrate it to
any times, decode at any coordinates (zero-shot temporal and spatial super-resolution)."""

from __future__ import annotations

import diffrax
import jax

from enfpde.dynamics import EquivariantDynamics
from enfpde.encoder import MetaSGDEncoder
from enfpde.field import EquivariantNeuralField
from enfpde.latents import Latents
from enfpde.rollout import rollout

Array = jax.Array


def decode_trajectory(field: EquivariantNeuralField, zs: Latents, coords: Array) -> Array:
    """Decode latents with batch ``[T, B]`` at ``coords [Q, D]``: returns ``[T, B, Q, C]``.

    One frame at a time (``lax.map``): memory and the decoder's working set stay those of one frame.
    """
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
) -> Array:
    """Forecast fields from an observed initial state.

    Args:
        coords: internal coordinates of the observations ``[M, D]``.
        initial_values: the initial state ``[B, M, C]`` at time 0 (NaN allowed where ``mask`` is False).
        times: ``[T]`` increasing output times (frame units of the training data; any values).
        query_coords: where to decode ``[Q, D]`` (any resolution).
        mask: ``[B, M]`` observed points.
        solver, dt0, stepsize_controller: see :func:`enfpde.rollout.rollout`.

    Returns:
        ``[T, B, Q, C]``.
    """
    z0 = encoder(field, coords, initial_values, mask, key=key)
    zs = rollout(dynamics, z0, times, solver=solver, dt0=dt0, stepsize_controller=stepsize_controller)
    return decode_trajectory(field, zs, query_coords)
