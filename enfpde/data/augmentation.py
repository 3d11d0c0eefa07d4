"""Training-data augmentation by a symmetry of the PDE that the model's group does not contain.

The torus geometry makes the model equivariant to translations only. The ENF-PDE Navier-Stokes protocol is
also invariant under quarter turns about the origin: its forcing ``A (cos 2 pi k x + cos 2 pi k y)`` is, and
vorticity is a scalar under rotations (not under reflections, which flip its sign and the forcing's). A quarter
turn of a training trajectory is therefore another valid trajectory, and each training trajectory gives four.

A field on points ``x_m`` turned by ``k`` quarter turns is ``w_k(x) = w(R^-k x)`` with ``R (x, y) = (-y, x)``
(coordinates modulo the period), i.e. a permutation of the points when they form a grid that the turn maps
onto itself. This module finds those permutations; ``BatchSampler`` applies them. :func:`turn_points` turns
points themselves (any points), for the forecaster's average over the four turns (``model.forecast_ensemble``).
"""

from __future__ import annotations

import numpy as np

QUARTER_TURN_FORCINGS = ("cosine",)  # forcing kinds (file attribute ``forcing_kind``) invariant under quarter turns


def quarter_turn_permutations(coords: np.ndarray, periods: tuple[float, ...]) -> np.ndarray:
    """Point permutations of the four quarter turns about the origin of a square 2-torus.

    Args:
        coords: points ``[M, 2]`` (x, y) in ``[0, L)^2``.
        periods: the torus periods; both must be equal.

    Returns:
        ``[4, M]`` integers: ``values[..., perm[k], :]`` is the field turned by ``k`` quarter turns, for values
        ``[..., M, C]`` at ``coords``.

    Raises:
        ValueError: for a non-square or non-2-D torus, or points that a quarter turn does not map onto points.
    """
    coords = np.asarray(coords, np.float64)
    if len(periods) != 2 or coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"quarter turns need a 2-D torus and points [M, 2]; found periods {periods} and points {coords.shape}.")
    if not np.isclose(periods[0], periods[1]):
        raise ValueError(f"quarter turns need a square torus; the periods are {periods}.")
    L = float(periods[0])
    # Points as integer keys on a lattice 1e6 times finer than the period, so matching ignores float noise.
    scale, period = 1e6 / L, 1_000_000
    key_of = lambda x, y: (int(round(x * scale)) % period, int(round(y * scale)) % period)
    keys = {key_of(x, y): m for m, (x, y) in enumerate(coords)}
    if len(keys) != len(coords):
        raise ValueError("quarter turns need distinct points; some coordinates repeat.")
    perms = np.empty((4, len(coords)), np.int64)
    perms[0] = np.arange(len(coords))
    # R^-1 (x, y) = (y, -x): the source point of every target point after one turn.
    source = np.stack([coords[:, 1], np.mod(-coords[:, 0], L)], axis=1)
    one = np.empty(len(coords), np.int64)
    for m, (x, y) in enumerate(source):
        key = key_of(x, y)
        if key not in keys:
            raise ValueError(
                f"the points are not mapped onto themselves by a quarter turn: ({coords[m, 0]:.6g}, {coords[m, 1]:.6g}) "
                f"turned back is ({x:.6g}, {y:.6g}), which is not a point. Quarter-turn augmentation needs a square grid."
            )
        one[m] = keys[key]
    for k in range(1, 4):
        perms[k] = perms[k - 1][one]
    return perms


def check_quarter_turn_data(attributes: dict, variables: list[str]) -> None:
    """Refuse quarter-turn augmentation for data that is not known to be invariant: several variables (vector
    components would have to turn too) or a forcing the file names and that is not invariant."""
    if len(variables) != 1:
        raise ValueError(f"quarter-turn augmentation turns one scalar field; the training file has variables {variables}.")
    forcing = attributes.get("forcing_kind")
    if forcing is not None and forcing not in QUARTER_TURN_FORCINGS:
        raise ValueError(
            f"quarter-turn augmentation needs a PDE invariant under quarter turns; the training file's forcing is "
            f"'{forcing}' (invariant: {', '.join(QUARTER_TURN_FORCINGS)})."
        )


def turn_points(coords: np.ndarray, periods: tuple[float, ...], turns: int) -> np.ndarray:
    """Points ``[M, 2]`` of a square 2-torus turned ``turns`` times by ``R (x, y) = (-y, x)`` (modulo the period).

    Observing a field ``w`` at the turned points ``R^k x_m`` is observing the turned field ``w_k = w o R^-k`` at
    ``x_m``' images, so a forecast from (and decoded at) turned points is a forecast of the turned field, read
    back at the original points.
    """
    coords = np.asarray(coords)
    if len(periods) != 2 or coords.ndim != 2 or coords.shape[1] != 2 or not np.isclose(periods[0], periods[1]):
        raise ValueError(f"quarter turns need a square 2-D torus and points [M, 2]; found periods {periods} and points {coords.shape}.")
    L = periods[0]
    for _ in range(turns % 4):
        coords = np.stack([np.mod(-coords[:, 1], L), coords[:, 0]], axis=1)
    return coords
