"""Latent-space actor-critic on the 6x6 embedding grid (SPEC 5)."""
from __future__ import annotations

import chex
import flax.linen as nn
import jax

from dlwm_jax.networks.layers import PatchConv, dense, leaky_relu, spatial_layer_norm


class ActorCritic(nn.Module):
    """z_q [B, 6, 6, D] -> (policy logits [B, A], value [B]). Temperature is applied by the caller.

    `conv_impl` ("im2col" | "rows" | "xla", ComputeConfig.policy_conv) only picks how the convolutions are computed.
    """
    num_actions: int
    conv_channels: int = 64
    hidden: int = 512
    layer_norm_epsilon: float = 1e-5
    conv_impl: str = "im2col"

    @nn.compact
    def __call__(self, z_q: jax.Array) -> tuple[jax.Array, jax.Array]:
        chex.assert_rank(z_q, 4)
        # Explicit names keep nn.Conv's auto-names (the parameter tree is unchanged).
        x = PatchConv(self.conv_channels, 1, 0, impl=self.conv_impl, name="Conv_0")(z_q)
        x = leaky_relu(spatial_layer_norm(self.layer_norm_epsilon)(x))
        x = PatchConv(self.conv_channels, 5, 2, impl=self.conv_impl, name="Conv_1")(x)
        x = leaky_relu(spatial_layer_norm(self.layer_norm_epsilon)(x))
        x = x.reshape(x.shape[0], -1)
        x = leaky_relu(dense(self.hidden, x.shape[-1])(x))
        logits = dense(self.num_actions, self.hidden, name="actor")(x)
        value = dense(1, self.hidden, name="critic")(x)[:, 0]
        return logits, value
