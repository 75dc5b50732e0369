"""`train_and_evaluate_seeds(config, workdir, num_seeds)`: N independent seeds of train.py's loop in one process.

Seed s (= config.seed + s) is the run `train_and_evaluate(replace(config, seed=s))` would make: root key
jax.random.key(s), the same fold-in keys per (iteration, phase, unit), the same EnvPool seeds (train.derived_seed),
its own replay. What is shared is the program:
  - world-model steps, imagination and PPO of all seeds run as one `jax.vmap`ped, jitted step over a leading seed
    axis S of every state leaf (params, optimizer state, BN statistics, codebook);
  - acting and evaluation use ONE EnvPool of S x E envs: EnvPool's per-env seed list (`env_seed`) seeds env e of
    seed s with derived_seed(root_s) + e, exactly the env a single run would create (tests/test_multiseed.py);
    the policy is the vmapped act over [S, E] observations;
  - replay stays host-side and per seed (one `Replay` each); batches are stacked to [S, ...].
Seeds whose epochs have fewer dynamics batches (window offsets are random per seed, SPEC 2) are padded with
no-op steps: the vmapped step runs, and `active` selects the old state (an Adam step on zero gradients is not a
no-op). With more than one device the seed axis is sharded, NamedSharding(Mesh(devices, ('seed',)), P('seed')).

Outputs: workdir/seed_<s>/ holds what a single run writes (metrics.jsonl, TensorBoard, images, summary.json);
workdir/aggregate.json the final evaluation over seeds (mean, std, median, IQM); workdir/checkpoints the stacked
state after every phase (and every checkpoint_every_s inside phases) plus the pooled replay chunks. Resume works
as in train.py: stacked state restored, replays rebuilt from the chunks, the pooled env fast-forwarded.

Numerics: a vmapped conv/matmul may differ from the unbatched one in the last bits, and categorical samples
(dynamics unroll, imagination, acting) can flip on such a difference; per-seed results therefore equal separate
runs to float tolerance, not bit for bit (see tests/test_multiseed.py for what is compared how tightly).
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import envpool
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dlwm_jax import envs, ppo, viz
from dlwm_jax import world_model as wm
from dlwm_jax.checkpoint import Checkpointer, CheckpointError
from dlwm_jax.collect import Collector, episode_stats, first_episodes
from dlwm_jax.config import Config, EnvConfig, to_dict, validate
from dlwm_jax.networks import make_networks
from dlwm_jax.replay import Replay
from dlwm_jax.train import (COLLECT, DIAGNOSTICS, EVALUATE, HOLDOUT_ENV, PHASES, POLICY, WARMUP, WORLD_MODEL,
                            AgentState, Logger, _check_workdir, diagnostic_batch, evaluation_line,
                            evaluation_record, holdout_steps, imagined_returns, lock_workdir, make_act,
                            make_policy_update, same_config, _save_images, _short, derived_seed, params_hash,
                            unit_key)
from dlwm_jax.results import git_commit, write_results

ENVS_PER_SEED = 1  # train.py collects with one env per run


# ------------------------------------------------------------------------------------------- seed axis

def stack(trees: Sequence[Any]) -> Any:
    """Per-seed pytrees (same structure and static fields) -> one pytree with a leading seed axis [S, ...]."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, s: int) -> Any:
    """Seed s's slice of a stacked pytree."""
    return jax.tree.map(lambda x: x[s], tree)


def seed_sharding(num_seeds: int, devices: Sequence[jax.Device] | None = None) -> NamedSharding | None:
    """The seed axis over all (or the given) devices; None on one device. Raises ValueError if S % devices."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) <= 1:
        return None
    if num_seeds % len(devices):
        raise ValueError(f"--num_seeds={num_seeds} is not a multiple of the {len(devices)} visible devices; "
                         "use a multiple, or --num_devices to use fewer")
    return NamedSharding(Mesh(np.asarray(devices), ("seed",)), PartitionSpec("seed"))


def _masked(step: Callable) -> Callable:
    """step(state, *args) -> (state, metrics) into masked(active, state, *args): inactive seeds keep `state`."""
    def masked_step(active, state, *args):
        new_state, metrics = step(state, *args)
        return jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state, state), metrics
    return masked_step


def _dynamics_step(state, batch, steps_key, i):
    return wm.dynamics_step_unjitted(state, batch, jax.random.fold_in(steps_key, i))  # wm.joint_epoch's key of step i


def over_seeds(fn: Callable, sharding: NamedSharding | None, in_axes: tuple,
               compiler_options: dict[str, str] | None = None) -> Callable:
    """jit(vmap(fn)) over the leading seed axis (in_axes 0 = per seed, None = shared); outputs per seed.

    With a sharding, each device runs the vmapped fn on its own seeds (shard_map): no cross-seed communication
    exists, and XLA's SPMD partitioner is kept away from the vmapped (grouped) convolutions, whose gradients it
    fails to partition (feature_group_count error on XLA:CPU).
    """
    vmapped = jax.vmap(fn, in_axes=in_axes)
    if sharding is None:
        return jax.jit(vmapped, compiler_options=compiler_options)
    seed, shared = PartitionSpec("seed"), PartitionSpec()
    in_specs = tuple(seed if axis == 0 else shared for axis in in_axes)
    # check_vma off: scans start from unvarying zeros (initial LSTM state) and there are no collectives.
    return jax.jit(jax.shard_map(vmapped, mesh=sharding.mesh, in_specs=in_specs, out_specs=seed, check_vma=False),
                   compiler_options=compiler_options)


def world_model_programs(config, sharding: NamedSharding | None) -> tuple[Callable, Callable]:
    """(vqvae_steps(active, world, batch, lr_scale), dynamics_steps(active, world, batch, steps_keys, i)), args
    [S, ...] except lr_scale and i; one compilation each per config (WorldModelState's static fields)."""
    return _world_model_programs(tuple(config.compute.compiler_options("vqvae_step").items()), sharding)


@functools.cache
def _world_model_programs(vqvae_options: tuple, sharding: NamedSharding | None) -> tuple[Callable, Callable]:
    return (over_seeds(_masked(wm.vqvae_step_unjitted), sharding, (0, 0, 0, None), dict(vqvae_options)),
            over_seeds(_masked(_dynamics_step), sharding, (0, 0, 0, 0, None)))


# --------------------------------------------------------------------------------------------- envs

def make_pooled_env(env_config: EnvConfig, envs_per_seed: int, base_seeds: Sequence[int]):
    """One EnvPool of S x E envs; env e of seed s (index s * E + e) is seeded base_seeds[s] + e, the env
    envs.make_env(env_config, E, base_seeds[s]) would make as its env e. Options as envs.env_options."""
    env_seed = [int(b) + e for b in base_seeds for e in range(envs_per_seed)]
    options = envs.env_options(env_config, len(env_seed), 0)
    del options["seed"]
    env = envpool.make(f"{envs.check_game(env_config.game)}-v5", env_type="gym", env_seed=env_seed, **options)
    wrong = {k: (v, env.config.get(k)) for k, v in {**options, "env_seed": env_seed}.items() if env.config.get(k) != v}
    if wrong:
        raise RuntimeError(f"EnvPool ignored options (wanted, got): {wrong}")
    return env


def pooled_collector(env_config: EnvConfig, envs_per_seed: int, base_seeds: Sequence[int]) -> Collector:
    """collect.Collector over one pool of S x E envs (rows s*E .. s*E+E-1 belong to seed s)."""
    return Collector(env_config, envs_per_seed * len(base_seeds), None,
                     env=make_pooled_env(env_config, envs_per_seed, base_seeds))


def _keyed_policy(act: Callable, step_keys: jax.Array, num_seeds: int) -> Callable:
    """A collect.PolicyFn whose t-th call acts with per-seed keys step_keys[:, t] (the single runs' step keys);
    act(observations [S, E, 96, 96, C], keys [S]) -> actions [S, E]."""
    keys = list(jnp.swapaxes(step_keys, 0, 1))  # [T] of [S]
    calls = iter(range(len(keys)))

    def policy_fn(observations, _unused_key):
        t = next(calls)
        return act(observations.reshape(num_seeds, -1, *observations.shape[1:]), keys[t]).reshape(-1)
    return policy_fn


def _split_per_seed(keys: Sequence[jax.Array], num: int) -> jax.Array:
    """[S] keys -> [S, num]: row s is jax.random.split(keys[s], num), computed per seed as single runs do."""
    return jnp.stack([jax.random.split(k, num) for k in keys])


def episode_returns(running: np.ndarray, rewards: np.ndarray, terminals: np.ndarray) -> list[list[float]]:
    """Returns of episodes finishing in a chunk, per env row in time order; updates `running` [N] in place.

    rewards float [N, T], terminals bool [N, T]; running float64 [N] return so far of each env's episode."""
    finished = [[] for _ in range(len(running))]
    for t in range(rewards.shape[1]):
        running += rewards[:, t]
        for row in np.flatnonzero(terminals[:, t]):
            finished[row].append(float(running[row]))
        running[terminals[:, t]] = 0.0
    return finished


def evaluate_seeds(env_config: EnvConfig, act: Callable, keys: Sequence[jax.Array], base_seeds: Sequence[int]
                   ) -> list[dict]:
    """collect.evaluate for S seeds in one pool of S x num_eval_envs envs: seed s gets the envs, step keys and
    result dict its own `evaluate(env_config, ..., keys[s], base_seeds[s])` would. act(obs [S, E, ...], keys [S])."""
    num_seeds, num_envs, max_steps = len(keys), env_config.num_eval_envs, env_config.eval_cap
    policy = _keyed_policy(act, _split_per_seed(keys, max_steps), num_seeds)  # per-seed keys live in the policy
    per_episode = first_episodes(make_pooled_env(env_config, num_envs, base_seeds), env_config, policy, [None] * max_steps)
    return [episode_stats(*group) for group in zip(*(x.reshape(num_seeds, num_envs) for x in per_episode))]


def aggregate(values: Sequence[float]) -> dict[str, float]:
    """Mean, std (population), median and IQM (mean of the middle 50%, trimming floor(n/4) per side as
    scipy.stats.trim_mean(x, 0.25) and rliable do) over seeds."""
    x = np.sort(np.asarray(values, np.float64))
    cut = int(0.25 * len(x))
    return {"mean": float(x.mean()), "std": float(x.std()), "median": float(np.median(x)),
            "iqm": float(x[cut:len(x) - cut].mean()), "num_seeds": len(x)}


# ------------------------------------------------------------------------------------------------ loop

def train_and_evaluate_seeds(config: Config, workdir: str, num_seeds: int,
                             echo: Callable[[str], None] | None = None,
                             devices: Sequence[jax.Device] | None = None) -> dict:
    """Runs (or resumes) seeds config.seed .. config.seed + num_seeds - 1 in `workdir`; returns
    {"seeds": [per-seed summary as train_and_evaluate returns], "aggregate": {...}}. Errors as train.py's."""
    echo = echo or functools.partial(print, flush=True)
    validate(config)
    if num_seeds < 1:
        raise ValueError(f"--num_seeds must be >= 1, got {num_seeds}")
    if jax.process_count() > 1:
        raise ValueError("multi-host runs are not supported by the multi-seed loop yet (every process would "
                         "write the same workdir); run one process per host with its own seeds")
    game = envs.check_game(config.env.game)
    num_actions = envs.num_actions(game)
    jax.config.update("jax_threefry_partitionable", config.compute.threefry_partitionable)
    sharding = seed_sharding(num_seeds, devices)
    _check_workdir(workdir)
    lock = lock_workdir(workdir)  # noqa: F841 (held until return)
    s_cfg, p = config.schedule, config.policy
    S, E = num_seeds, ENVS_PER_SEED
    seeds = [config.seed + s for s in range(S)]
    roots = [jax.random.key(seed) for seed in seeds]
    seed_dirs = [os.path.join(workdir, f"seed_{seed}") for seed in seeds]
    for d in seed_dirs:
        _check_workdir(d)
    put = functools.partial(_put, sharding)
    vqvae_steps, _ = world_model_programs(config, sharding)

    # Initial states exactly as train.py makes them, one seed at a time, then stacked.
    networks = make_networks(config, num_actions)
    policy_optimizer = ppo.make_optimizer(p)
    init_agent = jax.jit(networks.actor_critic.init)
    worlds, agents = [], []
    for root in roots:
        init_key, agent_key = jax.random.split(jax.random.fold_in(root, 2**31))
        worlds.append(wm.init_world_model(config, num_actions, init_key))
        agent_params = init_agent(agent_key, jnp.zeros((1, 6, 6, config.vqvae.code_dim)))
        agents.append(AgentState(agent_params, policy_optimizer.init(agent_params)))
    world, agent = stack(worlds), stack(agents)
    del worlds, agents
    replays = [Replay(config.total_real_steps, E, (config.env.image_size,) * 2, config.env.frame_stack)
               for _ in range(S)]
    collector = pooled_collector(config.env, E, [derived_seed(root, 0) for root in roots])
    running_returns = np.zeros(S * E, np.float64)

    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"))
    meta = {"iteration": 0, "phase": COLLECT, "unit": 0, "chunks": 0, "metrics_offsets": [0] * S,
            "log_steps": [0] * S, "eval_histories": [[] for _ in range(S)], "save_index": 0}
    latest = checkpoints.latest_step()
    if latest is not None:
        (world, agent), meta = checkpoints.restore(latest, (world, agent))
        if not same_config(meta.get("config"), config) or meta.get("num_seeds") != S:
            raise ValueError(f"workdir {workdir!r} holds a run with a different config or --num_seeds; "
                             "use another --workdir or the same flags")
        echo(f"resuming from checkpoint {latest}: iteration {meta['iteration'] + 1}, phase {PHASES[meta['phase']]}, "
             f"unit {meta['unit']}")
        for k in range(meta["chunks"]):
            chunk = checkpoints.load_replay_chunk(k)
            for s, replay in enumerate(replays):
                replay.add(*(chunk[f][s * E:(s + 1) * E] for f in
                             ("frames", "actions", "rewards", "terminals", "is_first")))
            episode_returns(running_returns, chunk["rewards"], chunk["terminals"])
        if meta["iteration"] < s_cfg.num_iterations:
            _fast_forward(collector, meta["chunks"], checkpoints)
    world, agent = put(world), put(agent)
    loggers = [Logger(d, off, step, echo=lambda _: None)
               for d, off, step in zip(seed_dirs, meta["metrics_offsets"], meta["log_steps"])]
    loggers[0].echo = echo  # progress lines: seed 0's clock and metrics
    progress = loggers[0].progress
    last_save = started = time.time()
    elapsed = lambda: meta.get("elapsed_s", 0.0) + time.time() - started  # wall time over all resumptions
    meta["git_commits"] = sorted(set(meta.get("git_commits", [])) | {git_commit()})

    def save(iteration: int, phase: int, unit: int) -> None:
        nonlocal last_save, started
        meta.update(iteration=iteration, phase=phase, unit=unit, metrics_offsets=[lg.offset for lg in loggers],
                    log_steps=[lg.log_step for lg in loggers], config=to_dict(config), num_seeds=S,
                    save_index=meta["save_index"] + 1, elapsed_s=elapsed())
        started = time.time()
        checkpoints.save(meta["save_index"], jax.device_get((world, agent)), meta)
        last_save = time.time()

    def maybe_save(iteration: int, phase: int, unit: int) -> None:
        if time.time() - last_save >= config.checkpoint_every_s:
            save(iteration, phase, unit)

    def record(s: int, iteration: int, phase: str, metrics: dict, **extra) -> None:
        loggers[s].write({"phase": phase, "iteration": iteration + 1, "real_steps": len(replays[s]), **extra,
                          **{k: float(v) for k, v in metrics.items()}})

    def start_phase() -> None:
        for lg in loggers:
            lg.start_phase()

    act_collect = over_seeds(make_act(networks, config.env.collect_temperature), sharding, (0, 0, 0, 0))
    act_eval = over_seeds(make_act(networks, 1.0), sharding, (0, 0, 0, 0))
    random_act = over_seeds(lambda key: jax.random.randint(key, (E,), 0, num_actions, dtype=jnp.int32), sharding, (0,))
    policy_updates = make_policy_update(config, networks, policy_optimizer,
                                        lambda fn, n, options: over_seeds(fn, sharding, (0,) * n, options))
    seed_keys = lambda it, phase, unit=0: [unit_key(root, it, phase, unit) for root in roots]
    diagnostics_fn = over_seeds(wm.world_model_diagnostics, sharding, (0,) * 5)
    imagined_fn = over_seeds(functools.partial(imagined_returns, networks, config), sharding, (0,) * 4)

    def diagnose(it: int, datas: Sequence[Replay], first_step: int) -> None:
        """train.py's diagnose for every seed: the same windows and keys, one vmapped program."""
        began = time.time()
        keys = [jax.random.split(k) for k in seed_keys(it, DIAGNOSTICS)]  # (window key, unroll key) per seed
        batches = [diagnostic_batch(config, data, first_step, k[0]) if s_cfg.diagnostic_windows else None
                   for data, k in zip(datas, keys)]
        if any(b is None for b in batches):
            return
        width = min(b.actions.shape[1] for b in batches)  # equal widths to stack (differ only on tiny data)
        fields = [np.stack([x[:, :width] for x in xs]) for xs in
                  zip(*((b.observations, b.actions, b.rewards) for b in batches))]
        metrics = jax.device_get(diagnostics_fn(world, *map(put, fields), put(jnp.stack([k[1] for k in keys]))))
        for s in range(S):
            record(s, it, "diagnostics", unstack(metrics, s), windows=width, model_iteration=max(it, 1),
                   seconds=round(time.time() - began, 2))
        echo(f"[iter {it + 1}/{s_cfg.num_iterations}] diagnostics world model of iteration {max(it, 1)} on "
             f"{'held-back random' if it == 0 else 'fresh'} data, seed 0: {wm.diagnostic_summary(unstack(metrics, 0))}")

    def holdout() -> list[Replay]:
        """train.py's holdout for every seed, from one pool of envs with the single runs' seeds and keys."""
        steps = holdout_steps(config)
        pool = pooled_collector(config.env, E, [derived_seed(root, HOLDOUT_ENV) for root in roots])
        step_keys = _split_per_seed([unit_key(root, 0, DIAGNOSTICS, 1) for root in roots], steps // E)
        trajectory, _ = pool.collect(_keyed_policy(lambda obs, keys: random_act(put(keys)), step_keys, S), steps * S,
                                     jax.random.key(0))
        datas = [Replay(steps, E, (config.env.image_size,) * 2, config.env.frame_stack) for _ in range(S)]
        for s, data in enumerate(datas):
            data.add(*(x[s * E:(s + 1) * E] for x in trajectory))
        return datas

    start_iteration = meta["iteration"]
    for it in range(start_iteration, s_cfg.num_iterations):
        first_phase = meta["phase"] if it == start_iteration else COLLECT
        first_unit = meta["unit"] if it == start_iteration else 0

        if first_phase <= COLLECT:
            start_phase()
            steps = s_cfg.initial_steps if it == 0 else s_cfg.steps_per_iteration
            step_keys = _split_per_seed(seed_keys(it, COLLECT), steps // E)  # Collector's per-step keys
            if it == 0:
                act = lambda obs, keys: random_act(put(keys))
            else:
                act = lambda obs, keys, w=world, a=agent.params: act_collect(w, a, put(obs), put(keys))
            trajectory, _ = collector.collect(_keyed_policy(act, step_keys, S), steps * S, jax.random.key(0))
            checkpoints.save_replay_chunk(meta["chunks"], trajectory._asdict())
            finished = episode_returns(running_returns, trajectory.rewards, trajectory.terminals)
            for s, replay in enumerate(replays):
                replay.add(*(x[s * E:(s + 1) * E] for x in trajectory))
                returns = [r for row in finished[s * E:(s + 1) * E] for r in row]
                collected = {"episodes": len(returns)}
                if returns:
                    collected["episode_return_mean"] = float(np.mean(returns))
                record(s, it, "collect", collected)
            meta["chunks"] += 1
            progress(it, s_cfg.num_iterations, "collect", steps, steps, f"{S} seeds")
            save(it, WARMUP, 0)

        if first_phase <= WARMUP and it == 0:
            start_phase()
            all_active = put(jnp.ones((S,), bool))
            for epoch in range(first_unit if first_phase == WARMUP else 0, s_cfg.warmup_epochs):
                streams = [r.observation_batches(k, config.vqvae.batch_size)
                           for r, k in zip(replays, seed_keys(it, WARMUP, epoch))]
                history = []
                heartbeat = loggers[0].heartbeat(it, s_cfg.num_iterations, "warmup", epoch, s_cfg.warmup_epochs)
                for i, batches in enumerate(zip(*streams, strict=True)):  # equal replay sizes: equal batch counts
                    world, metrics = vqvae_steps(all_active, world, put(_stack_batches(batches)),
                                                 jnp.asarray(config.vqvae.warmup_lr_multiplier, jnp.float32))
                    history.append(metrics)
                    heartbeat("vqvae", i, metrics)
                history = jax.device_get(history)
                per_seed = [wm.average_metrics([unstack(m, s) for m in history]) for s in range(S)]
                for s in range(S):
                    record(s, it, "warmup", per_seed[s], unit=epoch)
                progress(it, s_cfg.num_iterations, "warmup", epoch + 1, s_cfg.warmup_epochs,
                         "seed 0: " + _short(per_seed[0]))
                maybe_save(it, WARMUP, epoch + 1)
            save(it, WORLD_MODEL, 0)

        if first_phase <= WORLD_MODEL:
            start_phase()
            epochs = s_cfg.joint_epochs[it]
            first_epoch = first_unit if first_phase == WORLD_MODEL else 0
            if it > 0 and first_epoch == 0:  # the last world model on the chunk it has not trained on yet
                diagnose(it, replays, len(replays[0]) - s_cfg.steps_per_iteration)
            for epoch in range(first_epoch, epochs):
                world, per_seed = joint_epoch_seeds(
                    world, replays, seed_keys(it, WORLD_MODEL, epoch), s_cfg.vq_update_intervals[it], sharding,
                    progress=loggers[0].heartbeat(it, s_cfg.num_iterations, "world_model", epoch, epochs))
                for s in range(S):
                    for kind in ("vqvae", "dynamics"):
                        record(s, it, kind, per_seed[s][kind], unit=epoch)
                progress(it, s_cfg.num_iterations, "world_model", epoch + 1, epochs,
                         "seed 0: " + _short({**per_seed[0]["vqvae"], **per_seed[0]["dynamics"]}))
                maybe_save(it, WORLD_MODEL, epoch + 1)
            if it == 0 and s_cfg.diagnostic_windows:
                diagnose(it, holdout(), 0)
            save(it, POLICY, 0)

        if first_phase <= POLICY:
            start_phase()
            updates = s_cfg.ppo_updates[it]
            report_every = max(1, updates // 20)
            history = []
            for u in range(first_unit if first_phase == POLICY else 0, updates):
                start_keys, update_keys = zip(*(jax.random.split(k) for k in seed_keys(it, POLICY, u)))
                starts = np.stack([r.sample_observations(k, p.num_envs) for r, k in zip(replays, start_keys)])
                agent, metrics = policy_updates(world, agent, put(starts), put(jnp.stack(update_keys)))
                history.append(metrics)
                if (u + 1) % report_every == 0 or u + 1 == updates:
                    history = jax.device_get(history)
                    for s in range(S):
                        averaged = {k: float(np.mean([h[k][s] for h in history])) for k in history[0]}
                        record(s, it, "policy", averaged, unit=u + 1)
                        if s == 0:
                            progress(it, s_cfg.num_iterations, "policy", u + 1, updates, "seed 0: " + _short(averaged))
                    history = []
                    maybe_save(it, POLICY, u + 1)
            save(it, EVALUATE, 0)

        start_phase()
        results = evaluate_seeds(config.env, lambda obs, keys: act_eval(world, agent.params, put(obs), put(keys)),
                                 seed_keys(it, EVALUATE), [derived_seed(root, 1 + it) for root in roots])
        dream_keys = [jax.random.split(k) for k in seed_keys(it, DIAGNOSTICS, 2)]  # (start key, dream key) per seed
        starts = np.stack([r.sample_observations(k[0], p.num_envs) for r, k in zip(replays, dream_keys)])
        imagined = np.asarray(imagined_fn(world, agent.params, put(starts), put(jnp.stack([k[1] for k in dream_keys]))))
        host_world, host_agent = jax.device_get((world, agent))
        for s, result in enumerate(results):
            metrics = evaluation_record(result, imagined[s], p.horizon)
            record(s, it, "evaluate", metrics, wall_time_s=round(elapsed(), 1))
            if s == 0:
                echo(f"[iter {it + 1}/{s_cfg.num_iterations}] seed 0: {evaluation_line(metrics, p.horizon)}")
            meta["eval_histories"][s].append([len(replays[s]), result["return_mean"], result["return_std"]])
            meta.setdefault("last_evals", [None] * S)[s] = result
            _save_images(seed_dirs[s], it, unstack(host_world, s), unstack(host_agent, s), replays[s], networks,
                         config, unit_key(roots[s], it, EVALUATE, 1))
            steps_, means, stds = zip(*meta["eval_histories"][s])
            viz.save_learning_curve(os.path.join(seed_dirs[s], "learning_curve.png"), list(steps_), list(means),
                                    list(stds), f"{game} (seed {seeds[s]})")
        returns = [r["return_mean"] for r in results]
        progress(it, s_cfg.num_iterations, "evaluate", 1, 1,
                 f"return over {S} seeds {np.mean(returns):.1f} +- {np.std(returns):.1f}")
        save(it + 1, COLLECT, 0)

    host_world, host_agent = jax.device_get((world, agent))
    summaries = []
    for s in range(S):
        w, a = unstack(host_world, s), unstack(host_agent, s)
        history = meta["eval_histories"][s]
        summary = {"game": game, "seed": seeds[s], "real_steps": len(replays[s]),
                   "final_eval_return_mean": history[-1][1] if history else None,
                   "hashes": {"encoder": params_hash((w.encoder_params, w.encoder_batch_stats)),
                              "decoder": params_hash(w.decoder_params), "codebook": params_hash(w.codebook),
                              "dynamics": params_hash(w.dynamics_params), "policy": params_hash(a.params)}}
        with open(os.path.join(seed_dirs[s], "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        loggers[s].writer.close()
        summaries.append(summary)
    finals = [sm["final_eval_return_mean"] for sm in summaries]
    result = {"game": game, "seeds": seeds, "num_devices": len(sharding.device_set) if sharding is not None else 1,
              "final_eval_return": aggregate(finals) if None not in finals else None,
              "final_eval_return_per_seed": finals}
    with open(os.path.join(workdir, "aggregate.json"), "w") as f:
        json.dump(result, f, indent=1)
    last = s_cfg.num_iterations - 1
    echo("evaluating the uniform random agent under the same protocol (same envs, seeds and caps)")
    random_eval_act = over_seeds(lambda key: jax.random.randint(key, (config.env.num_eval_envs,), 0, num_actions,
                                                                dtype=jnp.int32), sharding, (0,))  # collect.random_policy
    baselines = evaluate_seeds(config.env, lambda obs, keys: random_eval_act(put(keys)), seed_keys(last, EVALUATE),
                               [derived_seed(root, 1 + last) for root in roots])
    write_results(os.path.join(workdir, "results.json"), config, game, seeds, seed_dirs, meta.get("last_evals", [None] * S), baselines,
                  meta)
    return {"seeds": summaries, "aggregate": result}


def _put(sharding: NamedSharding | None, tree: Any) -> Any:
    """Places a pytree with a leading seed axis on the seed sharding (a no-op on one device)."""
    return jax.device_put(tree, sharding) if sharding is not None else tree


def _stack_batches(batches: Sequence[Any]) -> Any:
    """Per-seed ObservationBatch / SequenceBatch (numpy) -> one with a leading seed axis."""
    return type(batches[0])(*(np.stack(fields) for fields in zip(*batches)))


def joint_epoch_seeds(world: wm.WorldModelState, replays: Sequence[Replay], keys: Sequence[jax.Array], interval: int,
                      sharding: NamedSharding | None = None, lr_scale: float = 1.0,
                      progress: wm.Progress | None = None) -> tuple[wm.WorldModelState, list[dict[str, dict[str, float]]]]:
    """wm.joint_epoch for S seeds at once (world stacked [S, ...], one replay and epoch key per seed).

    Seed s does exactly its own joint_epoch's steps in order: at i = 0, 1, ..., D_s a VQ-VAE step if i % interval
    == 0 and its VQ-VAE stream is not exhausted, then (i < D_s) a dynamics step with key fold_in(k, i). Seeds with
    fewer dynamics batches D_s get masked no-op steps (zero batches, `active` False) until the longest is done.
    Returns (world, per seed {"vqvae": averaged metrics, "dynamics": averaged metrics}).
    """
    config = world.config
    d = config.dynamics
    S = len(replays)
    put = functools.partial(_put, sharding)
    vqvae_steps, dynamics_steps = world_model_programs(config, sharding)
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
    vq_history, dyn_history = [], []  # (active [S], metrics) per call
    vq_filler = dyn_filler = None
    for i in range(int(dyn_counts.max()) + 1):
        vq_active = np.full(S, i % interval == 0 and i // interval < num_vq) & (i <= dyn_counts)
        if vq_active.any():
            batches = [next(stream) if on else None for stream, on in zip(vq_streams, vq_active)]
            vq_filler = vq_filler if vq_filler is not None else _zeros_like(next(b for b in batches if b is not None))
            world, metrics = vqvae_steps(put(jnp.asarray(vq_active)), world,
                                         put(_stack_batches([vq_filler if b is None else b for b in batches])),
                                         jnp.asarray(lr_scale, jnp.float32))
            vq_history.append((vq_active, metrics))
        dyn_active = i < dyn_counts
        if dyn_active.any():
            batches = [next(stream) if on else None for stream, on in zip(dyn_streams, dyn_active)]
            dyn_filler = dyn_filler if dyn_filler is not None else _zeros_like(next(b for b in batches if b is not None))
            world, metrics = dynamics_steps(put(jnp.asarray(dyn_active)), world,
                                            put(_stack_batches([dyn_filler if b is None else b for b in batches])),
                                            steps_keys, i)
            dyn_history.append((dyn_active, metrics))
            if progress is not None:
                progress("dynamics", i, metrics)
    vq_history, dyn_history = jax.device_get((vq_history, dyn_history))
    per_seed = lambda history, s: wm.average_metrics([unstack(m, s) for on, m in history if on[s]])
    return world, [{"vqvae": per_seed(vq_history, s), "dynamics": per_seed(dyn_history, s)} for s in range(S)]


def _zeros_like(batch: Any) -> Any:
    """A padding batch: zeros everywhere, valid all False (masked out of losses and the EMA anyway)."""
    return type(batch)(*(np.zeros_like(x) for x in batch))


def _fast_forward(collector: Collector, num_chunks: int, checkpoints: Checkpointer) -> None:
    """train._fast_forward for the pooled env: re-step it with the stored actions of all its envs."""
    for k in range(num_chunks):
        chunk = checkpoints.load_replay_chunk(k)
        actions = iter(chunk["actions"].T)
        trajectory, _ = collector.collect(lambda obs, key: next(actions), chunk["actions"].size, jax.random.key(0))
        if not np.array_equal(trajectory.frames, chunk["frames"]):
            raise CheckpointError("replaying the stored actions did not reproduce the stored frames; "
                                  "the environment is not deterministic here, cannot resume")
