"""Epochs over the seed axis (SPEC 8.3): one warm-up epoch of VQ-VAE steps, one joint epoch of VQ-VAE and
dynamics steps, for S seeds at once. The host draws each seed's batches from its replay (replay.py's
generators, in order) and feeds them to the compiled programs (programs.py); seeds whose epochs are shorter get
masked steps."""
from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlwm_jax import world_model as wm
from dlwm_jax.programs import Programs
from dlwm_jax.replay import Replay
from dlwm_jax.seed_axis import unstack


@functools.cache
def _gather_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                 thread_name_prefix="replay-gather")


def _next_batches(streams: Sequence[Any], active: np.ndarray) -> list:
    """The next batch of each active seed's stream (None for the others). With several seeds the replay gathers
    run in threads (numpy copies without the GIL), so the host's work per step grows less than S-fold; each
    stream is still read by one thread at a time, in order."""
    pull = lambda stream, on: next(stream) if on else None
    if len(streams) == 1:
        return [pull(streams[0], active[0])]
    return list(_gather_pool().map(pull, streams, active))


def _stack_batches(batches: Sequence[Any]) -> Any:
    """Per-seed ObservationBatch / SequenceBatch (numpy) -> one with a leading seed axis."""
    return type(batches[0])(*(np.stack(fields) for fields in zip(*batches)))


def _zeros_like(batch: Any) -> Any:
    """A padding batch: zeros everywhere, valid all False (masked out of losses and the EMA anyway)."""
    return type(batch)(*(np.zeros_like(x) for x in batch))


def per_seed_metrics(history: list, num_seeds: int) -> list[dict[str, float]]:
    """[(active [S], metrics [S])] of a phase -> per seed the metrics averaged over its active steps."""
    history = jax.device_get(history)
    return [wm.average_metrics([unstack(m, s) for on, m in history if on[s]]) for s in range(num_seeds)]


def warmup_epoch(programs: Programs, world: wm.WorldModelState, replays: Sequence[Replay], keys: jax.Array,
                 put: Callable = lambda tree: tree, progress: wm.Progress | None = None
                 ) -> tuple[wm.WorldModelState, list[dict[str, float]]]:
    """One warm-up epoch per seed (SPEC 8.3, iteration 1): a full shuffled pass of VQ-VAE steps at lr x multiplier.
    world [S, ...], one replay and key per seed, put: Run.put. Returns (world, per seed averaged metrics)."""
    config, S = world.config, len(replays)
    streams = [r.observation_batches(k, config.vqvae.batch_size) for r, k in zip(replays, keys)]
    num_batches = {r.num_observation_batches(config.vqvae.batch_size) for r in replays}
    assert len(num_batches) == 1, "seeds' replays must have equal sizes"
    lr_scale = jnp.asarray(config.vqvae.warmup_lr_multiplier, jnp.float32)
    active = np.ones(S, bool)
    history = []
    for i in range(num_batches.pop()):
        batches = _stack_batches(_next_batches(streams, active))
        world, metrics = programs.vqvae_step(put(active), world, put(batches), lr_scale)
        history.append((active, metrics))
        if progress is not None:
            progress("vqvae", i, metrics)
    return world, per_seed_metrics(history, S)


def joint_epoch(programs: Programs, world: wm.WorldModelState, replays: Sequence[Replay], keys: jax.Array,
                interval: int, put: Callable = lambda tree: tree, lr_scale: float = 1.0,
                progress: wm.Progress | None = None) -> tuple[wm.WorldModelState, list[dict[str, dict[str, float]]]]:
    """One joint epoch per seed (SPEC 8.3): for i = 0, 1, ...: if i % interval == 0 and the VQ-VAE stream is not
    exhausted, one VQ-VAE step; then one dynamics step with key fold_in(split(key, 3)[2], i); the epoch ends when
    the dynamics stream is exhausted (floor(D / interval) + 1 VQ-VAE steps for D window batches).

    Seeds whose epochs have fewer dynamics batches D_s (window offsets are random per seed, SPEC 2) get masked
    no-op steps until the longest is done. world [S, ...], one replay and key per seed, put: Run.put.
    Returns (world, per seed {"vqvae": ..., "dynamics": ...} averaged).
    """
    config, S = world.config, len(replays)
    d = config.dynamics
    split = [jax.random.split(k, 3) for k in keys]  # (vqvae order, dynamics order, dynamics steps) per seed
    vq_streams = [r.observation_batches(k[0], config.vqvae.batch_size) for r, k in zip(replays, split)]
    num_vq = {r.num_observation_batches(config.vqvae.batch_size) for r in replays}
    assert len(num_vq) == 1, "seeds' replays must have equal sizes"
    num_vq = num_vq.pop()
    dyn_counts = np.array([r.num_sequence_batches(k[1], d.batch_size, d.sequence_length, d.max_offset)
                           for r, k in zip(replays, split)])
    dyn_streams = [r.sequence_batches(k[1], d.batch_size, d.sequence_length, d.max_offset)
                   for r, k in zip(replays, split)]
    steps_keys = put(jnp.stack([k[2] for k in split]))
    lr_scale = jnp.asarray(lr_scale, jnp.float32)
    vq_history, dyn_history = [], []
    filler = {}

    def stacked(streams, active):
        batches = _next_batches(streams, active)
        if not active.all():
            some = next(b for b in batches if b is not None)
            pad = filler[type(some)] = filler.get(type(some)) or _zeros_like(some)
            batches = [pad if b is None else b for b in batches]
        return put(_stack_batches(batches))

    for i in range(int(dyn_counts.max()) + 1):
        vq_active = np.full(S, i % interval == 0 and i // interval < num_vq) & (i <= dyn_counts)
        if vq_active.any():
            world, metrics = programs.vqvae_step(put(vq_active), world, stacked(vq_streams, vq_active), lr_scale)
            vq_history.append((vq_active, metrics))
        dyn_active = i < dyn_counts
        if dyn_active.any():
            batch = stacked(dyn_streams, dyn_active)
            indices, batch_stats = programs.encode_sequences(world, batch.observations)
            world, metrics = programs.dynamics_update(put(dyn_active), world, batch_stats, indices, batch,
                                                      steps_keys, i)
            dyn_history.append((dyn_active, metrics))
            if progress is not None:
                progress("dynamics", i, metrics)
    vqvae, dynamics = per_seed_metrics(vq_history, S), per_seed_metrics(dyn_history, S)
    return world, [{"vqvae": v, "dynamics": dy} for v, dy in zip(vqvae, dynamics)]


