"""World-model training: VQ-VAE (SPEC 3.7) and dynamics (SPEC 4.6) losses, their state and pure steps
(`(state, batch, key) -> (state, metrics)`, uncompiled: programs.py compiles them for the seed axis, epochs.py
owns the warm-up / joint epoch schedule of SPEC 8.3), the eval-mode encoder used by imagination and acting, and the
world-model diagnostics.

`WorldModelState` carries the config and the action count as static (non-pytree) fields, so the steps rebuild
the Flax modules and optimizers from them and need no other arguments; jit caches per config.

Padding. Replay pads an epoch's last batch to full size by repeating earlier items of the epoch, flagged by
`valid`. Losses, the EMA codebook update, the usage trace and all metrics count valid rows only. BatchNorm batch
statistics (VQ-VAE step, and the train-mode encoding of dynamics targets, SPEC 3.8) do include the padded
rows: they are duplicates of real frames of the same epoch, so this only re-weights a few frames once per epoch.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlwm_jax.config import Config, resolve_compute
from dlwm_jax.networks import Networks, init_variables, make_networks
from dlwm_jax.networks.distributions import (categorical_log_prob, continuous_bernoulli_log_prob, gumbel_noise,
                                             sample_categorical)
from dlwm_jax.networks.convlstm import parameter_grads
from dlwm_jax.networks.dynamics import CELLS, dynamics_cell, initial_state, is_reward_head
from dlwm_jax.networks.vqvae import Codebook, ema_update, init_codebook, quantize, straight_through
from dlwm_jax.replay import ObservationBatch, SequenceBatch

Metrics = dict[str, jax.Array]
Progress = Callable[[str, int, Any], None]  # (kind "vqvae" | "dynamics", last slot dispatched, None): heartbeats


@flax.struct.dataclass
class WorldModelState:
    encoder_params: Any
    encoder_batch_stats: Any      # BN running statistics (SPEC 3.1, 3.8); not trained by gradient
    decoder_params: Any
    codebook: Codebook            # EMA codebook and its accumulators (SPEC 3.5); not trained by gradient
    vqvae_opt_state: optax.OptState
    dynamics_params: Any
    dynamics_opt_state: optax.OptState
    vqvae_steps: jax.Array        # [] int32
    dynamics_steps: jax.Array     # [] int32
    codebook_usage: jax.Array     # [K] decayed index counts (logging only, SPEC 3.7)
    config: Config = flax.struct.field(pytree_node=False)
    num_actions: int = flax.struct.field(pytree_node=False)

    @property
    def networks(self) -> Networks:
        return make_networks(self.config, self.num_actions)


# ------------------------------------------------------------------------------------------- optimizers

def vqvae_optimizer(config: Config) -> optax.GradientTransformation:
    """Adam(1e-4, eps 1e-8) on encoder + decoder (SPEC 8.2). The warm-up multiplier is applied by the step
    (Adam's update is linear in the learning rate, so scaling the update is exact)."""
    return flat_if(config, optax.adam(config.vqvae.learning_rate, b1=0.9, b2=0.999, eps=1e-8))


def dynamics_param_labels(params: Any) -> Any:
    """'reward' for the reward head, 'dynamics' for the cells and the next-latent head (SPEC 8.2)."""
    def label(path, _):
        return "reward" if is_reward_head(tuple(str(getattr(p, "key", p)) for p in path)) else "dynamics"
    return jax.tree_util.tree_map_with_path(label, params)


def dynamics_optimizer(config: Config) -> optax.GradientTransformation:
    """Adam 5e-4 for cells + next-latent head, Adam 1e-3 for the reward head; no clipping (SPEC 8.2)."""
    d = config.dynamics
    return optax.multi_transform({"dynamics": flat_if(config, optax.adam(d.learning_rate, eps=1e-8)),
                                  "reward": flat_if(config, optax.adam(d.reward_learning_rate, eps=1e-8))},
                                 dynamics_param_labels)


def flat_if(config: Config, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` on one vector of the parameters it updates where compute.flat_optimizer says so (the backend's
    choice for an unresolved config, as init_world_model resolves it): the same update, element for element (a
    clip's norm summed in one sum). The world model's optimizers and the policy's (programs.policy_optimizer)."""
    return optax.flatten(optimizer) if config.compute.resolve().flat_optimizer else optimizer


def init_world_model(config: Config, num_actions: int, key: jax.Array) -> WorldModelState:
    """Fresh world model: PyTorch-default initialisation (SPEC 12.3), zero optimizer moments and counters. The
    state holds `config` resolved for this backend (config.resolve_compute): its steps read the formulations."""
    config = resolve_compute(config)
    key_networks, key_codebook = jax.random.split(key)
    variables = init_variables(make_networks(config, num_actions), config, key_networks)
    encoder, decoder, dynamics = variables["encoder"], variables["decoder"], variables["dynamics"]
    vqvae_params = {"encoder": encoder["params"], "decoder": decoder["params"]}
    return WorldModelState(
        encoder_params=encoder["params"], encoder_batch_stats=encoder["batch_stats"],
        decoder_params=decoder["params"],
        codebook=init_codebook(key_codebook, config.vqvae.num_codes, config.vqvae.code_dim),
        vqvae_opt_state=vqvae_optimizer(config).init(vqvae_params),
        dynamics_params=dynamics["params"],
        dynamics_opt_state=dynamics_optimizer(config).init(dynamics["params"]),
        vqvae_steps=jnp.zeros((), jnp.int32), dynamics_steps=jnp.zeros((), jnp.int32),
        codebook_usage=jnp.zeros((config.vqvae.num_codes,), jnp.float32),
        config=config, num_actions=num_actions)


# ------------------------------------------------------------------------------------------------ encoding

def encode(state: WorldModelState, observations: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eval-mode encoding (BN running stats, SPEC 3.8) for imagination starts and acting.

    observations uint8 [B, 96, 96, C] -> (indices int32 [B, 6, 6], z_q float32 [B, 6, 6, D]).
    """
    chex.assert_rank(observations, 4)
    z_e = state.networks.encoder.apply({"params": state.encoder_params, "batch_stats": state.encoder_batch_stats},
                                       observations, train=False)
    return quantize(z_e, state.codebook.embeddings)


def _encode_train(state: WorldModelState, params: Any, observations: jax.Array) -> tuple[jax.Array, Any]:
    """Train-mode encoder (batch statistics): observations [N, 96, 96, C] -> (z_e [N, 6, 6, D], new batch_stats)."""
    z_e, updates = state.networks.encoder.apply({"params": params, "batch_stats": state.encoder_batch_stats},
                                                observations, train=True, mutable=["batch_stats"])
    return z_e, updates["batch_stats"]


# ---------------------------------------------------------------------------------------------- VQ-VAE

def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean of values [B] over rows with weight 1 (weights float [B]); 0 if there are none."""
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def vqvae_loss(vqvae_params: Any, state: WorldModelState, batch: ObservationBatch):
    """-ELBO + commitment (SPEC 3.7) on valid rows, with the pre-update codebook; BN in train mode.

    vqvae_params {'encoder', 'decoder'}; batch.observations uint8 [B, 96, 96, C], batch.valid bool [B].
    Returns (loss, (metrics, z_e [B, 6, 6, D], indices [B, 6, 6], new batch_stats)).
    """
    v = state.config.vqvae
    weights = batch.valid.astype(jnp.float32)
    z_e, batch_stats = _encode_train(state, vqvae_params["encoder"], batch.observations)
    indices, z_q = quantize(z_e, state.codebook.embeddings)
    logits = state.networks.decoder.apply({"params": vqvae_params["decoder"]}, straight_through(z_e, z_q))
    pixels = batch.observations.astype(jnp.float32) / 255.0
    log_likelihood = _masked_mean(
        continuous_bernoulli_log_prob(pixels, logits, v.exact_cb_normaliser).sum((1, 2, 3)), weights)
    kl = z_e.shape[1] * z_e.shape[2] * math.log(v.num_codes)  # uniform prior: constant 36 ln K
    z_e_loss = _masked_mean(jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z_e), (1, 2, 3)), weights)
    commitment = v.commitment_cost * z_e_loss
    loss = -(log_likelihood - kl) + commitment
    metrics = {"loss": loss, "recon_nll": -log_likelihood, "elbo": log_likelihood - kl,
               "commitment_loss": commitment, "z_e_loss": z_e_loss}
    return loss, (metrics, z_e, indices, batch_stats)


def _usage_metrics(batch_counts: jax.Array, trace: jax.Array) -> Metrics:
    """Codebook usage (SPEC 3.7): fraction of codes used in the batch; batch perplexity; and the decayed trace
    normalised, rounded to 2 decimals and renormalised -> fraction of codes with mass, entropy (nats)."""
    k = batch_counts.shape[0]
    entropy = lambda p: -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    batch_p = batch_counts / jnp.maximum(batch_counts.sum(), 1.0)
    rounded = jnp.round(trace / jnp.maximum(trace.sum(), 1e-12), 2)
    rounded = rounded / jnp.maximum(rounded.sum(), 1e-12)
    return {"codebook_usage_batch": jnp.sum(batch_counts > 0) / k, "perplexity": jnp.exp(entropy(batch_p)),
            "codebook_usage_trace": jnp.sum(rounded > 0) / k, "codebook_entropy_trace": entropy(rounded)}


def vqvae_step(state: WorldModelState, batch: ObservationBatch, lr_scale: jax.Array | float = 1.0):
    """One VQ-VAE step (SPEC 3.7): forward -> EMA codebook update -> Adam step at lr * lr_scale.

    lr_scale is warmup_lr_multiplier during warm-up epochs and 1 otherwise (SPEC 8.2); pass it traced (a float32
    array) for one compilation of both. batch.observations uint8 [B, 96, 96, C], batch.valid bool [B].
    Returns (new state, scalar metrics). Pure and uncompiled: programs.py compiles it (ComputeConfig's XLA options).
    """
    chex.assert_rank(batch.observations, 4)
    v = state.config.vqvae
    params = {"encoder": state.encoder_params, "decoder": state.decoder_params}
    grads, (metrics, z_e, indices, batch_stats) = jax.grad(vqvae_loss, has_aux=True)(params, state, batch)
    # EMA (SPEC 3.5) over valid rows only: padded rows get the out-of-range index K, whose one-hot is zero.
    masked_indices = jnp.where(batch.valid[:, None, None], indices, v.num_codes)
    codebook = ema_update(state.codebook, z_e, masked_indices, v.ema_decay, v.ema_epsilon, v.ema_debias_counts)
    updates, opt_state = vqvae_optimizer(state.config).update(grads, state.vqvae_opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: u * lr_scale, updates))
    counts = jax.nn.one_hot(masked_indices.reshape(-1), v.num_codes).sum(0)
    usage = v.ema_decay * state.codebook_usage + counts
    metrics.update(_usage_metrics(counts, usage))
    new_state = state.replace(encoder_params=params["encoder"], encoder_batch_stats=batch_stats,
                              decoder_params=params["decoder"], codebook=codebook, vqvae_opt_state=opt_state,
                              vqvae_steps=state.vqvae_steps + 1, codebook_usage=usage)
    return new_state, metrics


# --------------------------------------------------------------------------------------------- dynamics

def reward_class(rewards: jax.Array) -> jax.Array:
    """Raw float rewards -> classes {0, 1, 2} = round(clip(r, -1, 1)) + 1, round half to even (SPEC 4.4)."""
    return jnp.round(jnp.clip(rewards, -1.0, 1.0)).astype(jnp.int32) + 1


def prediction_mask(terminals: jax.Array, valid: jax.Array, reference: bool = True) -> jax.Array:
    """Which next-latent predictions count: bool [T-1, B] from terminals [T, B] and valid [B] (SPEC 4.6, 11.2.1).

    The prediction made at step t targets observation t+1. If terminal_t, observation t+1 is the first frame of
    a NEW episode, which the past cannot predict: the correct mask is ~terminal_t (reference=False). The
    reference masks ~terminal_{t+1} instead, i.e. it drops the (predictable) last frame of an episode and keeps
    the unpredictable reset frame (reference=True, the default).
    """
    done = terminals[1:] if reference else terminals[:-1]
    return ~done & valid[None, :]


class DynamicsUnroll(NamedTuple):
    """Per-step results of the 10-step unroll, each [T-1, B]."""
    next_latent_nll: jax.Array   # -sum over the 36 positions of log p(z*_{t+1})
    next_latent_acc: jax.Array   # fraction of the 36 sampled indices equal to z*_{t+1}
    include: jax.Array           # bool, prediction_mask
    reward_nll: jax.Array
    reward_class: jax.Array      # int32 target class of reward_t
    reward_pred: jax.Array       # int32 argmax of the reward logits
    residuals: Any = None        # with taps: per cell, its sown RESIDUALS of every step, each [T-1, B, ...]


def dynamics_unroll(dynamics_params: Any, state: WorldModelState, indices: jax.Array, actions: jax.Array,
                    rewards: jax.Array, terminals: jax.Array, valid: jax.Array, key: jax.Array,
                    context_length: int | None = None, taps: Any = None) -> DynamicsUnroll:
    """The loop of SPEC 4.6 step 3, on latent indices (the seam that lets tests bypass the encoder).

    indices int32 [T, B, 6, 6] (true codes z*), actions int32 [T, B], rewards float [T, B], terminals bool [T, B],
    valid bool [B]. Inputs are the true embeddings for t < context and the embeddings of the indices sampled at
    step t-1 afterwards (no gradient through samples); the recurrent state is zeroed after step t where
    terminal_t. One key per step, split once here. context_length (static) defaults to dynamics.context_length;
    the diagnostics pass T to teacher-force every step. taps ({"cell1", "cell2"}: zeros [T-1, B, 6, 6, 4 Hc]):
    the cells' parameters enter the recurrence without gradient, each step adds its taps to the cells' gates and
    the unroll returns their residuals (dynamics_grads).
    """
    chex.assert_rank(indices, 4)
    chex.assert_equal_shape([actions, rewards, terminals])
    d = state.config.dynamics
    context_length = d.context_length if context_length is None else context_length
    num_steps, batch_size = indices.shape[0] - 1, indices.shape[1]
    embeddings = state.codebook.embeddings
    dynamics = state.networks.dynamics
    # Each step's sample as jax.random.categorical(key_t, logits) with key_t = split(key, num_steps)[t], its noise
    # drawn for all steps at once (one batched draw, not one per step)
    noise = gumbel_noise(jax.random.split(key, num_steps), (*indices.shape[1:], embeddings.shape[0]))

    def step(carry, x):
        recurrent, sampled = carry
        teacher_forced, true_index, action, terminal, step_noise, tap = x
        inputs = jnp.where(teacher_forced, embeddings[true_index], embeddings[sampled])
        if tap is None:
            (y, recurrent), residuals = dynamics.apply({"params": dynamics_params}, inputs, action, recurrent,
                                                       method="recur"), None
        else:
            (y, recurrent), variables = dynamics.apply({"params": jax.lax.stop_gradient(dynamics_params)}, inputs,
                                                       action, recurrent, tap, method="recur",
                                                       mutable=["intermediates"])
            residuals = jax.tree.map(lambda sown: sown[0], variables["intermediates"],
                                     is_leaf=lambda v: isinstance(v, tuple))
        # The next input's sample only: the loss reads the heads run once on every step's y, after the scan.
        logits = dynamics.apply({"params": jax.lax.stop_gradient(dynamics_params)}, jax.lax.stop_gradient(y),
                                method="latent_head")
        sampled = sample_categorical(step_noise, logits)
        keep = 1.0 - terminal.astype(jnp.float32)
        recurrent = jax.tree.map(lambda s: s * keep[:, None, None, None], recurrent)
        return (recurrent, sampled), (y, sampled, residuals)

    classes = reward_class(rewards)
    # A constant, not an iota: in an unrolled scan XLA folds each step's flag and drops the other input, so the
    # context's steps wait for no sample (an iota's slices are not folded: the samples were on the chain)
    teacher_forced = np.arange(num_steps) < context_length
    xs = (teacher_forced, indices[:-1], actions[:-1], terminals[:-1], noise, taps)
    carry = (initial_state(batch_size, d.hidden_channels, indices.shape[2]), jnp.zeros_like(indices[0]))
    _, (ys, sampled, residuals) = jax.lax.scan(step, carry, xs, unroll=state.config.compute.dynamics_unroll)
    # The heads feed nothing back into the recurrence: one batched pass over all steps (and one backward pass).
    logits, reward_logits = dynamics.apply({"params": dynamics_params}, ys.reshape(-1, *ys.shape[2:]),
                                           method="heads")
    logits = logits.reshape(num_steps, batch_size, *logits.shape[1:])
    reward_logits = reward_logits.reshape(num_steps, batch_size, -1)
    targets = indices[1:]
    nll = -categorical_log_prob(logits, targets).sum((2, 3))
    acc = jnp.mean(sampled == targets, (2, 3))
    reward_nll = -categorical_log_prob(reward_logits, classes[:-1])
    reward_pred = jnp.argmax(reward_logits, -1).astype(jnp.int32)
    include = prediction_mask(terminals, valid, d.reference_terminal_mask)
    return DynamicsUnroll(nll, acc, include, reward_nll, classes[:-1], reward_pred, residuals)


def dynamics_loss(dynamics_params: Any, state: WorldModelState, indices: jax.Array, actions: jax.Array,
                  rewards: jax.Array, terminals: jax.Array, valid: jax.Array, key: jax.Array):
    """next_latent_loss + reward_loss_weight * reward_loss (SPEC 4.6 steps 4-7). Arguments as dynamics_unroll.
    Returns (loss, metrics): unroll_loss of the unroll."""
    return unroll_loss(state, dynamics_unroll(dynamics_params, state, indices, actions, rewards, terminals, valid,
                                              key), valid)


def unroll_loss(state: WorldModelState, out: DynamicsUnroll, valid: jax.Array):
    """(loss, metrics) of an unroll. next_latent_loss: per-sample sum over positions, mean over included (t, b);
    reward_loss: mean over all valid (t, b); per-class reward accuracy is -1 where the class is absent."""
    include = out.include.astype(jnp.float32)
    valid_steps = jnp.broadcast_to(valid[None, :], include.shape).astype(jnp.float32)
    count = jnp.maximum(include.sum(), 1.0)
    next_latent_loss = jnp.sum(out.next_latent_nll * include) / count
    reward_loss = jnp.sum(out.reward_nll * valid_steps) / jnp.maximum(valid_steps.sum(), 1.0)
    loss = next_latent_loss + state.config.dynamics.reward_loss_weight * reward_loss
    metrics = {"loss": loss, "next_latent_loss": next_latent_loss, "reward_loss": reward_loss,
               "next_latent_acc": jnp.sum(out.next_latent_acc * include) / count,
               "next_latent_count": include.sum()}
    for c in range(state.config.dynamics.num_reward_classes):
        of_class = valid_steps * (out.reward_class == c)
        correct = jnp.sum(of_class * (out.reward_pred == c))
        metrics[f"reward_count_{c}"] = of_class.sum()
        metrics[f"reward_correct_{c}"] = correct
        metrics[f"reward_acc_{c}"] = jnp.where(of_class.sum() > 0, correct / jnp.maximum(of_class.sum(), 1.0), -1.0)
    return loss, metrics


def dynamics_grads(dynamics_params: Any, state: WorldModelState, indices: jax.Array, actions: jax.Array,
                   rewards: jax.Array, terminals: jax.Array, valid: jax.Array, key: jax.Array):
    """jax.grad(dynamics_loss, has_aux=True)'s value, the cells' parameter gradients summed over the steps in one
    batched pass each (convlstm.parameter_grads) instead of one per step inside the unroll: the same sums in
    another order (tests/test_world_model.py), and far fewer operations, each of which a GPU runs as a kernel of
    its own (benchmarks/kernels.py). The backward pass through the unroll carries the cotangents of the states
    and of each step's gates (the taps), not of the cells' parameters.
    """
    steps, batch = indices.shape[0] - 1, indices.shape[1]
    dynamics = state.networks.dynamics
    gates = (steps, batch, *indices.shape[2:], 4 * dynamics.hidden_channels)

    def loss(params, taps):
        out = dynamics_unroll(params, state, indices, actions, rewards, terminals, valid, key, taps=taps)
        loss, metrics = unroll_loss(state, out, valid)
        return loss, (metrics, out.residuals)

    taps = {cell: jnp.zeros(gates, jnp.float32) for cell in CELLS}
    (grads, d_taps), (metrics, residuals) = jax.grad(loss, (0, 1), has_aux=True)(dynamics_params, taps)
    steps_as_batch = lambda x: x.reshape(steps * batch, *x.shape[2:])
    cell = dynamics_cell(dynamics)
    for name in CELLS:  # the unroll's own gradients of these parameters are zeros (stop_gradient): replaced
        grads = {**grads, name: parameter_grads(cell, dynamics_params[name],
                                                jax.tree.map(steps_as_batch, residuals[name]),
                                                steps_as_batch(d_taps[name]))}
    return grads, metrics


def dynamics_update(state: WorldModelState, indices: jax.Array, actions: jax.Array, rewards: jax.Array,
                    terminals: jax.Array, valid: jax.Array, key: jax.Array):
    """One dynamics Adam step on given true indices [T, B, 6, 6] (encoder bypassed; arguments as
    dynamics_unroll). Returns (new state, scalar metrics)."""
    grads, metrics = dynamics_grads(state.dynamics_params, state, indices, actions, rewards, terminals, valid, key)
    updates, opt_state = dynamics_optimizer(state.config).update(grads, state.dynamics_opt_state,
                                                                 state.dynamics_params)
    params = optax.apply_updates(state.dynamics_params, updates)
    return state.replace(dynamics_params=params, dynamics_opt_state=opt_state,
                         dynamics_steps=state.dynamics_steps + 1), metrics


def dynamics_step(state: WorldModelState, batch: SequenceBatch, key: jax.Array):
    """One dynamics step (SPEC 4.6) on a time-major batch (observations uint8 [T, B, 96, 96, C]): encode_sequences,
    then dynamics_update. The loop runs the two parts through slots.py (encode_slot, dynamics_slot): on the CPU as
    two programs (the encoder pass gets the VQ-VAE step's XLA options, the ConvLSTM update XLA's defaults), on
    accelerators inside one scanned chunk. Returns (new state, scalar metrics).
    """
    chex.assert_rank(batch.observations, 5)
    indices, batch_stats = encode_sequences(state, batch.observations)
    return dynamics_update(state.replace(encoder_batch_stats=batch_stats), indices, batch.actions, batch.rewards,
                           batch.terminals, batch.valid, key)


def encode_sequences(state: WorldModelState, observations: jax.Array) -> tuple[jax.Array, Any]:
    """Train-mode encoder pass without gradient: uint8 [T, B, 96, 96, C] -> (indices [T, B, 6, 6], batch_stats).
    As in the reference (SPEC 3.8, 11.2.3) the dynamics step's encoding updates the BN running statistics."""
    t, b = observations.shape[:2]
    z_e, batch_stats = _encode_train(state, state.encoder_params, observations.reshape(t * b, *observations.shape[2:]))
    indices, _ = quantize(jax.lax.stop_gradient(z_e), state.codebook.embeddings)
    return indices.reshape(t, b, *indices.shape[1:]), batch_stats


# ------------------------------------------------------------------------------------------ diagnostics

DIAGNOSTIC_HORIZONS = (1, 5, 10)      # open-loop steps after the context at which latent accuracy is reported
REWARD_CLASS_NAMES = ("neg", "zero", "pos")


def diagnostic_window_length(config: Config) -> int:
    """Steps per diagnostic window: the dynamics context plus the longest open-loop horizon (4 + 10 = 14)."""
    return config.dynamics.context_length + max(DIAGNOSTIC_HORIZONS)


def world_model_diagnostics(state: WorldModelState, observations: jax.Array, actions: jax.Array, rewards: jax.Array,
                            key: jax.Array) -> Metrics:
    """How well the world model predicts real windows it has not trained on (none crosses an episode end).

    observations uint8 [T, B, 96, 96, C] with T = diagnostic_window_length, actions int32 [T, B], rewards float
    [T, B]. Codes come from the eval-mode encoder, as a dream's start does. Returns scalars:
      latent_acc_<k>: fraction of the 36 codes sampled k steps after the context equal to the true codes; open
        loop: after `context_length` true frames the model reads its own samples, as in a dream (k = 1, 5, 10);
      copy_acc_<k>: the same for the trivial prediction "the last context frame again" (what is static);
      reward_<true>_as_<pred>: counts of the teacher-forced (true codes at every step) arg-max reward class per
        true class (neg / zero / pos) over all T-1 steps: the reward head on states the data really visited.
    """
    chex.assert_rank(observations, 5)
    t, b = observations.shape[:2]
    context = state.config.dynamics.context_length
    indices, _ = encode(state, observations.reshape(t * b, *observations.shape[2:]))
    indices = indices.reshape(t, b, *indices.shape[1:])
    no_ends, valid = jnp.zeros((t, b), bool), jnp.ones((b,), bool)
    open_loop = dynamics_unroll(state.dynamics_params, state, indices, actions, rewards, no_ends, valid, key)
    forced = dynamics_unroll(state.dynamics_params, state, indices, actions, rewards, no_ends, valid, key,
                             context_length=t)
    metrics = {}
    for k in DIAGNOSTIC_HORIZONS:  # prediction k targets frame context-1+k, made at scan step context-2+k
        metrics[f"latent_acc_{k}"] = jnp.mean(open_loop.next_latent_acc[context - 2 + k])
        metrics[f"copy_acc_{k}"] = jnp.mean(indices[context - 1] == indices[context - 1 + k])
    for c, true_name in enumerate(REWARD_CLASS_NAMES):
        for p, pred_name in enumerate(REWARD_CLASS_NAMES):
            metrics[f"reward_{true_name}_as_{pred_name}"] = jnp.sum((forced.reward_class == c) & (forced.reward_pred == p))
    return metrics


def diagnostic_summary(metrics: dict[str, float]) -> str:
    """The diagnostics in one progress-line fragment: open-loop accuracy (copy baseline) and reward recall."""
    acc = "/".join(f"{metrics[f'latent_acc_{k}']:.2f}" for k in DIAGNOSTIC_HORIZONS)
    copy = "/".join(f"{metrics[f'copy_acc_{k}']:.2f}" for k in DIAGNOSTIC_HORIZONS)
    recall = lambda name: f"{metrics[f'reward_{name}_as_{name}']:.0f}/" \
                          f"{sum(metrics[f'reward_{name}_as_{p}'] for p in REWARD_CLASS_NAMES):.0f}"
    false_pos = sum(metrics[f"reward_zero_as_{p}"] for p in ("neg", "pos"))
    return (f"latent acc @1/5/10 {acc} (copy {copy}); reward recall +{recall('pos')} -{recall('neg')}, "
            f"false +/- {false_pos:.0f}")


# --------------------------------------------------------------------------------------------- schedule

def average_metrics(history: list[Metrics]) -> dict[str, float]:
    """Mean of each metric over steps; counts/corrects are summed and reward accuracies recomputed from them."""
    if not history:
        return {}
    history = jax.device_get(history)
    sums = {k: float(np.sum([m[k] for m in history], dtype=np.float64)) for k in history[0]}
    return metrics_from_sums({**sums, "steps": float(len(history))})


def metrics_from_sums(sums: dict[str, float]) -> dict[str, float]:
    """The sums of each metric over the steps taken and their number (sums["steps"], kept) -> the mean of each,
    except counts/corrects (summed) and reward accuracies (recomputed from them); {} if no step was taken. The
    epochs' metrics are summed on the device (slots.py)."""
    steps = float(sums["steps"])
    if steps == 0:
        return {}
    result = {k: float(v) if k.startswith(("reward_count_", "reward_correct_")) or k in ("next_latent_count", "steps")
              else float(v) / steps for k, v in sums.items()}
    for k in sums:
        if k.startswith("reward_acc_"):
            c = k.rsplit("_", 1)[1]
            n = result[f"reward_count_{c}"]
            result[k] = result[f"reward_correct_{c}"] / n if n > 0 else -1.0
    return result
