"""enfpde: equivariant, space-time continuous PDE forecasting with Equivariant Neural Fields in JAX."""

from enfpde import _xla  # noqa: F401  (first: XLA:CPU settings must precede the backend's creation)

from enfpde.encoder import AutoDecoder, MetaSGDEncoder, fit_latents, masked_mse
from enfpde.field import EquivariantNeuralField
from enfpde.geometry import AbsolutePosition, AxialSphere, Geometry, Plane, PlaneSE2, Sphere, Torus
from enfpde.latents import Latents, initial_latents

__all__ = [
    "AbsolutePosition",
    "AutoDecoder",
    "AxialSphere",
    "EquivariantNeuralField",
    "Geometry",
    "Latents",
    "MetaSGDEncoder",
    "Plane",
    "PlaneSE2",
    "Sphere",
    "Torus",
    "fit_latents",
    "initial_latents",
    "masked_mse",
]
