"""ConvLSTM cell with layer norm on the gate convolutions and elementwise peepholes (SPEC 4.3)."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlwm_jax.networks.layers import (Conv, ConvKernel, LayerNormAffine, paired_gemm_conv, paired_layer_norm,
                                      spatial_layer_norm, uniform_init)


class ConvLSTMCell(nn.Module):
    """(inputs [B, H, W, Cin], (h, c) each [B, H, W, Hc]) -> (h, c).

    Gates [i | f | g | o] = LN_x(conv_x(inputs)) + LN_h(conv_h(h)) + per-channel biases; input and forget
    gates peep at the old cell state, the output gate at the new one; the forget gate gets +forget_bias.
    `conv_impl` ("im2col" | "gemm" | "rows" | "xla", ComputeConfig.lstm_conv) only picks how the 5x5 convolutions are
    computed ("gemm": both as one batched matmul, layers.paired_gemm_conv).
    The gate convolutions run in `dtype` (ComputeConfig.dtype); layer norms, gates and the state (h, c) are float32,
    so a 10- or 50-step recurrence does not accumulate bfloat16 rounding.

    For the parameters' gradient of an unroll in one batched pass (`parameter_grads`): `tap` (zeros shaped as the
    gates) is added to LN_x + LN_h, so its cotangent is the gates' (every pre-activation's); with the
    "intermediates" collection mutable the call sows what that pass reads (`RESIDUALS`).
    """
    hidden_channels: int = 128
    kernel_size: int = 5
    forget_bias: float = 1.0
    layer_norm_epsilon: float = 1e-5
    conv_impl: str = "im2col"
    dtype: Any = jnp.float32
    layer_norm: str = "flax"  # ComputeConfig.layer_norm: how the two layer norms are computed

    RESIDUALS = ("inputs", "h", "c", "c_new", "y_x", "y_h")

    def setup(self):
        hc, k = self.hidden_channels, self.kernel_size
        # "gemm": both convolutions as one batched matmul (paired_gemm_conv); each keeps its kernel and name
        conv = lambda: (ConvKernel(4 * hc, k) if self.conv_impl == "gemm"
                        else Conv(4 * hc, k, k // 2, use_bias=False, impl=self.conv_impl, dtype=self.dtype))
        # "fused": the two layer norms normalise as one (paired_layer_norm); each keeps its parameters and name
        norm = lambda: (LayerNormAffine() if self.layer_norm == "fused"
                        else spatial_layer_norm(self.layer_norm_epsilon, impl=self.layer_norm))
        self.conv_x, self.ln_x, self.conv_h, self.ln_h = conv(), norm(), conv(), norm()
        gate_bias = uniform_init(1.0 / math.sqrt(hc * k * k))
        self.bias_i, self.bias_f, self.bias_g, self.bias_o = (
            self.param(f"bias_{g}", gate_bias, (hc,)) for g in "ifgo")
        self.peephole_i, self.peephole_f, self.peephole_o = (
            self.param(f"peephole_{g}", nn.initializers.normal(1.0), (hc,)) for g in "ifo")

    def __call__(self, inputs: jax.Array, state: tuple[jax.Array, jax.Array],
                 tap: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        h, c = state
        y = self.convs(inputs, h)
        gates = self._normalized(y)
        if tap is not None:
            gates = gates + tap
        i, f, g = self._input_preactivations(gates, c)
        c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h_new = jax.nn.sigmoid(self._output_preactivation(gates, c_new)) * jnp.tanh(c_new)
        for name, value in zip(self.RESIDUALS, (inputs, h, c, c_new, y[0], y[1])):
            self.sow("intermediates", name, value)
        return h_new, c_new

    def convs(self, inputs: jax.Array, h: jax.Array) -> jax.Array:
        """[conv_x(inputs), conv_h(h)] stacked: [2, B, H, W, 4 Hc]."""
        if self.conv_impl == "gemm":
            kernels = self.conv_x(inputs.shape[-1]), self.conv_h(h.shape[-1])
            return paired_gemm_conv(inputs.astype(self.dtype), h.astype(self.dtype),
                                    *(w.astype(self.dtype) for w in kernels), self.kernel_size // 2)
        return jnp.stack([self.conv_x(inputs), self.conv_h(h)])

    def preactivations(self, y: jax.Array, c: jax.Array, c_new: jax.Array) -> jax.Array:
        """The four gates' arguments before their nonlinearity, [..., 4 Hc], from the convolutions' outputs (stacked,
        as `convs` returns them) and the old and new cell states as given: how every parameter but the kernels
        enters a step."""
        gates = self._normalized(y)
        return jnp.concatenate([*self._input_preactivations(gates, c), self._output_preactivation(gates, c_new)], -1)

    def _normalized(self, y):
        """LN_x(y[0]) + LN_h(y[1])."""
        if self.layer_norm == "fused":
            shape = y.shape[-3:]
            return paired_layer_norm(y, self.ln_x(shape), self.ln_h(shape), self.layer_norm_epsilon)
        return self.ln_x(y[0]) + self.ln_h(y[1])

    def _input_preactivations(self, gates, c):
        i, f, g, _ = jnp.split(gates, 4, axis=-1)
        return (i + self.peephole_i * c + self.bias_i, f + self.peephole_f * c + self.bias_f + self.forget_bias,
                g + self.bias_g)

    def _output_preactivation(self, gates, c_new):
        return jnp.split(gates, 4, axis=-1)[3] + self.bias_o + self.peephole_o * c_new


def parameter_grads(cell: ConvLSTMCell, params: Any, residuals: dict[str, jax.Array], d_gates: jax.Array) -> Any:
    """The cell parameters' gradient over all steps of an unroll at once: residuals are the sown `RESIDUALS` of
    every step, stacked on the batch axis, and d_gates the gates' cotangents (the `tap`'s) likewise. Sum over steps
    of each step's gradient, with one batched pass per parameter instead of one per step."""
    r = residuals
    pre = lambda p, y: cell.apply({"params": p}, y, r["c"], r["c_new"], method="preactivations")
    grads, dy = jax.vjp(pre, params, jnp.stack([r["y_x"], r["y_h"]]))[1](d_gates)
    convs = lambda p: cell.apply({"params": p}, r["inputs"], r["h"], method="convs")
    kernel_grads, = jax.vjp(convs, params)[1](dy)  # the convolutions' forward is dead code here
    return jax.tree.map(jnp.add, grads, kernel_grads)  # each is zero where the other is not
