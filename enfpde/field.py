"""The Equivariant Neural Field: a cross-attention decoder from query coordinates to a latent point cloud.

For a query ``x`` and latents ``z = {(p_i, c_i, s_i)}`` the decoder computes, per head ``h``,

    a_i      = a(x, p_i)                                        (geometry.bi_invariant)
    u_i      = LayerNorm(W_s c_i)                               (context stem)
    q_i      = W_q e_q(a_i),   k_i = W_k u_i                    (query from the bi-invariant only)
    logit_i  = q_i . k_i / sqrt(d_head) - dist(x, p_i)^2 / s_i^2
    v_i      = mix((W_v u_i) * (1 + gamma_i) + beta_i),         (gamma_i, beta_i) = FFN(e_v(a_i))
    y        = sum_i softmax_i(logit) v_i,      f(x; z) = head(y)

``e_q``, ``e_v`` embed the bi-invariant: random Fourier features ``[sin, cos](2 pi a B)`` with fixed
``B ~ N(0, std^2)`` (separate standard deviations), then Dense-ReLU-Dense. ``mix`` is a pointwise FFN on each
(query, latent) value, and ``head`` is an output projection, a pointwise FFN and a 3-layer GELU MLP. Every
head is ``num_hidden`` wide. This is the size of the released ENF-PDE decoder (531k trainable parameters at
the Navier-Stokes config), which learns stage 1 about twice as fast per step as the lean form the package
shipped first. Each part can be switched back to its lean form (``context_stem``, ``full_width_heads``,
``embedding_mlp``, ``value_ffn``, ``value_mixer``, ``deep_head``, ``num_frequencies``), which is what the
stage-1 ablation in experiments/results/ measures; all switches off with 16 frequencies is the lean decoder.

Since every term sees the pose only through ``a(x, p_i)`` and ``dist(x, p_i)``, the field is steerable:
``f(g^-1 x; z) = f(x; g z)``.

A decoding is split in two (``_pairs`` and ``_attend``): what depends on the query points and the poses only (the
nearest latents, the bi-invariant embeddings) and what depends on the contexts. Frames that share their poses
(dynamics that keep them fixed) compute the first part once (``decode_frames``).

Two exact rewritings keep the per-(query, latent) work small (see ``_attend``): the query's linear layers are
folded into the keys, ``q_i . k_i = h_i . (W^T k_i) + b . k_i`` with ``h_i`` the last hidden activation of
``e_q`` (one ``[hidden] x [heads]`` product per pair instead of ``[hidden] x [heads x d_head]``), and without
the value mixer the additive shift ``beta`` is linear in its input ``u``, so it is applied after the
attention sum, ``sum_i att_i (W u_i + b) = W (sum_i att_i u_i) + b`` (per query instead of per pair).

Reference: Wessels, Knigge et al., "Grounding Continuous Representations in Geometry: Equivariant Neural
Fields" (arXiv 2406.05753); Knigge, Wessels et al., NeurIPS 2024 (arXiv 2406.06660).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from enfpde.config import LEAN_DECODER as _LEAN_SWITCHES
from enfpde.geometry import Geometry
from enfpde.latents import Latents

Array = jax.Array

# Keyword arguments that make the lean decoder: every switch off and 16 Fourier frequencies (79k parameters at
# the Navier-Stokes config, the decoder the package shipped first).
LEAN_DECODER = {"num_frequencies": 16, **_LEAN_SWITCHES}

# He initialisation (fan-in, variance 2) for both layers of the embedding MLP, as in the released decoder: with
# LeCun's variance 1 the ReLU halves the signal's energy, and the attention logits start about 0.7x as large.
_he_normal = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_he_uniform = jax.nn.initializers.variance_scaling(2.0, "fan_in", "uniform")


class FourierFrequencies(nnx.Variable):
    """Fixed random frequencies of a Fourier-feature embedding: saved with the model, never trained."""


def _take(per_latent: Array, idx: Array) -> Array:
    """``per_latent [B, 1, N, ...]`` at each point's latents ``idx [B, M, k]`` -> ``[B, M, k, ...]``. Indexing the
    per-latent array directly (not a copy broadcast over the points) makes the gradient a scatter-add into
    ``[B, N, ...]`` instead of ``[B, M, N, ...]``, which was most of a stage-2 step's backward pass."""
    return jax.vmap(lambda values, i: values[i])(per_latent[:, 0], idx)


class RandomFourierFeatures(nnx.Module):
    """``a -> [sin(2 pi a B), cos(2 pi a B)]`` with fixed ``B ~ N(0, std^2)`` of shape ``[in_dim, F]``.

    Maps ``[..., in_dim]`` to ``[..., 2 F]``.
    """

    def __init__(self, in_dim: int, num_frequencies: int, std: float, *, rngs: nnx.Rngs):
        self.frequencies = FourierFrequencies(std * jax.random.normal(rngs.params(), (in_dim, num_frequencies)))

    def __call__(self, a: Array) -> Array:
        # [sin(t), cos(t)] as one sin(t + [0, pi/2]): no concatenation in the forward or backward pass.
        freqs = self.frequencies[...]
        F = freqs.shape[1]
        offset = jnp.concatenate([jnp.zeros(F), jnp.full(F, 0.5 * jnp.pi)]).astype(a.dtype)
        return jnp.sin(2.0 * jnp.pi * (a @ jnp.concatenate([freqs, freqs], axis=1)) + offset)


class InvariantEmbedding(nnx.Module):
    """Embedding of a bi-invariant ``[..., A] -> [..., hidden]``: Fourier features, then ``Dense-ReLU-Dense``
    (``mlp=True``) or ``Dense-GELU`` (``mlp=False``, the lean form).

    ``hidden_activation`` returns the last non-linear activation, so that a linear layer applied to the
    embedding can be folded into whatever consumes it (the attention keys); ``output_layer`` is the linear
    map from it to the embedding (``None`` when ``mlp=False``).
    """

    def __init__(self, in_dim: int, num_hidden: int, num_frequencies: int, std: float, *, mlp: bool, rngs: nnx.Rngs):
        self.features = RandomFourierFeatures(in_dim, num_frequencies, std, rngs=rngs)
        self.mlp = mlp
        init = _he_normal if mlp else nnx.initializers.lecun_normal()
        self.hidden = nnx.Linear(2 * num_frequencies, num_hidden, kernel_init=init, rngs=rngs)
        self.output_layer = nnx.Linear(num_hidden, num_hidden, kernel_init=_he_uniform, rngs=rngs) if mlp else None

    def hidden_activation(self, a: Array) -> Array:
        h = self.hidden(self.features(a))
        return jax.nn.relu(h) if self.mlp else jax.nn.gelu(h)

    def __call__(self, a: Array) -> Array:
        h = self.hidden_activation(a)
        return h if self.output_layer is None else self.output_layer(h)


def _fold_output_layer(embedding: InvariantEmbedding, w: Array, b: Array) -> tuple[Array, Array]:
    """The affine map ``(w [E, out], b [out])`` applied after ``embedding``, as one affine map of the embedding's last
    activation (its output layer folded in, exact); unchanged when the embedding has no output layer."""
    out = embedding.output_layer
    if out is None:
        return w, b
    return out.kernel[...] @ w, out.bias[...] @ w + b


class PointwiseFFN(nnx.Module):
    """``x -> W_2 LayerNorm(GELU(W_1 x))`` on the last axis: ``[..., num_in] -> [..., num_out]``."""

    def __init__(self, num_in: int, num_hidden: int, num_out: int, *, rngs: nnx.Rngs):
        self.inner = nnx.Linear(num_in, num_hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(num_hidden, rngs=rngs)
        self.outer = nnx.Linear(num_hidden, num_out, rngs=rngs)

    def hidden(self, x: Array) -> Array:
        """The input of the last (linear) layer."""
        return self.activate(self.inner(x))

    def activate(self, pre: Array) -> Array:
        """``LayerNorm(GELU(pre))`` of the first layer's output ``pre``: the hidden activation, for callers that
        compute that output themselves (a folded affine map)."""
        return self.norm(jax.nn.gelu(pre))

    def __call__(self, x: Array) -> Array:
        return self.outer(self.hidden(x))


class EquivariantNeuralField(nnx.Module):
    """Cross-attention decoder ``f(x; z)`` conditioned only on bi-invariants (see the module docstring).

    Args:
        geometry: the domain and its symmetry group.
        num_out: number of output channels ``C``.
        latent_dim: dimension of the context vectors ``c_i``.
        num_hidden: width of the embeddings, the context stem, each head (``full_width_heads``) and the head.
        num_heads: attention heads.
        num_frequencies: random Fourier frequencies per embedding (features = 2 x this).
        query_std, value_std: standard deviation of the query and value embedding frequencies, in units of
            cycles per unit of the bi-invariant.
        context_stem: map contexts through ``Dense(num_hidden)`` and LayerNorm before keys and values;
            False: keys and values straight from the contexts.
        full_width_heads: every head is ``num_hidden`` wide; False: ``num_hidden`` is split over the heads
            (then it must be divisible by ``num_heads``).
        embedding_mlp: the bi-invariant embeddings are Dense-ReLU-Dense after the Fourier features;
            False: one Dense-GELU layer.
        value_ffn: ``(gamma, beta)`` from a pointwise FFN of the value embedding; False: a linear map.
        value_mixer: a pointwise FFN on each modulated (query, latent) value of each head; False: none.
        deep_head: after the attention, an output projection, a pointwise FFN, GELU and the MLP
            ``[Dense(hidden), GELU, Dense(hidden), GELU, Dense(C)]``; False: ``[Dense(hidden), GELU, Dense(C)]``.
        k_nearest: attend to the ``k`` latents with the largest window term only (for large ``N``); ``None``
            attends to all.
        chunk_size: decode at most this many query points at a time (``lax.map`` over chunks), so memory is
            bounded by the chunk size; ``None`` decodes all at once.
        rngs: random streams for the initialisation.
    """

    def __init__(
        self,
        geometry: Geometry,
        *,
        num_out: int,
        latent_dim: int,
        num_hidden: int = 128,
        num_heads: int = 2,
        num_frequencies: int = 64,
        query_std: float = 0.05,
        value_std: float = 0.1,
        context_stem: bool = True,
        full_width_heads: bool = True,
        embedding_mlp: bool = True,
        value_ffn: bool = True,
        value_mixer: bool = True,
        deep_head: bool = True,
        k_nearest: int | None = None,
        chunk_size: int | None = 512,
        rngs: nnx.Rngs,
    ):
        if not full_width_heads and num_hidden % num_heads:
            raise ValueError(
                f"num_hidden ({num_hidden}) must be divisible by num_heads ({num_heads}) when heads split the width "
                f"(full_width_heads=False)."
            )
        if k_nearest is not None and k_nearest < 1:
            raise ValueError(f"k_nearest must be a positive integer or None, found {k_nearest}.")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, found {chunk_size}.")
        self.geometry = geometry
        self.num_out, self.latent_dim = num_out, latent_dim
        self.num_hidden, self.num_heads = num_hidden, num_heads
        self.head_dim = num_hidden if full_width_heads else num_hidden // num_heads
        self.k_nearest, self.chunk_size = k_nearest, chunk_size
        E, HD = num_hidden, num_heads * self.head_dim

        a_dim = geometry.invariant_dim
        self.query_embedding = InvariantEmbedding(a_dim, E, num_frequencies, query_std, mlp=embedding_mlp, rngs=rngs)
        self.value_embedding = InvariantEmbedding(a_dim, E, num_frequencies, value_std, mlp=embedding_mlp, rngs=rngs)
        self.query = nnx.Linear(E, HD, rngs=rngs)
        if context_stem:
            self.stem = nnx.Linear(latent_dim, E, rngs=rngs)
            self.stem_norm = nnx.LayerNorm(E, rngs=rngs)
        else:
            self.stem = self.stem_norm = None
        context_width = E if context_stem else latent_dim
        self.key = nnx.Linear(context_width, HD, rngs=rngs)
        self.value = nnx.Linear(context_width, HD, rngs=rngs)
        self.modulation = PointwiseFFN(E, E, 2 * HD, rngs=rngs) if value_ffn else nnx.Linear(E, 2 * HD, rngs=rngs)
        self.mixer = PointwiseFFN(self.head_dim, self.head_dim, self.head_dim, rngs=rngs) if value_mixer else None
        if deep_head:
            self.head = nnx.List([
                nnx.Linear(HD, HD, rngs=rngs),  # output projection of the heads
                PointwiseFFN(HD, HD, HD, rngs=rngs),
                nnx.Linear(HD, E, rngs=rngs),
                nnx.Linear(E, E, rngs=rngs),
                nnx.Linear(E, num_out, rngs=rngs),
            ])
        else:
            self.head = nnx.List([nnx.Linear(HD, E, rngs=rngs), nnx.Linear(E, num_out, rngs=rngs)])

    # ------------------------------------------------------------------------------------------------
    def __call__(self, coords: Array, z: Latents) -> Array:
        """Decode the fields ``z`` at ``coords``.

        Args:
            coords: internal coordinates ``[M, coord_dim]`` shared by the batch, or ``[B, M, coord_dim]``.
            z: latents with batch shape ``[B]``: poses ``[B, N, pose_dim]``, contexts ``[B, N, latent_dim]``,
                widths ``[B, N]``.

        Returns:
            ``[B, M, num_out]``.
        """
        self._check_shapes(coords, z)
        return self._in_chunks(lambda c: self._decode(c, z), coords)

    def _in_chunks(self, decode, coords: Array) -> Array:
        """``decode(coords [B|1, m, D]) -> [..., m, C]`` over chunks of ``chunk_size`` points (all at once
        without one): pad the points to whole chunks, map over the chunks, drop the padding."""
        if coords.ndim == 2:
            coords = coords[None]
        num_points = coords.shape[1]
        if self.chunk_size is None or num_points <= self.chunk_size:
            return decode(coords)
        num_chunks = -(-num_points // self.chunk_size)
        pad = num_chunks * self.chunk_size - num_points
        padded = jnp.pad(coords, ((0, 0), (0, pad), (0, 0)), mode="edge")
        chunks = padded.reshape(coords.shape[0], num_chunks, self.chunk_size, -1).swapaxes(0, 1)
        out = jax.lax.map(decode, chunks)  # [chunks, ..., chunk, C]
        out = jnp.moveaxis(out, 0, -3)  # [..., chunks, chunk, C]
        out = out.reshape(out.shape[:-3] + (num_chunks * self.chunk_size, self.num_out))
        return out[..., :num_points, :]

    def _check_shapes(self, coords: Array, z: Latents) -> None:
        g = self.geometry
        if coords.ndim not in (2, 3) or coords.shape[-1] != g.coord_dim:
            raise ValueError(
                f"coords: expected shape [M, {g.coord_dim}] or [B, M, {g.coord_dim}] (internal coordinates of "
                f"{type(g).__name__}; convert user coordinates with geometry.coords_from_user), found {coords.shape}."
            )
        if z.poses.ndim != 3 or z.poses.shape[-1] != g.pose_dim:
            raise ValueError(f"z.poses: expected shape [B, N, {g.pose_dim}], found {z.poses.shape}.")
        B, N = z.poses.shape[:2]
        if z.contexts.shape != (B, N, self.latent_dim):
            raise ValueError(f"z.contexts: expected shape {(B, N, self.latent_dim)}, found {z.contexts.shape}.")
        if z.widths.shape != (B, N):
            raise ValueError(f"z.widths: expected shape {(B, N)}, found {z.widths.shape}.")
        if coords.ndim == 3 and coords.shape[0] not in (1, B):
            raise ValueError(f"coords: batch size {coords.shape[0]} does not match the latents' batch size {B}.")

    def _contexts(self, contexts: Array) -> Array:
        """The contexts keys and values are computed from: ``[B, N, latent_dim] -> [B, N, hidden | latent_dim]``."""
        return contexts if self.stem is None else self.stem_norm(self.stem(contexts))

    def _query_weights(self) -> tuple[Array, Array]:
        """The query as one affine map of the query embedding's last activation: ``(W [E, H*dh], b [H*dh])``."""
        return _fold_output_layer(self.query_embedding, self.query.kernel[...], self.query.bias[...])

    def _value_modulation_hidden(self, a: Array) -> Array:
        """The modulation FFN's hidden activation ``[..., E]`` for bi-invariants ``a [..., A]``, with the value
        embedding's last linear layer folded into the FFN's first (two affine maps in a row are one, exact): the
        per-pair product with the embedding's output layer is never computed. Needs ``value_ffn``."""
        first = self.modulation.inner
        w, b = _fold_output_layer(self.value_embedding, first.kernel[...], first.bias[...])
        return self.modulation.activate(self.value_embedding.hidden_activation(a) @ w + b)

    def _head(self, y: Array) -> Array:
        if len(self.head) == 2:
            return self.head[1](jax.nn.gelu(self.head[0](y)))
        projection, ffn, dense1, dense2, out = self.head
        y = jax.nn.gelu(ffn(projection(y)))
        return out(jax.nn.gelu(dense2(jax.nn.gelu(dense1(y)))))

    def _decode(self, coords: Array, z: Latents) -> Array:
        """``coords [B|1, M, D]`` -> ``[B, M, C]`` without chunking.

        Pairwise arrays are laid out ``[B, M, K, F]`` (K latents, all or the k nearest). Contractions are
        row-major GEMMs or fused broadcast-reduces, so no broadcast copy of per-latent keys over the points is
        ever materialised.
        """
        return self._attend(self._pairs(coords, z.poses, z.widths), z.contexts)

    def _pairs(self, coords: Array, poses: Array, widths: Array) -> dict:
        """Everything of a decoding that depends on the query points and the latents' poses and widths only:
        which latents each point attends to (``idx [B, M, k]`` or None for all), the window term
        ``[B, M, K]``, the query embedding's activation ``[B, M, K, E]`` and the value modulation's pair terms.
        Computed once, it serves every frame whose latents share these poses (:meth:`decode_frames`)."""
        B, N = poses.shape[:2]
        x = coords[:, :, None]  # [B|1, M, 1, D]
        poses, widths = poses[:, None], widths[:, None]  # [B, 1, N, P], [B, 1, N]
        idx = None
        if self.k_nearest is not None:
            # Keep the k latents with the largest window term (nearest in units of their width), per point.
            _, idx = jax.lax.top_k(-self.geometry.squared_distance(x, poses) / widths**2, min(self.k_nearest, N))
            poses, widths = _take(poses, idx), _take(widths, idx)
        a = self.geometry.bi_invariant(x, poses)  # [B, M, K, A]
        pairs = {
            "idx": idx,
            "window": -self.geometry.squared_distance(x, poses) / widths**2,  # [B, M, K]
            "h_q": self.query_embedding.hidden_activation(a),  # [B, M, K, E]
        }
        if isinstance(self.modulation, PointwiseFFN):
            u_mod = self._value_modulation_hidden(a)  # [B, M, K, E], the input of the modulation's last layer
            last = self.modulation.outer
        else:
            u_mod, last = self.value_embedding(a), self.modulation
        if self.mixer is not None:
            pairs["gamma"], pairs["beta"] = jnp.split(last(u_mod), 2, axis=-1)
        else:
            # beta = W_beta u + b_beta is linear in u, the input of the modulation's last layer: apply W_beta
            # to the attention-weighted u of each head (exact), once per query instead of once per pair.
            w_gamma = jnp.split(last.kernel[...], 2, axis=1)[0]
            pairs["gamma"] = u_mod @ w_gamma + jnp.split(last.bias[...], 2)[0]
            pairs["u_mod"] = u_mod
        return pairs

    def _attend(self, pairs: dict, contexts: Array) -> Array:
        """The context-dependent rest of a decoding: ``pairs`` of :meth:`_pairs`, ``contexts [B, N, L]`` ->
        ``[B, M, C]``."""
        H, dh, E = self.num_heads, self.head_dim, self.num_hidden
        B, N = contexts.shape[:2]
        idx, h_q = pairs["idx"], pairs["h_q"]
        M, K = h_q.shape[1:3]
        u = self._contexts(contexts)
        keys = self.key(u).reshape(B, N, H, dh)
        values = self.value(u)[:, None]  # [B, 1, N, H*dh]

        # Fold the query's linear layers into the keys: logit = h . (W^T k) + b . k (exact).
        w_q, b_q = self._query_weights()
        key_dirs = jnp.einsum("ehd,bnhd->bneh", w_q.reshape(E, H, dh), keys) / math.sqrt(dh)  # [B, N, E, H]
        key_bias = jnp.einsum("hd,bnhd->bnh", b_q.reshape(H, dh), keys)[:, None] / math.sqrt(dh)  # [B, 1, N, H]
        if idx is not None:
            key_bias, values = _take(key_bias, idx), _take(values, idx)
            key_dirs = _take(key_dirs[:, None], idx)  # [B, M, k, E, H]
            logits = jnp.sum(h_q[..., None] * key_dirs, axis=-2)
        else:
            # One GEMM per field against every latent's key directions, then keep each pair's own latent:
            # K times the (small) flops of the pairwise product, but no broadcast copy of the keys.
            all_logits = jnp.matmul(h_q.reshape(B, M * K, E), key_dirs.swapaxes(1, 2).reshape(B, E, N * H))
            own = jnp.eye(K, dtype=h_q.dtype)[:, :, None]  # [K, K, 1]
            logits = jnp.sum(all_logits.reshape(B, M, K, K, H) * own, axis=3)
        logits = logits + key_bias + pairs["window"][..., None]  # [B, M, K, H]
        att = jax.nn.softmax(logits, axis=2)  # over latents

        if self.mixer is not None:
            modulated = (values * (1.0 + pairs["gamma"]) + pairs["beta"]).reshape(B, M, K, H, dh)
            y = jnp.sum(att[..., None] * self.mixer(modulated), axis=2)  # [B, M, H, dh]
        else:
            last = self.modulation.outer if isinstance(self.modulation, PointwiseFFN) else self.modulation
            w_beta = jnp.split(last.kernel[...], 2, axis=1)[1]
            b_beta = jnp.split(last.bias[...], 2)[1]
            modulated = (values * (1.0 + pairs["gamma"])).reshape(B, M, K, H, dh)
            y = jnp.sum(att[..., None] * modulated, axis=2)  # [B, M, H, dh]
            u_per_head = jnp.sum(att[..., None] * pairs["u_mod"][:, :, :, None, :], axis=2)  # [B, M, H, E]
            y = y + jnp.einsum("bmhe,ehd->bmhd", u_per_head, w_beta.reshape(E, H, dh)) + b_beta.reshape(H, dh)
        return self._head(y.reshape(B, M, H * dh))

    def decode_frames(self, coords: Array, zs: Latents) -> Array:
        """Decode frames whose latents all have the poses and widths of the first (dynamics that keep the poses,
        ``move_poses=False``): ``coords [M, D] | [B, M, D]``, ``zs`` with batch ``[T, B]`` -> ``[T, B, M, C]``.

        The pose-dependent part of the decoding (nearest latents, bi-invariant embeddings: most of its work) is
        computed once per chunk of points and shared by the T frames; the result equals decoding each frame.
        """
        first = Latents(zs.poses[0], zs.contexts[0], zs.widths[0])
        self._check_shapes(coords, first)

        def frames(c):  # [B|1, m, D] -> [T, B, m, C]
            pairs = self._pairs(c, first.poses, first.widths)
            return jax.lax.map(lambda contexts: self._attend(pairs, contexts), zs.contexts)

        return self._in_chunks(frames, coords)

    def decode_reference(self, coords: Array, z: Latents) -> Array:
        """The same field computed literally as in the module docstring (every pair gets its own query, key
        product and shift), with full attention and no chunking. Slower; kept to test the fast path against."""
        H, dh = self.num_heads, self.head_dim
        if coords.ndim == 2:
            coords = coords[None]
        x, poses = coords[:, :, None, :], z.poses[:, None]
        a = self.geometry.bi_invariant(x, poses)
        q = self.query(self.query_embedding(a))
        u = self._contexts(z.contexts)
        k = self.key(u)[:, None]
        qk = (q.reshape(q.shape[:3] + (H, dh)) * k.reshape(k.shape[:3] + (H, dh))).sum(-1) / math.sqrt(dh)
        logits = qk - (self.geometry.squared_distance(x, poses) / z.widths[:, None] ** 2)[..., None]
        att = jax.nn.softmax(logits, axis=2)
        gamma, beta = jnp.split(self.modulation(self.value_embedding(a)), 2, axis=-1)
        v = self.value(u)[:, None] * (1.0 + gamma) + beta
        v = v.reshape(v.shape[:3] + (H, dh))
        if self.mixer is not None:
            v = self.mixer(v)
        y = jnp.einsum("bmkh,bmkhd->bmhd", att, v)
        return self._head(y.reshape(y.shape[:2] + (H * dh,)))
