"""The replay's frames on the device: uint8 [S, capacity, H, W] per run (one copy of every seed's frames, written
once per collected chunk), and the gather that turns host-drawn frame indices (replay.py's plans) into stacked
observations inside a compiled program. The host keeps the replay (the source of truth, checkpointed); the device
copy only saves the per-step gathers and host->device copies of the batches, which stay bit-identical."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding


def gather(frames: jax.Array, stacks: jax.Array) -> jax.Array:
    """frames uint8 [N, H, W], stacks int [..., C] frame indices (oldest first) -> observations uint8 [..., H, W, C],
    equal to Replay.gather on the host's copy."""
    return jnp.moveaxis(frames[stacks], -3, -1)


def empty_frames(num_seeds: int, capacity: int, frame_shape: tuple[int, int],
                 sharding: NamedSharding | None = None) -> jax.Array:
    """uint8 zeros [S, capacity, H, W], made on the device (and on the seed sharding)."""
    return jax.jit(lambda: jnp.zeros((num_seeds, capacity, *frame_shape), jnp.uint8), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0)
def write_frames(frames: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """frames [S, capacity, H, W] with new [S, n, H, W] written at steps start..start+n-1 of every seed (the buffer
    is donated: updated in place where the backend can)."""
    return jax.lax.dynamic_update_slice_in_dim(frames, new, start, axis=1)


def seed_chunks(pooled: np.ndarray, num_seeds: int) -> np.ndarray:
    """A pooled collection's frames uint8 [S*E, T, H, W] (env rows s*E ... of seed s) -> [S, E*T, H, W]: each
    seed's new steps in the order its Replay.add stores them (stream by stream), for write_frames."""
    return pooled.reshape(num_seeds, -1, *pooled.shape[2:])
