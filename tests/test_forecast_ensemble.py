"""The quarter-turn forecast ensemble (``model.forecast_ensemble: quarter_turns``, Forecaster.predict): turned
points, the mean of the four turned forecasts, its exact equivariance, and the checks that refuse it."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from enfpde.cli import main
from enfpde.config import ConfigError, load_config
from enfpde.data.augmentation import quarter_turn_permutations, turn_points
from enfpde.forecaster import Forecaster, build_modules, make_geometry


def _periodic_distances(points, L):
    d = np.abs(points[:, None] - points[None])
    return np.linalg.norm(np.minimum(d, L - d), axis=-1)


def test_turned_points_are_a_rotation_of_the_torus_that_four_turns_undo():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 2.0, size=(30, 2))
    once = turn_points(points, (2.0, 2.0), 1)
    assert not np.allclose(once, points)
    np.testing.assert_allclose(once, np.stack([np.mod(-points[:, 1], 2.0), points[:, 0]], 1))
    np.testing.assert_allclose(_periodic_distances(once, 2.0), _periodic_distances(points, 2.0), atol=1e-12)
    np.testing.assert_allclose(turn_points(points, (2.0, 2.0), 4), points, atol=1e-12)
    np.testing.assert_allclose(turn_points(turn_points(points, (2.0, 2.0), 3), (2.0, 2.0), 1), points, atol=1e-12)


def test_turned_points_need_a_square_2d_torus():
    with pytest.raises(ValueError, match="square 2-D torus"):
        turn_points(np.zeros((3, 2)), (1.0, 2.0), 1)
    with pytest.raises(ValueError, match="square 2-D torus"):
        turn_points(np.zeros((3, 3)), (1.0, 1.0, 1.0), 1)


def _turn_ensemble(forecaster, ensemble="quarter_turns"):
    """The session forecaster's model as a run trained with quarter-turn augmentation, forecasting with ``ensemble``."""
    config = forecaster.config
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, augment="quarter_turns"))
    return Forecaster(config, forecaster.metadata, *nnx.clone(forecaster.modules), batch_size=2, ensemble=ensemble)


def _test_states(tiny_data):
    from enfpde.data.trajectories import TrajectoryDataset

    test = TrajectoryDataset.open(tiny_data / "test.nc")
    return np.asarray(test.coords), test.values[:, 0], test.times[:4] - test.times[0]


def test_the_ensemble_is_the_mean_of_the_forecasts_from_turned_points(forecaster, tiny_data):
    coords, states, times = _test_states(tiny_data)
    query = np.random.default_rng(1).uniform(0, 1, size=(7, 2))
    ensemble = _turn_ensemble(forecaster).predict(coords, states, times, query)
    single = _turn_ensemble(forecaster, "none")
    L = single.geometry.periods
    views = [single.predict(turn_points(coords, L, k), states, times, turn_points(query, L, k)) for k in range(4)]
    np.testing.assert_allclose(ensemble, np.mean(views, axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(views[0], views[1], atol=1e-4)  # the turned forecasts differ: the mean is not one of them


def test_the_ensemble_forecast_is_exactly_equivariant_under_quarter_turns(forecaster, tiny_data):
    """Forecasting the turned initial state gives the turned forecast, to float32 tolerance; the single model
    (translation-equivariant only) does not."""
    coords, states, times = _test_states(tiny_data)
    perms = quarter_turn_permutations(coords, forecaster.geometry.periods)
    for ensemble, equivariant in (("quarter_turns", True), ("none", False)):
        model = _turn_ensemble(forecaster, ensemble)
        forecast = model.predict(coords, states, times)  # [B, T, M, C]
        from_turned = model.predict(coords, states[:, perms[1]], times)
        gap = np.abs(from_turned - forecast[:, :, perms[1]]).max()
        scale = np.abs(forecast).max()
        if equivariant:
            assert gap < 1e-5 * scale
        else:
            assert gap > 1e-3 * scale


def test_an_ensemble_over_turns_the_run_was_not_trained_for_is_refused(forecaster, tiny_run, capsys):
    with pytest.raises(ConfigError, match="train.augment: quarter_turns"):
        Forecaster(forecaster.config, forecaster.metadata, *forecaster.modules, ensemble="quarter_turns")
    with pytest.raises(ConfigError, match="forecast ensemble must be one of"):
        Forecaster(forecaster.config, forecaster.metadata, *forecaster.modules, ensemble="turns")
    with pytest.raises(ConfigError, match="train.augment: quarter_turns"):
        load_config(None, ["model.forecast_ensemble=quarter_turns"])
    with pytest.raises(ConfigError, match=r"model.forecast_ensemble must be one of \['none', 'quarter_turns'\]"):
        load_config(None, ["model.forecast_ensemble=mean", "train.augment=quarter_turns"])
    sphere_data = dataclasses.replace(forecaster.config.data, geometry="sphere")
    turned = dataclasses.replace(forecaster.config, data=sphere_data,
                                 train=dataclasses.replace(forecaster.config.train, augment="quarter_turns"))
    on_sphere = build_modules(turned.model, make_geometry(sphere_data), 1, seed=0)
    with pytest.raises(ValueError, match="needs a torus model; this one's geometry is Sphere"):
        Forecaster(turned, forecaster.metadata, *on_sphere, ensemble="quarter_turns")
    assert main(["evaluate", str(tiny_run), "--ensemble", "quarter_turns", "--no-figures"]) == 2
    assert "train.augment: quarter_turns" in capsys.readouterr().err
    assert not (tiny_run / "eval_quarter_turns").exists()
