"""Real-env throughput: the Collector (the loop's random actor: frame stacks and actions, one program per env
step; reset handling) vs raw EnvPool stepping.

Usage: python benchmarks/collector.py [--game BankHeist] [--steps 2000] [--repeats 3]
Prints JSON; `measure(...)` returns the same dict for benchmarks/run.py. Steps are agent interactions summed over
envs (one interaction = 4 emulator frames); figures are medians over `repeats` timed runs after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from dlwm_jax import collect, envs
from dlwm_jax import config as config_lib
from dlwm_jax.config import EnvConfig
from dlwm_jax.programs import compile_programs


def _raw_rate(env_config: EnvConfig, num_envs: int, steps: int, repeats: int) -> float:
    env = envs.make_env(env_config, num_envs, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    num_act = envs.num_actions(env_config.game)
    rates = []
    for _ in range(repeats + 1):  # first run is a warm-up
        actions = rng.integers(0, num_act, size=(steps // num_envs, num_envs)).astype(np.int32)
        start = time.perf_counter()
        for a in actions:
            env.step(a)
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def _collector_rate(env_config: EnvConfig, num_envs: int, steps: int, repeats: int) -> float:
    collector = collect.Collector(env_config, num_envs, seed=0)
    config = config_lib.override(config_lib.get_preset("paper"), {"env.game": env_config.game})
    # the loop's actor on one device (run_state.Run.actor): one seed's program, [1] keys
    actor = compile_programs(config, envs.num_actions(env_config.game), 1, None).random_act
    keys = jax.random.split(jax.random.key(0), (repeats + 1, 1))
    rates = []
    for key in keys:
        start = time.perf_counter()
        collector.collect(actor, steps, key)
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def measure(game: str = "BankHeist", num_envs: tuple[int, ...] = (1, 8), steps: int = 2000,
            repeats: int = 3) -> dict:
    """{"collector_steps_per_s", "raw_envpool_steps_per_s"} at the largest num_envs, plus a per-N breakdown."""
    env_config = EnvConfig(game=game)
    by_n = {str(n): {"collector_steps_per_s": round(_collector_rate(env_config, n, steps - steps % n, repeats), 1),
                     "raw_envpool_steps_per_s": round(_raw_rate(env_config, n, steps - steps % n, repeats), 1)}
            for n in num_envs}
    return {**by_n[str(max(num_envs))], "num_envs": max(num_envs), "game": game,
            "frame_stack": env_config.frame_stack, "by_num_envs": by_n}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--game", default="BankHeist")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-envs", default="1,8")
    args = parser.parse_args()
    num_envs = tuple(int(n) for n in args.num_envs.split(","))
    print(json.dumps(measure(args.game, num_envs, args.steps, args.repeats)))


if __name__ == "__main__":
    main()
