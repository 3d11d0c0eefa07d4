"""The Equivariant Neural Field: a cross-attention decoder from query coordinates to a latent point cloud.

For a query ``x`` and latents ``z = {(p_i, c_i, s_i)}`` the decoder computes, per head ``h``,

    a_i      = a(x, p_i)                                       (geometry.bi_invariant)
    q_i      = W_q phi_q(a_i),   k_i = W_k c_i                 (query from the bi-invariant only)
    logit_i  = q_i . k_i / sqrt(d_head) - dist(x, p_i)^2 / s_i^2
    v_i      = (W_v c_i) * (1 + gamma(a_i)) + beta(a_i),       (gamma, beta) = W_gb phi_v(a_i)
    y        = sum_i softmax_i(logit) v_i,      f(x; z) = MLP(y)

with ``phi_q``, ``phi_v`` random-Fourier-feature embeddings ``[sin, cos](2 pi a B)``, ``B ~ N(0, std^2)``
(fixed, separate standard deviations) followed by a hidden layer. Since every term sees the pose only
through ``a(x, p_i)`` and ``dist(x, p_i)``, the field is steerable: ``f(g^-1 x; z) = f(x; g z)``.

Two exact rewritings keep the per-(query, latent) work small (see ``_attend``): the query projection is
folded into the keys, ``q_i . k_i = h_i . (W_q^T k_i) + b_q . k_i`` (one ``[hidden] x [heads]`` product per
pair instead of ``[hidden] x [hidden]``), and the additive shift is applied after the attention sum,
``sum_i att_i beta(a_i) = W_beta (sum_i att_i h_i) + b_beta`` (per query instead of per pair).

Reference: Wessels, Knigge et al., "Grounding Continuous Representations in Geometry: Equivariant Neural
Fields" (arXiv 2406.05753); Knigge, Wessels et al., NeurIPS 2024 (arXiv 2406.06660).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from enfpde.geometry import Geometry
from enfpde.latents import Latents

Array = jax.Array


class FourierFrequencies(nnx.Variable):
    """Fixed random frequencies of a Fourier-feature embedding: saved with the model, never trained."""


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


class EquivariantNeuralField(nnx.Module):
    """Cross-attention decoder ``f(x; z)`` conditioned only on bi-invariants (see the module docstring).

    Args:
        geometry: the domain and its symmetry group.
        num_out: number of output channels ``C``.
        latent_dim: dimension of the context vectors ``c_i``.
        num_hidden: attention width (split over heads) and width of the embeddings and output MLP.
        num_heads: attention heads; ``num_hidden`` must be divisible by it.
        num_frequencies: random Fourier frequencies per embedding (features = 2 x this).
        query_std, value_std: standard deviation of the query and value embedding frequencies, in units of
            cycles per unit of the bi-invariant.
        k_nearest: attend to the ``k`` latents with the largest window term only (for large ``N``); ``None``
            attends to all.
        chunk_size: decode at most this many query points at a time (``lax.map`` over chunks), so memory is
            bounded by the chunk size; ``None`` decodes all at once. The default, 512, is also the fastest
            measured on a 2-core CPU for a 64 x 64 batch of 8 (the pairwise arrays of a chunk stay in cache).
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
        num_frequencies: int = 16,
        query_std: float = 0.05,
        value_std: float = 0.1,
        k_nearest: int | None = None,
        chunk_size: int | None = 512,
        rngs: nnx.Rngs,
    ):
        if num_hidden % num_heads:
            raise ValueError(f"num_hidden ({num_hidden}) must be divisible by num_heads ({num_heads}).")
        if k_nearest is not None and k_nearest < 1:
            raise ValueError(f"k_nearest must be a positive integer or None, found {k_nearest}.")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, found {chunk_size}.")
        self.geometry = geometry
        self.num_out, self.latent_dim = num_out, latent_dim
        self.num_hidden, self.num_heads = num_hidden, num_heads
        self.k_nearest, self.chunk_size = k_nearest, chunk_size

        a_dim = geometry.invariant_dim
        self.query_features = RandomFourierFeatures(a_dim, num_frequencies, query_std, rngs=rngs)
        self.query_hidden = nnx.Linear(2 * num_frequencies, num_hidden, rngs=rngs)
        self.query_out = nnx.Linear(num_hidden, num_hidden, rngs=rngs)
        self.value_features = RandomFourierFeatures(a_dim, num_frequencies, value_std, rngs=rngs)
        self.value_hidden = nnx.Linear(2 * num_frequencies, num_hidden, rngs=rngs)
        self.value_gamma = nnx.Linear(num_hidden, num_hidden, rngs=rngs)
        self.value_beta = nnx.Linear(num_hidden, num_hidden, rngs=rngs)
        self.key = nnx.Linear(latent_dim, num_hidden, rngs=rngs)
        self.value = nnx.Linear(latent_dim, num_hidden, rngs=rngs)
        self.out_hidden = nnx.Linear(num_hidden, num_hidden, rngs=rngs)
        self.out = nnx.Linear(num_hidden, num_out, rngs=rngs)

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
        if coords.ndim == 2:
            coords = coords[None]
        num_points = coords.shape[1]
        if self.chunk_size is None or num_points <= self.chunk_size:
            return self._decode(coords, z)
        # Pad the points to whole chunks, map over chunks, drop the padding.
        num_chunks = -(-num_points // self.chunk_size)
        pad = num_chunks * self.chunk_size - num_points
        padded = jnp.pad(coords, ((0, 0), (0, pad), (0, 0)), mode="edge")
        chunks = padded.reshape(coords.shape[0], num_chunks, self.chunk_size, -1).swapaxes(0, 1)
        out = jax.lax.map(lambda c: self._decode(c, z), chunks)  # [chunks, B, chunk, C]
        out = out.swapaxes(0, 1).reshape(out.shape[1], num_chunks * self.chunk_size, self.num_out)
        return out[:, :num_points]

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

    def _decode(self, coords: Array, z: Latents) -> Array:
        """``coords [B|1, M, D]`` -> ``[B, M, C]`` without chunking.

        Pairwise arrays are laid out ``[B, M, K, F]`` (K latents, all or the k nearest). Contractions are
        row-major GEMMs or fused broadcast-reduces, so no broadcast copy of per-latent keys over the points is
        ever materialised (an einsum form did that: 170 MB per call at the reference size). XLA:CPU still
        transposes the pairwise activations for the weight-gradient GEMMs of the backward pass; see
        benchmarks/results/enf_core.md.
        """
        H, dh, E = self.num_heads, self.num_hidden // self.num_heads, self.num_hidden
        B, N = z.poses.shape[:2]
        M = coords.shape[1]
        x = coords[:, :, None]  # [B|1, M, 1, D]
        poses = z.poses[:, None]  # [B, 1, N, P]
        widths = z.widths[:, None]  # [B, 1, N]
        keys = self.key(z.contexts).reshape(B, N, H, dh)
        values = self.value(z.contexts)[:, None]  # [B, 1, N, hidden]

        # Fold the query's output layer into the keys: logit = h . (W_q^T k) + b_q . k (exact).
        w_q = self.query_out.kernel[...].reshape(E, H, dh)
        key_dirs = jnp.einsum("ehd,bnhd->bneh", w_q, keys) / math.sqrt(dh)  # [B, N, hidden, H]
        key_bias = jnp.einsum("hd,bnhd->bnh", self.query_out.bias[...].reshape(H, dh), keys)[:, None] / math.sqrt(dh)

        if self.k_nearest is not None:
            # Keep the k latents with the largest window term (nearest in units of their width), per point.
            _, idx = jax.lax.top_k(-self.geometry.squared_distance(x, poses) / widths**2, min(self.k_nearest, N))
            take = lambda t: jnp.take_along_axis(  # [B, 1|M, N, ...] -> [B, M, k, ...]
                jnp.broadcast_to(t, (B, M) + t.shape[2:]), idx.reshape(idx.shape + (1,) * (t.ndim - 3)), axis=2
            )
            poses, widths, key_bias, values = take(poses), take(widths), take(key_bias), take(values)
            key_dirs = take(key_dirs[:, None])  # [B, M, k, hidden, H]
        K = poses.shape[2]

        a = self.geometry.bi_invariant(x, poses)  # [B, M, K, A]
        window = -self.geometry.squared_distance(x, poses) / widths**2  # [B, M, K]
        h_q = jax.nn.gelu(self.query_hidden(self.query_features(a)))  # [B, M, K, hidden]
        if key_dirs.ndim == 4:
            # One GEMM per field against every latent's key directions, then keep each pair's own latent:
            # K times the (small) flops of the pairwise product, but no broadcast copy of the keys.
            all_logits = jnp.matmul(h_q.reshape(B, M * K, E), key_dirs.swapaxes(1, 2).reshape(B, E, N * H))
            own = jnp.eye(K, dtype=h_q.dtype)[:, :, None]  # [K, K, 1]
            logits = jnp.sum(all_logits.reshape(B, M, K, K, H) * own, axis=3)
        else:
            logits = jnp.sum(h_q[..., None] * key_dirs, axis=-2)
        logits = logits + key_bias + window[..., None]  # [B, M, K, H]
        att = jax.nn.softmax(logits, axis=2)  # over latents

        h_v = jax.nn.gelu(self.value_hidden(self.value_features(a)))  # [B, M, K, hidden]
        modulated = (values * (1.0 + self.value_gamma(h_v))).reshape(B, M, K, H, dh)
        y = jnp.sum(att[..., None] * modulated, axis=2).reshape(B, M, E)
        # beta enters linearly: apply it to the attention-weighted hidden state of each head (exact), as one
        # GEMM with a block-diagonal kernel.
        h_v_per_head = jnp.sum(att[..., None] * h_v[:, :, :, None, :], axis=2).reshape(B, M, H * E)
        w_beta = jax.scipy.linalg.block_diag(*jnp.split(self.value_beta.kernel[...], H, axis=1))  # [H*E, hidden]
        y = y + h_v_per_head @ w_beta + self.value_beta.bias[...]

        y = jax.nn.gelu(self.out_hidden(y))
        return self.out(y)

    def decode_reference(self, coords: Array, z: Latents) -> Array:
        """The same field computed literally as in the module docstring (every pair gets its own query and
        shift), with full attention and no chunking. Slower; kept to test the fast path against."""
        H, dh = self.num_heads, self.num_hidden // self.num_heads
        if coords.ndim == 2:
            coords = coords[None]
        x, poses = coords[:, :, None, :], z.poses[:, None]
        a = self.geometry.bi_invariant(x, poses)
        q = self.query_out(jax.nn.gelu(self.query_hidden(self.query_features(a))))
        k = self.key(z.contexts)[:, None]
        qk = (q.reshape(q.shape[:3] + (H, dh)) * k.reshape(k.shape[:3] + (H, dh))).sum(-1) / math.sqrt(dh)
        logits = qk - (self.geometry.squared_distance(x, poses) / z.widths[:, None] ** 2)[..., None]
        att = jax.nn.softmax(logits, axis=2)
        h_v = jax.nn.gelu(self.value_hidden(self.value_features(a)))
        v = self.value(z.contexts)[:, None] * (1.0 + self.value_gamma(h_v)) + self.value_beta(h_v)
        y = jnp.einsum("bmkh,bmkhd->bmhd", att, v.reshape(v.shape[:3] + (H, dh)))
        y = y.reshape(y.shape[:2] + (self.num_hidden,))
        return self.out(jax.nn.gelu(self.out_hidden(y)))
