"""Tests of the FNO and DINo baselines: symmetry and spectral truncation of the FNO, the grid operations that
let it answer the ArrayForecaster protocol (filling sparse states, bilinear periodic interpolation, time
interpolation), DINo's decoder and ODE, training, the protocol itself, checkpoints and error messages.

Tiny sizes; the trained models are module-scoped fixtures shared by the tests.
"""

import numpy as np
import pytest

import enfpde  # noqa: F401  (XLA settings first)

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from enfpde.baselines import dino, fno
from enfpde.baselines.common import Grid, SphereDomain, TorusDomain
from enfpde.data.trajectories import Normalizer, TrajectoryDataset, grid_points
from enfpde.evaluation import ArrayForecaster, evaluate
from enfpde.testing import advected_waves_dataset

FNO_CONFIG = fno.FNOConfig(modes=3, width=8, depth=2, history=2, projection_width=16)
DINO_CONFIG = dino.DINoConfig(
    code_dim=8, width=16, num_layers=2, frequency_scale=8.0, dynamics_width=32, dynamics_layers=2, fit_steps=100
)
HORIZON = 4


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def train_data():
    return TrajectoryDataset.from_xarray(advected_waves_dataset(4, 6, 8, seed=0))


@pytest.fixture(scope="module")
def test_data():
    return TrajectoryDataset.from_xarray(advected_waves_dataset(3, 6, 8, seed=1))


@pytest.fixture(scope="module")
def fno_model(train_data):
    training = fno.FNOTrainConfig(batch_size=2, rollout_steps=2, learning_rate=1e-2)
    return fno.train(train_data, FNO_CONFIG, training, horizon=HORIZON, steps=25, seed=0, progress=False)


@pytest.fixture(scope="module")
def dino_model(train_data):
    training = dino.DINoTrainConfig(batch_size=4, code_learning_rate=1e-2, teacher_forcing_every=5)
    return dino.train(train_data, DINO_CONFIG, training, horizon=HORIZON, steps=25, seed=0, progress=False)


@pytest.fixture(scope="module")
def models(fno_model, dino_model):
    return {"fno": fno_model, "dino": dino_model}


def off_grid_queries(n=7, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, 2))


# ---------------------------------------------------------------------------------------------------------
# FNO: spectral convolution and shift equivariance
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spectral():
    conv = fno.SpectralConv2d(3, 4, 3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(conv)
    return conv, jax.jit(lambda x: nnx.merge(graphdef, state)(x))


@pytest.mark.parametrize("shift", [(1, 3), (5, 2), (-2, 7)])
def test_spectral_conv_commutes_with_periodic_shifts(spectral, shift):
    _, apply = spectral
    x = jax.random.normal(jax.random.key(1), (2, 8, 12, 3))  # non-square grid, batch 2
    rolled_in = apply(jnp.roll(x, shift, axis=(1, 2)))
    rolled_out = jnp.roll(apply(x), shift, axis=(1, 2))
    assert relative_error(rolled_in, rolled_out) < 1e-5


@pytest.mark.parametrize(
    "ky, kx, kept",
    [(0, 0, True), (2, 1, True), (-2, 1, True), (-1, 2, True), (3, 0, False), (-3, 1, False), (1, 3, False), (4, 4, False)],
)
def test_spectral_conv_keeps_exactly_the_truncated_modes(spectral, ky, kx, kept):
    """A plane wave ``cos(2 pi (ky i / H + kx j / W))`` passes (as the same wave, any phase and channel mix)
    iff ``|ky| < modes`` (negative frequencies along the first axis included) and ``kx < modes``."""
    _, apply = spectral
    h, w = 8, 12
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    wave = np.cos(2 * np.pi * (ky * i / h + kx * j / w))
    x = jnp.asarray(np.stack([wave, 0.5 * wave, -wave], -1)[None], jnp.float32)
    out = np.asarray(apply(x))[0]
    spectrum = np.abs(np.fft.fft2(out, axes=(0, 1)))
    if not kept:
        assert np.max(np.abs(out)) < 1e-6
        return
    assert np.max(np.abs(out)) > 1e-3
    support = np.zeros((h, w), bool)
    support[ky % h, kx % w] = support[-ky % h, -kx % w] = True
    assert spectrum[~support].max() < 1e-5 * spectrum[support].max()


@pytest.fixture(scope="module")
def fno_steps():
    """A plain FNO and one with coordinate features on an 8 x 12 torus grid and a 6 x 12 sphere grid."""
    out = {}
    for name, features in [
        ("plain", None),
        ("torus", TorusDomain((1.0, 2.0)).grid_features((np.arange(8) / 8, 2 * np.arange(12) / 12))),
        ("sphere", SphereDomain().grid_features((np.linspace(-75, 75, 6), np.arange(12) * 30.0))),
    ]:
        num_features = 0 if features is None else features.shape[-1]
        config = fno.FNOConfig(modes=3, width=8, depth=2, history=2, coordinate_features=features is not None)
        model = fno.FNO(2, num_features, config, rngs=nnx.Rngs(3))
        graphdef, state = nnx.split(model)
        apply = jax.jit(lambda window, feats, graphdef=graphdef, state=state: nnx.merge(graphdef, state)(window, feats))
        out[name] = (apply, None if features is None else jnp.asarray(features))
    return out


@pytest.mark.parametrize("name", ["plain", "torus", "sphere"])
def test_fno_commutes_with_periodic_shifts(fno_steps, name):
    """The FNO step is shift-equivariant as a map of (window, coordinate features): rolling both rolls the
    output. No non-trivial grid shift leaves the coordinate features invariant (sin/cos of one period per
    axis; on the sphere sin/cos of longitude), so with features the property holds for the joint map and is
    broken when only the field is rolled; the plain FNO (no features) commutes with rolls of the field.
    On the sphere only longitude rolls (rotations about the polar axis) are tested."""
    apply, features = fno_steps[name]
    h = 8 if features is None else features.shape[0]
    window = jax.random.normal(jax.random.key(2), (2, 2, h, 12, 2))  # [B, history, H, W, C]
    shift = (0, 5) if name == "sphere" else (3, 5)
    roll = lambda a, first_grid_axis: jnp.roll(a, shift, axis=(first_grid_axis, first_grid_axis + 1))
    reference = roll(apply(window, features), 1)
    moved = apply(roll(window, 2), None if features is None else roll(features, 0))
    assert relative_error(moved, reference) < 2e-5
    if features is not None:  # the features do carry position: rolling the field alone is not a symmetry
        assert relative_error(apply(roll(window, 2), features), reference) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# The grid: bilinear periodic interpolation and filling of sparse states
# ---------------------------------------------------------------------------------------------------------

TORUS_GRID = Grid(TorusDomain((1.0, 1.0)), (np.arange(8) / 8, np.arange(8) / 8))


def test_grid_interpolation_is_exact_at_nodes_bilinear_and_periodic():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 8, 8, 3))
    nodes = TORUS_GRID.points
    np.testing.assert_allclose(TORUS_GRID.interpolate(values, nodes), values.reshape(2, 64, 3), atol=1e-12)
    # Across the seam: x = 0.9375 is halfway between node 7 (0.875) and node 0 (1.0 = 0.0); y = 1.0 is node 0.
    q = np.array([[0.0625, 0.25], [1.0, 0.9375], [0.95, 0.99]])
    out = TORUS_GRID.interpolate(values, q)
    np.testing.assert_allclose(out[:, 0], 0.5 * (values[:, 0, 2] + values[:, 1, 2]), atol=1e-12)
    np.testing.assert_allclose(out[:, 1], 0.5 * (values[:, 0, 7] + values[:, 0, 0]), atol=1e-12)
    wy, wx = (0.95 - 0.875) * 8, (0.99 - 0.875) * 8
    expected = (1 - wy) * ((1 - wx) * values[:, 7, 7] + wx * values[:, 7, 0]) + wy * ((1 - wx) * values[:, 0, 7] + wx * values[:, 0, 0])
    np.testing.assert_allclose(out[:, 2], expected, atol=1e-12)


def test_grid_interpolation_on_the_sphere_wraps_longitude_and_clamps_latitude():
    lat = np.array([60.0, 20.0, -20.0, -60.0])  # descending, as ERA5
    lon = np.arange(8) * 45.0
    grid = Grid(SphereDomain(), (lat, lon))
    values = np.random.default_rng(1).normal(size=(4, 8, 1))
    out = grid.interpolate(values, np.array([[40.0, 337.5], [-90.0, 0.0], [60.0, -45.0]]))
    np.testing.assert_allclose(out[0], 0.5 * (0.5 * (values[0, 7] + values[0, 0]) + 0.5 * (values[1, 7] + values[1, 0])))
    np.testing.assert_allclose(out[1], values[3, 0])  # beyond the southernmost latitude: held constant
    np.testing.assert_allclose(out[2], values[0, 7])  # longitude -45 = 315


def test_grid_fill_keeps_observations_and_interpolates_across_the_seam():
    nodes = TORUS_GRID.points
    field = np.cos(2 * np.pi * nodes[:, 1])[None, :, None]  # cos(2 pi x)
    full = TORUS_GRID.fill(nodes, field)
    np.testing.assert_array_equal(full.reshape(1, 64, 1), field.astype(np.float32))
    # Column x = 0.875 missing: periodic linear interpolation between x = 0.75 (cos = 0) and x = 1 (cos = 1).
    sparse = field.copy()
    sparse[0, nodes[:, 1] == 0.875] = np.nan
    filled = TORUS_GRID.fill(nodes, sparse).reshape(64)
    np.testing.assert_allclose(filled[nodes[:, 1] == 0.875], 0.5, atol=1e-6)
    np.testing.assert_array_equal(filled[nodes[:, 1] != 0.875], field[0, nodes[:, 1] != 0.875, 0].astype(np.float32))
    # Random sparsity: observed nodes exact, the rest convex combinations of observations.
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 64, 2))
    values[rng.random((2, 64)) < 0.7] = np.nan
    out = TORUS_GRID.fill(nodes, values).reshape(2, 64, 2)
    observed = np.isfinite(values[..., 0])
    np.testing.assert_allclose(out[observed], values[observed], rtol=1e-6)
    for b in range(2):
        assert np.all(out[b] >= np.nanmin(values[b], axis=0) - 1e-6) and np.all(out[b] <= np.nanmax(values[b], axis=0) + 1e-6)


def test_grid_fill_from_other_points():
    """Observations on a 2x finer grid: the coarse nodes are among them and are taken exactly; a single
    observed point fills everything (nearest neighbour)."""
    fine = grid_points((np.arange(16) / 16, np.arange(16) / 16))
    values = np.sin(2 * np.pi * fine[:, :1]) + fine[:, 1:] ** 2
    out = TORUS_GRID.fill(fine, values[None]).reshape(64, 1)
    np.testing.assert_allclose(out, (np.sin(2 * np.pi * TORUS_GRID.points[:, :1]) + TORUS_GRID.points[:, 1:] ** 2), rtol=1e-6)
    one = np.full((1, 3, 1), np.nan)
    one[0, 1] = 2.5
    np.testing.assert_array_equal(TORUS_GRID.fill(fine[:3], one), 2.5)


# ---------------------------------------------------------------------------------------------------------
# DINo: decoder and ODE
# ---------------------------------------------------------------------------------------------------------


def test_dino_decoder_fits_a_smooth_field():
    """Optimising the code and the decoder (Adam 1e-2, 500 steps) fits a sum of sines on a 16 x 16 torus
    grid to an MSE below 1e-3 of the field's variance."""
    coords = grid_points((np.arange(16) / 16, np.arange(16) / 16))
    y, x = coords[:, 0], coords[:, 1]
    field = np.sin(2 * np.pi * x) + 0.5 * np.cos(4 * np.pi * y) + 0.3 * np.sin(2 * np.pi * (x + y))
    inputs = jnp.asarray(TorusDomain((1.0, 1.0)).field_inputs(coords))
    target = jnp.asarray(field, jnp.float32)[None, :, None]
    config = dino.DINoConfig(code_dim=16, width=32, num_layers=2, frequency_scale=16.0)
    graphdef, params = nnx.split(dino.ModulatedMFN(2, config, rngs=nnx.Rngs(0)), nnx.Param)
    optimizer = optax.adam(1e-2)

    def loss(p):
        params, code = p
        return jnp.mean((nnx.merge(graphdef, params)(inputs, code) - target) ** 2)

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, s = carry
            grads = jax.grad(loss)(p)
            updates, s = optimizer.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (p, optimizer.init(p)), None, length=500)[0][0]

    fitted = fit((params, jnp.zeros((1, 1, 16))))
    assert float(loss(fitted)) < 1e-3 * field.var()


def test_rk4_step_is_the_classical_method():
    """One step of dz/dt = -z from z0 with dt = 1 is z0 times the 4th-order Taylor polynomial of exp(-1),
    1 - 1 + 1/2 - 1/6 + 1/24, the same through diffeqsolve and through the single-step path of training."""
    linear = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    linear.kernel[...], linear.bias[...] = -jnp.eye(2), jnp.zeros(2)
    z0 = jnp.asarray([[1.0, -2.0]])
    expected = np.asarray(z0) * (1 - 1 + 1 / 2 - 1 / 6 + 1 / 24)
    np.testing.assert_allclose(dino.rk4_step(linear, z0), expected, rtol=1e-6)
    np.testing.assert_allclose(dino.integrate_codes(linear, z0, jnp.asarray([0.0, 1.0, 2.0]))[2], expected * 0.375, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Training and the forecasting protocol
# ---------------------------------------------------------------------------------------------------------


def test_training_decreases_the_loss(fno_model, dino_model):
    loss = fno_model.training_log["loss"]
    assert loss.shape == (25,) and np.all(np.isfinite(loss))
    assert loss[-5:].mean() < 0.3 * loss[:2].mean()
    rec = dino_model.training_log["reconstruction"]
    assert rec.shape == (25,) and np.all(np.isfinite(rec))
    assert rec[-5:].mean() < 0.5 * rec[:2].mean()
    assert np.all(np.isfinite(dino_model.training_log["dynamics"]))
    eps = dino_model.training_log["teacher_forcing"]
    assert eps[0] == pytest.approx(0.99) and eps[5] == pytest.approx(0.99**2) and np.all(np.diff(eps) <= 0)


@pytest.mark.parametrize("name", ["fno", "dino"])
def test_predict_follows_the_protocol(models, test_data, name):
    model = models[name]
    assert isinstance(model, ArrayForecaster)
    assert isinstance(model.num_parameters, int) and model.num_parameters > 0
    assert model.horizon_time == pytest.approx(HORIZON * 1.0)
    initial = test_data.values[:, 0]
    query = off_grid_queries()
    out = model.predict(test_data.coords, initial, test_data.times, query)
    assert out.shape == (3, 6, 7, 1) and out.dtype == np.float32 and np.all(np.isfinite(out))
    sparse = initial.copy()
    sparse[:, np.random.default_rng(0).random(64) < 0.5] = np.nan
    out_sparse = model.predict(test_data.coords, sparse, test_data.times, query)
    assert out_sparse.shape == (3, 6, 7, 1) and np.all(np.isfinite(out_sparse))
    # Scattered observations (off the grid).
    scattered = off_grid_queries(40, seed=1)
    values = np.cos(2 * np.pi * scattered[:, 1])[None, :, None] * np.ones((3, 1, 1))
    out_scattered = model.predict(scattered, values, test_data.times, query)
    assert out_scattered.shape == (3, 6, 7, 1) and np.all(np.isfinite(out_scattered))


@pytest.mark.parametrize("name", ["fno", "dino"])
def test_unobserved_points_are_ignored(models, test_data, name):
    """A state with NaN at some points forecasts exactly as the same state given at its observed points only."""
    initial = test_data.values[:, 0].copy()
    observed = np.random.default_rng(3).random(64) < 0.5
    initial[:, ~observed] = np.nan
    query = off_grid_queries()
    with_nan = models[name].predict(test_data.coords, initial, test_data.times, query)
    subset = models[name].predict(test_data.coords[observed], initial[:, observed], test_data.times, query)
    np.testing.assert_allclose(with_nan, subset, rtol=1e-4, atol=1e-5)


def test_fno_reconstructs_the_initial_state_and_interpolates_between_frames(fno_model, test_data):
    initial = test_data.values[:, 0]
    out = fno_model.predict(test_data.coords, initial, [0.0, 0.5, 1.0, 2.0], test_data.coords)
    np.testing.assert_array_equal(out[:, 0], initial)  # time 0 is the (fully observed) initial state
    np.testing.assert_allclose(out[:, 1], 0.5 * (out[:, 0] + out[:, 2]), rtol=1e-5, atol=1e-6)
    steps = fno_model.predict(test_data.coords, initial, [1.0, 2.0], test_data.coords)
    np.testing.assert_allclose(steps, out[:, 2:], rtol=1e-6, atol=1e-6)  # the same frames, whatever is asked
    strict = fno.FNOForecaster(
        fno_model.model, fno_model.config, fno_model.grid, fno_model.normalizer, variables=fno_model.variables,
        units=fno_model.units, frame_interval=1.0, horizon=HORIZON, interpolate_in_time=False,
    )
    with pytest.raises(ValueError, match=r"only at multiples of the training frame interval dt = 1.*\[0.5\]"):
        strict.predict(test_data.coords, initial, [0.0, 0.5, 1.0], test_data.coords)


def test_dino_integrates_one_step_per_frame_whatever_the_output_times(dino_model, test_data):
    initial = test_data.values[:2, 0]
    fine = dino_model.predict(test_data.coords, initial, [0.0, 0.25, 0.5, 1.0, 2.0], test_data.coords)
    coarse = dino_model.predict(test_data.coords, initial, [0.0, 1.0, 2.0], test_data.coords)
    np.testing.assert_allclose(fine[:, [0, 3, 4]], coarse, rtol=1e-5, atol=1e-6)
    assert not np.allclose(fine[:, 2], fine[:, 3])


def test_predict_does_not_recompile(models, test_data):
    """A second forecast with the same shapes (other values, another observation mask, other times with
    the same count) reuses the compiled programs."""
    initial, query = test_data.values[:, 0], off_grid_queries()
    sparse = initial.copy()
    sparse[:, ::2] = np.nan
    jitted = {"fno": [fno._forecast_frames], "dino": [dino._fit, dino._integrate, dino._decode]}
    for name, model in models.items():
        model.predict(test_data.coords, initial, test_data.times, query)
        before = [f._cache_size() for f in jitted[name]]
        model.predict(test_data.coords, sparse + 1.0, test_data.times, query)
        model.predict(test_data.coords, initial, test_data.times + 0.0, query + 0.01)
        assert [f._cache_size() for f in jitted[name]] == before, name


def test_fno_in_the_evaluation_harness(fno_model, test_data):
    """The harness runs every protocol setting on the FNO (sparse states filled, shifted states) and the
    trained FNO beats persistence."""
    results = evaluate(fno_model, test_data, horizon_time=fno_model.horizon_time, periodic_axes=("y", "x"), progress=False)
    assert set(results["settings"]) == {"standard", "sparse_50%", "sparse_5%", "shifted"}
    for entry in results["settings"].values():
        assert np.all(np.isfinite(entry["model"]["per_frame"]))
    standard = results["settings"]["standard"]
    assert standard["model"]["t_in"] < 0.2 * standard["persistence"]["t_in"]
    assert standard["model"]["t_out"] < 0.2 * standard["persistence"]["t_out"]


@pytest.mark.parametrize("name", ["fno", "dino"])
def test_save_load_round_trip(models, test_data, tmp_path, name):
    model = models[name]
    cls = {"fno": fno.FNOForecaster, "dino": dino.DINoForecaster}[name]
    path = model.save(tmp_path / name)
    loaded = cls.load(path)
    initial = test_data.values[:, 0].copy()
    initial[0, ::3] = np.nan
    args = (test_data.coords, initial, test_data.times, off_grid_queries())
    np.testing.assert_array_equal(loaded.predict(*args), model.predict(*args))
    assert loaded.num_parameters == model.num_parameters
    assert (loaded.variables, loaded.frame_interval, loaded.horizon) == (model.variables, model.frame_interval, model.horizon)
    np.testing.assert_array_equal(loaded.normalizer.mean, model.normalizer.mean)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        model.save(path)
    model.save(path, overwrite=True)
    other = {"fno": dino.DINoForecaster, "dino": fno.FNOForecaster}[name]
    with pytest.raises(ValueError, match=f"holds a '{name}' baseline"):
        other.load(path)


@pytest.mark.parametrize("name", ["fno", "dino"])
def test_predict_errors_are_clear(models, test_data, name):
    model = models[name]
    coords, initial, times = test_data.coords, test_data.values[:, 0], test_data.times
    query = off_grid_queries()
    who = type(model).__name__
    cases = [
        ((coords, initial[..., None], times, query), r"initial_values must be \[B, M, C\] = \[B, 64, 1\]"),
        ((coords, np.repeat(initial, 2, -1), times, query), r"initial_values must be \[B, M, C\]"),
        ((coords[:, :1], initial, times, query), r"coords must be \[M, 2\]"),
        ((coords, initial, times, query[:, :1]), r"query_coords must be \[Q, 2\]"),
        ((coords, initial, [0.0, 2.0, 1.0], query), "strictly increasing"),
        ((coords, initial, [-1.0, 0.0], query), "must be >= 0"),
        ((coords, np.full_like(initial, np.nan), times, query), "no observed point"),
        ((coords, initial, times, query + 1.5), r"must lie in \[0, L\)"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model.predict(*args)
    with pytest.raises(ValueError, match=who):
        model.predict(coords, initial[..., None], times, query)


def test_training_errors_are_clear(train_data):
    scattered = TrajectoryDataset(
        values=train_data.values, coords=train_data.coords, times=train_data.times, variables=("u",), units=("1",),
        axes=("y", "x"), grid_shape=None,
    )
    with pytest.raises(ValueError, match="needs data on a 2-D grid"):
        fno.train(scattered, FNO_CONFIG, horizon=4, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"pass periods=\(L_y, L_x\)"):
        dino.train(scattered, DINO_CONFIG, horizon=4, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"horizon = 9 must be an integer number of frames in \[2, 6\]"):
        fno.train(train_data, FNO_CONFIG, horizon=9, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"modes = 5 do not fit the 8 x 8 grid"):
        fno.train(train_data, fno.FNOConfig(modes=5), horizon=4, steps=1, progress=False)
    with pytest.raises(ValueError, match="rollout_steps = 4 exceeds the 3 steps"):
        fno.train(train_data, FNO_CONFIG, fno.FNOTrainConfig(rollout_steps=4), horizon=4, steps=1, progress=False)
    missing = TrajectoryDataset(**{**train_data.__dict__, "values": np.where(np.arange(64)[:, None] == 3, np.nan, train_data.values)})
    with pytest.raises(ValueError, match="trains on fully observed grids"):
        fno.train(missing, FNO_CONFIG, horizon=4, steps=1, progress=False)
    with pytest.raises(ValueError, match="width must be even"):
        dino.DINoConfig(width=15)
    with pytest.raises(ValueError, match="FNOConfig.modes must be a positive integer"):
        fno.FNOConfig(modes=0)


def test_sphere_forecasters_run_on_latitude_longitude_grids():
    """Untrained models on a 4 x 8 latitude-longitude grid: the sphere's features, filling and interpolation
    and DINo's unit-vector inputs, through predict (sparse states, queries anywhere on the sphere)."""
    lat, lon = np.array([-67.5, -22.5, 22.5, 67.5]), np.arange(8) * 45.0
    coords = grid_points((lat, lon))
    values = np.stack([np.cos(np.deg2rad(coords[:, 0])), np.sin(np.deg2rad(coords[:, 1]))], -1)[None].astype(np.float32)
    values = np.repeat(values, 2, 0)
    values[1, ::3] = np.nan
    query = np.array([[90.0, 0.0], [-89.0, 200.0], [10.0, 359.0]])
    normalizer = Normalizer(np.zeros(2, np.float32), np.ones(2, np.float32))
    meta = dict(variables=("h", "u"), units=("m", "m s-1"), frame_interval=1.0, horizon=2)
    config = fno.FNOConfig(modes=2, width=4, depth=1, projection_width=4)
    model = fno.FNO(2, SphereDomain().num_grid_features, config, rngs=nnx.Rngs(0))
    grid = Grid(SphereDomain(), (lat, lon))
    out = fno.FNOForecaster(model, config, grid, normalizer, **meta).predict(coords, values, [0.0, 1.0], query)
    assert out.shape == (2, 2, 3, 2) and np.all(np.isfinite(out))
    config = dino.DINoConfig(code_dim=4, width=8, num_layers=1, dynamics_width=8, dynamics_layers=1, fit_steps=5)
    decoder, dynamics = dino._build(config, SphereDomain(), 2, 0)
    forecaster = dino.DINoForecaster(decoder, dynamics, config, SphereDomain(), normalizer, **meta)
    out = forecaster.predict(coords, values, [0.0, 0.5], query)
    assert out.shape == (2, 2, 3, 2) and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="latitude must lie in"):
        forecaster.predict(coords, values, [0.0], query[:, ::-1] + [0.0, 100.0])


@pytest.mark.parametrize("name", ["fno", "dino"])
def test_forecast_on_xarray_equals_predict(models, name):
    """The xarray interface shared with the ENF forecaster (XarrayForecast): a Dataset in, the same numbers
    as predict out, with the output layout, the units and the same input errors."""
    import xarray as xr

    model = models[name]
    ds = advected_waves_dataset(3, 6, 8, seed=1)
    initial = ds.isel(time=[0])
    times = np.array([0.0, 1.0, 2.5, 5.0])
    data = TrajectoryDataset.from_xarray(ds)
    fine_axis = np.linspace(0.0, 1.0, 12, endpoint=False)

    out = model.forecast(initial, times)
    assert out.u.dims == ("trajectory", "time", "y", "x") and out.u.shape == (3, 4, 8, 8)
    expected = model.predict(data.coords, data.values[:, 0], times, data.coords)
    np.testing.assert_allclose(out.u.values.reshape(3, 4, -1), expected[..., 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.lead_time.values, times)
    assert out.attrs["source"] == f"enfpde {'FNO' if name == 'fno' else 'DINo'} baseline"

    fine = model.forecast(initial, times, at={"y": fine_axis, "x": fine_axis}, variables=["u"])
    query = grid_points([fine_axis, fine_axis])
    np.testing.assert_allclose(
        fine.u.values.reshape(3, 4, -1), model.predict(data.coords, data.values[:, 0], times, query)[..., 0],
        rtol=1e-6, atol=1e-6,
    )
    with pytest.raises(KeyError, match=r"unknown variable\(s\) \['w'\]"):
        model.forecast(initial, times, variables=["w"])
    with pytest.raises(ValueError, match="initial_state has 6 times"):
        model.forecast(ds, times)
    with pytest.raises(ValueError, match="do not match the model's grid"):
        model.forecast(initial.rename({"y": "lat"}), times)
    assert isinstance(out, xr.Dataset)
