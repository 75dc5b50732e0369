"""PPO as the reference implements it (SPEC 7): GAE returns, the clipped loss and the jitted update.

Network-agnostic: every function takes `apply_fn(params, observations) -> (logits [B, A], value [B])`.
Shapes: T = rollout length, N = parallel envs, B = minibatch size, A = actions; observations may have any
trailing shape ([T, N, 6, 6, 32] latents in this project, [T, N, 4] for the CartPole test).

The whole update (GAE, `epochs` x minibatches) is one jitted function built from `lax.scan`, so it can be
vmapped over a leading seed axis:

    update = make_ppo_update(config.policy, apply_fn, make_optimizer(config.policy))
    params, opt_state, metrics = update(params, opt_state, rollout, bootstrap_value, key)
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from dlwm_jax.config import Config, PolicyConfig
from dlwm_jax.networks.distributions import categorical_log_prob

ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


class Rollout(NamedTuple):
    """Time-major transitions of N envs over T steps (SPEC 7.2); terminal[t] is returned by step t."""
    observations: jax.Array   # [T, N, ...]
    actions: jax.Array        # [T, N] int32
    log_probs: jax.Array      # [T, N] log-probability of the action when it was sampled
    values: jax.Array         # [T, N] V(observation[t]) when it was sampled
    rewards: jax.Array        # [T, N] float32
    terminals: jax.Array      # [T, N] bool


class Minibatch(NamedTuple):
    """Flattened samples the loss sees; leading axis B (SPEC 7.3)."""
    observations: jax.Array   # [B, ...]
    actions: jax.Array        # [B]
    log_probs: jax.Array      # [B] old log-probabilities
    values: jax.Array         # [B] old values
    returns: jax.Array        # [B] GAE returns
    advantages: jax.Array     # [B] returns - old values, not yet normalised


def _policy(config: Config | PolicyConfig) -> PolicyConfig:
    return config.policy if isinstance(config, Config) else config


# --- Categorical(softmax(logits / T)) (SPEC 5: T = 1.5 collecting real data, 1 otherwise) ------------------

def sample_action(logits: jax.Array, key: jax.Array, temperature: float = 1.0) -> jax.Array:
    """logits [..., A] -> sampled actions [...] int32."""
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def log_prob(logits: jax.Array, actions: jax.Array, temperature: float = 1.0) -> jax.Array:
    """logits [..., A], actions [...] -> log-probabilities [...], float32 (categorical_log_prob: its gradient has
    no scatter-add, a GPU kernel fewer on a PPO step's chain and one launch less)."""
    return categorical_log_prob(logits.astype(jnp.float32) / temperature, actions)


def entropy(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """logits [..., A] -> entropy in nats [...], float32."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


# --- Returns (SPEC 7.2) ------------------------------------------------------------------------------------

def gae(rewards: jax.Array, values: jax.Array, terminals: jax.Array, bootstrap_value: jax.Array,
        gamma: float, lam: float) -> jax.Array:
    """GAE returns [T, N] from rewards, values, terminals [T, N] and V(observation[T]) [N] (SPEC 7.2).

    Backwards over t: delta_t = r_t - V_t + gamma * (1 - d_t) * V_{t+1};
    gae_t = delta_t + gamma * lam * (1 - d_t) * gae_{t+1}; return_t = gae_t + V_t; V_T = bootstrap, gae_T = 0.
    """
    chex.assert_rank([rewards, values, terminals, bootstrap_value], [2, 2, 2, 1])
    chex.assert_equal_shape([rewards, values, terminals])

    def backward_step(carry, step):
        next_value, next_gae = carry
        reward, value, terminal = step
        nonterminal = 1.0 - terminal.astype(value.dtype)
        delta = reward - value + gamma * nonterminal * next_value
        advantage = delta + gamma * lam * nonterminal * next_gae
        return (value, advantage), advantage + value

    init = (bootstrap_value.astype(values.dtype), jnp.zeros_like(bootstrap_value, values.dtype))
    # Unrolled: 50 elementwise steps fuse into a few kernels, where a rolled loop costs a GPU host round trip per
    # step (benchmarks/kernels.py); the arithmetic is the same.
    _, returns = jax.lax.scan(backward_step, init, (rewards.astype(values.dtype), values, terminals),
                              reverse=True, unroll=True)
    return returns


# --- Loss (SPEC 7.3) ---------------------------------------------------------------------------------------

def ppo_loss(params: Any, apply_fn: ApplyFn, minibatch: Minibatch, mask: jax.Array,
             config: Config | PolicyConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped PPO loss of one minibatch [B]; `mask` [B] marks valid rows (padding of the short last one).

    Every mean, and the per-minibatch advantage normalisation (unbiased std + 1e-8), runs over valid rows only,
    so a padded minibatch gives exactly the loss of the unpadded one. Returns (total loss, metrics).
    """
    policy = _policy(config)
    chex.assert_rank([minibatch.actions, mask], [1, 1])
    chex.assert_equal_shape([minibatch.actions, minibatch.log_probs, minibatch.values, minibatch.returns,
                             minibatch.advantages, mask])
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask)
    masked_mean = lambda x: jnp.sum(x * mask) / count

    advantage_mean = masked_mean(minibatch.advantages)
    advantage_std = jnp.sqrt(jnp.sum(jnp.square(minibatch.advantages - advantage_mean) * mask) / (count - 1.0))
    advantages = (minibatch.advantages - advantage_mean) / (advantage_std + 1e-8)

    logits, values = apply_fn(params, minibatch.observations)
    values = values.astype(jnp.float32)  # the loss is float32 whatever the network computes in
    chex.assert_shape(values, minibatch.actions.shape)
    new_log_probs = log_prob(logits, minibatch.actions)  # T = 1 in updates (SPEC 5)
    log_ratio = new_log_probs - minibatch.log_probs
    ratio = jnp.exp(log_ratio)
    clipped_ratio = jnp.clip(ratio, 1.0 - policy.clip_epsilon, 1.0 + policy.clip_epsilon)
    surrogate = masked_mean(jnp.minimum(ratio * advantages, clipped_ratio * advantages))
    mean_entropy = masked_mean(entropy(logits))

    clipped_values = minibatch.values + jnp.clip(values - minibatch.values, -policy.value_clip, policy.value_clip)
    value_loss = 0.5 * masked_mean(jnp.maximum(jnp.square(minibatch.returns - values),
                                               jnp.square(minibatch.returns - clipped_values)))

    total = -(surrogate + policy.entropy_coef * mean_entropy) + policy.value_coef * value_loss
    metrics = {
        "loss": total,
        "policy_loss": -surrogate,
        "value_loss": value_loss,
        "entropy": mean_entropy,
        "approx_kl": masked_mean((ratio - 1.0) - log_ratio),
        "clip_fraction": masked_mean((jnp.abs(ratio - 1.0) > policy.clip_epsilon).astype(jnp.float32)),
    }
    return total, metrics


# --- Optimiser and update (SPEC 7.1, 12.2) -----------------------------------------------------------------

def make_optimizer(config: Config | PolicyConfig) -> optax.GradientTransformation:
    """Global-norm clipping (0.5) then Adam (lr 2.5e-4, betas 0.9/0.999, eps 1e-8), constant lr (SPEC 7.1). The
    loop's is flat where compute.flat_optimizer says so (programs.policy_optimizer)."""
    policy = _policy(config)
    return optax.chain(optax.clip_by_global_norm(policy.max_grad_norm),
                       optax.adam(policy.learning_rate, b1=0.9, b2=0.999, eps=1e-8))


def ppo_update(params: Any, opt_state: Any, rollout: Rollout, bootstrap_value: jax.Array, key: jax.Array,
               config: Config | PolicyConfig, apply_fn: ApplyFn, optimizer: optax.GradientTransformation,
               unroll: bool = True) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One PPO update on a rollout [T, N] with V(observation[T]) [N]: GAE, then `epochs` passes of shuffled
    minibatches (SPEC 7.1-7.3). Returns (params, opt_state, metrics averaged over all gradient steps).

    unroll=True unrolls the epoch and minibatch scans (ComputeConfig.ppo_unroll): XLA:CPU runs convolution
    gradients inside a rolled scan body an order of magnitude slower (compare `benchmarks/run.py --set
    compute.ppo_unroll=false`); the result is the same, only compile time grows.

    The horizon's terminals come from the rollout producer (SPEC 7.2: all true at t = T-1 in the reference,
    which multiplies the bootstrap away). T*N samples are permuted afresh each epoch and cut into chunks of
    `minibatch_size`; the short last chunk is padded and masked so every shape is static.
    """
    policy = _policy(config)
    chex.assert_rank([rollout.actions, bootstrap_value], [2, 1])
    num_steps, num_envs = rollout.actions.shape
    returns = gae(rollout.rewards, rollout.values, rollout.terminals, bootstrap_value,
                  policy.gamma, policy.gae_lambda)
    flatten = lambda x: x.reshape(num_steps * num_envs, *x.shape[2:])
    samples = Minibatch(observations=flatten(rollout.observations), actions=flatten(rollout.actions),
                        log_probs=flatten(rollout.log_probs), values=flatten(rollout.values),
                        returns=flatten(returns), advantages=flatten(returns - rollout.values))

    num_samples = num_steps * num_envs
    batch_size = min(policy.minibatch_size, num_samples)
    num_batches = -(-num_samples // batch_size)
    padding = num_batches * batch_size - num_samples
    masks = (jnp.arange(num_batches * batch_size) < num_samples).reshape(num_batches, batch_size)
    grad_fn = jax.value_and_grad(ppo_loss, has_aux=True)
    names = []  # the metrics' names, in the order a step stacks them

    def minibatch_step(carry, batch_and_mask):
        params, opt_state = carry
        batch, mask = batch_and_mask
        if unroll:  # the minibatch gathered before the loss reads it: unrolled, XLA's GPU compiler (jaxlib 0.10.2)
            batch, mask = jax.lax.optimization_barrier((batch, mask))  # failed to tile a GEMM fusion that took it in
        (_, metrics), grads = grad_fn(params, apply_fn, batch, mask, policy)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # of the parameters as one vector, as optax.flatten lays them out: a flat optimizer's clip computes it too
        flat_grads = jnp.concatenate([jnp.reshape(g, [-1]) for g in jax.tree.leaves(grads)])
        metrics = {**metrics, "grad_norm": optax.tree.norm(flat_grads)}
        names[:] = list(metrics)
        # One vector per step: a rolled scan writes each of its outputs per step (a GPU kernel each)
        return (params, opt_state), jnp.stack([metrics[k] for k in names])

    def epoch(carry, epoch_key):
        order = jax.random.permutation(epoch_key, num_samples)
        order = jnp.concatenate([order, jnp.zeros((padding,), order.dtype)])  # padded rows are masked out
        batches = jax.tree.map(lambda x: x[order].reshape(num_batches, batch_size, *x.shape[1:]), samples)
        return jax.lax.scan(minibatch_step, carry, (batches, masks), unroll=unroll)

    epoch_keys = jax.random.split(key, policy.epochs)
    (params, opt_state), metrics = jax.lax.scan(epoch, (params, opt_state), epoch_keys, unroll=unroll)
    means = jnp.mean(metrics, (0, 1))
    return params, opt_state, {k: means[i] for i, k in enumerate(names)}


def make_ppo_update(config: Config | PolicyConfig, apply_fn: ApplyFn, optimizer: optax.GradientTransformation,
                    unroll: bool = True) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
    """Jitted `update(params, opt_state, rollout, bootstrap_value, key)` with config/network/optimizer fixed.

    For several seeds at once use `jax.vmap(update)` on arguments with a leading seed axis.
    """
    return jax.jit(functools.partial(ppo_update, config=_policy(config), apply_fn=apply_fn, optimizer=optimizer,
                                     unroll=unroll))
