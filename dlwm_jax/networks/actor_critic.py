"""Latent-space actor-critic on the 6x6 embedding grid (SPEC 5)."""
from __future__ import annotations

import chex
import flax.linen as nn
import jax

from dlwm_jax.networks.layers import conv, dense, leaky_relu, spatial_layer_norm


class ActorCritic(nn.Module):
    """z_q [B, 6, 6, D] -> (policy logits [B, A], value [B]). Temperature is applied by the caller."""
    num_actions: int
    conv_channels: int = 64
    hidden: int = 512
    layer_norm_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, z_q: jax.Array) -> tuple[jax.Array, jax.Array]:
        chex.assert_rank(z_q, 4)
        x = conv(self.conv_channels, 1, 0, bias=False)(z_q)
        x = leaky_relu(spatial_layer_norm(self.layer_norm_epsilon)(x))
        x = conv(self.conv_channels, 5, 2, bias=False)(x)
        x = leaky_relu(spatial_layer_norm(self.layer_norm_epsilon)(x))
        x = x.reshape(x.shape[0], -1)
        x = leaky_relu(dense(self.hidden, x.shape[-1])(x))
        logits = dense(self.num_actions, self.hidden, name="actor")(x)
        value = dense(1, self.hidden, name="critic")(x)[:, 0]
        return logits, value
