"""Test-session settings: cheaper XLA compiles on CPU (the suite is compile-bound)."""
import os

import jax

from dlwm_jax.seed_axis import DEFAULT_COMPILATION_CACHE, use_compilation_cache

# Partitionable threefry compiles several times slower on XLA:CPU; the non-partitionable variant is
# just as deterministic (and vmap-consistent). The driver makes the same choice (ComputeConfig).
jax.config.update("jax_threefry_partitionable", False)
# Reuse compiled programs across test processes and runs (DLWM_JAX_CACHE: a fresh folder shows a newcomer's wait).
CACHE = os.environ.get("DLWM_JAX_CACHE", DEFAULT_COMPILATION_CACHE)
use_compilation_cache(CACHE)


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


# ------------------------------------------------------------------------------ smoke runs shared by the suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--game=Pong", "--preset=smoke", f"--compilation_cache={CACHE}"]
SHARED_RUNS = {"single": [], "seed_1": ["--seed=1"], "two_seeds": ["--num_seeds=2"]}  # name -> train.py flags


def shared_run(tmp_path_factory, name: str) -> tuple[str, str]:
    """(workdir, stdout) of `experiments/train.py` on the smoke preset with SHARED_RUNS[name]'s flags, made once
    per test session and shared by every xdist worker (compiling and running the smoke programs is most of the
    suite's time). Read it only: a test that changes a run works on a copy."""
    import fcntl
    import subprocess
    import sys
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared_runs"  # common to the workers
    root.mkdir(exist_ok=True)
    workdir, done, failed = root / name, root / f"{name}.stdout", root / f"{name}.failed"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits here while one makes the run
        if not done.exists() and not failed.exists():
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"), *SMOKE,
                                   *SHARED_RUNS[name], f"--workdir={workdir}"], capture_output=True, text=True,
                                  timeout=1200, cwd=ROOT)
            if proc.returncode == 0:
                done.write_text(proc.stdout)
            else:  # the other worker reports this instead of making the run again
                failed.write_text(proc.stderr[-3000:])
    if failed.exists():
        raise AssertionError(f"the shared smoke run {name!r} failed:\n{failed.read_text()}")
    return str(workdir), done.read_text()
