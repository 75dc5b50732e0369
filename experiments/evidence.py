"""One command for an evidence run: N seeds of a preset as separate processes, merged into one results file.

    python experiments/evidence.py --game=CrazyClimber        # preset short, seeds 0-2 -> results/short/CrazyClimber.json

Seed s runs `experiments/train.py --game=G --preset=P --seed=s --workdir=runs/P/G-s` (log: runs/P/G-s.log), one
after another (`--parallel` at once); rerunning the command resumes unfinished seeds from their checkpoints and
skips finished ones. SIGTERM stops the running seeds at their next checkpoint (train.py) and then the command.
When every seed has finished, their `results.json` are merged (dlwm_jax/results.merge_results) into
results/P/G.json: per-seed raw data, the random agent under the same protocol, config, commits, machine, wall time.
Seeds already in that file that the command does not run are kept (later seeds add to a file: --first_seed=3
--num_seeds=2); a file holding some but not all of the command's seeds is refused before anything starts.

Why single-seed processes and not the vmapped `--num_seeds`: on the 2-core CPU this project is developed on, a
vmapped VQ-VAE step of 3 seeds took 1.71 s against 0.41-0.55 s for one seed (XLA:CPU runs the vmapped
convolutions as grouped convolutions). Why one at a time: three processes side by side on those 2 cores did
~0.4 dynamics steps/s each (1.2 in all) against 3.6/s for one process alone (their thread pools contend). On
an accelerator use `train.py --num_seeds`.
"""
import json
import os
import subprocess
import sys
import time

from absl import flags

import cli  # experiments/cli.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")

flags.DEFINE_string("game", None, "Atari game, e.g. CrazyClimber.")
flags.DEFINE_string("preset", "short", "Config preset of every seed.")
flags.DEFINE_integer("num_seeds", 3, "Seeds first_seed .. first_seed + num_seeds - 1.")
flags.DEFINE_integer("first_seed", 0, "The first seed.")
flags.DEFINE_string("runs_dir", None, "Where the seeds' workdirs go (default runs/<preset>).")
flags.DEFINE_string("results_dir", None, "Where <game>.json goes (default results/<preset>).")
flags.DEFINE_integer("parallel", 1, "How many seeds run at once (1: one after another, fastest on a 2-core CPU).")
flags.DEFINE_multi_string("set", [], "Config overrides passed to every seed (train.py --set).")
flags.DEFINE_bool("merge_finished", False, "Start nothing: merge the seeds that have finished so far (a partial "
                  "results file, e.g. to commit raw data before the last seeds are done).")
flags.DEFINE_string("compilation_cache", None, "XLA compilation cache of every seed (train.py --compilation_cache; "
                    "default: train.py's).")
flags.DEFINE_float("progress_every_s", 60.0, "Seconds between progress lines (each seed's latest line).")
FLAGS = flags.FLAGS


def _last_progress_line(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.rstrip() for line in f if line.startswith(("[iter", "resuming", "done", "evaluating"))]
    except OSError:
        return ""
    return lines[-1] if lines else "(starting)"


def _kept_results(path: str, seeds: list[int]) -> dict | None:
    """The game's results file, where it holds only seeds this command does not run (merged with the command's);
    None where there is none or the command runs all of its seeds again. Fails on a partial overlap."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        held = [s["seed"] for s in data["seeds"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        cli.fail(f"cannot read the seeds of {path}: {e}")
    again = [s for s in held if s in seeds]
    if again and len(again) < len(held):
        cli.fail(f"{path} holds seeds {held}, {again} of them run by this command: run all of them or none of them "
                 f"(--first_seed, --num_seeds), or write elsewhere (--results_dir)")
    return None if again else data


def _stop(running: dict) -> None:
    """SIGTERM to the running seeds, which save a checkpoint at their next epoch or PPO report and exit (train.py);
    waits for them, so that the command run again finds their workdirs free."""
    for proc, _ in running.values():
        proc.terminate()
    for s, (proc, log) in running.items():
        print(f"seed {s}: stopping at its next checkpoint", flush=True)
        proc.wait()
        log.close()


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    if not FLAGS.game:
        cli.fail("--game is required, e.g. --game=CrazyClimber", 2)
    if FLAGS.num_seeds < 1 or FLAGS.parallel < 1:
        cli.fail(f"--num_seeds and --parallel must be >= 1, got {FLAGS.num_seeds} and {FLAGS.parallel}", 2)
    from dlwm_jax import envs
    from dlwm_jax.results import merge_results, write_json
    from dlwm_jax.train import stop_on_sigterm
    try:
        envs.check_game(FLAGS.game)  # before any directory, log or process exists (train.py's error and exit code)
    except ValueError as e:
        cli.fail(str(e))
    runs_dir = FLAGS.runs_dir or os.path.join("runs", FLAGS.preset)
    results_dir = FLAGS.results_dir or os.path.join("results", FLAGS.preset)
    seeds = list(range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.num_seeds))
    workdirs = {s: os.path.join(runs_dir, f"{FLAGS.game}-{s}") for s in seeds}
    path = os.path.join(results_dir, f"{FLAGS.game}.json")
    kept = _kept_results(path, seeds)
    if kept:
        print(f"keeping seeds {[s['seed'] for s in kept['seeds']]} of {path}", flush=True)
    try:
        os.makedirs(runs_dir, exist_ok=True)
        os.makedirs(results_dir, exist_ok=True)
    except OSError as e:
        cli.fail(f"cannot create {e.filename!r}: {e.strerror}")

    pending = []
    for s in seeds:
        if os.path.exists(os.path.join(workdirs[s], "results.json")):
            print(f"seed {s}: finished earlier ({workdirs[s]})", flush=True)
        else:
            pending.append(s)
    if FLAGS.merge_finished:
        for s in pending:
            print(f"seed {s}: not finished, left out ({_last_progress_line(workdirs[s] + '.log')})", flush=True)
        seeds = [s for s in seeds if s not in pending]
        if not seeds:
            cli.fail("no seed has finished yet")
        pending = []
    running, last_report, stop = {}, time.time(), stop_on_sigterm()
    while pending or running:
        if stop.is_set():
            _stop(running)
            cli.fail(f"stop requested: seeds {sorted(running)} stopped at a checkpoint, seeds {pending} not started; "
                     "rerun the same command to resume", cli.STOPPED)
        while pending and len(running) < FLAGS.parallel:
            s = pending.pop(0)
            command = [sys.executable, TRAIN, f"--game={FLAGS.game}", f"--preset={FLAGS.preset}", f"--seed={s}",
                       f"--workdir={workdirs[s]}", *(f"--set={item}" for item in FLAGS.set)]
            if FLAGS.compilation_cache:
                command.append(f"--compilation_cache={FLAGS.compilation_cache}")
            log = open(workdirs[s] + ".log", "a")
            running[s] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log)
            print(f"seed {s}: running, log {workdirs[s]}.log", flush=True)
        time.sleep(1.0)
        for s, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[s]
            if proc.returncode:
                _stop(running)  # they resume from their checkpoints when the command is rerun
                with open(workdirs[s] + ".log", errors="replace") as f:
                    errors = [line[len("error:"):].strip() for line in f if line.startswith("error:")]
                cli.fail(f"seed {s} failed (exit {proc.returncode}): "
                         f"{errors[-1] if errors else 'see ' + workdirs[s] + '.log'}")
            print(f"seed {s}: {_last_progress_line(workdirs[s] + '.log')}", flush=True)
        if time.time() - last_report >= FLAGS.progress_every_s:
            last_report = time.time()
            for s in running:
                print(f"seed {s}: {_last_progress_line(workdirs[s] + '.log')}", flush=True)

    parts = [kept] if kept else []
    for s in seeds:
        with open(os.path.join(workdirs[s], "results.json")) as f:
            parts.append(json.load(f))
    try:
        merged = merge_results(parts, " ".join([os.path.basename(sys.executable)] + sys.argv))
    except ValueError as e:
        cli.fail(str(e))
    write_json(path, merged)
    random_by_seed = {r["seed"]: r["return_mean"] for r in merged["random_agent"]["per_seed"]}
    for seed in merged["seeds"]:
        print(f"seed {seed['seed']}: final evaluation return {seed['final_eval_return']:.1f} "
              f"(random agent on its envs: {random_by_seed[seed['seed']]:.1f})")
    print(f"done: {path}")


if __name__ == "__main__":
    cli.run(main)
