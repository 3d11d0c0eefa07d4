"""The decoder: steerability for every geometry, the fast path against the literal formula, chunking,
k-nearest attention, shape errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from enfpde import EquivariantNeuralField, Latents
from enfpde import geometry as G
from enfpde.field import LEAN_DECODER as LEAN
from enfpde.testing import assert_steerable, jit_decoder, random_latents, relative_error

N, D, C = 6, 8, 2


def make_field(geometry, **kwargs):
    # Larger frequency spreads than the defaults so that the test exercises non-linear embeddings.
    kwargs = {"num_hidden": 32, "num_heads": 2, "query_std": 0.5, "value_std": 0.5, **kwargs}
    return EquivariantNeuralField(geometry, num_out=C, latent_dim=D, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("seed", range(2))
def test_steerability(geometry, seed):
    """f(g x; g z) = f(x; z) for random g, to 1e-5 relative in float32."""
    kz, kx, kg = jax.random.split(jax.random.key(seed), 3)
    field = make_field(geometry)
    z = random_latents(geometry, kz, batch=3, num_latents=N, latent_dim=D)
    x = geometry.sample_coords(kx, 40)
    assert_steerable(field, z, x, kg, rtol=1e-5)


# The k-nearest gather depends on the geometry only through the pose dimension and the distance.
KNN_GEOMETRIES = pytest.mark.parametrize("geometry", [G.Torus(), G.PlaneSE2(), G.AxialSphere()], ids=["torus", "se2", "axial"])


@KNN_GEOMETRIES
def test_steerability_with_k_nearest(geometry):
    kz, kx, kg = jax.random.split(jax.random.key(7), 3)
    field = make_field(geometry, k_nearest=3)
    z = random_latents(geometry, kz, batch=2, num_latents=N, latent_dim=D)
    assert_steerable(field, z, geometry.sample_coords(kx, 40), kg, rtol=1e-5)


def test_steerability_in_float64():
    with jax.enable_x64(True):
        for geometry in (G.Sphere(), G.PlaneSE2()):
            kz, kx, kg = jax.random.split(jax.random.key(3), 3)
            field = make_field(geometry)
            field = nnx.merge(*(lambda gd, st: (gd, jax.tree.map(lambda a: a.astype(jnp.float64), st)))(*nnx.split(field)))
            z = random_latents(geometry, kz, batch=2, num_latents=N, latent_dim=D)
            z = jax.tree.map(lambda a: a.astype(jnp.float64), z)
            x = geometry.sample_coords(kx, 30).astype(jnp.float64)
            assert jit_decoder(field)(x, z).dtype == jnp.float64
            assert_steerable(field, z, x, kg, rtol=1e-10)


def test_absolute_position_is_not_equivariant():
    """The ablation must actually break the symmetry of its domain (else it would ablate nothing)."""
    torus = G.Torus()
    absolute = G.AbsolutePosition(torus)
    kz, kx, kg = jax.random.split(jax.random.key(0), 3)
    field = make_field(absolute)
    z = random_latents(absolute, kz, batch=2, num_latents=N, latent_dim=D)
    x = torus.sample_coords(kx, 40)
    g = torus.sample_group_element(kg)
    decode = jit_decoder(field)
    moved = decode(torus.act_on_coords(g, x), z.transform(torus, g))
    assert relative_error(moved, decode(x, z)) > 1e-3


def test_fast_path_equals_the_literal_formula(geometry):
    kz, kx = jax.random.split(jax.random.key(1))
    field = make_field(geometry)
    z = random_latents(geometry, kz, batch=2, num_latents=N, latent_dim=D)
    x = geometry.sample_coords(kx, 33)
    graphdef, state = nnx.split(field)
    reference = jax.jit(lambda s, x, z: nnx.merge(graphdef, s).decode_reference(x, z))(state, x, z)
    assert relative_error(jit_decoder(field)(x, z), reference) < 1e-5


DECODER_FORMS = {
    "lean": LEAN,
    "no_context_stem": {"context_stem": False},
    "split_heads": {"full_width_heads": False},
    "lean_embedding": {"embedding_mlp": False},
    "linear_modulation": {"value_ffn": False},
    "no_value_mixer": {"value_mixer": False},
    "no_mixer_linear_modulation": {"value_mixer": False, "value_ffn": False},
    "shallow_head": {"deep_head": False},
    "three_heads": {"num_heads": 3},
}


@pytest.mark.parametrize("options", list(DECODER_FORMS.values()), ids=list(DECODER_FORMS))
def test_every_decoder_form_is_steerable_and_matches_the_literal_formula(options):
    """Each ablation switch changes the fast path (folded query layers, beta after the attention sum): both
    must stay exact and steerable. SE(2) poses exercise the orientation in the bi-invariant."""
    for geometry in (G.Torus(), G.PlaneSE2()):
        kz, kx, kg = jax.random.split(jax.random.key(4), 3)
        field = make_field(geometry, **options)
        z = random_latents(geometry, kz, batch=2, num_latents=N, latent_dim=D)
        x = geometry.sample_coords(kx, 29)
        graphdef, state = nnx.split(field)
        literal = jax.jit(lambda s, x, z: nnx.merge(graphdef, s).decode_reference(x, z))(state, x, z)
        assert relative_error(jit_decoder(field)(x, z), literal) < 1e-5
        assert_steerable(field, z, x, kg, rtol=1e-5)
        assert_steerable(make_field(geometry, k_nearest=3, **options), z, x, kg, rtol=1e-5)


def test_released_and_lean_sizes():
    """The defaults are the released decoder's size (531k trainable parameters at the NS config); all switches
    off is the lean decoder the package shipped first (79k)."""
    count = lambda f: sum(x.size for x in jax.tree.leaves(nnx.state(f, nnx.Param)))
    kwargs = dict(num_out=1, latent_dim=16, num_hidden=128, num_heads=2, rngs=nnx.Rngs(0))
    assert count(EquivariantNeuralField(G.Torus(), **kwargs)) == 531073
    assert count(EquivariantNeuralField(G.Torus(), **kwargs, **LEAN)) == 78977


def test_output_depends_on_contexts_poses_and_widths():
    torus = G.Torus()
    decode = jit_decoder(make_field(torus))
    z = random_latents(torus, jax.random.key(0), batch=1, num_latents=N, latent_dim=D)
    x = torus.sample_coords(jax.random.key(1), 50)
    y = decode(x, z)
    for changed in (z.replace(contexts=z.contexts + 0.5), z.replace(poses=torus.move(z.poses, jnp.full_like(z.poses, 0.1))), z.replace(widths=2 * z.widths)):
        assert relative_error(decode(x, changed), y) > 1e-3


def test_chunked_decoding_equals_unchunked():
    torus = G.Torus()
    z = random_latents(torus, jax.random.key(0), batch=3, num_latents=N, latent_dim=D)
    x = torus.sample_coords(jax.random.key(1), 103)  # not a multiple of the chunk size
    full = jit_decoder(make_field(torus))(x, z)
    chunked_decode = jit_decoder(make_field(torus, chunk_size=16))
    chunked = chunked_decode(x, z)
    assert chunked.shape == (3, 103, C)
    assert relative_error(chunked, full) < 1e-6
    per_batch = jnp.broadcast_to(x, (3,) + x.shape)  # per-field coordinates take the same path
    assert relative_error(chunked_decode(per_batch, z), full) < 1e-6


@pytest.mark.parametrize(
    "kwargs", [{}, {"k_nearest": 3}, {"k_nearest": 3, "chunk_size": 16, **LEAN}], ids=["released", "k_nearest", "lean_chunked"]
)
def test_frames_sharing_poses_decode_as_each_frame_alone(kwargs):
    """decode_frames computes the pose-dependent part once for frames with the same poses (fixed-pose dynamics):
    it must equal decoding every frame alone, released and lean decoder forms, k-nearest and chunked alike."""
    torus = G.Torus()
    field = make_field(torus, **kwargs)
    z = random_latents(torus, jax.random.key(0), batch=2, num_latents=N, latent_dim=D)
    contexts = jax.random.normal(jax.random.key(1), (4,) + z.contexts.shape)  # 4 frames
    zs = Latents(jnp.broadcast_to(z.poses, (4,) + z.poses.shape), contexts, jnp.broadcast_to(z.widths, (4,) + z.widths.shape))
    x = torus.sample_coords(jax.random.key(2), 37)
    gd, st = nnx.split(field)
    shared = jax.jit(lambda st, x, zs: nnx.merge(gd, st).decode_frames(x, zs))(st, x, zs)
    decode = jit_decoder(field)
    each = jnp.stack([decode(x, Latents(zs.poses[t], zs.contexts[t], zs.widths[t])) for t in range(4)])
    assert shared.shape == (4, 2, 37, C)
    assert relative_error(shared, each) < 1e-6


def test_chunked_decoding_bounds_memory():
    """The compiled chunked decoder's temporaries do not grow with the number of points."""
    torus = G.Torus()
    field = make_field(torus, chunk_size=256)
    z = random_latents(torus, jax.random.key(0), batch=2, num_latents=N, latent_dim=D)
    gd, st = nnx.split(field)
    decode = jax.jit(lambda st, x, z: nnx.merge(gd, st)(x, z))

    def temp_bytes(m):
        x = jnp.zeros((m, 2))
        return decode.lower(st, x, z).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(2048), temp_bytes(32768)
    # 16x the points: outputs grow, the per-chunk pairwise temporaries must not.
    assert large < 4 * small, (small, large)


@KNN_GEOMETRIES
def test_k_nearest_with_all_latents_equals_full_attention(geometry):
    kz, kx = jax.random.split(jax.random.key(2))
    z = random_latents(geometry, kz, batch=2, num_latents=N, latent_dim=D)
    x = geometry.sample_coords(kx, 30)
    full = jit_decoder(make_field(geometry))(x, z)
    assert relative_error(jit_decoder(make_field(geometry, k_nearest=N))(x, z), full) < 1e-5
    assert relative_error(jit_decoder(make_field(geometry, k_nearest=2))(x, z), full) > 1e-4  # and it does restrict


@pytest.mark.parametrize(
    "coords_shape, poses_shape, contexts_shape, widths_shape, message",
    [
        ((10, 3), (2, N, 2), (2, N, D), (2, N), r"coords: expected shape \[M, 2\]"),
        ((10,), (2, N, 2), (2, N, D), (2, N), r"coords: expected shape"),
        ((10, 2), (N, 2), (N, D), (N,), r"z.poses: expected shape \[B, N, 2\]"),
        ((10, 2), (2, N, 2), (2, N, D + 1), (2, N), r"z.contexts: expected shape"),
        ((10, 2), (2, N, 2), (2, N, D), (2, N, 1), r"z.widths: expected shape"),
        ((3, 10, 2), (2, N, 2), (2, N, D), (2, N), r"batch size 3 does not match"),
    ],
)
def test_wrong_shapes_raise_clear_errors(coords_shape, poses_shape, contexts_shape, widths_shape, message):
    field = make_field(G.Torus())
    z = Latents(jnp.zeros(poses_shape), jnp.zeros(contexts_shape), jnp.ones(widths_shape))
    with pytest.raises(ValueError, match=message):
        field(jnp.zeros(coords_shape), z)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        EquivariantNeuralField(
            G.Torus(), num_out=1, latent_dim=4, num_hidden=30, num_heads=4, full_width_heads=False, rngs=nnx.Rngs(0)
        )
    with pytest.raises(ValueError, match="k_nearest"):
        EquivariantNeuralField(G.Torus(), num_out=1, latent_dim=4, k_nearest=0, rngs=nnx.Rngs(0))
