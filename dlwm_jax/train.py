"""`train_and_evaluate(config, workdir, num_seeds=1)`: the iterative loop of paper section 3.4 / SPEC 8.3, for one
seed or many at once.

Each of the `schedule.num_iterations` iterations runs five phases:
  collect (12,800 random steps in iteration 1, then 6,400 with the agent at temperature 1.5) -> warmup
  (iteration 1 only: VQ-VAE epochs at 10x lr) -> world_model (joint epochs, slow VQ-VAE updates) -> policy
  (PPO updates on imagined rollouts) -> evaluate (sampled actions, fresh seeded envs).

Seeds: seed s (= config.seed + s) is an independent run with root key jax.random.key(config.seed + s), its own
replay and its own envs. One seed is the N = 1 case of the seed axis: the state of all seeds is one pytree with
a leading axis [S, ...], and each pure step (world_model.py, ppo.py, imagination.py) is compiled once for all
seeds by `seed_axis.over_seeds` (the one place where jit, vmap, sharding and compiler options are chosen).
The envs of all seeds form one EnvPool in which env e of seed s is exactly the env a one-seed run would create.

Where each part lives: seed_axis.py (stack, vmap, shard), programs.py (the compiled programs), run_state.py (Run:
keys, checkpoints, resume), epochs.py (warm-up and joint epochs over seeds), phases.py (the five phases and the
diagnostics), finish.py (results.json, aggregate.json, merging shares); this file holds the loop alone.

Outputs (outputs.py): one seed writes into `workdir`; N seeds write workdir/seed_<s>/ each and
workdir/aggregate.json; results.json (raw data of every seed and of the random agent) goes into `workdir`.
Many processes (`share`, see train_and_evaluate): each trains its share of the seeds independently, with its own
checkpoints; process 0 merges the shares' results at the end.

Numerics: a vmapped conv/matmul may differ from the unbatched one in the last bits and categorical samples can
flip on such a difference, so seed s of an N-seed run equals its one-seed run to float tolerance, not bit for
bit (tests/test_train_seeds.py says what is compared how tightly).
"""
from __future__ import annotations

import functools
import signal
import threading
from typing import Callable, Sequence

import jax

from dlwm_jax.config import Config, resolve_compute, validate
from dlwm_jax.finish import evaluate_random_agent, finish_run
from dlwm_jax.phases import PHASE_STEPS
from dlwm_jax.run_state import COLLECT, EVALUATE, PHASES, WARMUP, start_run


def stop_on_sigterm() -> threading.Event:
    """An event that SIGTERM sets (a batch system's preemption or time limit, the device check's part limit), for
    train_and_evaluate(stop=...). Idempotent: a process may get SIGTERM twice (from a batch system and from a
    driver such as evidence.py that forwards it); SIGKILL ends it at once. Installs a signal handler: call it from
    the main thread of an entry point."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    return stop


def train_and_evaluate(config: Config, workdir: str, num_seeds: int = 1, echo: Callable[[str], None] | None = None,
                       devices: Sequence[jax.Device] | None = None, share: tuple[int, int] = (0, 1),
                       stop: threading.Event | None = None) -> dict:
    """Runs (or resumes) seeds config.seed .. config.seed + num_seeds - 1 in `workdir`; returns
    {"seeds": [per seed summary.json], "aggregate": final evaluation over seeds (mean, std, median, IQM)}.

    devices: the seed axis is sharded over these (default: all visible; S must be a multiple of their number).
    share: (process p, number of processes P) of a multi-process job (hosts, or processes on one host): this
    process trains seeds config.seed + p * N / P ... of the N, with its own envs, replay and checkpoints
    (workdir/checkpoints/process_<p>; the workdir is shared); process 0 merges every share's results once all are
    written. The processes never communicate (the seeds are independent), so no jax.distributed is needed.
    stop: once set (stop_on_sigterm), the run saves a checkpoint at its next unit boundary (an epoch, a report of
    PPO updates) or phase end and raises Stopped; the same call resumes it from there.
    Raises ValueError (bad config / game), OSError (workdir), CheckpointError (unreadable checkpoint),
    NonFiniteError (a NaN/inf loss) or Stopped with one-line messages; nothing already saved is deleted by a failure.
    """
    echo = echo or functools.partial(print, flush=True)
    config = resolve_compute(validate(config))  # the formulations of this backend; checkpoints store them
    with jax.threefry_partitionable(config.compute.threefry_partitionable):
        run = start_run(config, workdir, num_seeds, echo, devices, share)
        if stop is not None:
            run.stop = stop
        try:
            evaluate_random_agent(run)  # beside the training, for the results at the end
            run.compile_ahead()  # the later phases' programs, beside the first collection
            start, resume_phase, resume_unit = run.meta["iteration"], run.meta["phase"], run.meta["unit"]
            for it in range(start, config.schedule.num_iterations):
                for phase in range(resume_phase if it == start else COLLECT, len(PHASES)):
                    if phase == WARMUP and it > 0:
                        continue
                    run.start_phase()
                    PHASE_STEPS[phase](run, it, resume_unit if (it, phase) == (start, resume_phase) else 0)
                    next_iteration, next_phase = (it + 1, COLLECT) if phase == EVALUATE else (it, phase + 1)
                    # No checkpoint right after an evaluation, nor after the next collection: the evaluation
                    # runs beside the loop (background.py) until the world model's checkpoint joins it
                    beside = phase == EVALUATE or (phase == COLLECT and it > 0)
                    if not beside or next_iteration == config.schedule.num_iterations:
                        run.save(next_iteration, next_phase, 0)
            return finish_run(run)
        finally:
            run.checkpoints.wait()  # a failing run still commits the checkpoints it took (they are asynchronous)
