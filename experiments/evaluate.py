"""Evaluates a trained run's latest checkpoint (or the random agent) and writes a real-vs-dream GIF.

    python experiments/evaluate.py --workdir=runs/Pong-0                      # 32 fresh episodes, JSON on stdout
    python experiments/evaluate.py --workdir=runs/Pong-0x5 --seed_index=all   # every seed of a multi-seed run
    python experiments/evaluate.py --workdir=runs/Pong-0 --protocol=last_eval # redo the run's own last evaluation
    python experiments/evaluate.py --policy=random --game=Pong                # the random baseline, same protocol

Protocol (collect.evaluate, SPEC 9): `--episodes` fresh envs seeded env_seed, env_seed+1, ...; each env plays
from reset until its first episode ends or `--max_steps` agent steps were taken; the agent acts as train.py
evaluates it (train.make_act: encoder in eval mode, actions sampled at temperature 1). Statistics are
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

import numpy as np
from absl import flags, logging

import cli  # experiments/cli.py

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
flags.DEFINE_string("compilation_cache", os.path.expanduser("~/.cache/dlwm_jax/xla"),
                    "Directory of JAX's persistent compilation cache ('' disables it).")
FLAGS = flags.FLAGS

FRESH_KEY_PURPOSE_DREAM = 2**31  # the fresh protocol's dream key: fold_in(key(env_seed), this), apart from acting
SEPARATOR = 2      # pixels between real and dream
SEPARATOR_RGB = (40, 110, 230)  # blue: apart from the gray frames and the green/red reward bars
CAPTION = 12       # pixels of caption under each frame


class InputError(ValueError):
    """Bad flags or workdir: reported as one line."""


def echo(message: str) -> None:
    print(f"evaluate: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ checkpoint

def read_meta(workdir: str) -> tuple[int, dict]:
    """(latest checkpoint step, its meta) of a train.py workdir, read without writing anything."""
    if not os.path.isdir(workdir):
        raise InputError(f"workdir {workdir!r} does not exist")
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise InputError(f"no checkpoint in workdir {workdir!r} (no checkpoints/ directory)")
    if os.path.isdir(os.path.join(directory, "process_0")):
        raise InputError(f"workdir {workdir!r} holds a multi-process run (checkpoints/process_*); evaluate.py reads "
                         "one-process runs only so far")
    from dlwm_jax.checkpoint import Checkpointer, CheckpointError
    checkpoints = Checkpointer(directory, read_only=True)
    step = checkpoints.latest_step()
    if step is None:
        raise InputError(f"no checkpoint in workdir {workdir!r} ({directory} holds no complete checkpoint)")
    meta = checkpoints.restore_meta(step)
    if not isinstance(meta, dict) or "config" not in meta or "iteration" not in meta:
        raise CheckpointError(f"checkpoint {os.path.join(directory, str(step))} has no run meta (config, iteration)")
    return step, meta


def restore_state(workdir: str, step: int, config, num_actions: int, num_seeds: int | None):
    """The checkpoint's (world, agent), stacked [S, ...] as train.py saves it; num_seeds None: a checkpoint of the
    older one-seed format (unstacked)."""
    import jax
    from dlwm_jax.checkpoint import Checkpointer
    from dlwm_jax.train import initial_state, stack

    def template():
        if num_seeds is None:
            return initial_state(config, num_actions, config.seed)
        states = [initial_state(config, num_actions, config.seed + s) for s in range(num_seeds)]
        return stack([w for w, _ in states]), stack([a for _, a in states])
    # Shapes only: restore needs the tree structure and ShapeDtypeStructs, not the initial values.
    state, _ = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).restore(step, jax.eval_shape(template))
    return state


def last_evaluated_iteration(meta: dict, step: int) -> int:
    """0-based iteration whose evaluation saw exactly this checkpoint's state; InputError if none did."""
    from dlwm_jax.train import COLLECT, EVALUATE, PHASES
    iteration, phase = meta["iteration"], meta["phase"]
    if phase == COLLECT and iteration >= 1:
        return iteration - 1  # saved right after iteration's evaluation, before the next collection
    if phase == EVALUATE:
        return iteration
    raise InputError(f"--protocol=last_eval: checkpoint {step} was saved in phase {PHASES[phase]} of iteration "
                     f"{iteration + 1}, after its state changed since the last evaluation; use --protocol=fresh")


# ------------------------------------------------------------------------------------------ playing

class EnvTap:
    """Passes an EnvPool through to collect.first_episodes; prints progress and keeps env `record_env`'s first
    episode from its step `record_from` on (newest frames [T] and rewards [T], frame t = observation t's, reward
    t = the step taken from it) for at most `record_frames` frames."""

    def __init__(self, env, record_frames: int, max_steps: int, label: str, record_env: int = 0, record_from: int = 0,
                 every_s: float = 20.0):
        self.env, self.record_frames, self.max_steps = env, record_frames, max_steps
        self.label, self.every_s, self.record_env, self.record_from = label, every_s, record_env, record_from
        self.frames, self.rewards, self.actions = [], [], []  # actions: env record_env's, every step
        self.recording = record_frames > 0 and record_from == 0
        self.waiting = record_frames > 0 and record_from > 0
        self.steps, self.start = 0, time.time()
        self.last_echo = self.start
        self.finished = None

    def reset(self):
        from dlwm_jax import envs
        obs, info = self.env.reset()
        self.finished = None
        if self.recording:
            self.frames.append(envs.frames_of(obs)[self.record_env].copy())
        return obs, info

    def step(self, actions):
        from dlwm_jax import envs
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self.actions.append(int(actions[self.record_env]))
        done = terminated | truncated
        self.finished = done.copy() if self.finished is None else self.finished | done
        e = self.record_env
        if self.recording:
            self.rewards.append(float(reward[e]))
            if done[e] or len(self.frames) == self.record_frames:
                self.recording = False
            else:
                self.frames.append(envs.frames_of(obs)[e].copy())
        self.steps += 1
        if self.waiting and self.steps == self.record_from:
            self.waiting = False
            if not self.finished[e]:  # the episode is still on: observation record_from is the first frame
                self.recording = True
                self.frames.append(envs.frames_of(obs)[e].copy())
        if time.time() - self.last_echo >= self.every_s:
            self.last_echo = time.time()
            echo(f"{self.label}: step {self.steps}/{self.max_steps}, {int(np.sum(self.finished))}/{len(done)} "
                 f"episodes finished, {time.time() - self.start:.0f}s")
        return obs, reward, terminated, truncated, info

    def close(self):
        self.env.close()


def play(config, policy_fn, key, env_seed: int, num_envs: int, max_steps: int, record_frames: int, label: str,
         record_env: int = 0, record_from: int = 0):
    """collect.evaluate's protocol, per episode: (first_episodes' (returns, lengths, finished, ...) [N],
    episode_stats' dict, EnvTap).

    The same calls as collect.evaluate (make_env(seed), step keys split(key, max_steps), first_episodes,
    episode_stats), kept open to return the per-episode arrays and env record_env's frames."""
    import jax
    from dlwm_jax import envs
    from dlwm_jax.collect import episode_stats, first_episodes
    tap = EnvTap(envs.make_env(config.env, num_envs, env_seed), record_frames, max_steps, label, record_env, record_from)
    per_episode = first_episodes(tap, config.env, policy_fn, list(jax.random.split(key, max_steps)))
    return per_episode, episode_stats(*per_episode), tap


# ------------------------------------------------------------------------------------------ video

def dream_of(world, agent, networks, start_frame, horizon: int, key):
    """Imagines `horizon` steps from the encoding of an episode's first observation (start_frame [96, 96]
    replicated as collect does); returns (decoded newest frames [T, 96, 96] in [0, 1], rewards [T])."""
    from dlwm_jax import envs
    from dlwm_jax.outputs import decode_mean, dream as _dream, encode
    start = envs.initial_stack(start_frame[None], world.config.env.frame_stack)
    start_indices, _ = encode(world, start)
    dream = _dream(dynamics=networks.dream_dynamics, actor_critic=networks.actor_critic,
                   dynamics_params={"params": world.dynamics_params}, policy_params=agent.params,
                   embeddings=world.codebook.embeddings, start_indices=start_indices, key=key, horizon=horizon)
    decoded = decode_mean(networks.decoder, world.decoder_params, world.codebook.embeddings[dream.indices[:, 0]])
    return np.asarray(decoded[..., -1]), np.asarray(dream.rewards[:, 0])


def side_by_side(real, real_rewards, dream, dream_rewards):
    """real uint8 [T, 96, 96], dream float [T, 96, 96] in [0, 1], rewards [T] -> GIF frames uint8
    [T, 96 + CAPTION, 2 * 96 + SEPARATOR, 3]: real | dream with viz.dream_frames' reward bars, and a caption
    with the step and both returns so far (it also keeps consecutive frames distinct, so none are merged)."""
    from PIL import Image, ImageDraw, ImageFont
    from dlwm_jax import viz
    t, h, w = real.shape
    # +0.5 so that dream_frames' float -> uint8 truncation gives back the exact real pixel values
    halves = viz.dream_frames(np.stack([(real + 0.5) / 255.0, dream], 1), np.stack([real_rewards, dream_rewards], 1))
    halves = halves.reshape(t, h, 2, w, 3)
    separator = np.broadcast_to(np.array(SEPARATOR_RGB, np.uint8), (t, h, SEPARATOR, 3))
    frames = np.concatenate([halves[:, :, 0], separator, halves[:, :, 1]], 2)
    font = ImageFont.load_default()
    real_returns, dream_returns = np.cumsum(real_rewards), np.cumsum(dream_rewards)
    captions = []
    for i in range(t):
        caption = Image.new("RGB", (frames.shape[2], CAPTION))
        ImageDraw.Draw(caption).text((2, 0), f"{i + 1}/{t}  real {real_returns[i]:+g}  dream {dream_returns[i]:+g}",
                                     fill=(255, 255, 255), font=font)
        captions.append(np.asarray(caption))
    return np.concatenate([frames, np.stack(captions)], 1)


# ------------------------------------------------------------------------------------------ probe

def branch_actions(num_actions: int, samples: int, steps: int, hold: int) -> tuple[np.ndarray, list[str]]:
    """The probe's branches: (forced actions int [steps, K], -1 = the policy acts; the branch name of each column:
    `samples` columns 'policy', then 'hold a' and 'hold a, then policy' for every action a)."""
    columns, names = [np.full(steps, -1)] * samples, ["policy"] * samples
    for a in range(num_actions):
        columns.append(np.full(steps, a))
        names.append(f"hold {a}")
        columns.append(np.where(np.arange(steps) < hold, a, -1))
        names.append(f"hold {a}, then policy")
    return np.stack(columns, 1).astype(np.int32), names


def probe(config, p: dict, world, agent, networks, act, env_index: int, at: int, steps: int, hold: int,
          samples: int, temperature: float) -> list[dict]:
    """The --branch_at probe (module doc) for one seed's evaluation protocol p; returns one dict per branch.
    act: the evaluation's policy (to reach step `at`); the branches sample at `temperature`."""
    import jax
    import jax.numpy as jnp
    from dlwm_jax import envs
    from dlwm_jax.collect import first_episodes
    from dlwm_jax.outputs import dream as imagine_jit, encode
    from dlwm_jax.train import make_act
    if at >= p["max_steps"]:
        raise InputError(f"--branch_at={at} is not before the evaluation's step cap {p['max_steps']}")
    policy_fn = lambda obs, key: act(world, agent.params, obs, key)
    tap = EnvTap(envs.make_env(config.env, p["num_envs"], p["env_seed"]), 1, p["max_steps"], "to the branch point",
                 env_index, at)
    lengths = first_episodes(tap, config.env, policy_fn, list(jax.random.split(p["key"], p["max_steps"]))[:at])[1]
    if not tap.frames:
        raise InputError(f"--branch_at={at}: env {env_index}'s episode lasted {int(lengths[env_index])} steps")
    forced, names = branch_actions(envs.num_actions(config.env.game), samples, steps, hold)
    k = forced.shape[1]
    pool = envs.make_env(config.env, 1, [p["env_seed"] + env_index] * k)  # K copies of env env_index
    obs, _ = pool.reset()
    stack = envs.initial_stack(envs.frames_of(obs), config.env.frame_stack)
    not_first = np.zeros(k, bool)
    for a in tap.actions[:at]:
        obs, *_ = pool.step(np.full(k, a, np.int32))
        stack = envs.push_frame(stack, envs.frames_of(obs), not_first)
    if not (envs.frames_of(obs) == tap.frames[0]).all():
        raise RuntimeError(f"the replayed copies of env {env_index} do not show its observation {at}")
    echo(f"branching at step {at} of env {env_index}: {k} real branches and {k * samples} dreams of {steps} steps")
    branch_act = jax.jit(make_act(networks, temperature))
    branch_key, dream_key = jax.random.split(jax.random.fold_in(p["dream_key"], at))
    start = stack
    returns, clipped, ended = np.zeros(k), np.zeros(k), np.zeros(k, bool)
    first_reward = np.full(k, -1)  # the branch step of the first real reward, -1: none
    for t, key in enumerate(jax.random.split(branch_key, steps)):
        policy = np.asarray(branch_act(world, agent.params, jnp.asarray(stack), key))
        actions = np.where(forced[t] >= 0, forced[t], policy)
        obs, reward, terminated, truncated, _ = pool.step(actions.astype(np.int32))
        returns += np.where(ended, 0.0, reward)
        clipped += np.where(ended, 0.0, np.sign(reward))
        first_reward = np.where((first_reward < 0) & ~ended & (reward != 0), t, first_reward)
        ended |= terminated | truncated
        stack = envs.push_frame(stack, envs.frames_of(obs), not_first)
    pool.close()
    start_indices, _ = encode(world, jnp.asarray(start))
    dream = imagine_jit(
        networks.dream_dynamics, networks.actor_critic, {"params": world.dynamics_params}, agent.params,
        world.codebook.embeddings, jnp.tile(start_indices, (samples, 1, 1)), dream_key, steps,
        temperature=temperature, actions=jnp.asarray(np.tile(forced, (1, samples))))
    dreamed = np.asarray(dream.rewards).sum(0).reshape(samples, k)  # [dream sample, branch]
    rows = []
    for name in dict.fromkeys(names):
        cols = [i for i, n in enumerate(names) if n == name]
        rows.append({"branch": name, "real_returns": returns[cols].tolist(), "real_clipped": clipped[cols].tolist(),
                     "first_reward_step": first_reward[cols].tolist(), "ended": ended[cols].tolist(),
                     "dream_clipped_mean": float(dreamed[:, cols].mean())})
        hits = first_reward[cols][first_reward[cols] >= 0]
        echo(f"  {name:<24} real {np.mean(returns[cols]):8.1f} (clipped {np.mean(clipped[cols]):5.2f}, first reward at "
             f"step {int(hits.min()) if len(hits) else '-':>4})   dream clipped {rows[-1]['dream_clipped_mean']:5.2f}")
    return rows


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
    from dlwm_jax import config as config_lib, envs
    from dlwm_jax.train import PHASES
    if FLAGS.workdir is None:
        config = config_lib.override(config_lib.get_preset(FLAGS.preset), {"env.game": FLAGS.game})
        return config, None, None, None, {"game": envs.check_game(config.env.game), "preset": FLAGS.preset}
    step, meta = read_meta(FLAGS.workdir)
    config = config_lib.from_dict(meta["config"])
    num_seeds = meta.get("num_seeds")  # None: the older one-seed checkpoint format
    s = config.schedule
    header = {"game": envs.check_game(config.env.game), "workdir": os.path.abspath(FLAGS.workdir),
              "checkpoint_step": step, "iterations_completed": meta["iteration"], "next_phase": PHASES[meta["phase"]],
              "real_steps": s.initial_steps + s.steps_per_iteration * (meta["chunks"] - 1) if meta["chunks"] else 0}
    echo(f"checkpoint {step} of {FLAGS.workdir}: {config.env.game}, {meta['iteration']}/{s.num_iterations} "
         f"iterations done" + (f", {num_seeds} seeds" if num_seeds else ""))
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


def protocol(config, seed: int, evaluated_iteration: int | None) -> dict:
    """The evaluation's policy key, env seed, env count and step cap, and the dream's key, for one seed."""
    import jax
    from dlwm_jax.train import EVALUATE, derived_seed, unit_key
    if evaluated_iteration is not None:  # train.py's evaluation of that iteration
        root = jax.random.key(seed)
        return dict(key=unit_key(root, evaluated_iteration, EVALUATE),
                    env_seed=derived_seed(root, 1 + evaluated_iteration),
                    num_envs=config.env.num_eval_envs, max_steps=config.env.eval_cap,
                    dream_key=unit_key(root, evaluated_iteration, EVALUATE, 2))  # unit 1: train.py's images
    key = jax.random.key(FLAGS.env_seed)
    return dict(key=key, env_seed=FLAGS.env_seed, num_envs=FLAGS.episodes or config.env.num_eval_envs,
                max_steps=FLAGS.max_steps or config.env.eval_cap,
                dream_key=jax.random.fold_in(key, FRESH_KEY_PURPOSE_DREAM))


def write_video(path: str, tap: EnvTap, world, agent, networks, dream_key) -> dict:
    from dlwm_jax import viz
    real_rewards = np.asarray(tap.rewards, np.float32)
    real = np.stack(tap.frames[:len(real_rewards)])  # at the step cap the last frame has no step
    dream, dream_rewards = dream_of(world, agent, networks, real[0], len(real), dream_key)
    viz.save_gif(path, side_by_side(real, real_rewards, dream, dream_rewards))
    echo(f"video: {len(real)} frames (real | dream) -> {path}")
    return {"path": os.path.abspath(path), "frames": len(real), "real_return": float(real_rewards.sum()),
            "dream_return": float(dream_rewards.sum())}


def evaluate_run() -> dict:
    import jax
    from dlwm_jax import config as config_lib, envs
    from dlwm_jax.collect import random_policy
    from dlwm_jax.networks import make_networks
    from dlwm_jax.outputs import params_hash
    from dlwm_jax.results import aggregate
    from dlwm_jax.train import make_act, unstack

    check_flags()
    config, step, meta, num_seeds, header = load_run()
    # A run's checkpoint holds its resolved compute config: its formulations and PRNG, so the same keys as train.py
    # drew. A preset's (random policy without a workdir) is resolved for this backend, as a new run would be.
    config = config_lib.resolve_compute(config)
    jax.config.update("jax_threefry_partitionable", config.compute.threefry_partitionable)
    num_actions = envs.num_actions(config.env.game)
    seeds = [config.seed + i for i in range(num_seeds or 1)]
    indices = seed_indices(len(seeds))
    evaluated = last_evaluated_iteration(meta, step) if FLAGS.protocol == "last_eval" else None
    agent_policy = FLAGS.policy == "agent"
    video = FLAGS.video if FLAGS.video is not None else (
        os.path.join(FLAGS.workdir, "play.gif") if agent_policy else "")
    if video and not os.path.isdir(os.path.dirname(os.path.abspath(video))):  # fail before minutes of evaluation
        raise InputError(f"--video={video!r}: directory {os.path.dirname(os.path.abspath(video))!r} does not exist")
    if agent_policy:
        echo("restoring the agent")
        state = restore_state(FLAGS.workdir, step, config, num_actions, num_seeds)
        networks = make_networks(config, num_actions)
        act = jax.jit(make_act(networks, 1.0))
    if FLAGS.branch_at is not None:
        index = indices[0]
        world, agent = state if num_seeds is None else unstack(state, index)
        branches = probe(config, protocol(config, seeds[index], evaluated), world, agent, networks, act,
                         FLAGS.video_env, FLAGS.branch_at, FLAGS.branch_steps, FLAGS.branch_hold, FLAGS.branch_samples,
                         FLAGS.branch_temperature)
        return {"policy": "agent", "protocol": FLAGS.protocol, **header, "seed_index": index, "seed": seeds[index],
                "env": FLAGS.video_env, "branch_at": FLAGS.branch_at, "branch_steps": FLAGS.branch_steps,
                "branch_hold": FLAGS.branch_hold, "branch_temperature": FLAGS.branch_temperature,
                "branches": branches}

    records, video_info = [], None
    for index in indices:
        p = protocol(config, seeds[index], evaluated)
        record = {"seed_index": index, "seed": seeds[index], "env_seed": p["env_seed"], "episodes": p["num_envs"],
                  "max_steps": p["max_steps"]}
        if evaluated is not None:
            record["evaluated_iteration"] = evaluated + 1
            history = meta["eval_histories"][index] if num_seeds else meta["eval_history"]
            if evaluated < len(history):  # [real steps, return mean, return std] the run logged for it
                record["run_return_mean"] = history[evaluated][1]
        if agent_policy:
            world, agent = state if num_seeds is None else unstack(state, index)
            policy_fn = lambda obs, key, w=world, a=agent.params: act(w, a, obs, key)
            record["hashes"] = {"encoder": params_hash((world.encoder_params, world.encoder_batch_stats)),
                                "decoder": params_hash(world.decoder_params), "codebook": params_hash(world.codebook),
                                "dynamics": params_hash(world.dynamics_params), "policy": params_hash(agent.params)}
        else:
            policy_fn = random_policy(num_actions)
        label = f"seed {seeds[index]}" if num_seeds else "run"
        echo(f"{label}: {p['num_envs']} episodes, at most {p['max_steps']} steps each, envs seeded {p['env_seed']}..")
        started = time.time()
        want_video = bool(video) and video_info is None  # the first evaluated seed's env --video_env
        if want_video and FLAGS.video_env >= p["num_envs"]:
            raise InputError(f"--video_env={FLAGS.video_env} is out of range: {p['num_envs']} envs are evaluated")
        per_episode, stats, tap = play(config, policy_fn, p["key"], p["env_seed"], p["num_envs"], p["max_steps"],
                                       FLAGS.video_steps if want_video else 0, label, FLAGS.video_env, FLAGS.video_from)
        echo(f"{label}: return {stats['return_mean']:.2f} +- {stats['return_std']:.2f} "
             f"({stats['num_finished']}/{p['num_envs']} episodes finished) in {time.time() - started:.1f}s")
        returns, lengths, finished = per_episode[:3]  # first_episodes' (returns, lengths, finished, ...)
        record.update(returns=returns.tolist(), lengths=lengths.tolist(), finished=finished.tolist())
        record.update(stats)
        if want_video and not tap.frames:
            raise InputError(f"--video_from={FLAGS.video_from}: env {FLAGS.video_env}'s episode lasted "
                             f"{int(lengths[FLAGS.video_env])} steps (the step cap is {p['max_steps']})")
        if want_video:
            video_info = {**write_video(video, tap, world, agent, networks, p["dream_key"]), "seed_index": index,
                          "env": FLAGS.video_env, "from_step": FLAGS.video_from}
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
        import jax
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from dlwm_jax.checkpoint import CheckpointError
    try:
        result = evaluate_run()
    except (ValueError, OSError, CheckpointError) as e:
        cli.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli.run(main)
