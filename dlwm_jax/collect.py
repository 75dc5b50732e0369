"""Acting in the real environments: data collection into per-env streams, and evaluation (SPEC 2, 8.3, 9).

Each env step is one call of an `Actor`: act(stacks, frames, is_first, key) -> (stacks, actions). It pushes the
newest frames onto the frame stacks (envs.push_frame) and picks the actions from them, so in the training loop an
env step is one compiled program (programs.py: the frames go in, the actions come out, the stacks stay on the
device). Layout: an env pool of G seed groups x E envs (G = 1 for one seed): stacks [G, E, 96, 96, C] (whatever
the actor keeps: the collector starts them as zeros and never reads them), frames uint8 [G, E, 96, 96], is_first
bool [G, E] (True: the frame starts an episode, the stack is it replicated), key one key or [G] keys; actions int
[G, E] (or [G * E]). `policy_actor` makes one from a plain `PolicyFn(observations [N, 96, 96, C], key) -> actions
[N]`. The policy's temperature (1.5 while collecting, 1.0 at evaluation, SPEC 8.3 / 9) is the caller's business.

EnvPool auto-resets one step late: after a step returns done, the env's NEXT step performs the reset, ignores
its action and returns reward 0 and the first observation of the new episode (verified in tests/test_envs.py).
Such a reset step is not an interaction (Appendix A): the collector performs it at once, for the finished envs
only (`step(..., env_id=finished)`), so it is neither counted nor stored and all envs stay in lock-step.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlwm_jax import envs
from dlwm_jax.config import EnvConfig

PolicyFn = Callable[[jax.Array, jax.Array], Any]
Actor = Callable[[Any, np.ndarray, np.ndarray, jax.Array], tuple[Any, Any]]
_push_frame = jax.jit(envs.push_frame)


def policy_actor(policy_fn: PolicyFn) -> Actor:
    """An Actor from a PolicyFn (tests, tools): the frames pushed by a program of their own, then the policy on the
    stacks flattened to [G * E, 96, 96, C]."""
    def act(stacks, frames, is_first, key):
        stacks = _push_frame(stacks, frames, is_first)
        return stacks, policy_fn(stacks.reshape(-1, *stacks.shape[2:]), key)
    return act


class Trajectory(NamedTuple):
    """One collected chunk per env stream, SPEC 2 convention (N env streams, T interactions each).

    frames:    uint8 [N, T, 96, 96]  newest frame of observation[t] (each frame stored once)
    actions:   int32 [N, T]          action[t] taken in observation[t]
    rewards:   float32 [N, T]        raw (unclipped) score returned by that step
    terminals: bool [N, T]           done returned by that step (game over or episode cap); then
                                     observation[t+1] starts a new episode
    is_first:  bool [N, T]           observation[t] is the first of an episode (its stack is frames[t]
                                     replicated); observation[t] = push_frame(observation[t-1], frames[t], is_first[t])
    Consecutive chunks of one Collector continue each stream: chunk k+1's observation[0] is the observation after
    chunk k's last step, so stacks at the start of a chunk use the previous chunk's last C-1 frames.
    """
    frames: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    is_first: np.ndarray


def random_policy(num_actions: int) -> PolicyFn:
    """Uniform random actions (SPEC 8.3, iteration 1): policy_fn(obs [N, ...], key) -> int32 [N]."""
    @functools.partial(jax.jit, static_argnums=1)
    def sample(key: jax.Array, num_envs: int) -> jax.Array:
        return jax.random.randint(key, (num_envs,), 0, num_actions, dtype=jnp.int32)

    def policy_fn(observations: jax.Array, key: jax.Array) -> jax.Array:
        return sample(key, observations.shape[0])
    return policy_fn


def scripted_actor(actions: Iterator[np.ndarray]) -> Actor:
    """An Actor that plays the given actions, one [N] per step (a resume re-stepping its envs); it keeps the stacks."""
    return lambda stacks, frames, is_first, key: (_push_frame(stacks, frames, is_first), next(actions))


def _actions(actions: Any, num_envs: int, num_actions: int) -> np.ndarray:
    """An actor's actions as int32 [num_envs]; ValueError (one line) if they are not num_envs ints in range."""
    actions = np.asarray(actions)
    if actions.size != num_envs or not np.issubdtype(actions.dtype, np.integer) \
            or actions.min() < 0 or actions.max() >= num_actions:
        raise ValueError(f"the policy must return int actions [{num_envs}] in [0, {num_actions}), "
                         f"got {actions.dtype} {actions.shape} {actions if actions.size <= 8 else ''}")
    return actions.reshape(num_envs).astype(np.int32)


def _groups(seed: int | Sequence[int]) -> int:
    """Seed groups of a pool made with `seed`: one per base seed of a sequence, 1 for one seed."""
    return 1 if isinstance(seed, (int, np.integer)) else len(seed)


def step_keys(key: jax.Array, num_steps: int) -> list[jax.Array]:
    """The key of each of num_steps steps: jax.random.split(key, T) as a list (one unstack: indexing a key array
    per step is slow). For [S] keys (one per seed of a pooled env) T keys [S] whose row s is what seed s alone
    would use: split(key[s], T)[t]."""
    if key.ndim == 0:
        return list(jax.random.split(key, num_steps))
    return list(jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num_steps))(key), 0, 1))


class Collector:
    """Host-side owner of the data-collection EnvPool and its current frame stacks.

    The env is reset once, here, and never again between `collect` calls (SPEC 2, 8.3): episodes continue
    across chunks. `num_interactions` counts agent steps over all envs (reset steps excluded).
    """

    def __init__(self, env_config: EnvConfig, num_envs: int, seed: int | Sequence[int]):
        """Collects from envs.make_env(env_config, num_envs, seed): num_envs envs, or num_envs per base seed when
        `seed` is a sequence of S base seeds (one pool of S x num_envs envs for S training seeds)."""
        self.env = envs.make_env(env_config, num_envs, seed)
        self.num_envs, self.groups = self.env.config["num_envs"], _groups(seed)  # N over all seeds of a pool, G
        self.num_actions = envs.num_actions(env_config.game)
        num_envs = self.num_envs
        self._all_ids = np.arange(num_envs, dtype=np.int32)
        obs, _ = self.env.reset()
        self.newest_frames = envs.frames_of(obs).copy()  # uint8 [N, 96, 96], numpy: the next push
        self.stacks = np.zeros((self.groups, num_envs // self.groups, *self.newest_frames.shape[1:],
                                env_config.frame_stack), np.uint8)  # the actor's: [G, E, 96, 96, C] at first
        self.is_first = np.ones(num_envs, bool)
        self.episode_returns = np.zeros(num_envs, np.float64)
        self.episode_lengths = np.zeros(num_envs, np.int64)
        self.num_interactions = 0

    def _reset_finished(self, frames: np.ndarray, done: np.ndarray) -> np.ndarray:
        """Performs EnvPool's pending reset step for the envs that are done; returns frames [N, 96, 96]."""
        done_ids = self._all_ids[done]
        obs, reward, _, _, info = self.env.step(np.zeros(len(done_ids), np.int32), env_id=done_ids)
        if np.any(info["elapsed_step"] != 0) or np.any(reward != 0):  # guards the autoreset assumption
            raise RuntimeError("EnvPool step after done was not an auto-reset")
        frames = frames.copy()
        frames[info["env_id"]] = envs.frames_of(obs)
        return frames

    def collect(self, actor: Actor, num_steps: int, key: jax.Array) -> tuple[Trajectory, dict]:
        """Acts for `num_steps` interactions in total (num_steps // N per env, N must divide num_steps).

        Returns (Trajectory with T = num_steps // N, stats) where stats = {"episode_returns": float64 [E],
        "episode_lengths": int64 [E], "episode_envs": int64 [E]} of the E episodes that finished during this call
        (raw returns, lengths in agent steps, episodes started in earlier calls included; the env index of each).
        Step t calls the actor with step_keys(key, T)[t]: `key` is one key, or [S] keys for a pool of S seeds.
        """
        if num_steps % self.num_envs:
            raise ValueError(f"num_steps={num_steps} is not divisible by num_envs={self.num_envs}")
        n, t_len = self.num_envs, num_steps // self.num_envs
        grouped = (self.groups, n // self.groups)
        keys = step_keys(key, t_len)
        traj = Trajectory(frames=np.empty((n, t_len) + self.newest_frames.shape[1:], np.uint8),
                          actions=np.empty((n, t_len), np.int32), rewards=np.empty((n, t_len), np.float32),
                          terminals=np.empty((n, t_len), bool), is_first=np.empty((n, t_len), bool))
        finished_returns, finished_lengths, finished_envs = [], [], []
        for t in range(t_len):
            traj.frames[:, t] = self.newest_frames
            traj.is_first[:, t] = self.is_first
            self.stacks, actions = actor(self.stacks, self.newest_frames.reshape(*grouped, *self.newest_frames.shape[1:]),
                                         self.is_first.reshape(grouped), keys[t])
            actions = _actions(actions, n, self.num_actions)
            obs, reward, terminated, truncated, _ = self.env.step(actions, env_id=self._all_ids)
            done = terminated | truncated
            traj.actions[:, t], traj.rewards[:, t], traj.terminals[:, t] = actions, reward, done
            self.episode_returns += reward
            self.episode_lengths += 1
            frames = envs.frames_of(obs).copy()  # EnvPool may reuse its output buffers
            if done.any():
                finished_returns.extend(self.episode_returns[done])
                finished_lengths.extend(self.episode_lengths[done])
                finished_envs.extend(np.flatnonzero(done))
                self.episode_returns[done], self.episode_lengths[done] = 0.0, 0
                frames = self._reset_finished(frames, done)
            self.newest_frames, self.is_first = frames, done
        self.num_interactions += num_steps
        stats = {"episode_returns": np.asarray(finished_returns, np.float64),
                 "episode_lengths": np.asarray(finished_lengths, np.int64),
                 "episode_envs": np.asarray(finished_envs, np.int64)}
        return traj, stats


def evaluate(env_config: EnvConfig, actor: Actor, key: jax.Array, seed: int | Sequence[int],
             num_envs: int | None = None, max_steps: int | None = None) -> dict | list[dict]:
    """Evaluation episodes (SPEC 9) in fresh envs seeded seed, seed+1, ... (the reference's were unseeded).

    Runs num_envs (default env.num_eval_envs) envs from reset until each has finished its first episode
    (finished envs keep stepping, their data ignored) or max_steps (default env.eval_cap) steps were taken.
    Returns return_mean/std (population)/min/max and length_mean over the finished episodes; if none finished,
    over the partial returns at the cap. num_finished says how many of num_envs episodes ended; `returns`,
    `lengths` and `finished` are the per-env lists.
    With [S] keys and S base seeds (S training seeds): one pool of S x num_envs envs, the actor gets [S] keys,
    and a list of S result dicts, dict s what evaluate(..., key[s], seed[s]) returns.
    """
    num_envs = num_envs or env_config.num_eval_envs
    max_steps = max_steps or env_config.eval_cap
    env = envs.make_env(env_config, num_envs, seed)
    per_env = first_episodes(env, env_config, actor, step_keys(key, max_steps), _groups(seed))
    if key.ndim == 0:
        return episode_stats(*per_env)
    return [episode_stats(*group) for group in zip(*(x.reshape(len(key), num_envs) for x in per_env))]


def first_episodes(env, env_config: EnvConfig, actor: Actor, step_keys: list, groups: int = 1) -> tuple[np.ndarray, ...]:
    """Resets `env` (N envs: `groups` seed groups of N / groups) and acts until every env finished its first episode
    or len(step_keys) steps were taken (step t acts with step_keys[t]); closes it. Returns (returns f64 [N], lengths
    i64 [N], finished [N], clipped returns f64 [N]: the sum of sign(reward), the reward classes the world model
    predicts)."""
    num_act = envs.num_actions(env_config.game)
    obs, _ = env.reset()
    frames = envs.frames_of(obs)
    num_envs, size = frames.shape[0], frames.shape[1:]
    stacks = np.zeros((groups, num_envs // groups, *size, env_config.frame_stack), np.uint8)
    is_first = np.ones((groups, num_envs // groups), bool)
    returns, lengths = np.zeros(num_envs, np.float64), np.zeros(num_envs, np.int64)
    clipped = np.zeros(num_envs, np.float64)
    finished = np.zeros(num_envs, bool)
    for step_key in step_keys:
        stacks, actions = actor(stacks, frames.reshape(groups, -1, *size), is_first, step_key)
        obs, reward, terminated, truncated, _ = env.step(_actions(actions, num_envs, num_act))
        active = ~finished
        returns += np.where(active, reward, 0.0)
        clipped += np.where(active, np.sign(reward), 0.0)
        lengths += active
        finished |= terminated | truncated
        if finished.all():
            break
        # After a done EnvPool's next step resets; finished envs' data are ignored, so no special care here.
        frames, is_first = envs.frames_of(obs).copy(), np.zeros_like(is_first)
    env.close()
    return returns, lengths, finished, clipped


def episode_stats(returns: np.ndarray, lengths: np.ndarray, finished: np.ndarray, clipped: np.ndarray) -> dict:
    """evaluate's result dict for one group of envs [N]: statistics over finished episodes, or all if none
    finished; plus the raw per-env lists `returns`, `lengths`, `finished` and `clipped_returns` (unfinished:
    partial values at the cap)."""
    pick = finished if finished.any() else np.ones(len(finished), bool)
    return dict(return_mean=float(returns[pick].mean()), return_std=float(returns[pick].std()),
                return_min=float(returns[pick].min()), return_max=float(returns[pick].max()),
                length_mean=float(lengths[pick].mean()), num_finished=int(finished.sum()), num_envs=len(finished),
                returns=[float(r) for r in returns], lengths=[int(n) for n in lengths],
                finished=[bool(f) for f in finished], clipped_returns=[float(c) for c in clipped])
