"""`train_and_evaluate(config, workdir, num_seeds=1)`: the iterative loop of paper section 3.4 / SPEC 8.3, for one
seed or many at once.

Each of the `schedule.num_iterations` iterations runs five phases:
  collect (12,800 random steps in iteration 1, then 6,400 with the agent at temperature 1.5) -> warmup
  (iteration 1 only: VQ-VAE epochs at 10x lr) -> world_model (joint epochs, slow VQ-VAE updates) -> policy
  (PPO updates on imagined rollouts) -> evaluate (sampled actions, fresh seeded envs).

Seeds: seed s (= config.seed + s) is an independent run with root key jax.random.key(config.seed + s), its own
replay and its own envs. One seed is the N = 1 case of the seed axis: the state of all seeds is one pytree with
a leading axis [S, ...], and each pure step (world_model.py, ppo.py, imagination.py) is compiled once for all
seeds by `over_seeds` (below, the one place where jit, vmap, sharding and compiler options are chosen). The
envs of all seeds form one EnvPool in which env e of seed s is exactly the env a one-seed run would create.

Keys: the key of unit u (an epoch, a PPO update, ...) of phase p in iteration i of a seed is
fold_in(fold_in(fold_in(root, i), p), u), so a resumed run draws exactly the keys an uninterrupted one would,
and seed s of an N-seed run draws the keys of the one-seed run of seed s. EnvPool seeds derive from the root key.

Checkpoints (checkpoint.py) are written after every phase and, inside long phases, every `checkpoint_every_s`
seconds at a unit boundary. The real envs cannot be snapshotted, so on resume the collector's envs are rebuilt
with their seeds and re-stepped with the stored actions (deterministic: no sticky actions), and the frames they
produce are checked against the replay.

Outputs (outputs.py): one seed writes into `workdir`; N seeds write workdir/seed_<s>/ each and
workdir/aggregate.json; results.json (raw data of every seed and of the random agent) goes into `workdir`.
Many processes (`share`, see train_and_evaluate): each trains its share of the seeds independently, with its own
checkpoints; process 0 merges the shares' results at the end.

Numerics: a vmapped conv/matmul may differ from the unbatched one in the last bits and categorical samples can
flip on such a difference, so seed s of an N-seed run equals its one-seed run to float tolerance, not bit for
bit (tests/test_train_seeds.py says what is compared how tightly).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dlwm_jax import envs, ppo
from dlwm_jax import world_model as wm
from dlwm_jax.checkpoint import Checkpointer, CheckpointError
from dlwm_jax.collect import Collector, Trajectory, evaluate
from dlwm_jax.config import Config, from_dict, resolve_compute, to_dict, validate
from dlwm_jax.imagination import imagine
from dlwm_jax.networks import make_networks
from dlwm_jax.outputs import Logger, save_images, save_learning_curve, short, write_summary
from dlwm_jax.replay import Replay, generators
from dlwm_jax.results import aggregate, git_commit, merge_results, write_json, write_results

PHASES = ("collect", "warmup", "world_model", "policy", "evaluate")
COLLECT, WARMUP, WORLD_MODEL, POLICY, EVALUATE = range(len(PHASES))
DIAGNOSTICS = len(PHASES)   # key namespace of the diagnostics (not a phase: they change no state)
HOLDOUT_ENV = 10_000        # derived_seed purpose of iteration 1's held-back random env
ENVS_PER_SEED = 1           # collection envs per seed (SPEC 8.3: one env)


@flax.struct.dataclass
class AgentState:
    params: Any
    opt_state: Any


def unit_key(root: jax.Array, iteration: int, phase: int, unit: int = 0) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, iteration), phase), unit)


@jax.jit
def _unit_keys(roots: jax.Array, iteration: int, phase: int, units: jax.Array) -> jax.Array:
    return jax.vmap(lambda u: jax.vmap(lambda root: unit_key(root, iteration, phase, u))(roots))(units)


def derived_seed(root: jax.Array, purpose: int) -> int:
    """A 31-bit integer seed for host-side libraries (EnvPool), derived from the root key."""
    return int(jax.random.randint(jax.random.fold_in(root, 1_000_003 + purpose), (), 0, 2**31 - 1))


def initial_state(config: Config, num_actions: int, seed: int) -> tuple[wm.WorldModelState, AgentState]:
    """One seed's (world, agent) before any training."""
    root = jax.random.key(seed)
    init_key, agent_key = jax.random.split(jax.random.fold_in(root, 2**31))  # apart from every iteration
    world = wm.init_world_model(config, num_actions, init_key)
    actor_critic = make_networks(config, num_actions).actor_critic
    agent_params = jax.jit(actor_critic.init)(agent_key, jnp.zeros((1, 6, 6, config.vqvae.code_dim)))
    return world, AgentState(agent_params, ppo.make_optimizer(config.policy).init(agent_params))


# ------------------------------------------------------------------------------ the seed axis, compiled

def stack(trees: Sequence[Any]) -> Any:
    """Per-seed pytrees (same structure and static fields) -> one pytree with a leading seed axis [S, ...]."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, s: int) -> Any:
    """Seed s's slice of a stacked pytree."""
    return jax.tree.map(lambda x: x[s], tree)


def seed_sharding(num_seeds: int, devices: Sequence[jax.Device] | None = None) -> NamedSharding | None:
    """The seed axis over all (or the given) devices; None on one device or for one seed. Raises ValueError if
    S % devices."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) <= 1 or num_seeds == 1:
        return None
    if num_seeds % len(devices):
        raise ValueError(f"--num_seeds={num_seeds} is not a multiple of the {len(devices)} visible devices; "
                         "use a multiple, or --num_devices to use fewer")
    return NamedSharding(Mesh(np.asarray(devices), ("seed",)), PartitionSpec("seed"))


def over_seeds(fn: Callable, num_seeds: int, sharding: NamedSharding | None, in_axes: tuple,
               compiler_options: dict[str, str] | None = None) -> Callable:
    """fn compiled for all seeds: arguments with in_axes 0 carry a leading seed axis [S, ...] (None: shared),
    every output gets one.

    S = 1: jit of fn on the squeezed axis, the program of a single run. S > 1: jit(vmap(fn)); with a sharding
    each device runs the vmapped fn on its own seeds (shard_map: no cross-seed communication exists, and XLA's
    SPMD partitioner is kept away from the vmapped (grouped) convolutions, whose gradients it fails to
    partition on XLA:CPU).
    """
    if num_seeds == 1:
        def single(*args):
            args = [jax.tree.map(lambda x: x[0], a) if axis == 0 else a for a, axis in zip(args, in_axes)]
            return jax.tree.map(lambda x: x[None], fn(*args))
        return jax.jit(single, compiler_options=compiler_options)
    vmapped = jax.vmap(fn, in_axes=in_axes)
    if sharding is None:
        return jax.jit(vmapped, compiler_options=compiler_options)
    seed, shared = PartitionSpec("seed"), PartitionSpec()
    in_specs = tuple(seed if axis == 0 else shared for axis in in_axes)
    # check_vma off: scans start from unvarying zeros (initial LSTM state) and there are no collectives.
    return jax.jit(jax.shard_map(vmapped, mesh=sharding.mesh, in_specs=in_specs, out_specs=seed, check_vma=False),
                   compiler_options=compiler_options)


def _masked(step: Callable, num_seeds: int) -> Callable:
    """step(state, *args) -> (state, metrics) into masked(active, state, *args): inactive seeds keep `state`
    (seeds whose epoch has fewer batches wait; an Adam step on zero gradients is not a no-op)."""
    def masked_step(active, state, *args):
        new_state, metrics = step(state, *args)
        if num_seeds == 1:  # the one seed is always active
            return new_state, metrics
        return jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state, state), metrics
    return masked_step


def _dynamics_update(state: wm.WorldModelState, batch_stats, indices, batch, steps_key, i):
    state = state.replace(encoder_batch_stats=batch_stats)  # wm.dynamics_step, split at its encoder pass
    return wm.dynamics_update(state, indices, batch.actions, batch.rewards, batch.terminals, batch.valid,
                              jax.random.fold_in(steps_key, i))


class Programs(NamedTuple):
    """Every compiled program of the loop; arguments and outputs [S, ...] unless said otherwise."""
    vqvae_step: Callable        # (active, world, ObservationBatch, lr_scale shared) -> (world, metrics)
    encode_sequences: Callable  # (world, observations [S, T, B, ...]) -> (indices, batch_stats)
    dynamics_update: Callable   # (active, world, batch_stats, indices, SequenceBatch, steps_key, i shared)
    act_collect: Callable       # (world, agent_params, observations [S, E, ...], key) -> actions [S, E]
    act_eval: Callable
    random_act: Callable        # (observations [S, E, ...], key) -> uniform actions [S, E]
    policy_update: Callable     # (world, agent, start observations, key) -> (agent, metrics)
    diagnostics: Callable       # (world, observations, actions, rewards, key) -> metrics
    imagined_returns: Callable  # (world, agent_params, start observations, key) -> returns [S, N]


def compile_programs(config: Config, num_actions: int, num_seeds: int, sharding: NamedSharding | None) -> Programs:
    """The loop's programs for S seeds: the pure steps, with each program's XLA options (ComputeConfig). Built
    once per (config, num_actions, S, sharding) in a process, so later runs reuse the compiled executables."""
    return _compile_programs(resolve_compute(config), num_actions, num_seeds, sharding)


@functools.cache
def _compile_programs(config: Config, num_actions: int, num_seeds: int, sharding: NamedSharding | None) -> Programs:
    S, networks = num_seeds, make_networks(config, num_actions)
    compile_ = lambda fn, in_axes, program=None: over_seeds(
        fn, S, sharding, in_axes, config.compute.compiler_options(program) if program else None)
    return Programs(
        vqvae_step=compile_(_masked(wm.vqvae_step, S), (0, 0, 0, None), "vqvae_step"),
        encode_sequences=compile_(wm.encode_sequences, (0, 0), "vqvae_step"),
        dynamics_update=compile_(_masked(_dynamics_update, S), (0, 0, 0, 0, 0, 0, None)),
        act_collect=compile_(make_act(networks, config.env.collect_temperature), (0, 0, 0, 0)),
        act_eval=compile_(make_act(networks, 1.0), (0, 0, 0, 0)),
        random_act=compile_(lambda obs, key: jax.random.randint(key, obs.shape[:1], 0, num_actions, jnp.int32), (0, 0)),
        policy_update=make_policy_update(config, networks, ppo.make_optimizer(config.policy),
                                         lambda fn, n, options: over_seeds(fn, S, sharding, (0,) * n, options)),
        diagnostics=compile_(wm.world_model_diagnostics, (0,) * 5),
        imagined_returns=compile_(functools.partial(imagined_returns, networks, config), (0,) * 4))


def make_act(networks, temperature: float):
    """act(world, agent_params, obs uint8 [N,96,96,C], key) -> actions [N]: encoder in eval mode, quantise,
    sample from the policy at `temperature` (SPEC 5, 8.3)."""
    def act(world, agent_params, observations, key):
        _, z_q = wm.encode(world, observations)
        logits, _ = networks.actor_critic.apply(agent_params, z_q)
        return ppo.sample_action(logits, key, temperature)
    return act


def make_policy_update(config: Config, networks, optimizer, compile_fn: Callable | None = None):
    """update(world, agent, start_observations, key) -> (agent, metrics): encode 16 real start observations
    (eval BN), imagine 50 steps, one PPO update (SPEC 6, 7).

    Two compiled programs, so each gets its own XLA options (ComputeConfig.compiler_options): the dream and
    the PPO update. compile_fn(fn, num_args, compiler_options) compiles each (default: jax.jit; the loop
    passes its seed-axis one).
    """
    config = resolve_compute(config)
    p = config.policy

    def dream(world: wm.WorldModelState, agent: AgentState, start_observations, key):
        dream_key, ppo_key = jax.random.split(key)
        start_indices, _ = wm.encode(world, start_observations)
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
    dream_program = compile_fn(dream, 4, {})
    improve_program = compile_fn(improve, 4, config.compute.compiler_options("ppo_update"))

    def update(world: wm.WorldModelState, agent: AgentState, start_observations, key):
        rollout, bootstrap_value, ppo_key, imagined_reward_mean = dream_program(world, agent, start_observations, key)
        agent, metrics = improve_program(agent, rollout, bootstrap_value, ppo_key)
        return agent, {**metrics, "imagined_reward_mean": imagined_reward_mean}
    return update


def imagined_returns(networks, config: Config, world: wm.WorldModelState, agent_params, start_observations,
                     key: jax.Array) -> jax.Array:
    """The policy's return in its own dreams: start observations uint8 [N, 96, 96, C] -> summed imagined rewards
    [N] over one horizon (SPEC 6), to set beside the real evaluation's clipped return per horizon."""
    start_indices, _ = wm.encode(world, start_observations)
    dream = imagine(networks.dream_dynamics, networks.actor_critic, {"params": world.dynamics_params}, agent_params,
                    world.codebook.embeddings, start_indices, key, config.policy.horizon,
                    config.policy.bootstrap_at_horizon, unroll=config.compute.imagination_unroll)
    return jnp.sum(dream.rewards, axis=0)


# ------------------------------------------------------------------------------------- the host side

@dataclasses.dataclass
class Run:
    """A run in progress: its seeds, state (stacked [S, ...]), replays, envs, programs and outputs."""
    config: Config
    workdir: str
    seeds: list[int]
    seed_dirs: list[str]
    programs: Programs
    networks: Any
    sharding: NamedSharding | None
    world: wm.WorldModelState
    agent: AgentState
    replays: list[Replay]
    collector: Collector
    checkpoints: Checkpointer
    meta: dict
    loggers: list[Logger]
    echo: Callable[[str], None]
    lock: Any                   # the workdir lock, held while the run is in this process
    total_seeds: int            # over all processes; `seeds` are this process's share
    share: tuple[int, int]      # (process, number of processes) of a multi-process job; (0, 1) otherwise
    started: float = dataclasses.field(default_factory=time.time)
    last_save: float = dataclasses.field(default_factory=time.time)

    @property
    def num_seeds(self) -> int:
        return len(self.seeds)

    @property
    def roots(self) -> list[jax.Array]:
        return [jax.random.key(seed) for seed in self.seeds]

    def keys(self, iteration: int, phase: int, unit: int = 0) -> jax.Array:
        """[S] unit keys, one per seed."""
        return jnp.stack([unit_key(root, iteration, phase, unit) for root in self.roots])

    def unit_keys(self, iteration: int, phase: int, units: range) -> jax.Array:
        """[U, S] keys: row i is keys(iteration, phase, units[i]), all computed by one program."""
        return _unit_keys(jnp.stack(self.roots), iteration, phase, jnp.arange(units.start, units.stop))

    def put(self, tree: Any) -> Any:
        """Places a pytree with a leading seed axis on the seed sharding (a no-op on one device)."""
        return jax.device_put(tree, self.sharding) if self.sharding is not None else tree

    def elapsed(self) -> float:
        """Wall time over all resumptions."""
        return self.meta.get("elapsed_s", 0.0) + time.time() - self.started

    def save(self, iteration: int, phase: int, unit: int) -> None:
        self.meta.update(iteration=iteration, phase=phase, unit=unit, metrics_offsets=[lg.offset for lg in self.loggers],
                         log_steps=[lg.log_step for lg in self.loggers], config=to_dict(self.config),
                         num_seeds=self.total_seeds, share=list(self.share),
                         save_index=self.meta["save_index"] + 1, elapsed_s=self.elapsed())
        self.started = time.time()
        self.checkpoints.save(self.meta["save_index"], jax.device_get((self.world, self.agent)), self.meta)
        self.last_save = time.time()

    def maybe_save(self, iteration: int, phase: int, unit: int) -> None:
        if time.time() - self.last_save >= self.config.checkpoint_every_s:
            self.save(iteration, phase, unit)

    def record(self, s: int, iteration: int, phase: str, metrics: dict, **extra) -> None:
        self.loggers[s].write({"phase": phase, "iteration": iteration + 1, "real_steps": len(self.replays[s]), **extra,
                               **{k: float(v) for k, v in metrics.items()}})

    def start_phase(self) -> None:
        for logger in self.loggers:
            logger.start_phase()

    def progress(self, iteration: int, phase: str, done: float, total: int, extra: str = "",
                 first_seed: bool = True) -> None:
        """A progress line: the first seed's clock, and `extra` (with several seeds labelled as the first seed's
        unless first_seed is False)."""
        prefix = f"seed {self.seeds[0]}: " if self.total_seeds > 1 and extra and first_seed else ""
        self.loggers[0].progress(iteration, self.config.schedule.num_iterations, phase, done, total, prefix + extra)

    def heartbeat(self, iteration: int, phase: str, epoch: int, epochs: int):
        return self.loggers[0].heartbeat(iteration, self.config.schedule.num_iterations, phase, epoch, epochs)

    def policy(self, program: Callable, *params) -> Callable:
        """A collect.PolicyFn over the pooled envs: observations [S*E, ...] and keys [S] -> actions [S*E]."""
        def policy_fn(observations, keys):
            observations = observations.reshape(self.num_seeds, -1, *observations.shape[1:])
            return program(*params, self.put(observations), self.put(keys)).reshape(-1)
        return policy_fn


def _check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create workdir {workdir!r}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise OSError(f"workdir {workdir!r} is not writable")


def lock_workdir(workdir: str, process: int | None = None):
    """An exclusive lock on workdir/.lock (.lock.process_<p> for process p of a multi-process job) for this
    process's lifetime (keep the returned file open): a second process on the same workdir would interleave
    checkpoints. Raises OSError (one line) if it is held."""
    import fcntl
    lock = open(os.path.join(workdir, ".lock" if process is None else f".lock.process_{process}"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise OSError(f"workdir {workdir!r} is in use by another running process") from None
    return lock


def same_config(saved: dict | None, config: Config) -> bool:
    """Whether a checkpoint's meta["config"] is `config` (both resolved for this backend); fields added to Config
    since it was saved count as their defaults, so a run resumes under a newer version that only added options."""
    try:
        return saved is not None and resolve_compute(from_dict(saved)) == resolve_compute(config)
    except ValueError:
        return False


def _start(config: Config, workdir: str, num_seeds: int, echo: Callable[[str], None],
           devices: Sequence[jax.Device] | None, share: tuple[int, int]) -> Run:
    """A new run in `workdir`, or the one its latest checkpoint holds; `config` validated and resolved."""
    if num_seeds < 1:
        raise ValueError(f"--num_seeds must be >= 1, got {num_seeds}")
    process, num_processes = share
    if not 0 <= process < num_processes:
        raise ValueError(f"--process_id={process} must be in [0, --num_processes={num_processes})")
    if num_seeds % num_processes:
        raise ValueError(f"--num_seeds={num_seeds} is not a multiple of the {num_processes} processes "
                         "(each trains an equal share of the seeds)")
    game = envs.check_game(config.env.game)
    num_actions = envs.num_actions(game)
    per_process = num_seeds // num_processes
    sharding = seed_sharding(per_process, devices)
    _check_workdir(workdir)
    lock = lock_workdir(workdir, process if num_processes > 1 else None)
    seeds = [config.seed + process * per_process + s for s in range(per_process)]
    seed_dirs = [workdir] if num_seeds == 1 else [os.path.join(workdir, f"seed_{seed}") for seed in seeds]
    for d in seed_dirs:
        _check_workdir(d)
    world, agent = stack([initial_state(config, num_actions, seed) for seed in seeds])
    replays = [Replay(config.total_real_steps, ENVS_PER_SEED, (config.env.image_size,) * 2, config.env.frame_stack)
               for _ in seeds]
    roots = [jax.random.key(seed) for seed in seeds]
    collector = Collector(config.env, ENVS_PER_SEED, [derived_seed(root, 0) for root in roots])
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints", *([f"process_{process}"] if num_processes > 1 else [])))
    meta = {"iteration": 0, "phase": COLLECT, "unit": 0, "chunks": 0, "metrics_offsets": [0] * per_process,
            "log_steps": [0] * per_process, "eval_histories": [[] for _ in seeds], "last_evals": [None] * per_process,
            "save_index": 0}
    latest = checkpoints.latest_step()
    if latest is not None:
        if "num_seeds" not in checkpoints.restore_meta(latest):  # the one-seed loop before the seed axis
            raise CheckpointError(f"workdir {workdir!r} holds a checkpoint of the older one-seed format (before the "
                                  "seed-axis loop); resume it with that version, or use another --workdir")
        (world, agent), meta = checkpoints.restore(latest, (world, agent))
        if not same_config(meta.get("config"), config) or meta.get("num_seeds") != num_seeds or \
                tuple(meta.get("share", (0, 1))) != share:
            raise ValueError(f"workdir {workdir!r} holds a run with a different config (game/preset/flags), "
                             "--num_seeds or number of processes; use another --workdir or the same flags")
        echo(f"resuming from checkpoint {latest}: iteration {meta['iteration'] + 1}, phase {PHASES[meta['phase']]}, "
             f"unit {meta['unit']}")
        for k in range(meta["chunks"]):
            _add_per_seed(replays, Trajectory(**checkpoints.load_replay_chunk(k)))
        if meta["iteration"] < config.schedule.num_iterations:
            _fast_forward(collector, meta["chunks"], checkpoints)
    meta["git_commits"] = sorted(set(meta.get("git_commits", [])) | {git_commit()})
    loggers = [Logger(d, offset, step, echo=lambda _: None)
               for d, offset, step in zip(seed_dirs, meta["metrics_offsets"], meta["log_steps"])]
    loggers[0].echo = echo  # progress lines: seed 0's clock
    networks = make_networks(config, num_actions)
    run = Run(config, workdir, seeds, seed_dirs, compile_programs(config, num_actions, per_process, sharding), networks,
              sharding, world, agent, replays, collector, checkpoints, meta, loggers, echo, lock, num_seeds, share)
    run.world, run.agent = run.put(world), run.put(agent)
    return run


def _fast_forward(collector: Collector, num_chunks: int, checkpoints: Checkpointer) -> None:
    """Re-steps a fresh collector pool with the stored actions so it is where the killed run left it."""
    for k in range(num_chunks):
        chunk = checkpoints.load_replay_chunk(k)
        actions = iter(chunk["actions"].T)
        trajectory, _ = collector.collect(lambda obs, key: next(actions), chunk["actions"].size, jax.random.key(0))
        if not np.array_equal(trajectory.frames, chunk["frames"]):
            raise CheckpointError("replaying the stored actions did not reproduce the stored frames; "
                                  "the environment is not deterministic here, cannot resume")


def _add_per_seed(replays: Sequence[Replay], trajectory: Trajectory) -> None:
    """A pooled collection (env rows s * ENVS_PER_SEED .. belong to seed s) into each seed's replay."""
    for s, replay in enumerate(replays):
        replay.add(*(x[s * ENVS_PER_SEED:(s + 1) * ENVS_PER_SEED] for x in trajectory))


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


def _per_seed(history: list, num_seeds: int) -> list[dict[str, float]]:
    """[(active [S], metrics [S])] of a phase -> per seed the metrics averaged over its active steps."""
    history = jax.device_get(history)
    return [wm.average_metrics([unstack(m, s) for on, m in history if on[s]]) for s in range(num_seeds)]


# ------------------------------------------------------------------------------------ epochs over seeds

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
    return world, _per_seed(history, S)


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
    vqvae, dynamics = _per_seed(vq_history, S), _per_seed(dyn_history, S)
    return world, [{"vqvae": v, "dynamics": dy} for v, dy in zip(vqvae, dynamics)]


# ------------------------------------------------------------------------------------------- phases

def collect(run: Run, it: int, _first_unit: int = 0) -> None:
    """Random actions in iteration 1, the agent's at temperature 1.5 after (SPEC 8.3); one replay chunk."""
    s = run.config.schedule
    steps = s.initial_steps if it == 0 else s.steps_per_iteration
    if it == 0:
        policy_fn = run.policy(run.programs.random_act)
    else:
        policy_fn = run.policy(run.programs.act_collect, run.world, run.agent.params)
    trajectory, stats = run.collector.collect(policy_fn, steps * run.num_seeds, run.keys(it, COLLECT))
    run.checkpoints.save_replay_chunk(run.meta["chunks"], trajectory._asdict())
    run.meta["chunks"] += 1
    _add_per_seed(run.replays, trajectory)
    for s_ in range(run.num_seeds):
        returns = stats["episode_returns"][stats["episode_envs"] // ENVS_PER_SEED == s_]
        run.record(s_, it, "collect", {"episodes": len(returns),
                                       **({"episode_return_mean": float(np.mean(returns))} if len(returns) else {})})
    run.progress(it, "collect", steps, steps, f"{len(stats['episode_returns'])} episodes finished"
                 + (f" over {run.num_seeds} seeds" if run.num_seeds > 1 else ""), first_seed=False)


def warmup(run: Run, it: int, first_epoch: int) -> None:
    epochs = run.config.schedule.warmup_epochs
    for epoch in range(first_epoch, epochs):
        run.world, per_seed = warmup_epoch(run.programs, run.world, run.replays, run.keys(it, WARMUP, epoch), run.put,
                                           run.heartbeat(it, "warmup", epoch, epochs))
        for s in range(run.num_seeds):
            run.record(s, it, "warmup", per_seed[s], unit=epoch)
        run.progress(it, "warmup", epoch + 1, epochs, short(per_seed[0]))
        run.maybe_save(it, WARMUP, epoch + 1)


def world_model(run: Run, it: int, first_epoch: int) -> None:
    s = run.config.schedule
    epochs = s.joint_epochs[it]
    if it > 0 and first_epoch == 0:  # the last world model on the chunk it has not trained on yet
        diagnose(run, it, run.replays, len(run.replays[0]) - s.steps_per_iteration)
    for epoch in range(first_epoch, epochs):
        run.world, per_seed = joint_epoch(run.programs, run.world, run.replays, run.keys(it, WORLD_MODEL, epoch),
                                          s.vq_update_intervals[it], run.put,
                                          progress=run.heartbeat(it, "world_model", epoch, epochs))
        for seed_index in range(run.num_seeds):
            for kind in ("vqvae", "dynamics"):
                run.record(seed_index, it, kind, per_seed[seed_index][kind], unit=epoch)
        run.progress(it, "world_model", epoch + 1, epochs, short({**per_seed[0]["vqvae"], **per_seed[0]["dynamics"]}))
        run.maybe_save(it, WORLD_MODEL, epoch + 1)
    if it == 0 and s.diagnostic_windows:
        diagnose(run, it, holdout(run), 0)


def policy(run: Run, it: int, first_update: int) -> None:
    p, updates = run.config.policy, run.config.schedule.ppo_updates[it]
    report_every = max(1, updates // 20)
    history, units = [], range(first_update, updates)
    if not units:
        return
    # per update u and seed: (start key, update key) = split(keys(it, POLICY, u)[s]), drawn for the whole phase
    # at once, so that no update waits on the device for its keys (the device stays busy with queued updates)
    keys = jax.vmap(jax.vmap(jax.random.split))(run.unit_keys(it, POLICY, units))  # [U, S, 2]
    rngs, S = generators(keys[:, :, 0]), run.num_seeds  # [U x S] in order
    for i, u in enumerate(units):
        starts = np.stack([r.sample_observations(rng, p.num_envs) for r, rng in zip(run.replays, rngs[i * S:])])
        run.agent, metrics = run.programs.policy_update(run.world, run.agent, run.put(starts),
                                                        run.put(keys[i, :, 1]))
        history.append(metrics)
        if (u + 1) % report_every == 0 or u + 1 == updates:
            per_seed = _per_seed([(np.ones(run.num_seeds, bool), m) for m in history], run.num_seeds)
            for s in range(run.num_seeds):
                run.record(s, it, "policy", {k: v for k, v in per_seed[s].items() if k != "steps"}, unit=u + 1)
            run.progress(it, "policy", u + 1, updates, short(per_seed[0]))
            history = []
            run.maybe_save(it, POLICY, u + 1)


def evaluate_agent(run: Run, it: int, _first_unit: int = 0) -> None:
    """num_eval_envs fresh seeded envs per seed, actions sampled at temperature 1 (SPEC 9); images."""
    config, p, S = run.config, run.config.policy, run.num_seeds
    results = evaluate(config.env, run.policy(run.programs.act_eval, run.world, run.agent.params),
                       run.keys(it, EVALUATE), [derived_seed(root, 1 + it) for root in run.roots])
    dream_keys = [jax.random.split(k) for k in run.keys(it, DIAGNOSTICS, 2)]  # (start key, dream key) per seed
    starts = np.stack([r.sample_observations(k[0], p.num_envs) for r, k in zip(run.replays, dream_keys)])
    imagined = np.asarray(run.programs.imagined_returns(run.world, run.agent.params, run.put(starts),
                                                        run.put(jnp.stack([k[1] for k in dream_keys]))))
    host_world, host_agent = jax.device_get((run.world, run.agent))
    records = []
    for s, (result, seed_dir) in enumerate(zip(results, run.seed_dirs)):
        record = evaluation_record(result, imagined[s], p.horizon)
        run.record(s, it, "evaluate", record, wall_time_s=round(run.elapsed(), 1))
        records.append(record)
        run.meta["eval_histories"][s].append([len(run.replays[s]), result["return_mean"], result["return_std"]])
        run.meta["last_evals"][s] = result
        save_images(seed_dir, it, unstack(host_world, s), unstack(host_agent, s).params, run.replays[s],
                    run.networks, config, unit_key(run.roots[s], it, EVALUATE, 1))
        save_learning_curve(seed_dir, run.meta["eval_histories"][s], f"{config.env.game} (seed {run.seeds[s]})")
    if run.total_seeds == 1:
        run.progress(it, "evaluate", 1, 1, evaluation_line(records[0], p.horizon))
    else:
        run.echo(f"[iter {it + 1}/{config.schedule.num_iterations}] seed {run.seeds[0]}: "
                 f"{evaluation_line(records[0], p.horizon)}")
        returns = [r["return_mean"] for r in results]
        run.progress(it, "evaluate", 1, 1, f"return over {S} seeds {np.mean(returns):.1f} +- {np.std(returns):.1f}",
                     first_seed=False)


def diagnose(run: Run, it: int, datas: Sequence[Replay], first_step: int) -> None:
    """World-model diagnostics on real windows it has not trained on (steps >= first_step of each seed's data)."""
    config, began = run.config, time.time()
    keys = [jax.random.split(k) for k in run.keys(it, DIAGNOSTICS)]  # (window key, unroll key) per seed
    batches = [diagnostic_batch(config, data, first_step, k[0]) if config.schedule.diagnostic_windows else None
               for data, k in zip(datas, keys)]
    if any(b is None for b in batches):
        return
    width = min(b.actions.shape[1] for b in batches)  # equal widths to stack (differ only on tiny data)
    fields = [np.stack([x[:, :width] for x in xs]) for xs in zip(*((b.observations, b.actions, b.rewards) for b in batches))]
    metrics = jax.device_get(run.programs.diagnostics(run.world, *map(run.put, fields),
                                                      run.put(jnp.stack([k[1] for k in keys]))))
    for s in range(run.num_seeds):
        run.record(s, it, "diagnostics", unstack(metrics, s), windows=width, model_iteration=max(it, 1),
                   seconds=round(time.time() - began, 2))
    run.echo(f"[iter {it + 1}/{config.schedule.num_iterations}] diagnostics world model of iteration {max(it, 1)} on "
             f"{'held-back random' if it == 0 else 'fresh'} data{f', seed {run.seeds[0]}' if run.total_seeds > 1 else ''}: "
             f"{wm.diagnostic_summary(unstack(metrics, 0))}")


def holdout(run: Run) -> list[Replay]:
    """Iteration 1's held-back data per seed: random steps from envs of their own (the training stream is untouched)."""
    config, steps = run.config, holdout_steps(run.config)
    pool = Collector(config.env, ENVS_PER_SEED, [derived_seed(root, HOLDOUT_ENV) for root in run.roots])
    trajectory, _ = pool.collect(run.policy(run.programs.random_act), steps * run.num_seeds, run.keys(0, DIAGNOSTICS, 1))
    datas = [Replay(steps, ENVS_PER_SEED, (config.env.image_size,) * 2, config.env.frame_stack) for _ in run.seeds]
    _add_per_seed(datas, trajectory)
    return datas


def diagnostic_batch(config: Config, replay: Replay, first_step: int, key: jax.Array):
    """Up to schedule.diagnostic_windows windows (SequenceBatch [T, B]) of steps >= first_step, or None."""
    length = wm.diagnostic_window_length(config)
    starts = replay.window_starts_from(key, config.schedule.diagnostic_windows, length, first_step)
    return replay.sequences(starts, length) if len(starts) else None


def holdout_steps(config: Config) -> int:
    """Random steps held back in iteration 1 for the diagnostics: one window length per diagnostic window."""
    return config.schedule.diagnostic_windows * wm.diagnostic_window_length(config)


def evaluation_record(result: dict, imagined: np.ndarray, horizon: int) -> dict:
    """The scalars logged at evaluation: eval_* statistics, the imagined return per dream [N] and the real return
    per `horizon` steps, clipped to reward classes as the dream's (all envs, partial episodes included)."""
    record = {f"eval_{k}": v for k, v in result.items() if not isinstance(v, list)}
    record.update(imagined_return_mean=float(np.mean(imagined)), imagined_return_std=float(np.std(imagined)),
                  real_return_per_horizon=float(np.sum(result["clipped_returns"]) / max(np.sum(result["lengths"]), 1)
                                                * horizon))
    return record


def evaluation_line(record: dict, horizon: int) -> str:
    """The evaluation's progress line; episodes left unfinished at the cap are said, never averaged away silently."""
    unfinished = record["eval_num_envs"] - record["eval_num_finished"]
    warning = (f"; {unfinished:.0f} episode(s) reached the evaluation cap unfinished: the return is over the finished "
               f"ones{' (none finished: over the partial returns)' if unfinished == record['eval_num_envs'] else ''}, "
               f"results.json keeps every partial return") if unfinished else ""
    return (f"return {record['eval_return_mean']:.1f} +- {record['eval_return_std']:.1f} "
            f"({record['eval_num_finished']:.0f}/{record['eval_num_envs']:.0f} episodes finished); clipped return "
            f"per {horizon} steps: imagined {record['imagined_return_mean']:.2f}, real {record['real_return_per_horizon']:.2f}"
            + warning)


def _finish(run: Run) -> dict:
    """summary.json per seed, the random agent under the same protocol, results.json and (several seeds)
    aggregate.json. In a multi-process job each process writes its share's results.process_<p>.json, and process
    0, once every share is there, the merged results.json and the aggregate over all seeds."""
    config, S = run.config, run.num_seeds
    game, last = envs.check_game(config.env.game), config.schedule.num_iterations - 1
    host_world, host_agent = jax.device_get((run.world, run.agent))
    summaries = []
    for s in range(S):
        history = run.meta["eval_histories"][s]
        summaries.append(write_summary(run.seed_dirs[s], game, run.seeds[s], len(run.replays[s]),
                                       history[-1][1] if history else None, unstack(host_world, s),
                                       unstack(host_agent, s).params))
        run.loggers[s].writer.close()
    run.echo("evaluating the uniform random agent under the same protocol (same envs, seeds and caps)")
    baselines = evaluate(config.env, run.policy(run.programs.random_act), run.keys(last, EVALUATE),
                         [derived_seed(root, 1 + last) for root in run.roots])
    process, num_processes = run.share
    own = "results.json" if num_processes == 1 else f"results.process_{process}.json"
    write_results(os.path.join(run.workdir, own), config, game, run.seeds, run.seed_dirs, run.meta["last_evals"],
                  baselines, run.meta)
    if process > 0:
        return {"seeds": summaries, "aggregate": None}
    if num_processes > 1:
        parts = _wait_for_shares(run, num_processes)
        write_json(os.path.join(run.workdir, "results.json"),
                   merge_results(parts, " ".join([os.path.basename(sys.executable)] + sys.argv)))
    every_seed = [config.seed + s for s in range(run.total_seeds)]
    finals = [summary["final_eval_return_mean"] for summary in summaries] if num_processes == 1 else \
        [part_seed["final_eval_return"] for part in parts for part_seed in part["seeds"]]
    result = {"game": game, "seeds": every_seed, "num_processes": num_processes,
              "num_devices": num_processes * (len(run.sharding.device_set) if run.sharding else 1),
              "final_eval_return": aggregate(finals) if None not in finals else None,
              "final_eval_return_per_seed": finals}
    if run.total_seeds > 1:
        write_json(os.path.join(run.workdir, "aggregate.json"), result)
    return {"seeds": summaries, "aggregate": result}


def _wait_for_shares(run: Run, num_processes: int, poll_s: float = 2.0) -> list[dict]:
    """Process 0 of a multi-process job: every process's results.process_<p>.json, once all are written."""
    paths = [os.path.join(run.workdir, f"results.process_{p}.json") for p in range(num_processes)]
    last_echo = time.time()
    while not all(os.path.exists(path) for path in paths):
        if time.time() - last_echo >= 60:
            last_echo = time.time()
            run.echo(f"waiting for processes {[p for p, path in enumerate(paths) if not os.path.exists(path)]} "
                     "to finish their seeds")
        time.sleep(poll_s)
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    return sorted(parts, key=lambda part: part["seeds"][0]["seed"])


# -------------------------------------------------------------------------------------------- the loop

# step(run, iteration, first unit) of each phase, in PHASES order; units before `first unit` (> 0 after a resume)
# are done already
PHASE_STEPS = (collect, warmup, world_model, policy, evaluate_agent)


def train_and_evaluate(config: Config, workdir: str, num_seeds: int = 1, echo: Callable[[str], None] | None = None,
                       devices: Sequence[jax.Device] | None = None, share: tuple[int, int] = (0, 1)) -> dict:
    """Runs (or resumes) seeds config.seed .. config.seed + num_seeds - 1 in `workdir`; returns
    {"seeds": [per seed summary.json], "aggregate": final evaluation over seeds (mean, std, median, IQM)}.

    devices: the seed axis is sharded over these (default: all visible; S must be a multiple of their number).
    share: (process p, number of processes P) of a multi-process job (hosts, or processes on one host): this
    process trains seeds config.seed + p * N / P ... of the N, with its own envs, replay and checkpoints
    (workdir/checkpoints/process_<p>; the workdir is shared); process 0 merges every share's results once all are
    written. The processes never communicate (the seeds are independent), so no jax.distributed is needed.
    Raises ValueError (bad config / game), OSError (workdir), CheckpointError (unreadable checkpoint) or
    NonFiniteError (a NaN/inf loss) with one-line messages; nothing already saved is deleted by a failure.
    """
    echo = echo or functools.partial(print, flush=True)
    config = resolve_compute(validate(config))  # the formulations of this backend; checkpoints store them
    with jax.threefry_partitionable(config.compute.threefry_partitionable):
        run = _start(config, workdir, num_seeds, echo, devices, share)
        start, resume_phase, resume_unit = run.meta["iteration"], run.meta["phase"], run.meta["unit"]
        for it in range(start, config.schedule.num_iterations):
            for phase in range(resume_phase if it == start else COLLECT, len(PHASES)):
                if phase == WARMUP and it > 0:
                    continue
                run.start_phase()
                PHASE_STEPS[phase](run, it, resume_unit if (it, phase) == (start, resume_phase) else 0)
                next_iteration, next_phase = (it + 1, COLLECT) if phase == EVALUATE else (it, phase + 1)
                run.save(next_iteration, next_phase, 0)
        return _finish(run)
