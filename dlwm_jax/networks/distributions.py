"""Continuous Bernoulli pixel likelihood (SPEC 3.6) and categorical helpers."""
from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = float(jnp.finfo(jnp.float32).eps)  # torch clamps probabilities to [eps, 1 - eps]
_LIMS = (0.499, 0.501)                    # torch's Taylor-expansion region around p = 0.5


def _reference_log_norm(logits: jax.Array) -> jax.Array:
    """log C(p) exactly as torch.distributions.ContinuousBernoulli computes it (clipped p, Taylor near 0.5).

    The unselected branch of each `where` gets a harmless dummy input so gradients stay finite.
    """
    p = jnp.clip(jax.nn.sigmoid(logits), _EPS, 1.0 - _EPS)
    outside = (p <= _LIMS[0]) | (p > _LIMS[1])
    safe_p = jnp.where(outside, p, _LIMS[0])
    log_ratio = jnp.log(jnp.abs(jnp.log1p(-safe_p) - jnp.log(safe_p)))
    low = safe_p <= 0.5
    stable = log_ratio - jnp.where(low, jnp.log1p(-2.0 * jnp.where(low, safe_p, 0.0)),
                                   jnp.log(2.0 * jnp.where(low, 1.0, safe_p) - 1.0))
    x2 = jnp.square(p - 0.5)
    taylor = jnp.log(2.0) + (4.0 / 3.0 + 104.0 / 45.0 * x2) * x2
    return jnp.where(outside, stable, taylor)


def _exact_log_norm(logits: jax.Array) -> jax.Array:
    """log C = log(l / tanh(l/2)), the exact normaliser for unclipped p = sigmoid(l); series near l = 0."""
    small = jnp.abs(logits) < 1e-2
    safe = jnp.where(small, 1.0, logits)
    exact = jnp.log(safe / jnp.tanh(safe / 2.0))
    l2 = jnp.square(logits)
    series = jnp.log(2.0) + l2 / 12.0 - l2 * l2 / 1440.0
    return jnp.where(small, series, exact)


def continuous_bernoulli_log_norm(logits: jax.Array, exact: bool = False) -> jax.Array:
    """Log-normaliser log C of a continuous Bernoulli with the given logits, elementwise.

    exact=False reproduces the reference (torch clamps p to [eps, 1-eps], so log C saturates at
    ~2.769 for |logits| > 15.9); exact=True is the mathematically exact normaliser for any logit.
    """
    return _exact_log_norm(logits) if exact else _reference_log_norm(logits)


def continuous_bernoulli_log_prob(x: jax.Array, logits: jax.Array, exact: bool = False) -> jax.Array:
    """Elementwise log p(x | logits) for x in [0, 1]: -BCEWithLogits(l, x) + log C (SPEC 3.6), in float32."""
    x, logits = x.astype(jnp.float32), logits.astype(jnp.float32)
    bce = jnp.maximum(logits, 0.0) - logits * x + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return -bce + continuous_bernoulli_log_norm(logits, exact)


def continuous_bernoulli_mean(logits: jax.Array) -> jax.Array:
    """Distribution mean, used as the 'reconstruction' in images (SPEC 3.6); never used in training."""
    p = jnp.clip(jax.nn.sigmoid(logits), _EPS, 1.0 - _EPS)
    outside = (p <= _LIMS[0]) | (p > _LIMS[1])
    safe_p = jnp.where(outside, p, _LIMS[0])
    stable = safe_p / (2.0 * safe_p - 1.0) + 1.0 / (jnp.log1p(-safe_p) - jnp.log(safe_p))
    d = p - 0.5
    taylor = 0.5 + (1.0 / 3.0 + 16.0 / 45.0 * jnp.square(d)) * d
    return jnp.where(outside, stable, taylor)


def categorical_log_prob(logits: jax.Array, index: jax.Array) -> jax.Array:
    """log softmax(logits)[index] along the last axis, in float32; index has logits.shape[:-1]. Picked by a one-hot
    product, not a gather: its gradient is elementwise instead of a scatter-add, and value and gradient are bitwise
    the gather's (x * 1 and the zeros added are exact)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(log_probs * jax.nn.one_hot(index, log_probs.shape[-1], dtype=log_probs.dtype), axis=-1)


def gumbel_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Float32 Gumbel noise [len(keys), *shape], one draw of `shape` per key: what jax.random.categorical(key,
    logits of `shape`) adds to float32 logits, drawn for every step of a scan at once (one batched draw, not one
    per step: a GPU kernel each)."""
    return jax.vmap(lambda key: jax.random.gumbel(key, shape, jnp.float32))(keys)


def sample_categorical(noise: jax.Array, logits: jax.Array) -> jax.Array:
    """argmax(noise + logits) along the last axis, int32: jax.random.categorical(key, logits) for float32 logits
    when noise is gumbel_noise of that key (bitwise: tests/test_imagination.py); lower-precision logits are
    sampled in float32."""
    return jnp.argmax(noise + logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
