"""Evaluates a trained run's latest checkpoint (or the random agent) and writes a real-vs-dream GIF.

    python experiments/evaluate.py --workdir=runs/Pong-0                      # 32 fresh episodes, JSON on stdout
    python experiments/evaluate.py --workdir=runs/Pong-0x5 --seed_index=all   # every seed of a multi-seed run
    python experiments/evaluate.py --workdir=runs/Pong-0 --protocol=last_eval # redo the run's own last evaluation
    python experiments/evaluate.py --policy=random --game=Pong                # the random baseline, same protocol

Protocol (collect.evaluate, SPEC 9): `--episodes` fresh envs seeded env_seed, env_seed+1, ...; each env plays
from reset until its first episode ends or `--max_steps` agent steps were taken; the agent acts as train.py
evaluates it (programs.make_act: encoder in eval mode, actions sampled at temperature 1). Statistics are
collect.episode_stats': over the finished episodes, or over the partial returns at the cap if none finished.

  --protocol=fresh (default): envs seeded --env_seed (default 12345, a seed no training run derives: train.py's
      env seeds are 31-bit hashes of the run's root key), policy key jax.random.key(env_seed); the same for every
      seed of a multi-seed run, so seeds are compared on the same envs.
  --protocol=last_eval: the key, env seed, env count and step cap of the run's own last evaluation
      (train.py: key unit_key(root, it, EVALUATE), envs derived_seed(root, 1 + it)). For a single-seed run this
      reproduces that evaluation exactly; a multi-seed run evaluated all seeds in one vmapped program, which
      agrees with this single-seed program to float tolerance (see dlwm_jax/train.py).

Output: ONE JSON object on stdout (per-episode returns, lengths, finished flags, statistics, checkpoint step and
iteration, game, env seed, parameter hashes as in summary.json); with --seed_index=all one object whose "seeds"
lists one such record per seed plus "aggregate" over seeds. Progress goes to stderr. Bad input: one line
`error: ...` on stderr and exit code 1. Nothing in the workdir is written except the video.

Video (--video, default <workdir>/play.gif, '' disables; the agent only): env --video_env (default 0) of the
(first) evaluated seed for up to --video_steps frames from its step --video_from (default 0: the episode's
start), beside a dream of the same length imagined from the encoding of its first shown observation (the newest
frame replicated to a stack, as at an episode's start) with the agent's policy, decoded with the decoder's continuous Bernoulli mean (newest frame of the
stack). A green (red) bar under a half marks a positive (negative) reward of that step; the caption gives the
step and each side's return so far.

Probe (--branch_at=T, the agent only; no evaluation, no video): does the world model know what would happen, and
does the policy take the way it knows? Env --video_env of the (first) evaluated seed plays its episode to step T
as in the evaluation; then K copies of that env (same seed) replay its T actions, are checked to show the very
same observation T, and each plays one branch for --branch_steps steps, the policy sampling at
--branch_temperature: `policy` (--branch_samples copies), `hold a` (action a every step) and `hold a, then
policy` (a for --branch_hold steps) for every action a. The dream side imagines each branch --branch_samples
times from observation T's encoding (the evaluation's 4-frame stack), the scripted steps forced
(imagination.imagine's `actions`). JSON "branches": per branch the real returns, clipped real returns, the step
of the first real reward (-1: none) and whether the episode ended, and the mean clipped dreamed return; stderr
gets a table. A branch that scores in reality and in dreams but is not the policy's: the policy's fault; one
that scores in reality only: the world model's.
"""
import json
import os
import sys
import time

import jax
from absl import flags, logging

import cli  # experiments/cli.py
from dlwm_jax import config as config_lib, envs, probe
from dlwm_jax.checkpoint import CheckpointError
from dlwm_jax.collect import random_policy
from dlwm_jax.networks import make_networks
from dlwm_jax.outputs import state_hashes
from dlwm_jax.probe import InputError
from dlwm_jax.programs import make_act
from dlwm_jax.results import aggregate
from dlwm_jax.seed_axis import DEFAULT_COMPILATION_CACHE, unstack, use_compilation_cache

flags.DEFINE_string("workdir", None, "Run directory written by experiments/train.py (single or multi-seed).")
flags.DEFINE_string("seed_index", "0", "Which seed of a multi-seed run (0 .. num_seeds-1), or 'all'.")
flags.DEFINE_enum("policy", "agent", ["agent", "random"], "The trained agent, or uniform random actions.")
flags.DEFINE_enum("protocol", "fresh", ["fresh", "last_eval"],
                  "fresh: --episodes envs seeded --env_seed; last_eval: the run's own last evaluation (keys, envs).")
flags.DEFINE_string("game", None, "Without --workdir (random policy only): the Atari game.")
flags.DEFINE_string("preset", "paper", "Without --workdir: the config preset whose env settings apply.")
flags.DEFINE_integer("episodes", None, "Number of evaluation envs, one episode each (default env.num_eval_envs).")
flags.DEFINE_integer("env_seed", 12345, "Env i is seeded env_seed + i; the policy key is jax.random.key(env_seed).")
flags.DEFINE_integer("max_steps", None, "Cap on agent steps per env (default env.eval_cap: eval_max_steps, or the episode cap).")
flags.DEFINE_string("video", None, "GIF of a real episode beside a dream (default <workdir>/play.gif; '' = none).")
flags.DEFINE_integer("video_steps", 300, "At most this many frames in the video.")
flags.DEFINE_integer("video_env", 0, "Which env (episode) of the first evaluated seed the video shows.")
flags.DEFINE_integer("video_from", 0, "The video starts at this step of its episode.")
flags.DEFINE_integer("branch_at", None, "Probe instead of evaluating: at this step of env --video_env's episode, "
                     "play the branches (see the module doc) in reality and in dreams.")
flags.DEFINE_integer("branch_steps", 100, "Steps of each branch.")
flags.DEFINE_integer("branch_hold", 25, "Steps an action is held before the policy takes over ('hold a, then policy').")
flags.DEFINE_integer("branch_samples", 8, "Real episodes of the 'policy' branch, and dreams per branch.")
flags.DEFINE_float("branch_temperature", 1.0, "The policy's temperature in the branches, real and dreamed (1: as "
                   "evaluated; the run's collect_temperature: as it collects).")
flags.DEFINE_string("compilation_cache", DEFAULT_COMPILATION_CACHE,
                    "Directory of JAX's persistent compilation cache ('' disables it).")
FLAGS = flags.FLAGS


def echo(message: str) -> None:
    print(f"evaluate: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ main

def check_flags() -> None:
    """Flag values that are wrong whatever the workdir holds."""
    if FLAGS.episodes is not None and FLAGS.episodes < 1:
        raise InputError(f"--episodes must be >= 1, got {FLAGS.episodes}")
    if FLAGS.max_steps is not None and FLAGS.max_steps < 1:
        raise InputError(f"--max_steps must be >= 1, got {FLAGS.max_steps}")
    if FLAGS.video_steps < 1:
        raise InputError(f"--video_steps must be >= 1, got {FLAGS.video_steps}")
    if FLAGS.video_env < 0 or FLAGS.video_from < 0:
        raise InputError(f"--video_env and --video_from must be >= 0, got {FLAGS.video_env} and {FLAGS.video_from}")
    if FLAGS.protocol == "last_eval" and any(FLAGS[name].present for name in ("episodes", "env_seed", "max_steps")):
        raise InputError("--protocol=last_eval uses the run's own envs, seed and step cap; "
                         "drop --episodes/--env_seed/--max_steps or use --protocol=fresh")
    if FLAGS.branch_at is not None:
        if FLAGS.branch_at < 1 or FLAGS.branch_steps < 1 or FLAGS.branch_hold < 0 or FLAGS.branch_samples < 1 \
                or not FLAGS.branch_temperature > 0:
            raise InputError("--branch_at, --branch_steps and --branch_samples must be >= 1, --branch_hold >= 0 "
                             "and --branch_temperature > 0")
        if FLAGS.policy == "random" or FLAGS.seed_index == "all":
            raise InputError("--branch_at probes one seed's agent: drop --policy=random / --seed_index=all")
    if FLAGS.policy == "random" and FLAGS.video:
        raise InputError("--video shows the agent and its dream; it needs --policy=agent")
    if FLAGS.workdir is None:
        if FLAGS.policy == "agent":
            raise InputError("--workdir is required for --policy=agent")
        if FLAGS.protocol == "last_eval":
            raise InputError("--protocol=last_eval needs --workdir")
        if not FLAGS.game:
            raise InputError("--policy=random without --workdir needs --game (and --preset, default paper)")
    elif FLAGS.game or FLAGS["preset"].present:
        raise InputError("--game/--preset are taken from the checkpoint when --workdir is given")


def load_run():
    """(config, step, meta, num_seeds, JSON header): from the workdir's latest checkpoint, or (random policy
    without a workdir) from --game and --preset with step, meta and num_seeds None."""
    if FLAGS.workdir is None:
        config = config_lib.override(config_lib.get_preset(FLAGS.preset), {"env.game": FLAGS.game})
        return config, None, None, None, {"game": envs.check_game(config.env.game), "preset": FLAGS.preset}
    step, meta = probe.read_meta(FLAGS.workdir)
    config = config_lib.from_dict(meta["config"])
    num_seeds = meta.get("num_seeds")  # None: the older one-seed checkpoint format
    header = probe.describe_checkpoint(FLAGS.workdir, step, meta, config)
    echo(f"checkpoint {step} of {FLAGS.workdir}: {config.env.game}, {meta['iteration']}/"
         f"{config.schedule.num_iterations} iterations done" + (f", {num_seeds} seeds" if num_seeds else ""))
    return config, step, meta, num_seeds, header


def seed_indices(num_seeds: int) -> list[int]:
    if FLAGS.seed_index == "all":
        return list(range(num_seeds))
    try:
        index = int(FLAGS.seed_index)
    except ValueError:
        raise InputError(f"--seed_index must be an integer or 'all', got {FLAGS.seed_index!r}") from None
    if not 0 <= index < num_seeds:
        raise InputError(f"--seed_index={index} is out of range: the run has {num_seeds} seed(s), "
                         f"indices 0..{num_seeds - 1}")
    return [index]


def evaluate_run() -> dict:
    check_flags()
    config, step, meta, num_seeds, header = load_run()
    # A run's checkpoint holds its resolved compute config: its formulations and PRNG, so the same keys as train.py
    # drew. A preset's (random policy without a workdir) is resolved for this backend, as a new run would be.
    config = config_lib.resolve_compute(config)
    jax.config.update("jax_threefry_partitionable", config.compute.threefry_partitionable)
    num_actions = envs.num_actions(config.env.game)
    seeds = [config.seed + i for i in range(num_seeds or 1)]
    indices = seed_indices(len(seeds))
    evaluated = probe.last_evaluated_iteration(meta, step) if FLAGS.protocol == "last_eval" else None
    protocol = lambda index: probe.protocol(config, seeds[index], evaluated, FLAGS.env_seed, FLAGS.episodes,
                                            FLAGS.max_steps)
    agent_policy = FLAGS.policy == "agent"
    video = FLAGS.video if FLAGS.video is not None else (
        os.path.join(FLAGS.workdir, "play.gif") if agent_policy else "")
    if video and not os.path.isdir(os.path.dirname(os.path.abspath(video))):  # fail before minutes of evaluation
        raise InputError(f"--video={video!r}: directory {os.path.dirname(os.path.abspath(video))!r} does not exist")
    if agent_policy:
        echo("restoring the agent")
        state = probe.restore_state(FLAGS.workdir, step, config, num_actions, num_seeds)
        networks = make_networks(config, num_actions)
        act = jax.jit(make_act(networks, 1.0))
    if FLAGS.branch_at is not None:
        index = indices[0]
        world, agent = state if num_seeds is None else unstack(state, index)
        branches = probe.branch_probe(config, protocol(index), world, agent, networks, act, FLAGS.video_env,
                                      FLAGS.branch_at, FLAGS.branch_steps, FLAGS.branch_hold, FLAGS.branch_samples,
                                      FLAGS.branch_temperature, echo=echo)
        return {"policy": "agent", "protocol": FLAGS.protocol, **header, "seed_index": index, "seed": seeds[index],
                "env": FLAGS.video_env, "branch_at": FLAGS.branch_at, "branch_steps": FLAGS.branch_steps,
                "branch_hold": FLAGS.branch_hold, "branch_temperature": FLAGS.branch_temperature,
                "branches": branches}

    records, video_info = [], None
    for index in indices:
        p = protocol(index)
        record = {"seed_index": index, "seed": seeds[index], "env_seed": p.env_seed, "episodes": p.num_envs,
                  "max_steps": p.max_steps}
        if evaluated is not None:
            record["evaluated_iteration"] = evaluated + 1
            history = meta["eval_histories"][index] if num_seeds else meta["eval_history"]
            if evaluated < len(history):  # [real steps, return mean, return std] the run logged for it
                record["run_return_mean"] = history[evaluated][1]
        if agent_policy:
            world, agent = state if num_seeds is None else unstack(state, index)
            policy_fn = lambda obs, key, w=world, a=agent.params: act(w, a, obs, key)
            record["hashes"] = state_hashes(world, agent.params)
        else:
            policy_fn = random_policy(num_actions)
        label = f"seed {seeds[index]}" if num_seeds else "run"
        echo(f"{label}: {p.num_envs} episodes, at most {p.max_steps} steps each, envs seeded {p.env_seed}..")
        started = time.time()
        want_video = bool(video) and video_info is None  # the first evaluated seed's env --video_env
        if want_video and FLAGS.video_env >= p.num_envs:
            raise InputError(f"--video_env={FLAGS.video_env} is out of range: {p.num_envs} envs are evaluated")
        per_episode, stats, tap = probe.play(config, policy_fn, p.key, p.env_seed, p.num_envs, p.max_steps,
                                             FLAGS.video_steps if want_video else 0, label, FLAGS.video_env,
                                             FLAGS.video_from, echo=echo)
        echo(f"{label}: return {stats['return_mean']:.2f} +- {stats['return_std']:.2f} "
             f"({stats['num_finished']}/{p.num_envs} episodes finished) in {time.time() - started:.1f}s")
        returns, lengths, finished = per_episode[:3]  # first_episodes' (returns, lengths, finished, ...)
        record.update(returns=returns.tolist(), lengths=lengths.tolist(), finished=finished.tolist())
        record.update(stats)
        if want_video and not tap.frames:
            raise InputError(f"--video_from={FLAGS.video_from}: env {FLAGS.video_env}'s episode lasted "
                             f"{int(lengths[FLAGS.video_env])} steps (the step cap is {p.max_steps})")
        if want_video:
            written = probe.write_video(video, tap, world, agent, networks, p.dream_key)
            echo(f"video: {written['frames']} frames (real | dream) -> {video}")
            video_info = {**written, "seed_index": index, "env": FLAGS.video_env, "from_step": FLAGS.video_from}
        records.append(record)

    result = {"policy": FLAGS.policy, "protocol": FLAGS.protocol, **header}
    if FLAGS.seed_index == "all" and num_seeds:
        result.update(seeds=records, aggregate=aggregate([r["return_mean"] for r in records]))
    else:
        result.update(records[0])
    result["video"] = video_info
    return result


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.compilation_cache:
        use_compilation_cache(FLAGS.compilation_cache)
    try:
        result = evaluate_run()
    except (ValueError, OSError, CheckpointError) as e:
        cli.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli.run(main)
