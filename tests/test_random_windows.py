"""Random time windows of the training trajectories (BatchSampler ``window``, ``train.random_windows``)."""

import dataclasses

import numpy as np
import pytest

from enfpde.config import ConfigError
from enfpde.data.augmentation import quarter_turn_permutations
from enfpde.data.trajectories import BatchSampler, Normalizer, TrajectoryDataset
from enfpde.testing import advected_waves_dataset


@pytest.fixture(scope="module")
def waves():
    return TrajectoryDataset.from_xarray(advected_waves_dataset(num_trajectories=5, num_frames=6, resolution=6))


def _points(sampler, step):
    m = sampler.coords.shape[0]
    return np.random.default_rng([sampler.seed, 1, step]).choice(m, sampler.num_points, replace=False)


def test_each_row_is_a_window_of_consecutive_frames_of_its_trajectory(waves):
    normalizer = Normalizer.fit(waves.values)
    sampler = BatchSampler(waves, normalizer, batch_size=2, num_points=10, seed=1, window=3)
    expected = normalizer.normalize(waves.values)
    starts_seen = set()
    for step in range(12):
        batch = sampler(step)
        assert batch.values.shape == (2, 3, 10, 1) and batch.mask.shape == (2, 3, 10)
        points = _points(sampler, step)
        for row, (trajectory, start) in enumerate(zip(batch.trajectories, batch.start_frames)):
            assert 0 <= start <= 6 - 3
            np.testing.assert_allclose(batch.values[row], expected[trajectory, start : start + 3][:, points], rtol=1e-6)
            starts_seen.add(int(start))
        np.testing.assert_array_equal(sampler(step).values, batch.values)  # a pure function of the step
        rows = slice(1, 2)  # one process's share is those rows of the whole batch
        np.testing.assert_array_equal(sampler(step, rows=rows).values, batch.values[rows])
        np.testing.assert_array_equal(sampler(step, rows=rows).start_frames, batch.start_frames[rows])
    assert starts_seen == {0, 1, 2, 3}


def test_without_a_window_rows_start_at_frame_zero(waves):
    batch = BatchSampler(waves, Normalizer.fit(waves.values), 2, 10, frames=slice(0, 4), seed=1)(0)
    assert batch.values.shape[1] == 4 and not batch.start_frames.any()


def test_windows_compose_with_quarter_turns(tiny_data):
    data = TrajectoryDataset.open(tiny_data / "train.nc")
    normalizer = Normalizer.fit(data.values)
    perms = quarter_turn_permutations(data.coords, (1.0, 1.0))
    sampler = BatchSampler(data, normalizer, 4, 10, seed=3, permutations=perms, window=4)
    expected = normalizer.normalize(data.values)
    for step in range(4):
        batch = sampler(step)
        points = _points(sampler, step)
        for row, (trajectory, start) in enumerate(zip(batch.trajectories, batch.start_frames)):
            window = expected[trajectory, start : start + 4]
            assert any(np.allclose(batch.values[row], window[:, perms[k][points]], rtol=1e-6) for k in range(4))


def test_a_window_longer_than_the_frames_is_refused(waves):
    with pytest.raises(ValueError, match=r"window must be in \[1, 4\].*found 5"):
        BatchSampler(waves, Normalizer.fit(waves.values), 2, 10, frames=slice(0, 4), window=5)


def test_trainer_draws_horizon_windows_from_the_whole_file(tiny_config, tmp_path):
    from enfpde.trainer import Trainer

    config = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, random_windows=True))
    trainer = Trainer(config, tmp_path / "run", progress=False)
    horizon = config.data.horizon
    assert trainer.sampler.window == horizon
    assert trainer.sampler.values.shape[1] == trainer.train_data.num_frames > horizon
    assert trainer.sampler(0).values.shape[1] == horizon
    np.testing.assert_allclose(np.asarray(trainer.times), np.arange(horizon))  # lead times of every window


def test_unequally_spaced_frames_are_refused_before_the_run_directory_is_made(tiny_config, tmp_path):
    from enfpde.trainer import Trainer

    waves = advected_waves_dataset(4, 6, 8, seed=0)
    waves = waves.assign_coords(time=("time", np.array([0.0, 1.0, 2.0, 3.0, 5.0, 6.0]), {"units": "1"}))
    waves.to_netcdf(tmp_path / "uneven.nc")
    config = dataclasses.replace(
        tiny_config,
        data=dataclasses.replace(tiny_config.data, train=str(tmp_path / "uneven.nc")),
        train=dataclasses.replace(tiny_config.train, random_windows=True),
    )
    with pytest.raises(ConfigError, match=r"random_windows needs equally spaced frames.*\[1\.0, 2\.0\]"):
        Trainer(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()

