"""Losses and jitted train steps.

Stage 1 (reconstruction, REFERENCE section 1): fit ``z`` to every frame with the Meta-SGD encoder and
train the decoder and the inner step sizes on the reconstruction error at the same points, differentiating
through the inner loop.

Stage 2 (dynamics): with the decoder and encoder frozen, fit ``z0`` to frame 0 only, integrate it over the
training horizon and train the latent dynamics on the error of the decoded trajectory at every frame.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from enfpde.dynamics import EquivariantDynamics
from enfpde.encoder import MetaSGDEncoder, masked_mse, take_points
from enfpde.field import EquivariantNeuralField
from enfpde.forecaster import forecast_fields

Array = jax.Array


class NeuralFieldAutoencoder(nnx.Module):
    """The stage-1 model: a decoder and the Meta-SGD encoder that fits its latents."""

    def __init__(self, field: EquivariantNeuralField, encoder: MetaSGDEncoder):
        self.field = field
        self.encoder = encoder

    def reconstruct(self, coords: Array, values: Array, mask: Array | None = None, *, key: Array | None = None) -> Array:
        """Fit latents to ``values [B, M, C]`` at ``coords`` and decode them at the same points."""
        z = self.encoder(self.field, coords, values, mask, key=key)
        return self.field(coords, z)


def reconstruction_loss(model: NeuralFieldAutoencoder, coords, values, mask=None, *, key=None) -> Array:
    """Stage-1 loss: mean over fields of the masked MSE of the Meta-SGD reconstruction. ``values [B, M, C]``.

    With disjoint inner subsets (``encoder.disjoint_subsets``) and points left over after them, the loss is
    measured on those held-out points only: the decoder is trained to represent the whole field from a fit to
    other points of it. With ``encoder.outer_points`` (independent inner draws) it is measured on one more
    independent draw of that many points, as in the released code. Otherwise on every given point."""
    encoder = model.encoder
    z = encoder(model.field, coords, values, mask, key=key, steps=encoder.num_inner_steps)
    S, K, M = encoder.inner_points, encoder.num_inner_steps, values.shape[1]
    if encoder.disjoint_subsets and S is not None and K * S < M:
        held_out = encoder.subset_order(key, values, mask)[:, K * S :]
        coords, values, mask = take_points(held_out, coords, values, mask)
    elif encoder.outer_points is not None and S is not None and S < M and encoder.outer_points < M:
        coords, values, mask = encoder.outer_subset(key, coords, values, mask)
    return masked_mse(model.field(coords, z), values, mask).mean()


def learning_rate_schedule(
    learning_rate: float, num_steps: int, *, warmup_steps: int = 0, decay: str = "constant", final_fraction: float = 0.0
) -> float | optax.Schedule:
    """The learning rate of a stage of ``num_steps`` steps: a float when it is constant, else an optax schedule
    of the stage's own step count: linear warmup from 0 over ``warmup_steps``, then constant or a cosine down to
    ``learning_rate * final_fraction`` at step ``num_steps``."""
    if warmup_steps == 0 and decay == "constant":
        return learning_rate
    if decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=learning_rate,
            warmup_steps=warmup_steps,
            decay_steps=max(num_steps, warmup_steps + 1),
            end_value=learning_rate * final_fraction,
        )
    if decay != "constant":
        raise ValueError(f"decay must be 'constant' or 'cosine', found {decay!r}.")
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)], [warmup_steps]
    )


def default_optimizer(
    learning_rate: float | optax.Schedule = 1e-4, clip_norm: float = 1.0, weight_decay: float = 1e-4
) -> optax.GradientTransformation:
    """AdamW with global-norm gradient clipping (REFERENCE section 1); ``learning_rate`` may be a schedule."""
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(learning_rate, weight_decay=weight_decay))


@dataclasses.dataclass
class TrainState:
    """Trainable parameters, the other model state (fixed frequencies, ...) and the optimiser state."""

    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState


def make_stage1_step(
    model: NeuralFieldAutoencoder, optimizer: optax.GradientTransformation, *, num_microbatches: int = 1
) -> tuple[Callable, TrainState, nnx.GraphDef]:
    """A jitted stage-1 train step over split (graphdef, state); see DEPENDENCIES.md on why not ``nnx.jit``.

    The step is ``step(params, opt_state, rest, coords [M, D], values [B, M, C], key, mask=None)
    -> (params, opt_state, loss)`` where ``B`` counts fields (flatten batch x frames) and ``mask [B, M]`` marks
    observed points.

    With ``num_microbatches > 1`` the fields are split into that many equal groups whose gradients are
    accumulated in a ``lax.scan``: the same result (the loss is a mean over fields) with the peak memory of
    one group.

    Returns:
        ``(step, initial TrainState, graphdef)``; ``nnx.merge(graphdef, params, rest)`` rebuilds the model.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, coords, values, key, mask):
        return reconstruction_loss(nnx.merge(graphdef, params, rest), coords, values, mask, key=key)

    def value_and_grad(params, rest, coords, values, key, mask):
        if num_microbatches == 1:
            return jax.value_and_grad(loss_fn)(params, rest, coords, values, key, mask)
        if values.shape[0] % num_microbatches:
            raise ValueError(f"{values.shape[0]} fields do not split into {num_microbatches} equal micro-batches.")
        split = lambda x: None if x is None else x.reshape((num_microbatches, -1) + x.shape[1:])
        keys = jax.random.split(key, num_microbatches)

        def accumulate(total, group):
            values, key, mask = group
            loss, grads = jax.value_and_grad(loss_fn)(params, rest, coords, values, key, mask)
            return jax.tree.map(jnp.add, total, (loss, grads)), None

        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(accumulate, zero, (split(values), keys, split(mask)))
        return jax.tree.map(lambda t: t / num_microbatches, (loss, grads))

    @jax.jit
    def step(params, opt_state, rest, coords, values, key, mask=None):
        loss, grads = value_and_grad(params, rest, coords, values, key, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, TrainState(params, rest, optimizer.init(params)), graphdef


def trajectory_loss(
    field: EquivariantNeuralField,
    encoder: MetaSGDEncoder,
    dynamics: EquivariantDynamics,
    coords: Array,
    values: Array,
    times: Array,
    *,
    solver: diffrax.AbstractSolver | None = None,
    dt0: float | None = 1.0,
    key: Array | None = None,
    mask: Array | None = None,
) -> Array:
    """Stage-2 loss: MSE over frames, points and channels of the forecast from frame 0.

    Args:
        coords: ``[M, D]``; values: ``[B, T, M, C]`` at ``times [T]`` (``times[0]`` is the initial time 0);
        mask: ``[B, T, M]`` observed points (None: all).
    """
    initial_mask = None if mask is None else mask[:, 0]
    pred = forecast_fields(
        field, encoder, dynamics, coords, values[:, 0], times, coords, initial_mask, solver=solver, dt0=dt0, key=key
    )
    squared = (pred.swapaxes(0, 1) - values) ** 2
    if mask is None:
        return jnp.mean(squared)
    weights = mask[..., None].astype(squared.dtype)
    return jnp.sum(jnp.where(mask[..., None], squared, 0.0)) / jnp.maximum(jnp.sum(weights) * squared.shape[-1], 1.0)


def make_stage2_step(
    field: EquivariantNeuralField,
    encoder: MetaSGDEncoder,
    dynamics: EquivariantDynamics,
    optimizer: optax.GradientTransformation,
    *,
    solver: diffrax.AbstractSolver | None = None,
    dt0: float | None = 1.0,
) -> tuple[Callable, TrainState, nnx.State, nnx.GraphDef]:
    """A jitted stage-2 train step that updates only the dynamics.

    The step is ``step(params, opt_state, rest, frozen, coords [M, D], values [B, T, M, C], times [T], key,
    mask=None) -> (params, opt_state, loss)``, with ``frozen`` the decoder's and encoder's state and
    ``mask [B, T, M]``.

    Returns:
        ``(step, TrainState of the dynamics, frozen state, dynamics graphdef)``.
    """
    frozen_graphdef, frozen = nnx.split((field, encoder))
    graphdef, params, rest = nnx.split(dynamics, nnx.Param, ...)

    def loss_fn(params, rest, frozen, coords, values, times, key, mask):
        field, encoder = nnx.merge(frozen_graphdef, jax.lax.stop_gradient(frozen))
        dynamics = nnx.merge(graphdef, params, rest)
        return trajectory_loss(field, encoder, dynamics, coords, values, times, solver=solver, dt0=dt0, key=key, mask=mask)

    @jax.jit
    def step(params, opt_state, rest, frozen, coords, values, times, key, mask=None):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, frozen, coords, values, times, key, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, TrainState(params, rest, optimizer.init(params)), frozen, graphdef


def make_joint_step(
    field: EquivariantNeuralField,
    encoder: MetaSGDEncoder,
    dynamics: EquivariantDynamics,
    optimizer: optax.GradientTransformation,
    *,
    solver: diffrax.AbstractSolver | None = None,
    dt0: float | None = 1.0,
) -> tuple[Callable, TrainState, nnx.GraphDef]:
    """A jitted step of the optional joint fine-tuning stage: every parameter on the trajectory loss.

    The step is ``step(params, opt_state, rest, coords, values [B, T, M, C], times [T], key, mask=None)
    -> (params, opt_state, loss)``; ``nnx.merge(graphdef, params, rest)`` gives ``(field, encoder, dynamics)``.
    """
    graphdef, params, rest = nnx.split((field, encoder, dynamics), nnx.Param, ...)

    def loss_fn(params, rest, coords, values, times, key, mask):
        field, encoder, dynamics = nnx.merge(graphdef, params, rest)
        return trajectory_loss(field, encoder, dynamics, coords, values, times, solver=solver, dt0=dt0, key=key, mask=mask)

    @jax.jit
    def step(params, opt_state, rest, coords, values, times, key, mask=None):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, coords, values, times, key, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, TrainState(params, rest, optimizer.init(params)), graphdef
