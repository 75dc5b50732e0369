"""The real training loop, timed phase by phase: one JSON object on stdout.

    python benchmarks/loop.py [--preset short] [--game BankHeist] [--set section.field=value ...] [--num-seeds N]
                              [--workdir DIR] [--compilation-cache DIR]

Runs `train.train_and_evaluate` (EnvPool, replay, every compiled program, diagnostics, checkpoints, evaluation,
the random agent) in this process, with each phase of run_state.PHASES wrapped in a timer. Per iteration and
phase: the wall time, the host's share (`host_share`: the main thread's CPU time over the wall time, i.e. the
fraction of the phase the Python thread was busy dispatching programs, drawing batches, stepping EnvPool's
interface and writing outputs rather than waiting for the device or for EnvPool's worker threads; on the CPU
backend the programs may also run on that thread), the work done (all seeds together: real env steps, VQ-VAE and
dynamics steps, PPO updates, read off metrics.jsonl) and its rate. A line per phase goes to stderr as it ends
(`[loop] {...}`), so a run stopped part-way leaves what it timed. Iteration 1's phases include compiling their
programs (or loading them from the compilation cache); `finish` is the results. The evaluations and the random
agent run off the loop's path (dlwm_jax/background.py): an `evaluate` phase times what stays on it, and
`background_wait_s` the seconds the loop waited for them (when it joins them, before a checkpoint and at the end).
`compile_by_thread`: XLA compilations by thread (MainThread: the loop's own; dlwm-compile: compile_ahead's; dlwm-
background: work off the loop's path), their count and seconds (JAX's backend_compile_duration events).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def read_records(path: str, offset: int) -> list[dict]:
    """The metrics.jsonl records written after byte `offset`."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        f.seek(offset)
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


def phase_work(phase: str, records: list[dict], config, iteration: int, first_unit: int,
               num_seeds: int) -> dict[str, float]:
    """The work one phase did, all seeds together: VQ-VAE and dynamics steps from the records it wrote (one
    seed's metrics.jsonl, times the seeds: their epochs differ by a few steps), real env steps and PPO updates from
    the schedule (less what a resume skipped)."""
    steps = lambda kind: sum(r.get("steps", 0) for r in records if r.get("phase") == kind) * num_seeds
    s = config.schedule
    if phase == "collect":
        return {"real_steps": (s.initial_steps if iteration == 0 else s.steps_per_iteration) * num_seeds}
    if phase == "warmup":
        return {"vqvae_steps": steps("warmup")}
    if phase == "world_model":
        return {"dynamics_steps": steps("dynamics"), "vqvae_steps": steps("vqvae")}
    if phase == "policy":
        return {"ppo_updates": (s.ppo_updates[iteration] - first_unit) * num_seeds}
    return {}


class PhaseTimer:
    """Wraps the loop's phase steps (train.PHASE_STEPS) and its finish; collects one figure per phase."""

    def __init__(self, metrics_path: str, num_seeds: int, report=lambda figure: None,
                 clocks=(time.perf_counter, time.thread_time)):
        self.metrics_path, self.num_seeds, self.report = metrics_path, num_seeds, report
        self.wall_clock, self.cpu_clock = clocks  # wall seconds, this thread's CPU seconds
        self.figures = []

    def wrap(self, name: str, step):
        def timed(run, iteration, first_unit=0):
            # the records this phase writes: a resumed run's file already holds its earlier processes' (cut back
            # to the checkpoint's offset when the run started), and work off the loop's path may write between phases
            offset = os.path.getsize(self.metrics_path) if os.path.exists(self.metrics_path) else 0
            wall, cpu = self.wall_clock(), self.cpu_clock()
            out = step(run, iteration, first_unit)
            wall, cpu = self.wall_clock() - wall, self.cpu_clock() - cpu
            records = read_records(self.metrics_path, offset)
            self.add(name, iteration, wall, cpu, phase_work(name, records, run.config, iteration, first_unit,
                                                            self.num_seeds))
            return out
        return timed

    def add(self, name: str, iteration: int, wall_s: float, host_s: float, work: dict[str, float]) -> None:
        figure = {"iteration": iteration + 1, "phase": name, "wall_s": round(wall_s, 3),
                  "host_share": round(min(host_s / max(wall_s, 1e-9), 1.0), 3), **work,
                  **{f"{k}_per_s": round(v / max(wall_s, 1e-9), 2) for k, v in work.items() if v}}
        self.figures.append(figure)
        self.report(figure)


def summarise(figures: list[dict]) -> dict[str, dict]:
    """Per phase over all iterations: wall seconds, host share (weighted by wall time), work and rates; and over
    iterations after the first (steady state: no compilation)."""
    out = {}
    for label, chosen in (("all", figures), ("after_iteration_1", [f for f in figures if f["iteration"] > 1])):
        by_phase: dict[str, dict] = {}
        for f in chosen:
            total = by_phase.setdefault(f["phase"], {"wall_s": 0.0, "host_s": 0.0})
            total["wall_s"] += f["wall_s"]
            total["host_s"] += f["wall_s"] * f["host_share"]
            for k, v in f.items():
                if k.endswith("_steps") or k == "real_steps" or k == "ppo_updates":
                    total[k] = total.get(k, 0) + v
        for total in by_phase.values():
            wall = max(total["wall_s"], 1e-9)
            total["host_share"] = round(total.pop("host_s") / wall, 3)
            total.update({f"{k}_per_s": round(v / wall, 2) for k, v in list(total.items())
                          if (k.endswith("_steps") or k == "ppo_updates") and v})
            total["wall_s"] = round(total["wall_s"], 2)
        out[label] = by_phase
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="short")
    parser.add_argument("--game", default="BankHeist")
    parser.add_argument("--set", action="append", default=[], help="config override section.field=value")
    parser.add_argument("--num-seeds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, deleted at the end")
    parser.add_argument("--compilation-cache", default=os.path.expanduser("~/.cache/dlwm_jax/xla"),
                        help="JAX's persistent compilation cache ('' disables it)")
    args = parser.parse_args()

    import jax
    from jax import monitoring
    from dlwm_jax import config as config_lib
    from dlwm_jax import train
    from dlwm_jax.background import Background
    from dlwm_jax.finish import finish_run
    from dlwm_jax.results import git_commit
    from dlwm_jax.run_state import PHASES, Stopped
    from dlwm_jax.seed_axis import use_compilation_cache

    config = config_lib.override(config_lib.get_preset(args.preset),
                                 {"env.game": args.game, "seed": args.seed,
                                  **dict(item.split("=", 1) for item in args.set)})
    if args.compilation_cache:
        use_compilation_cache(args.compilation_cache)
    workdir = args.workdir or tempfile.mkdtemp(prefix="dlwm_loop_")
    metrics = os.path.join(workdir, "metrics.jsonl" if args.num_seeds == 1 else f"seed_{args.seed}/metrics.jsonl")
    timer = PhaseTimer(metrics, args.num_seeds,
                       lambda figure: print(f"[loop] {json.dumps(figure)}", file=sys.stderr, flush=True))
    train.PHASE_STEPS = tuple(timer.wrap(name, step) for name, step in zip(PHASES, train.PHASE_STEPS))
    waits = []  # seconds the loop waited on work off its path (Background.join before a checkpoint / at the end)
    join = Background.join

    def timed_join(self):
        start = time.perf_counter()
        join(self)
        waits.append(time.perf_counter() - start)
    Background.join = timed_join
    compiles: dict[str, list] = {}  # thread (pool threads as one) -> [count, seconds]

    def on_compile(event: str, seconds: float, **_) -> None:
        if event.endswith("/backend_compile_duration"):
            figure = compiles.setdefault(threading.current_thread().name.split("_")[0], [0, 0.0])
            figure[0], figure[1] = figure[0] + 1, figure[1] + seconds
    monitoring.register_event_duration_secs_listener(on_compile)
    train.finish_run = lambda run: timer.wrap("finish", lambda r, it, u: finish_run(r))(
        run, config.schedule.num_iterations - 1, 0)
    started = time.perf_counter()
    try:
        result = train.train_and_evaluate(config, workdir, args.num_seeds, echo=lambda line: print(line, file=sys.stderr),
                                          stop=train.stop_on_sigterm())  # a part's limit: a checkpoint to resume
    except Stopped as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(143)
    else:
        with open(os.path.join(workdir, "results.json")) as f:
            random_agent = [seed["return_mean"] for seed in json.load(f)["random_agent"]["per_seed"]]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    device = jax.devices()[0]
    print(json.dumps({
        "run_wall_s": round(time.perf_counter() - started, 2), "phases": timer.figures,
        "background_wait_s": round(sum(waits), 2),
        "compile_by_thread": {name: {"count": n, "seconds": round(t, 1)} for name, (n, t) in sorted(compiles.items())},
        "by_phase": summarise(timer.figures), "final_eval_return_per_seed": result["aggregate"]["final_eval_return_per_seed"],
        "random_agent_return_per_seed": random_agent,
        "preset": args.preset, "game": args.game, "num_seeds": args.num_seeds, "overrides": args.set,
        "compute": config_lib.to_dict(config_lib.resolve_compute(config))["compute"],
        "backend": jax.default_backend(), "device_kind": device.device_kind, "jax": jax.__version__,
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
