"""The loop's compiled programs: the pure steps of world_model.py, ppo.py and imagination.py, compiled for S seeds
by seed_axis.over_seeds with each program's XLA options (ComputeConfig), and the initial state of one seed."""
from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from dlwm_jax import envs, ppo, slots
from dlwm_jax import world_model as wm
from dlwm_jax.config import Config, resolve_compute
from dlwm_jax.device_replay import gather
from dlwm_jax.imagination import imagine
from dlwm_jax.networks import make_networks
from dlwm_jax.seed_axis import over_seeds, put_on_seeds


@flax.struct.dataclass
class AgentState:
    params: Any
    opt_state: Any


def initial_state(config: Config, num_actions: int, seed: int) -> tuple[wm.WorldModelState, AgentState]:
    """One seed's (world, agent) before any training."""
    root = jax.random.key(seed)
    init_key, agent_key = jax.random.split(jax.random.fold_in(root, 2**31))  # apart from every iteration
    world = wm.init_world_model(config, num_actions, init_key)
    actor_critic = make_networks(config, num_actions).actor_critic
    agent_params = jax.jit(actor_critic.init)(agent_key, jnp.zeros((1, 6, 6, config.vqvae.code_dim)))
    return world, AgentState(agent_params, policy_optimizer(config).init(agent_params))


def policy_optimizer(config: Config):
    """PPO's optimizer as the loop runs it: flat where compute.flat_optimizer says so (world_model.flat_if)."""
    return wm.flat_if(config, ppo.make_optimizer(config.policy))


class Program:
    """A compiled program (a jax.jit of the loop's) that one thread at a time calls or compiles ahead
    (compile_lowered): JAX compiles a program again when one thread calls it while another compiles it (a smoke run
    compiled its chunks twice so). Whichever comes second waits, then finds the compilation in JAX's caches."""

    def __init__(self, jitted: Callable):
        self.jitted, self.lock = jitted, threading.Lock()

    def __call__(self, *args):
        with self.lock:  # held for the dispatch (the call returns before the device has run it)
            return self.jitted(*args)

    def lower(self, *args) -> Ahead:
        return Ahead(self, self.jitted.lower(*args))


class Ahead(NamedTuple):
    """A program lowered for the arguments the loop will pass (lower_ahead), to compile before its first call."""
    program: Program
    lowered: jax.stages.Lowered


class Programs(NamedTuple):
    """Every compiled program of the loop; arguments and outputs [S, ...] unless said otherwise."""
    chunk_slots: Callable       # slots.Period -> slots per world_model_chunk call of that Period (L)
    world_model_chunk: Callable  # (world, frames, Slots [S, L] numpy, SharedSlots [L] numpy, steps_keys, lr_scale,
                                 # slots.Period) -> (world, [VQ-VAE sums], [dynamics sums]) (slots.py); the world
                                 # given is donated
    act_collect: Callable       # (world, agent_params, stacks [S, E, ...], frames, is_first, key) -> (stacks, actions
    act_eval: Callable          # [S, E]): one env step of collect.py's actors, a program each (env_step)
    random_act: Callable        # (stacks, frames, is_first, key) -> (stacks, uniform actions [S, E])
    policy_update: Callable     # (world, agent, frames, start stacks [S, n, C], key) -> (agent, metrics)
    diagnostics: Callable       # (world, observations, actions, rewards, key) -> metrics


def compile_programs(config: Config, num_actions: int, num_seeds: int, sharding: NamedSharding | None) -> Programs:
    """The loop's programs for S seeds: the pure steps, with each program's XLA options (ComputeConfig). Built
    once per (config, num_actions, S, sharding) in a process, so later runs reuse the compiled executables."""
    return _compile_programs(resolve_compute(config), num_actions, num_seeds, sharding)


@functools.cache
def _compile_programs(config: Config, num_actions: int, num_seeds: int, sharding: NamedSharding | None) -> Programs:
    S, networks = num_seeds, make_networks(config, num_actions)
    compile_ = lambda fn, in_axes, program=None, donate=(): Program(over_seeds(
        fn, S, sharding, in_axes, config.compute.compiler_options(program) if program else None, donate))
    return Programs(
        *make_world_model_chunk(config, S, sharding, compile_),
        act_collect=compile_(env_step(make_act(networks, config.env.collect_temperature)), (0,) * 6),
        act_eval=compile_(env_step(make_act(networks, 1.0)), (0,) * 6),
        random_act=compile_(env_step(lambda obs, key: jax.random.randint(key, obs.shape[:1], 0, num_actions, jnp.int32)),
                            (0,) * 4),
        policy_update=make_policy_update(config, networks, policy_optimizer(config),
                                         lambda fn, n, options: over_seeds(fn, S, sharding, (0,) * n, options)),
        diagnostics=compile_(wm.world_model_diagnostics, (0,) * 5))


HOST_LOOP_CHUNK = 16  # slots per world_model_chunk call when each step is its own program (progress lines only)
_LR_SCALE = np.float32(1.0)  # an epoch's lr_scale argument (epochs.run_slots passes a float32 scalar)


def make_world_model_chunk(config: Config, num_seeds: int, sharding: NamedSharding | None,
                           compile_: Callable) -> tuple[Callable, Callable]:
    """(chunk_slots, world_model_chunk) of Programs; compile_(fn, in_axes, xla_options_of, donate) as in
    _compile_programs. compute.epoch_chunk = n > 0: a chunk of slots.Period(...).slots(n) slots is one compiled
    lax.scan (slots.chunk: no conditional, a program per Period, epoch_periods' compiled ahead), one dispatch and no
    host sync. 0 (the CPU's choice): each part of a slot is its own program with its own XLA options (the VQ-VAE
    step and the dynamics step's encoder pass want other XLA:CPU kernels than the ConvLSTM update), dispatched by a
    host loop over the chunk's slots (HOST_LOOP_CHUNK of them). Both donate the world they are given."""
    n = config.compute.epoch_chunk
    put = functools.partial(put_on_seeds, sharding=sharding)
    if n:
        chunk = functools.cache(lambda period: compile_(
            functools.partial(slots.chunk, period=period, unroll=config.compute.period_unroll),
            (0, 0, 0, None, 0, None), donate=(0,)))

        def scanned(world, frames, part, shared, steps_keys, lr_scale, period):
            world, (vq, dyn) = chunk(period)(world, frames, put(part), shared.index, put(steps_keys), lr_scale)
            return world, [vq], [dyn]

        def scanned_lower(world, frames, steps_keys):
            keys = put(steps_keys)

            def lower(period):
                part, shared = slots.empty(config, num_seeds, period.slots(n))
                return chunk(period).lower(world, frames, put(part), shared.index, keys, _LR_SCALE)
            return {f"world_model_chunk/{name}": lower(period) for name, period in epoch_periods(config).items()}
        scanned.lower = scanned_lower
        return (lambda period: period.slots(n)), scanned

    mask = num_seeds > 1
    vqvae = compile_(functools.partial(slots.vqvae_slot, mask=mask), (0, 0, 0, None), "vqvae_step", donate=(0,))
    encode = compile_(slots.encode_slot, (0, 0, 0), "vqvae_step")
    dynamics = compile_(functools.partial(slots.dynamics_slot, mask=mask), (0, 0, 0, 0, 0, None), donate=(0,))

    def per_slot(world, frames, part, shared, steps_keys, lr_scale, period):
        vq_sums, dyn_sums = [], []
        steps_keys = put(steps_keys)
        for j in np.flatnonzero(shared.vq_on | shared.dyn_on):
            slot = put(slots.Slots(*(x[:, j] for x in part)))
            if shared.vq_on[j]:
                world, sums = vqvae(world, frames, slot, lr_scale)
                vq_sums.append(sums)
            if shared.dyn_on[j]:
                indices, batch_stats = encode(world, frames, slot)
                world, sums = dynamics(world, batch_stats, indices, slot, steps_keys, shared.index[j])
                dyn_sums.append(sums)
        return world, vq_sums, dyn_sums

    def per_slot_lower(world, frames, steps_keys):
        part, shared = slots.empty(config, num_seeds, 1)
        slot = put(slots.Slots(*(x[:, 0] for x in part)))
        indices, batch_stats = jax.eval_shape(encode.jitted, world, frames, slot)
        return {"vqvae_slot": vqvae.lower(world, frames, slot, _LR_SCALE), "encode_slot": encode.lower(world, frames, slot),
                "dynamics_slot": dynamics.lower(world, batch_stats, indices, slot, put(steps_keys), shared.index[0])}
    per_slot.lower = per_slot_lower
    return (lambda period: HOST_LOOP_CHUNK), per_slot


def epoch_periods(config: Config) -> dict[str, slots.Period]:
    """The slots.Periods of the schedule's epochs, in the order the loop needs them: the warm-up's, then each VQ-VAE
    interval's (joint_every_k)."""
    periods = {"warmup": slots.Period(1, False)}
    for k in sorted(set(config.schedule.vq_update_intervals)):
        periods[f"joint_every_{k}"] = slots.Period(k, True)
    return periods


def make_act(networks, temperature: float):
    """act(world, agent_params, obs uint8 [N,96,96,C], key) -> actions [N]: encoder in eval mode, quantise,
    sample from the policy at `temperature` (SPEC 5, 8.3)."""
    def act(world, agent_params, observations, key):
        _, z_q = wm.encode(world, observations)
        logits, _ = networks.actor_critic.apply(agent_params, z_q)
        return ppo.sample_action(logits, key, temperature)
    return act


def env_step(act: Callable) -> Callable:
    """One env step of an actor (collect.py) as one program: (*params, stacks [E, H, W, C], frames uint8 [E, H, W],
    is_first [E], key) -> (stacks, act(*params, stacks, key)), the newest frames pushed first (envs.push_frame)."""
    def step(*args):
        *params, stacks, frames, is_first, key = args
        stacks = envs.push_frame(stacks, frames, is_first)
        return stacks, act(*params, stacks, key)
    return step


def make_policy_update(config: Config, networks, optimizer, compile_fn: Callable | None = None):
    """update(world, agent, frames, start_stacks, key) -> (agent, metrics): gather 16 real start observations
    (start_stacks int [16, C]: their frame indices, Replay.sample_stacks) from frames uint8 [N, H, W] (the
    replay's on the device), encode them (eval BN), imagine 50 steps, one PPO update (SPEC 6, 7).

    Two compiled programs, so each gets its own XLA options (ComputeConfig.compiler_options): the dream and
    the PPO update. compile_fn(fn, num_args, compiler_options) compiles each (default: jax.jit; the loop
    passes its seed-axis one). `update.dream(world, agent, frames, start_stacks, key)` is the first alone ->
    (Rollout, bootstrap value, the update's key, mean imagined reward); its dream key is split(key)[0].
    """
    config = resolve_compute(config)
    p = config.policy

    def dream(world: wm.WorldModelState, agent: AgentState, frames, start_stacks, key):
        dream_key, ppo_key = jax.random.split(key)
        start_indices, _ = wm.encode(world, gather(frames, start_stacks))
        dream = imagine(networks.dream_dynamics, networks.actor_critic, {"params": world.dynamics_params}, agent.params,
                        world.codebook.embeddings, start_indices, dream_key, p.horizon, p.bootstrap_at_horizon,
                        unroll=config.compute.imagination_unroll)
        rollout = ppo.Rollout(dream.observations, dream.actions, dream.log_probs, dream.values, dream.rewards,
                              dream.terminals)
        return rollout, dream.bootstrap_value, ppo_key, jnp.mean(dream.rewards)

    def improve(agent: AgentState, rollout: ppo.Rollout, bootstrap_value, ppo_key):
        params, opt_state, metrics = ppo.ppo_update(agent.params, agent.opt_state, rollout, bootstrap_value,
                                                    ppo_key, p, networks.actor_critic.apply, optimizer,
                                                    config.compute.ppo_unroll)
        return AgentState(params, opt_state), metrics

    compile_fn = compile_fn or (lambda fn, num_args, options: jax.jit(fn, compiler_options=options))
    dream_program = Program(compile_fn(dream, 5, {}))
    improve_program = Program(compile_fn(improve, 4, config.compute.compiler_options("ppo_update")))

    def update(world: wm.WorldModelState, agent: AgentState, frames, start_stacks, key):
        rollout, bootstrap_value, ppo_key, imagined_reward_mean = dream_program(world, agent, frames, start_stacks, key)
        agent, metrics = improve_program(agent, rollout, bootstrap_value, ppo_key)
        return agent, {**metrics, "imagined_reward_mean": imagined_reward_mean}

    def lower(world, agent, frames, start_stacks, key):
        rollout, bootstrap_value, ppo_key, _ = jax.eval_shape(dream_program.jitted, world, agent, frames, start_stacks,
                                                              key)
        return {"dream": dream_program.lower(world, agent, frames, start_stacks, key),
                "ppo_update": improve_program.lower(agent, rollout, bootstrap_value, ppo_key)}
    update.lower, update.dream = lower, dream_program
    return update


def lower_ahead(programs: Programs, config: Config, world: wm.WorldModelState, agent: AgentState, frames: jax.Array,
                keys: jax.Array, put: Callable) -> dict[str, Ahead]:
    """The loop's later programs lowered for arguments shaped as the loop will pass them (world, agent, frames
    (Run.frames) and keys [S] as the run holds them, `put` its seed placement), by name, in the order the loop needs
    them: iteration 1's world-model programs (warm-up, joint epochs, the diagnostics on schedule.diagnostic_windows
    windows), the PPO update's (the dream, which the evaluation's imagined returns run too, and the update), the
    actors', then the chunks of later iterations' VQ-VAE intervals. compile_ahead compiles them;
    benchmarks/kernels.py compiles them for a GPU it does not have."""
    S, p, e, windows = len(keys), config.policy, config.env, config.schedule.diagnostic_windows
    image = (e.image_size, e.image_size)
    chunks = programs.world_model_chunk.lower(world, frames, keys)  # puts its keys itself, as the loop's chunk
    later = {name: chunks.pop(name) for name in list(chunks) if name.startswith("world_model_chunk/joint_every_")
             and name != f"world_model_chunk/joint_every_{config.schedule.vq_update_intervals[0]}"}
    lowered = dict(chunks)
    keys = put(keys)
    if windows:  # zeros as a view of one element: one device puts nothing (a paper run's windows are 66 MB)
        shape = (S, wm.diagnostic_window_length(config), windows)
        zeros = lambda *tail, dtype: put(np.broadcast_to(np.zeros((), dtype), (*shape, *tail)))
        lowered["diagnostics"] = programs.diagnostics.lower(world, zeros(*image, e.frame_stack, dtype=np.uint8),
                                                            zeros(dtype=np.int32), zeros(dtype=np.float32), keys)
    lowered.update(programs.policy_update.lower(world, agent, frames,
                                                put(np.zeros((S, p.num_envs, e.frame_stack), np.int32)), keys))
    for name, act, envs_per_seed in (("act_eval", programs.act_eval, e.num_eval_envs),
                                     ("act_collect", programs.act_collect, 1)):
        lowered[name] = act.lower(world, agent.params, np.zeros((S, envs_per_seed, *image, e.frame_stack), np.uint8),
                                  put(np.zeros((S, envs_per_seed, *image), np.uint8)),
                                  put(np.zeros((S, envs_per_seed), bool)), keys)
    return {**lowered, **later}


def compile_ahead(programs: Programs, config: Config, world: wm.WorldModelState, agent: AgentState, frames: jax.Array,
                  keys: jax.Array, put: Callable, workers: int = 1) -> None:
    """Compiles the loop's later programs (lower_ahead) before their first call, `workers` at a time in lower_ahead's
    order (threads: XLA compiles without holding Python's lock). Meant for a thread beside iteration 1's random
    collection (train.py): a program the loop calls while it is compiled here waits for that compilation, and one
    the loop compiled first is found compiled here (Program), so nothing is compiled twice and nothing changes but
    when. A shape that differs from the loop's only costs the loop its own compilation later."""
    compile_lowered(lower_ahead(programs, config, world, agent, frames, keys, put), workers)


def compile_lowered(stages: dict[str, Ahead], workers: int = 1) -> dict[str, float]:
    """Compiles lowered programs, `workers` at a time in their order, each under its Program's lock (a call of it
    meanwhile waits; one made before finds its compilation already done). Returns the seconds from the start until
    each was compiled, by name; raises the first compilation's error, after the others ended."""
    start = time.perf_counter()

    def compile_(stage: Ahead) -> float:
        with stage.program.lock:
            stage.lowered.compile()
        return round(time.perf_counter() - start, 1)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dlwm-compile") as pool:
        done = {name: pool.submit(compile_, stage) for name, stage in stages.items()}
        return {name: future.result() for name, future in done.items()}


def compile_workers(cores: int | None = None) -> int:
    """How many programs compile_ahead compiles at a time on a host of `cores` (default: this one's): a quarter of
    them, at most 4. One on a 2-core laptop, whose cores the loop needs; 4 on a 16-core GPU host, where each XLA
    compilation runs mostly on one core while the loop waits for iteration 1's programs."""
    return max(1, min(4, (cores or os.cpu_count() or 1) // 4))
