"""Real Atari environments: EnvPool with the reference protocol (SPEC 1, 12.5, Appendix A).

Every option EnvPool 1.2.5 knows for Atari is set explicitly (`env_options`), and `make_env` checks that the
created pool reports exactly these values:

| option                      | EnvPool default | here                        | why (SPEC)                                |
|-----------------------------|-----------------|-----------------------------|-------------------------------------------|
| task id                     |                 | "{game}-v5"                 | NoFrameskip-v4 semantics, not ALE v5 (A)  |
| frame_skip                  | 4               | env.frame_skip (4)          | 1.2; max over the last two raw frames     |
| img_height, img_width       | 84, 84          | env.image_size (96)         | 1.2                                       |
| gray_scale                  | True            | True                        | 1.2; ALE's own grayscale palette          |
| use_inter_area_resize       | True            | True                        | 1.2; OpenCV INTER_AREA                    |
| noop_max                    | 30              | env.noop_max (30)           | 1.2; uniform 1..30 no-ops at reset        |
| use_fire_reset              | True            | **False**                   | Gym's preprocessing does not press FIRE   |
| episodic_life               | False           | False                       | 1.2; done only at game over               |
| zero_discount_on_life_loss  | False           | False                       | dm_env only; set for completeness         |
| reward_clip                 | False           | False                       | 1.2; raw scores are stored and evaluated  |
| repeat_action_probability   | 0.0             | env.repeat_action_probability (0) | no sticky actions (1.1)             |
| full_action_space           | False           | False                       | minimal action set (1.1)                  |
| max_episode_steps           | 27,000          | env.max_episode_steps (27,000) | project decision; 100,000 = reference |
| stack_num                   | 4               | **1**                       | we stack ourselves, see below             |
| seed                        | 42              | the caller's seed           | env i is seeded with seed + i             |

Frame stacking: EnvPool returns single frames (stack_num 1) and `push_frame` builds the stack, so the agent at
act time and the replay at train time use one stacking function. C = env.frame_stack: 4 reproduces the paper's
parameter counts (Table 3), 1 the released training script (SPEC 1.4). Layout: uint8 [..., 96, 96, C],
oldest frame in channel 0, newest in channel C-1; the first frame of an episode is replicated C times.

Two small protocol differences from Gym remain (documented, not fixable through options): EnvPool's episode
cap counts agent steps after the reset no-ops, Gym's TimeLimit counted raw frames including them; and EnvPool
auto-resets one step late (see `Collector` in collect.py for how reset steps are kept out of the data).
"""
from __future__ import annotations

import difflib
import functools
import re
from typing import Any, Sequence

import envpool
import jax
import jax.numpy as jnp
import numpy as np
from envpool.registration import registry

from dlwm_jax.config import EnvConfig


@functools.cache
def atari_games() -> tuple[str, ...]:
    """Sorted names of every Atari game EnvPool registers (ids "{name}-v5")."""
    return tuple(sorted(task_id[:-len("-v5")] for task_id, (import_path, _, _) in registry.specs.items()
                        if import_path == "envpool.atari" and task_id.endswith("-v5")))


def check_game(name: str) -> str:
    """Returns `name` if it is an EnvPool Atari game, else raises a one-line ValueError with close names."""
    games = atari_games()
    if name in games:
        return name
    by_lower = {g.lower(): g for g in games}
    stem = re.sub(r"(noframeskip)?-v\d+$", "", name.lower())  # "PongNoFrameskip-v4" -> "pong"
    close = difflib.get_close_matches(stem, list(by_lower), n=5, cutoff=0.6)
    if close:
        raise ValueError(f"unknown game {name!r}; did you mean: {', '.join(by_lower[c] for c in close)}?")
    raise ValueError(f"unknown game {name!r}; valid games: {', '.join(games)}")


@functools.cache
def num_actions(game: str) -> int:
    """Size A of the minimal action set of `game` (e.g. Pong 6, Breakout 4, BankHeist 18)."""
    spec = envpool.make_spec(f"{check_game(game)}-v5", full_action_space=False)
    return int(spec.action_space.n)


def env_options(env_config: EnvConfig, num_envs: int, seed: int) -> dict[str, Any]:
    """The EnvPool keyword arguments of the reference protocol (module table)."""
    return dict(
        num_envs=num_envs, batch_size=num_envs, seed=seed,
        frame_skip=env_config.frame_skip, img_height=env_config.image_size, img_width=env_config.image_size,
        gray_scale=True, use_inter_area_resize=True, noop_max=env_config.noop_max,
        use_fire_reset=False, episodic_life=False, zero_discount_on_life_loss=False, reward_clip=False,
        repeat_action_probability=env_config.repeat_action_probability, full_action_space=False,
        max_episode_steps=env_config.max_episode_steps, stack_num=1,
    )


def make_env(env_config: EnvConfig, num_envs: int, seed: int | Sequence[int]):
    """A synchronous EnvPool of Atari envs (gym API: Gymnasium 5-tuples).

    seed an int: `num_envs` envs, env i seeded seed + i. seed a sequence of S base seeds (one per training
    seed): one pool of S x num_envs envs, env e of group s (index s * num_envs + e) seeded seed[s] + e, the very
    env `make_env(env_config, num_envs, seed[s])` makes as its env e (tests/test_train_seeds.py).
    reset() -> (obs uint8 [N, 1, 96, 96], info); step(actions int [N]) -> (obs, reward, terminated, truncated,
    info). Use `frames_of(obs)` to get uint8 [N, 96, 96].
    """
    if isinstance(seed, (int, np.integer)):
        options = env_options(env_config, num_envs, int(seed))
    else:
        env_seed = [int(base) + e for base in seed for e in range(num_envs)]
        options = {**env_options(env_config, len(env_seed), 0), "env_seed": env_seed}
        del options["seed"]
    env = envpool.make(f"{check_game(env_config.game)}-v5", env_type="gym", **options)
    config = env.config
    wrong = {k: (v, config.get(k)) for k, v in options.items() if config.get(k) != v}
    if wrong:  # an EnvPool version that renames or ignores an option must not silently change the protocol
        raise RuntimeError(f"EnvPool ignored options (wanted, got): {wrong}")
    return env


def frames_of(obs: np.ndarray) -> np.ndarray:
    """EnvPool observation uint8 [N, 1, H, W] (stack_num 1, channels first) -> frames uint8 [N, H, W]."""
    return obs[:, 0]


def push_frame(stack, frame, is_first):
    """One step of frame stacking (gym FrameStack semantics, SPEC 1.4); numpy or jax arrays.

    stack uint8 [..., H, W, C] (oldest in channel 0), frame uint8 [..., H, W], is_first bool [...].
    Returns uint8 [..., H, W, C]: the stack shifted by one with `frame` newest, or, where is_first,
    `frame` replicated C times. Contents of `stack` are ignored where is_first.
    """
    xp = jnp if isinstance(stack, jax.Array) or isinstance(frame, jax.Array) else np
    frame = xp.asarray(frame)[..., None]
    shifted = xp.concatenate([stack[..., 1:], frame], axis=-1)
    replicated = xp.broadcast_to(frame, shifted.shape)
    return xp.where(xp.asarray(is_first)[..., None, None, None], replicated, shifted)


def initial_stack(frame, num_stack: int):
    """Stack at an episode start: uint8 [..., H, W] -> [..., H, W, C] with the frame replicated C times."""
    xp = jnp if isinstance(frame, jax.Array) else np
    return xp.repeat(xp.asarray(frame)[..., None], num_stack, axis=-1)


def stack_indices(is_first: np.ndarray, num_stack: int) -> np.ndarray:
    """Frame indices of every stack in one continuous frame stream: equivalent to `push_frame` step by step.

    is_first bool [T] (True where frame t starts an episode). Returns int [T, C]: observation[t] =
    frames[stack_indices[t]] moved to the last axis, oldest first. Frames before an episode start are replaced by
    that start; before index 0 of the stream by frame 0 (exact only if the stream starts an episode; otherwise
    prepend the previous chunk of the same env stream).
    """
    t = np.arange(len(is_first))
    episode_start = np.maximum.accumulate(np.where(is_first, t, 0))
    back = t[:, None] - np.arange(num_stack - 1, -1, -1)[None, :]
    return np.maximum(back, episode_start[:, None])
