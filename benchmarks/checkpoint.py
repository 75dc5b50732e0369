"""What a checkpoint costs the loop: one JSON object on stdout.

    python benchmarks/checkpoint.py [--preset paper] [--saves 6] [--gap-s 2]

Saves a preset's whole training state (world model and agent with their optimizer states, one seed, as the loop
holds it on the host after `jax.device_get`) `--saves` times with dlwm_jax.checkpoint.Checkpointer, synchronous
and asynchronous (the loop's: orbax writes in its own thread), into temporary folders, `--gap-s` seconds apart
(the loop's phases between its saves; an asynchronous save waits for the previous one). Reports the state's size
and, per mode, the median seconds the caller is held by one `save` call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--saves", type=int, default=6)
    parser.add_argument("--gap-s", type=float, default=2.0)
    args = parser.parse_args()

    import jax
    from dlwm_jax import config as config_lib
    from dlwm_jax import envs
    from dlwm_jax.checkpoint import Checkpointer
    from dlwm_jax.programs import initial_state
    from dlwm_jax.seed_axis import stack

    config = config_lib.get_preset(args.preset)
    state = jax.device_get(stack([initial_state(config, envs.num_actions(config.env.game), 0)]))
    meta = {"iteration": 0, "eval_histories": [[[0, 0.0, 0.0]] * 15]}
    out = {"preset": args.preset, "saves": args.saves, "gap_s": args.gap_s,
           "state_mib": round(sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20, 1)}
    for mode in ("synchronous", "asynchronous"):
        with tempfile.TemporaryDirectory() as directory:
            checkpoints = Checkpointer(directory, asynchronous=mode == "asynchronous")
            held = []
            for step in range(args.saves):
                start = time.perf_counter()
                checkpoints.save(step, state, meta)
                held.append(time.perf_counter() - start)
                time.sleep(args.gap_s)
            checkpoints.wait()
            out[mode] = {"save_call_s": round(statistics.median(held), 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
