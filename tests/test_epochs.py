"""Tests of dlwm_jax/epochs.py's slot layout (SPEC 8.3): which slot holds which VQ-VAE and dynamics batch of each
seed, the masking of seeds whose epochs are shorter, and the fields' dtypes (the epochs themselves run in
test_world_model.py and test_train_seeds.py); which programs the loop compiles ahead, and in which order."""
import jax
import numpy as np
import pytest

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


def test_a_periods_chunks_start_periods_and_the_schedule_names_its_periods():
    """slots.Period.slots: a chunk's length is the smallest multiple of the interval >= compute.epoch_chunk, so
    that an epoch's chunks each start a period; programs.epoch_periods: the warm-up's and one per VQ-VAE interval
    of the schedule (the programs compiled ahead)."""
    from dlwm_jax.programs import epoch_periods
    from dlwm_jax.slots import Period
    assert [Period(k, True).slots(12) for k in (1, 2, 3, 4, 5, 6, 7)] == [12, 12, 12, 12, 15, 12, 14]
    assert Period(3, True).slots(4) == 6 and Period(1, False).slots(4) == 4 and Period(0, True).slots(5) == 5
    paper = config_lib.get_preset("paper")
    assert epoch_periods(paper) == {"warmup": Period(1, False), "joint_every_2": Period(2, True),
                                    "joint_every_3": Period(3, True)}



def _ahead(chunk: int = 4):
    """The smoke preset's programs (a scanned chunk of `chunk` slots) and one seed's state, as compile_ahead gets them."""
    from dlwm_jax import envs
    from dlwm_jax.programs import compile_programs, initial_state
    from dlwm_jax.seed_axis import stack
    config = config_lib.resolve_compute(config_lib.override(CFG, {"compute.epoch_chunk": chunk}))
    num_actions = envs.num_actions(config.env.game)
    world, agent = (stack([x]) for x in initial_state(config, num_actions, 0))
    frames, keys = jax.numpy.zeros((1, 64, 96, 96), np.uint8), jax.random.split(jax.random.key(0), 1)
    return config, compile_programs(config, num_actions, 1, None), world, agent, frames, keys


@pytest.mark.parametrize("chunk", [4, 0])  # scanned chunks (accelerators), per-slot programs (the CPU)
def test_programs_are_compiled_ahead_in_the_order_the_loop_needs_them(chunk):
    """programs.lower_ahead: iteration 1's programs first, the chunks of later VQ-VAE intervals (the smoke preset's
    joint_every_3, iteration 2) last; compile_workers: a quarter of the cores, 1 to 4."""
    from dlwm_jax.programs import compile_workers, lower_ahead
    config, programs, *state = _ahead(chunk)
    world_model = (["world_model_chunk/warmup", "world_model_chunk/joint_every_2"] if chunk else
                   ["vqvae_slot", "encode_slot", "dynamics_slot"])
    assert list(lower_ahead(programs, config, *state, lambda x: x)) == [
        *world_model, "diagnostics", "dream", "ppo_update", "act_eval", "act_collect",
        *(["world_model_chunk/joint_every_3"] if chunk else [])]
    assert [compile_workers(n) for n in (1, 2, 7, 8, 16, 64)] == [1, 1, 1, 2, 4, 4]


def test_a_call_waits_while_its_program_is_compiled_ahead():
    """programs.Program: a call made while compile_lowered compiles that program waits until it is compiled (in the
    loop, JAX compiled it again on the loop's thread: a smoke run's chunks and diagnostics)."""
    import threading

    from dlwm_jax.programs import Ahead, Program, compile_lowered
    program, started, release = Program(jax.jit(lambda x: x + 1)), threading.Event(), threading.Event()

    class Lowered:  # a compilation that lasts until released
        def compile(self):
            started.set()
            release.wait()
    ahead = threading.Thread(target=compile_lowered, args=({"p": Ahead(program, Lowered())},))
    ahead.start()
    started.wait()
    results = []
    call = threading.Thread(target=lambda: results.append(program(np.float32(1))))
    try:
        call.start()
        call.join(0.5)
        waited = call.is_alive() and not results
    finally:
        release.set()
        ahead.join()
        call.join()
    assert waited and results == [2]


@pytest.mark.slow
def test_programs_compiled_ahead_are_the_ones_the_loop_calls():
    """compile_lowered (the loop's compile_ahead) in a thread, one compilation at a time, and the loop's own calls
    of programs it compiles: one made before its turn (the collection's actor) and one made while it compiles it
    (the diagnostics). Each program is compiled once, on one thread, for the shapes the loop calls it with."""
    import threading
    import time

    from jax import monitoring

    from dlwm_jax import world_model as wm
    from dlwm_jax.programs import compile_lowered, lower_ahead
    config, programs, world, agent, frames, keys = _ahead()
    stages = lower_ahead(programs, config, world, agent, frames, keys, lambda x: x)
    compiles = []
    listener = lambda name, *_, **__: (compiles.append(threading.current_thread().name)
                                       if name.endswith("/backend_compile_duration") else None)
    monitoring.register_event_duration_secs_listener(listener)
    try:
        ahead = threading.Thread(target=compile_lowered, args=(stages, 1))
        ahead.start()
        c, windows = config.env.frame_stack, (1, wm.diagnostic_window_length(config), config.schedule.diagnostic_windows)
        programs.act_collect(world, agent.params, np.zeros((1, 1, 96, 96, c), np.uint8), np.zeros((1, 1, 96, 96), np.uint8),
                             np.ones((1, 1), bool), keys)  # before compile_lowered reaches it: compiled here
        while not stages["diagnostics"].program.lock.locked() and ahead.is_alive():
            time.sleep(0.01)  # until compile_lowered compiles the diagnostics
        programs.diagnostics(world, np.zeros((*windows, 96, 96, c), np.uint8), np.zeros(windows, np.int32),
                             np.zeros(windows, np.float32), keys)
        ahead.join()
        assert len(compiles) == len(stages) == 8 and compiles.count("MainThread") == 1, compiles
    finally:
        monitoring.unregister_event_duration_listener(listener)
