"""A trained run looked at from outside (experiments/evaluate.py is its command line): its latest checkpoint restored
read-only, its evaluation protocol (train.py's own, or fresh seeded envs), episodes played as collect.evaluate plays
them but with the per-episode arrays and one env's frames kept, that env's episode beside a dream of it, and the
counterfactual branch probe (`probe`: does the world model know what would happen, and does the policy take the
way it knows?). Nothing here writes into the workdir; progress lines go to an `echo` callable.
"""
from __future__ import annotations

import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dlwm_jax import envs, outputs, viz
from dlwm_jax.checkpoint import Checkpointer, CheckpointError
from dlwm_jax.collect import episode_stats, first_episodes, policy_actor
from dlwm_jax.programs import initial_state, make_act
from dlwm_jax.run_state import COLLECT, EVALUATE, PHASES, derived_seed, unit_key
from dlwm_jax.seed_axis import stack

FRESH_KEY_PURPOSE_DREAM = 2**31  # the fresh protocol's dream key: fold_in(key(env_seed), this), apart from acting
SEPARATOR = 2      # pixels between real and dream
SEPARATOR_RGB = (40, 110, 230)  # blue: apart from the gray frames and the green/red reward bars
CAPTION = 12       # pixels of caption under each frame


class InputError(ValueError):
    """Bad arguments or workdir: experiments/evaluate.py reports the message as one line."""


def quiet(message: str) -> None:
    """The default echo: progress lines are dropped."""


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
    checkpoints = Checkpointer(directory, read_only=True)
    step = checkpoints.latest_step()
    if step is None:
        raise InputError(f"no checkpoint in workdir {workdir!r} ({directory} holds no complete checkpoint)")
    meta = checkpoints.restore_meta(step)
    if not isinstance(meta, dict) or "config" not in meta or "iteration" not in meta:
        raise CheckpointError(f"checkpoint {os.path.join(directory, str(step))} has no run meta (config, iteration)")
    return step, meta


def describe_checkpoint(workdir: str, step: int, meta: dict, config) -> dict:
    """A checkpoint's JSON header: game, workdir, step, iterations completed, the phase it resumes with and the real
    interactions its replay holds."""
    s = config.schedule
    return {"game": envs.check_game(config.env.game), "workdir": os.path.abspath(workdir),
            "checkpoint_step": step, "iterations_completed": meta["iteration"], "next_phase": PHASES[meta["phase"]],
            "real_steps": s.initial_steps + s.steps_per_iteration * (meta["chunks"] - 1) if meta["chunks"] else 0}


def restore_state(workdir: str, step: int, config, num_actions: int, num_seeds: int | None):
    """The checkpoint's (world, agent), stacked [S, ...] as train.py saves it; num_seeds None: a checkpoint of the
    older one-seed format (unstacked)."""
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
    iteration, phase = meta["iteration"], meta["phase"]
    if phase == COLLECT and iteration >= 1:
        return iteration - 1  # saved right after iteration's evaluation, before the next collection
    if phase == EVALUATE:
        return iteration
    raise InputError(f"--protocol=last_eval: checkpoint {step} was saved in phase {PHASES[phase]} of iteration "
                     f"{iteration + 1}, after its state changed since the last evaluation; use --protocol=fresh")


class Protocol(NamedTuple):
    """One seed's evaluation: policy key, env seed (env i is seeded env_seed + i), env count, step cap per env,
    and the key of the dream beside it."""
    key: jax.Array
    env_seed: int
    num_envs: int
    max_steps: int
    dream_key: jax.Array


def protocol(config, seed: int, evaluated_iteration: int | None, env_seed: int, num_envs: int | None = None,
             max_steps: int | None = None) -> Protocol:
    """evaluated_iteration given (0-based): train.py's evaluation of that iteration of the run seeded `seed` (its
    key, envs, env count and cap; the other arguments unused). None: the fresh protocol, num_envs (default
    env.num_eval_envs) envs seeded env_seed.. capped at max_steps (default env.eval_cap), key jax.random.key(env_seed)."""
    if evaluated_iteration is not None:
        root = jax.random.key(seed)
        return Protocol(key=unit_key(root, evaluated_iteration, EVALUATE),
                        env_seed=derived_seed(root, 1 + evaluated_iteration),
                        num_envs=config.env.num_eval_envs, max_steps=config.env.eval_cap,
                        dream_key=unit_key(root, evaluated_iteration, EVALUATE, 2))  # unit 1: train.py's images
    key = jax.random.key(env_seed)
    return Protocol(key=key, env_seed=env_seed, num_envs=num_envs or config.env.num_eval_envs,
                    max_steps=max_steps or config.env.eval_cap,
                    dream_key=jax.random.fold_in(key, FRESH_KEY_PURPOSE_DREAM))


# ------------------------------------------------------------------------------------------ playing

class EnvTap:
    """Passes an EnvPool through to collect.first_episodes; echoes progress every `every_s` seconds and keeps env
    `record_env`'s first episode from its step `record_from` on (newest frames [T] and rewards [T], frame t =
    observation t's, reward t = the step taken from it) for at most `record_frames` frames, and that env's action
    of every step."""

    def __init__(self, env, record_frames: int, max_steps: int, label: str, record_env: int = 0, record_from: int = 0,
                 every_s: float = 20.0, echo: Callable[[str], None] = quiet):
        self.env, self.record_frames, self.max_steps = env, record_frames, max_steps
        self.label, self.every_s, self.record_env, self.record_from = label, every_s, record_env, record_from
        self.echo = echo
        self.frames, self.rewards, self.actions = [], [], []  # actions: env record_env's, every step
        self.recording = record_frames > 0 and record_from == 0
        self.waiting = record_frames > 0 and record_from > 0
        self.steps, self.start = 0, time.time()
        self.last_echo = self.start
        self.finished = None

    def reset(self):
        obs, info = self.env.reset()
        self.finished = None
        if self.recording:
            self.frames.append(envs.frames_of(obs)[self.record_env].copy())
        return obs, info

    def step(self, actions):
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
            self.echo(f"{self.label}: step {self.steps}/{self.max_steps}, {int(np.sum(self.finished))}/{len(done)} "
                      f"episodes finished, {time.time() - self.start:.0f}s")
        return obs, reward, terminated, truncated, info

    def close(self):
        self.env.close()


def play(config, policy_fn, key, env_seed: int, num_envs: int, max_steps: int, record_frames: int, label: str,
         record_env: int = 0, record_from: int = 0, echo: Callable[[str], None] = quiet):
    """collect.evaluate's protocol, per episode: (first_episodes' (returns, lengths, finished, ...) [N],
    episode_stats' dict, EnvTap).

    The same calls as collect.evaluate (make_env(seed), step keys split(key, max_steps), first_episodes,
    episode_stats), kept open to return the per-episode arrays and env record_env's frames."""
    tap = EnvTap(envs.make_env(config.env, num_envs, env_seed), record_frames, max_steps, label, record_env,
                 record_from, echo=echo)
    per_episode = first_episodes(tap, config.env, policy_actor(policy_fn), list(jax.random.split(key, max_steps)))
    return per_episode, episode_stats(*per_episode), tap


# ------------------------------------------------------------------------------------------ video

def dream_of(world, agent, networks, start_frame, horizon: int, key):
    """Imagines `horizon` steps from the encoding of an episode's first observation (start_frame [96, 96]
    replicated as collect does); returns (decoded newest frames [T, 96, 96] in [0, 1], rewards [T])."""
    start = envs.initial_stack(start_frame[None], world.config.env.frame_stack)
    start_indices, _ = outputs.encode(world, start)
    rollout = outputs.dream(dynamics=networks.dream_dynamics, actor_critic=networks.actor_critic,
                            dynamics_params={"params": world.dynamics_params}, policy_params=agent.params,
                            embeddings=world.codebook.embeddings, start_indices=start_indices, key=key,
                            horizon=horizon)
    decoded = outputs.decode_mean(networks.decoder, world.decoder_params,
                                  world.codebook.embeddings[rollout.indices[:, 0]])
    return np.asarray(decoded[..., -1]), np.asarray(rollout.rewards[:, 0])


def side_by_side(real, real_rewards, dream, dream_rewards):
    """real uint8 [T, 96, 96], dream float [T, 96, 96] in [0, 1], rewards [T] -> GIF frames uint8
    [T, 96 + CAPTION, 2 * 96 + SEPARATOR, 3]: real | dream with viz.dream_frames' reward bars, and a caption
    with the step and both returns so far (it also keeps consecutive frames distinct, so none are merged)."""
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


def write_video(path: str, tap: EnvTap, world, agent, networks, dream_key) -> dict:
    """A GIF at `path` of the episode `tap` recorded beside a dream of as many steps from its first frame; returns
    its JSON record (absolute path, frames, real and dreamed return)."""
    real_rewards = np.asarray(tap.rewards, np.float32)
    real = np.stack(tap.frames[:len(real_rewards)])  # at the step cap the last frame has no step
    dream, dream_rewards = dream_of(world, agent, networks, real[0], len(real), dream_key)
    viz.save_gif(path, side_by_side(real, real_rewards, dream, dream_rewards))
    return {"path": os.path.abspath(path), "frames": len(real), "real_return": float(real_rewards.sum()),
            "dream_return": float(dream_rewards.sum())}


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


def branch_probe(config, p: Protocol, world, agent, networks, act, env_index: int, at: int, steps: int, hold: int,
          samples: int, temperature: float, echo: Callable[[str], None] = quiet) -> list[dict]:
    """The branch probe for one seed's evaluation protocol p; returns one dict per branch (real returns, clipped
    real returns, step of the first real reward (-1: none), whether the episode ended, mean clipped dreamed return).

    Env env_index plays its episode to step `at` with `act` (the evaluation's policy); K copies of it (same seed)
    replay those actions, are checked to show the very same observation, and each plays one branch of
    branch_actions for `steps` steps, the policy sampling at `temperature`. Each branch is also dreamed `samples`
    times from that observation's encoding (the evaluation's frame stack), its scripted steps forced
    (imagination.imagine's `actions`)."""
    if at >= p.max_steps:
        raise InputError(f"--branch_at={at} is not before the evaluation's step cap {p.max_steps}")
    policy_fn = lambda obs, key: act(world, agent.params, obs, key)
    tap = EnvTap(envs.make_env(config.env, p.num_envs, p.env_seed), 1, p.max_steps, "to the branch point",
                 env_index, at, echo=echo)
    lengths = first_episodes(tap, config.env, policy_actor(policy_fn), list(jax.random.split(p.key, p.max_steps))[:at])[1]
    if not tap.frames:
        raise InputError(f"--branch_at={at}: env {env_index}'s episode lasted {int(lengths[env_index])} steps")
    forced, names = branch_actions(envs.num_actions(config.env.game), samples, steps, hold)
    k = forced.shape[1]
    pool = envs.make_env(config.env, 1, [p.env_seed + env_index] * k)  # K copies of env env_index
    obs, _ = pool.reset()
    frames = envs.initial_stack(envs.frames_of(obs), config.env.frame_stack)
    not_first = np.zeros(k, bool)
    for a in tap.actions[:at]:
        obs, *_ = pool.step(np.full(k, a, np.int32))
        frames = envs.push_frame(frames, envs.frames_of(obs), not_first)
    if not (envs.frames_of(obs) == tap.frames[0]).all():
        raise RuntimeError(f"the replayed copies of env {env_index} do not show its observation {at}")
    echo(f"branching at step {at} of env {env_index}: {k} real branches and {k * samples} dreams of {steps} steps")
    branch_act = jax.jit(make_act(networks, temperature))
    branch_key, dream_key = jax.random.split(jax.random.fold_in(p.dream_key, at))
    start = frames
    returns, clipped, ended = np.zeros(k), np.zeros(k), np.zeros(k, bool)
    first_reward = np.full(k, -1)  # the branch step of the first real reward, -1: none
    for t, key in enumerate(jax.random.split(branch_key, steps)):
        policy = np.asarray(branch_act(world, agent.params, jnp.asarray(frames), key))
        actions = np.where(forced[t] >= 0, forced[t], policy)
        obs, reward, terminated, truncated, _ = pool.step(actions.astype(np.int32))
        returns += np.where(ended, 0.0, reward)
        clipped += np.where(ended, 0.0, np.sign(reward))
        first_reward = np.where((first_reward < 0) & ~ended & (reward != 0), t, first_reward)
        ended |= terminated | truncated
        frames = envs.push_frame(frames, envs.frames_of(obs), not_first)
    pool.close()
    start_indices, _ = outputs.encode(world, jnp.asarray(start))
    rollout = outputs.dream(
        networks.dream_dynamics, networks.actor_critic, {"params": world.dynamics_params}, agent.params,
        world.codebook.embeddings, jnp.tile(start_indices, (samples, 1, 1)), dream_key, steps,
        temperature=temperature, actions=jnp.asarray(np.tile(forced, (1, samples))))
    dreamed = np.asarray(rollout.rewards).sum(0).reshape(samples, k)  # [dream sample, branch]
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
