"""The five phases of an iteration (paper section 3.4, SPEC 8.3), each `step(run, iteration, first unit)`: units
before `first unit` (> 0 after a resume) are done already. Also the world model's diagnostics on data it has
not trained on, and the evaluation's records and progress line."""
from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlwm_jax import world_model as wm
from dlwm_jax.collect import Collector, evaluate
from dlwm_jax.config import Config
from dlwm_jax.epochs import joint_epoch, warmup_epoch
from dlwm_jax.outputs import image_samples, save_images, save_learning_curve, short
from dlwm_jax.replay import Replay, generators
from dlwm_jax.run_state import (COLLECT, DIAGNOSTICS, ENVS_PER_SEED, EVALUATE, HOLDOUT_ENV, POLICY, WARMUP,
                                WORLD_MODEL, Run, add_per_seed, derived_seed, unit_key)
from dlwm_jax.seed_axis import unstack


def collect(run: Run, it: int, _first_unit: int = 0) -> None:
    """Random actions in iteration 1, the agent's at temperature 1.5 after (SPEC 8.3); one replay chunk."""
    s = run.config.schedule
    steps = s.initial_steps if it == 0 else s.steps_per_iteration
    if it == 0:
        actor = run.actor(run.programs.random_act)
    else:
        actor = run.actor(run.programs.act_collect, run.world, run.agent.params)
    trajectory, stats = run.collector.collect(actor, steps * run.num_seeds, run.keys(it, COLLECT))
    run.checkpoints.save_replay_chunk(run.meta["chunks"], trajectory._asdict())
    run.meta["chunks"] += 1
    run.add_chunk(trajectory)
    for s_ in range(run.num_seeds):
        returns = stats["episode_returns"][stats["episode_envs"] // ENVS_PER_SEED == s_]
        run.record(s_, it, "collect", {"episodes": len(returns),
                                       **({"episode_return_mean": float(np.mean(returns))} if len(returns) else {})})
    run.progress(it, "collect", steps, steps, f"{len(stats['episode_returns'])} episodes finished"
                 + (f" over {run.num_seeds} seeds" if run.num_seeds > 1 else ""), first_seed=False)


def warmup(run: Run, it: int, first_epoch: int) -> None:
    epochs = run.config.schedule.warmup_epochs
    for epoch in range(first_epoch, epochs):
        run.world, per_seed = warmup_epoch(run.programs, run.world, run.replays, run.frames, run.keys(it, WARMUP, epoch),
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
        run.world, per_seed = joint_epoch(run.programs, run.world, run.replays, run.frames,
                                          run.keys(it, WORLD_MODEL, epoch), s.vq_update_intervals[it],
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
        starts = np.stack([r.sample_stacks(rng, p.num_envs) for r, rng in zip(run.replays, rngs[i * S:])])
        run.agent, metrics = run.programs.policy_update(run.world, run.agent, run.frames, run.put(starts),
                                                        run.put(keys[i, :, 1]))
        history.append(metrics)
        if (u + 1) % report_every == 0 or u + 1 == updates:
            history = jax.device_get(history)
            per_seed = [wm.average_metrics([unstack(m, s) for m in history]) for s in range(run.num_seeds)]
            for s in range(run.num_seeds):
                run.record(s, it, "policy", {k: v for k, v in per_seed[s].items() if k != "steps"}, unit=u + 1)
            run.progress(it, "policy", u + 1, updates, short(per_seed[0]))
            history = []
            run.maybe_save(it, POLICY, u + 1)


def evaluate_agent(run: Run, it: int, _first_unit: int = 0) -> None:
    """num_eval_envs fresh seeded envs per seed, actions sampled at temperature 1 (SPEC 9); images.

    Off the critical path (background.py): the episodes and images run in a thread on a frozen copy of the world
    model and the agent while the loop goes on with the next iteration; the records, the learning curve and the
    progress line follow when the loop joins it, at its next checkpoint (or the run's end). What the work reads
    is drawn here: the replay and the state change meanwhile."""
    config, p = run.config, run.config.policy
    dream_keys = [jax.random.split(k) for k in run.keys(it, DIAGNOSTICS, 2)]  # (start key, dream key) per seed
    starts = np.stack([r.sample_stacks(k[0], p.num_envs) for r, k in zip(run.replays, dream_keys)])
    dream, *_ = run.programs.policy_update.dream(run.world, run.agent, run.frames, run.put(starts),
                                                 run.put(jnp.stack([k[1] for k in dream_keys])))
    host_world, host_agent = jax.device_get((run.world, run.agent))
    world, agent_params = run.put((host_world, host_agent.params))  # frozen: the next epochs donate run.world's buffers
    samples = [image_samples(r, unit_key(root, it, EVALUATE, 1)) for r, root in zip(run.replays, run.roots)]
    keys, seeds = run.keys(it, EVALUATE), [derived_seed(root, 1 + it) for root in run.roots]
    real_steps, wall_time = [len(r) for r in run.replays], round(run.elapsed(), 1)

    def work() -> tuple[list[dict], float]:
        began = time.time()
        results = evaluate(config.env, run.actor(run.programs.act_eval, world, agent_params), keys, seeds)
        for s, seed_dir in enumerate(run.seed_dirs):
            save_images(seed_dir, it, unstack(host_world, s), unstack(host_agent, s).params, samples[s], run.networks,
                        config)
        return results, time.time() - began

    def finish(outcome: tuple[list[dict], float]) -> None:
        results, seconds = outcome
        imagined = np.asarray(dream.rewards).sum(axis=1)  # [S, T, N] -> each dream's return [S, N]
        records = [evaluation_record(result, returns, p.horizon) for result, returns in zip(results, imagined)]
        for s, (result, record) in enumerate(zip(results, records)):
            run.record(s, it, "evaluate", record, real_steps=real_steps[s], wall_time_s=wall_time)
            run.meta["eval_histories"][s].append([real_steps[s], result["return_mean"], result["return_std"]])
            run.meta["last_evals"][s] = result
            save_learning_curve(run.seed_dirs[s], run.meta["eval_histories"][s],
                                f"{config.env.game} (seed {run.seeds[s]})")
        head = f"[iter {it + 1}/{config.schedule.num_iterations}] evaluate    {seconds:.0f}s  "
        first = f"seed {run.seeds[0]}: " if run.total_seeds > 1 else ""
        run.echo(head + first + evaluation_line(records[0], p.horizon))
        if run.num_seeds > 1:
            returns = [r["return_mean"] for r in results]
            run.echo(head + f"return over {run.num_seeds} seeds {np.mean(returns):.1f} +- {np.std(returns):.1f}")
    run.background.submit(work, finish)


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
    trajectory, _ = pool.collect(run.actor(run.programs.random_act), steps * run.num_seeds, run.keys(0, DIAGNOSTICS, 1))
    datas = [Replay(steps, ENVS_PER_SEED, (config.env.image_size,) * 2, config.env.frame_stack) for _ in run.seeds]
    add_per_seed(datas, trajectory)
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




# step(run, iteration, first unit) of each phase, in run_state.PHASES order
PHASE_STEPS = (collect, warmup, world_model, policy, evaluate_agent)
