"""Arithmetic of the hot paths at `paper` sizes, and the float32 matmul rate of this machine.

Usage: python benchmarks/flops.py

Prints one JSON object: XLA's own FLOP count (`compiled.cost_analysis()`) of the VQ-VAE step, the dynamics
step, one dream (its 50 steps unrolled, since XLA counts a loop's body once) and the PPO epochs of one update,
the GFLOP of a paper run by its step counts (run.schedule_counts, SPEC 8.4), and the GFLOP/s of a 2048^3 float32
matmul (median of 10 after compiling), i.e. the ceiling the projected hours in benchmarks/run.py are compared
against.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # benchmarks/run.py: the same models, batches and schedule totals


def _gflop(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def main() -> None:
    from dlwm_jax import config as config_lib, ppo, world_model as wm
    from dlwm_jax.imagination import imagine
    from dlwm_jax.replay import ObservationBatch, SequenceBatch
    config = config_lib.resolve_compute(config_lib.paper())
    jax.config.update("jax_threefry_partitionable", config.compute.threefry_partitionable)
    num_actions = 18
    rng = np.random.default_rng(0)
    world, networks, params, optimizer, opt_state = run._world_and_agent(config, num_actions)
    frame = (config.env.image_size, config.env.image_size, config.env.frame_stack)
    v, d, p = config.vqvae, config.dynamics, config.policy

    observations = ObservationBatch(jnp.asarray(rng.integers(0, 256, (v.batch_size, *frame), dtype=np.uint8)),
                                    jnp.ones(v.batch_size, bool))
    shape = (d.sequence_length, d.batch_size)
    sequences = SequenceBatch(jnp.asarray(rng.integers(0, 256, (*shape, *frame), dtype=np.uint8)),
                              jnp.asarray(rng.integers(0, num_actions, shape), jnp.int32), jnp.zeros(shape),
                              jnp.zeros(shape, bool), jnp.ones(d.batch_size, bool))
    start_indices, _ = jax.jit(wm.encode)(world, jnp.asarray(rng.integers(0, 256, (p.num_envs, *frame), dtype=np.uint8)))
    dream = lambda params, key: imagine(networks.dream_dynamics, networks.actor_critic,
                                        {"params": world.dynamics_params}, params, world.codebook.embeddings,
                                        start_indices, key, p.horizon, p.bootstrap_at_horizon, unroll=p.horizon)
    rollout = jax.jit(dream)(params, jax.random.key(0))
    update = lambda params, opt_state, rollout, key: ppo.ppo_update(
        params, opt_state, ppo.Rollout(rollout.observations, rollout.actions, rollout.log_probs, rollout.values,
                                       rollout.rewards, rollout.terminals),
        rollout.bootstrap_value, key, p, networks.actor_critic.apply, optimizer, config.compute.ppo_unroll)

    gflop = {
        "vqvae_step": _gflop(wm.vqvae_step, world, observations, jnp.float32(1.0)),
        "dynamics_step": _gflop(wm.dynamics_step, world, sequences, jax.random.key(1)),
        "dream": _gflop(dream, params, jax.random.key(0)),
        "ppo_epochs": _gflop(update, params, opt_state, rollout, jax.random.key(2)),
    }
    counts = run.schedule_counts(config)  # the paper run's step counts (SPEC 8.4)
    paper_run = (counts["vqvae_steps"] * gflop["vqvae_step"] + counts["dynamics_steps"] * gflop["dynamics_step"]
                 + counts["ppo_updates"] * (gflop["dream"] + gflop["ppo_epochs"]))
    rate = matmul_gflops()
    print(json.dumps({"gflop": {k: round(x, 1) for k, x in gflop.items()}, "paper_run_pflop": round(paper_run / 1e6, 1),
                      "matmul_2048_gflops": round(rate), "paper_run_hours_at_matmul_rate": round(paper_run / rate / 3600, 1),
                      "lstm_conv": config.compute.lstm_conv, "dream_lstm_conv": config.compute.dream_lstm_conv}))


if __name__ == "__main__":
    main()
