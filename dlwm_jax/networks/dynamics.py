"""Two-cell ConvLSTM dynamics network with next-latent and reward heads (SPEC 4.1-4.2)."""
from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from dlwm_jax.networks.convlstm import ConvLSTMCell
from dlwm_jax.networks.layers import Conv, dense, leaky_relu, spatial_layer_norm


class DynamicsState(NamedTuple):
    """Recurrent state, each [B, 6, 6, Hc]."""
    h1: jax.Array
    c1: jax.Array
    h2: jax.Array
    c2: jax.Array


def initial_state(batch_size: int, hidden_channels: int, grid: int = 6) -> DynamicsState:
    zeros = jnp.zeros((batch_size, grid, grid, hidden_channels), jnp.float32)
    return DynamicsState(zeros, zeros, zeros, zeros)


def tile_action(actions: jax.Array, num_actions: int, grid: int) -> jax.Array:
    """int actions [B] -> one-hot planes [B, grid, grid, A] (SPEC 4.1)."""
    onehot = jax.nn.one_hot(actions, num_actions, dtype=jnp.float32)
    return jnp.broadcast_to(onehot[:, None, None, :], (actions.shape[0], grid, grid, num_actions))


class Dynamics(nn.Module):
    """One step: (z_q [B,6,6,D], actions [B], state) -> (next_latent_logits [B,6,6,K], reward_logits [B,3], state).

    The one-hot action is tiled over the grid and concatenated (as the last channels) to the input of both
    cells and to the heads' shared input y = [h2, action]; no nonlinearity on h2 (SPEC 4.2).
    `recur` (the two cells: y and the new state) and `heads` (y -> both logits) are the step's two halves: the heads
    feed nothing back into the recurrence, so a training unroll runs them once on every step's y (world_model).
    Convolutions and dense layers in `dtype` (ComputeConfig.dtype); state and both logits are float32. `conv_impl`
    computes the cells' 5x5 convolutions and the heads' 1x1 ones (with "im2col" or "gemm" a 1x1 one is a matmul, which
    a GPU runs in its command buffers, where a cuDNN convolution ends one: benchmarks/kernels.py).
    """
    num_actions: int
    num_codes: int = 128
    hidden_channels: int = 128
    kernel_size: int = 5
    forget_bias: float = 1.0
    reward_conv_channels: int = 32
    reward_hidden: int = 512
    num_reward_classes: int = 3
    layer_norm_epsilon: float = 1e-5
    conv_impl: str = "im2col"  # ComputeConfig.lstm_conv: how the cells' 5x5 convolutions are computed
    dtype: Any = jnp.float32   # ComputeConfig.dtype
    layer_norm: str = "flax"   # ComputeConfig.layer_norm
    grid: int = 6              # the latent grid's side (image_size // 16): the reward head's dense input

    def setup(self):
        self.cell1, self.cell2 = dynamics_cell(self), dynamics_cell(self)
        head = lambda features: Conv(features, 1, 0, use_bias=True, impl=self.conv_impl,
                                     dtype=self.dtype)  # 1x1 convolutions, computed as the cells' are
        self.next_latent_head = head(self.num_codes)
        self.reward_conv = head(self.reward_conv_channels)
        self.reward_norm = spatial_layer_norm(self.layer_norm_epsilon, None, self.dtype, self.layer_norm)
        self.reward_dense = dense(self.reward_hidden, self.grid * self.grid * self.reward_conv_channels,
                                  dtype=self.dtype)
        self.reward_out = dense(self.num_reward_classes, self.reward_hidden, dtype=self.dtype)

    def __call__(self, z_q: jax.Array, actions: jax.Array, state: DynamicsState):
        y, state = self.recur(z_q, actions, state)
        return (*self.heads(y), state)

    def recur(self, z_q: jax.Array, actions: jax.Array, state: DynamicsState,
              taps: dict[str, jax.Array] | None = None) -> tuple[jax.Array, DynamicsState]:
        """The two cells: (z_q, actions, state) -> (y = [h2, action] [B, 6, 6, Hc + A], the new state). taps:
        {"cell1": ..., "cell2": ...}, each cell's `tap` (convlstm.parameter_grads)."""
        chex.assert_rank(z_q, 4)
        chex.assert_shape(actions, (z_q.shape[0],))
        taps = taps or {}
        act = tile_action(actions, self.num_actions, z_q.shape[1])
        h1, c1 = self.cell1(jnp.concatenate([z_q, act], -1), (state.h1, state.c1), taps.get("cell1"))
        h2, c2 = self.cell2(jnp.concatenate([h1, act], -1), (state.h2, state.c2), taps.get("cell2"))
        return jnp.concatenate([h2, act], -1), DynamicsState(h1, c1, h2, c2)

    def heads(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """y [B, 6, 6, Hc + A] -> (next_latent_logits [B, 6, 6, K], reward_logits [B, 3]), float32 (log-softmax
        losses and sampling read them)."""
        return self.latent_head(y), self.reward_head(y)

    def latent_head(self, y: jax.Array) -> jax.Array:
        return self.next_latent_head(y).astype(jnp.float32)

    def reward_head(self, y: jax.Array) -> jax.Array:
        r = leaky_relu(self.reward_norm(self.reward_conv(y)))
        r = leaky_relu(self.reward_dense(r.reshape(r.shape[0], -1)))
        return self.reward_out(r).astype(jnp.float32)


CELLS = ("cell1", "cell2")


def dynamics_cell(dynamics: Dynamics) -> ConvLSTMCell:
    """A ConvLSTMCell as `dynamics` builds each of its two (apply it with params[CELLS[i]])."""
    return ConvLSTMCell(dynamics.hidden_channels, dynamics.kernel_size, dynamics.forget_bias,
                        dynamics.layer_norm_epsilon, dynamics.conv_impl, dynamics.dtype, dynamics.layer_norm)


def is_reward_head(path: tuple[str, ...]) -> bool:
    """True for parameters of the reward head (their own optimizer group, SPEC 8.2)."""
    return path[0].startswith("reward_")
