"""The end of a run: summary.json per seed, the random agent under the same protocol, results.json (raw data of
every seed and of the random agent) and, for several seeds, aggregate.json; in a multi-process job, process 0
merges every process's share."""
from __future__ import annotations

import json
import os
import sys
import time

import jax

from dlwm_jax import envs
from dlwm_jax.collect import evaluate
from dlwm_jax.outputs import write_summary
from dlwm_jax.results import aggregate, merge_results, write_json, write_results
from dlwm_jax.run_state import EVALUATE, Run, Stopped, derived_seed
from dlwm_jax.seed_axis import unstack


def evaluate_random_agent(run: Run) -> None:
    """The uniform random agent under the final evaluation's protocol (same envs, seeds, keys and caps), run beside
    the training (background.py) unless a checkpoint holds it already: meta["random_agent"], a result per seed."""
    if run.meta.get("random_agent") is not None:
        return
    last = run.config.schedule.num_iterations - 1
    actor, keys = run.actor(run.programs.random_act), run.keys(last, EVALUATE)
    seeds = [derived_seed(root, 1 + last) for root in run.roots]
    run.echo("evaluating the uniform random agent under the same protocol (same envs, seeds and caps), beside the "
             "training")
    run.background.submit(lambda: evaluate(run.config.env, actor, keys, seeds),
                          lambda results: run.meta.update(random_agent=results))


def finish_run(run: Run) -> dict:
    """summary.json per seed, the random agent under the same protocol, results.json and (several seeds)
    aggregate.json. In a multi-process job each process writes its share's results.process_<p>.json, and process
    0, once every share is there, the merged results.json and the aggregate over all seeds."""
    config, S = run.config, run.num_seeds
    game = envs.check_game(config.env.game)
    host_world, host_agent = jax.device_get((run.world, run.agent))
    summaries = []
    for s in range(S):
        history = run.meta["eval_histories"][s]
        summaries.append(write_summary(run.seed_dirs[s], game, run.seeds[s], len(run.replays[s]),
                                       history[-1][1] if history else None, unstack(host_world, s),
                                       unstack(host_agent, s).params))
        run.loggers[s].writer.close()
    run.background.join()  # the last evaluation is in the final checkpoint's meta already; the random agent
    run.checkpoints.wait()  # the final checkpoint committed before the results say the run is done
    baselines = run.meta["random_agent"]
    process, num_processes = run.share
    own = "results.json" if num_processes == 1 else f"results.process_{process}.json"
    write_results(os.path.join(run.workdir, own), config, game, run.seeds, run.seed_dirs, run.meta["last_evals"],
                  baselines, run.meta)
    if process > 0:
        return {"seeds": summaries, "aggregate": None}
    if num_processes > 1:
        parts = _wait_for_shares(run, num_processes)
        write_json(os.path.join(run.workdir, "results.json"),
                   merge_results(parts, " ".join([os.path.basename(sys.executable)] + sys.argv)))
    every_seed = [config.seed + s for s in range(run.total_seeds)]
    finals = [summary["final_eval_return_mean"] for summary in summaries] if num_processes == 1 else \
        [part_seed["final_eval_return"] for part in parts for part_seed in part["seeds"]]
    result = {"game": game, "seeds": every_seed, "num_processes": num_processes,
              "num_devices": num_processes * (len(run.sharding.device_set) if run.sharding else 1),
              "final_eval_return": aggregate(finals) if None not in finals else None,
              "final_eval_return_per_seed": finals}
    if run.total_seeds > 1:
        write_json(os.path.join(run.workdir, "aggregate.json"), result)
    return {"seeds": summaries, "aggregate": result}


def _wait_for_shares(run: Run, num_processes: int, poll_s: float = 2.0) -> list[dict]:
    """Process 0 of a multi-process job: every process's results.process_<p>.json, once all are written."""
    paths = [os.path.join(run.workdir, f"results.process_{p}.json") for p in range(num_processes)]
    last_echo = time.time()
    while missing := [p for p, path in enumerate(paths) if not os.path.exists(path)]:
        if run.stop.is_set():  # this share's last checkpoint is saved: a rerun comes back here
            raise Stopped(f"stop requested while waiting for processes {missing}: this process's seeds are done; "
                          "rerun the same command to merge")
        if time.time() - last_echo >= 60:
            last_echo = time.time()
            run.echo(f"waiting for processes {missing} to finish their seeds")
        time.sleep(poll_s)
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    return sorted(parts, key=lambda part: part["seeds"][0]["seed"])


