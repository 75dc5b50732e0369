"""Mixed precision (ComputeConfig.dtype): the float32 default computes exactly what it did before the option
existed (no bfloat16 op in its programs); with "bfloat16" the train steps track float32, and parameters,
optimizer state, batch-norm statistics and the codebook stay float32.

Measured by these tests' own steps (real Breakout frames, smoke width, same start and batches; the largest
relative difference to float32 over the steps): VQ-VAE loss 0.34% (reconstruction term 0.50%), dynamics loss
0.02% (reward loss 0.08%), PPO loss 0.13%, value loss 0.03%, entropy 0.01% (policy loss, a small number, 1.3%),
cosine of the PPO parameter changes 0.996, codebook indices 100% equal. Asserted: losses within 2%, cosine
> 0.98, indices >= 95%.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import breakout_replay

from dlwm_jax import config as config_lib
from dlwm_jax import ppo
from dlwm_jax import world_model as wm
from dlwm_jax.imagination import imagine
from dlwm_jax.networks import make_networks
from dlwm_jax.networks.vqvae import ema_update, quantize

F32 = config_lib.resolve_compute(config_lib.override(config_lib.smoke(), {"compute.dynamics_unroll": 1}))
BF16 = config_lib.override(F32, {"compute.dtype": "bfloat16"})
NUM_FRAMES = 300
vqvae_step, dynamics_step, encode = jax.jit(wm.vqvae_step), jax.jit(wm.dynamics_step), jax.jit(wm.encode)
LOSS_RTOL = 0.02


@pytest.fixture(scope="module")
def data():
    """Real Breakout frames (random policy) in a Replay, and a world model after 8 float32 warm-up steps on them,
    so that codes are assigned as in training rather than at initialisation."""
    replay, num_actions = breakout_replay(NUM_FRAMES, F32.env.frame_stack)
    world = wm.init_world_model(F32, num_actions, jax.random.key(0))
    for _, batch in zip(range(8), replay.observation_batches(jax.random.key(1), F32.vqvae.batch_size)):
        world, _ = vqvae_step(world, batch, F32.vqvae.warmup_lr_multiplier)
    return replay, num_actions, world


def _float_dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def _fixed_rollout(world, networks, replay, agent_params):
    """A float32 dream from real starts: the same PPO input for both dtypes."""
    p = F32.policy
    starts, _ = encode(world, replay.sample_observations(jax.random.key(2), p.num_envs))
    dream = jax.jit(lambda params, key: imagine(networks.dream_dynamics, networks.actor_critic,
                                                {"params": world.dynamics_params}, params, world.codebook.embeddings,
                                                starts, key, p.horizon))(agent_params, jax.random.key(3))
    rollout = ppo.Rollout(dream.observations, dream.actions, dream.log_probs, dream.values, dream.rewards,
                          dream.terminals)
    return rollout, dream.bootstrap_value


def test_config_default_is_float32_and_rejects_other_dtypes():
    assert config_lib.paper().compute.dtype == "float32"
    with pytest.raises(ValueError, match="compute.dtype must be 'float32' or 'bfloat16', got 'float16'") as error:
        config_lib.override(F32, {"compute.dtype": "float16"})
    assert "\n" not in str(error.value)


def test_float32_programs_contain_no_bfloat16_and_bfloat16_programs_do(data):
    """The default's VQ-VAE step, dynamics step and PPO update trace to programs without a bfloat16 value (all
    the dtype plumbing is no-op casts there); the bfloat16 ones compute in bfloat16."""
    replay, num_actions, world = data
    batch = next(replay.observation_batches(jax.random.key(4), F32.vqvae.batch_size))
    sequences = next(replay.sequence_batches(jax.random.key(5), F32.dynamics.batch_size,
                                             F32.dynamics.sequence_length, F32.dynamics.max_offset))
    networks = make_networks(F32, num_actions)
    agent_params = networks.actor_critic.init(jax.random.key(6), jnp.zeros((1, 6, 6, F32.vqvae.code_dim)))
    rollout, bootstrap = _fixed_rollout(world, networks, replay, agent_params)
    optimizer = ppo.make_optimizer(F32.policy)
    for config, has_bf16 in ((F32, False), (BF16, True)):
        state = world.replace(config=config)
        apply_fn = make_networks(config, num_actions).actor_critic.apply
        programs = {
            "vqvae_step": jax.make_jaxpr(wm.vqvae_step)(state, batch, jnp.float32(1.0)),
            "dynamics_step": jax.make_jaxpr(wm.dynamics_step)(state, sequences, jax.random.key(7)),
            "ppo_update": jax.make_jaxpr(lambda p, o: ppo.ppo_update(p, o, rollout, bootstrap, jax.random.key(8),
                                                                     config.policy, apply_fn, optimizer, False))(
                agent_params, optimizer.init(agent_params)),
        }
        for name, jaxpr in programs.items():
            assert ("bf16" in str(jaxpr)) == has_bf16, (config.compute.dtype, name)


def test_codebook_matmuls_run_at_highest_precision():
    """Distances and EMA sums must not use TF32 (the GPU default for float32 matmuls): it flips near ties."""
    z_e = jnp.ones((2, 6, 6, 8))
    codebook = wm.init_codebook(jax.random.key(0), 16, 8)
    for jaxpr in (jax.make_jaxpr(quantize)(z_e, codebook.embeddings),
                  jax.make_jaxpr(lambda c, z: ema_update(c, z, jnp.zeros((2, 6, 6), jnp.int32), 0.99, 1e-5))(codebook, z_e)):
        dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
        assert dots and all("HIGHEST" in str(e.params["precision"]) for e in dots)


def test_bfloat16_codebook_indices_agree_with_float32(data):
    replay, _, world = data
    observations = replay.sample_observations(jax.random.key(9), 64)
    indices = {config.compute.dtype: np.asarray(encode(world.replace(config=config), observations)[0])
               for config in (F32, BF16)}
    agreement = np.mean(indices["float32"] == indices["bfloat16"])
    assert agreement >= 0.95, agreement  # measured 1.0 here (64 x 36 positions, 16 codes)


def test_bfloat16_world_model_steps_track_float32_and_keep_float32_state(data):
    replay, _, world = data
    v, d = F32.vqvae, F32.dynamics
    vq_batches = [b for _, b in zip(range(4), replay.observation_batches(jax.random.key(10), v.batch_size))]
    sequences = [b for _, b in zip(range(4), replay.sequence_batches(jax.random.key(11), d.batch_size,
                                                                     d.sequence_length, d.max_offset))]
    losses, finals = {}, {}
    for config in (F32, BF16):
        state, history = world.replace(config=config), []
        for batch in vq_batches:
            state, metrics = vqvae_step(state, batch)
            history.append(("vqvae", float(metrics["loss"]), float(metrics["recon_nll"])))
        for i, batch in enumerate(sequences):
            state, metrics = dynamics_step(state, batch, jax.random.key(100 + i))
            history.append(("dynamics", float(metrics["loss"]), float(metrics["reward_loss"])))
        losses[config.compute.dtype], finals[config.compute.dtype] = history, state
    for f32, bf16 in zip(losses["float32"], losses["bfloat16"]):
        for a, b in zip(f32[1:], bf16[1:]):
            assert abs(a - b) <= LOSS_RTOL * abs(a), (f32, bf16)
    state = finals["bfloat16"]
    assert _float_dtypes((state.encoder_params, state.decoder_params, state.dynamics_params, state.vqvae_opt_state,
                          state.dynamics_opt_state, state.encoder_batch_stats, state.codebook,
                          state.codebook_usage)) == {"float32"}
    # The two runs really differ (the option is not a no-op), but little.
    assert not np.array_equal(jax.tree.leaves(state.dynamics_params)[0],
                              jax.tree.leaves(finals["float32"].dynamics_params)[0])


def test_bfloat16_ppo_updates_track_float32_and_keep_float32_state(data):
    replay, num_actions, world = data
    networks = make_networks(F32, num_actions)
    params = networks.actor_critic.init(jax.random.key(12), jnp.zeros((1, 6, 6, F32.vqvae.code_dim)))
    rollout, bootstrap = _fixed_rollout(world, networks, replay, params)
    optimizer = ppo.make_optimizer(F32.policy)
    results = {}
    for config in (F32, BF16):
        update = ppo.make_ppo_update(config.policy, make_networks(config, num_actions).actor_critic.apply, optimizer)
        p, o, history = params, optimizer.init(params), []
        for i in range(3):
            p, o, metrics = update(p, o, rollout, bootstrap, jax.random.key(20 + i))
            history.append({k: float(x) for k, x in metrics.items()})
        results[config.compute.dtype] = (p, o, history)
    for f32, bf16 in zip(results["float32"][2], results["bfloat16"][2]):
        for key in ("loss", "value_loss", "entropy"):
            assert abs(f32[key] - bf16[key]) <= LOSS_RTOL * abs(f32[key]), (key, f32, bf16)
    p, o, _ = results["bfloat16"]
    assert _float_dtypes((p, o)) == {"float32"}
    change = {k: np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(results[k][0]), jax.tree.leaves(params))])
              for k in results}
    cosine = change["float32"] @ change["bfloat16"] / (np.linalg.norm(change["float32"]) * np.linalg.norm(change["bfloat16"]))
    assert cosine > 0.98, cosine  # the direction of 3 updates (24 Adam steps); measured 0.996


def test_bfloat16_policy_update_as_the_driver_runs_it(data):
    """programs.make_policy_update under bfloat16 with the CPU formulations (dream convs `rows`): the dream's scan
    carries float32 state, the update is finite and the agent stays float32."""
    from dlwm_jax.programs import AgentState, make_policy_update
    replay, num_actions, world = data
    assert BF16.compute.dream_lstm_conv == "rows"
    networks = make_networks(BF16, num_actions)
    params = networks.actor_critic.init(jax.random.key(13), jnp.zeros((1, 6, 6, BF16.vqvae.code_dim)))
    optimizer = ppo.make_optimizer(BF16.policy)
    update = make_policy_update(BF16, networks, optimizer)
    starts = replay.sample_stacks(jax.random.key(14), BF16.policy.num_envs)
    agent, metrics = update(world.replace(config=BF16), AgentState(params, optimizer.init(params)),
                            jnp.asarray(replay.frames), starts, jax.random.key(15))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert _float_dtypes((agent.params, agent.opt_state)) == {"float32"}
