"""Many seeds in one process: wall time of N vmapped seeds vs one seed (train.train_and_evaluate with
num_seeds N and 1) on a preset (default smoke).

Usage: python benchmarks/seeds.py [--num-seeds 4] [--preset smoke] [--game Pong] [--repeats 1]
Prints JSON; `measure(...)` returns the same dict for benchmarks/run.py. Each configuration first runs once to
compile (its wall time is reported as `*_first_s`; with the persistent compilation cache warm this is mostly
tracing), then `repeats` timed runs in fresh workdirs (median reported). `ratio` = N-seed time / 1-seed time:
N means no gain over running the seeds one after another, 1 means the extra seeds were free.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax

from dlwm_jax import config as config_lib
from dlwm_jax.seed_axis import DEFAULT_COMPILATION_CACHE, use_compilation_cache
from dlwm_jax.train import train_and_evaluate


def _wall(run, repeats: int) -> tuple[float, float]:
    """(median seconds of `repeats` runs after the first, seconds of the first)."""
    times = []
    for _ in range(repeats + 1):
        with tempfile.TemporaryDirectory() as workdir:
            start = time.perf_counter()
            run(os.path.join(workdir, "run"))
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), times[0]


def measure(num_seeds: int = 4, preset: str = "smoke", game: str = "Pong", repeats: int = 1) -> dict:
    """{"one_seed_s", "n_seeds_s", "ratio", "per_seed_speedup", ...} for the given preset."""
    config = config_lib.override(config_lib.get_preset(preset), {"env.game": game})
    quiet = lambda _: None
    one, one_first = _wall(lambda workdir: train_and_evaluate(config, workdir, echo=quiet), repeats)
    many, many_first = _wall(lambda workdir: train_and_evaluate(config, workdir, num_seeds, echo=quiet), repeats)
    return {"preset": preset, "game": game, "num_seeds": num_seeds, "devices": len(jax.devices()),
            "platform": jax.devices()[0].platform, "one_seed_s": round(one, 2), "n_seeds_s": round(many, 2),
            "ratio": round(many / one, 3), "per_seed_speedup": round(num_seeds * one / many, 3),
            "one_seed_first_s": round(one_first, 2), "n_seeds_first_s": round(many_first, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seeds", type=int, default=4)
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--game", default="Pong")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compilation-cache", default=DEFAULT_COMPILATION_CACHE)
    args = parser.parse_args()
    if args.compilation_cache:
        use_compilation_cache(args.compilation_cache)
    print(json.dumps(measure(args.num_seeds, args.preset, args.game, args.repeats)))


if __name__ == "__main__":
    main()
