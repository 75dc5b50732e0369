"""The world model's epochs as slots on the device (SPEC 8.3). Slot i of a joint epoch holds its VQ-VAE step
(when i % interval == 0 and VQ-VAE batches are left) and its i-th dynamics step (key fold_in(steps_key, i));
a warm-up epoch is slots with VQ-VAE steps only. Batches are gathered on the device from the replay's frames
(device_replay.gather) by the frame indices the host drew with replay.py's generators, so they are the ones the
host would gather. Each step returns the sums of its metrics over the seed's active steps ("steps": their
number), so that an epoch's metrics are reduced on the device and fetched once (world_model.metrics_from_sums).

Pure and unjitted: programs.py compiles a chunk of slots of one Period as one lax.scan, or each part of a slot as
its own program (ComputeConfig.epoch_chunk); epochs.py draws the slots and runs an epoch.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dlwm_jax import world_model as wm
from dlwm_jax.device_replay import gather
from dlwm_jax.replay import ObservationBatch

Sums = dict  # {metric: sum over active steps, "steps": number of active steps}, float32 scalars


class Slots(NamedTuple):
    """One seed's slots, each field [L, ...] (a leading seed axis [S, L, ...] in the loop)."""
    vq_active: Any    # bool [L]: this seed takes the slot's VQ-VAE step
    vq_frames: Any    # int32 [L, B, C]: frame indices of the VQ-VAE batch (replay.ObservationPlan)
    vq_valid: Any     # bool [L, B]
    dyn_active: Any   # bool [L]: this seed takes the slot's dynamics step
    dyn_frames: Any   # int32 [L, T, Bd, C] (replay.SequencePlan)
    actions: Any      # int32 [L, T, Bd]
    rewards: Any      # float32 [L, T, Bd], raw
    terminals: Any    # bool [L, T, Bd]
    dyn_valid: Any    # bool [L, Bd]


class SharedSlots(NamedTuple):
    """What all seeds share, each field [L]: the per-slot programs' host loop skips a part no seed takes."""
    index: Any    # int32: the slot's number in its epoch
    vq_on: Any    # bool: some seed takes the VQ-VAE step
    dyn_on: Any   # bool: some seed takes the dynamics step


def empty(config: Any, num_seeds: int, length: int) -> tuple[Slots, SharedSlots]:
    """Slots [S, L] and shared [L] that no seed takes (zeros), shaped as epochs.epoch_slots lays an epoch out: what a
    chunk program is compiled for before its first epoch (programs.lower_ahead)."""
    v, d, c = config.vqvae, config.dynamics, config.env.frame_stack
    zeros = lambda *shape, dtype=np.int32: np.zeros((num_seeds, length, *shape), dtype)
    window = (d.sequence_length, d.batch_size)
    slots = Slots(zeros(dtype=bool), zeros(v.batch_size, c), zeros(v.batch_size, dtype=bool), zeros(dtype=bool),
                  zeros(*window, c), zeros(*window), zeros(*window, dtype=np.float32), zeros(*window, dtype=bool),
                  zeros(d.batch_size, dtype=bool))
    return slots, SharedSlots(np.arange(length, dtype=np.int32), np.zeros(length, bool), np.zeros(length, bool))


def _sums(metrics: dict, active: jax.Array) -> Sums:
    return {**{k: jnp.where(active, v, 0.0).astype(jnp.float32) for k, v in metrics.items()},
            "steps": active.astype(jnp.float32)}


def _keep(active: jax.Array, new: Any, old: Any, mask: bool) -> Any:
    """new where active, else old (mask: a step may be inactive (an Adam step on zero gradients is not a no-op):
    every step of a chunk; a per-slot program's with S > 1, as the host loop runs only the steps some seed takes)."""
    return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old) if mask else new


def vqvae_slot(world: wm.WorldModelState, frames: jax.Array, slot: Slots, lr_scale: jax.Array,
               mask: bool) -> tuple[wm.WorldModelState, Sums]:
    """The slot's VQ-VAE step (SPEC 3.7) at lr x lr_scale; slot fields without the L axis, frames [N, H, W]."""
    new, metrics = wm.vqvae_step(world, ObservationBatch(gather(frames, slot.vq_frames), slot.vq_valid), lr_scale)
    return _keep(slot.vq_active, new, world, mask), _sums(metrics, slot.vq_active)


def encode_slot(world: wm.WorldModelState, frames: jax.Array, slot: Slots) -> tuple[jax.Array, Any]:
    """The dynamics step's train-mode encoder pass (wm.encode_sequences) on the slot's windows."""
    return wm.encode_sequences(world, gather(frames, slot.dyn_frames))


def dynamics_slot(world: wm.WorldModelState, batch_stats: Any, indices: jax.Array, slot: Slots,
                  steps_key: jax.Array, index: jax.Array, mask: bool) -> tuple[wm.WorldModelState, Sums]:
    """The slot's dynamics update (SPEC 4.6) on encode_slot's output, key fold_in(steps_key, index)."""
    state = world.replace(encoder_batch_stats=batch_stats)
    new, metrics = wm.dynamics_update(state, indices, slot.actions, slot.rewards, slot.terminals, slot.dyn_valid,
                                      jax.random.fold_in(steps_key, index))
    return _keep(slot.dyn_active, new, world, mask), _sums(metrics, slot.dyn_active)


def _steps(world: wm.WorldModelState, frames: jax.Array, first: Slots, first_index: jax.Array, steps_key: jax.Array,
           lr_scale: jax.Array) -> tuple[Any, Any, list[str], list[str]]:
    """A chunk's (vqvae(w, slot) -> (w, sums), dynamics(w, slot, index) -> (w, sums), each masked by its active
    flags and its sums stacked into one float32 vector, the VQ-VAE sums' names, the dynamics sums' names in that
    order); `first` and `first_index`, a slot of the chunk, give the names. One vector: the scan's carry adds a
    step's sums in one operation, not one GPU kernel per metric."""
    def vqvae(w, slot):
        return vqvae_slot(w, frames, slot, lr_scale, mask=True)

    def dynamics(w, slot, index):
        indices, batch_stats = encode_slot(w, frames, slot)
        return dynamics_slot(w, batch_stats, indices, slot, steps_key, index, mask=True)

    def stacked(fn, *example):
        names = list(jax.eval_shape(fn, world, *example)[1])

        def step(*args):
            w, sums = fn(*args)
            return w, jnp.stack([sums[k] for k in names])
        return step, names
    (vqvae, vq_names), (dynamics, dyn_names) = stacked(vqvae, first), stacked(dynamics, first, first_index)
    return vqvae, dynamics, vq_names, dyn_names


class Period(NamedTuple):
    """The slot pattern of a compiled chunk (slots.chunk): a VQ-VAE step in the first of every `interval` slots (0:
    in none) and a dynamics step in every slot (`dynamics`) or in none, each taken where its active flag says.
    Static: a program per Period. An epoch runs one throughout (epochs.py: the warm-up Period(1, False), a joint
    epoch Period(interval, True)); its flags mask what the pattern holds but the epoch does not take (a seed's
    shorter epoch, the slots after the dynamics stream, the last chunk's padding)."""
    interval: int
    dynamics: bool

    def slots(self, about: int) -> int:
        """A chunk's length: the smallest multiple of the interval >= `about` (compute.epoch_chunk), so that every
        chunk of an epoch starts a period."""
        return -(-about // self.interval) * self.interval if self.interval else about


def chunk(world: wm.WorldModelState, frames: jax.Array, slots: Slots, index: jax.Array, steps_key: jax.Array,
          lr_scale: jax.Array, period: Period, unroll: bool = False) -> tuple[wm.WorldModelState, tuple[Sums, Sums]]:
    """L slots of `period` (L a multiple of its interval) in one lax.scan over the periods, each a VQ-VAE step and
    then a scan of the period's dynamics steps, or with `unroll` (compute.period_unroll) those steps written out
    one after another (a dynamics-only Period(0, True) chunk, the benchmarks', stays a scan); returns (world,
    (VQ-VAE sums, dynamics sums)) over the chunk. No
    conditional: a step no seed takes runs and is masked (on a GPU a conditional reads its predicate back to the
    host, and its pass-through branch copies the whole state: benchmarks/kernels.py). The sums ride in the scan's
    carry, a vector per kind (stacked per slot, or a scalar per metric, each would be a GPU kernel per slot).
    index: the slots' numbers [L]."""
    first = jax.tree.map(lambda x: x[0], slots)
    vqvae, dynamics, vq_names, dyn_names = _steps(world, frames, first, index[0], steps_key, lr_scale)
    no_vq, no_dyn = jnp.zeros(len(vq_names), jnp.float32), jnp.zeros(len(dyn_names), jnp.float32)
    named = lambda names, sums: {k: sums[i] for i, k in enumerate(names)}

    def dynamics_steps(w, dyn_sums, group, numbers):
        def step(carry, xs):
            w, sums = carry
            w, more = dynamics(w, *xs)
            return (w, sums + more), None
        (w, dyn_sums), _ = jax.lax.scan(step, (w, dyn_sums), (group, numbers), unroll=unroll and period.interval > 0)
        return w, dyn_sums

    if period.interval == 0:  # dynamics steps only (benchmarks/run.py's dynamics step)
        world, dyn = dynamics_steps(world, no_dyn, slots, index)
        return world, (named(vq_names, no_vq), named(dyn_names, dyn))

    def body(carry, xs):
        w, vq_sums, dyn_sums = carry
        group, numbers = xs
        w, more = vqvae(w, jax.tree.map(lambda x: x[0], group))
        vq_sums = vq_sums + more
        if period.dynamics:
            w, dyn_sums = dynamics_steps(w, dyn_sums, group, numbers)
        return (w, vq_sums, dyn_sums), None

    periods = jax.tree.map(lambda x: x.reshape(-1, period.interval, *x.shape[1:]), (slots, index))
    (world, vq, dyn), _ = jax.lax.scan(body, (world, no_vq, no_dyn), periods)
    return world, (named(vq_names, vq), named(dyn_names, dyn))
