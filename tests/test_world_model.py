"""World model: VQ-VAE and dynamics losses/steps (SPEC 3.7, 4.6), the epoch schedule (SPEC 8.3), eval encoding.

Smoke-width networks; the dynamics scan is rolled (compute.dynamics_unroll=1) because compiling is what costs
here; unrolling changes speed, not results.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import breakout_replay

from dlwm_jax import config as config_lib
from dlwm_jax import slots
from dlwm_jax import world_model as wm
from dlwm_jax.epochs import joint_epoch, warmup_epoch
from dlwm_jax.networks.dynamics import initial_state
from dlwm_jax.networks.vqvae import quantize
from dlwm_jax.programs import HOST_LOOP_CHUNK, compile_programs
from dlwm_jax.replay import ObservationBatch
from dlwm_jax.seed_axis import stack, unstack

CFG = config_lib.override(config_lib.smoke(), {"compute.dynamics_unroll": 1})
NUM_FRAMES = 252  # not a multiple of the VQ-VAE batch (8): the last batch of an epoch is padded


@pytest.fixture(scope="module")
def atari():
    """Real Breakout frames from a uniformly random policy, stored as one trajectory in a Replay (stack 4)."""
    return breakout_replay(NUM_FRAMES, CFG.env.frame_stack)


@pytest.fixture(scope="module")
def initial(atari):
    return wm.init_world_model(CFG, atari[1], jax.random.key(0))


@pytest.fixture(scope="module")
def programs(atari):
    """The training loop's compiled programs for one seed."""
    return compile_programs(CFG, atari[1], 1, None)


def one_seed(epoch_fn, programs, state, replay, key, *args, **kwargs):
    """epochs.warmup_epoch / joint_epoch for one seed, its frames on the device: (state, its metrics)."""
    frames = jnp.asarray(replay.frames)[None]
    world, per_seed = epoch_fn(programs, stack([state]), [replay], frames, jnp.stack([key]), *args, **kwargs)
    return unstack(world, 0), per_seed[0]


vqvae_step, dynamics_step, encode = jax.jit(wm.vqvae_step), jax.jit(wm.dynamics_step), jax.jit(wm.encode)
dynamics_update = jax.jit(wm.dynamics_update)


def _tree_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------------------------------------ VQ-VAE

def test_vqvae_learns_atari_frames_and_uses_several_codes(atari, initial, programs):
    replay, _ = atari
    _, first_step = vqvae_step(initial, next(replay.observation_batches(jax.random.key(1), CFG.vqvae.batch_size)),
                               CFG.vqvae.warmup_lr_multiplier)
    first = [float(first_step["recon_nll"])]
    state, epoch1 = one_seed(warmup_epoch, programs, initial, replay, jax.random.key(1))
    state, epoch2 = one_seed(warmup_epoch, programs, state, replay, jax.random.key(2))
    pixels = 96 * 96 * CFG.env.frame_stack
    # At init the logits are ~0, where the CB log-density is ~0 for every pixel; mostly-black Atari frames
    # are then fitted with large negative logits (log-density up to ~2.77 per pixel, SPEC 3.6).
    assert abs(first[0]) < 0.05 * pixels
    assert epoch2["recon_nll"] < first[0] - 0.5 * pixels, (first[0], epoch1["recon_nll"], epoch2["recon_nll"])
    assert epoch2["recon_nll"] < epoch1["recon_nll"]
    assert epoch2["codebook_usage_trace"] > 1.0 / CFG.vqvae.num_codes
    assert epoch2["perplexity"] > 1.0
    assert int(state.vqvae_steps) == 2 * replay.num_observation_batches(CFG.vqvae.batch_size)
    assert int(state.codebook.dw_counter) == int(state.vqvae_steps)


def test_vqvae_step_masks_padded_rows_in_ema_and_scales_lr(atari, initial):
    replay, _ = atari
    batch = next(replay.observation_batches(jax.random.key(3), CFG.vqvae.batch_size))
    noise = np.random.default_rng(1).integers(0, 256, batch.observations.shape, dtype=np.uint8)
    valid = np.arange(CFG.vqvae.batch_size) < 5
    padded = ObservationBatch(np.where(valid[:, None, None, None], batch.observations, noise), valid)
    state1, _ = vqvae_step(initial, padded, 1.0)
    # EMA cluster sizes count valid rows only: (1 - decay) * 36 positions * 5 rows (SPEC 3.5).
    np.testing.assert_allclose(float(state1.codebook.cs_average.sum()), 0.01 * 36 * 5, rtol=1e-5)
    np.testing.assert_allclose(float(state1.codebook_usage.sum()), 36 * 5)
    state10, _ = vqvae_step(initial, padded, 10.0)
    # Adam's first update is linear in the learning rate: lr_scale 10 moves every parameter 10x as far.
    delta1 = jax.tree.map(lambda a, b: a - b, state1.decoder_params, initial.decoder_params)
    delta10 = jax.tree.map(lambda a, b: a - b, state10.decoder_params, initial.decoder_params)
    for d1, d10 in zip(jax.tree.leaves(delta1), jax.tree.leaves(delta10)):
        np.testing.assert_allclose(d10, 10.0 * d1, rtol=1e-3, atol=1e-9)
    assert max(float(jnp.abs(d).max()) for d in jax.tree.leaves(delta1)) == pytest.approx(1e-4, rel=1e-2)


def test_encode_uses_running_statistics(atari, initial):
    replay, _ = atari
    state, _ = vqvae_step(initial, next(replay.observation_batches(jax.random.key(4), 8)), 10.0)
    observations = replay.observations(np.arange(8))
    indices, z_q = encode(state, observations)
    assert indices.shape == (8, 6, 6) and indices.dtype == jnp.int32 and z_q.shape == (8, 6, 6, CFG.vqvae.code_dim)
    np.testing.assert_array_equal(z_q, state.codebook.embeddings[indices])
    # Eval mode: each frame's code does not depend on the rest of the batch (train-mode BN would).
    z_e = state.networks.encoder.apply({"params": state.encoder_params, "batch_stats": state.encoder_batch_stats},
                                       observations[::-1], train=False)
    np.testing.assert_array_equal(quantize(z_e, state.codebook.embeddings)[0][::-1], indices)


# ---------------------------------------------------------------------------------------------- dynamics

SYNTH = config_lib.override(CFG, {"dynamics.hidden_channels": 16, "dynamics.learning_rate": 1e-2,
                                  "dynamics.sequence_length": 6})
SYNTH_ACTIONS = 2


def _synthetic_batch(rng, batch_size=8):
    """Latent-level sequences where z_{t+1} = (z_t + 1 + 3 a_t) mod K at every grid position."""
    k, t = SYNTH.vqvae.num_codes, SYNTH.dynamics.sequence_length
    actions = rng.integers(0, SYNTH_ACTIONS, (t, batch_size)).astype(np.int32)
    indices = np.zeros((t, batch_size, 6, 6), np.int32)
    indices[0] = rng.integers(0, k, (batch_size, 6, 6))
    for i in range(1, t):
        indices[i] = (indices[i - 1] + 1 + 3 * actions[i - 1][:, None, None]) % k
    return (indices, actions, np.zeros((t, batch_size), np.float32), np.zeros((t, batch_size), bool),
            np.ones((batch_size,), bool))


@pytest.fixture(scope="module")
def synthetic_state(initial):
    """`initial` with a wider dynamics network for 2 actions (re-initialised alone: cheaper than a full init)
    and well-separated random codes instead of the init codebook."""
    key_dynamics, key_codes = jax.random.split(jax.random.key(5))
    latent = jnp.zeros((1, 6, 6, SYNTH.vqvae.code_dim))
    dynamics = initial.replace(config=SYNTH, num_actions=SYNTH_ACTIONS).networks.dynamics
    params = jax.jit(dynamics.init)(key_dynamics, latent, jnp.zeros((1,), jnp.int32),
                                    initial_state(1, SYNTH.dynamics.hidden_channels))["params"]
    distinct = jax.random.normal(key_codes, (SYNTH.vqvae.num_codes, SYNTH.vqvae.code_dim))
    return initial.replace(config=SYNTH, num_actions=SYNTH_ACTIONS, dynamics_params=params,
                           dynamics_opt_state=wm.dynamics_optimizer(SYNTH).init(params),
                           codebook=initial.codebook._replace(embeddings=distinct))


def test_dynamics_learns_a_deterministic_latent_task(synthetic_state):
    rng = np.random.default_rng(0)
    state, accuracies = synthetic_state, []
    for i in range(100):
        state, metrics = dynamics_update(state, *_synthetic_batch(rng), jax.random.key(i))
        accuracies.append(float(metrics["next_latent_acc"]))
    chance = 1.0 / SYNTH.vqvae.num_codes
    assert np.mean(accuracies[:5]) < 2 * chance
    assert np.mean(accuracies[-5:]) > 5 * chance, accuracies[-5:]


@pytest.mark.parametrize("compute", [{}, {"compute.lstm_conv": "gemm", "compute.layer_norm": "fused",
                                         "compute.dynamics_unroll": 5}])
def test_dynamics_grads_equal_the_autodiff_of_the_loss(synthetic_state, compute):
    """dynamics_grads (the cells' parameter gradients in one batched pass after the unroll) = jax.grad of
    dynamics_loss (one per step inside it), with episode ends, a padded sequence and open-loop steps; with the
    CPU's formulations and the accelerator's (GEMM convolutions, paired fused layer norms, unrolled)."""
    synthetic_state = synthetic_state.replace(config=config_lib.override(SYNTH, compute))
    indices, actions, rewards, terminals, valid = _synthetic_batch(np.random.default_rng(3), batch_size=3)
    rewards[2, 0], rewards[4, 1] = 1.0, -1.0
    terminals[2, 0] = terminals[4, 1] = True
    valid[2] = False
    args = (synthetic_state.dynamics_params, synthetic_state, indices, actions, rewards, terminals, valid,
            jax.random.key(4))
    expected, expected_metrics = jax.jit(jax.grad(wm.dynamics_loss, has_aux=True))(*args)
    grads, metrics = jax.jit(wm.dynamics_grads)(*args)
    assert jax.tree.structure(grads) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(grads)):
        assert float(jnp.abs(a).max()) > 0, path
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(jnp.abs(a).max()), err_msg=str(path))
    assert _tree_equal(metrics, expected_metrics)


def test_reward_head_has_its_own_learning_rate(synthetic_state):
    labels = wm.dynamics_param_labels(synthetic_state.dynamics_params)
    groups = {k: set(jax.tree.leaves(v)) for k, v in labels.items()}
    assert groups == {"cell1": {"dynamics"}, "cell2": {"dynamics"}, "next_latent_head": {"dynamics"},
                      "reward_conv": {"reward"}, "reward_norm": {"reward"}, "reward_dense": {"reward"},
                      "reward_out": {"reward"}}
    state, _ = dynamics_update(synthetic_state, *_synthetic_batch(np.random.default_rng(1)),
                                       jax.random.key(0))
    # Adam's first step moves each parameter by ~lr (less only where |grad| is near eps).
    delta = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.dynamics_params,
                         synthetic_state.dynamics_params)
    group = lambda name: max(jax.tree.leaves({k: v for k, v in delta.items() if groups[k] == {name}}))
    assert group("dynamics") == pytest.approx(SYNTH.dynamics.learning_rate, rel=1e-2)
    # The reward loss is weighted 1e-6, so its gradients are only ~100x Adam's eps: slightly under lr (SPEC 4.6).
    assert 0.95 * SYNTH.dynamics.reward_learning_rate < group("reward") <= SYNTH.dynamics.reward_learning_rate * 1.0001


def test_flat_optimizers_update_as_the_per_parameter_ones(initial):
    """compute.flat_optimizer (the accelerator's): the VQ-VAE's Adam and the dynamics' two groups (5e-4, the reward
    head 1e-3) on one vector each give the per-parameter updates; their state is flat."""
    params = {"vqvae": {"encoder": initial.encoder_params, "decoder": initial.decoder_params},
              "dynamics": initial.dynamics_params}
    keys = iter(jax.random.split(jax.random.key(7), 3 * len(jax.tree.leaves(params))))
    grads = [jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), params) for _ in range(3)]
    updates = {}
    for flat in (False, True):
        config = config_lib.override(CFG, {"compute.flat_optimizer": str(flat).lower()})
        for name, optimizer in (("vqvae", wm.vqvae_optimizer(config)), ("dynamics", wm.dynamics_optimizer(config))):
            state, p = optimizer.init(params[name]), params[name]
            for g in grads:
                u, state = optimizer.update(g[name], state, p)
            updates[flat, name] = u
            largest = max(x.size for x in jax.tree.leaves(state))
            assert (largest > max(x.size for x in jax.tree.leaves(p))) == flat  # flat: one vector per moment
    for name in ("vqvae", "dynamics"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), updates[False, name],
                     updates[True, name])
    reward = updates[True, "dynamics"]["reward_out"]["kernel"]  # the reward head's group: its own rate, 1e-3
    assert float(jnp.abs(reward).max()) == pytest.approx(CFG.dynamics.reward_learning_rate, rel=0.05)


@pytest.mark.parametrize("reference", [True, False])
def test_terminal_mask_selects_the_counted_predictions(synthetic_state, reference):
    state = synthetic_state.replace(config=config_lib.override(SYNTH, {"dynamics.reference_terminal_mask": reference}))
    indices, actions, rewards, terminals, valid = _synthetic_batch(np.random.default_rng(2), batch_size=3)
    terminals[:] = False
    terminals[2, 0] = True   # episode of sequence 0 ends at step 2: observation 3 is a reset frame
    terminals[5, 1] = True   # sequence 1 ends at its last step (only visible to the reference mask)
    terminals[1, 2] = True   # sequence 2 is padding: never counted
    valid[2] = False
    expected = np.ones((5, 3), bool)
    expected[:, 2] = False
    if reference:   # prediction t is dropped when terminal_{t+1}: drops t=1 (b=0) and t=4 (b=1)
        expected[1, 0] = expected[4, 1] = False
    else:           # prediction t is dropped when terminal_t: drops t=2 (b=0), whose target is a reset frame
        expected[2, 0] = False
    np.testing.assert_array_equal(wm.prediction_mask(terminals, valid, reference), expected)

    @jax.jit
    def run(state, key):
        args = (indices, actions, rewards, terminals, valid, key)
        return wm.dynamics_loss(state.dynamics_params, state, *args), wm.dynamics_unroll(state.dynamics_params, state, *args)

    (loss, metrics), out = run(state, jax.random.key(0))
    np.testing.assert_array_equal(out.include, expected)
    assert float(metrics["next_latent_count"]) == expected.sum()
    np.testing.assert_allclose(float(metrics["next_latent_loss"]),
                               (out.next_latent_nll * expected).sum() / expected.sum(), rtol=1e-5)
    # The reward loss is a mean over every valid (t, b), terminal or not.
    np.testing.assert_allclose(float(metrics["reward_loss"]), out.reward_nll[:, :2].mean(), rtol=1e-5)
    assert float(metrics["reward_count_1"]) == 10 and float(metrics["reward_acc_0"]) == -1.0


def test_reward_classes_round_half_to_even():
    np.testing.assert_array_equal(wm.reward_class(jnp.array([-7.0, -1.0, -0.5, -0.4, 0.0, 0.5, 0.6, 1.0, 4.0])),
                                  [0, 0, 1, 1, 1, 1, 2, 2, 2])


def test_dynamics_step_updates_bn_running_stats_but_no_vqvae_parameter(atari, initial):
    replay, _ = atari
    batch = next(replay.sequence_batches(jax.random.key(7), CFG.dynamics.batch_size))
    state, metrics = dynamics_step(initial, batch, jax.random.key(8))
    assert not _tree_equal(state.encoder_batch_stats, initial.encoder_batch_stats)  # SPEC 3.8, reference oddity
    assert _tree_equal(state.encoder_params, initial.encoder_params)
    assert _tree_equal(state.decoder_params, initial.decoder_params)
    assert _tree_equal(state.codebook, initial.codebook)
    assert _tree_equal(state.vqvae_opt_state, initial.vqvae_opt_state)
    assert not _tree_equal(state.dynamics_params, initial.dynamics_params)
    assert int(state.dynamics_steps) == 1 and int(state.vqvae_steps) == 0
    # At init the next-latent logits are small: loss ~ 36 ln K (SPEC 12.4). The smoke reward head (fan-in 16)
    # has larger initial logits than the paper's, so only a loose bound around ln 3 holds here.
    assert float(metrics["next_latent_loss"]) == pytest.approx(36 * math.log(CFG.vqvae.num_codes), rel=0.25)
    assert 0.5 * math.log(3) < float(metrics["reward_loss"]) < 2 * math.log(3)


def _assert_trees_close(a, b, rtol=1e-4, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jnp.floating):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=max(atol, rtol * max(float(jnp.max(jnp.abs(y))), 1e-6)))
        elif not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("epoch_chunk, interval", [(0, 2), pytest.param(4, 2, marks=pytest.mark.slow),
                                                    pytest.param(6, 3, marks=pytest.mark.slow)])
def test_joint_epoch_as_slots_equals_the_per_step_loop(atari, initial, programs, epoch_chunk, interval):
    """A joint epoch as the loop runs it against wm.vqvae_step and wm.dynamics_step (one program each) called step
    by step on batches the host gathers (the loop before slots). epoch_chunk 0: the per-slot programs (the encoder
    pass and the ConvLSTM update compiled apart, batches gathered on the device); 4 and 6 (slow): scanned chunks
    of the epoch's slots.Period (slots.chunk), the steps past the epoch's end masked. Same steps, same parameters
    to float tolerance (other programs round differently in the last bits)."""
    replay, num_actions = atari
    key = jax.random.key(11)
    vq_key, dyn_key, steps_key = jax.random.split(key, 3)
    vq_batches = replay.observation_batches(vq_key, CFG.vqvae.batch_size)
    seq_batches = list(replay.sequence_batches(dyn_key, CFG.dynamics.batch_size, CFG.dynamics.sequence_length,
                                               CFG.dynamics.max_offset))
    reference, num_vq = initial, replay.num_observation_batches(CFG.vqvae.batch_size)
    # with the XLA:CPU kernels of the loop's VQ-VAE program (its own options per slot, the chunk's in a chunk):
    # Eigen's and YNNPACK's convolutions round differently, which Adam grew past the tolerance on an AVX-512 CPU
    options = {} if epoch_chunk else CFG.compute.compiler_options("vqvae_step")
    loop_vqvae_step = jax.jit(wm.vqvae_step, compiler_options=options)
    for i in range(len(seq_batches) + 1):
        if i % interval == 0 and i // interval < num_vq:
            reference, _ = loop_vqvae_step(reference, next(vq_batches), 1.0)
        if i < len(seq_batches):
            reference, _ = dynamics_step(reference, seq_batches[i], jax.random.fold_in(steps_key, i))
    if epoch_chunk:
        programs = compile_programs(config_lib.override(CFG, {"compute.epoch_chunk": epoch_chunk}), num_actions, 1,
                                    None)
        assert len(seq_batches) % epoch_chunk != epoch_chunk - 1  # the last chunk has padded slots
    assert programs.chunk_slots(slots.Period(interval, True)) == (epoch_chunk or HOST_LOOP_CHUNK)
    state, metrics = one_seed(joint_epoch, programs, initial, replay, key, interval)
    assert int(state.dynamics_steps) == len(seq_batches) == metrics["dynamics"]["steps"]
    assert int(state.vqvae_steps) == int(reference.vqvae_steps) == metrics["vqvae"]["steps"]
    # a scanned chunk fuses the steps otherwise: on an AVX-512 CPU a bias near 0 differed by 1.7e-4 of its leaf's
    # largest value (2026-12-06); one of the reference's dynamics batches swapped for another fails 1e-3 as well
    _assert_trees_close(state, reference, rtol=1e-3 if epoch_chunk else 1e-4)


@pytest.mark.parametrize("unroll", [False, True])
def test_a_chunk_runs_the_steps_its_flags_take_and_masks_the_rest(atari, initial, unroll):
    """slots.chunk (no conditional: every step of its Period runs, and a step whose active flag is off is masked)
    against the per-slot functions run on the taken steps only, as the CPU's host loop runs them: 6 slots of a
    joint epoch's end (interval 2) whose last VQ-VAE step and last 2 dynamics steps are off, 4 warm-up slots whose
    last 2 are padding, and 4 slots of dynamics steps alone (Period 0). The same parameters, step counts and
    metric sums; a masked step must not touch the state (Adam on zero gradients would). `unroll`: a period's
    dynamics steps written out (compute.period_unroll, the accelerator's)."""
    from dlwm_jax.epochs import epoch_slots
    replay, _ = atari
    d, keys = CFG.dynamics, jax.random.split(jax.random.key(12), 3)
    vqvae = jax.jit(functools.partial(slots.vqvae_slot, mask=False))
    encode, dynamics = jax.jit(slots.encode_slot), jax.jit(functools.partial(slots.dynamics_slot, mask=False))
    vq_plan = [replay.observation_plan(keys[0], CFG.vqvae.batch_size)]
    seq_plan = [replay.sequence_plan(keys[1], d.batch_size, d.sequence_length, d.max_offset)]
    frames, one = jnp.asarray(replay.frames), jnp.float32(1.0)
    (joint, _), (warmup, _) = epoch_slots(CFG, vq_plan, seq_plan, 2), epoch_slots(CFG, vq_plan)
    first = lambda part, n: slots.Slots(*(x[0, :n] for x in part))
    joint = first(joint, 6)._replace(vq_active=np.array([1, 0, 1, 0, 0, 0], bool),
                                     dyn_active=np.array([1, 1, 1, 1, 0, 0], bool))
    warmup = first(warmup, 4)._replace(vq_active=np.array([1, 1, 0, 0], bool))
    dynamics_only = slots.Slots(*(x[:4] for x in joint))._replace(vq_active=np.zeros(4, bool))
    for part, period in ((joint, slots.Period(2, True)), (warmup, slots.Period(1, False)),
                         (dynamics_only, slots.Period(0, True))):
        index = np.arange(len(part.vq_active), dtype=np.int32)
        got = jax.jit(functools.partial(slots.chunk, period=period, unroll=unroll))(initial, frames, part, index,
                                                                                    keys[2], one)
        world, vq_sums, dyn_sums = initial, [], []
        for i in index:
            slot = slots.Slots(*(x[i] for x in part))
            if part.vq_active[i]:
                world, sums = vqvae(world, frames, slot, one)
                vq_sums.append(sums)
            if part.dyn_active[i] and period.dynamics:
                indices, batch_stats = encode(world, frames, slot)
                world, sums = dynamics(world, batch_stats, indices, slot, keys[2], i)
                dyn_sums.append(sums)
        total = lambda sums: jax.tree.map(lambda *xs: sum(xs), *sums)
        assert int(got[0].vqvae_steps) == int(world.vqvae_steps) == int(part.vq_active.sum())
        assert int(got[0].dynamics_steps) == int(world.dynamics_steps) == len(dyn_sums)
        # Exact: the step counters and Adam's counts. Close: the floats (other programs round otherwise, and Adam
        # divides by the root of tiny second moments: ~1e-5 apart after 3 steps; a step masked wrongly moves
        # parameters by ~lr, 3e-4..1e-3).
        _assert_trees_close(got[0], world, atol=3e-5)
        for sums, want in zip(got[1], (vq_sums, dyn_sums)):
            if want:
                _assert_trees_close(sums, total(want))
            else:
                assert float(sums["steps"]) == 0


def test_joint_epoch_schedule_and_key_determinism(atari, initial, programs):
    replay, _ = atari
    interval = 2
    state_a, metrics_a = one_seed(joint_epoch, programs, initial, replay, jax.random.key(9), interval)
    state_b, metrics_b = one_seed(joint_epoch, programs, initial, replay, jax.random.key(9), interval)
    state_c, metrics_c = one_seed(joint_epoch, programs, initial, replay, jax.random.key(10), interval)
    assert metrics_a == metrics_b and _tree_equal(state_a, state_b)
    assert metrics_a["dynamics"]["next_latent_loss"] != metrics_c["dynamics"]["next_latent_loss"]
    assert metrics_a["vqvae"]["recon_nll"] != metrics_c["vqvae"]["recon_nll"]
    # SPEC 8.3: one pass over the dynamics windows, floor(D / interval) + 1 VQ-VAE steps.
    _, key_dynamics_order, _ = jax.random.split(jax.random.key(9), 3)
    num_dynamics = replay.num_sequence_batches(key_dynamics_order, CFG.dynamics.batch_size,
                                               CFG.dynamics.sequence_length, CFG.dynamics.max_offset)
    assert int(state_a.dynamics_steps) == num_dynamics == metrics_a["dynamics"]["steps"]
    assert int(state_a.vqvae_steps) == num_dynamics // interval + 1 == metrics_a["vqvae"]["steps"]


# ------------------------------------------------------------------------------------------ diagnostics

def test_diagnostics_count_every_reward_step_and_read_only_the_context_before_the_first_prediction(atari, initial):
    replay, _ = atari
    length = wm.diagnostic_window_length(CFG)
    assert length == CFG.dynamics.context_length + 10
    starts = replay.window_starts_from(jax.random.key(0), 6, length)
    batch = replay.sequences(starts, length)
    diagnose = jax.jit(wm.world_model_diagnostics)
    metrics = jax.device_get(diagnose(initial, batch.observations, batch.actions, batch.rewards, jax.random.key(1)))
    names = wm.REWARD_CLASS_NAMES
    classes = np.asarray(wm.reward_class(batch.rewards[:-1]))
    for c, true in enumerate(names):  # every step of every window is counted once, under its true class
        assert sum(metrics[f"reward_{true}_as_{p}"] for p in names) == np.sum(classes == c)
    for k in wm.DIAGNOSTIC_HORIZONS:
        assert 0 <= metrics[f"latent_acc_{k}"] <= 1 and 0 <= metrics[f"copy_acc_{k}"] <= 1
    # The first open-loop prediction sees only the context: frames after it may change, latent_acc_1 may not.
    context = CFG.dynamics.context_length
    other = replay.sequences(starts[::-1], length).observations
    changed = np.concatenate([batch.observations[:context + 1], other[context + 1:]])
    again = jax.device_get(diagnose(initial, changed, batch.actions, batch.rewards, jax.random.key(1)))
    assert again["latent_acc_1"] == metrics["latent_acc_1"] and again["copy_acc_1"] == metrics["copy_acc_1"]
    # A static window is perfectly predicted by the copy baseline.
    static = np.broadcast_to(batch.observations[:1], batch.observations.shape)
    frozen = jax.device_get(diagnose(initial, static, batch.actions, batch.rewards, jax.random.key(1)))
    assert all(frozen[f"copy_acc_{k}"] == 1.0 for k in wm.DIAGNOSTIC_HORIZONS)
