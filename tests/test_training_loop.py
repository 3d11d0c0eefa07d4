"""The training loop: run directory, checkpoints, resume after a kill, non-finite losses, data parallelism."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr
from flax import nnx

from enfpde import checkpointing
from enfpde.config import ConfigError, config_from_yaml, load_config, to_yaml
from enfpde.data.trajectories import TrajectoryDataset
from enfpde.forecaster import Forecaster
from enfpde.trainer import NonFiniteLossError, RunExistsError, Trainer, train



def model_leaves(run_dir):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(Forecaster.load(run_dir).modules))]


def test_run_directory_layout(tiny_run, tiny_config):
    assert config_from_yaml(tiny_run / "config.yaml") == tiny_config
    meta = json.loads((tiny_run / "model.json").read_text())
    assert meta["variables"] == ["u"] and meta["axes"] == ["y", "x"] and meta["horizon_time"] == 4.0
    train_split = TrajectoryDataset.open(tiny_config.data.train)  # statistics of the training split
    np.testing.assert_allclose(meta["normalizer"]["mean"], train_split.values.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(meta["normalizer"]["std"], train_split.values.std(axis=(0, 1, 2)), rtol=1e-5)
    records = checkpointing.read_metrics(tiny_run)
    assert [r["step"] for r in records] == list(range(8))
    assert [r["stage"] for r in records] == ["stage1"] * 4 + ["stage2"] * 4
    assert all(np.isfinite(r["loss"]) for r in records)
    assert sorted(int(p.name) for p in (tiny_run / "checkpoints").iterdir() if p.name.isdigit())[-1] == 8


def test_stage2_leaves_the_decoder_untouched(tiny_run, tmp_path, tiny_config):
    stage1_only = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, stage2=dataclasses.replace(tiny_config.train.stage2, epochs=0)))
    run = train(stage1_only, tmp_path / "s1", progress=False)
    a, b = Forecaster.load(run).modules, Forecaster.load(tiny_run).modules
    for x, y in zip(jax.tree.leaves(nnx.state(a[:2])), jax.tree.leaves(nnx.state(b[:2]))):
        np.testing.assert_array_equal(x, y)  # stage 2 froze the decoder and encoder
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(nnx.state(a[2])), jax.tree.leaves(nnx.state(b[2]))))


def test_dynamics_stage_standardizes_with_statistics_of_fitted_training_latents(tiny_run, tiny_config, tmp_path):
    """The statistics saved with the run are those of the latents the frozen encoder fits to the first training
    batches when stage 2 starts (recomputed here from the saved modules), and not the identity."""
    saved = Forecaster.load(tiny_run).modules[2]
    assert tiny_config.model.standardize_contexts
    assert float(jnp.abs(saved.context_mean[...]).min()) > 0.5  # contexts start at 1 and move a little
    assert float(jnp.abs(saved.context_std[...] - 1.0).min()) > 0.1
    shutil.copytree(tiny_run, tmp_path / "copy")
    trainer = Trainer(tiny_config, tmp_path / "copy", resume=True, progress=False)
    trainer.modules = Forecaster.load(tiny_run).modules  # stage 2 left the decoder and encoder as they were
    trainer.modules[2].context_mean[...] = jnp.zeros_like(saved.context_mean[...])
    trainer._set_context_statistics(trainer.schedule.boundaries[0])
    np.testing.assert_allclose(trainer.modules[2].context_mean[...], saved.context_mean[...], rtol=1e-6)
    np.testing.assert_allclose(trainer.modules[2].context_std[...], saved.context_std[...], rtol=1e-5)


def test_resume_after_kill_continues_the_same_sequence(tiny_run, tiny_config, tmp_path):
    """Kill a CLI training process with SIGKILL after its first checkpoint, resume it, and compare with the
    uninterrupted run: same losses, same final parameters."""
    preset = tmp_path / "tiny.yaml"
    preset.write_text(to_yaml(tiny_config))
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "enfpde.cli", "train", "--preset", str(preset), "--run-dir", str(run_dir), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (run_dir / "checkpoints").exists() and any(p.name.isdigit() for p in (run_dir / "checkpoints").iterdir()):
            break
        time.sleep(0.02)
    assert process.poll() is None, "training finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = len(checkpointing.read_metrics(run_dir))
    assert killed_at < 8
    Trainer(tiny_config, run_dir, resume=True, progress=False).run()
    resumed, reference = checkpointing.read_metrics(run_dir), checkpointing.read_metrics(tiny_run)
    assert [r["step"] for r in resumed] == list(range(8))
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in reference], rtol=1e-6)
    for x, y in zip(model_leaves(run_dir), model_leaves(tiny_run)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_existing_run_is_never_replaced_silently(tiny_run, tiny_config, tmp_path):
    before = sorted(p.name for p in tiny_run.iterdir())
    with pytest.raises(RunExistsError, match="--resume.*--overwrite"):
        Trainer(tiny_config, tiny_run, progress=False)
    assert sorted(p.name for p in tiny_run.iterdir()) == before
    # Even with --overwrite, a config that cannot train leaves the existing run as it was.
    copy = shutil.copytree(tiny_run, tmp_path / "copy")
    broken = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, horizon=99))
    with pytest.raises(ConfigError, match="data.horizon = 99"):
        Trainer(broken, copy, overwrite=True, progress=False)
    assert sorted(p.name for p in copy.iterdir()) == before
    assert config_from_yaml(copy / "config.yaml") == tiny_config


def test_resume_rejects_a_different_model(tiny_config, tmp_path):
    run = tmp_path / "r"
    Trainer(tiny_config, run, progress=False)  # writes config.yaml and model.json, trains nothing
    changed = dataclasses.replace(
        tiny_config, model=dataclasses.replace(tiny_config.model, latent_dim=4)
    )
    with pytest.raises(ConfigError, match=r"model.latent_dim: 8 -> 4"):
        Trainer(changed, run, resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    config = dataclasses.replace(
        tiny_config,
        train=dataclasses.replace(
            tiny_config.train, stage1=dataclasses.replace(tiny_config.train.stage1, learning_rate=1e30),
            clip_norm=1e30, checkpoint_every=1,
        ),
    )
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at step \d+ \(stage1.*last good checkpoint \(step \d+\)"):
        train(config, run, progress=False)
    forecaster = Forecaster.load(run)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(nnx.state(forecaster.modules)))
    last_logged = checkpointing.read_metrics(run)[-1]["step"]
    assert forecaster.step == last_logged + 1  # the checkpoint after the last finite step


def test_config_errors():
    with pytest.raises(ConfigError, match="nonexistent"):
        load_config(None, ["train.nonexistent=1"])
    with pytest.raises(ConfigError, match="epochs"):
        load_config(None, ["train.stage1.epochs=many"])
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["train.stage1.epochs"])
    with pytest.raises(FileNotFoundError, match="available presets"):
        load_config("no_such_preset")
    for preset in ("quick", "paper"):
        assert load_config(preset).data.geometry == "torus"


def test_a_run_saved_before_the_decoder_switches_loads_as_the_lean_decoder(tiny_config, tmp_path):
    text = to_yaml(tiny_config)
    old = "\n".join(
        line for line in text.splitlines()
        if line.strip().split(":")[0]
        not in ("context_stem", "full_width_heads", "embedding_mlp", "value_ffn", "value_mixer", "deep_head", "standardize_contexts")
    )
    (tmp_path / "old.yaml").write_text(old)
    model = config_from_yaml(tmp_path / "old.yaml").model
    assert not any((model.context_stem, model.full_width_heads, model.embedding_mlp, model.value_ffn, model.value_mixer, model.deep_head))
    assert not model.standardize_contexts  # nor did its dynamics standardise their inputs
    (tmp_path / "new.yaml").write_text(text)
    assert config_from_yaml(tmp_path / "new.yaml") == tiny_config  # saved runs keep their switches
    (tmp_path / "bad.yaml").write_text(text.replace("num_latents:", "num_latentz:"))
    with pytest.raises(ConfigError, match=r"invalid configuration in .*bad.yaml.*num_latentz"):
        config_from_yaml(tmp_path / "bad.yaml")


DATA_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    import jax, numpy as np
    from flax import nnx
    from enfpde.config import config_from_yaml
    from enfpde.trainer import Trainer
    from enfpde import checkpointing
    assert jax.device_count() == 2, jax.devices()
    config = config_from_yaml(sys.argv[1])
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("two", jax.devices())):
        trainer = Trainer(config, os.path.join(sys.argv[2], name), progress=False, devices=devices)
        trainer.run()
        leaves = jax.tree.leaves(nnx.state(trainer.modules))
        assert len(leaves[0].sharding.device_set) == len(devices), leaves[0].sharding  # replicated on every device
        out[name] = {"loss": [r["loss"] for r in checkpointing.read_metrics(trainer.run_dir)],
                     "params": [np.asarray(x).ravel().tolist() for x in leaves if np.issubdtype(np.asarray(x).dtype, np.floating)]}
    print(json.dumps(out))
    """
)


def test_data_parallel_on_two_simulated_devices_matches_one(tiny_config, tmp_path):
    preset = tmp_path / "tiny.yaml"
    short = dataclasses.replace(
        tiny_config,
        train=dataclasses.replace(
            tiny_config.train,
            stage1=dataclasses.replace(tiny_config.train.stage1, epochs=1),
            stage2=dataclasses.replace(tiny_config.train.stage2, epochs=1),
        ),
    )
    preset.write_text(to_yaml(short))
    result = subprocess.run(
        [sys.executable, "-c", DATA_PARALLEL_SCRIPT, str(preset), str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["two"]["loss"], out["one"]["loss"], rtol=2e-5)
    # Adam divides by the root of tiny second moments in its first steps, which amplifies the float
    # reassociation of the all-reduced gradients: compare parameters at the scale of one update (1e-3).
    for a, b in zip(out["two"]["params"], out["one"]["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_missing_points_and_the_joint_stage(tiny_data, tiny_config, tmp_path):
    """Training data with unobserved (NaN) points trains through the masked losses of all three stages; the
    joint stage then changes the decoder that stage 2 left frozen."""
    ds = xr.open_dataset(tiny_data / "train.nc").load()
    ds["u"] = ds.u.where((ds.x + ds.y) % 0.5 > 0.1)  # about a fifth of the points missing, in every frame
    ds.to_netcdf(tmp_path / "holes.nc")
    config = dataclasses.replace(
        tiny_config,
        data=dataclasses.replace(tiny_config.data, train=str(tmp_path / "holes.nc")),
        train=dataclasses.replace(
            tiny_config.train,
            stage1=dataclasses.replace(tiny_config.train.stage1, epochs=1),
            stage2=dataclasses.replace(tiny_config.train.stage2, epochs=1),
            joint=dataclasses.replace(tiny_config.train.joint, epochs=1),
        ),
    )
    trainer = Trainer(config, tmp_path / "run", progress=False)
    assert trainer.has_missing
    trainer.run(stop_after=4)  # end of stage 2
    decoder = [np.asarray(x) for x in jax.tree.leaves(nnx.state(trainer.modules[0], nnx.Param))]
    Trainer(config, tmp_path / "run", resume=True, progress=False).run()
    records = checkpointing.read_metrics(tmp_path / "run")
    assert [r["stage"] for r in records] == ["stage1"] * 2 + ["stage2"] * 2 + ["joint"] * 2
    assert all(np.isfinite(r["loss"]) for r in records)
    after = jax.tree.leaves(nnx.state(Forecaster.load(tmp_path / "run").modules[0], nnx.Param))
    assert any(not np.allclose(a, b) for a, b in zip(decoder, after))


def test_a_line_cut_short_by_a_kill_does_not_block_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    assert checkpointing.read_metrics(tmp_path) == [{"step": 0, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "lo\n{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        checkpointing.read_metrics(tmp_path)


def _with_epochs(config, stage1, stage2, **train):
    t = config.train
    return dataclasses.replace(
        config,
        train=dataclasses.replace(
            t, stage1=dataclasses.replace(t.stage1, epochs=stage1), stage2=dataclasses.replace(t.stage2, epochs=stage2), **train
        ),
    )


def test_resume_lengthens_stage1_to_the_uninterrupted_sequence(tiny_run, tiny_config, tmp_path):
    """A run trained with a shorter stage 1, resumed with the full schedule, equals the uninterrupted run."""
    run = tmp_path / "short"
    train(_with_epochs(tiny_config, 1, 0), run, progress=False)
    assert [r["stage"] for r in checkpointing.read_metrics(run)] == ["stage1"] * 2
    Trainer(tiny_config, run, resume=True, progress=False).run()
    resumed, reference = checkpointing.read_metrics(run), checkpointing.read_metrics(tiny_run)
    assert [(r["step"], r["stage"]) for r in resumed] == [(r["step"], r["stage"]) for r in reference]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in reference], rtol=1e-6)
    for x, y in zip(model_leaves(run), model_leaves(tiny_run)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_stage1_cannot_change_once_stage2_has_started(tiny_run, tiny_config, tmp_path):
    copy = shutil.copytree(tiny_run, tmp_path / "copy")
    before = (copy / "config.yaml").read_text()
    for stage1_epochs in (3, 1):
        with pytest.raises(ConfigError, match=r"cannot change train.stage1.epochs from 2 to %d.*step 8" % stage1_epochs):
            Trainer(_with_epochs(tiny_config, stage1_epochs, 2), copy, resume=True, progress=False)
    assert (copy / "config.yaml").read_text() == before  # refused before anything was written


def test_stage1_frames_draws_distinct_random_frames_per_trajectory(tiny_config, tmp_path):
    config = _with_epochs(tiny_config, 1, 0, stage1_frames=2)
    trainer = Trainer(config, tmp_path / "frames", progress=False)
    batch = trainer.sampler(0)
    b, t = batch.values.shape[:2]
    values, mask = trainer._stage1_frames(batch.values, batch.mask, 0)
    assert values.shape == (b * 2,) + batch.values.shape[2:] and mask.shape == (b * 2,) + batch.mask.shape[2:]
    for i in range(b):
        picked = [next(f for f in range(t) if np.array_equal(values[2 * i + j], batch.values[i, f])) for j in range(2)]
        assert picked[0] != picked[1]
    again, _ = trainer._stage1_frames(batch.values, batch.mask, 0)
    np.testing.assert_array_equal(values, again)  # a pure function of (seed, step)
    draws = {trainer._stage1_frames(batch.values, batch.mask, s)[0].tobytes() for s in range(6)}
    assert len(draws) > 1
    trainer.run()
    assert len(checkpointing.read_metrics(tmp_path / "frames")) == trainer.schedule.total_steps
    with pytest.raises(ConfigError, match=r"train.stage1_frames = 5 must be in \[1, 4\]"):
        Trainer(_with_epochs(tiny_config, 1, 0, stage1_frames=5), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_learning_rate_schedules():
    from enfpde.training import learning_rate_schedule

    assert learning_rate_schedule(1e-3, 100) == 1e-3  # constant: a float, no schedule state
    warm = learning_rate_schedule(1e-3, 100, warmup_steps=10)
    np.testing.assert_allclose([warm(0), warm(5), warm(10), warm(99)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    cosine = learning_rate_schedule(1e-3, 100, warmup_steps=10, decay="cosine", final_fraction=0.1)
    np.testing.assert_allclose([cosine(0), cosine(10), cosine(55), cosine(100)], [0.0, 1e-3, 5.5e-4, 1e-4], rtol=1e-5)
    assert all(cosine(s) >= cosine(s + 1) for s in range(10, 100))  # decays monotonically after the warmup
    for override, message in [
        ("train.stage1.decay=linear", r"decay must be one of \['constant', 'cosine'\], found 'linear'"),
        ("train.stage2.warmup_steps=-1", "warmup_steps must be >= 0, found -1"),
        ("train.joint.final_lr_fraction=2", r"final_lr_fraction must be in \[0, 1\], found 2.0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def _with_stage1_schedule(config, **schedule):
    t = config.train
    return dataclasses.replace(config, train=dataclasses.replace(t, stage1=dataclasses.replace(t.stage1, **schedule)))


def test_a_cosine_schedule_trains_resumes_and_cannot_be_dropped_on_resume(tiny_config, tmp_path):
    # Stage 1 alone (4 steps): the schedule is the stage's own.
    config = _with_stage1_schedule(_with_epochs(tiny_config, 2, 0), warmup_steps=1, decay="cosine", learning_rate=1e-2)
    run = tmp_path / "cosine"
    train(config, run, progress=False, stop_after=3)
    # The schedule's step count is saved with the optimiser state: the resumed run equals the uninterrupted one.
    Trainer(config, run, resume=True, progress=False).run()
    whole = tmp_path / "whole"
    train(config, whole, progress=False)
    np.testing.assert_allclose(
        [r["loss"] for r in checkpointing.read_metrics(run)], [r["loss"] for r in checkpointing.read_metrics(whole)], rtol=1e-6
    )
    # Step 0 has learning rate 0: the decoder's parameters do not move in the first step.
    first = tmp_path / "first"
    train(config, first, progress=False, stop_after=1)
    fresh = Trainer(config, tmp_path / "fresh", progress=False)
    for x, y in zip(model_leaves(first), [np.asarray(x) for x in jax.tree.leaves(nnx.state(fresh.modules))]):
        np.testing.assert_array_equal(x, y)
    # Reshaping the schedule on resume is allowed; dropping it (or adding one to a constant run) is refused.
    Trainer(_with_stage1_schedule(config, final_lr_fraction=0.5), run, resume=True, progress=False)
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"train.stage1 changed from a schedule \(warmup 1, cosine\) to a constant"):
        Trainer(_with_stage1_schedule(config, warmup_steps=0, decay="constant"), run, resume=True, progress=False)
    assert (run / "config.yaml").read_text() == before


RELEASED_DECODER = dict(
    context_stem=True, full_width_heads=True, embedding_mlp=True, value_ffn=True, value_mixer=True, deep_head=True
)


def test_the_released_decoder_trains_saves_and_reloads(tiny_config, tiny_data, forecaster, tmp_path):
    """The shared tiny run has the lean decoder; the released one (the paper preset's) goes through the same
    pipeline here: both stages train, the checkpoint holds every parameter of its extra parts, and the loaded
    forecaster has exactly the trained state and forecasts."""
    config = _with_epochs(dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, **RELEASED_DECODER)), 1, 1)
    trainer = Trainer(config, tmp_path / "released", progress=False)
    trainer.run()
    loaded = Forecaster.load(tmp_path / "released", batch_size=2)
    trained, restored = (jax.tree.leaves(nnx.state(m)) for m in (trainer.modules, loaded.modules))
    assert len(trained) == len(restored) > len(jax.tree.leaves(nnx.state(forecaster.modules)))  # more than the lean one
    for a, b in zip(trained, restored):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with xr.open_dataset(tiny_data / "test.nc") as ds:
        out = loaded.forecast(ds.isel(time=[0]).load(), [0.0, 1.0])
    assert out.u.shape == (3, 2, 8, 8) and np.isfinite(out.u.values).all()


def test_a_resumed_run_logs_cumulative_clocks(tiny_config, tmp_path):
    """A resumed process continues the log's wall and CPU clocks from its last kept line, so the cost before the
    resume is kept even where the new process's first line comes later than that (stage 2's setup runs first)
    and no restart of the clocks could be seen; the summed cost of the whole run is the last line's."""
    from enfpde.experiment import cumulative_seconds

    run_dir = tmp_path / "run"
    Trainer(tiny_config, run_dir, progress=False).run(stop_after=4)  # stage 1 only
    first = checkpointing.read_metrics(run_dir)
    first[-1].update(elapsed_s=1000.0, cpu_s=2000.0)  # as if stage 1 had been long: the resume must go on from there
    (run_dir / checkpointing.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in first))
    Trainer(tiny_config, run_dir, resume=True, progress=False).run()
    records = checkpointing.read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(8))
    assert records[:4] == first
    for key, before in (("elapsed_s", 1000.0), ("cpu_s", 2000.0)):
        clock = np.array([r[key] for r in records])
        assert np.all(clock[4:] > before) and np.all(np.diff(clock[3:]) >= 0), (key, clock)
        np.testing.assert_allclose(cumulative_seconds(records, key), clock)


def test_cumulative_seconds_sums_logs_whose_clocks_restart():
    """Logs written before clocks were continued restart from 0 in every resumed process."""
    from enfpde.experiment import cumulative_seconds

    records = [{"cpu_s": v} for v in (1.0, 2.0, 0.5, 1.5, 0.25)]
    np.testing.assert_allclose(cumulative_seconds(records, "cpu_s"), [1.0, 2.0, 2.5, 3.5, 3.75])
