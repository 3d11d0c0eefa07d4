"""Latent targets for the dynamics stage (``train.stage2_targets: latents``).

The decoder and the Meta-SGD encoder are frozen in stage 2, so the latents of every training frame can be
fitted once, and the dynamics regressed onto them: the rollout from frame s's latents should reach the contexts
fitted to frames s+1, s+2, ... (the latent-space targets of DINo's autodecoding, here from the frozen Meta-SGD
encoder). A step then decodes nothing and its loss reaches the dynamics directly instead of through the
decoder. The poses stay where frame s's fit put them (``model.dynamics_move_poses: false``): the fits of later
frames start from the same initial poses, so only their contexts are targets.

experiments/results/latent_only_6000.md measured it against the decoded-trajectory loss on Navier-Stokes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from enfpde.encoder import MetaSGDEncoder
from enfpde.field import EquivariantNeuralField
from enfpde.latents import Latents
from enfpde.rollout import rollout

Array = jax.Array


def fit_latent_targets(
    field: EquivariantNeuralField,
    encoder: MetaSGDEncoder,
    coords: Array,
    values: np.ndarray,
    *,
    points: int,
    fields_per_call: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> Latents:
    """Meta-SGD latents of every frame of every trajectory.

    Args:
        field, encoder: the frozen decoder and encoder.
        coords: ``[M, D]`` model coordinates of the points (``geometry.coords_from_user``).
        values: ``[N, F, M, C]`` normalised values of N trajectories of F frames, no missing values.
        points: each call of ``fields_per_call`` fields is fitted on this many random points of the M (all when
            M is smaller), drawn from ``numpy.random.default_rng(seed)``.

    Returns:
        Latents with batch ``[N, F]``, as host (numpy) arrays: windows are gathered from them on the host.
    """
    n, f, m, c = values.shape
    flat = values.reshape(n * f, m, c)
    coords = np.asarray(coords)
    rng = np.random.default_rng(seed)

    @nnx.jit
    def fit(field, encoder, coords, values, key):
        return encoder(field, coords, values, key=key)

    parts = []
    starts = range(0, n * f, fields_per_call)
    for start in tqdm(starts, desc="latent targets", unit="call", disable=not progress, leave=False):
        idx = np.sort(rng.choice(m, min(points, m), replace=False))
        chunk = jnp.asarray(flat[start : start + fields_per_call][:, idx])
        parts.append(fit(field, encoder, jnp.asarray(coords[idx]), chunk, jax.random.key(start)))
    z = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *parts)
    return jax.tree.map(lambda x: x.reshape((n, f) + x.shape[1:]), z)


def targets_fingerprint(field: EquivariantNeuralField, encoder: MetaSGDEncoder, values: np.ndarray, **settings) -> str:
    """A digest of everything the targets depend on: the decoder's and encoder's variables, the normalised
    ``values`` and the fitting ``settings`` (points, fields per call, seed, ...)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for leaf in jax.tree.leaves(nnx.state((field, encoder))):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    digest.update(str(values.shape).encode())
    digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def save_latent_targets(path: Path, targets: Latents, fingerprint: str) -> None:
    """Write ``targets`` to ``path`` (``.npz``, replaced atomically) with the fingerprint they were fitted under."""
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, poses=targets.poses, contexts=targets.contexts, widths=targets.widths, fingerprint=fingerprint)
    os.replace(tmp, path)


def load_latent_targets(path: Path, fingerprint: str) -> Latents | None:
    """The targets saved at ``path`` if they were fitted under ``fingerprint``; None if absent or stale."""
    if not path.exists():
        return None
    with np.load(path) as saved:
        if str(saved["fingerprint"]) != fingerprint:
            return None
        return Latents(saved["poses"], saved["contexts"], saved["widths"])


def latent_windows(targets: Latents, rows: np.ndarray, starts: np.ndarray, frames: int) -> tuple[Latents, np.ndarray]:
    """The windows ``starts[b] .. starts[b] + frames - 1`` of trajectories ``rows [B]`` of ``targets [N, F]``.

    Returns ``(z0, target_contexts)``: frame s's latents (batch ``[B]``) and the contexts of the window's later
    frames, ``[B, frames - 1, L, latent_dim]``."""
    idx = starts[:, None] + np.arange(frames)  # [B, frames]
    window = jax.tree.map(lambda x: x[rows[:, None], idx], targets)
    z0 = jax.tree.map(lambda x: x[:, 0], window)
    return z0, window.contexts[:, 1:]


def latent_trajectory_loss(
    dynamics: nnx.Module,
    z0: Latents,
    target_contexts: Array,
    times: Array,
    scale: Array,
    *,
    metric: Array | None = None,
    solver: diffrax.AbstractSolver | None = None,
    dt0: float | None = 1.0,
) -> Array:
    """Mean squared error of the rolled-out contexts at ``times[1:]`` against ``target_contexts [B, T-1, L, d]``,
    each channel divided by ``scale [d]`` (the spread of the contexts, so that every channel counts alike).

    With ``metric [L d, L d]`` (:func:`decoder_metric`) the scaled error of each frame's ``L x d`` contexts is
    multiplied by it before squaring: errors then count as much as the decoded field would feel them."""
    z = rollout(dynamics, z0, times, solver=solver, dt0=dt0)  # [T, B]
    err = (jnp.swapaxes(z.contexts[1:], 0, 1) - target_contexts) / scale  # [B, T-1, L, d]
    if metric is not None:
        err = err.reshape(err.shape[:2] + (-1,)) @ metric
    return jnp.mean(err**2)


def decoder_metric(
    field: EquivariantNeuralField,
    targets: Latents,
    coords: Array,
    scale: np.ndarray,
    *,
    fields: int = 32,
    points: int = 512,
    ridge: float = 0.01,
    seed: int = 0,
) -> np.ndarray:
    """Square root ``[L d, L d]`` of the decoder's Gauss-Newton metric on the scaled contexts, for the latent loss.

    The decoder is far more sensitive to some directions of the ``L x d`` contexts than to others (averaged over 8
    frames of the Navier-Stokes ``cpu_3h_fit6`` targets, half of the metric's eigenvalues are below 7e-3 of their
    mean, the largest 18x it),
    so a plain squared error of the contexts puts most of its weight on directions the field barely shows.
    Weighting by the metric did not train better dynamics there (experiments/results/latent_metric.md and the
    README): the ignored directions still carry what the dynamics need. ``G = E[J^T J]``, with ``J [M C, L d]`` the Jacobian of the decoded values at ``points`` random
    points with respect to the contexts divided by ``scale``, is averaged over ``fields`` random frames of
    ``targets [N, F]`` (the poses and widths stay those of each frame), divided by its mean eigenvalue and
    lifted by ``ridge`` (so that no direction is free), then square-rooted: ``|e @ S|^2 = e^T (G + ridge) e``.

    Args:
        field: the frozen decoder.
        targets: latent targets with batch ``[N, F]`` (host arrays).
        coords: ``[M, D]`` model coordinates of the grid the targets were fitted on.
        scale: ``[d]`` the latent loss's per-channel scale (:func:`context_scale`).
    """
    if ridge < 0 or fields < 1 or points < 1:
        raise ValueError(f"decoder_metric needs ridge >= 0, fields >= 1 and points >= 1, found {ridge}, {fields}, {points}.")
    n, f = targets.contexts.shape[:2]
    coords = np.asarray(coords)
    rng = np.random.default_rng([seed, 21])
    scale = jnp.asarray(scale)

    @jax.jit
    def gram(coords, poses, contexts, widths):
        def decoded(scaled):
            z = Latents(poses[None], (scaled * scale)[None], widths[None])
            return field(coords, z)[0].reshape(-1)  # [P C]

        jac = jax.jacfwd(decoded)(contexts / scale)  # [P C, L, d]
        jac = jac.reshape(jac.shape[0], -1)
        return jac.T @ jac / jac.shape[0]

    total = 0.0
    for _ in range(fields):
        row, frame = rng.integers(n), rng.integers(f)
        idx = np.sort(rng.choice(coords.shape[0], min(points, coords.shape[0]), replace=False))
        part = jax.tree.map(lambda x: jnp.asarray(x[row, frame]), targets)
        total = total + np.asarray(gram(jnp.asarray(coords[idx]), part.poses, part.contexts, part.widths), np.float64)
    eigenvalues, vectors = np.linalg.eigh(total / fields)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    eigenvalues = eigenvalues / eigenvalues.mean() + ridge
    return ((vectors * np.sqrt(eigenvalues)) @ vectors.T).astype(np.float32)


def context_scale(dynamics: nnx.Module, targets: Latents) -> np.ndarray:
    """Per-channel scale of the latent loss: the dynamics' context statistics when it standardises its inputs
    (the Trainer sets them at the start of stage 2), else the standard deviation of the targets' contexts."""
    if getattr(dynamics, "context_std", None) is not None:
        return np.asarray(dynamics.context_std[...])
    flat = targets.contexts.reshape(-1, targets.contexts.shape[-1])
    std = flat.std(axis=0)
    return np.maximum(std, 1e-6 * std.mean() + 1e-12).astype(np.float32)


def make_latent_stage2_step(dynamics: nnx.Module, optimizer, *, solver=None, dt0: float | None = 1.0) -> Callable:
    """A jitted stage-2 step on latent targets that updates only the dynamics:
    ``step(params, opt_state, rest, z0 [B], target_contexts [B, T-1, L, d], times [T], scale [d], metric)
    -> (params, opt_state, loss)``, with ``params, rest = nnx.split(dynamics, nnx.Param, ...)[1:]`` and ``metric``
    None or ``[L d, L d]`` (:func:`latent_trajectory_loss`)."""
    graphdef = nnx.split(dynamics, nnx.Param, ...)[0]

    def loss_fn(params, rest, z0, target_contexts, times, scale, metric):
        model = nnx.merge(graphdef, params, rest)
        return latent_trajectory_loss(model, z0, target_contexts, times, scale, metric=metric, solver=solver, dt0=dt0)

    @jax.jit
    def step(params, opt_state, rest, z0, target_contexts, times, scale, metric=None):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, z0, target_contexts, times, scale, metric)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step
