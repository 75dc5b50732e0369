"""ConvLSTM cell with layer norm on the gate convolutions and elementwise peepholes (SPEC 4.3)."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlwm_jax.networks.layers import Conv, spatial_layer_norm, uniform_init


class ConvLSTMCell(nn.Module):
    """(inputs [B, H, W, Cin], (h, c) each [B, H, W, Hc]) -> (h, c).

    Gates [i | f | g | o] = LN_x(conv_x(inputs)) + LN_h(conv_h(h)) + per-channel biases; input and forget
    gates peep at the old cell state, the output gate at the new one; the forget gate gets +forget_bias.
    `conv_impl` ("im2col" | "gemm" | "rows" | "xla", ComputeConfig.lstm_conv) only picks how the 5x5 convolutions are computed.
    The gate convolutions run in `dtype` (ComputeConfig.dtype); layer norms, gates and the state (h, c) are float32,
    so a 10- or 50-step recurrence does not accumulate bfloat16 rounding.
    """
    hidden_channels: int = 128
    kernel_size: int = 5
    forget_bias: float = 1.0
    layer_norm_epsilon: float = 1e-5
    conv_impl: str = "im2col"
    dtype: Any = jnp.float32
    layer_norm: str = "flax"  # ComputeConfig.layer_norm: how the two layer norms are computed

    @nn.compact
    def __call__(self, inputs: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        h, c = state
        hc, k = self.hidden_channels, self.kernel_size
        pad = k // 2
        gate_conv = lambda name: Conv(4 * hc, k, pad, use_bias=False, impl=self.conv_impl, dtype=self.dtype,
                                      name=name)
        x_gates = spatial_layer_norm(self.layer_norm_epsilon, "ln_x", impl=self.layer_norm)(gate_conv("conv_x")(inputs))
        h_gates = spatial_layer_norm(self.layer_norm_epsilon, "ln_h", impl=self.layer_norm)(gate_conv("conv_h")(h))
        gate_bias = uniform_init(1.0 / math.sqrt(hc * k * k))
        b_i, b_f, b_g, b_o = (self.param(f"bias_{g}", gate_bias, (hc,)) for g in "ifgo")
        w_ci, w_cf, w_co = (self.param(f"peephole_{g}", nn.initializers.normal(1.0), (hc,)) for g in "ifo")
        i, f, g, o = jnp.split(x_gates + h_gates, 4, axis=-1)
        i = jax.nn.sigmoid(i + w_ci * c + b_i)
        f = jax.nn.sigmoid(f + w_cf * c + b_f + self.forget_bias)
        c_new = f * c + i * jnp.tanh(g + b_g)
        h_new = jax.nn.sigmoid(o + b_o + w_co * c_new) * jnp.tanh(c_new)
        return h_new, c_new
