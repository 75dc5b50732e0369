"""Test-session settings: cheaper XLA compiles on CPU (the suite is compile-bound)."""
import os

import jax

# Partitionable threefry compiles several times slower on XLA:CPU; the non-partitionable variant is
# just as deterministic (and vmap-consistent). The driver makes the same choice (ComputeConfig).
jax.config.update("jax_threefry_partitionable", False)
# Reuse compiled programs across test processes and runs.
jax.config.update("jax_compilation_cache_dir", os.environ.get("DLWM_JAX_CACHE", os.path.expanduser("~/.cache/dlwm_jax/xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def breakout_replay(num_frames: int, frame_stack: int):
    """(Replay of `num_frames` real Breakout frames from a seeded uniformly random policy, one trajectory; A)."""
    import envpool
    import numpy as np
    from dlwm_jax.replay import Replay
    env = envpool.make("Breakout-v5", env_type="gym", num_envs=1, img_height=96, img_width=96, stack_num=1,
                       gray_scale=True, use_fire_reset=False, episodic_life=False, reward_clip=False, noop_max=30,
                       seed=0)
    num_actions = env.action_space.n
    rng = np.random.default_rng(0)
    obs, _ = env.reset()
    frames, actions, rewards, terminals = [], [], [], []
    for _ in range(num_frames):
        action = rng.integers(0, num_actions, (1,))
        frames.append(obs[0, 0])
        obs, reward, terminated, truncated, _ = env.step(action)
        actions.append(action[0]), rewards.append(reward[0]), terminals.append(terminated[0] | truncated[0])
    terminals = np.array(terminals)
    replay = Replay(num_frames + 1, frame_stack=frame_stack)
    replay.add(np.stack(frames)[None], np.array(actions)[None], np.array(rewards, np.float32)[None],
               terminals[None], np.concatenate([[True], terminals[:-1]])[None])
    return replay, num_actions
