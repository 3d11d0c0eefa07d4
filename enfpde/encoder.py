"""Fitting latents ``z`` to observed fields: Meta-SGD (the method) and auto-decoding (the ablation).

Meta-SGD (Li et al. 2017, as used by ENF-PDE): start every field from shared initial latents and take ``K``
gradient steps on the reconstruction error at the observed points, with learned per-parameter step sizes
(one for the poses, one per context channel), clipped to ``lr_bounds``. The outer loss differentiates
through the inner steps (second order by default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from enfpde.field import EquivariantNeuralField
from enfpde.geometry import Geometry
from enfpde.latents import Latents, initial_latents

Array = jax.Array


def masked_mse(pred: Array, target: Array, mask: Array | None = None) -> Array:
    """Mean squared error per field, over observed points and channels.

    Args:
        pred, target: ``[B, M, C]``.
        mask: ``[B, M]`` booleans, True where observed; ``None`` means all observed. Unobserved targets may
            hold NaN: they are never read.

    Returns:
        ``[B]``.
    """
    err = (pred - target) ** 2
    if mask is None:
        return err.mean(axis=(1, 2))
    err = jnp.where(mask[..., None], err, 0.0)
    count = mask.sum(axis=1) * pred.shape[-1]
    return err.sum(axis=(1, 2)) / jnp.maximum(count, 1)


def check_observations(field: EquivariantNeuralField, coords: Array, values: Array, mask: Array | None) -> None:
    """Shape checks shared by the encoders (trace time, so they cost nothing at run time)."""
    D, C = field.geometry.coord_dim, field.num_out
    if values.ndim != 3 or values.shape[-1] != C:
        raise ValueError(f"values: expected shape [B, M, {C}] (batch, points, channels), found {values.shape}.")
    B, M = values.shape[:2]
    if coords.shape not in ((M, D), (B, M, D)):
        raise ValueError(
            f"coords: expected shape [{M}, {D}] or [{B}, {M}, {D}] to match values {values.shape}, found {coords.shape}."
        )
    if mask is not None and mask.shape != (B, M):
        raise ValueError(f"mask: expected shape [{B}, {M}] to match values {values.shape}, found {mask.shape}.")


def point_order(key: Array, batch: int, num_points: int, mask: Array | None = None) -> Array:
    """A random order of the points of each field, observed points first: ``[B, M]`` indices."""
    score = jax.random.uniform(key, (batch, num_points))
    if mask is not None:
        score = score + 2.0 * (~mask)  # unobserved points sort last
    return jnp.argsort(score, axis=1)


def take_points(idx: Array, coords: Array, values: Array, mask: Array | None):
    """The points ``idx [B, S]`` of each field: ``coords [M, D] | [B, M, D]``, ``values [B, M, C]``,
    ``mask [B, M] | None`` -> ``[B, S, ...]``."""
    B = values.shape[0]
    coords = jnp.broadcast_to(coords, (B,) + coords.shape[-2:])
    take = lambda t: jnp.take_along_axis(t, idx.reshape(idx.shape + (1,) * (t.ndim - 2)), axis=1)
    return take(coords), take(values), None if mask is None else take(mask)


def _subset(key: Array, coords: Array, values: Array, mask: Array | None, size: int):
    """A random subset of ``size`` points per field, observed points first. Returns ``[B, S, ...]``."""
    B, M = values.shape[:2]
    return take_points(point_order(key, B, M, mask)[:, :size], coords, values, mask)


class MetaSGDEncoder(nnx.Module):
    """Fits latents to observations with ``num_inner_steps`` Meta-SGD steps.

    Args:
        geometry: the domain; supplies the initial arrangement and how poses move.
        num_latents, latent_dim: ``N`` and the context dimension.
        num_inner_steps: ``K``, the steps the stage-1 loss differentiates through.
        fit_steps: the steps of every other fit (a call without ``steps``: forecasts, the dynamics stages);
            ``None``: ``K``. Steps past ``K`` repeat the learned step sizes, i.e. plain gradient descent
            continued from the Meta-SGD fit: it keeps lowering the error at a few gradients' cost each.
        inner_points: number of random observed points per inner step; ``None`` uses all given points.
        pose_lr, context_lr: initial inner step sizes (poses; every context channel). The pose step is
            ``pose_lr * spacing^2 * grad``, with ``spacing`` the latent spacing of the geometry: a gradient
            scales as 1 / length and a step as length, so this makes ``pose_lr`` independent of the domain's
            units (it equals the reference implementation's setting for 4 latents on ``[-1, 1]^2``).
        lr_bounds: the learned step sizes are clipped to this range.
        learn_poses: if False the poses stay at the initial arrangement (inner step size 0).
        first_order: stop gradients through the inner gradients (first-order MAML); cheaper, less accurate.
        disjoint_subsets: with ``inner_points``, inner step ``k`` fits points ``k S .. (k+1) S - 1`` of one random
            order of the points (:meth:`subset_order`), so the steps see disjoint subsets; the points after them
            are left for an outer loss (:func:`enfpde.training.reconstruction_loss`).
            False: an independent random subset per step.
        outer_points: with ``inner_points`` and independent subsets, the stage-1 loss is measured on an independent
            random draw of this many points (:meth:`outer_subset`), as the released code does; ``None``: on every
            given point.
        width_factor: window width as a multiple of the latent spacing.
    """

    def __init__(
        self,
        geometry: Geometry,
        *,
        num_latents: int,
        latent_dim: int,
        num_inner_steps: int = 3,
        fit_steps: int | None = None,
        inner_points: int | None = None,
        pose_lr: float = 1.0,
        context_lr: float = 5.0,
        lr_bounds: tuple[float, float] = (1e-6, 10.0),
        learn_poses: bool = True,
        first_order: bool = False,
        width_factor: float = 1.0,
        disjoint_subsets: bool = False,
        outer_points: int | None = None,
    ):
        if num_inner_steps < 0:
            raise ValueError(f"num_inner_steps must be >= 0, found {num_inner_steps}.")
        if fit_steps is not None and fit_steps < 0:
            raise ValueError(f"fit_steps must be >= 0 (or None for num_inner_steps), found {fit_steps}.")
        if not 0 < lr_bounds[0] < lr_bounds[1]:
            raise ValueError(f"lr_bounds must be (low, high) with 0 < low < high, found {lr_bounds}.")
        self.geometry = geometry
        self.num_latents, self.latent_dim = num_latents, latent_dim
        self.num_inner_steps, self.inner_points = num_inner_steps, inner_points
        self.fit_steps = num_inner_steps if fit_steps is None else fit_steps
        self.lr_bounds, self.learn_poses, self.first_order = tuple(lr_bounds), learn_poses, first_order
        self.width_factor = width_factor
        self.disjoint_subsets = disjoint_subsets
        if outer_points is not None and (inner_points is None or disjoint_subsets or outer_points < 1):
            raise ValueError(
                f"outer_points = {outer_points} needs inner_points with independent subsets (disjoint_subsets False) "
                f"and must be >= 1; found inner_points = {inner_points}, disjoint_subsets = {disjoint_subsets}."
            )
        self.outer_points = outer_points
        # Inference only (the Forecaster sets it): compute each inner gradient over chunks of this many points,
        # so memory is bounded by a chunk instead of growing with the number of observed points. None: one piece.
        self.grad_chunk_size: int | None = None
        # One context vector shared by every latent: z_init is then mapped onto itself by any symmetry that
        # permutes the initial arrangement, which end-to-end equivariance needs.
        self.initial_context = nnx.Param(jnp.ones((latent_dim,), jnp.float32))
        self.pose_lr = nnx.Param(jnp.asarray(pose_lr, jnp.float32))
        self.context_lr = nnx.Param(jnp.full((latent_dim,), context_lr, jnp.float32))

    def initial(self, batch_size: int) -> Latents:
        """The shared starting point ``z_init`` for ``batch_size`` fields."""
        z = initial_latents(
            self.geometry, self.num_latents, self.latent_dim, batch_shape=(batch_size,), width_factor=self.width_factor
        )
        return z.replace(contexts=jnp.broadcast_to(self.initial_context[...], z.contexts.shape))

    def subset_order(self, key: Array, values: Array, mask: Array | None) -> Array:
        """The random order ``[B, M]`` whose consecutive slices of ``inner_points`` are the inner steps' subsets
        when ``disjoint_subsets`` (a pure function of ``key``: the outer loss recomputes it)."""
        return point_order(key, values.shape[0], values.shape[1], mask)

    def outer_subset(self, key: Array, coords: Array, values: Array, mask: Array | None):
        """The points the stage-1 loss is measured on when ``outer_points`` is set: a random draw of that many
        points per field, independent of the inner steps' draws (which use ``jax.random.split(key, K)``).
        Returns ``[B, outer_points, ...]`` coords, values and mask."""
        return _subset(jax.random.fold_in(key, self.num_inner_steps), coords, values, mask, self.outer_points)

    def step_sizes(self) -> tuple[Array, Array]:
        """The clipped inner step sizes ``(pose [], context [latent_dim])``."""
        lo, hi = self.lr_bounds
        return jnp.clip(self.pose_lr[...], lo, hi), jnp.clip(self.context_lr[...], lo, hi)

    def __call__(
        self,
        field: EquivariantNeuralField,
        coords: Array,
        values: Array,
        mask: Array | None = None,
        *,
        key: Array | None = None,
        steps: int | None = None,
    ) -> Latents:
        """Fit latents to observed values.

        Args:
            field: the decoder.
            coords: internal coordinates ``[M, D]`` (shared) or ``[B, M, D]``.
            values: observations ``[B, M, C]``; may hold NaN where ``mask`` is False.
            mask: ``[B, M]`` booleans, True where observed; ``None`` means all observed.
            key: PRNG key for the random point subsets (required when ``inner_points`` < M).
            steps: gradient steps; ``None``: ``fit_steps`` (the stage-1 loss passes ``num_inner_steps``).

        Returns:
            Latents with batch shape ``[B]``.
        """
        check_observations(field, coords, values, mask)
        B, M = values.shape[:2]
        if mask is not None:
            values = jnp.where(mask[..., None], values, 0.0)
        subsample = self.inner_points is not None and self.inner_points < M
        if subsample and key is None:
            raise ValueError(f"a PRNG key is needed to draw {self.inner_points} of {M} points per inner step.")
        pose_lr, context_lr = self.step_sizes()
        pose_lr = pose_lr * self.geometry.latent_spacing(self.num_latents) ** 2
        z = self.initial(B)

        def inner_loss(poses, contexts, c, v, m):
            pred = field(c, z.replace(poses=poses, contexts=contexts))
            return masked_mse(pred, v, m).sum()  # sum over fields: each field's gradient is its own

        poses, contexts = z.poses, z.contexts
        S, K = self.inner_points, self.fit_steps if steps is None else steps
        if subsample and self.disjoint_subsets:
            if K * S > M:
                raise ValueError(
                    f"disjoint inner subsets need num_inner_steps x inner_points = {K} x {S} <= {M} points, the number given."
                )
            order = self.subset_order(key, values, mask)
            subsets = [take_points(order[:, k * S : (k + 1) * S], coords, values, mask) for k in range(K)]
        elif subsample:
            keys = jax.random.split(key, max(K, 1))
            subsets = [_subset(keys[k], coords, values, mask, S) for k in range(K)]
        else:
            subsets = [(coords, values, mask)] * K
        for step in range(K):  # K is small and static: unrolled on purpose
            c, v, m = subsets[step]
            if self.grad_chunk_size is not None and v.shape[1] > self.grad_chunk_size:
                g_poses, g_contexts = self._chunked_gradient(field, z, poses, contexts, c, v, m)
            else:
                g_poses, g_contexts = jax.grad(inner_loss, argnums=(0, 1))(poses, contexts, c, v, m)
            if self.first_order:
                g_poses, g_contexts = jax.lax.stop_gradient((g_poses, g_contexts))
            if self.learn_poses:
                poses = self.geometry.move(poses, -pose_lr * g_poses)
            contexts = contexts - context_lr * g_contexts
        return z.replace(poses=poses, contexts=contexts)


    def _chunked_gradient(self, field, z: Latents, poses, contexts, coords, values, mask):
        """The inner loss's gradient ``(d poses, d contexts)`` as a sum over chunks of ``grad_chunk_size`` points
        (a ``lax.scan`` whose steps each take their own gradient, so no chunk's activations outlive it).

        Equal to the one-piece gradient up to float summation order: the per-field loss is a mean over observed
        points and channels, i.e. a sum of squared errors divided by one count, and a sum splits over chunks."""
        B, M, C = values.shape
        S = self.grad_chunk_size
        count = (jnp.full((B,), M, values.dtype) if mask is None else mask.sum(axis=1).astype(values.dtype)) * C
        observed = jnp.ones((B, M), bool) if mask is None else mask
        num_chunks = -(-M // S)
        pad = num_chunks * S - M
        # Padded points are unobserved: they add nothing to the sums.
        values = jnp.pad(values, ((0, 0), (0, pad), (0, 0)))
        observed = jnp.pad(observed, ((0, 0), (0, pad)))
        coords = jnp.pad(coords, [(0, 0)] * (coords.ndim - 2) + [(0, pad), (0, 0)], mode="edge")
        chunk = lambda x, axis: jnp.moveaxis(x.reshape(x.shape[:axis] + (num_chunks, S) + x.shape[axis + 1 :]), axis, 0)
        chunks = (chunk(coords, coords.ndim - 2), chunk(values, 1), chunk(observed, 1))

        def chunk_loss(p, ctx, c, v, m):
            err = (field(c, z.replace(poses=p, contexts=ctx)) - v) ** 2
            return jnp.sum(jnp.where(m[..., None], err, 0.0).sum(axis=(1, 2)) / jnp.maximum(count, 1))

        def add_chunk(total, part):
            grads = jax.grad(chunk_loss, argnums=(0, 1))(poses, contexts, *part)
            return jax.tree.map(jnp.add, total, grads), None

        zero = (jnp.zeros_like(poses), jnp.zeros_like(contexts))
        return jax.lax.scan(add_chunk, zero, chunks)[0]


class AutoDecoder(nnx.Module):
    """Auto-decoding (the ablation): one free latent cloud per training field, trained jointly with the
    decoder by the outer optimiser. Unseen fields are fitted with :func:`fit_latents`.

    Args:
        geometry: the domain.
        num_fields: number of training fields (the size of the table).
        num_latents, latent_dim: ``N`` and the context dimension.
        width_factor: window width as a multiple of the latent spacing.
    """

    def __init__(self, geometry: Geometry, *, num_fields: int, num_latents: int, latent_dim: int, width_factor: float = 1.0):
        self.geometry = geometry
        z = initial_latents(geometry, num_latents, latent_dim, batch_shape=(num_fields,), width_factor=width_factor)
        self.poses = nnx.Param(jnp.asarray(z.poses))
        self.contexts = nnx.Param(jnp.asarray(z.contexts))
        self.widths = nnx.Variable(jnp.asarray(z.widths))

    def __call__(self, field_ids: Array) -> Latents:
        """Latents of the fields ``field_ids [B]`` (integers), poses projected onto the domain."""
        poses = self.geometry.project(self.poses[...][field_ids])
        return Latents(poses, self.contexts[...][field_ids], self.widths[...][field_ids])


def fit_latents(
    field: EquivariantNeuralField,
    z_init: Latents,
    coords: Array,
    values: Array,
    mask: Array | None = None,
    *,
    num_steps: int = 300,
    optimizer: optax.GradientTransformation | None = None,
) -> Latents:
    """Fit latents to observations by plain optimisation (test-time auto-decoding), decoder frozen.

    Pose updates are applied with ``geometry.move`` so poses stay on the domain.

    Args:
        field: the decoder (not updated).
        z_init: starting latents, batch ``[B]``.
        coords, values, mask: as in :meth:`MetaSGDEncoder.__call__`.
        num_steps: optimisation steps (a ``lax.scan``).
        optimizer: an optax transformation; Adam with step 1e-2 by default.

    Returns:
        The fitted latents.
    """
    check_observations(field, coords, values, mask)
    optimizer = optimizer or optax.adam(1e-2)
    if mask is not None:
        values = jnp.where(mask[..., None], values, 0.0)
    geometry = field.geometry
    trainable = (z_init.poses, z_init.contexts)

    def loss(params):
        poses, contexts = params
        return masked_mse(field(coords, z_init.replace(poses=poses, contexts=contexts)), values, mask).sum()

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = (geometry.move(params[0], updates[0]), params[1] + updates[1])
        return (params, opt_state), None

    (params, _), _ = jax.lax.scan(step, (trainable, optimizer.init(trainable)), None, length=num_steps)
    return z_init.replace(poses=params[0], contexts=params[1])
