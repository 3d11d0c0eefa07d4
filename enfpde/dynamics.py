"""The latent vector field ``F_psi``: PONITA-style equivariant message passing on the latent point cloud.

Given latents ``z = {(p_i, c_i, s_i)}`` the network returns ``dz/dt = (dp/dt, dc/dt)``; widths do not evolve.

* Edges carry the pose-pose bi-invariant ``a(p_i, p_j)`` (``geometry.pose_bi_invariant``), embedded with
  random Fourier features and an MLP into one kernel per block (a depthwise, PONITA-style convolution:
  ``m_i = mean_j k_ij * W h_j``). The graph is fully connected, restricted to a kernel radius, or sparse:
  each latent hears only its ``k_nearest`` nearest latents (itself included), chosen anew at every evaluation
  by the invariant pose distance. Edge work then scales with ``N k`` instead of ``N^2``: with 64 latents the
  dense edges are most of a stage-2 step (benchmarks/bench_dynamics.py).
* Node features start from the (invariant) contexts; blocks are pre-norm residual: LayerNorm, message
  passing, then a pointwise MLP.
* Context velocities are read out from the invariant node features.
* Pose velocities are built equivariantly: ``v_i = sum_j w_ij disp(p_i, p_j) / n + sum_k u_ik d_k(p_i)``
  with invariant weights ``w_ij`` (from edge and node features), the geometry's relative displacements and
  the directions the group leaves fixed (``geometry.fixed_directions``, e.g. the polar axis on the axial
  sphere). Hence ``F(g z) = g . F(z)``.
* Both read-outs are multiplied by a learned scale that starts at ``output_scale`` (near zero), so an
  untrained model is a near-identity flow.
* With ``standardize_contexts`` the network sees the contexts standardised per channel by fixed statistics of
  the fitted training latents (``set_context_statistics``, called by the trainer before the dynamics stage)
  and predicts context velocities in those units. Meta-SGD fits a field by small moves away from a shared
  initial context (all ones), so the raw contexts are a large constant plus a small field-dependent part;
  without the standardisation the network starts nearly blind to that part and learns far more slowly.

Reference: Bekkers et al., "Fast, Expressive SE(n) Equivariant Networks through Weight-Sharing in
Position-Orientation Space" (PONITA, ICLR 2024); Knigge, Wessels et al., NeurIPS 2024.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from enfpde.field import RandomFourierFeatures
from enfpde.geometry import Geometry
from enfpde.latents import Latents

Array = jax.Array


class ContextStatistics(nnx.Variable):
    """Fixed per-channel statistics of fitted contexts: set from training data, never trained."""


class Edges(NamedTuple):
    """What the message passing of :class:`EquivariantDynamics` needs from the poses alone (``edges``).

    ``neighbour_poses [B, N, K, P]`` (fully connected: ``[B, 1, N, P]``, shared by every row), ``index [B, N, K]``
    of the latents heard (None when fully connected), the edge embedding ``edge [B, N, K, hidden]``, the mask
    ``neighbours [B, N, K]`` (kernel radius), ``count [B, N, 1]`` of latents heard and one depthwise kernel
    ``[B, N, K, hidden]`` per block."""

    neighbour_poses: Array
    index: Array | None
    edge: Array
    neighbours: Array
    count: Array
    kernels: tuple[Array, ...]

    def gather(self, x: Array) -> Array:
        """Per-latent features ``[B, N, F]`` onto the edges: ``[B, N, K, F]`` (fully connected: ``[B, 1, N, F]``)."""
        if self.index is None:
            return x[:, None]
        return jax.vmap(lambda x, i: x[i])(x, self.index)


class EquivariantDynamics(nnx.Module):
    """PONITA-style equivariant message passing network defining ``dz/dt = F(z)``.

    Args:
        geometry: the domain and its symmetry group.
        latent_dim: context dimension.
        num_hidden: node and kernel width.
        num_layers: message-passing blocks.
        widening_factor: hidden width multiplier of the pointwise MLP in each block.
        num_frequencies, basis_std: random Fourier basis of the edge bi-invariants.
        kernel_radius: only latents closer than this (geometry distance) exchange messages; ``None`` is
            fully connected.
        k_nearest: each latent receives messages from its ``k_nearest`` nearest latents only (itself
            included; the nearest by geometry distance, which the group preserves); ``None`` is every latent.
        output_scale: initial value of the learned scale of both velocity read-outs.
        standardize_contexts: standardise the contexts with fixed statistics (see the module docstring).
        move_poses: ``False``: only the contexts evolve; every latent keeps the pose it was fitted at (pose
            velocities are zero, and :func:`enfpde.rollout.rollout` integrates the contexts alone). Still
            equivariant: the poses of ``g z`` are ``g p`` at every time and the context rates are invariant.
        rngs: random streams for the initialisation.
    """

    def __init__(
        self,
        geometry: Geometry,
        *,
        latent_dim: int,
        num_hidden: int = 128,
        num_layers: int = 3,
        widening_factor: int = 2,
        num_frequencies: int = 32,
        basis_std: float = 1.0,
        kernel_radius: float | None = None,
        k_nearest: int | None = None,
        output_scale: float = 1e-3,
        standardize_contexts: bool = False,
        move_poses: bool = True,
        rngs: nnx.Rngs,
    ):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, found {num_layers}.")
        if k_nearest is not None and k_nearest < 1:
            raise ValueError(f"k_nearest must be a positive integer or None, found {k_nearest}.")
        self.geometry, self.kernel_radius, self.k_nearest = geometry, kernel_radius, k_nearest
        self.move_poses = move_poses
        self.basis = RandomFourierFeatures(geometry.pose_invariant_dim, num_frequencies, basis_std, rngs=rngs)
        self.basis_mlp = nnx.Sequential(
            nnx.Linear(2 * num_frequencies, num_hidden, rngs=rngs), jax.nn.gelu, nnx.Linear(num_hidden, num_hidden, rngs=rngs), jax.nn.gelu
        )
        self.embed = nnx.Linear(latent_dim, num_hidden, rngs=rngs)
        self.kernels = nnx.List([nnx.Linear(num_hidden, num_hidden, rngs=rngs) for _ in range(num_layers)])
        self.messages = nnx.List([nnx.Linear(num_hidden, num_hidden, rngs=rngs) for _ in range(num_layers)])
        self.norms = nnx.List([nnx.LayerNorm(num_hidden, rngs=rngs) for _ in range(num_layers)])
        self.mlps = nnx.List(
            [
                nnx.Sequential(
                    nnx.LayerNorm(num_hidden, rngs=rngs),
                    nnx.Linear(num_hidden, widening_factor * num_hidden, rngs=rngs),
                    jax.nn.gelu,
                    nnx.Linear(widening_factor * num_hidden, num_hidden, rngs=rngs),
                )
                for _ in range(num_layers)
            ]
        )
        self.out_norm = nnx.LayerNorm(num_hidden, rngs=rngs)
        self.context_out = nnx.Linear(num_hidden, latent_dim, rngs=rngs)
        self.edge_weight = nnx.Linear(num_hidden, 1, rngs=rngs)
        # One weight per direction the group leaves fixed (none for most geometries).
        num_fixed = geometry.fixed_directions(geometry.initial_poses(1)).shape[-2]
        self.fixed_weight = nnx.Linear(num_hidden, num_fixed, rngs=rngs) if num_fixed else None
        self.context_scale = nnx.Param(jnp.asarray(output_scale, jnp.float32))
        self.pose_scale = nnx.Param(jnp.asarray(output_scale, jnp.float32))
        if standardize_contexts:  # identity until set_context_statistics
            self.context_mean = ContextStatistics(jnp.zeros((latent_dim,), jnp.float32))
            self.context_std = ContextStatistics(jnp.ones((latent_dim,), jnp.float32))
        else:
            self.context_mean = self.context_std = None

    def set_context_statistics(self, contexts: Array) -> None:
        """Standardise with the mean and standard deviation per channel of ``contexts [..., latent_dim]`` (fitted
        training latents). A channel that does not vary keeps a floor of 1e-6 times the mean spread."""
        if self.context_mean is None:
            raise ValueError("this dynamics model was built without standardize_contexts.")
        flat = jnp.asarray(contexts, jnp.float32).reshape(-1, contexts.shape[-1])
        std = flat.std(axis=0)
        self.context_mean[...] = flat.mean(axis=0)
        self.context_std[...] = jnp.maximum(std, 1e-6 * std.mean() + 1e-12)

    def _neighbours(self, poses: Array) -> tuple[Array, Array | None]:
        """The poses each latent hears from and their indices: ``[B, N, K, P]`` and ``[B, N, K]`` (None when
        fully connected, where ``K = N`` and the neighbour poses are ``[B, 1, N, P]``, shared by every row)."""
        g, n = self.geometry, poses.shape[1]
        if self.k_nearest is None:
            return poses[:, None, :], None
        dist2 = g.squared_distance(poses[:, :, None, : g.coord_dim], poses[:, None, :])  # [B, N, N]
        # Which latents are heard is a discrete choice: no gradient flows through it.
        _, index = jax.lax.top_k(-jax.lax.stop_gradient(dist2), min(self.k_nearest, n))  # [B, N, K]
        return jax.vmap(lambda p, i: p[i])(poses, index), index

    def edges(self, poses: Array) -> Edges:
        """Everything the message passing needs from the poses ``[B, N, P]`` alone (see :class:`Edges`).

        With poses that do not move (``move_poses=False``) this is the same at every evaluation of a rollout:
        :func:`enfpde.rollout.rollout` computes it once per solve, so the edge MLPs and their backward pass run
        once instead of once per solver step."""
        g = self.geometry
        p_i = poses[:, :, None]  # [B, N, 1, P]
        p_j, index = self._neighbours(poses)  # [B, N or 1, K, P]; K = N when fully connected
        edge = self.basis_mlp(self.basis(g.pose_bi_invariant(p_i, p_j)))  # [B, N, K, hidden]
        if self.kernel_radius is None:
            neighbours = jnp.ones(edge.shape[:3], edge.dtype)
        else:
            dist2 = g.squared_distance(p_i[..., : g.coord_dim], p_j)
            neighbours = (dist2 <= self.kernel_radius**2).astype(edge.dtype)
        count = jnp.maximum(neighbours.sum(axis=2, keepdims=True), 1.0)  # [B, N, 1]
        kernels = tuple(kernel(edge) * neighbours[..., None] for kernel in self.kernels)  # each [B, N, K, hidden]
        return Edges(p_j, index, edge, neighbours, count, kernels)

    def node_features(self, contexts: Array, edges: Edges) -> Array:
        """The invariant node features ``[B, N, hidden]`` after the message-passing blocks, from the contexts
        ``[B, N, latent_dim]`` and the poses' :meth:`edges`."""
        if self.context_mean is not None:
            contexts = (contexts - self.context_mean[...]) / self.context_std[...]
        h = self.embed(contexts)  # [B, N, hidden]
        for k, message, norm, mlp in zip(edges.kernels, self.messages, self.norms, self.mlps):
            m = message(norm(h))  # [B, N, hidden]
            if edges.index is None:
                h = h + jnp.einsum("bijf,bjf->bif", k, m) / edges.count
            else:
                h = h + jnp.einsum("bijf,bijf->bif", k, edges.gather(m)) / edges.count
            h = h + mlp(h)
        return self.out_norm(h)

    def context_velocity(self, contexts: Array, edges: Edges) -> Array:
        """``dc/dt [B, N, latent_dim]`` at ``contexts [B, N, latent_dim]``, given the poses' :meth:`edges`."""
        return self._context_rate(self.node_features(contexts, edges))

    def _context_rate(self, h: Array) -> Array:
        context_rate = self.context_scale[...] * self.context_out(h)
        if self.context_std is not None:  # predicted in standardised units
            context_rate = context_rate * self.context_std[...]
        return context_rate

    def __call__(self, z: Latents) -> Latents:
        """The velocity ``dz/dt`` at ``z`` (batch ``[B]``), as Latents: pose velocities ``[B, N, tangent_dim]``
        (tangent at each pose), context velocities ``[B, N, latent_dim]``, zero width velocities."""
        g = self.geometry
        edges = self.edges(z.poses)
        h = self.node_features(z.contexts, edges)
        context_rate = self._context_rate(h)
        if not self.move_poses:
            return Latents(jnp.zeros(z.poses.shape[:-1] + (g.tangent_dim,), z.poses.dtype), context_rate, jnp.zeros_like(z.widths))
        # Invariant scalar weights on each edge, from the edge embedding and both endpoints' features.
        w = self.edge_weight(edges.edge * (h[:, :, None] + edges.gather(h)))[..., 0] * edges.neighbours  # [B, N, K]
        disp = g.relative_displacement(z.poses[:, :, None], edges.neighbour_poses)  # [B, N, K, T], equivariant
        pose_rate = jnp.einsum("bij,bijt->bit", w, disp) / edges.count
        if self.fixed_weight is not None:
            fixed = g.fixed_directions(z.poses)  # [B, N, K, T]
            pose_rate = pose_rate + jnp.einsum("bik,bikt->bit", self.fixed_weight(h), fixed)
        pose_rate = g.project_tangent(z.poses, self.pose_scale[...] * pose_rate)
        return Latents(pose_rate, context_rate, jnp.zeros_like(z.widths))
