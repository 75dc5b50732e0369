"""EnvPool Atari with the reference protocol (SPEC 1, Appendix A): real envs, a few hundred steps."""
import envpool
import jax.numpy as jnp
import numpy as np
import pytest

from dlwm_jax import envs
from dlwm_jax.config import EnvConfig


def _run(env, actions):
    """Steps `env` with actions [T, N]; returns the frames uint8 [T, N, 96, 96]."""
    return np.stack([envs.frames_of(env.step(a)[0]).copy() for a in actions])


def test_options_are_explicit_and_differ_from_envpool_defaults_where_the_protocol_needs_it():
    config = EnvConfig(game="Breakout")
    defaults = envpool.make_spec("Breakout-v5").config._asdict()
    options = envs.env_options(config, num_envs=2, seed=3)
    assert set(options) - {"num_envs", "batch_size", "seed", "env_seed"} <= set(defaults)
    changed = {k for k, v in options.items() if defaults[k] != v} - {"num_envs", "batch_size", "seed"}
    assert changed == {"img_height", "img_width", "use_fire_reset", "stack_num"}
    assert options["use_fire_reset"] is False and options["stack_num"] == 1 and options["img_height"] == 96


def test_observation_shape_dtype_determinism_and_seed_plus_i():
    config = EnvConfig(game="Asterix")
    actions = np.random.default_rng(0).integers(0, envs.num_actions("Asterix"), size=(40, 3)).astype(np.int32)
    env = envs.make_env(config, num_envs=3, seed=7)
    obs, info = env.reset()
    assert obs.shape == (3, 1, 96, 96) and obs.dtype == np.uint8
    frames = _run(env, actions)
    assert frames.shape == (40, 3, 96, 96) and frames.std() > 0
    # Env i is seeded seed + i: a single env seeded 8 replays env 1 exactly.
    single = envs.make_env(config, num_envs=1, seed=8)
    single.reset()
    np.testing.assert_array_equal(_run(single, actions[:, 1:2])[:, 0], frames[:, 1])
    assert (frames[:, 0] != frames[:, 1]).any()


def test_reset_applies_random_noops_and_no_fire():
    # No-ops: with noop_max 1 every env starts from the same frame; with 30 the start frames differ.
    one = envs.make_env(EnvConfig(game="Asterix", noop_max=1), num_envs=4, seed=0).reset()[0]
    thirty = envs.make_env(EnvConfig(game="Asterix"), num_envs=4, seed=0).reset()[0]
    assert len({o.tobytes() for o in one}) == 1
    assert len({o.tobytes() for o in thirty}) >= 2
    # No FIRE at reset: in Breakout the ball only launches on FIRE, so NOOPs leave the screen frozen.
    env = envs.make_env(EnvConfig(game="Breakout"), num_envs=1, seed=0)
    first = envs.frames_of(env.reset()[0]).copy()
    frames = _run(env, np.zeros((30, 1), np.int32))
    assert (frames == first).all()
    assert (_run(env, np.ones((10, 1), np.int32)) != first).any()  # FIRE does launch it


def test_autoreset_happens_on_the_step_after_done_and_ignores_its_action():
    config = EnvConfig(game="Breakout", max_episode_steps=10)
    env = envs.make_env(config, num_envs=2, seed=0)
    env.reset()
    for t in range(1, 11):
        obs, reward, terminated, truncated, info = env.step(np.full(2, 3, np.int32))
        assert (truncated == (t == 10)).all() and not terminated.any()
        assert (info["elapsed_step"] == t).all()
    terminal_frames = envs.frames_of(obs).copy()
    # Same seed, different actions on the reset step: identical first frames, reward 0, a new episode.
    obs, reward, terminated, truncated, info = env.step(np.array([1, 2], np.int32))
    assert (info["elapsed_step"] == 0).all() and (reward == 0).all() and not (terminated | truncated).any()
    assert (envs.frames_of(obs) != terminal_frames).any()
    other = envs.make_env(config, num_envs=2, seed=0)
    other.reset()
    _run(other, np.full((10, 2), 3, np.int32))
    np.testing.assert_array_equal(envs.frames_of(other.step(np.array([3, 0], np.int32))[0]), envs.frames_of(obs))


def test_check_game_and_num_actions():
    assert envs.check_game("BankHeist") == "BankHeist"
    for bad, suggestion in [("Bankheist", "BankHeist"), ("PongNoFrameskip-v4", "Pong"), ("SpaceInvader", "SpaceInvaders")]:
        with pytest.raises(ValueError, match=f"unknown game '{bad}'; did you mean: .*{suggestion}") as err:
            envs.check_game(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="valid games: .*BankHeist"):
        envs.check_game("xyzzy")
    with pytest.raises(ValueError, match="did you mean"):
        envs.make_env(EnvConfig(game="Bankheist"), 1, 0)
    assert [envs.num_actions(g) for g in ("Pong", "Breakout", "Freeway", "CrazyClimber", "BankHeist", "Seaquest")] \
        == [6, 4, 3, 9, 18, 18]  # SPEC 1.1


@pytest.mark.parametrize("num_stack", [1, 4])
def test_push_frame_matches_gym_framestack_and_stack_indices(num_stack):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(12, 2, 3), dtype=np.uint8)  # tiny "images" [T, H, W]
    is_first = np.zeros(12, bool)
    is_first[[0, 5, 6]] = True
    stack = envs.initial_stack(frames[0], num_stack)
    expected = []
    for t in range(12):
        if is_first[t]:
            window = [frames[t]] * num_stack
        else:
            window = window[1:] + [frames[t]]
        expected.append(np.stack(window, -1))
        stack = envs.push_frame(stack, frames[t], is_first[t])
        np.testing.assert_array_equal(stack, expected[-1])
        jax_stack = envs.push_frame(jnp.asarray(expected[t - 1] if t else np.zeros_like(stack)), jnp.asarray(frames[t]), is_first[t])
        np.testing.assert_array_equal(np.asarray(jax_stack), expected[-1])
    rebuilt = np.moveaxis(frames[envs.stack_indices(is_first, num_stack)], 1, -1)
    np.testing.assert_array_equal(rebuilt, np.stack(expected))
    if num_stack == 4:  # oldest first: t=9 holds frames 6, 7, 8, 9
        np.testing.assert_array_equal(envs.stack_indices(is_first, 4)[[9, 7, 5]], [[6, 7, 8, 9], [6, 6, 6, 7], [5] * 4])


def test_push_frame_batched():
    stack = np.zeros((2, 4, 4, 3), np.uint8)
    out = envs.push_frame(stack, np.full((2, 4, 4), 7, np.uint8), np.array([False, True]))
    assert out.shape == (2, 4, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0, 0], [0, 0, 7])
    np.testing.assert_array_equal(out[1, 0, 0], [7, 7, 7])
