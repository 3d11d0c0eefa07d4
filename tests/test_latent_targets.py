"""Stage 2 on latent targets (``train.stage2_targets: latents``, enfpde.latent_targets)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from enfpde import checkpointing
from enfpde.config import ConfigError, load_config
from enfpde.forecaster import Forecaster
from enfpde.geometry import Torus
from enfpde.latent_targets import (
    context_scale,
    decoder_metric,
    fit_latent_targets,
    latent_trajectory_loss,
    latent_windows,
    load_latent_targets,
    save_latent_targets,
    targets_fingerprint,
)
from enfpde.latents import Latents
from enfpde.trainer import LATENT_TARGETS_FILE, Trainer


class ConstantVelocity(nnx.Module):
    """Contexts moving at a fixed rate ``velocity [d]``, poses and widths still."""

    move_poses = False

    def __init__(self, velocity):
        self.geometry = Torus()
        self.velocity = jnp.asarray(velocity, jnp.float32)

    def __call__(self, z):
        return Latents(jnp.zeros_like(z.poses), jnp.broadcast_to(self.velocity, z.contexts.shape), jnp.zeros_like(z.widths))


def test_the_latent_loss_is_the_scaled_error_of_the_rolled_out_contexts():
    """Under a constant velocity, Euler is exact: targets on the line give 0, targets off it by ``delta`` give
    ``mean((delta / scale)^2)``."""
    rng = np.random.default_rng(0)
    b, n, d = 3, 5, 2
    z0 = Latents(jnp.asarray(rng.uniform(size=(b, n, 2)), jnp.float32), jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32),
                 jnp.full((b, n), 0.1, jnp.float32))
    velocity, scale, times = np.array([0.5, -2.0]), jnp.asarray([2.0, 4.0]), jnp.arange(4.0)
    on_line = z0.contexts[:, None] + velocity * times[1:, None, None]  # [B, T-1, N, d]
    dynamics = ConstantVelocity(velocity)
    assert float(latent_trajectory_loss(dynamics, z0, on_line, times, scale)) == pytest.approx(0.0, abs=1e-10)
    delta = jnp.asarray([1.0, 2.0])
    loss = latent_trajectory_loss(dynamics, z0, on_line + delta, times, scale)
    assert float(loss) == pytest.approx(np.mean((np.asarray(delta) / np.asarray(scale)) ** 2), rel=1e-5)


def test_with_a_metric_the_loss_is_the_quadratic_form_of_the_scaled_error():
    """``metric`` S: each frame's flattened scaled error e counts as ``|e S|^2``, averaged over the L d entries."""
    rng = np.random.default_rng(1)
    b, n, d = 2, 3, 2
    z0 = Latents(jnp.asarray(rng.uniform(size=(b, n, 2)), jnp.float32), jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32),
                 jnp.full((b, n), 0.1, jnp.float32))
    velocity, scale, times = np.array([0.5, -2.0]), np.array([2.0, 4.0]), jnp.arange(3.0)
    on_line = z0.contexts[:, None] + velocity * times[1:, None, None]
    delta = rng.normal(size=(b, 2, n, d)).astype(np.float32)
    metric = rng.normal(size=(n * d, n * d)).astype(np.float32)
    loss = latent_trajectory_loss(ConstantVelocity(velocity), z0, on_line + delta, times, jnp.asarray(scale), metric=jnp.asarray(metric))
    e = (-delta / scale).reshape(b, 2, n * d)
    assert float(loss) == pytest.approx(np.mean((e @ metric) ** 2), rel=1e-5)


def test_the_decoder_metric_is_the_root_of_the_normalised_gauss_newton_matrix(tiny_config, tmp_path):
    """From one frame on every point, ``S^2 = G / mean eig(G) + ridge``, G = J^T J / (M C) with J the decoder's
    Jacobian with respect to the scaled contexts; S is symmetric, so ``|e S|^2 = e^T S^2 e``."""
    trainer = Trainer(_latent_config(tiny_config), tmp_path / "run", progress=False)
    field, encoder, dynamics = trainer.modules
    coords = trainer.geometry.coords_from_user(trainer.sampler.coords)
    frame = encoder(field, coords, jnp.asarray(trainer.sampler.values[0, :1]))  # batch [1]
    targets = jax.tree.map(lambda x: np.asarray(x)[None], frame)  # [N=1, F=1]
    scale = np.asarray([0.5 + 0.1 * k for k in range(targets.contexts.shape[-1])], np.float32)
    root = decoder_metric(field, targets, coords, scale, fields=1, points=10**6, ridge=0.05)

    def decoded(scaled):
        return field(coords, frame.replace(contexts=(scaled * scale)[None]))[0].reshape(-1)

    jac = np.asarray(jax.jacfwd(decoded)(frame.contexts[0] / scale), np.float64)
    jac = jac.reshape(jac.shape[0], -1)
    gram = jac.T @ jac / jac.shape[0]
    expected = gram / np.linalg.eigvalsh(gram).mean() + 0.05 * np.eye(gram.shape[0])
    np.testing.assert_allclose(root, root.T, atol=1e-5)
    np.testing.assert_allclose(root @ root, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_a_run_with_the_decoder_metric_trains_its_dynamics_on_that_loss(tiny_config, tmp_path, monkeypatch):
    """``train.latent_targets.metric: decoder``: the Trainer passes the metric of its targets to every latent step
    (the first logged loss is the weighted one of the untrained dynamics), and a plain run can be resumed with it."""
    plain = _latent_config(tiny_config)
    weighted = dataclasses.replace(plain, train=dataclasses.replace(
        plain.train, latent_targets=dataclasses.replace(plain.train.latent_targets, metric="decoder", metric_ridge=0.1)))
    seen = []
    real = decoder_metric
    monkeypatch.setattr("enfpde.trainer.decoder_metric", lambda *a, **k: seen.append(k["ridge"]) or real(*a, **k))
    trainer = Trainer(weighted, tmp_path / "weighted", progress=False)
    trainer.run()
    assert seen == [0.1]
    weighted_losses = [r["loss"] for r in checkpointing.read_metrics(tmp_path / "weighted") if r["stage"] == "stage2"]
    assert len(weighted_losses) == 6 and np.all(np.isfinite(weighted_losses))
    # The first weighted step's loss is the metric's quadratic form of the untrained rollout's error.
    boundary = trainer.schedule.boundaries[0]
    z0, targets = trainer._latent_batch(boundary, plain.data.horizon)
    untrained = Forecaster.load(tmp_path / "weighted", step=boundary).modules[2]
    with_statistics = Forecaster.load(tmp_path / "weighted", step=boundary + 1).modules[2]  # set at the stage-2 start
    untrained.context_mean[...], untrained.context_std[...] = with_statistics.context_mean[...], with_statistics.context_std[...]
    first = latent_trajectory_loss(untrained, z0, jnp.asarray(targets), trainer.times[: plain.data.horizon],
                                   trainer.latent_scale, metric=trainer.latent_metric)
    assert weighted_losses[0] == pytest.approx(float(first), rel=1e-4)
    unweighted = latent_trajectory_loss(untrained, z0, jnp.asarray(targets), trainer.times[: plain.data.horizon], trainer.latent_scale)
    assert weighted_losses[0] != pytest.approx(float(unweighted), rel=1e-2)

    Trainer(plain, tmp_path / "switch", progress=False).run(stop_after=trainer.schedule.boundaries[0] + 2)
    Trainer(weighted, tmp_path / "switch", resume=True, progress=False).run()
    assert seen == [0.1, 0.1]


def test_windows_are_gathered_from_the_right_trajectories_and_frames():
    n, f = 3, 6
    contexts = (100.0 * np.arange(n)[:, None] + np.arange(f)[None])[:, :, None, None]  # [N, F, L=1, d=1]: 100 n + f
    targets = Latents(np.zeros((n, f, 1, 2)), contexts, np.zeros((n, f, 1)))
    z0, later = latent_windows(targets, np.array([2, 0]), np.array([1, 3]), frames=3)
    assert z0.contexts[:, 0, 0].tolist() == [201.0, 3.0]
    assert later.shape == (2, 2, 1, 1)
    assert later[:, :, 0, 0].tolist() == [[202.0, 203.0], [4.0, 5.0]]


def test_the_targets_are_the_encoders_fit_of_each_frame(tiny_config, tiny_data, tmp_path):
    """With every point and no inner subsets, target [n, f] is the encoder's fit of trajectory n's frame f."""
    trainer = Trainer(tiny_config, tmp_path / "run", progress=False)
    field, encoder, _ = trainer.modules
    coords = trainer.geometry.coords_from_user(trainer.sampler.coords)
    values = trainer.sampler.values  # [N, F, M, C]
    targets = fit_latent_targets(field, encoder, coords, values, points=10**6, fields_per_call=5)
    n, f = values.shape[:2]
    assert targets.contexts.shape[:2] == (n, f)
    direct = encoder(field, coords, jnp.asarray(values[2]))  # trajectory 2, every frame
    np.testing.assert_allclose(targets.contexts[2], np.asarray(direct.contexts), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets.poses[2], np.asarray(direct.poses), rtol=1e-5, atol=1e-6)


def test_with_quarter_turns_the_targets_hold_every_turned_copy(tiny_config, tmp_path):
    """train.augment = quarter_turns: targets [4 N, F], copy k of trajectory n fitted to n turned k times."""
    config = _latent_config(tiny_config, augment="quarter_turns",
                            latent_targets=dataclasses.replace(tiny_config.train.latent_targets, points=10**6))
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer._fit_latent_targets()
    values, turns = trainer.sampler.values, trainer.sampler.permutations
    n, f = values.shape[:2]
    assert trainer.latent_targets.contexts.shape[:2] == (4 * n, f)
    field, encoder, _ = trainer.modules
    turned = encoder(field, trainer.geometry.coords_from_user(trainer.sampler.coords), jnp.asarray(values[1][:, turns[3]]))
    np.testing.assert_allclose(trainer.latent_targets.contexts[3 * n + 1], np.asarray(turned.contexts), rtol=1e-5, atol=1e-6)
    assert not np.allclose(trainer.latent_targets.contexts[1], trainer.latent_targets.contexts[3 * n + 1], atol=1e-3)


def _latent_config(tiny_config, **train_changes):
    train = dataclasses.replace(
        tiny_config.train, stage2_targets="latents", stage1=dataclasses.replace(tiny_config.train.stage1, epochs=1),
        stage2=dataclasses.replace(tiny_config.train.stage2, epochs=3, learning_rate=3e-3), checkpoint_every=1,
        keep_checkpoints=20, **train_changes,
    )
    model = dataclasses.replace(tiny_config.model, dynamics_move_poses=False)
    return dataclasses.replace(tiny_config, train=train, model=model)


def test_stage2_on_latents_trains_the_dynamics_and_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    """A run with latent targets: the dynamics change, only they change, the forecaster loads; a run stopped in
    stage 2 and resumed (with the kept targets, then refitting them) continues the same losses to the same
    parameters."""
    config = _latent_config(tiny_config, latent_targets=dataclasses.replace(tiny_config.train.latent_targets, batch_size=3))
    whole = tmp_path / "whole"
    Trainer(config, whole, progress=False).run()
    records = checkpointing.read_metrics(whole)
    boundary = sum(r["stage"] == "stage1" for r in records)
    stage2 = [r["loss"] for r in records if r["stage"] == "stage2"]
    assert len(stage2) == 6 and all(np.isfinite(stage2))

    def state_at(step):
        forecaster = Forecaster.load(whole, step=step)
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(forecaster.modules[:2]))], forecaster.modules[2]

    frozen_before, dynamics_before = state_at(boundary)
    frozen_after, dynamics_after = state_at(boundary + 6)
    for x, y in zip(frozen_before, frozen_after):
        np.testing.assert_array_equal(x, y)  # decoder and encoder untouched
    moved = [not np.allclose(x, y) for x, y in zip(jax.tree.leaves(nnx.state(dynamics_before, nnx.Param)),
                                                  jax.tree.leaves(nnx.state(dynamics_after, nnx.Param)))]
    assert any(moved)

    # Resumed twice: first from the targets kept in the run directory (no fit allowed), then, the file deleted,
    # refitting them.
    split = tmp_path / "split"
    Trainer(config, split, progress=False).run(stop_after=boundary + 2)
    assert (split / LATENT_TARGETS_FILE).exists()
    with monkeypatch.context() as patch:
        patch.setattr("enfpde.trainer.fit_latent_targets", lambda *a, **k: pytest.fail("refitted kept targets"))
        Trainer(config, split, resume=True, progress=False).run(stop_after=boundary + 4)
    (split / LATENT_TARGETS_FILE).unlink()
    Trainer(config, split, resume=True, progress=False).run()
    assert (split / LATENT_TARGETS_FILE).exists()
    np.testing.assert_allclose([r["loss"] for r in checkpointing.read_metrics(split)], [r["loss"] for r in records], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(nnx.state(Forecaster.load(split).modules)), jax.tree.leaves(nnx.state(Forecaster.load(whole).modules))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_kept_targets_of_another_model_are_not_used(tmp_path):
    field_a, field_b = (nnx.Linear(2, 2, rngs=nnx.Rngs(seed)) for seed in (0, 1))
    values = np.zeros((2, 3, 4, 1), np.float32)
    targets = Latents(np.zeros((2, 3, 1, 2)), np.ones((2, 3, 1, 4)), np.zeros((2, 3, 1)))
    path = tmp_path / "t.npz"
    save_latent_targets(path, targets, targets_fingerprint(field_a, field_a, values, points=8))
    assert load_latent_targets(path, targets_fingerprint(field_a, field_a, values, points=8)) is not None
    assert load_latent_targets(path, targets_fingerprint(field_b, field_a, values, points=8)) is None  # other weights
    assert load_latent_targets(path, targets_fingerprint(field_a, field_a, values, points=16)) is None  # other settings
    assert load_latent_targets(path, targets_fingerprint(field_a, field_a, values + 1, points=8)) is None  # other data


def test_latent_targets_need_fixed_poses(tiny_config, tmp_path):
    config = _latent_config(tiny_config)
    moving = dataclasses.replace(config, model=dataclasses.replace(config.model, dynamics_move_poses=True))
    with pytest.raises(ConfigError, match="dynamics_move_poses: false"):
        Trainer(moving, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("train.stage2_targets=decoded", r"stage2_targets must be one of \['fields', 'latents'\], found 'decoded'"),
    ("train.latent_targets.points=0", r"latent_targets.points must be >= 1, found 0"),
    ("train.latent_targets.metric=fields", r"latent_targets.metric must be one of \['contexts', 'decoder'\], found 'fields'"),
    ("train.latent_targets.metric_ridge=-1", r"latent_targets.metric_ridge must be >= 0, found -1"),
])
def test_bad_latent_target_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_run_resumed_with_more_fit_steps_refits_its_targets_with_them(tiny_config, tmp_path):
    """``model.fit_steps`` may change on resume: the kept targets (fitted with the inner steps) are not reused,
    the new ones are the encoder's fits with the new step count, and the saved run forecasts with it."""
    config = _latent_config(tiny_config, latent_targets=dataclasses.replace(tiny_config.train.latent_targets, points=10**6))
    run = tmp_path / "run"
    boundary = config.train.stage1.epochs * 2  # tiny data: 4 trajectories in batches of 2
    Trainer(config, run, progress=False).run(stop_after=boundary + 1)
    with np.load(run / LATENT_TARGETS_FILE) as kept:
        before = kept["contexts"].copy()

    more = dataclasses.replace(config, model=dataclasses.replace(config.model, fit_steps=config.model.inner_steps + 2))
    trainer = Trainer(more, run, resume=True, progress=False)
    trainer.run()
    after = trainer.latent_targets
    field, encoder, _ = trainer.modules
    assert encoder.fit_steps == config.model.inner_steps + 2
    direct = encoder(field, trainer.geometry.coords_from_user(trainer.sampler.coords), jnp.asarray(trainer.sampler.values[1]))
    np.testing.assert_allclose(after.contexts[1], np.asarray(direct.contexts), rtol=1e-5, atol=1e-6)
    assert not np.allclose(after.contexts, before, atol=1e-4)
    assert Forecaster.load(run).modules[1].fit_steps == config.model.inner_steps + 2
