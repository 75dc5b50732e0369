"""`train_and_evaluate(config, workdir)`: the iterative loop of paper section 3.4 / SPEC 8.3.

Each of the `schedule.num_iterations` iterations runs five phases:
  collect (12,800 random steps in iteration 1, then 6,400 with the agent at temperature 1.5) -> warmup
  (iteration 1 only: VQ-VAE epochs at 10x lr) -> world_model (joint epochs, slow VQ-VAE updates) -> policy
  (PPO updates on imagined rollouts) -> evaluate (sampled actions, fresh seeded envs).

Keys: one root `jax.random.key(seed)`; the key of unit u (an epoch, a PPO update, ...) of phase p in
iteration i is fold_in(fold_in(fold_in(root, i), p), u), so a resumed run draws exactly the keys an
uninterrupted one would. The EnvPool seeds are derived from the root key too.

Checkpoints (checkpoint.py) are written after every phase and, inside long phases, every
`checkpoint_every_s` seconds at a unit boundary. The real env cannot be snapshotted, so on resume the
collector's env is rebuilt with its seed and re-stepped with the stored actions (deterministic: no sticky
actions), and the frames it produces are checked against the replay.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dlwm_jax import envs, ppo, viz
from dlwm_jax.checkpoint import Checkpointer, CheckpointError
from dlwm_jax.collect import Collector, evaluate, random_policy
from dlwm_jax.config import Config, from_dict, to_dict, validate
from dlwm_jax.imagination import imagine
from dlwm_jax.networks import make_networks
from dlwm_jax.networks.distributions import continuous_bernoulli_mean
from dlwm_jax.replay import Replay
from dlwm_jax.results import git_commit, write_results
from dlwm_jax import world_model as wm

PHASES = ("collect", "warmup", "world_model", "policy", "evaluate")
COLLECT, WARMUP, WORLD_MODEL, POLICY, EVALUATE = range(len(PHASES))
DIAGNOSTICS = len(PHASES)   # key namespace of the diagnostics (not a phase: they change no state)
HOLDOUT_ENV = 10_000        # derived_seed purpose of iteration 1's held-back random env


class NonFiniteError(RuntimeError):
    """A loss became NaN/inf; nothing of the failing phase is saved."""


@flax.struct.dataclass
class AgentState:
    params: Any
    opt_state: Any


def unit_key(root: jax.Array, iteration: int, phase: int, unit: int = 0) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, iteration), phase), unit)


def derived_seed(root: jax.Array, purpose: int) -> int:
    """A 31-bit integer seed for host-side libraries (EnvPool), derived from the root key."""
    return int(jax.random.randint(jax.random.fold_in(root, 1_000_003 + purpose), (), 0, 2**31 - 1))


def params_hash(tree: Any) -> str:
    """SHA-256 over the bytes of every leaf, in tree order: equal hashes mean bit-identical parameters."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(jax.device_get(tree)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


class Logger:
    """metrics.jsonl + TensorBoard; progress lines with elapsed time and ETA."""

    def __init__(self, workdir: str, metrics_offset: int, log_step: int, echo: Callable[[str], None]):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):  # drop lines a killed run wrote after its last checkpoint
            with open(self.path, "r+b") as f:
                f.truncate(metrics_offset)
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(workdir, purge_step=log_step if log_step else None)
        self.log_step = log_step
        self.echo = echo
        self.phase_start = self.last_echo = time.time()

    @property
    def offset(self) -> int:
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def write(self, record: dict) -> None:
        for k, v in record.items():
            if isinstance(v, float) and not math.isfinite(v) and k not in ("eval_return_std",):
                raise NonFiniteError(f"non-finite {k}={v} in phase {record.get('phase')} of iteration "
                                     f"{record.get('iteration')}; nothing of this phase was saved")
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("iteration", "real_steps", "unit"):
                self.writer.add_scalar(f"{record['phase']}/{k}", v, self.log_step)
        self.writer.flush()
        self.log_step += 1

    def start_phase(self) -> None:
        self.phase_start = self.last_echo = time.time()

    def heartbeat(self, iteration: int, num_iterations: int, phase: str, epoch: int, epochs: int, every_s: float = 30.0):
        """A progress callback for world_model epochs: a line at most every `every_s` seconds inside an epoch."""
        def callback(kind: str, step: int, metrics) -> None:
            if time.time() - self.last_echo >= every_s:
                self.last_echo = time.time()
                done = epoch + 0.5  # mid-epoch: the ETA assumes half of this epoch is done
                self.progress(iteration, num_iterations, phase, done, epochs, f"epoch {epoch + 1}: {kind} step {step + 1}")
        return callback

    def progress(self, iteration: int, num_iterations: int, phase: str, done: int, total: int, extra: str = "") -> None:
        elapsed = time.time() - self.phase_start
        eta = elapsed / done * (total - done) if done else float("nan")
        self.last_echo = time.time()
        self.echo(f"[iter {iteration + 1}/{num_iterations}] {phase:<11} {done:g}/{total}  elapsed {elapsed:6.0f}s"
                  f"  eta {eta:6.0f}s  {extra}")


def _check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create workdir {workdir!r}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise OSError(f"workdir {workdir!r} is not writable")


def lock_workdir(workdir: str):
    """An exclusive lock on workdir/.lock for this process's lifetime (keep the returned file open): a second
    process on the same workdir would interleave checkpoints. Raises OSError (one line) if it is held."""
    import fcntl
    lock = open(os.path.join(workdir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise OSError(f"workdir {workdir!r} is in use by another running process") from None
    return lock


def same_config(saved: dict | None, config: Config) -> bool:
    """Whether a checkpoint's meta["config"] is `config`; fields added to Config since it was saved count as
    their defaults, so a run resumes under a newer version that only added options."""
    try:
        return saved is not None and from_dict(saved) == config
    except ValueError:
        return False


def _short(metrics: dict) -> str:
    keys = ("recon_nll", "next_latent_loss", "next_latent_acc", "reward_loss", "policy_loss", "entropy")
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def make_act(networks, temperature: float):
    """Jitted act(world, agent_params, obs uint8 [N,96,96,C], key) -> actions [N]: encoder in eval mode,
    quantise, sample from the policy at `temperature` (SPEC 5, 8.3)."""
    @jax.jit
    def act(world, agent_params, observations, key):
        _, z_q = wm.encode(world, observations)
        logits, _ = networks.actor_critic.apply(agent_params, z_q)
        return ppo.sample_action(logits, key, temperature)
    return act


def imagined_returns(networks, config: Config, world: wm.WorldModelState, agent_params, start_observations,
                     key: jax.Array) -> jax.Array:
    """The policy's return in its own dreams: start observations uint8 [N, 96, 96, C] -> summed imagined rewards
    [N] over one horizon (SPEC 6), to set beside the real evaluation's clipped return per horizon."""
    start_indices, _ = wm.encode(world, start_observations)
    dream = imagine(networks.dream_dynamics, networks.actor_critic, {"params": world.dynamics_params}, agent_params,
                    world.codebook.embeddings, start_indices, key, config.policy.horizon,
                    config.policy.bootstrap_at_horizon, unroll=config.compute.imagination_unroll)
    return jnp.sum(dream.rewards, axis=0)


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


def make_policy_update(config: Config, networks, optimizer, compile_fn: Callable | None = None):
    """update(world, agent, start_observations, key) -> (agent, metrics): encode 16 real start observations
    (eval BN), imagine 50 steps, one PPO update (SPEC 6, 7).

    Two compiled programs, so each gets its own XLA options (ComputeConfig.compiler_options): the dream and
    the PPO update. compile_fn(fn, num_args, compiler_options) compiles each (default: jax.jit); multiseed
    passes its vmapping one.
    """
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


@functools.partial(jax.jit, static_argnums=0)
def _decode_mean(decoder, decoder_params, z_q: jax.Array) -> jax.Array:
    """Latents [B, 6, 6, D] -> the continuous Bernoulli mean [B, 96, 96, C] (images only, SPEC 3.6)."""
    return continuous_bernoulli_mean(decoder.apply({"params": decoder_params}, z_q))


_dream = jax.jit(imagine, static_argnames=("dynamics", "actor_critic", "horizon"))


def _save_images(workdir: str, iteration: int, world: wm.WorldModelState, agent: AgentState, replay: Replay,
                 networks, config: Config, key: jax.Array) -> None:
    """Reconstructions with code maps, and a decoded dream (the reference's latent analysis and dreams)."""
    obs_key, start_key, dream_key = jax.random.split(key, 3)
    n = min(6, len(replay))
    observations = replay.sample_observations(obs_key, n)
    indices, z_q = wm.encode(world, observations)
    recon = _decode_mean(networks.decoder, world.decoder_params, z_q)
    grid = viz.reconstruction_grid(observations, np.asarray(recon), np.asarray(indices), config.vqvae.num_codes)
    viz.save_png(os.path.join(workdir, f"reconstructions_iter{iteration + 1}.png"), grid)

    start = replay.sample_observations(start_key, min(4, len(replay)))
    start_indices, _ = wm.encode(world, start)
    dream = _dream(dynamics=networks.dream_dynamics, actor_critic=networks.actor_critic,
                   dynamics_params={"params": world.dynamics_params}, policy_params=agent.params,
                   embeddings=world.codebook.embeddings, start_indices=start_indices, key=dream_key,
                   horizon=config.policy.horizon)
    t, b = dream.indices.shape[:2]
    frames = _decode_mean(networks.decoder, world.decoder_params,
                          world.codebook.embeddings[dream.indices.reshape(t * b, *dream.indices.shape[2:])])
    frames = np.asarray(frames[..., -1]).reshape(t, b, *frames.shape[1:3])
    viz.save_gif(os.path.join(workdir, f"dream_iter{iteration + 1}.gif"), viz.dream_frames(frames, np.asarray(dream.rewards)))


def train_and_evaluate(config: Config, workdir: str, echo: Callable[[str], None] | None = None) -> dict:
    """Runs (or resumes) the whole iterative loop in `workdir`; returns the final summary dict.

    Raises ValueError (bad config / game), OSError (workdir), CheckpointError (unreadable checkpoint) or
    NonFiniteError (a NaN/inf loss) with one-line messages; nothing already saved is deleted by a failure.
    """
    echo = echo or functools.partial(print, flush=True)
    validate(config)
    game = envs.check_game(config.env.game)
    num_actions = envs.num_actions(game)
    jax.config.update("jax_threefry_partitionable", config.compute.threefry_partitionable)
    _check_workdir(workdir)
    lock = lock_workdir(workdir)  # noqa: F841 (held until return)
    s, p = config.schedule, config.policy

    root = jax.random.key(config.seed)
    networks = make_networks(config, num_actions)
    policy_optimizer = ppo.make_optimizer(p)
    init_key, agent_key = jax.random.split(jax.random.fold_in(root, 2**31))  # apart from every iteration
    world = wm.init_world_model(config, num_actions, init_key)
    agent_params = jax.jit(networks.actor_critic.init)(agent_key, jnp.zeros((1, 6, 6, config.vqvae.code_dim)))
    agent = AgentState(agent_params, policy_optimizer.init(agent_params))
    replay = Replay(config.total_real_steps, 1, (config.env.image_size,) * 2, config.env.frame_stack)
    collector = Collector(config.env, 1, derived_seed(root, 0))

    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"))
    meta = {"iteration": 0, "phase": COLLECT, "unit": 0, "chunks": 0, "metrics_offset": 0, "log_step": 0,
            "eval_history": [], "save_index": 0}
    latest = checkpoints.latest_step()
    if latest is not None:
        (world, agent), meta = checkpoints.restore(latest, (world, agent))
        if not same_config(meta.get("config"), config):
            raise ValueError(f"workdir {workdir!r} holds a run with a different config (game/preset/flags); "
                             "use another --workdir or the same flags")
        echo(f"resuming from checkpoint {latest}: iteration {meta['iteration'] + 1}, phase {PHASES[meta['phase']]}, "
             f"unit {meta['unit']}")
        for k in range(meta["chunks"]):
            replay.add(*checkpoints.load_replay_chunk(k).values())
        if meta["iteration"] < config.schedule.num_iterations:
            _fast_forward(collector, meta["chunks"], checkpoints)
    logger = Logger(workdir, meta["metrics_offset"], meta["log_step"], echo)
    last_save = started = time.time()
    elapsed = lambda: meta.get("elapsed_s", 0.0) + time.time() - started  # wall time over all resumptions
    meta["git_commits"] = sorted(set(meta.get("git_commits", [])) | {git_commit()})

    def save(iteration: int, phase: int, unit: int) -> None:
        nonlocal last_save, started
        meta.update(iteration=iteration, phase=phase, unit=unit, metrics_offset=logger.offset,
                    log_step=logger.log_step, config=to_dict(config), save_index=meta["save_index"] + 1,
                    elapsed_s=elapsed())
        started = time.time()
        checkpoints.save(meta["save_index"], (world, agent), meta)
        last_save = time.time()

    def maybe_save(iteration: int, phase: int, unit: int) -> None:
        if time.time() - last_save >= config.checkpoint_every_s:
            save(iteration, phase, unit)

    def record(iteration: int, phase: str, metrics: dict, **extra) -> None:
        logger.write({"phase": phase, "iteration": iteration + 1, "real_steps": len(replay), **extra,
                      **{k: float(v) for k, v in metrics.items()}})

    act_collect = make_act(networks, config.env.collect_temperature)
    act_eval = make_act(networks, 1.0)
    policy_update = make_policy_update(config, networks, policy_optimizer)
    diagnostics_fn = jax.jit(wm.world_model_diagnostics)
    imagined_fn = jax.jit(functools.partial(imagined_returns, networks, config))

    def diagnose(it: int, data: Replay, first_step: int) -> None:
        """World-model diagnostics on real windows it has not trained on (steps >= first_step of `data`)."""
        began = time.time()
        window_key, unroll_key = jax.random.split(unit_key(root, it, DIAGNOSTICS))
        batch = diagnostic_batch(config, data, first_step, window_key) if s.diagnostic_windows else None
        if batch is None:
            return
        metrics = jax.device_get(diagnostics_fn(world, batch.observations, batch.actions, batch.rewards, unroll_key))
        record(it, "diagnostics", metrics, windows=int(batch.actions.shape[1]), model_iteration=max(it, 1),
               seconds=round(time.time() - began, 2))
        logger.echo(f"[iter {it + 1}/{s.num_iterations}] diagnostics world model of iteration {max(it, 1)} on "
                    f"{'held-back random' if it == 0 else 'fresh'} data: {wm.diagnostic_summary(metrics)}")

    def holdout() -> Replay:
        """Iteration 1's held-back data: random steps from an env of its own (the training stream is untouched)."""
        steps = holdout_steps(config)
        trajectory, _ = Collector(config.env, 1, derived_seed(root, HOLDOUT_ENV)).collect(
            random_policy(num_actions), steps, unit_key(root, 0, DIAGNOSTICS, 1))
        data = Replay(steps, 1, (config.env.image_size,) * 2, config.env.frame_stack)
        data.add(*trajectory)
        return data

    start_iteration = meta["iteration"]
    for it in range(start_iteration, s.num_iterations):
        first_phase = meta["phase"] if it == start_iteration else COLLECT
        first_unit = meta["unit"] if it == start_iteration else 0

        if first_phase <= COLLECT:
            logger.start_phase()
            steps = s.initial_steps if it == 0 else s.steps_per_iteration
            if it == 0:
                policy_fn = random_policy(num_actions)
            else:
                policy_fn = lambda obs, key, w=world, a=agent.params: act_collect(w, a, obs, key)
            trajectory, stats = collector.collect(policy_fn, steps, unit_key(root, it, COLLECT))
            checkpoints.save_replay_chunk(meta["chunks"], trajectory._asdict())
            replay.add(*trajectory)
            meta["chunks"] += 1
            returns = stats["episode_returns"]
            collected = {"episodes": len(returns)}
            if len(returns):
                collected["episode_return_mean"] = float(np.mean(returns))
            record(it, "collect", collected)
            logger.progress(it, s.num_iterations, "collect", steps, steps, f"{len(returns)} episodes finished")
            save(it, WARMUP, 0)

        if first_phase <= WARMUP and it == 0:
            logger.start_phase()
            for epoch in range(first_unit if first_phase == WARMUP else 0, s.warmup_epochs):
                world, metrics = wm.warmup_epoch(world, replay, unit_key(root, it, WARMUP, epoch),
                                                 logger.heartbeat(it, s.num_iterations, "warmup", epoch, s.warmup_epochs))
                record(it, "warmup", metrics, unit=epoch)
                logger.progress(it, s.num_iterations, "warmup", epoch + 1, s.warmup_epochs, _short(metrics))
                maybe_save(it, WARMUP, epoch + 1)
            save(it, WORLD_MODEL, 0)

        if first_phase <= WORLD_MODEL:
            logger.start_phase()
            epochs = s.joint_epochs[it]
            first_epoch = first_unit if first_phase == WORLD_MODEL else 0
            if it > 0 and first_epoch == 0:  # the last world model on the chunk it has not trained on yet
                diagnose(it, replay, len(replay) - s.steps_per_iteration)
            for epoch in range(first_epoch, epochs):
                world, metrics = wm.joint_epoch(world, replay, unit_key(root, it, WORLD_MODEL, epoch),
                                                s.vq_update_intervals[it],
                                                progress=logger.heartbeat(it, s.num_iterations, "world_model", epoch, epochs))
                for kind in ("vqvae", "dynamics"):
                    record(it, kind, metrics[kind], unit=epoch)
                logger.progress(it, s.num_iterations, "world_model", epoch + 1, epochs,
                                _short({**metrics["vqvae"], **metrics["dynamics"]}))
                maybe_save(it, WORLD_MODEL, epoch + 1)
            if it == 0 and s.diagnostic_windows:
                diagnose(it, holdout(), 0)
            save(it, POLICY, 0)

        if first_phase <= POLICY:
            logger.start_phase()
            updates = s.ppo_updates[it]
            report_every = max(1, updates // 20)
            history = []
            for u in range(first_unit if first_phase == POLICY else 0, updates):
                key = unit_key(root, it, POLICY, u)
                start_key, update_key = jax.random.split(key)
                starts = replay.sample_observations(start_key, p.num_envs)
                agent, metrics = policy_update(world, agent, starts, update_key)
                history.append(metrics)
                if (u + 1) % report_every == 0 or u + 1 == updates:
                    averaged = {k: float(np.mean([h[k] for h in jax.device_get(history)])) for k in history[0]}
                    record(it, "policy", averaged, unit=u + 1)
                    logger.progress(it, s.num_iterations, "policy", u + 1, updates, _short(averaged))
                    history = []
                    maybe_save(it, POLICY, u + 1)
            save(it, EVALUATE, 0)

        logger.start_phase()
        eval_key = unit_key(root, it, EVALUATE)
        result = evaluate(config.env, lambda obs, key: act_eval(world, agent.params, obs, key), eval_key,
                          derived_seed(root, 1 + it))
        start_key, dream_key = jax.random.split(unit_key(root, it, DIAGNOSTICS, 2))
        imagined = np.asarray(imagined_fn(world, agent.params, replay.sample_observations(start_key, p.num_envs),
                                          dream_key))
        metrics = evaluation_record(result, imagined, p.horizon)
        record(it, "evaluate", metrics, wall_time_s=round(elapsed(), 1))
        meta["eval_history"].append([len(replay), result["return_mean"], result["return_std"]])
        meta["last_eval"] = result
        logger.progress(it, s.num_iterations, "evaluate", 1, 1, evaluation_line(metrics, p.horizon))
        _save_images(workdir, it, world, agent, replay, networks, config, unit_key(root, it, EVALUATE, 1))
        steps_, means, stds = zip(*meta["eval_history"])
        viz.save_learning_curve(os.path.join(workdir, "learning_curve.png"), list(steps_), list(means), list(stds),
                                f"{game} (seed {config.seed})")
        save(it + 1, COLLECT, 0)

    summary = {"game": game, "seed": config.seed, "real_steps": len(replay),
               "final_eval_return_mean": meta["eval_history"][-1][1] if meta["eval_history"] else None,
               "hashes": {"encoder": params_hash((world.encoder_params, world.encoder_batch_stats)),
                          "decoder": params_hash(world.decoder_params), "codebook": params_hash(world.codebook),
                          "dynamics": params_hash(world.dynamics_params), "policy": params_hash(agent.params)}}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    logger.writer.close()
    last = s.num_iterations - 1
    echo("evaluating the uniform random agent under the same protocol (same envs, seeds and caps)")
    baseline = evaluate(config.env, random_policy(num_actions), unit_key(root, last, EVALUATE), derived_seed(root, 1 + last))
    write_results(os.path.join(workdir, "results.json"), config, game, [config.seed], [workdir], [meta.get("last_eval")], [baseline],
                  meta)
    return summary


def _fast_forward(collector: Collector, num_chunks: int, checkpoints: Checkpointer) -> None:
    """Re-steps a fresh collector env with the stored actions so it is where the killed run left it."""
    for k in range(num_chunks):
        chunk = checkpoints.load_replay_chunk(k)
        actions = iter(chunk["actions"][0])
        trajectory, _ = collector.collect(lambda obs, key: np.array([next(actions)], np.int32),
                                          chunk["actions"].shape[1], jax.random.key(0))
        if not np.array_equal(trajectory.frames, chunk["frames"]):
            raise CheckpointError("replaying the stored actions did not reproduce the stored frames; "
                                  "the environment is not deterministic here, cannot resume")
