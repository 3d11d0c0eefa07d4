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
