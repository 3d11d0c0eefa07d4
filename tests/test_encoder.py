"""Meta-SGD encoder, auto-decoding, and the stage-1 step: masks, subsets, learning-rate clipping, exact
micro-batching, and that meta-training actually teaches the 3-step fit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from enfpde import AutoDecoder, EquivariantNeuralField, MetaSGDEncoder, fit_latents, masked_mse
from enfpde import geometry as G
from enfpde.field import LEAN_DECODER as LEAN
from enfpde.testing import jit_decoder, relative_error
from enfpde.training import NeuralFieldAutoencoder, default_optimizer, make_stage1_step, reconstruction_loss

TORUS = G.Torus()


def smooth_fields(key, num_fields, coords, max_wavenumber=2):
    """Random smooth periodic fields on the unit torus: sums of Fourier modes with |k_i| <= max_wavenumber.
    Returns ``[num_fields, M, 1]``."""
    ks = np.array([(i, j) for i in range(-max_wavenumber, max_wavenumber + 1) for j in range(0, max_wavenumber + 1) if (i, j) != (0, 0)])
    phase = 2 * np.pi * np.asarray(coords) @ ks.T  # [M, K]
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (num_fields, len(ks))) / np.sqrt(len(ks))
    b = jax.random.normal(kb, (num_fields, len(ks))) / np.sqrt(len(ks))
    return (a @ np.cos(phase).T + b @ np.sin(phase).T)[..., None]




def small_model(seed=0, field_kwargs=None, **encoder_kwargs):
    """A small decoder and Meta-SGD encoder on the torus. The lean decoder by default: the encoder's properties
    do not depend on the decoder's form, and the released one takes about 3x as long to compile and run here
    (``field_kwargs={}`` gives it; test_field.py checks every form)."""
    field = EquivariantNeuralField(
        TORUS, num_out=1, latent_dim=8, num_hidden=32, num_heads=2, rngs=nnx.Rngs(seed),
        **(LEAN if field_kwargs is None else field_kwargs),
    )
    encoder = MetaSGDEncoder(TORUS, num_latents=4, latent_dim=8, **encoder_kwargs)
    return NeuralFieldAutoencoder(field, encoder)


@pytest.fixture(scope="module")
def data():
    coords = TORUS.sample_coords(jax.random.key(0), 128)
    return coords, smooth_fields(jax.random.key(1), 4, coords)


@jax.jit(static_argnums=0)
def _encode_compiled(graphdef, state, coords, values, mask, key):
    model = nnx.merge(graphdef, state)
    return model.encoder(model.field, coords, values, mask, key=key)


def _encode(model, coords, values, mask=None, key=None):
    """The encoder, compiled once per model structure and input shapes."""
    return _encode_compiled(*nnx.split(model), coords, values, mask, key)


def test_masked_points_are_ignored_even_if_nan(data):
    coords, values = data
    model = small_model()
    mask = jnp.arange(coords.shape[0])[None, :].repeat(values.shape[0], 0) < 80
    corrupted = jnp.where(mask[..., None], values, jnp.nan)
    z_masked = _encode(model, coords, corrupted, mask)
    z_subset = _encode(model, coords[:80], values[:, :80])
    assert np.all(np.isfinite(z_masked.contexts))
    # Equal up to float32 summation order, amplified by three inner steps of size 5.
    assert relative_error(z_masked.contexts, z_subset.contexts) < 1e-4
    assert relative_error(z_masked.poses, z_subset.poses) < 1e-4


def test_masked_mse():
    pred, target = jnp.zeros((2, 3, 2)), jnp.array([[[1.0, 1.0], [2.0, 2.0], [jnp.nan, 0.0]]] * 2)
    mask = jnp.array([[True, True, False], [True, False, False]])
    np.testing.assert_allclose(masked_mse(pred, target, mask), [2.5, 1.0])


def test_inner_steps_reduce_the_error_and_keep_poses_on_the_domain(data):
    coords, values = data
    model = small_model(num_inner_steps=3)
    z0 = model.encoder.initial(values.shape[0])
    z3 = _encode(model, coords, values)
    decode = jit_decoder(model.field)
    err = lambda z: masked_mse(decode(coords, z), values).mean()
    assert float(err(z3)) < float(err(z0))
    assert bool(jnp.all((z3.poses >= 0) & (z3.poses < 1)))
    np.testing.assert_array_equal(z3.widths, z0.widths)  # widths do not evolve


def test_random_subsets_need_a_key_and_depend_on_it(data):
    coords, values = data
    model = small_model(inner_points=32)
    with pytest.raises(ValueError, match="PRNG key is needed to draw 32 of 128 points"):
        model.encoder(model.field, coords, values)
    a = _encode(model, coords, values, key=jax.random.key(0))
    b = _encode(model, coords, values, key=jax.random.key(0))
    c = _encode(model, coords, values, key=jax.random.key(1))
    np.testing.assert_array_equal(a.contexts, b.contexts)
    assert relative_error(c.contexts, a.contexts) > 1e-4


def test_disjoint_subsets_fit_some_points_and_score_the_others(data):
    """With disjoint subsets the fit reads only the K x S points of the inner steps, and the stage-1 loss only the
    points left over: changing the held-out values changes the loss but not the latents."""
    from enfpde.training import reconstruction_loss

    coords, values = data
    model = small_model(inner_points=32, disjoint_subsets=True)  # 3 x 32 = 96 of 128 points; 32 held out
    key = jax.random.key(3)
    order = np.asarray(model.encoder.subset_order(key, values, None))
    fitted, held_out = order[:, :96], order[:, 96:]
    assert all(len(set(row)) == 128 for row in order)  # a permutation: the subsets are disjoint
    changed = np.asarray(values).copy()
    for b in range(values.shape[0]):
        changed[b, held_out[b]] += 1.0
    z, z_changed = _encode(model, coords, values, key=key), _encode(model, coords, jnp.asarray(changed), key=key)
    np.testing.assert_array_equal(z.contexts, z_changed.contexts)
    np.testing.assert_array_equal(z.poses, z_changed.poses)
    loss = float(reconstruction_loss(model, coords, values, key=key))
    assert float(reconstruction_loss(model, coords, jnp.asarray(changed), key=key)) > loss + 0.5
    pred = np.asarray(jit_decoder(model.field)(coords, z))
    expected = np.mean([np.mean((pred[b, held_out[b]] - np.asarray(values)[b, held_out[b]]) ** 2) for b in range(values.shape[0])])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    changed_fit = np.asarray(values).copy()
    changed_fit[0, fitted[0, 0]] += 1.0
    assert relative_error(_encode(model, coords, jnp.asarray(changed_fit), key=key).contexts[0], z.contexts[0]) > 1e-6
    with pytest.raises(ValueError, match=r"num_inner_steps x inner_points = 3 x 64 <= 128"):
        small_model(inner_points=64, disjoint_subsets=True).encoder(model.field, coords, values, key=key)


def test_outer_points_score_an_independent_draw(data):
    """With ``outer_points`` the stage-1 loss is the MSE on its own random draw of points (the released code's
    fourth draw): equal to the MSE computed on exactly those points, and blind to every other point."""
    from enfpde.training import reconstruction_loss

    coords, values = data
    model = small_model(inner_points=32, outer_points=16)
    key = jax.random.key(5)
    c, v, _ = model.encoder.outer_subset(key, coords, values, None)
    assert v.shape == (values.shape[0], 16, 1)
    z = _encode(model, coords, values, key=key)
    pred = jit_decoder(model.field)(c, z)
    loss = float(reconstruction_loss(model, coords, values, key=key))
    np.testing.assert_allclose(loss, float(masked_mse(pred, v).mean()), rtol=1e-5)
    # the draw differs from the inner steps' first draw (a fresh key), so it is not simply their points
    inner_first = np.asarray(jnp.argsort(jax.random.uniform(jax.random.split(key, 3)[0], values.shape[:2]), axis=1)[:, :16])
    outer = np.asarray(jnp.argsort(jax.random.uniform(jax.random.fold_in(key, 3), values.shape[:2]), axis=1)[:, :16])
    assert not np.array_equal(np.sort(inner_first, axis=1), np.sort(outer, axis=1))
    for kwargs in ({"outer_points": 16}, {"inner_points": 32, "disjoint_subsets": True, "outer_points": 16}):
        with pytest.raises(ValueError, match="outer_points = 16 needs inner_points with independent subsets"):
            small_model(**kwargs)


def test_learning_rates_are_clipped():
    encoder = MetaSGDEncoder(TORUS, num_latents=4, latent_dim=3, lr_bounds=(1e-6, 10.0))
    encoder.pose_lr[...] = jnp.asarray(100.0)
    encoder.context_lr[...] = jnp.array([-1.0, 5.0, 20.0])
    pose_lr, context_lr = encoder.step_sizes()
    assert float(pose_lr) == 10.0
    np.testing.assert_allclose(context_lr, [1e-6, 5.0, 10.0])


def test_bad_observations_raise_clear_errors(data):
    coords, values = data
    model = small_model()
    with pytest.raises(ValueError, match=r"values: expected shape \[B, M, 1\]"):
        model.encoder(model.field, coords, values[..., 0])
    with pytest.raises(ValueError, match=r"coords: expected shape \[128, 2\]"):
        model.encoder(model.field, coords[:10], values)
    with pytest.raises(ValueError, match=r"mask: expected shape \[4, 128\]"):
        model.encoder(model.field, coords, values, jnp.ones((4, 10), bool))
    with pytest.raises(ValueError, match="lr_bounds"):
        MetaSGDEncoder(TORUS, num_latents=4, latent_dim=3, lr_bounds=(0.0, 1.0))


def _gradients(model, coords, values, num_microbatches):
    step, state, _ = make_stage1_step(model, optax.sgd(1.0), num_microbatches=num_microbatches)
    new_params, opt_state, loss = step(state.params, state.opt_state, state.rest, coords, values, jax.random.key(0))
    step(new_params, opt_state, state.rest, coords, values + 1.0, jax.random.key(1))
    assert step._cache_size() == 1  # a second call with new data does not retrace
    return loss, jax.tree.map(lambda new, old: old - new, new_params, state.params)


@pytest.fixture(scope="module")
def gradients(data):
    """Stage-1 loss and gradients (one SGD step of size 1) for (inner-gradient order, micro-batches)."""
    coords, values = data
    return {
        ("second", 1): _gradients(small_model(first_order=False), coords, values, 1),
        ("second", 2): _gradients(small_model(first_order=False), coords, values, 2),
        ("first", 1): _gradients(small_model(first_order=True), coords, values, 1),
    }


def test_micro_batched_step_equals_the_full_step(data, gradients):
    (loss1, g1), (loss2, g2) = gradients["second", 1], gradients["second", 2]
    np.testing.assert_allclose(loss1, loss2, rtol=1e-4)  # summation order
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert relative_error(b, a) < 1e-4
    coords, values = data
    with pytest.raises(ValueError, match="do not split into 3 equal micro-batches"):
        _gradients(small_model(), coords, values, 3)  # raised while tracing, before any compilation


def test_second_order_gradients_differ_from_first_order(gradients):
    leaves = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
    second, first = leaves(gradients["second", 1][1]), leaves(gradients["first", 1][1])
    assert np.all(np.isfinite(second)) and np.all(np.isfinite(first))
    assert relative_error(first, second) > 1e-3


@pytest.mark.usefixtures("xla_optimizations")  # 30 train steps: running, not compiling, is its cost
def test_meta_training_teaches_the_three_step_fit():
    """After a short meta-training on random smooth fields, the 3-step fit of unseen fields is clearly
    better than before meta-training."""
    # A smaller initial pose step than the default: Adam then adapts it within the short run. The lean decoder:
    # meta-learning is the encoder's property, and the released decoder (trained through both stages in
    # test_training_loop.py) costs 2.7x the CPU time here (133 s against 49 s, compilation included).
    model = small_model(seed=0, num_inner_steps=3, pose_lr=0.25)
    step, state, graphdef = make_stage1_step(model, default_optimizer(1e-3))
    train_coords = TORUS.sample_coords(jax.random.key(5), 512)
    train_values = smooth_fields(jax.random.key(6), 512, train_coords, max_wavenumber=1)
    test_coords = TORUS.sample_coords(jax.random.key(100), 256)
    test_values = smooth_fields(jax.random.key(101), 32, test_coords, max_wavenumber=1)  # unseen fields

    @jax.jit
    def test_error(params, rest):
        m = nnx.merge(graphdef, params, rest)
        return masked_mse(m.reconstruct(test_coords, test_values), test_values).mean()

    before = float(test_error(state.params, state.rest))
    params, opt_state = state.params, state.opt_state
    # 30 steps of 16 fields, 128 random points each: the unseen fields' error is 0.24x its start by then (0.37x
    # after 20 steps, 0.20x after 50), well inside the bound, so more steps would only cost time.
    for i in range(30):
        fields = (np.arange(16) + 16 * i) % 512
        points = np.random.default_rng(i).choice(512, 128, replace=False)
        params, opt_state, loss = step(params, opt_state, state.rest, train_coords[points], train_values[fields][:, points], jax.random.key(i))
    after = float(test_error(params, state.rest))
    assert after < 0.4 * before, (before, after)


def test_auto_decoding_table_and_test_time_fit(data):
    coords, values = data
    # An untrained lean decoder responds to its latents more directly; the threshold was calibrated on it.
    field = small_model().field
    table = AutoDecoder(TORUS, num_fields=10, num_latents=4, latent_dim=8)
    z = table(jnp.array([3, 7]))
    assert z.poses.shape == (2, 4, 2) and z.contexts.shape == (2, 4, 8)
    z_init = table(jnp.arange(4))
    graphdef, state = nnx.split(field)
    fit = jax.jit(lambda s, z: fit_latents(nnx.merge(graphdef, s), z, coords, values, num_steps=100, optimizer=optax.adam(3e-2)))
    z_fit = fit(state, z_init)
    decode = jit_decoder(field)
    err = lambda z: float(masked_mse(decode(coords, z), values).mean())
    assert err(z_fit) < 0.5 * err(z_init)
    assert bool(jnp.all((z_fit.poses >= 0) & (z_fit.poses < 1)))


def test_gradients_in_point_chunks_fit_the_same_latents():
    """The Forecaster's memory-bounded fit (inner gradients summed over chunks of points) equals the one-piece
    fit, with a mask and a number of points that is not a multiple of the chunk."""
    model = small_model(field_kwargs={**LEAN, "chunk_size": None})
    encoder = model.encoder
    coords = TORUS.sample_coords(jax.random.key(1), 203)
    values = smooth_fields(jax.random.key(2), 3, coords)
    mask = jax.random.uniform(jax.random.key(3), (3, 203)) > 0.3
    whole, graphdef = _encode(model, coords, values, mask), nnx.graphdef(model)
    encoder.grad_chunk_size = 64
    assert nnx.graphdef(model) != graphdef  # a static attribute: the chunked fit is a program of its own
    chunked = _encode(model, coords, values, mask)
    for a, b in ((whole.poses, chunked.poses), (whole.contexts, chunked.contexts)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    assert relative_error(chunked.contexts, encoder.initial(3).contexts) > 1e-2  # the fit moved the latents


def test_fit_steps_continue_the_inner_steps_and_the_stage1_loss_keeps_its_own(data):
    """``fit_steps`` beyond ``num_inner_steps`` are the same steps repeated: a 3-step encoder asked for 5 fits
    exactly what a 5-step encoder with the same parameters fits, lowers the error further, and
    the stage-1 loss still differentiates through the 3 inner steps only."""
    coords, values = data
    three = small_model(seed=3, num_inner_steps=3)
    extended = small_model(seed=3, num_inner_steps=3, fit_steps=5)
    five = small_model(seed=3, num_inner_steps=5)
    assert three.encoder.fit_steps == 3
    z_extended, z_five = _encode(extended, coords, values), _encode(five, coords, values)
    np.testing.assert_allclose(z_extended.contexts, z_five.contexts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z_extended.poses, z_five.poses, rtol=1e-5, atol=1e-6)
    z_three = three.encoder(three.field, coords, values)
    np.testing.assert_allclose(extended.encoder(extended.field, coords, values, steps=3).contexts, z_three.contexts,
                               rtol=1e-5, atol=1e-6)

    error = lambda model, z: float(masked_mse(model.field(coords, z), values).mean())
    assert error(extended, z_extended) < 0.97 * error(three, z_three)  # untrained decoder: a small but sure gain
    loss = lambda model: float(reconstruction_loss(model, coords, values))
    assert loss(extended) == pytest.approx(loss(three), rel=1e-6)
    assert loss(five) != pytest.approx(loss(three), rel=1e-3)


def test_negative_fit_steps_are_refused():
    from enfpde.config import ConfigError, load_config

    with pytest.raises(ValueError, match="fit_steps must be >= 0"):
        MetaSGDEncoder(TORUS, num_latents=4, latent_dim=8, fit_steps=-1)
    with pytest.raises(ConfigError, match=r"model.fit_steps must be >= 0 \(or null for inner_steps\), found -2"):
        load_config(None, ["model.fit_steps=-2"])
