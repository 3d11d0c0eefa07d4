"""Options of the dynamics stages: the frames they train on (``train.stage2_frames``) and the initial velocity
scale of the dynamics (``model.dynamics_output_scale``)."""

import dataclasses

import numpy as np
import pytest

from enfpde.config import ConfigError


def test_the_dynamics_stages_train_on_the_first_stage2_frames(tiny_config, tmp_path, monkeypatch):
    """stage2_frames=2: every stage-2 step gets 2 frames of each window and their 2 lead times."""
    from enfpde.trainer import Trainer

    train = dataclasses.replace(
        tiny_config.train, stage2_frames=2, stage1=dataclasses.replace(tiny_config.train.stage1, epochs=0),
    )
    trainer = Trainer(dataclasses.replace(tiny_config, train=train), tmp_path / "run", progress=False)
    seen = []

    def fake_step2(params, opt_state, rest, frozen, coords, values, times, key, mask):
        seen.append((values.shape, np.asarray(times).tolist()))
        return params, opt_state, 0.5

    monkeypatch.setattr(trainer, "step2", fake_step2)
    monkeypatch.setattr(trainer, "_set_context_statistics", lambda step: None)
    trainer.run(stop_after=2)
    assert [shape[:2] for shape, _ in seen] == [(tiny_config.train.batch_size, 2)] * 2
    assert all(times == [0.0, 1.0] for _, times in seen)


def test_a_short_horizon_start_then_the_whole_horizon(tiny_config, tmp_path, monkeypatch):
    """stage2_frames=2 with stage2_frames_steps=1: the first stage-2 step trains on 2 frames, the next on all 4."""
    from enfpde.trainer import Trainer

    train = dataclasses.replace(
        tiny_config.train, stage2_frames=2, stage2_frames_steps=1,
        stage1=dataclasses.replace(tiny_config.train.stage1, epochs=0),
    )
    trainer = Trainer(dataclasses.replace(tiny_config, train=train), tmp_path / "run", progress=False)
    seen = []

    def fake_step2(params, opt_state, rest, frozen, coords, values, times, key, mask):
        seen.append((values.shape[1], np.asarray(times).tolist()))
        return params, opt_state, 0.5

    monkeypatch.setattr(trainer, "step2", fake_step2)
    monkeypatch.setattr(trainer, "_set_context_statistics", lambda step: None)
    trainer.run(stop_after=3)
    assert seen == [(2, [0.0, 1.0]), (4, [0.0, 1.0, 2.0, 3.0]), (4, [0.0, 1.0, 2.0, 3.0])]
    bad = dataclasses.replace(tiny_config.train, stage2_frames_steps=5)
    with pytest.raises(ConfigError, match="train.stage2_frames_steps = 5 needs train.stage2_frames"):
        Trainer(dataclasses.replace(tiny_config, train=bad), tmp_path / "bad", progress=False)


@pytest.mark.parametrize("frames", [1, 99])
def test_stage2_frames_outside_the_horizon_are_refused(tiny_config, tmp_path, frames):
    from enfpde.trainer import Trainer

    config = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, stage2_frames=frames))
    with pytest.raises(ConfigError, match=rf"train.stage2_frames = {frames} must be in \[2, 4\]"):
        Trainer(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_dynamics_start_from_the_configured_velocity_scale(tiny_config):
    from enfpde.forecaster import build_modules, make_geometry

    model = dataclasses.replace(tiny_config.model, dynamics_output_scale=0.25)
    dynamics = build_modules(model, make_geometry(tiny_config.data), 1, seed=0)[2]
    assert float(dynamics.context_scale[...]) == float(dynamics.pose_scale[...]) == 0.25


def test_the_dynamics_stages_decode_stage2_points_random_points(tiny_config, tmp_path, monkeypatch):
    """stage2_points: each stage-2 step's loss reads that many of the step's points, a random draw that is a
    pure function of (seed, step): the same points on a second run, others at the next step."""
    from enfpde.trainer import Trainer

    def points_seen(run):
        train = dataclasses.replace(
            tiny_config.train, stage2_points=8, stage1=dataclasses.replace(tiny_config.train.stage1, epochs=0),
        )
        trainer = Trainer(dataclasses.replace(tiny_config, train=train), tmp_path / run, progress=False)
        seen = []

        def fake_step2(params, opt_state, rest, frozen, coords, values, times, key, mask):
            seen.append((np.asarray(coords), np.asarray(values)))
            return params, opt_state, 0.5

        monkeypatch.setattr(trainer, "step2", fake_step2)
        monkeypatch.setattr(trainer, "_set_context_statistics", lambda step: None)
        trainer.run(stop_after=2)
        return trainer, seen

    trainer, seen = points_seen("a")
    (coords0, values0), (coords1, _) = seen
    assert coords0.shape[0] == 8 and values0.shape[2] == 8
    full = trainer.sampler(0)
    internal = np.asarray(trainer.geometry.coords_from_user(full.coords))
    rows = [int(np.flatnonzero(np.all(np.isclose(internal, c), axis=1))[0]) for c in coords0]
    np.testing.assert_array_equal(values0, full.values[:, :, rows])  # the values of those very points
    assert not np.array_equal(coords0, coords1)
    _, again = points_seen("b")
    np.testing.assert_array_equal(again[0][0], coords0)


def test_stage2_points_beyond_the_step_points_are_refused(tiny_config, tmp_path):
    from enfpde.trainer import Trainer

    config = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, stage2_points=10**6))
    with pytest.raises(ConfigError, match=r"train.stage2_points = 1000000 must be in \[1, "):
        Trainer(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
