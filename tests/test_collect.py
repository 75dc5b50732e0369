"""Collector and evaluation on real EnvPool Atari (SPEC 2, 8.3, 9, Appendix A)."""
import jax
import numpy as np
import pytest

from dlwm_jax import collect, envs
from dlwm_jax.config import EnvConfig


def obs_policy(num_actions):
    """Key-independent, observation-dependent policy: lets chunked and one-shot collection be compared."""
    return lambda obs, key: (obs.astype(np.int32).sum(axis=(1, 2, 3)) // 7 % num_actions).astype(np.int32)


def rebuilt_observations(traj, num_stack):
    """Observation stacks of env stream 0 rebuilt from stored frames: uint8 [T, 96, 96, C]."""
    return np.moveaxis(traj.frames[0][envs.stack_indices(traj.is_first[0], num_stack)], 1, -1)


def test_truncation_autoreset_steps_are_neither_counted_nor_stored_and_chunks_continue():
    config = EnvConfig(game="Breakout", max_episode_steps=25)
    policy = collect.policy_actor(obs_policy(4))
    whole = collect.Collector(config, num_envs=2, seed=0)
    traj, stats = whole.collect(policy, 120, jax.random.key(0))
    assert traj.frames.shape == (2, 60, 96, 96) and traj.frames.dtype == np.uint8
    assert traj.actions.dtype == np.int32 and traj.rewards.dtype == np.float32
    assert whole.num_interactions == 120
    # Every 25th interaction ends an episode; the next stored observation starts one (reset step skipped).
    expected_terminals = (np.arange(60) % 25 == 24)
    np.testing.assert_array_equal(traj.terminals, np.broadcast_to(expected_terminals, (2, 60)))
    np.testing.assert_array_equal(traj.is_first, np.broadcast_to(np.arange(60) % 25 == 0, (2, 60)))
    np.testing.assert_array_equal(stats["episode_lengths"], [25] * 4)
    # Two chunks of one collector (env not reset in between) equal one chunk of twice the length.
    chunked = collect.Collector(config, num_envs=2, seed=0)
    first, stats_a = chunked.collect(policy, 70, jax.random.key(1))
    second, stats_b = chunked.collect(policy, 50, jax.random.key(2))
    for field in traj._fields:
        np.testing.assert_array_equal(np.concatenate([getattr(first, field), getattr(second, field)], 1),
                                      getattr(traj, field))
    assert len(stats_a["episode_lengths"]) == 2 and len(stats_b["episode_lengths"]) == 2
    assert (traj.frames[:, 25] != traj.frames[:, 24]).any()


def test_game_over_terminals_returns_and_stacks():
    config = EnvConfig(game="Breakout")
    collector = collect.Collector(config, num_envs=2, seed=1)
    seen, random_policy = [], collect.random_policy(4)
    record = lambda obs, key: (seen.append(np.asarray(obs)), random_policy(obs, key))[1]
    traj, stats = collector.collect(collect.policy_actor(record), 2 * 300, jax.random.key(0))
    # Random Breakout loses its 5 lives in ~170-230 steps: each stream has a game over.
    assert traj.terminals.any(axis=1).all()
    for i in range(2):
        ends = np.flatnonzero(traj.terminals[i])
        assert traj.is_first[i, 0] and np.array_equal(np.flatnonzero(traj.is_first[i])[1:], ends[ends < 299] + 1)
    # Stats: raw returns and lengths of the episodes that ended (all started at this fresh collector's reset).
    returns, lengths = [], []
    for i in range(2):
        bounds = np.concatenate([[0], np.flatnonzero(traj.terminals[i]) + 1])
        returns += [traj.rewards[i, s:e].sum() for s, e in zip(bounds[:-1], bounds[1:])]
        lengths += list(np.diff(bounds))
    np.testing.assert_allclose(sorted(stats["episode_returns"]), sorted(returns))
    assert sorted(stats["episode_lengths"]) == sorted(lengths)
    np.testing.assert_array_equal(np.stack(seen)[:, 0], rebuilt_observations(traj, 4))
    assert seen[0].shape == (2, 96, 96, 4)


def test_same_key_and_seed_reproduce_different_key_changes_actions():
    config = EnvConfig(game="Asterix")
    policy = collect.policy_actor(collect.random_policy(envs.num_actions("Asterix")))
    a, _ = collect.Collector(config, 2, seed=3).collect(policy, 100, jax.random.key(5))
    b, _ = collect.Collector(config, 2, seed=3).collect(policy, 100, jax.random.key(5))
    c, _ = collect.Collector(config, 2, seed=3).collect(policy, 100, jax.random.key(6))
    for field in a._fields:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.actions != c.actions).mean() > 0.5 and (a.frames != c.frames).any()
    assert set(np.unique(a.actions)) == set(range(9))


def test_collect_rejects_indivisible_steps_and_bad_actions():
    collector = collect.Collector(EnvConfig(game="Pong", frame_stack=1), 2, seed=0)
    assert collector.stacks.shape == (1, 2, 96, 96, 1)
    with pytest.raises(ValueError, match="divisible"):
        collector.collect(collect.policy_actor(collect.random_policy(6)), 5, jax.random.key(0))
    with pytest.raises(ValueError, match="the policy must return int actions"):
        collector.collect(collect.policy_actor(lambda obs, key: np.full(2, 6)), 2, jax.random.key(0))


def test_evaluate_respects_the_cap_and_reports_finished_episodes():
    policy = collect.policy_actor(collect.random_policy(4))
    capped = collect.evaluate(EnvConfig(game="Breakout"), policy, jax.random.key(0), seed=0, num_envs=2,
                              max_steps=20)
    assert capped["num_finished"] == 0 and capped["num_envs"] == 2 and capped["length_mean"] == 20
    assert all(np.isfinite(v) for v in capped.values() if not isinstance(v, list))
    assert capped["lengths"] == [20, 20] and capped["finished"] == [False, False] and len(capped["returns"]) == 2
    short = EnvConfig(game="Breakout", max_episode_steps=15, num_eval_envs=3, eval_max_steps=100)
    done = collect.evaluate(short, policy, jax.random.key(0), seed=0)
    assert done["num_finished"] == 3 and done["length_mean"] == 15
    assert done["return_min"] <= done["return_mean"] <= done["return_max"] and done["return_std"] >= 0
    again = collect.evaluate(short, policy, jax.random.key(0), seed=0)
    assert again == done
    follows = EnvConfig(game="Breakout", max_episode_steps=15, num_eval_envs=3)  # eval_max_steps 0: the episode cap
    assert follows.eval_cap == 15 and collect.evaluate(follows, policy, jax.random.key(0), seed=0) == done
    # Game overs of random Breakout: raw returns are small non-negative integers.
    real = collect.evaluate(EnvConfig(game="Breakout"), policy, jax.random.key(1), seed=2, num_envs=2,
                            max_steps=1000)
    assert real["num_finished"] == 2 and 50 < real["length_mean"] < 1000
    assert real["return_min"] >= 0 and float(real["return_max"]).is_integer()


def test_replay_rebuilds_the_stacks_the_policy_saw_across_chunks():
    from dlwm_jax.replay import Replay
    config = EnvConfig(game="Breakout", max_episode_steps=13)
    collector = collect.Collector(config, num_envs=2, seed=0)
    replay = Replay(capacity=200, num_streams=2, frame_stack=4)
    seen, policy = [], collect.random_policy(4)
    record = lambda obs, key: (seen.append(np.asarray(obs)), policy(obs, key))[1]
    for key in jax.random.split(jax.random.key(0), 3):  # chunk boundaries at 20 and 40 steps per stream
        replay.add(*collector.collect(collect.policy_actor(record), 40, key)[0])
    assert len(replay) == 120
    # Replay order: chunk-major, then stream, then time: [chunk, N, T] flattened.
    seen = np.stack(seen).reshape(3, 20, 2, 96, 96, 4).transpose(0, 2, 1, 3, 4, 5).reshape(120, 96, 96, 4)
    np.testing.assert_array_equal(replay.observations(np.arange(120)), seen)


def test_the_loops_one_program_env_step_equals_pushing_then_acting():
    """The loop's actors push the frames and act in one program (programs.env_step); a PolicyFn behind
    policy_actor pushes with a program of its own: the same trajectory and the same stacks, over chunks."""
    from dlwm_jax import config as config_lib
    from dlwm_jax.programs import compile_programs
    config = EnvConfig(game="Breakout", max_episode_steps=13)
    fused = compile_programs(config_lib.override(config_lib.get_preset("smoke"), {"env.game": "Breakout"}), 4, 1,
                             None).random_act
    one, two = collect.Collector(config, 2, seed=0), collect.Collector(config, 2, seed=0)
    for key in jax.random.split(jax.random.key(3), 2):
        a, stats_a = one.collect(fused, 60, key[None])  # the loop's keys: one per seed [S]
        b, stats_b = two.collect(collect.policy_actor(collect.random_policy(4)), 60, key)
        for field in a._fields:
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        np.testing.assert_array_equal(np.asarray(one.stacks), np.asarray(two.stacks))
    assert a.is_first[:, 1:].any() and len(set(a.actions.ravel())) == 4
