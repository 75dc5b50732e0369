"""Epochs over the seed axis (SPEC 8.3): one warm-up epoch of VQ-VAE steps, one joint epoch of VQ-VAE and
dynamics steps, for S seeds at once. The host draws each seed's batches as frame indices from its replay
(replay.py's plans: its generators, in order) and lays them out as slots (slots.py); programs.world_model_chunk
runs them a chunk at a time, gathering the batches from the frames on the device (Run.frames) and summing the
metrics there, so the epoch's one host sync is the fetch of its sums at the end. An epoch's slots repeat one
slots.Period; seeds whose epochs are shorter get masked slots."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlwm_jax import world_model as wm
from dlwm_jax.config import Config
from dlwm_jax.programs import Programs
from dlwm_jax.replay import ObservationPlan, Replay, SequencePlan
from dlwm_jax.seed_axis import unstack
from dlwm_jax.slots import Period, SharedSlots, Slots


def _rows(plans: Sequence[Any], rows: np.ndarray, active: np.ndarray) -> list[np.ndarray]:
    """Per field of the plans, [S, L, ...]: in slot i, row rows[i] of seed s's plan where active[s, i], zeros
    (a masked slot) elsewhere; each field keeps its dtype."""
    def field(x: np.ndarray, on: np.ndarray) -> np.ndarray:  # one seed's field [N, ...], on [L]
        picked = x[np.minimum(rows, len(x) - 1)] if len(x) else np.zeros((len(rows), *x.shape[1:]), x.dtype)
        return np.where(on.reshape(-1, *[1] * (x.ndim - 1)), picked, np.zeros((), x.dtype))
    return [np.stack([field(x, on) for x, on in zip(xs, active)]) for xs in zip(*plans)]


def epoch_slots(config: Config, vq_plans: Sequence[ObservationPlan], seq_plans: Sequence[SequencePlan] | None = None,
                interval: int = 1) -> tuple[Slots, SharedSlots]:
    """Slots [S, L] and shared [L] of one epoch per seed. seq_plans None: a warm-up epoch, slot i = VQ-VAE batch i.
    Otherwise a joint epoch: slot i = (VQ-VAE batch i // interval if i % interval == 0, batches are left and
    i <= D_s; dynamics batch i if i < D_s) for i < max D_s + 1 (D_s: seed s's dynamics batches)."""
    num_vq = {len(p.valid) for p in vq_plans}
    assert len(num_vq) == 1, "seeds' replays must have equal sizes"
    num_vq = num_vq.pop()
    if seq_plans is None:
        d, stack = config.dynamics, config.env.frame_stack
        empty = lambda *shape, dtype=np.int32: np.zeros((0, *shape), dtype)
        seq_plans = [SequencePlan(empty(d.sequence_length, d.batch_size, stack), empty(d.sequence_length, d.batch_size),
                                  empty(d.sequence_length, d.batch_size, dtype=np.float32),
                                  empty(d.sequence_length, d.batch_size, dtype=bool), empty(d.batch_size, dtype=bool))
                     for _ in vq_plans]
        index, interval = np.arange(num_vq), 1
        vq_active = np.ones((len(vq_plans), num_vq), bool)
    else:
        counts = np.array([len(p.valid) for p in seq_plans])
        index = np.arange(counts.max() + 1)
        vq_active = (index % interval == 0) & (index // interval < num_vq) & (index[None] <= counts[:, None])
    dyn_active = index[None] < np.array([len(p.valid) for p in seq_plans])[:, None]
    vq_frames, vq_valid = _rows(vq_plans, index // interval, vq_active)
    dyn_frames, actions, rewards, terminals, dyn_valid = _rows(seq_plans, index, dyn_active)
    slots = Slots(vq_active, vq_frames, vq_valid, dyn_active, dyn_frames, actions, rewards, terminals, dyn_valid)
    return slots, SharedSlots(index.astype(np.int32), vq_active.any(0), dyn_active.any(0))


def run_slots(programs: Programs, world: wm.WorldModelState, frames: jax.Array, slots: Slots, shared: SharedSlots,
              steps_keys: jax.Array, lr_scale: float, period: Period, progress: wm.Progress | None = None,
              ) -> tuple[wm.WorldModelState, list[dict[str, dict[str, float]]]]:
    """An epoch's slots, of `period` (slots.Period), through programs.world_model_chunk, programs.chunk_slots(period)
    at a time (the last chunk padded with slots no seed takes). Returns (world, per seed {"vqvae": metrics,
    "dynamics": metrics} averaged over the steps it took; {} for a kind it took none of)."""
    n, length = programs.chunk_slots(period), len(shared.index)
    pad = -length % n
    slots = Slots(*(np.concatenate([x, np.zeros((x.shape[0], pad, *x.shape[2:]), x.dtype)], 1) for x in slots))
    shared = SharedSlots(np.concatenate([shared.index, np.arange(length, length + pad, dtype=np.int32)]),
                         *(np.concatenate([x, np.zeros(pad, bool)]) for x in shared[1:]))
    lr_scale = jnp.asarray(lr_scale, jnp.float32)
    sums = {"vqvae": [], "dynamics": []}
    for start in range(0, length + pad, n):
        part = Slots(*(x[:, start:start + n] for x in slots))
        world, vq, dyn = programs.world_model_chunk(world, frames, part, SharedSlots(*(x[start:start + n] for x in shared)),
                                                    steps_keys, lr_scale, period)
        sums["vqvae"] += vq
        sums["dynamics"] += dyn
        if progress is not None:
            progress("dynamics" if shared.dyn_on.any() else "vqvae", min(start + n, length) - 1, None)
    totals = {kind: jax.tree.map(lambda *xs: np.sum(xs, 0, dtype=np.float64), *jax.device_get(found))
              for kind, found in sums.items() if found}
    return world, [{kind: wm.metrics_from_sums(unstack(totals[kind], s)) if kind in totals else {} for kind in sums}
                   for s in range(slots.vq_active.shape[0])]


def warmup_epoch(programs: Programs, world: wm.WorldModelState, replays: Sequence[Replay], frames: jax.Array,
                 keys: jax.Array, progress: wm.Progress | None = None
                 ) -> tuple[wm.WorldModelState, list[dict[str, float]]]:
    """One warm-up epoch per seed (SPEC 8.3, iteration 1): a full shuffled pass of VQ-VAE steps at lr x multiplier.
    world [S, ...], one replay and key per seed, frames [S, capacity, H, W] (Run.frames). Returns (world, per seed
    averaged metrics)."""
    config = world.config
    plans = [r.observation_plan(k, config.vqvae.batch_size) for r, k in zip(replays, keys)]
    slots, shared = epoch_slots(config, plans)
    world, per_seed = run_slots(programs, world, frames, slots, shared, keys, config.vqvae.warmup_lr_multiplier,
                                Period(1, False), progress)
    return world, [metrics["vqvae"] for metrics in per_seed]


def joint_epoch(programs: Programs, world: wm.WorldModelState, replays: Sequence[Replay], frames: jax.Array,
                keys: jax.Array, interval: int, lr_scale: float = 1.0, progress: wm.Progress | None = None
                ) -> tuple[wm.WorldModelState, list[dict[str, dict[str, float]]]]:
    """One joint epoch per seed (SPEC 8.3): for i = 0, 1, ...: if i % interval == 0 and the VQ-VAE stream is not
    exhausted, one VQ-VAE step; then one dynamics step with key fold_in(split(key, 3)[2], i); the epoch ends when
    the dynamics stream is exhausted (floor(D / interval) + 1 VQ-VAE steps for D window batches).

    Seeds whose epochs have fewer dynamics batches D_s (window offsets are random per seed, SPEC 2) get masked
    no-op steps until the longest is done. world [S, ...], one replay and key per seed, frames as warmup_epoch.
    Returns (world, per seed {"vqvae": ..., "dynamics": ...} averaged).
    """
    config, d = world.config, world.config.dynamics
    split = [jax.random.split(k, 3) for k in keys]  # (vqvae order, dynamics order, dynamics steps) per seed
    vq_plans = [r.observation_plan(k[0], config.vqvae.batch_size) for r, k in zip(replays, split)]
    seq_plans = [r.sequence_plan(k[1], d.batch_size, d.sequence_length, d.max_offset) for r, k in zip(replays, split)]
    slots, shared = epoch_slots(config, vq_plans, seq_plans, interval)
    world, per_seed = run_slots(programs, world, frames, slots, shared, jnp.stack([k[2] for k in split]), lr_scale,
                                Period(interval, True), progress)
    return world, per_seed
