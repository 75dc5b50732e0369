"""Runs the paper's iterative training on one Atari game (Flax-examples style: flags -> train_and_evaluate).

    python experiments/train.py --game=BankHeist                 # the paper's configuration
    python experiments/train.py --game=Pong --preset=demo        # a short real run on a CPU
    python experiments/train.py --game=Pong --set policy.horizon=20 --set schedule.num_iterations=3 ...
    python experiments/train.py --game=Pong --num_seeds=5         # seeds 0..4 vmapped in one process

Re-running the same command resumes from the last complete checkpoint in the workdir. SIGTERM (a batch system's
preemption or time limit) saves a checkpoint at the next unit boundary and exits with code 143.
"""
import os

from absl import flags, logging

import cli  # experiments/cli.py

flags.DEFINE_string("game", None, "Atari game, e.g. BankHeist, Pong, Breakout (EnvPool names).")
flags.DEFINE_string("preset", "paper", "Config preset: paper | demo | smoke.")
flags.DEFINE_integer("seed", 0, "Seed of the run's root PRNG key (EnvPool seeds derive from it).")
flags.DEFINE_string("workdir", None, "Output directory (default runs/<game>-<seed>).")
flags.DEFINE_integer("num_iterations", None, "Override schedule.num_iterations (truncates the per-iteration lists).")
flags.DEFINE_integer("frame_stack", None, "Override env.frame_stack (4 = paper, 1 = released script).")
flags.DEFINE_integer("max_episode_steps", None, "Override env.max_episode_steps (27000 default, 100000 = reference).")
flags.DEFINE_multi_string("set", [], "Override any config field: --set section.field=value (repeatable).")
flags.DEFINE_string("compilation_cache", "~/.cache/dlwm_jax/xla",
                    "Directory of JAX's persistent compilation cache ('' disables it); saves minutes of XLA compiles per run.")
flags.DEFINE_integer("num_seeds", 1, "Seeds --seed .. --seed+N-1 trained together, one vmapped program per step; with "
                     "N > 1 outputs per seed in <workdir>/seed_<s>, aggregate in <workdir>/aggregate.json.")
flags.DEFINE_integer("num_devices", 0, "Shard the seed axis over the first N devices (0 = all visible).")
flags.DEFINE_bool("distributed", False, "Multi-process job (many hosts): this process trains an equal share of "
                  "--num_seeds; its index and the process count from --process_id/--num_processes, else from the "
                  "cluster environment (SLURM_PROCID/SLURM_NTASKS or OMPI_COMM_WORLD_RANK/SIZE).")
flags.DEFINE_integer("num_processes", None, "With --distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0 .. num_processes - 1.")
FLAGS = flags.FLAGS


def build_config():
    from dlwm_jax import config as config_lib
    config = config_lib.get_preset(FLAGS.preset)
    updates = {"env.game": FLAGS.game, "seed": FLAGS.seed}
    if FLAGS.num_iterations is not None:
        n = FLAGS.num_iterations
        s = config.schedule
        if not 1 <= n <= len(s.joint_epochs):
            raise ValueError(f"--num_iterations must be in [1, {len(s.joint_epochs)}] for preset {FLAGS.preset}")
        updates.update({"schedule.num_iterations": n, "schedule.joint_epochs": s.joint_epochs[:n],
                        "schedule.vq_update_intervals": s.vq_update_intervals[:n], "schedule.ppo_updates": s.ppo_updates[:n]})
    if FLAGS.frame_stack is not None:
        updates["env.frame_stack"] = FLAGS.frame_stack
    if FLAGS.max_episode_steps is not None:
        updates["env.max_episode_steps"] = FLAGS.max_episode_steps
    for item in FLAGS.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects field=value, got {item!r}")
        updates[name.strip()] = value.strip()
    return config_lib.override(config, updates)


def process_share() -> tuple[int, int]:
    """(process index, number of processes) of a --distributed job; (0, 1) otherwise."""
    if not FLAGS.distributed:
        if FLAGS.num_processes is not None or FLAGS.process_id is not None:
            raise ValueError("--process_id/--num_processes need --distributed")
        return 0, 1
    env = os.environ
    for index, count in (("SLURM_PROCID", "SLURM_NTASKS"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")):
        if FLAGS.process_id is None and FLAGS.num_processes is None and index in env and count in env:
            return int(env[index]), int(env[count])
    if FLAGS.process_id is None or FLAGS.num_processes is None:
        raise ValueError("--distributed needs --process_id and --num_processes (or SLURM/Open MPI environment variables)")
    return FLAGS.process_id, FLAGS.num_processes


def main(argv):
    logging.set_verbosity(logging.WARNING)  # orbax/absl INFO lines would drown the progress lines
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    if not FLAGS.game:
        cli.fail("--game is required, e.g. --game=BankHeist", 2)
    try:  # the flags' own errors before JAX is imported: a typo costs a second, not the import's ~3 s
        config, share = build_config(), process_share()
    except ValueError as e:
        cli.fail(str(e).splitlines()[0])
    import jax
    from dlwm_jax.checkpoint import CheckpointError
    from dlwm_jax.outputs import NonFiniteError
    from dlwm_jax.run_state import Stopped
    from dlwm_jax.seed_axis import use_compilation_cache
    from dlwm_jax.train import stop_on_sigterm, train_and_evaluate
    stop = stop_on_sigterm()
    if FLAGS.compilation_cache:
        use_compilation_cache(os.path.expanduser(FLAGS.compilation_cache))
    try:
        workdir = FLAGS.workdir or os.path.join(
            "runs", f"{config.env.game}-{config.seed}" + (f"x{FLAGS.num_seeds}" if FLAGS.num_seeds > 1 else ""))
        devices = jax.devices()[:FLAGS.num_devices] if FLAGS.num_devices else None
        result = train_and_evaluate(config, workdir, FLAGS.num_seeds, devices=devices, share=share, stop=stop)
    except Stopped as e:
        cli.fail(str(e), cli.STOPPED)
    except (ValueError, OSError, CheckpointError, NonFiniteError) as e:
        cli.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if FLAGS.num_seeds == 1:
        print(f"done: final evaluation return {result['seeds'][0]['final_eval_return_mean']}; outputs in {workdir}")
    elif result["aggregate"] is None:  # a process > 0 of a multi-process job: process 0 writes the aggregate
        print(f"done: seeds {[s['seed'] for s in result['seeds']]}: final evaluation returns "
              f"{[s['final_eval_return_mean'] for s in result['seeds']]}; outputs in {workdir}")
    else:
        print(f"done: final evaluation return over seeds {result['aggregate']['final_eval_return']}; "
              f"per seed {result['aggregate']['final_eval_return_per_seed']}; outputs in {workdir}")


if __name__ == "__main__":
    cli.run(main)
