"""Tests of dlwm_jax/epochs.py's slot layout (SPEC 8.3): which slot holds which VQ-VAE and dynamics batch of each
seed, the masking of seeds whose epochs are shorter, and the fields' dtypes (no program is compiled here; the
epochs themselves run in test_world_model.py and test_train_seeds.py)."""
import jax
import numpy as np

from dlwm_jax import config as config_lib
from dlwm_jax.epochs import epoch_slots
from dlwm_jax.replay import Replay

CFG = config_lib.smoke()


def replays_of(lengths):
    """One replay per seed, one trajectory each of the given length, frames holding their own index."""
    rng, out = np.random.default_rng(0), []
    for n in lengths:
        replay = Replay(n, 1, (2, 2), CFG.env.frame_stack)
        terminals = rng.random((1, n)) < 0.05
        frames = (np.arange(n, dtype=np.uint8) % 251)[None, :, None, None] * np.ones((1, 1, 2, 2), np.uint8)
        replay.add(frames, rng.integers(0, 6, (1, n)).astype(np.int32), rng.normal(size=(1, n)).astype(np.float32),
                   terminals, np.concatenate([[[True]], terminals[:, :-1]], 1))
        out.append(replay)
    return out


def test_joint_epoch_slots_place_every_batch_once_and_mask_the_shorter_seed():
    d, interval = CFG.dynamics, 3
    replays = replays_of([200, 200])
    keys = [jax.random.key(1), jax.random.key(2)]
    vq = [r.observation_plan(k, CFG.vqvae.batch_size) for r, k in zip(replays, keys)]
    seq = [r.sequence_plan(k, d.batch_size, d.sequence_length, d.max_offset) for r, k in zip(replays, keys)]
    counts = [len(p.valid) for p in seq]
    if counts[0] == counts[1]:  # make the seeds' epochs differ: drop seed 1's last batch
        seq[1] = type(seq[1])(*(x[:-1] for x in seq[1]))
        counts[1] -= 1
    slots, shared = epoch_slots(CFG, vq, seq, interval)
    length = max(counts) + 1
    assert len(shared.index) == length and list(shared.index) == list(range(length))
    for s in range(2):
        taken = np.flatnonzero(slots.dyn_active[s])
        assert list(taken) == list(range(counts[s]))  # dynamics batch i in slot i, while the seed has batches
        np.testing.assert_array_equal(slots.dyn_frames[s, taken], seq[s].frames)
        np.testing.assert_array_equal(slots.terminals[s, taken], seq[s].terminals)
        assert not slots.dyn_valid[s, counts[s]:].any() and not slots.dyn_frames[s, counts[s]:].any()
        vq_taken = np.flatnonzero(slots.vq_active[s])  # SPEC 8.3: floor(D / interval) + 1 VQ-VAE steps
        assert list(vq_taken) == list(range(0, counts[s] + 1, interval))
        np.testing.assert_array_equal(slots.vq_frames[s, vq_taken], vq[s].frames[:len(vq_taken)])
    np.testing.assert_array_equal(shared.vq_on, slots.vq_active.any(0))
    np.testing.assert_array_equal(shared.dyn_on, np.arange(length) < max(counts))
    for name, field, plan_field in (("dyn_frames", slots.dyn_frames, seq[0].frames), ("terminals", slots.terminals,
                                    seq[0].terminals), ("dyn_valid", slots.dyn_valid, seq[0].valid),
                                    ("vq_valid", slots.vq_valid, vq[0].valid), ("rewards", slots.rewards, seq[0].rewards)):
        assert field.dtype == plan_field.dtype, name


def test_warmup_slots_are_every_vqvae_batch_in_order_with_the_joint_epochs_shapes():
    replays = replays_of([90])
    plan = replays[0].observation_plan(jax.random.key(3), CFG.vqvae.batch_size)
    slots, shared = epoch_slots(CFG, [plan])
    assert slots.vq_active.all() and not slots.dyn_active.any() and not shared.dyn_on.any()
    np.testing.assert_array_equal(slots.vq_frames[0], plan.frames)
    np.testing.assert_array_equal(slots.vq_valid[0], plan.valid)
    d = CFG.dynamics
    assert slots.dyn_frames.shape[2:] == (d.sequence_length, d.batch_size, CFG.env.frame_stack)
    assert slots.terminals.dtype == bool and slots.actions.dtype == np.int32


def test_empty_slots_have_the_epochs_shapes_and_dtypes_and_are_all_off():
    """slots.empty, what programs.compile_ahead compiles the chunk for, is laid out as a real joint epoch's slots."""
    from dlwm_jax import slots as slots_lib
    d = CFG.dynamics
    replays, keys = replays_of([200, 200]), [jax.random.key(4), jax.random.key(5)]
    vq = [r.observation_plan(k, CFG.vqvae.batch_size) for r, k in zip(replays, keys)]
    seq = [r.sequence_plan(k, d.batch_size, d.sequence_length, d.max_offset) for r, k in zip(replays, keys)]
    (slots, shared), (empty, empty_shared) = epoch_slots(CFG, vq, seq, 2), slots_lib.empty(CFG, 2, 7)
    for got, want in zip(empty, slots):
        assert got.dtype == want.dtype and got.shape == (2, 7, *want.shape[2:]), (got.shape, want.shape)
    for got, want in zip(empty_shared, shared):
        assert got.dtype == want.dtype and got.shape == (7,)
    assert not (empty.vq_active.any() or empty.dyn_active.any() or empty_shared.vq_on.any() or empty_shared.dyn_on.any())


def test_period_finds_the_slots_a_joint_epochs_chunks_repeat():
    """slots.period: a joint epoch's chunks of a multiple of its interval repeat (VQ-VAE + dynamics, dynamics, ...)
    until a stream runs out; its last chunk, padded, repeats nothing."""
    from dlwm_jax.slots import Period, SharedSlots, period
    d, interval, n = CFG.dynamics, 3, 6
    replay = replays_of([2000])[0]
    keys = jax.random.split(jax.random.key(4), 2)
    vq = [replay.observation_plan(keys[0], CFG.vqvae.batch_size)]
    seq = [replay.sequence_plan(keys[1], d.batch_size, d.sequence_length, d.max_offset)]
    _, shared = epoch_slots(CFG, vq, seq, interval)
    pad = -len(shared.index) % n  # as epochs.run_slots pads the last chunk
    padded = SharedSlots(*(np.concatenate([x, np.zeros(pad, x.dtype)]) for x in shared))
    chunks = [SharedSlots(*(x[start:start + n] for x in padded)) for start in range(0, len(padded.index), n)]
    assert len(chunks) >= 3
    assert [period(chunk) for chunk in chunks[:-1]] == [Period(3, True)] * (len(chunks) - 1)
    assert period(chunks[-1]) is None  # the epoch's end: its last slot takes no dynamics step
    warmup = epoch_slots(CFG, vq)[1]
    assert period(SharedSlots(*(x[:4] for x in warmup))) == Period(1, False)
    flags = lambda vq_on, dyn_on: SharedSlots(np.arange(len(vq_on)), np.array(vq_on, bool), np.array(dyn_on, bool))
    assert period(flags([0, 0, 0, 0], [1, 1, 1, 1])) == Period(0, True)  # the VQ-VAE stream ran out
    assert period(flags([0, 0, 0, 0], [0, 0, 0, 0])) is None  # padding only: nothing to run
    assert period(flags([1, 0, 0, 1, 0, 0, 0], [1] * 7)) is None  # 7 slots: interval 3 does not divide them
    assert period(flags([0, 1, 0, 1], [1] * 4)) is None  # a chunk must start a period
    assert period(flags([1, 0, 1, 1], [1] * 4)) is None
    assert period(flags([1, 0, 1, 0], [1, 1, 1, 0])) is None  # the dynamics stream ends inside
    assert period(flags(np.arange(12) % 6 == 0, [1] * 12)) == Period(6, True)  # the short preset's interval
    assert period(flags(np.arange(14) % 7 == 0, [1] * 14)) is None  # longer than 6: not a program of its own
