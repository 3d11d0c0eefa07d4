"""experiments/from_stage1.py: a preset started from another run's identical stage 1 continues as if it had trained
that stage itself, and presets whose stage 1 differs are refused."""

import dataclasses
import importlib.util
import sys

import numpy as np
import pytest

from enfpde import checkpointing
from enfpde.config import REPOSITORY_ROOT, to_yaml
from enfpde.trainer import Trainer


def _script():
    spec = importlib.util.spec_from_file_location("from_stage1", REPOSITORY_ROOT / "experiments" / "from_stage1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start(script, monkeypatch, base, preset, run_dir):
    monkeypatch.setattr(sys, "argv", ["from_stage1.py", str(base), "--preset", str(preset), "--run-dir", str(run_dir)])
    script.main()


def test_a_preset_started_from_a_shared_stage1_repeats_the_run_from_scratch(tiny_config, tmp_path, monkeypatch):
    script = _script()
    one_epoch = dataclasses.replace(tiny_config.train.stage1, epochs=1)
    base_config = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, stage1=one_epoch, checkpoint_every=1))
    latent = dataclasses.replace(
        base_config, name="latent", model=dataclasses.replace(base_config.model, dynamics_move_poses=False),
        train=dataclasses.replace(base_config.train, stage2_targets="latents"),
    )
    preset = tmp_path / "latent.yaml"
    preset.write_text(to_yaml(latent))
    assert _script().stage1_differences(base_config, latent) == ["model.dynamics_move_poses"]

    # The model is part of the checkpoint's shapes and of stage 1's config: only stage-2 settings may differ.
    base = tmp_path / "base"
    Trainer(dataclasses.replace(base_config, model=latent.model), base, progress=False).run(stop_after=3)  # stage 1 + 1 step
    started = tmp_path / "started"
    _start(script, monkeypatch, base, preset, started)
    Trainer(latent, started, resume=True, progress=False).run()
    scratch = tmp_path / "scratch"
    Trainer(latent, scratch, progress=False).run()
    started_log, scratch_log = checkpointing.read_metrics(started), checkpointing.read_metrics(scratch)
    assert [r["step"] for r in started_log] == [r["step"] for r in scratch_log]
    np.testing.assert_allclose([r["loss"] for r in started_log], [r["loss"] for r in scratch_log], rtol=1e-5)


def test_a_preset_with_another_stage1_is_refused_and_nothing_is_written(tiny_config, tmp_path, monkeypatch):
    script = _script()
    base = tmp_path / "base"
    Trainer(tiny_config, base, progress=False)  # config and metadata are enough for the comparison
    other = dataclasses.replace(tiny_config, train=dataclasses.replace(
        tiny_config.train, stage1=dataclasses.replace(tiny_config.train.stage1, learning_rate=3e-3)))
    preset = tmp_path / "other.yaml"
    preset.write_text(to_yaml(other))
    with pytest.raises(SystemExit, match=r"differ in \['train.stage1.learning_rate'\]"):
        _start(script, monkeypatch, base, preset, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="exists; this never replaces a run"):
        _start(script, monkeypatch, base, preset, existing)
    assert (existing / "keep.txt").read_text() == "mine"
