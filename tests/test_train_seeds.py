"""The seed axis of the training loop (dlwm_jax/seed_axis.py, epochs.py, train.py): N vmapped seeds == N one-seed
runs (to float tolerance), the pooled EnvPool == the one-seed runs' envs, padded joint epochs == per-seed joint
epochs, and (slow) the seed axis sharded over 4 forced CPU devices == the unsharded run.

What is compared how tightly, and why: vmapped convs/matmuls may differ from unbatched ones in the last bits.
Everything that does not pass through a network is exact (env data of the random first collection, episode
counts, metric record sequence, step counts of padded epochs). Losses of the first phases agree to ~1e-5
relative; later, categorical samples (dynamics unroll, imagination, acting) can flip on a last-bit difference
and Adam turns tiny sign differences of near-zero gradients into lr-sized steps, so final parameters are compared
by relative norm (observed <= 3e-3), against a cross-seed distance of order 1.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import CACHE, ROOT, shared_run

from dlwm_jax import config as config_lib
from dlwm_jax import envs
from dlwm_jax import world_model as wm
from dlwm_jax.epochs import joint_epoch, warmup_epoch
from dlwm_jax.phases import policy as policy_phase
from dlwm_jax.programs import compile_programs
from dlwm_jax.replay import Replay
from dlwm_jax.results import aggregate
from dlwm_jax.run_state import POLICY, WARMUP
from dlwm_jax.seed_axis import seed_sharding, stack, unstack
from dlwm_jax.train import train_and_evaluate

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from run import random_replays, stub_run  # noqa: E402  (benchmarks/run.py: the loop with stub programs)
SMOKE = config_lib.override(config_lib.smoke(), {"env.game": "Pong"})
quiet = lambda _: None


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """The one-seed smoke runs of seeds 0 and 1 (experiments/train.py, shared with the other test files)."""
    return [shared_run(tmp_path_factory, name)[0] for name in ("single", "seed_1")]


@pytest.fixture(scope="module")
def vmapped_run(tmp_path_factory):
    """Seeds 0 and 1 vmapped in one run: (workdir, stdout)."""
    return shared_run(tmp_path_factory, "two_seeds")


def records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def final_state(workdir):
    """The last checkpoint's (world, agent) as nested dicts of numpy arrays."""
    directory = os.path.join(workdir, "checkpoints")
    step = max(int(d) for d in os.listdir(directory) if d.isdigit())
    return ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))


def flat(tree, index=None):
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.ravel(np.asarray(x)[index] if index is not None else x) for x in leaves]).astype(np.float64)


def relative_distance(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


PARTS = ("encoder_params", "decoder_params", "dynamics_params", "codebook")


def assert_params_close(single, stacked, s, tolerance):
    world, agent = single
    for part in PARTS:
        d = relative_distance(flat(world[part]), flat(stacked[0][part], s))
        assert d < tolerance, (s, part, d)
    d = relative_distance(flat(agent["params"]), flat(stacked[1]["params"], s))
    assert d < tolerance, (s, "policy", d)


def assert_records_close(expected, got, seed):
    assert [(r["phase"], r["iteration"], r.get("unit")) for r in expected] == \
           [(r["phase"], r["iteration"], r.get("unit")) for r in got]
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        where = (seed, a["phase"], a["iteration"])
        if a["phase"] == "collect":
            assert a == b, where  # env data: no network difference reaches them
        elif a["phase"] == "evaluate" and a["iteration"] == 1:  # nor the first evaluation's envs (wall time differs)
            real = lambda r: {k: v for k, v in r.items() if k.startswith("eval_")}
            assert real(a) == real(b), where
        elif a["phase"] == "diagnostics":
            assert a["windows"] == b["windows"] and a["model_iteration"] == b["model_iteration"], where
        elif a["phase"] in ("warmup", "vqvae", "dynamics"):
            for k in a:
                if isinstance(a[k], float):
                    np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=5e-2, err_msg=f"{where} {k}")
        elif a["phase"] == "policy":
            for k in a:
                if isinstance(a[k], float):
                    np.testing.assert_allclose(b[k], a[k], rtol=5e-2, atol=1e-2, err_msg=f"{where} {k}")


# ------------------------------------------------------------------------------------------ fast checks

def test_pooled_env_reproduces_each_seeds_own_envs():
    env_config = SMOKE.env
    base_seeds, per_seed = [123, 98_765], 2
    actions = np.random.default_rng(0).integers(0, envs.num_actions("Pong"), 120).astype(np.int32)

    def frames(env, n):
        obs, _ = env.reset()
        out = [envs.frames_of(obs).copy()]
        for a in actions:
            obs, *_ = env.step(np.full(n, a, np.int32))
            out.append(envs.frames_of(obs).copy())
        return np.stack(out, 1)  # [N, T+1, 96, 96]

    pooled = frames(envs.make_env(env_config, per_seed, base_seeds), per_seed * len(base_seeds))
    for s, seed in enumerate(base_seeds):
        own = frames(envs.make_env(env_config, per_seed, seed), per_seed)
        np.testing.assert_array_equal(pooled[s * per_seed:(s + 1) * per_seed], own)
    assert not np.array_equal(pooled[0], pooled[per_seed])


def test_aggregate_over_seeds():
    result = aggregate([4.0, 100.0, 1.0, 3.0, 2.0])
    assert result["mean"] == 22.0 and result["median"] == 3.0 and result["iqm"] == 3.0  # IQM: mean of 2, 3, 4
    assert result["std"] == pytest.approx(np.std([1, 2, 3, 4, 100])) and result["num_seeds"] == 5
    assert aggregate([1.0, 2.0, 3.0, 10.0])["iqm"] == 2.5


def test_indivisible_seed_count_is_refused():
    with pytest.raises(ValueError, match="multiple of the 4"):
        seed_sharding(3, jax.devices() * 4)
    assert seed_sharding(3, jax.devices()[:1]) is None


@pytest.mark.parametrize("epoch_chunk", [0, pytest.param(4, marks=pytest.mark.slow)])
def test_padded_joint_epoch_equals_each_seeds_own(epoch_chunk):
    """Seeds whose epochs have different numbers of dynamics batches: the vmapped epoch pads the short one with
    masked no-op steps, and each seed ends where its own one-seed joint epoch does (same step counts, close params).
    epoch_chunk 4: the same with the accelerators' scanned chunks (masking inside the scan, slow)."""
    config = config_lib.override(SMOKE, {"compute.epoch_chunk": epoch_chunk})
    d = config.dynamics
    rng = np.random.default_rng(1)
    replays = []
    for _ in range(2):  # 4 streams x 24 steps: 4..8 windows of 11 depending on the random offsets -> 1 or 2 batches
        replay = Replay(96, 4, (96, 96), config.env.frame_stack)
        terminals = rng.random((4, 24)) < 0.05
        replay.add(rng.integers(0, 255, (4, 24, 96, 96), dtype=np.uint8), rng.integers(0, 6, (4, 24)).astype(np.int32),
                   rng.choice([-1.0, 0.0, 1.0], (4, 24)).astype(np.float32), terminals,
                   np.concatenate([np.ones((4, 1), bool), terminals[:, :-1]], 1))
        replays.append(replay)
    count = lambda r, k: r.num_sequence_batches(jax.random.split(k, 3)[1], d.batch_size, d.sequence_length, d.max_offset)
    keys = next(ks for ks in ([jax.random.key(i), jax.random.key(i + 1)] for i in range(100))
                if count(replays[0], ks[0]) != count(replays[1], ks[1]))
    worlds = [wm.init_world_model(config, 6, jax.random.key(10 + s)) for s in range(2)]
    interval = 2
    one, two = (compile_programs(config, 6, n, None) for n in (1, 2))
    expected = []
    for w, r, k in zip(worlds, replays, keys):
        world, [metrics] = joint_epoch(one, stack([w]), [r], jnp.asarray(r.frames)[None], jnp.stack([k]), interval)
        expected.append((unstack(world, 0), metrics))
    frames = jnp.stack([r.frames for r in replays])
    stacked, got = joint_epoch(two, stack(worlds), replays, frames, jnp.stack(keys), interval)
    for s, (world, metrics) in enumerate(expected):
        for kind in ("vqvae", "dynamics"):
            assert got[s][kind]["steps"] == metrics[kind]["steps"]
            np.testing.assert_allclose(got[s][kind]["loss"], metrics[kind]["loss"], rtol=1e-4)
        mine = unstack(stacked, s)
        assert int(mine.dynamics_steps) == int(world.dynamics_steps) == count(replays[s], keys[s])
        assert int(mine.vqvae_steps) == int(world.vqvae_steps)
        for part in PARTS:
            assert relative_distance(flat(getattr(world, part)), flat(getattr(mine, part))) < 1e-4, (s, part)


# --------------------------------------------------------------------------------- the driver end to end

def test_vmapped_seeds_match_separate_runs(single_runs, vmapped_run):
    workdir, stdout = vmapped_run
    stacked = final_state(workdir)
    finals = []
    for seed, single in enumerate(single_runs):
        seed_dir = os.path.join(workdir, f"seed_{seed}")
        for name in ("metrics.jsonl", "summary.json", "learning_curve.png", "reconstructions_iter2.png",
                     "dream_iter2.gif"):
            assert os.path.exists(os.path.join(seed_dir, name)), (seed, name)
        assert_records_close(records(single), records(seed_dir), seed)
        # Each seed's replay holds exactly its single run's data: the random first collection bit for bit, the
        # agent's collection in iteration 2 action for action (sampled from close logits with the same keys).
        for k, min_agreement in ((0, 1.0), (1, 0.95)):
            a = np.load(os.path.join(single, "checkpoints", "replay", f"chunk_{k}.npz"))
            b = np.load(os.path.join(workdir, "checkpoints", "replay", f"chunk_{k}.npz"))
            assert np.mean(a["actions"][0] == b["actions"][seed]) >= min_agreement, (seed, k)
            if k == 0:
                np.testing.assert_array_equal(a["frames"][0], b["frames"][seed])
        assert_params_close(final_state(single), stacked, seed, tolerance=1e-2)
        summary = json.load(open(os.path.join(seed_dir, "summary.json")))
        assert summary["seed"] == seed and summary["real_steps"] == 144
        finals.append(summary["final_eval_return_mean"])
    # the tolerance is meaningful: different seeds are far apart
    assert relative_distance(flat(final_state(single_runs[0])[0]["encoder_params"]),
                             flat(final_state(single_runs[1])[0]["encoder_params"])) > 0.3
    aggregate = json.load(open(os.path.join(workdir, "aggregate.json")))
    assert aggregate["final_eval_return_per_seed"] == finals and f"per seed {finals}" in stdout
    assert aggregate["final_eval_return"]["mean"] == pytest.approx(np.mean(finals))
    assert aggregate["final_eval_return"]["median"] == pytest.approx(np.median(finals))


@pytest.mark.slow
@pytest.mark.parametrize("epoch_chunk", [0, 4])  # per-step programs (the CPU's), scanned chunks (accelerators')
def test_sharded_over_4_devices_matches_unsharded(tmp_path, epoch_chunk):
    sharded_dir, unsharded_dir = str(tmp_path / "sharded"), str(tmp_path / "unsharded")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--game=Pong",
                           "--preset=smoke", "--num_seeds=4", f"--workdir={sharded_dir}",
                           f"--set=compute.epoch_chunk={epoch_chunk}", f"--compilation_cache={CACHE}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(os.path.join(sharded_dir, "aggregate.json")))["num_devices"] == 4
    train_and_evaluate(config_lib.override(SMOKE, {"compute.epoch_chunk": epoch_chunk}), unsharded_dir, 4, echo=quiet)
    assert json.load(open(os.path.join(unsharded_dir, "aggregate.json")))["num_devices"] == 1
    sharded = final_state(sharded_dir)
    unsharded = final_state(unsharded_dir)
    for seed in range(4):
        assert_records_close(records(os.path.join(unsharded_dir, f"seed_{seed}")),
                             records(os.path.join(sharded_dir, f"seed_{seed}")), seed)
        assert_params_close(jax.tree.map(lambda x: np.asarray(x)[seed], unsharded), sharded, seed, tolerance=1e-2)


@pytest.mark.slow
def test_killed_many_seed_run_resumes_to_identical_parameters(tmp_path):
    import signal
    import time
    script = os.path.join(ROOT, "experiments", "train.py")
    args = ["--game=Pong", "--preset=smoke", "--num_seeds=2", f"--compilation_cache={CACHE}"]
    reference = str(tmp_path / "reference")
    assert subprocess.run([sys.executable, script, *args, f"--workdir={reference}"], capture_output=True,
                          cwd=ROOT, timeout=1800).returncode == 0
    workdir = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, script, *args, f"--workdir={workdir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("[iter")
        if seen >= 4:  # inside the policy phase of iteration 1
            time.sleep(0.5)
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([sys.executable, script, *args, f"--workdir={workdir}"], capture_output=True,
                             text=True, cwd=ROOT, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint" in resumed.stdout
    for seed in range(2):
        expected = json.load(open(os.path.join(reference, f"seed_{seed}", "summary.json")))
        got = json.load(open(os.path.join(workdir, f"seed_{seed}", "summary.json")))
        assert got == expected, seed
        strip = lambda d: [(r["phase"], r["iteration"], r.get("unit")) for r in records(os.path.join(d, f"seed_{seed}"))]
        assert strip(workdir) == strip(reference)


@pytest.mark.slow
def test_two_processes_of_two_seeds_match_four_seeds_in_one_process_and_resume_after_a_kill(tmp_path):
    """--distributed with 2 local CPU processes, both killed mid-run and restarted:
    each process trains its 2 seeds, every seed's outputs are written once, process 0 writes the merged results and
    the aggregate; per seed the same as the 4 seeds of one process (to float tolerance: 2 vs 4 vmapped seeds)."""
    import signal
    import time
    one_dir, two_dir = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
    train_and_evaluate(SMOKE, one_dir, 4, echo=quiet)

    def start():
        return [subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--game=Pong",
                                  "--preset=smoke", "--num_seeds=4", f"--workdir={two_dir}", "--distributed",
                                  "--num_processes=2", f"--process_id={p}",
                                  f"--compilation_cache={CACHE}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=ROOT) for p in range(2)]
    procs = start()
    seen = 0
    for line in procs[0].stdout:  # process 0's progress; kill both inside iteration 1
        seen += line.startswith("[iter")
        if seen >= 4:
            break
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(1.0)
    procs = start()
    outputs = [proc.communicate(timeout=1800) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert "resuming from checkpoint" in out
    assert sorted(os.listdir(os.path.join(two_dir, "checkpoints"))) == ["process_0", "process_1"]
    one, two = final_state(one_dir), None
    for p in range(2):
        directory = os.path.join(two_dir, "checkpoints", f"process_{p}")
        step = max(int(d) for d in os.listdir(directory) if d.isdigit())
        two = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
        for local in range(2):
            seed = 2 * p + local
            assert_records_close(records(os.path.join(one_dir, f"seed_{seed}")),
                                 records(os.path.join(two_dir, f"seed_{seed}")), seed)
            assert_params_close(jax.tree.map(lambda x: np.asarray(x)[seed], one), two, local, tolerance=1e-2)
    aggregate_two = json.load(open(os.path.join(two_dir, "aggregate.json")))
    assert aggregate_two["seeds"] == [0, 1, 2, 3] and aggregate_two["num_processes"] == 2
    assert not os.path.exists(os.path.join(one_dir, "checkpoints", "process_0"))
    results = json.load(open(os.path.join(two_dir, "results.json")))
    assert [s["seed"] for s in results["seeds"]] == [0, 1, 2, 3]
    assert [s["final_eval_return"] for s in results["seeds"]] == aggregate_two["final_eval_return_per_seed"]


def test_loop_phases_queue_every_step_without_waiting_for_the_device():
    """The warm-up epoch, the joint epoch and the policy phase dispatch all their steps without waiting for any
    (JAX's asynchronous dispatch keeps the device busy while the host prepares the next batch): with each step a
    slow device program, the first step's output is still being computed when the phase returns. A step that
    read anything the device computes after a queued step (e.g. a key turned into numpy) would have waited for
    it. The end of a phase (its metrics) waits; that is once per phase."""
    config = config_lib.override(config_lib.get_preset("smoke"), {"schedule.ppo_updates": "4,4"})
    slow = jax.jit(lambda x, n: jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ y), x))
    x = jax.block_until_ready(slow(jnp.full((512, 512), 1e-3), 1))
    outputs = []  # the first step of a phase takes ~1 s on the device, the others ~nothing

    def work(inputs):
        outputs.append(slow(x, 10 if outputs else 400))
    run = stub_run(config, random_replays(config, 2, frames=240), work)
    keys = run.keys(0, WARMUP)
    phases = {"warm-up epoch": lambda: warmup_epoch(run.programs, run.world, run.replays, run.frames, keys),
              "joint epoch": lambda: joint_epoch(run.programs, run.world, run.replays, run.frames, keys, 2),
              "policy phase": lambda: policy_phase(run, 0, 0)}
    for name, phase in phases.items():
        outputs.clear()
        phase()
        assert len(outputs) >= 4, name
        assert not outputs[0].is_ready(), f"the {name} waited for the device before its last step was queued"
        jax.block_until_ready(outputs)


def test_policy_phase_keys_are_the_per_update_keys():
    """The policy phase draws its keys for all updates at once: row i of Run.unit_keys is Run.keys for unit
    first + i, and replay.generators gives the Generators replay._generator makes from each key (so a run, and a
    resumed one, draws exactly what the per-update derivation drew)."""
    from dlwm_jax.replay import _generator, generators
    config = config_lib.get_preset("smoke")
    run = stub_run(config, random_replays(config, 3, frames=40))
    run.seeds = [0, 7, 3]
    grid = run.unit_keys(2, POLICY, range(4, 9))
    assert grid.shape == (5, 3)
    rngs = generators(grid)
    for i, u in enumerate(range(4, 9)):
        keys = run.keys(2, POLICY, u)
        np.testing.assert_array_equal(jax.random.key_data(grid[i]), jax.random.key_data(keys))
        for s in range(3):
            np.testing.assert_array_equal(rngs[i * 3 + s].integers(0, 2**31, 8),
                                          _generator(keys[s]).integers(0, 2**31, 8))
