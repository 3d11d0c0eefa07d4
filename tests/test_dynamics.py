"""Latent dynamics and rollout: equivariance, time super-resolution, solver agreement, gradients,
pose constraints."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from enfpde import geometry as G
from enfpde.dynamics import EquivariantDynamics
from enfpde.latents import Latents
from enfpde.rollout import rollout, solver_from_name
from enfpde.testing import random_latents, relative_error

N, D = 6, 4


def make_dynamics(geometry, output_scale=1.0, **kwargs):
    return EquivariantDynamics(geometry, latent_dim=D, num_hidden=16, num_layers=2, num_frequencies=8, output_scale=output_scale, rngs=nnx.Rngs(0), **kwargs)


@jax.jit(static_argnums=0)
def _velocity(graphdef, state, z):
    return nnx.merge(graphdef, state)(z)


def velocity(dynamics, z):
    return _velocity(*nnx.split(dynamics), z)


def test_velocity_is_equivariant(geometry):
    check_velocity_equivariance(geometry, kernel_radius=None)


@pytest.mark.parametrize("geometry", [G.Torus(), G.AxialSphere(), G.PlaneSE2()], ids=["torus", "axial", "se2"])
def test_velocity_is_equivariant_with_a_kernel_radius(geometry):
    check_velocity_equivariance(geometry, kernel_radius=0.6 * geometry.latent_spacing(N) * 2)


@pytest.mark.parametrize("geometry", [G.Torus(), G.AxialSphere(), G.PlaneSE2()], ids=["torus", "axial", "se2"])
def test_velocity_is_equivariant_with_k_nearest(geometry):
    check_velocity_equivariance(geometry, kernel_radius=None, k_nearest=3)


def test_k_nearest_hears_the_same_latents_as_a_radius_on_a_grid():
    """On a regular 4 x 4 grid of poses, each latent's 5 nearest are itself and its 4 axis neighbours, exactly the
    latents within 1.2 grid spacings: the sparse graph must give the dense model's velocity with that radius."""
    torus = G.Torus()
    z = random_latents(torus, jax.random.key(3), batch=2, num_latents=16, latent_dim=D)
    z = z.replace(poses=jnp.broadcast_to(torus.initial_poses(16), z.poses.shape))
    radius = 1.2 * torus.latent_spacing(16)
    dense, sparse = make_dynamics(torus, kernel_radius=radius), make_dynamics(torus, kernel_radius=radius, k_nearest=5)
    expected, rate = velocity(dense, z), velocity(sparse, z)
    assert relative_error(rate.contexts, expected.contexts) < 1e-5
    assert relative_error(rate.poses, expected.poses) < 1e-5
    # and it is a real restriction: the fully connected model differs
    assert relative_error(velocity(make_dynamics(torus), z).contexts, expected.contexts) > 1e-2


def test_k_nearest_of_every_latent_is_fully_connected():
    torus = G.Torus()
    z = random_latents(torus, jax.random.key(4), batch=2, num_latents=N, latent_dim=D)
    expected, rate = velocity(make_dynamics(torus), z), velocity(make_dynamics(torus, k_nearest=N), z)
    assert relative_error(rate.contexts, expected.contexts) < 1e-6 and relative_error(rate.poses, expected.poses) < 1e-6


def test_k_nearest_must_be_positive():
    with pytest.raises(ValueError, match="k_nearest must be a positive integer"):
        make_dynamics(G.Torus(), k_nearest=0)


def check_velocity_equivariance(geometry, kernel_radius, k_nearest=None):
    kz, kg = jax.random.split(jax.random.key(0))
    dynamics = make_dynamics(geometry, kernel_radius=kernel_radius, k_nearest=k_nearest)
    z = random_latents(geometry, kz, batch=2, num_latents=N, latent_dim=D)
    g = geometry.sample_group_element(kg)
    rate = velocity(dynamics, z)
    moved = velocity(dynamics, z.transform(geometry, g))
    assert relative_error(moved.contexts, rate.contexts) < 1e-5
    assert relative_error(moved.poses, geometry.act_on_tangents(g, z.poses, rate.poses)) < 1e-5
    np.testing.assert_array_equal(rate.widths, 0.0)  # widths do not evolve
    assert float(jnp.abs(rate.poses).max()) > 0  # poses do move


def _standardized(geometry, z, key):
    """A standardising dynamics model whose statistics are those of ``z`` scaled and shifted (not the identity)."""
    dynamics = make_dynamics(geometry, standardize_contexts=True)
    dynamics.set_context_statistics(3.0 * z.contexts + 1.0 + jax.random.normal(key, z.contexts.shape))
    return dynamics


@pytest.mark.parametrize("geometry", [G.Torus(), G.AxialSphere(), G.PlaneSE2()], ids=["torus", "axial", "se2"])
def test_velocity_with_standardized_contexts_is_equivariant(geometry):
    kz, kg, ks = jax.random.split(jax.random.key(1), 3)
    z = random_latents(geometry, kz, batch=2, num_latents=N, latent_dim=D)
    dynamics = _standardized(geometry, z, ks)
    g = geometry.sample_group_element(kg)
    rate, moved = velocity(dynamics, z), velocity(dynamics, z.transform(geometry, g))
    assert relative_error(moved.contexts, rate.contexts) < 1e-5
    assert relative_error(moved.poses, geometry.act_on_tangents(g, z.poses, rate.poses)) < 1e-5


def test_standardized_contexts_are_the_raw_model_in_other_units():
    """With statistics (m, s), the model at contexts c is the same network at (c - m) / s with statistics (0, 1),
    its context velocity multiplied by s; pose velocities are unchanged."""
    torus = G.Torus()
    z = random_latents(torus, jax.random.key(0), batch=2, num_latents=N, latent_dim=D)
    dynamics = _standardized(torus, z, jax.random.key(2))
    mean, std = dynamics.context_mean[...], dynamics.context_std[...]
    samples = 3.0 * z.contexts + 1.0 + jax.random.normal(jax.random.key(2), z.contexts.shape)
    np.testing.assert_allclose(mean, samples.reshape(-1, D).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, samples.reshape(-1, D).std(0), rtol=1e-5)
    assert float(jnp.abs(mean).min()) > 0.1 and float(jnp.abs(std - 1).min()) > 0.1  # a real change of units
    rate = velocity(dynamics, z)
    dynamics.context_mean[...], dynamics.context_std[...] = jnp.zeros(D), jnp.ones(D)
    unit = velocity(dynamics, z.replace(contexts=(z.contexts - mean) / std))
    np.testing.assert_allclose(rate.contexts, unit.contexts * std, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rate.poses, unit.poses, rtol=1e-5, atol=1e-7)


def test_context_statistics_need_the_switch():
    with pytest.raises(ValueError, match="built without standardize_contexts"):
        make_dynamics(G.Torus()).set_context_statistics(jnp.ones((3, D)))


def test_untrained_flow_is_near_identity():
    torus = G.Torus()
    z = random_latents(torus, jax.random.key(0), batch=2, num_latents=N, latent_dim=D)
    rate = velocity(make_dynamics(torus, output_scale=1e-3), z)
    assert float(jnp.abs(rate.contexts).max()) < 1e-2 * float(jnp.abs(z.contexts).max())
    assert float(jnp.abs(rate.poses).max()) < 1e-2 * torus.latent_spacing(N)


def test_axial_sphere_uses_its_fixed_directions():
    """With rotations about the pole only, a single latent may still drift (e.g. eastward); on the full sphere
    it cannot, since nothing singles out a direction."""
    z = random_latents(G.AxialSphere(), jax.random.key(0), batch=1, num_latents=1, latent_dim=D)
    assert float(jnp.abs(velocity(make_dynamics(G.AxialSphere()), z).poses).max()) > 1e-4
    assert float(jnp.abs(velocity(make_dynamics(G.Sphere()), z).poses).max()) < 1e-7


@jax.jit(static_argnums=(0, 3, 4))
def _rollout(graphdef, state, z0, times, solver_name, dt0=1.0):
    times = jnp.asarray(times)
    return rollout(nnx.merge(graphdef, state), z0, times, solver=solver_from_name(solver_name), dt0=dt0)


def run(dynamics, z0, times, solver="euler", dt0=1.0):
    return _rollout(*nnx.split(dynamics), z0, tuple(times), solver, dt0)


@pytest.mark.parametrize("geometry", [G.Torus(), G.AxialSphere(), G.PlaneSE2()], ids=["torus", "axial", "se2"])
def test_rollout_is_equivariant(geometry):
    kz, kg = jax.random.split(jax.random.key(1))
    dynamics = make_dynamics(geometry, output_scale=0.3)
    z0 = random_latents(geometry, kz, batch=2, num_latents=N, latent_dim=D)
    g = geometry.sample_group_element(kg)
    out = run(dynamics, z0, (0.0, 1.0, 2.0, 3.0))
    moved = run(dynamics, z0.transform(geometry, g), (0.0, 1.0, 2.0, 3.0))
    assert relative_error(moved.contexts, out.contexts) < 1e-4
    expected = geometry.act_on_poses(g, out.poses)
    assert float(jnp.abs(geometry.relative_displacement(expected, moved.poses)).max()) < 1e-4


def test_fixed_pose_dynamics_keep_poses_and_stay_equivariant():
    """move_poses=False: the rollout integrates the contexts alone; the poses stay where they started, the result
    is the full-state rollout of the same network with its pose velocity zeroed, and it is equivariant."""
    torus = G.Torus()
    kz, kg = jax.random.split(jax.random.key(4))
    fixed = make_dynamics(torus, output_scale=0.3, move_poses=False)
    z0 = random_latents(torus, kz, batch=2, num_latents=N, latent_dim=D)
    times = (0.0, 1.0, 2.0, 3.0)
    out = run(fixed, z0, times)
    assert out.poses.shape == (4, 2, N, 2)
    assert float(jnp.abs(out.poses - torus.project(z0.poses)[None]).max()) == 0.0
    assert relative_error(out.contexts[-1], out.contexts[0]) > 1e-3  # the contexts do evolve
    moving = make_dynamics(torus, output_scale=0.3)  # same seed: the same weights
    moving.pose_scale[...] = 0.0
    full = run(moving, z0, times)
    assert relative_error(full.contexts, out.contexts) < 1e-5
    g = torus.sample_group_element(kg)
    moved = run(fixed, z0.transform(torus, g), times)
    assert relative_error(moved.contexts, out.contexts) < 1e-4
    assert float(jnp.abs(torus.relative_displacement(torus.act_on_poses(g, out.poses), moved.poses)).max()) < 1e-4


@pytest.mark.parametrize("k_nearest", [None, 3], ids=["all", "k3"])
def test_fixed_pose_rollout_with_edges_computed_once_matches_per_step_edges(k_nearest):
    """With fixed poses the rollout computes the edges once per solve (EquivariantDynamics.edges); its contexts
    and its parameter gradients are those of the plain rollout, which rebuilds the edges at every step."""
    torus = G.Torus()
    fixed = make_dynamics(torus, output_scale=0.3, move_poses=False, k_nearest=k_nearest)
    z0 = random_latents(torus, jax.random.key(5), batch=2, num_latents=N, latent_dim=D)
    times = jnp.arange(4.0)
    graphdef, params, rest = nnx.split(fixed, nnx.Param, ...)

    def per_step(params):  # explicit Euler through __call__, edges rebuilt at each step
        model = nnx.merge(graphdef, params, rest)
        contexts, out = z0.contexts, [z0.contexts]
        for _ in range(3):
            contexts = contexts + model(Latents(z0.poses, contexts, z0.widths)).contexts
            out.append(contexts)
        return jnp.stack(out)

    def once(params):
        return rollout(nnx.merge(graphdef, params, rest), z0, times).contexts

    assert relative_error(once(params), per_step(params)) < 1e-5
    loss = lambda f: (lambda p: jnp.sum(jnp.sin(f(p))))
    g_once, g_step = jax.grad(loss(once))(params), jax.grad(loss(per_step))(params)
    for a, b in zip(jax.tree.leaves(g_once), jax.tree.leaves(g_step)):
        assert relative_error(a, b) < 1e-4


def test_saving_between_frames_matches_frame_only_run():
    torus = G.Torus()
    dynamics = make_dynamics(torus, output_scale=0.3)
    z0 = random_latents(torus, jax.random.key(2), batch=2, num_latents=N, latent_dim=D)
    fine = run(dynamics, z0, tuple(np.arange(9) * 0.25))
    coarse = run(dynamics, z0, (0.0, 1.0, 2.0))
    assert fine.poses.shape == (9, 2, N, 2) and fine.widths.shape == (9, 2, N)
    assert relative_error(fine.contexts[::4], coarse.contexts) < 1e-6
    assert float(jnp.abs(torus.relative_displacement(coarse.poses, fine.poses[::4])).max()) < 1e-6
    assert relative_error(fine.contexts[1], coarse.contexts[0]) > 1e-5  # intermediate states differ


def test_adaptive_dopri5_matches_fine_fixed_steps():
    torus = G.Torus()
    dynamics = make_dynamics(torus, output_scale=0.3)
    z0 = random_latents(torus, jax.random.key(3), batch=1, num_latents=N, latent_dim=D)
    graphdef, state = nnx.split(dynamics)
    times = jnp.array([0.5, 1.0])

    @jax.jit
    def adaptive(state, z0):
        control = diffrax.PIDController(rtol=1e-6, atol=1e-6)
        return rollout(nnx.merge(graphdef, state), z0, times, solver=diffrax.Dopri5(), dt0=0.1, stepsize_controller=control)

    # Fixed-step Tsit5 at dt = 0.01: truncation error far below float32 round-off over 100 steps.
    reference = run(dynamics, z0, (0.5, 1.0), solver="tsit5", dt0=1e-2)
    out = adaptive(state, z0)
    assert relative_error(out.contexts, reference.contexts) < 1e-4
    assert float(jnp.abs(torus.relative_displacement(reference.poses, out.poses)).max()) < 1e-4
    euler = run(dynamics, z0, (0.5, 1.0), solver="euler", dt0=0.5)  # and a coarse step is visibly off
    assert relative_error(euler.contexts, reference.contexts) > 1e-3


def test_gradients_through_the_rollout_are_finite_with_a_bounded_adjoint():
    sphere = G.AxialSphere()
    dynamics = make_dynamics(sphere, output_scale=0.3)
    z0 = random_latents(sphere, jax.random.key(4), batch=2, num_latents=N, latent_dim=D)
    graphdef, params, rest = nnx.split(dynamics, nnx.Param, ...)

    def loss(params):
        out = rollout(nnx.merge(graphdef, params, rest), z0, jnp.arange(1.0, 6.0), adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=2))
        return jnp.mean(out.contexts**2) + jnp.mean(out.poses[..., 2] ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    leaves = [np.asarray(x) for x in jax.tree.leaves(grads)]
    assert all(np.all(np.isfinite(x)) for x in leaves)
    assert max(np.abs(x).max() for x in leaves) > 0


@pytest.mark.parametrize("geometry", [G.Torus((2.0, 1.0)), G.Sphere(), G.AxialSphere()], ids=["torus", "sphere", "axial"])
def test_poses_stay_on_the_domain_after_100_steps(geometry):
    dynamics = make_dynamics(geometry, output_scale=1.0)
    z0 = random_latents(geometry, jax.random.key(5), batch=2, num_latents=N, latent_dim=D)
    out = run(dynamics, z0, (10.0,), dt0=0.1)  # 100 Euler steps
    np.testing.assert_allclose(geometry.project(out.poses), out.poses, atol=1e-5)
    assert float(jnp.abs(out.poses - z0.poses).max()) > 1e-3  # they did move


def test_unknown_solver_name():
    with pytest.raises(ValueError, match="unknown ODE solver 'rk45'; expected one of"):
        solver_from_name("rk45")


@pytest.mark.parametrize(
    "times, message",
    [([1.0, 0.5], "strictly increasing"), ([[1.0]], "1-D"), ([-1.0, 1.0], "must not precede the initial time")],
)
def test_bad_output_times(times, message):
    torus = G.Torus()
    z0 = random_latents(torus, jax.random.key(0), batch=1, num_latents=N, latent_dim=D)
    with pytest.raises(ValueError, match=message):
        rollout(make_dynamics(torus), z0, jnp.asarray(times))


def test_stage2_training_reduces_the_trajectory_error():
    """On a field advected at constant speed across the torus, a few stage-2 steps (encoder and decoder
    frozen) reduce the forecast error; the frozen parts do not change."""
    import optax

    from enfpde import EquivariantNeuralField, MetaSGDEncoder
    from enfpde.field import LEAN_DECODER
    from enfpde.training import make_stage2_step

    torus = G.Torus()
    # The lean decoder: this untrained one passes latent motion through to the field directly, which the
    # threshold below was calibrated on.
    field = EquivariantNeuralField(torus, num_out=1, latent_dim=D, num_hidden=16, num_heads=2, rngs=nnx.Rngs(0), **LEAN_DECODER)
    encoder = MetaSGDEncoder(torus, num_latents=N, latent_dim=D)
    dynamics = make_dynamics(torus, output_scale=1e-3)
    coords = torus.sample_coords(jax.random.key(0), 64)
    times = jnp.arange(4.0)
    shifts = 0.1 * times[:, None] * jnp.array([1.0, 0.5])  # [T, 2]
    phase = 2 * jnp.pi * (coords[None, :, 0] - shifts[:, None, 0]) + 2 * jnp.pi * (coords[None, :, 1] - shifts[:, None, 1])
    values = jnp.stack([jnp.sin(phase), jnp.cos(phase)])[..., None]  # [B=2, T, M, 1]
    step, state, frozen, _ = make_stage2_step(field, encoder, dynamics, optax.adam(3e-3))
    params, opt_state = state.params, state.opt_state
    losses = []
    for i in range(40):
        params, opt_state, loss = step(params, opt_state, state.rest, frozen, coords, values, times, jax.random.key(i))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert min(losses[-5:]) < 0.9 * losses[0], losses
    assert step._cache_size() == 1


def test_a_fixed_pose_model_from_its_config_forecasts_like_frame_by_frame_decoding(tmp_path):
    """model.dynamics_move_poses=false survives the run's config file, builds dynamics that keep the poses, and
    forecast_fields (which then shares the decoder's pose terms across frames) equals decoding each frame of the
    rollout alone."""
    from enfpde.config import RunConfig, config_from_yaml, load_config, to_yaml
    from enfpde.forecaster import build_modules, forecast_fields

    config = load_config("quick", ["model.num_hidden=16", "model.latent_dim=4", "model.dynamics_hidden=16", "model.num_latents=16",
                                   "model.inner_steps=1", "model.dynamics_output_scale=0.3"])
    assert isinstance(config, RunConfig) and config.model.dynamics_move_poses is False
    (tmp_path / "config.yaml").write_text(to_yaml(config))
    model = config_from_yaml(tmp_path / "config.yaml").model
    assert model.dynamics_move_poses is False
    torus = G.Torus()
    field, encoder, dynamics = build_modules(model, torus, num_channels=1)
    assert dynamics.move_poses is False
    coords = torus.sample_coords(jax.random.key(0), 64)
    initial = jax.random.normal(jax.random.key(1), (2, 64, 1))
    times = jnp.array([0.0, 1.0, 2.5])

    @nnx.jit
    def both(field, encoder, dynamics):
        out = forecast_fields(field, encoder, dynamics, coords, initial, times, coords, key=jax.random.key(2))
        zs = rollout(dynamics, encoder(field, coords, initial, None, key=jax.random.key(2)), times)
        return out, jnp.stack([field(coords, jax.tree.map(lambda a: a[t], zs)) for t in range(3)])

    out, each = both(field, encoder, dynamics)
    assert out.shape == (3, 2, 64, 1) and bool(jnp.all(jnp.isfinite(out)))
    assert relative_error(out, each) < 1e-5
    assert relative_error(out[2], out[0]) > 1e-3  # the forecast does change in time
