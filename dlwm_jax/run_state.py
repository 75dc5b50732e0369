"""A run in progress (`Run`): its seeds, stacked state, replays, envs, programs and outputs; its keys; starting a
new run or resuming the one a workdir's latest checkpoint holds.

Keys: the key of unit u (an epoch, a PPO update, ...) of phase p in iteration i of a seed is
fold_in(fold_in(fold_in(root, i), p), u), so a resumed run draws exactly the keys an uninterrupted one would,
and seed s of an N-seed run draws the keys of the one-seed run of seed s. EnvPool seeds derive from the root key.

Checkpoints (checkpoint.py) are taken after every phase (but an evaluation and the collection after it: the
evaluation runs beside the loop until the next checkpoint joins it, train.py and background.py) and, inside long
phases, every `checkpoint_every_s` seconds at a unit boundary; once `Run.stop` is set (train.stop_on_sigterm), at
the next unit boundary or phase end, after which the run raises `Stopped`. Orbax writes them beside the loop. The
real envs cannot be snapshotted, so on resume the collector's envs are rebuilt with their seeds and re-stepped with the
stored actions (deterministic: no sticky actions), and the frames they produce are checked against the replay.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from dlwm_jax import envs
from dlwm_jax import world_model as wm
from dlwm_jax.background import Background
from dlwm_jax.checkpoint import Checkpointer, CheckpointError
from dlwm_jax.collect import Collector, Trajectory, scripted_actor
from dlwm_jax.config import Config, from_dict, resolve_compute, to_dict
from dlwm_jax.device_replay import empty_frames, seed_chunks, write_frames
from dlwm_jax.networks import make_networks
from dlwm_jax.outputs import Logger
from dlwm_jax.programs import AgentState, Programs, compile_ahead, compile_programs, compile_workers, initial_state
from dlwm_jax.replay import Replay
from dlwm_jax.results import git_commit
from dlwm_jax.seed_axis import put_on_seeds, seed_sharding, stack

PHASES = ("collect", "warmup", "world_model", "policy", "evaluate")
COLLECT, WARMUP, WORLD_MODEL, POLICY, EVALUATE = range(len(PHASES))
DIAGNOSTICS = len(PHASES)   # key namespace of the diagnostics (not a phase: they change no state)
HOLDOUT_ENV = 10_000        # derived_seed purpose of iteration 1's held-back random env
ENVS_PER_SEED = 1           # collection envs per seed (SPEC 8.3: one env)


class Stopped(RuntimeError):
    """The run stopped on request (`Run.stop`) with a checkpoint at the point it names: the same call resumes it."""


def unit_key(root: jax.Array, iteration: int, phase: int, unit: int = 0) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, iteration), phase), unit)


@jax.jit
def _unit_keys(roots: jax.Array, iteration: int, phase: int, units: jax.Array) -> jax.Array:
    return jax.vmap(lambda u: jax.vmap(lambda root: unit_key(root, iteration, phase, u))(roots))(units)


def derived_seed(root: jax.Array, purpose: int) -> int:
    """A 31-bit integer seed for host-side libraries (EnvPool), derived from the root key."""
    return int(jax.random.randint(jax.random.fold_in(root, 1_000_003 + purpose), (), 0, 2**31 - 1))


@dataclasses.dataclass
class Run:
    """A run in progress: its seeds, state (stacked [S, ...]), replays, envs, programs and outputs."""
    config: Config
    workdir: str
    seeds: list[int]
    seed_dirs: list[str]
    programs: Programs
    networks: Any
    sharding: NamedSharding | None
    world: wm.WorldModelState
    agent: AgentState
    replays: list[Replay]
    frames: jax.Array           # uint8 [S, capacity, H, W]: the replays' frames on the device (device_replay.py)
    collector: Collector
    checkpoints: Checkpointer
    meta: dict
    loggers: list[Logger]
    echo: Callable[[str], None]
    lock: Any                   # the workdir lock, held while the run is in this process
    total_seeds: int            # over all processes; `seeds` are this process's share
    share: tuple[int, int]      # (process, number of processes) of a multi-process job; (0, 1) otherwise
    background: Background = dataclasses.field(default_factory=Background)  # work off the critical path
    started: float = dataclasses.field(default_factory=time.time)
    last_save: float = dataclasses.field(default_factory=time.time)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)  # set: save at the next chance, end

    @property
    def num_seeds(self) -> int:
        return len(self.seeds)

    @property
    def roots(self) -> list[jax.Array]:
        return [jax.random.key(seed) for seed in self.seeds]

    def keys(self, iteration: int, phase: int, unit: int = 0) -> jax.Array:
        """[S] unit keys, one per seed."""
        return jnp.stack([unit_key(root, iteration, phase, unit) for root in self.roots])

    def unit_keys(self, iteration: int, phase: int, units: range) -> jax.Array:
        """[U, S] keys: row i is keys(iteration, phase, units[i]), all computed by one program."""
        return _unit_keys(jnp.stack(self.roots), iteration, phase, jnp.arange(units.start, units.stop))

    def add_chunk(self, trajectory: Trajectory) -> None:
        """A pooled collection into each seed's replay (Replay.add raises if it is full) and then into the frames on
        the device."""
        start = len(self.replays[0])
        add_per_seed(self.replays, trajectory)
        self.frames = write_frames(self.frames, self.put(seed_chunks(trajectory.frames, self.num_seeds)), start)

    def compile_ahead(self) -> None:
        """Compiles the loop's later programs in a thread beside it (programs.compile_ahead), under the loop's PRNG
        setting (JAX's config contexts are per thread), for the shapes and placements of this run's state; a
        failure there is left for the loop's own call of that program to meet. Not a daemon: a process that ends
        (or fails) while it compiles waits for it, since an interpreter torn down under a running XLA compilation
        may crash on exit."""
        placed = self.sharding is not None  # one device: the loop's arrays are uncommitted, and so are these
        shapes = lambda tree: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if placed else None), tree)
        world, agent, frames = shapes((self.world, self.agent, self.frames))  # the buffers get donated meanwhile
        keys, flag = self.keys(0, WARMUP), self.config.compute.threefry_partitionable

        def work() -> None:
            with jax.threefry_partitionable(flag):
                try:
                    compile_ahead(self.programs, self.config, world, agent, frames, keys, self.put,
                                  compile_workers())
                except Exception:  # noqa: BLE001 (the loop compiles that program itself, and raises there)
                    pass
        threading.Thread(target=work, name="dlwm-compile-ahead").start()

    def put(self, tree: Any) -> Any:
        """Places a pytree with a leading seed axis on the seed sharding (a no-op on one device)."""
        return put_on_seeds(tree, self.sharding)

    def elapsed(self) -> float:
        """Wall time over all resumptions."""
        return self.meta.get("elapsed_s", 0.0) + time.time() - self.started

    def save(self, iteration: int, phase: int, unit: int) -> None:
        """A checkpoint of the run at (iteration, phase, unit), after joining the work off the critical path (its
        records and meta belong in it)."""
        self.background.join()
        self.meta.update(iteration=iteration, phase=phase, unit=unit, metrics_offsets=[lg.offset for lg in self.loggers],
                         log_steps=[lg.log_step for lg in self.loggers], config=to_dict(self.config),
                         num_seeds=self.total_seeds, share=list(self.share),
                         save_index=self.meta["save_index"] + 1, elapsed_s=self.elapsed())
        self.started = time.time()
        self.checkpoints.save(self.meta["save_index"], jax.device_get((self.world, self.agent)), self.meta)
        self.last_save = time.time()
        if self.stop.is_set():
            where = ("after the last iteration" if iteration == self.config.schedule.num_iterations else
                     f"at iteration {iteration + 1}, phase {PHASES[phase]}, unit {unit}")
            raise Stopped(f"stop requested: checkpoint {self.meta['save_index']} saved {where}; rerun the same "
                          "command to resume")

    def maybe_save(self, iteration: int, phase: int, unit: int) -> None:
        """A checkpoint at this unit boundary if `checkpoint_every_s` has passed since the last or a stop was asked
        for (then save raises Stopped)."""
        if self.stop.is_set() or time.time() - self.last_save >= self.config.checkpoint_every_s:
            self.save(iteration, phase, unit)

    def record(self, s: int, iteration: int, phase: str, metrics: dict, **extra) -> None:
        self.loggers[s].write({"phase": phase, "iteration": iteration + 1, "real_steps": len(self.replays[s]), **extra,
                               **{k: float(v) for k, v in metrics.items()}})

    def start_phase(self) -> None:
        for logger in self.loggers:
            logger.start_phase()

    def progress(self, iteration: int, phase: str, done: float, total: int, extra: str = "",
                 first_seed: bool = True) -> None:
        """A progress line: the first seed's clock, and `extra` (with several seeds labelled as the first seed's
        unless first_seed is False)."""
        prefix = f"seed {self.seeds[0]}: " if self.total_seeds > 1 and extra and first_seed else ""
        self.loggers[0].progress(iteration, self.config.schedule.num_iterations, phase, done, total, prefix + extra)

    def heartbeat(self, iteration: int, phase: str, epoch: int, epochs: int):
        return self.loggers[0].heartbeat(iteration, self.config.schedule.num_iterations, phase, epoch, epochs)

    def actor(self, program: Callable, *params) -> Callable:
        """A collect.Actor over the pooled envs [S, E]: each env step one call of an act program (Programs)."""
        def act(stacks, frames, is_first, keys):
            return program(*params, stacks, self.put(frames), self.put(is_first), self.put(keys))
        return act


def _check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create workdir {workdir!r}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise OSError(f"workdir {workdir!r} is not writable")


def lock_workdir(workdir: str, process: int | None = None):
    """An exclusive lock on workdir/.lock (.lock.process_<p> for process p of a multi-process job) for this
    process's lifetime (keep the returned file open): a second process on the same workdir would interleave
    checkpoints. Raises OSError (one line) if it is held."""
    import fcntl
    lock = open(os.path.join(workdir, ".lock" if process is None else f".lock.process_{process}"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise OSError(f"workdir {workdir!r} is in use by another running process") from None
    return lock


def same_config(saved: dict | None, config: Config) -> bool:
    """Whether a checkpoint's meta["config"] is `config` (both resolved for this backend); fields added to Config
    since it was saved count as their defaults, so a run resumes under a newer version that only added options."""
    try:
        return saved is not None and resolve_compute(from_dict(saved)) == resolve_compute(config)
    except ValueError:
        return False


def start_run(config: Config, workdir: str, num_seeds: int, echo: Callable[[str], None],
           devices: Sequence[jax.Device] | None, share: tuple[int, int]) -> Run:
    """A new run in `workdir`, or the one its latest checkpoint holds; `config` validated and resolved."""
    if num_seeds < 1:
        raise ValueError(f"--num_seeds must be >= 1, got {num_seeds}")
    process, num_processes = share
    if not 0 <= process < num_processes:
        raise ValueError(f"--process_id={process} must be in [0, --num_processes={num_processes})")
    if num_seeds % num_processes:
        raise ValueError(f"--num_seeds={num_seeds} is not a multiple of the {num_processes} processes "
                         "(each trains an equal share of the seeds)")
    game = envs.check_game(config.env.game)
    num_actions = envs.num_actions(game)
    per_process = num_seeds // num_processes
    sharding = seed_sharding(per_process, devices)
    _check_workdir(workdir)
    lock = lock_workdir(workdir, process if num_processes > 1 else None)
    seeds = [config.seed + process * per_process + s for s in range(per_process)]
    seed_dirs = [workdir] if num_seeds == 1 else [os.path.join(workdir, f"seed_{seed}") for seed in seeds]
    for d in seed_dirs:
        _check_workdir(d)
    world, agent = stack([initial_state(config, num_actions, seed) for seed in seeds])
    replays = [Replay(config.total_real_steps, ENVS_PER_SEED, (config.env.image_size,) * 2, config.env.frame_stack)
               for _ in seeds]
    roots = [jax.random.key(seed) for seed in seeds]
    collector = Collector(config.env, ENVS_PER_SEED, [derived_seed(root, 0) for root in roots])
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints", *([f"process_{process}"] if num_processes > 1 else [])),
                               asynchronous=True)  # written beside the loop; finish_run waits for the last
    meta = {"iteration": 0, "phase": COLLECT, "unit": 0, "chunks": 0, "metrics_offsets": [0] * per_process,
            "log_steps": [0] * per_process, "eval_histories": [[] for _ in seeds], "last_evals": [None] * per_process,
            "save_index": 0}
    latest = checkpoints.latest_step()
    if latest is not None:
        if "num_seeds" not in checkpoints.restore_meta(latest):  # the one-seed loop before the seed axis
            raise CheckpointError(f"workdir {workdir!r} holds a checkpoint of the older one-seed format (before the "
                                  "seed-axis loop); resume it with that version, or use another --workdir")
        (world, agent), meta = checkpoints.restore(latest, (world, agent))
        if not same_config(meta.get("config"), config) or meta.get("num_seeds") != num_seeds or \
                tuple(meta.get("share", (0, 1))) != share:
            raise ValueError(f"workdir {workdir!r} holds a run with a different config (game/preset/flags), "
                             "--num_seeds or number of processes; use another --workdir or the same flags")
        echo(f"resuming from checkpoint {latest}: iteration {meta['iteration'] + 1}, phase {PHASES[meta['phase']]}, "
             f"unit {meta['unit']}")
    meta["git_commits"] = sorted(set(meta.get("git_commits", [])) | {git_commit()})
    loggers = [Logger(d, offset, step, echo=lambda _: None)
               for d, offset, step in zip(seed_dirs, meta["metrics_offsets"], meta["log_steps"])]
    loggers[0].echo = echo  # progress lines: seed 0's clock
    networks = make_networks(config, num_actions)
    frames = empty_frames(per_process, config.total_real_steps, (config.env.image_size,) * 2, sharding)
    run = Run(config, workdir, seeds, seed_dirs, compile_programs(config, num_actions, per_process, sharding), networks,
              sharding, world, agent, replays, frames, collector, checkpoints, meta, loggers, echo, lock, num_seeds,
              share, Background(lambda: jax.threefry_partitionable(config.compute.threefry_partitionable)))
    run.world, run.agent = run.put(world), run.put(agent)
    for k in range(meta["chunks"]):  # replay and envs as the killed run left them, one chunk read and held at a time
        chunk = Trajectory(**checkpoints.load_replay_chunk(k))
        if meta["iteration"] < config.schedule.num_iterations:
            _fast_forward(collector, chunk)
        run.add_chunk(chunk)
    return run


def _fast_forward(collector: Collector, chunk: Trajectory) -> None:
    """Re-steps the collector pool with a stored chunk's actions, so that after every chunk it is where the killed
    run left it; raises CheckpointError if the frames it produces are not the stored ones."""
    actions = iter(chunk.actions.T)
    trajectory, _ = collector.collect(scripted_actor(actions), chunk.actions.size, jax.random.key(0))
    if not np.array_equal(trajectory.frames, chunk.frames):
        raise CheckpointError("replaying the stored actions did not reproduce the stored frames; "
                              "the environment is not deterministic here, cannot resume")


def add_per_seed(replays: Sequence[Replay], trajectory: Trajectory) -> None:
    """A pooled collection (env rows s * ENVS_PER_SEED .. belong to seed s) into each seed's replay."""
    for s, replay in enumerate(replays):
        replay.add(*(x[s * ENVS_PER_SEED:(s + 1) * ENVS_PER_SEED] for x in trajectory))

