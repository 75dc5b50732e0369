"""dlwm_jax/probe.py on small inputs: the probe's branches, the real | dream video frames, EnvTap's recording of one
env's episode, which evaluation a checkpoint's state saw. The whole path on real runs: test_evaluate.py."""
import numpy as np
import pytest

from dlwm_jax import probe
from dlwm_jax.run_state import COLLECT, EVALUATE, PHASES


def test_branch_actions_policy_copies_then_hold_and_hold_then_policy_per_action():
    forced, names = probe.branch_actions(num_actions=2, samples=2, steps=4, hold=3)
    assert names == ["policy", "policy", "hold 0", "hold 0, then policy", "hold 1", "hold 1, then policy"]
    assert forced.dtype == np.int32 and forced.shape == (4, 6)  # [steps, K]
    np.testing.assert_array_equal(forced.T, [[-1, -1, -1, -1], [-1, -1, -1, -1], [0, 0, 0, 0], [0, 0, 0, -1],
                                             [1, 1, 1, 1], [1, 1, 1, -1]])


def test_side_by_side_keeps_real_pixels_and_marks_rewards():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (3, 96, 96), dtype=np.uint8)
    dream = rng.uniform(size=(3, 96, 96))
    frames = probe.side_by_side(real, np.array([1.0, 0.0, -1.0]), dream, np.array([0.0, 1.0, 0.0]))
    assert frames.dtype == np.uint8 and frames.shape == (3, 96 + probe.CAPTION, 2 * 96 + probe.SEPARATOR, 3)
    body = frames[:, :92]  # above the 4-pixel reward bars and the caption
    np.testing.assert_array_equal(body[:, :, :96], np.repeat(real[:, :92, :, None], 3, -1))  # exact, not off by one
    np.testing.assert_array_equal(body[:, :, 96:98], np.broadcast_to(probe.SEPARATOR_RGB, (3, 92, 2, 3)))
    np.testing.assert_array_equal(body[:, :, 98:], np.repeat((dream[:, :92, :, None] * 255).astype(np.uint8), 3, -1))
    bar = lambda t, side: tuple(frames[t, 94, 48 + side * 98])
    assert (bar(0, 0), bar(1, 0), bar(2, 0)) == ((0, 255, 0), (0, 0, 0), (255, 0, 0))  # real: +1, 0, -1
    assert (bar(0, 1), bar(1, 1)) == ((0, 0, 0), (0, 255, 0))
    captions = frames[:, 96 + 2:]
    assert captions.any() and not (captions[0] == captions[1]).all()  # the step counter: no two frames alike


class FakePool:
    """Two envs; observation t of env e is a frame filled with 10 * e + t; step t's reward is t; env 1's episode
    ends at step 3."""

    def __init__(self):
        self.t = 0

    def obs(self):
        return np.stack([np.full((1, 4, 4), 10 * e + self.t, np.uint8) for e in range(2)])

    def reset(self):
        self.t = 0
        return self.obs(), {}

    def step(self, actions):
        self.t += 1
        return self.obs(), np.full(2, float(self.t)), np.array([False, self.t == 3]), np.zeros(2, bool), {}


def drive(tap, num_steps):
    tap.reset()
    for t in range(num_steps):
        tap.step(np.array([5, 7 + t]))
    return [int(f[0, 0]) for f in tap.frames]


def test_env_tap_records_one_envs_episode_from_a_step_until_it_ends():
    tap = probe.EnvTap(FakePool(), record_frames=10, max_steps=6, label="t", record_env=1, record_from=1)
    assert drive(tap, 6) == [11, 12]  # observations 1, 2; the episode ends with the step taken from observation 2
    assert tap.rewards == [2.0, 3.0] and tap.actions == [7, 8, 9, 10, 11, 12]
    assert tap.finished.tolist() == [False, True]


def test_env_tap_stops_at_record_frames_and_skips_an_ended_episode():
    tap = probe.EnvTap(FakePool(), record_frames=2, max_steps=6, label="t", record_env=0)
    assert drive(tap, 6) == [0, 1] and tap.rewards == [1.0, 2.0]  # each frame with the step taken from it
    late = probe.EnvTap(FakePool(), record_frames=5, max_steps=6, label="t", record_env=1, record_from=4)
    assert drive(late, 6) == [] and late.rewards == []  # env 1's episode ended at step 3


def test_last_evaluated_iteration_from_the_checkpoints_phase():
    assert probe.last_evaluated_iteration({"iteration": 2, "phase": COLLECT}, 9) == 1  # saved after iteration 1's
    assert probe.last_evaluated_iteration({"iteration": 1, "phase": EVALUATE}, 9) == 1
    with pytest.raises(probe.InputError, match="phase collect of iteration 1"):
        probe.last_evaluated_iteration({"iteration": 0, "phase": COLLECT}, 9)
    with pytest.raises(probe.InputError, match="checkpoint 9 was saved in phase policy"):
        probe.last_evaluated_iteration({"iteration": 3, "phase": PHASES.index("policy")}, 9)
