"""Imagination: the scanned rollout equals a step-by-step loop, vmaps over seeds, and PPO learns from it."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlwm_jax import config as config_lib
from dlwm_jax import ppo
from dlwm_jax.imagination import Carry, imagination_step, imagine, imagined_rewards, step_noise
from dlwm_jax.networks.distributions import gumbel_noise, sample_categorical
from dlwm_jax.networks import init_variables, make_networks
from dlwm_jax.networks.actor_critic import ActorCritic
from dlwm_jax.networks.dynamics import initial_state

CONFIG = config_lib.smoke()
NUM_ACTIONS = 3


def _setup():
    nets = make_networks(CONFIG, NUM_ACTIONS)
    variables = init_variables(nets, CONFIG, jax.random.key(0))
    k = CONFIG.vqvae.num_codes
    embeddings = jax.random.normal(jax.random.key(1), (k, CONFIG.vqvae.code_dim))
    start = jax.random.randint(jax.random.key(2), (4, 6, 6), 0, k)
    return nets, variables, embeddings, start


@pytest.mark.parametrize("dynamics_name,unroll", [("dynamics", 1), ("dream_dynamics", 4)])
def test_scan_equals_step_by_step_python_loop(dynamics_name, unroll):
    nets, v, embeddings, start = _setup()
    dynamics = getattr(nets, dynamics_name)
    horizon, key = 6, jax.random.key(3)
    dream = jax.jit(lambda s, k: imagine(dynamics, nets.actor_critic, v["dynamics"], v["actor_critic"],
                                         embeddings, s, k, horizon, unroll=unroll))(start, key)
    step = jax.jit(lambda c, k: imagination_step(dynamics, nets.actor_critic, v["dynamics"], v["actor_critic"],
                                                 embeddings, c, k))
    carry = Carry(start, initial_state(4, CONFIG.dynamics.hidden_channels))
    for t, k in enumerate(jax.random.split(key, horizon)):
        noise = jax.tree.map(lambda x: x[0], step_noise(k[None], 4, NUM_ACTIONS, 6, embeddings.shape[0]))
        carry, (latents, actions, logits, value, y, reward_key, indices) = step(carry, noise)
        log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), actions[:, None], -1)[:, 0]
        rewards = imagined_rewards(dynamics, v["dynamics"], y[None], reward_key[None])[0]
        np.testing.assert_array_equal(dream.actions[t], actions)
        np.testing.assert_array_equal(dream.indices[t], indices)
        np.testing.assert_array_equal(dream.rewards[t], rewards)
        np.testing.assert_allclose(dream.log_probs[t], log_probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dream.values[t], value, rtol=1e-5, atol=1e-6)
    assert dream.observations.shape == (horizon, 4, 6, 6, CONFIG.vqvae.code_dim)
    assert set(np.unique(dream.rewards)).issubset({-1.0, 0.0, 1.0})
    np.testing.assert_array_equal(dream.terminals, np.arange(horizon)[:, None].repeat(4, 1) == horizon - 1)
    assert len(np.unique(np.asarray(dream.indices[1:]))) > 1  # the next latents are sampled, not copied


@pytest.mark.parametrize("shape", [(5, 3), (4, 6, 6, 16), (7,)])
def test_noise_drawn_for_all_steps_samples_as_jax_random_categorical(shape):
    """The dream's and the dynamics loss's samples: gumbel_noise of all steps' keys at once, then
    sample_categorical per step, is jax.random.categorical with each step's key, bitwise (float32 logits)."""
    keys = jax.random.split(jax.random.key(9), 6)
    logits = 3.0 * jax.random.normal(jax.random.key(10), (6, *shape))
    noise = jax.jit(gumbel_noise, static_argnums=1)(keys, shape)
    for k, n, l in zip(keys, noise, logits):
        np.testing.assert_array_equal(sample_categorical(n, l), jax.random.categorical(k, l).astype(jnp.int32))
    assert sample_categorical(noise[0], logits[0]).dtype == jnp.int32


def test_bootstrap_switch_clears_terminals():
    nets, v, embeddings, start = _setup()
    dream = imagine(nets.dynamics, nets.actor_critic, v["dynamics"], v["actor_critic"], embeddings, start,
                    jax.random.key(0), 3, bootstrap_at_horizon=True)
    assert not np.any(dream.terminals) and dream.bootstrap_value.shape == (4,)


def test_vmap_over_seeds_equals_separate_calls():
    nets, v, embeddings, start = _setup()
    run = lambda pv, s, k: imagine(nets.dynamics, nets.actor_critic, v["dynamics"], pv, embeddings, s, k, 5)
    policy_params = [init_variables(nets, CONFIG, jax.random.key(10 + i))["actor_critic"] for i in range(3)]
    starts = jnp.stack([start, (start + 1) % 16, (start + 2) % 16])
    keys = jax.random.split(jax.random.key(7), 3)
    batched = jax.jit(jax.vmap(run))(jax.tree.map(lambda *x: jnp.stack(x), *policy_params), starts, keys)
    single = jax.jit(run)
    for i in range(3):
        one = single(policy_params[i], starts[i], keys[i])
        np.testing.assert_array_equal(batched.actions[i], one.actions)
        np.testing.assert_array_equal(batched.indices[i], one.indices)
        np.testing.assert_allclose(batched.values[i], one.values, rtol=1e-5, atol=1e-6)


class GoodActionWorld(nn.Module):
    """A fixed world model: the latent never changes, action `good` earns +1, every other action 0."""
    num_codes: int
    good: int
    hidden_channels: int = 1

    def recur(self, z_q, actions, state):
        """y: the action, as a plane over the grid."""
        return jnp.broadcast_to(actions[:, None, None, None], (*z_q.shape[:3], 1)), state

    def latent_head(self, y):
        return jnp.zeros((*y.shape[:3], self.num_codes))

    def reward_head(self, y):
        return jnp.where((y[:, 0, 0, 0] == self.good)[:, None], jnp.array([-30.0, -30.0, 30.0]),
                         jnp.array([-30.0, 30.0, -30.0]))


@pytest.mark.slow  # a learning check (~24 s on 2 cores): in make test-slow for the default suite's 8-minute budget
def test_ppo_in_imagination_learns_the_rewarding_action():
    policy_config = config_lib.override(CONFIG, {"policy.learning_rate": 1e-3}).policy
    world = GoodActionWorld(num_codes=16, good=2)
    agent = ActorCritic(NUM_ACTIONS, conv_channels=8, hidden=16)
    embeddings = jax.random.normal(jax.random.key(0), (16, 8))
    params = agent.init(jax.random.key(1), embeddings[jnp.zeros((1, 6, 6), jnp.int32)])
    optimizer = ppo.make_optimizer(policy_config)
    opt_state = optimizer.init(params)

    @jax.jit
    def update(params, opt_state, key):
        start_key, dream_key, ppo_key = jax.random.split(key, 3)
        start = jax.random.randint(start_key, (8, 6, 6), 0, 16)
        dream = imagine(world, agent, {}, params, embeddings, start, dream_key, 10)
        rollout = ppo.Rollout(dream.observations, dream.actions, dream.log_probs, dream.values, dream.rewards,
                              dream.terminals)
        return ppo.ppo_update(params, opt_state, rollout, dream.bootstrap_value, ppo_key, policy_config,
                              agent.apply, optimizer)

    probe = embeddings[jax.random.randint(jax.random.key(5), (32, 6, 6), 0, 16)]
    p_before = jax.nn.softmax(agent.apply(params, probe)[0])[:, 2].mean()
    for k in jax.random.split(jax.random.key(2), 60):
        params, opt_state, metrics = update(params, opt_state, k)
    p_after = jax.nn.softmax(agent.apply(params, probe)[0])[:, 2].mean()
    assert p_before < 0.6
    assert p_after > 0.9, (float(p_before), float(p_after))


def test_forced_actions_replace_the_policy_where_set():
    nets, v, embeddings, start = _setup()
    world = GoodActionWorld(num_codes=16, good=2)
    horizon, key = 6, jax.random.key(4)
    forced = np.full((horizon, 4), -1, np.int32)
    forced[:, 0] = 2        # env 0 holds the rewarding action throughout
    forced[:3, 1] = 1       # env 1 holds another action for 3 steps, then the policy acts
    run = jax.jit(lambda a: imagine(world, nets.actor_critic, {}, v["actor_critic"], embeddings, start, key, horizon,
                                    actions=a))
    free, scripted = run(None), run(jnp.asarray(forced))
    np.testing.assert_array_equal(scripted.actions[:, 0], 2)
    np.testing.assert_array_equal(scripted.rewards[:, 0], 1.0)
    np.testing.assert_array_equal(scripted.actions[:3, 1], 1)
    np.testing.assert_array_equal(scripted.rewards[:3, 1], 0.0)
    # where nothing is forced the policy samples with the same keys as without actions
    np.testing.assert_array_equal(scripted.actions[3:, 1], free.actions[3:, 1])
    np.testing.assert_array_equal(scripted.actions[:, 2:], free.actions[:, 2:])
    logp = jax.nn.log_softmax(nets.actor_critic.apply(v["actor_critic"], embeddings[start])[0])
    np.testing.assert_allclose(scripted.log_probs[0, 0], logp[0, 2], rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError):
        run(jnp.asarray(forced[:2]))
