"""Flax Linen modules of the world model and the agent; use them only through init/apply.

`make_networks(config, num_actions)` builds every module from the config tree in one place (with the compute
formulations resolved for the current backend when the config leaves them to its target).
"""
from __future__ import annotations

from typing import NamedTuple

from dlwm_jax.config import Config, resolve_compute
from dlwm_jax.networks.actor_critic import ActorCritic
from dlwm_jax.networks.dynamics import Dynamics
from dlwm_jax.networks.vqvae import Decoder, Encoder


class Networks(NamedTuple):
    encoder: Encoder
    decoder: Decoder
    dynamics: Dynamics
    actor_critic: ActorCritic
    dream_dynamics: Dynamics  # the same network and parameters, convolutions as imagination computes them


def make_networks(config: Config, num_actions: int) -> Networks:
    """Every module, its convolutions as `config.compute` says; an unresolved config is resolved here for JAX's
    default backend (a no-op for a resolved one, e.g. a training run's or a checkpoint's)."""
    import jax.numpy as jnp
    config = resolve_compute(config)
    v, d, p = config.vqvae, config.dynamics, config.policy
    dtype = jnp.dtype(config.compute.dtype)  # activations and matmuls; parameters stay float32
    dynamics = Dynamics(num_actions, v.num_codes, d.hidden_channels, d.kernel_size, d.forget_bias,
                        d.reward_conv_channels, d.reward_hidden, d.num_reward_classes, d.layer_norm_epsilon,
                        config.compute.lstm_conv, dtype, config.compute.layer_norm,
                        config.env.image_size // 16)
    return Networks(
        encoder=Encoder(v.code_dim, v.channels, v.batch_norm_momentum, v.batch_norm_epsilon, dtype,
                        config.compute.vqvae_conv, config.compute.batch_norm),
        decoder=Decoder(config.env.frame_stack, v.channels, config.compute.upsample, dtype, config.compute.vqvae_conv),
        dynamics=dynamics,
        actor_critic=ActorCritic(num_actions, p.conv_channels, p.hidden, p.layer_norm_epsilon, config.compute.policy_conv,
                                 dtype, config.compute.layer_norm),
        dream_dynamics=dynamics.clone(conv_impl=config.compute.dream_lstm_conv),
    )


def example_inputs(config: Config):
    """Shape-only example inputs (batch 1) for init: observation, latent, action."""
    import jax.numpy as jnp
    size, grid = config.env.image_size, config.env.image_size // 16
    return (jnp.zeros((1, size, size, config.env.frame_stack), jnp.uint8),
            jnp.zeros((1, grid, grid, config.vqvae.code_dim), jnp.float32),
            jnp.zeros((1,), jnp.int32))


def init_variables(networks: Networks, config: Config, key):
    """Initial variables of every module: dict name -> Flax variables ({'params', ['batch_stats']})."""
    import jax
    from dlwm_jax.networks.dynamics import initial_state
    obs, latent, action = example_inputs(config)
    state = initial_state(1, config.dynamics.hidden_channels, latent.shape[1])

    @jax.jit  # one compilation instead of hundreds of eager ops
    def init(key):
        k_enc, k_dec, k_dyn, k_pi = jax.random.split(key, 4)
        return {
            "encoder": networks.encoder.init(k_enc, obs, train=False),
            "decoder": networks.decoder.init(k_dec, latent),
            "dynamics": networks.dynamics.init(k_dyn, latent, action, state),
            "actor_critic": networks.actor_critic.init(k_pi, latent),
        }
    return init(key)


def parameter_counts(config: Config, num_actions: int) -> dict[str, int]:
    """Trainable parameters per module, codebook (K x D) included in encoder and decoder as the paper
    counts it (once in the VQ-VAE); batch-norm statistics and EMA buffers are not parameters."""
    import jax
    from dlwm_jax.networks.layers import count_params
    nets = make_networks(config, num_actions)
    shapes = jax.eval_shape(lambda k: init_variables(nets, config, k), jax.random.key(0))
    n = {name: count_params(v["params"]) for name, v in shapes.items()}
    codebook = config.vqvae.num_codes * config.vqvae.code_dim
    counts = {"encoder": n["encoder"] + codebook, "decoder": n["decoder"] + codebook,
              "vqvae": n["encoder"] + n["decoder"] + codebook, "dynamics": n["dynamics"], "policy": n["actor_critic"]}
    counts["world_model"] = counts["vqvae"] + counts["dynamics"]
    counts["inference"] = counts["encoder"] + counts["policy"]
    return counts
