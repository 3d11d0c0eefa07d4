"""Quarter-turn augmentation: the point permutations, the sampler that applies them, the trainer's checks, and
the physics it relies on (a turned Navier-Stokes trajectory is the trajectory of the turned initial state)."""

import numpy as np
import pytest

from enfpde.config import ConfigError
from enfpde.data.augmentation import check_quarter_turn_data, quarter_turn_permutations
from enfpde.data.trajectories import BatchSampler, Normalizer, TrajectoryDataset


def grid(n, L=1.0):
    """Points of an n x n grid, flattened y-major like the data files: ``[n * n, 2]`` (x, y)."""
    y, x = np.meshgrid(np.arange(n) * L / n, np.arange(n) * L / n, indexing="ij")
    return np.stack([x.ravel(), y.ravel()], axis=1)


def test_quarter_turns_turn_a_grid_field_like_rot90():
    n = 8
    field = np.random.default_rng(0).normal(size=(n, n))  # [y, x]
    perms = quarter_turn_permutations(grid(n), (1.0, 1.0))
    for k in range(4):
        turned = field.ravel()[perms[k]].reshape(n, n)
        # w_k(x, y) = w(R^-k (x, y)), R (x, y) = (-y, x): on the [y, x] array a turn about index 0 with wrap-around.
        expected = field
        for _ in range(k):
            expected = np.array([[expected[(-x) % n, y] for x in range(n)] for y in range(n)])
        np.testing.assert_array_equal(turned, expected)
    np.testing.assert_array_equal(perms[1][perms[3]], np.arange(n * n))  # a turn and three more are the identity
    assert len({tuple(p) for p in perms}) == 4


def test_a_function_of_the_coordinates_turns_as_the_formula_says():
    coords = grid(16, L=2.0)
    perms = quarter_turn_permutations(coords, (2.0, 2.0))
    f = lambda x, y: np.sin(np.pi * x) + 0.5 * np.cos(np.pi * y) ** 3 + 0.1 * np.sin(np.pi * (x + 2 * y))
    values = f(coords[:, 0], coords[:, 1])
    # R^-1 (x, y) = (y, -x)
    np.testing.assert_allclose(values[perms[1]], f(coords[:, 1], -coords[:, 0]), atol=1e-12)


@pytest.mark.parametrize(
    "coords, periods, message",
    [
        (grid(4), (1.0, 2.0), "square torus"),
        (grid(4), (1.0, 1.0, 1.0), "2-D torus"),
        (grid(4) + [0.1, 0.0], (1.0, 1.0), "not mapped onto themselves"),
        (np.concatenate([grid(4), grid(4)[:1]]), (1.0, 1.0), "distinct points"),
    ],
)
def test_points_a_quarter_turn_does_not_permute_are_refused(coords, periods, message):
    with pytest.raises(ValueError, match=message):
        quarter_turn_permutations(coords, periods)


def test_data_that_is_not_known_to_be_invariant_is_refused():
    check_quarter_turn_data({"forcing_kind": "cosine"}, ["vorticity"])
    check_quarter_turn_data({}, ["vorticity"])
    with pytest.raises(ValueError, match=r"forcing is 'diagonal'"):
        check_quarter_turn_data({"forcing_kind": "diagonal"}, ["vorticity"])
    with pytest.raises(ValueError, match=r"variables \['u', 'v'\]"):
        check_quarter_turn_data({}, ["u", "v"])


def test_sampler_turns_each_trajectory_deterministically(tiny_data):
    data = TrajectoryDataset.open(tiny_data / "train.nc")
    normalizer = Normalizer.fit(data.values)
    perms = quarter_turn_permutations(data.coords, (1.0, 1.0))
    plain = BatchSampler(data, normalizer, 4, 10, seed=3)
    turned = BatchSampler(data, normalizer, 4, 10, seed=3, permutations=perms)
    seen = set()
    for step in range(6):
        a, b = plain(step), turned(step)
        np.testing.assert_array_equal(a.trajectories, b.trajectories)
        np.testing.assert_array_equal(a.coords, b.coords)
        for row, trajectory in enumerate(b.trajectories):
            matches = [k for k in range(4) if np.array_equal(b.values[row], plain.values[trajectory][:, perms[k][_points(plain, step)]])]
            assert matches, "every row is one of the four turns of its trajectory"
            seen.add(matches[0])
        np.testing.assert_array_equal(turned(step).values, b.values)  # a pure function of the step
        rows = slice(1, 3)  # one process's share is those rows of the whole batch
        np.testing.assert_array_equal(turned(step, rows=rows).values, b.values[rows])
    assert seen == {0, 1, 2, 3}


def _points(sampler, step):
    m = sampler.coords.shape[0]
    return np.random.default_rng([sampler.seed, 1, step]).choice(m, sampler.num_points, replace=False)


def test_trainer_checks_the_augmentation(tiny_config, tmp_path):
    import dataclasses

    from enfpde.trainer import Trainer

    bad = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, augment="reflections"))
    with pytest.raises(ConfigError, match="train.augment must be null or 'quarter_turns'"):
        Trainer(bad, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    good = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, augment="quarter_turns"))
    trainer = Trainer(good, tmp_path / "b", progress=False)
    assert trainer.sampler.permutations.shape == (4, trainer.train_data.coords.shape[0])


def test_a_turned_navier_stokes_trajectory_solves_the_equation_from_the_turned_state():
    """The physics the augmentation relies on: with the protocol's cosine forcing, the solver's trajectory from
    a turned initial vorticity is the turned trajectory (to float32 round-off); with DINo's diagonal forcing,
    which a quarter turn changes, it is not."""
    from enfpde.data.navier_stokes import CosineForcing, DiagonalForcing, VorticitySolver

    n = 32
    perm = quarter_turn_permutations(grid(n), (1.0, 1.0))[1]
    w0 = _smooth_field(n)
    turned0 = w0.ravel()[perm].reshape(n, n)
    for forcing, invariant in ((CosineForcing(0.3, 2), True), (DiagonalForcing(0.3, 2), False)):
        solver = VorticitySolver(n, viscosity=1e-3, forcing=forcing, dt=1e-3)
        a = np.asarray(solver.simulate(w0[None], 3, 0.5))[0].reshape(3, -1)
        b = np.asarray(solver.simulate(turned0[None], 3, 0.5))[0].reshape(3, -1)
        error = np.abs(b - a[:, perm]).max() / np.abs(a).max()
        assert (error < 1e-4) if invariant else (error > 1e-2), (forcing, error)


def _smooth_field(n):
    rng = np.random.default_rng(0)
    k = np.fft.fftfreq(n) * n
    low = (np.add.outer(k**2, k**2) <= 16).astype(float)
    return np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(n, n))) * low)).astype(np.float32) * 3
