"""Tests of dlwm_jax/replay.py: frame stacking, window sampling, batch counts (SPEC 2, 8.4), checkpoints."""
import collections

import jax
import numpy as np
import pytest

from dlwm_jax import replay as replay_lib
from dlwm_jax.config import ScheduleConfig

SHAPE = (2, 3)  # small frames: the logic does not depend on 96x96


def make_chunk(rng, n, t, first_id, terminal_prob=0.1, previous_terminals=None, shape=SHAPE):
    """Random chunk whose frame k (in add order) holds the distinct id first_id + k (< 2**16, in two pixels)
    and whose episode_starts are consistent with terminals."""
    ids = first_id + np.arange(n * t).reshape(n, t)
    frames = np.zeros((n, t, *shape), np.uint8)
    if shape == SHAPE:
        frames[..., 0, 0], frames[..., 0, 1] = ids % 256, ids // 256
    terminals = rng.random((n, t)) < terminal_prob
    starts = np.zeros((n, t), bool)
    starts[:, 1:] = terminals[:, :-1]
    starts[:, 0] = True if previous_terminals is None else previous_terminals
    actions = rng.integers(0, 6, (n, t)).astype(np.int32)
    rewards = rng.normal(size=(n, t)).astype(np.float32)
    return frames, actions, rewards, terminals, starts


def frame_id(frames):
    return frames[..., 0, 0, :].astype(np.int64) + 256 * frames[..., 0, 1, :].astype(np.int64)


def fill(replay, rng, lengths, terminal_prob=0.1):
    """Adds chunks of the given lengths; returns per stream the (frame id, episode start) sequence in time order."""
    history = [[] for _ in range(replay.num_streams)]
    last_terminals = None
    for t in lengths:
        chunk = make_chunk(rng, replay.num_streams, t, len(replay), terminal_prob, last_terminals)
        frames, _, _, terminals, starts = chunk
        ids = frame_id(frames[..., None])[..., 0]
        for s in range(replay.num_streams):
            history[s] += list(zip(ids[s], starts[s]))
        replay.add(*chunk)
        last_terminals = terminals[:, -1]
    return history


def gym_frame_stack(history, c):
    """Reference: gym FrameStack run over one stream's (frame id, episode start) sequence -> id stacks [T, C]."""
    stacks, window = [], collections.deque(maxlen=c)
    for frame, start in history:
        if start:
            window.extend([frame] * c)
        window.append(frame)
        stacks.append(list(window))
    return np.array(stacks)


@pytest.mark.parametrize("num_streams,frame_stack", [(1, 4), (3, 4), (2, 1)])
def test_stacking_matches_gym_frame_stack_across_episodes_and_chunks(num_streams, frame_stack):
    rng = np.random.default_rng(0)
    replay = replay_lib.Replay(400, num_streams, SHAPE, frame_stack)
    history = fill(replay, rng, [30, 2, 17, 5], terminal_prob=0.15)
    stacks = frame_id(replay.observations(np.arange(len(replay))))  # [len, C]; index = frame id
    for s in range(num_streams):
        expected = gym_frame_stack(history[s], frame_stack)
        ids = np.array([frame for frame, _ in history[s]])
        np.testing.assert_array_equal(stacks[ids], expected)


def test_stack_at_chunk_start_continues_previous_chunk_of_same_stream():
    rng = np.random.default_rng(1)
    replay = replay_lib.Replay(100, 2, SHAPE, 4)
    replay.add(*make_chunk(rng, 2, 5, 0, terminal_prob=0.0))  # stream 0: ids 0..4, stream 1: ids 5..9
    replay.add(*make_chunk(rng, 2, 3, 10, terminal_prob=0.0, previous_terminals=np.array([False, False])))
    # Stream 0's second chunk starts at id 10, stream 1's at id 13.
    np.testing.assert_array_equal(frame_id(replay.observations(np.array([10, 13, 11]))),
                                  [[2, 3, 4, 10], [7, 8, 9, 13], [3, 4, 10, 11]])
    np.testing.assert_array_equal(frame_id(replay.observations(np.array([0, 6]))), [[0] * 4, [5, 5, 5, 6]])
    obs = replay.observations(np.zeros((2, 3), int))
    assert obs.shape == (2, 3, *SHAPE, 4) and obs.dtype == np.uint8


def test_stack_at_chunk_start_after_terminal_restarts():
    rng = np.random.default_rng(2)
    replay = replay_lib.Replay(100, 1, SHAPE, 4)
    frames, actions, rewards, terminals, starts = make_chunk(rng, 1, 5, 0, terminal_prob=0.0)
    terminals[0, -1] = True
    replay.add(frames, actions, rewards, terminals, starts)
    replay.add(*make_chunk(rng, 1, 3, 5, terminal_prob=0.0, previous_terminals=np.array([True])))
    np.testing.assert_array_equal(frame_id(replay.observations(np.array([5, 6]))), [[5] * 4, [5, 5, 5, 6]])


def test_add_rejects_inconsistent_starts_and_overflow():
    rng = np.random.default_rng(3)
    replay = replay_lib.Replay(20, 1, SHAPE, 4)
    frames, actions, rewards, terminals, starts = make_chunk(rng, 1, 8, 0, terminal_prob=0.0)
    bad = starts.copy()
    bad[0, 3] = True
    with pytest.raises(ValueError, match="inconsistent"):
        replay.add(frames, actions, rewards, terminals, bad)
    replay.add(frames, actions, rewards, terminals, starts)
    with pytest.raises(ValueError, match="inconsistent"):  # first step of a continuation must not restart
        replay.add(*make_chunk(rng, 1, 4, 8, terminal_prob=0.0, previous_terminals=np.array([True])))
    with pytest.raises(ValueError, match="full"):
        replay.add(*make_chunk(rng, 1, 13, 8, terminal_prob=0.0, previous_terminals=np.array([False])))
    assert len(replay) == 8


def test_sequence_windows_offsets_and_chunk_boundaries():
    rng = np.random.default_rng(4)
    replay = replay_lib.Replay(300, 2, SHAPE, 4)
    fill(replay, rng, [40, 25, 8, 15, 30])  # the 8-step chunk is shorter than a window: never sampled
    bounds = list(zip(replay._trajectory_starts.tolist(), replay._trajectory_lengths.tolist()))
    offsets_seen = collections.defaultdict(set)
    for seed in range(60):
        starts = replay.sequence_starts(jax.random.key(seed), length=11, max_offset=10)
        assert len(np.unique(starts)) == len(starts)
        per_trajectory = collections.Counter()
        for start in starts.tolist():
            (begin, size), = [(b, s) for b, s in bounds if b <= start < b + s]
            assert start + 11 <= begin + size  # never crosses a chunk boundary, never runs past the end
            offsets_seen[(begin, size)].add((start - begin) % 11)
            per_trajectory[(begin, size)] += 1
        for begin, size in bounds:  # all windows of one offset: floor((len - offset) / 11)
            if size >= 11:
                offset = min(start - begin for start in starts.tolist() if begin <= start < begin + size)
                assert offset <= min(10, max(size - 12, 0))
                assert per_trajectory[(begin, size)] == (size - offset) // 11
            else:
                assert per_trajectory[(begin, size)] == 0
    for (begin, size), seen in offsets_seen.items():  # offsets cover 0..min(10, len-12) (drawn uniformly)
        assert seen == set(range(min(10, max(size - 12, 0)) + 1))


def test_sequence_batches_content_and_padding():
    rng = np.random.default_rng(5)
    replay = replay_lib.Replay(200, 1, SHAPE, 4)
    fill(replay, rng, [60, 50])
    key = jax.random.key(7)
    starts = replay.sequence_starts(key, 11, 10)
    batches = list(replay.sequence_batches(key, 4, 11, 10))
    assert len(batches) == replay.num_sequence_batches(key, 4, 11, 10) == -(-len(starts) // 4)
    got = np.concatenate([frame_id(b.observations[0, b.valid, ..., -1:])[:, 0] for b in batches])
    np.testing.assert_array_equal(got, starts)  # batches follow the shuffled window order, padding masked
    assert all(b.valid.all() for b in batches[:-1])
    assert batches[-1].valid.sum() == len(starts) - 4 * (len(batches) - 1)
    b = batches[0]
    assert b.observations.shape == (11, 4, *SHAPE, 4) and b.observations.dtype == np.uint8
    assert b.actions.shape == b.rewards.shape == b.terminals.shape == (11, 4)
    step = starts[1] + 3
    np.testing.assert_array_equal(b.actions[3, 1], replay._actions[step])
    np.testing.assert_array_equal(b.rewards[3, 1], replay._rewards[step])
    np.testing.assert_array_equal(b.terminals[:, 1], replay._terminals[starts[1]:starts[1] + 11])
    np.testing.assert_array_equal(b.observations[:, 1], replay.observations(starts[1] + np.arange(11)))


def test_batch_counts_match_spec_8_4():
    """Dynamics batches per epoch = ceil(sum_traj floor((len - offset) / 11) / 4) (SPEC 2, 8.4)."""
    table = [291, 436, 582, 727, 872, 1017, 1163, 1308, 1453, 1598, 1744, 1889, 2034, 2179, 2325]
    schedule = ScheduleConfig()
    replay = replay_lib.Replay(schedule.initial_steps + 14 * schedule.steps_per_iteration, 1, (1, 1), 4)
    rng = np.random.default_rng(6)
    previous = None
    for k in range(15):
        chunk = make_chunk(rng, 1, schedule.steps_per_iteration if k else schedule.initial_steps, 0, 0.001,
                           previous, shape=(1, 1))
        replay.add(*chunk)
        previous = chunk[3][:, -1]
        # With offset 0 every trajectory yields its maximum: the table's value.
        assert replay.num_sequence_batches(jax.random.key(k), 4, 11, max_offset=0) == table[k]
        counts = {replay.num_sequence_batches(jax.random.key(100 * k + i)) for i in range(5)}
        # Random offsets lose at most one window per trajectory (SPEC 8.4: "vary by at most 1-4").
        assert all(table[k] - -(-(k + 1) // 4) <= c <= table[k] for c in counts)
        if k < 2:  # 12,800 (and 12,800 + 6,400) steps: every offset gives exactly 291 (436) batches
            assert counts == {table[k]}
    assert replay.num_observation_batches(40) == 102_400 // 40
    assert len(replay) == 102_400


def test_observation_batches_full_pass_with_padding():
    rng = np.random.default_rng(8)
    replay = replay_lib.Replay(200, 1, SHAPE, 4)
    fill(replay, rng, [57, 30])
    batches = list(replay.observation_batches(jax.random.key(0), 40))
    assert len(batches) == replay.num_observation_batches(40) == 3
    assert all(b.observations.shape == (40, *SHAPE, 4) for b in batches)
    np.testing.assert_array_equal([b.valid.sum() for b in batches], [40, 40, 7])
    ids = np.concatenate([frame_id(b.observations[b.valid, ..., -1:])[:, 0] for b in batches])
    np.testing.assert_array_equal(np.sort(ids), np.arange(87))  # every observation exactly once
    assert not np.array_equal(ids, np.arange(87))  # shuffled


def test_same_key_same_order_different_key_different_order():
    rng = np.random.default_rng(9)
    replay = replay_lib.Replay(300, 1, SHAPE, 4)
    fill(replay, rng, [120, 90])

    def orders(seed):
        key = jax.random.key(seed)
        obs = np.concatenate([b.observations for b in replay.observation_batches(key, 40)])
        seq = np.concatenate([b.observations for b in replay.sequence_batches(key)], axis=1)
        return obs, seq, replay.sample_observations(key, 16)

    for a, b in zip(orders(0), orders(0)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(orders(0), orders(1)):
        assert a.shape != b.shape or not np.array_equal(a, b)
    raw_key = jax.random.PRNGKey(3)  # old-style uint32 keys work too
    np.testing.assert_array_equal(replay.sample_observations(raw_key, 5), replay.sample_observations(raw_key, 5))


def test_sample_observations_distinct_and_uniform():
    rng = np.random.default_rng(10)
    replay = replay_lib.Replay(100, 1, SHAPE, 4)
    fill(replay, rng, [32])
    counts = np.zeros(32)
    for seed in range(200):
        obs = replay.sample_observations(jax.random.key(seed), 16)
        assert obs.shape == (16, *SHAPE, 4) and obs.dtype == np.uint8
        ids = frame_id(obs[..., -1:])[:, 0]
        assert len(np.unique(ids)) == 16
        counts[ids] += 1
    assert counts.min() > 60 and counts.max() < 140  # each ~ 100 = 200 * 16 / 32
    with pytest.raises(ValueError):
        replay.sample_observations(jax.random.key(0), 33)


def test_memory_of_a_full_size_buffer():
    replay = replay_lib.Replay(102_400, 1, (96, 96), 4)
    assert 102_400 * 96 * 96 <= replay.nbytes < 1.2e9
    replay.add(*[np.zeros((1, 16, 96, 96), np.uint8), np.zeros((1, 16), np.int32),
                 np.zeros((1, 16), np.float32), np.zeros((1, 16), bool), np.eye(1, 16, dtype=bool)])
    assert replay.sample_observations(jax.random.key(0), 4).shape == (4, 96, 96, 4)


def test_state_dict_round_trip():
    rng = np.random.default_rng(11)
    replay = replay_lib.Replay(300, 2, SHAPE, 4)
    fill(replay, rng, [30, 20])
    state = replay.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values()) and len(state["frames"]) == 100
    restored = replay_lib.Replay.from_state_dict({k: v.copy() for k, v in state.items()})
    assert restored.capacity == 300 and len(restored) == 100 and restored.num_trajectories == 4
    key = jax.random.key(5)
    for a, b in zip(replay.sequence_batches(key), restored.sequence_batches(key)):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(replay.observations(np.arange(100)), restored.observations(np.arange(100)))
    # Both continue identically: the next chunk's stacks reach back into the restored data.
    chunk = make_chunk(rng, 2, 10, 100, 0.1, state["terminals"][state["stream_last"]])
    replay.add(*chunk)
    restored.add(*chunk)
    np.testing.assert_array_equal(replay.observations(np.arange(120)), restored.observations(np.arange(120)))
    with pytest.raises(ValueError):
        replay_lib.Replay(50, 2, SHAPE, 4).load_state_dict(state)


def test_diagnostic_windows_stay_in_a_trajectory_after_first_step_and_cross_no_episode_end():
    rng = np.random.default_rng(3)
    replay = replay_lib.Replay(2_000, 2, SHAPE)
    fill(replay, rng, [300, 200], terminal_prob=0.05)
    length, first = 14, 600  # steps >= 600: the second chunk's two trajectories (600..799, 800..999)
    starts = replay.window_starts_from(jax.random.key(0), 50, length, first)
    assert len(starts) == 50 and len(set(starts.tolist())) == 50 and starts.min() >= first
    trajectory = np.searchsorted(replay._trajectory_starts, np.arange(len(replay)), side="right") - 1
    for s in starts:
        assert trajectory[s] == trajectory[s + length - 1]
        assert not replay._terminals[s:s + length - 1].any()  # obs s+length-1 continues the same episode
    # Exhaustive: asking for more than exist returns every valid start once.
    every = replay.window_starts_from(jax.random.key(1), 10_000, length, first)
    brute = [s for s in range(first, len(replay) - length + 1)
             if trajectory[s] == trajectory[s + length - 1] and not replay._terminals[s:s + length - 1].any()]
    assert every.tolist() == brute
    assert len(replay.window_starts_from(jax.random.key(0), 5, length, len(replay) - 3)) == 0


def test_plans_gathered_on_the_device_are_the_host_batches_bit_for_bit():
    """device_replay.gather of the plans' frame indices, inside a compiled program, gives the batches the host
    gathers (observation, sequence and start-state sampling drawn as before the plans existed: same generator
    calls, same padding); the device copy written chunk by chunk (write_frames) is the replay's frames."""
    import jax.numpy as jnp
    from dlwm_jax.device_replay import empty_frames, gather, seed_chunks, write_frames
    rng = np.random.default_rng(12)
    replay = replay_lib.Replay(400, 2, SHAPE, 4)
    fill(replay, rng, [60, 45, 50])
    frames = jnp.asarray(replay.frames)
    on_device = lambda indices: np.asarray(jax.jit(gather)(frames, indices))
    key = jax.random.key(4)
    order, valid = replay_lib._pad(replay_lib._generator(key).permutation(len(replay)), 40)
    plan = replay.observation_plan(key, 40)
    assert plan.frames.shape == (8, 40, 4) and plan.frames.dtype == np.int32
    for k, batch in enumerate(replay.observation_batches(key, 40)):
        expected = replay.observations(order[40 * k:40 * (k + 1)])
        for got in (on_device(plan.frames[k]), batch.observations):
            np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(plan.valid[k], valid[40 * k:40 * (k + 1)])
    starts, valid = replay_lib._pad(replay.sequence_starts(key, 11, 10), 4)
    plan = replay.sequence_plan(key, 4, 11, 10)
    assert len(plan.valid) == len(starts) // 4 > 3 and not plan.valid.all()
    for k, batch in enumerate(replay.sequence_batches(key, 4, 11, 10)):
        expected = replay.sequences(starts[4 * k:4 * (k + 1)], 11)._replace(valid=valid[4 * k:4 * (k + 1)])
        np.testing.assert_array_equal(on_device(plan.frames[k]), expected.observations)
        for got, want in zip((batch, SequenceBatchOf(plan, k)), (expected, expected)):
            for x, y in zip(got[1:], want[1:]):
                np.testing.assert_array_equal(x, y)
    chosen = replay_lib._generator(key).choice(len(replay), 16, replace=False)
    np.testing.assert_array_equal(on_device(replay.sample_stacks(key, 16)), replay.observations(chosen))
    # The device copy, written as Run.add_chunk writes it: per pooled collection (2 seeds x 2 envs), every seed's
    # new steps at once.
    device, copies, last = empty_frames(2, 400, SHAPE), [replay_lib.Replay(400, 2, SHAPE, 4) for _ in range(2)], None
    for t in (30, 20):
        pooled = make_chunk(rng, 4, t, 1000 + len(copies[0]), 0.1, last)
        start, last = len(copies[0]), pooled[3][:, -1]
        for s, copy in enumerate(copies):
            copy.add(*(x[2 * s:2 * s + 2] for x in pooled))
        device = write_frames(device, seed_chunks(pooled[0], 2), start)
    for s, copy in enumerate(copies):
        np.testing.assert_array_equal(np.asarray(device[s, :len(copy)]), copy.frames)
        assert not np.asarray(device[s, len(copy):]).any()


def SequenceBatchOf(plan, k):
    """Row k of a SequencePlan as a SequenceBatch (its frames field holds the indices, not compared)."""
    return replay_lib.SequenceBatch(*(x[k] for x in plan))
