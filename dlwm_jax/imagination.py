"""Imagined rollouts in latent space (SPEC 6, 7.2): one `lax.scan`, pure in (params, start, key).

Start from the code indices of real observations [N, 6, 6]; at every step the policy samples an action
from the embedded latent, the dynamics network predicts the next grid and a reward class, and both are
sampled (36 independent categoricals at temperature 1; reward class c -> reward c - 1); given `actions`, a
scripted (counterfactual) dream takes them instead of the policy's where they are >= 0. The horizon is
fixed: the last step is marked terminal, so PPO does not bootstrap past it (the reference), unless
`bootstrap_at_horizon` is set, in which case no step is terminal and V(final latent) is the bootstrap.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from dlwm_jax.networks.distributions import categorical_log_prob, gumbel_noise, sample_categorical
from dlwm_jax.networks.dynamics import DynamicsState, initial_state


class Dream(NamedTuple):
    """An imagined batch, time-major [T, N, ...] (the fields of ppo.Rollout plus the code indices)."""
    observations: jax.Array   # [T, N, 6, 6, D] embedded latents the policy saw
    actions: jax.Array        # [T, N] int32
    log_probs: jax.Array      # [T, N]
    values: jax.Array         # [T, N]
    rewards: jax.Array        # [T, N] in {-1, 0, 1}
    terminals: jax.Array      # [T, N] bool
    indices: jax.Array        # [T, N, 6, 6] code indices of observations
    bootstrap_value: jax.Array  # [N] V(latent after the last step); multiplied away unless bootstrapping


class Carry(NamedTuple):
    indices: jax.Array          # [N, 6, 6]
    state: DynamicsState


class StepNoise(NamedTuple):
    """A step's randomness, drawn for all steps before the scan (step_noise): the Gumbel noise of its action [N, A]
    and next-latent [N, 6, 6, K] samples (distributions.gumbel_noise) and its reward key."""
    actions: jax.Array
    latents: jax.Array
    reward_key: jax.Array


def step_noise(keys: jax.Array, num_envs: int, num_actions: int, grid: int, num_codes: int) -> StepNoise:
    """StepNoise [T, ...] of the steps' keys [T]: key -> split(key, 3) = (action, latent, reward) keys, the
    samples as jax.random.categorical draws them with those keys, in one batched draw per kind."""
    action_keys, latent_keys, reward_keys = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 3))(keys), 1, 0)
    return StepNoise(gumbel_noise(action_keys, (num_envs, num_actions)),
                     gumbel_noise(latent_keys, (num_envs, grid, grid, num_codes)), reward_keys)


def imagination_step(dynamics: nn.Module, actor_critic: nn.Module, dynamics_params: Any, policy_params: Any,
                     embeddings: jax.Array, carry: Carry, noise: StepNoise, temperature: float = 1.0,
                     forced_actions: jax.Array | None = None):
    """One simulated step for N envs: (carry, noise) -> (carry, per-step record). Used by `imagine`'s scan;
    noise: one step of step_noise. forced_actions int [N] (optional): taken instead of the policy's sample where
    >= 0. The record holds what feeds nothing back, for `imagine` to finish every step's at once after the scan:
    the policy's logits at the temperature (not the action's log-probability) and the dynamics' y and the step's
    reward key (not the reward, which `imagined_rewards` samples)."""
    latents = embeddings[carry.indices]
    logits, value = actor_critic.apply(policy_params, latents)
    logits = logits / temperature
    actions = sample_categorical(noise.actions, logits)
    if forced_actions is not None:
        actions = jnp.where(forced_actions >= 0, forced_actions.astype(jnp.int32), actions)
    y, state = dynamics.apply(dynamics_params, latents, actions, carry.state, method="recur")
    next_logits = dynamics.apply(dynamics_params, y, method="latent_head")
    next_indices = sample_categorical(noise.latents, next_logits)
    record = (latents, actions, logits, value, y, noise.reward_key, carry.indices)
    return Carry(next_indices, state), record


def imagined_rewards(dynamics: nn.Module, dynamics_params: Any, ys: jax.Array, reward_keys: jax.Array) -> jax.Array:
    """Rewards in {-1, 0, 1} [T, N] of the steps whose y [T, N, ...] and reward keys [T] imagination_step recorded:
    the reward head on all steps in one pass (not one per step in the scan), each step's class sampled with its
    key."""
    logits = dynamics.apply(dynamics_params, ys.reshape(-1, *ys.shape[2:]), method="reward_head")
    logits = logits.reshape(*ys.shape[:2], -1)
    return jax.vmap(jax.random.categorical)(reward_keys, logits).astype(jnp.float32) - 1.0


def imagine(dynamics: nn.Module, actor_critic: nn.Module, dynamics_params: Any, policy_params: Any,
            embeddings: jax.Array, start_indices: jax.Array, key: jax.Array, horizon: int,
            bootstrap_at_horizon: bool = False, temperature: float = 1.0, unroll: int = 1,
            actions: jax.Array | None = None) -> Dream:
    """Imagines `horizon` steps from start code indices [N, 6, 6] (embeddings [K, D]) -> Dream.

    actions int [horizon, N] (optional): at step t env n takes actions[t, n] instead of the policy's sample where
    it is >= 0 (log_probs are then the policy's of the action taken); -1 leaves the step to the policy.

    `dynamics` is a module with Dynamics' methods `recur`, `latent_head` and `reward_head`. Pure and jit-able
    (modules, horizon, flags static); vmap over a leading seed axis of the arrays.
    """
    chex.assert_rank(start_indices, 3)
    hidden = dynamics.hidden_channels
    carry = Carry(start_indices, initial_state(start_indices.shape[0], hidden, start_indices.shape[1]))
    if actions is not None:
        chex.assert_shape(actions, (horizon, start_indices.shape[0]))
    step = lambda c, x: imagination_step(dynamics, actor_critic, dynamics_params, policy_params, embeddings, c, x[0],
                                         temperature, x[1])
    n, grid = start_indices.shape[:2]
    noise = step_noise(jax.random.split(key, horizon), n, actor_critic.num_actions, grid, embeddings.shape[0])
    carry, (latents, actions, logits, values, ys, reward_keys, indices) = jax.lax.scan(
        step, carry, (noise, actions), unroll=unroll)
    log_probs = categorical_log_prob(logits, actions)  # every step's at once: one operation, not one a step
    rewards = imagined_rewards(dynamics, dynamics_params, ys, reward_keys)
    _, bootstrap_value = actor_critic.apply(policy_params, embeddings[carry.indices])
    last = jnp.arange(horizon) == horizon - 1
    terminals = jnp.broadcast_to((last & (not bootstrap_at_horizon))[:, None], actions.shape)
    return Dream(latents, actions, log_probs, values, rewards, terminals, indices, bootstrap_value)
