"""The latent point cloud ``z = {(p_i, c_i, s_i)}``: poses, context vectors and Gaussian window widths."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from enfpde.geometry import Geometry

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Latents:
    """A batch of latent point clouds, a JAX pytree.

    Attributes:
        poses: ``[..., N, pose_dim]`` poses on the geometry (see :class:`enfpde.geometry.Geometry`).
        contexts: ``[..., N, latent_dim]`` invariant context vectors.
        widths: ``[..., N]`` Gaussian window widths, in the geometry's distance units.
    """

    poses: Array
    contexts: Array
    widths: Array

    @property
    def num_latents(self) -> int:
        return self.poses.shape[-2]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.poses.shape[:-2]

    def replace(self, **changes) -> "Latents":
        return dataclasses.replace(self, **changes)

    def transform(self, geometry: Geometry, g: Array) -> "Latents":
        """``g z``: poses moved by the group element, contexts and widths unchanged (they are invariant)."""
        return self.replace(poses=geometry.act_on_poses(g, self.poses))


def initial_latents(
    geometry: Geometry,
    num_latents: int,
    latent_dim: int,
    *,
    batch_shape: tuple[int, ...] = (),
    width_factor: float = 1.0,
    context_value: float = 1.0,
) -> Latents:
    """The regular initial arrangement: poses from ``geometry.initial_poses``, contexts all equal to
    ``context_value`` and widths ``width_factor`` times the latent spacing, broadcast to ``batch_shape``."""
    if num_latents < 1 or latent_dim < 1:
        raise ValueError(f"num_latents and latent_dim must be positive, found {num_latents} and {latent_dim}.")
    poses = geometry.initial_poses(num_latents)
    contexts = jnp.full((num_latents, latent_dim), context_value, jnp.float32)
    widths = geometry.initial_widths(num_latents, width_factor)
    expand = lambda a: jnp.broadcast_to(a, batch_shape + a.shape)
    return Latents(expand(poses), expand(contexts), expand(widths))
