"""VQ-VAE: encoder with batch norm, EMA vector quantiser, decoder without normalisation (SPEC 3)."""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from dlwm_jax.networks.layers import BatchNorm, Conv, Upsample2x, leaky_relu


class ResidualBlock(nn.Module):
    """ResidualBlock31 (SPEC 3.3): conv3x3 -> [BN] -> ReLU -> conv1x1 -> [BN], plus identity; in `dtype`."""
    use_batch_norm: bool
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    conv_impl: str = "xla"
    bn_variance: str = "two_pass"  # ComputeConfig.batch_norm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        conv = lambda k, pad: Conv(c, k, pad, use_bias=not self.use_batch_norm, impl=self.conv_impl, dtype=self.dtype)
        y = conv(3, 1)(x)
        if self.use_batch_norm:
            y = BatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype, self.bn_variance)(y, train)
        y = jax.nn.relu(y)
        y = conv(1, 0)(y)
        if self.use_batch_norm:
            y = BatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype, self.bn_variance)(y, train)
        return y + x


class Encoder(nn.Module):
    """Observations uint8 [B, 96, 96, C] (or float in [0, 1]) -> z_e float32 [B, 6, 6, D] (SPEC 3.1).

    Convolutions in `dtype` (ComputeConfig.dtype), computed by `conv_impl` (ComputeConfig.vqvae_conv), train-mode
    batch variances by `bn_variance` (ComputeConfig.batch_norm); the last batch norm outputs float32, so z_e, the
    codebook distances and the commitment loss are float32."""
    code_dim: int = 32
    channels: Sequence[int] = (32, 64, 128, 256)
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    conv_impl: str = "xla"
    bn_variance: str = "two_pass"

    @nn.compact
    def __call__(self, observations: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(observations, 4)
        x = observations.astype(jnp.float32) / 255.0 if observations.dtype == jnp.uint8 else observations
        bn = lambda dtype=self.dtype: BatchNorm(self.bn_momentum, self.bn_epsilon, dtype, self.bn_variance)
        for features in self.channels:
            x = Conv(features, 4, 1, stride=2, impl=self.conv_impl, dtype=self.dtype)(x)
            x = leaky_relu(bn()(x, train))
        for _ in range(2):
            x = ResidualBlock(True, self.bn_momentum, self.bn_epsilon, self.dtype, self.conv_impl,
                              self.bn_variance)(x, train)
            x = leaky_relu(x)
        x = Conv(self.code_dim, 1, 0, impl=self.conv_impl, dtype=self.dtype)(x)
        return bn(jnp.float32)(x, train)  # no activation: this is z_e


class Decoder(nn.Module):
    """Quantised latents [B, 6, 6, D] -> continuous-Bernoulli logits float32 [B, 96, 96, C] (SPEC 3.2); layers
    computed in `dtype`, convolutions by `conv_impl` (ComputeConfig.vqvae_conv; the upsampling's too in its
    "subpixel" form)."""
    out_channels: int = 4
    channels: Sequence[int] = (32, 64, 128, 256)
    upsample: str = "subpixel"
    dtype: Any = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, z_q: jax.Array) -> jax.Array:
        chex.assert_rank(z_q, 4)
        width = self.channels[-1]
        x = leaky_relu(Conv(width, 3, 1, use_bias=True, impl=self.conv_impl, dtype=self.dtype)(z_q))
        for _ in range(2):
            x = leaky_relu(ResidualBlock(False, dtype=self.dtype, conv_impl=self.conv_impl)(x))
        outs = list(self.channels[-2::-1]) + [self.out_channels]
        for i, features in enumerate(outs):
            x = Upsample2x(features, self.upsample, self.dtype, self.conv_impl)(x)
            if i < len(outs) - 1:
                x = leaky_relu(x)
        return x.astype(jnp.float32)  # the likelihood is computed in float32


# ---------------------------------------------------------------------------------------------------------
# Vector quantiser with the reference's EMA codebook (SPEC 3.4, 3.5). The codebook is not a gradient
# parameter: it lives in this NamedTuple, updated functionally once per VQ-VAE step.

class Codebook(NamedTuple):
    embeddings: jax.Array   # [K, D]
    dw_values: jax.Array    # [K, D] EMA accumulator of per-code sums
    dw_counter: jax.Array   # [] int32, number of EMA updates so far
    dw_average: jax.Array   # [K, D] de-biased EMA of sums
    cs_average: jax.Array   # [K] EMA of cluster sizes


def init_codebook(key: jax.Array, num_codes: int, code_dim: int) -> Codebook:
    bound = (3.0 / num_codes) ** 0.5
    zeros = jnp.zeros((num_codes, code_dim), jnp.float32)
    return Codebook(jax.random.uniform(key, (num_codes, code_dim), jnp.float32, -bound, bound),
                    zeros, jnp.zeros((), jnp.int32), zeros, jnp.zeros((num_codes,), jnp.float32))


def quantize(z_e: jax.Array, embeddings: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest-neighbour codes: z_e [..., D] -> (indices [...] int32, z_q [..., D]); ties go to the lowest index.

    Distances in float32 at full precision on every backend (TF32, the GPU default for float32 matmuls, would
    flip near-tie assignments)."""
    flat = z_e.reshape(-1, z_e.shape[-1]).astype(jnp.float32)
    cross = jnp.matmul(flat, embeddings.T, precision=jax.lax.Precision.HIGHEST)
    distances = jnp.sum(flat ** 2, 1, keepdims=True) - 2.0 * cross + jnp.sum(embeddings ** 2, 1)[None]
    indices = jnp.argmin(distances, axis=1).astype(jnp.int32).reshape(z_e.shape[:-1])
    return indices, embeddings[indices]


def straight_through(z_e: jax.Array, z_q: jax.Array) -> jax.Array:
    """Value z_q, gradient identity w.r.t. z_e (SPEC 3.4)."""
    return z_e + jax.lax.stop_gradient(z_q - z_e)


def ema_update(codebook: Codebook, z_e: jax.Array, indices: jax.Array, decay: float, epsilon: float,
               debias_counts: bool = False) -> Codebook:
    """One EMA codebook update (SPEC 3.5). debias_counts=False keeps the reference's quirk: cluster sizes
    are not de-biased while the sums are, so early codebooks are inflated by 1/(1 - decay^t).
    Sums in float32 at full precision on every backend (no TF32)."""
    num_codes, dim = codebook.embeddings.shape
    flat = jax.lax.stop_gradient(z_e).reshape(-1, dim).astype(jnp.float32)
    onehot = jax.nn.one_hot(indices.reshape(-1), num_codes, dtype=flat.dtype)
    counts, sums = onehot.sum(0), jnp.matmul(onehot.T, flat, precision=jax.lax.Precision.HIGHEST)
    counter = codebook.dw_counter + 1
    debias = 1.0 - jnp.power(decay, counter.astype(jnp.float32))
    cs_average = decay * codebook.cs_average + (1.0 - decay) * counts
    dw_values = codebook.dw_values - (codebook.dw_values - sums) * (1.0 - decay)
    dw_average = dw_values / debias
    sizes = cs_average / debias if debias_counts else cs_average
    total = jnp.sum(sizes)
    smoothed = (sizes + epsilon) / (total + num_codes * epsilon) * total
    return Codebook(dw_average / smoothed[:, None], dw_values, counter, dw_average, cs_average)
