"""Latent-space actor-critic on the 6x6 embedding grid (SPEC 5)."""
from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from dlwm_jax.networks.layers import Conv, dense, leaky_relu, spatial_layer_norm


class ActorCritic(nn.Module):
    """z_q [B, 6, 6, D] -> (policy logits [B, A], value [B]). Temperature is applied by the caller.

    `conv_impl` ("im2col" | "gemm" | "rows" | "xla", ComputeConfig.policy_conv) only picks how the convolutions are computed.
    Layers in `dtype` (ComputeConfig.dtype); logits and value are float32 (the PPO loss and sampling read them).
    """
    num_actions: int
    conv_channels: int = 64
    hidden: int = 512
    layer_norm_epsilon: float = 1e-5
    conv_impl: str = "im2col"
    dtype: Any = jnp.float32
    layer_norm: str = "flax"  # ComputeConfig.layer_norm

    @nn.compact
    def __call__(self, z_q: jax.Array) -> tuple[jax.Array, jax.Array]:
        chex.assert_rank(z_q, 4)
        dtype = self.dtype
        x = Conv(self.conv_channels, 1, 0, impl=self.conv_impl, dtype=dtype)(z_q)
        x = leaky_relu(spatial_layer_norm(self.layer_norm_epsilon, dtype=dtype, impl=self.layer_norm)(x))
        x = Conv(self.conv_channels, 5, 2, impl=self.conv_impl, dtype=dtype)(x)
        x = leaky_relu(spatial_layer_norm(self.layer_norm_epsilon, dtype=dtype, impl=self.layer_norm)(x))
        x = x.reshape(x.shape[0], -1)
        x = leaky_relu(dense(self.hidden, x.shape[-1], dtype=dtype)(x))
        logits = dense(self.num_actions, self.hidden, name="actor", dtype=dtype)(x)
        value = dense(1, self.hidden, name="critic", dtype=dtype)(x)[:, 0]
        return logits.astype(jnp.float32), value.astype(jnp.float32)
