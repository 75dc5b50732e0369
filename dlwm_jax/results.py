"""Raw results of finished runs (format dlwm-jax-results/1, read by experiments/report.py): writing one run's,
merging the single-seed runs of one evidence run (experiments/evidence.py).

A results file holds per seed every iteration's evaluation (per-episode returns) and world-model diagnostics,
the uniform random agent under the same protocol, the full config, git commit(s), machine and wall time.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import jax
import numpy as np

from dlwm_jax.config import Config, to_dict
from dlwm_jax.stats import iqm

RESULTS_FORMAT = "dlwm-jax-results/1"


def git_commit() -> str:
    """HEAD of the checkout this code runs from, '+dirty' if tracked files differ; 'unknown' outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_results(path: str, config: Config, game: str, seeds: list[int], seed_dirs: list[str], final_evals: list[dict | None],
                  random_evals: list[dict], meta: dict) -> dict:
    """Writes the run's raw results (format dlwm-jax-results/1, read by experiments/report.py) and returns them.

    Per seed: every iteration's evaluation and world-model diagnostics (read back from its metrics.jsonl), and
    the final evaluation's per-episode returns. Beside them the uniform random agent evaluated under the same
    protocol (the final evaluation's envs, seeds and caps), the full config, git commit(s), machine, wall time.
    """
    per_seed = []
    for seed, seed_dir, final in zip(seeds, seed_dirs, final_evals):
        with open(os.path.join(seed_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        diagnostics = {r["iteration"]: {k: v for k, v in r.items() if k not in ("phase", "iteration", "real_steps")}
                       for r in records if r["phase"] == "diagnostics"}
        iterations = [{**{k: v for k, v in r.items() if k != "phase"}, "diagnostics": diagnostics.get(r["iteration"])}
                      for r in records if r["phase"] == "evaluate"]
        final = final or {"return_mean": iterations[-1]["eval_return_mean"] if iterations else None}  # older runs
        per_seed.append({"seed": seed, "final_eval_return": final["return_mean"],
                         "final_eval_returns": final.get("returns"), "final_eval_finished": final.get("finished"),
                         "final_eval_lengths": final.get("lengths"),
                         "iterations": iterations})
    results = {
        "format": RESULTS_FORMAT, "game": game, "preset": config.preset,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "git_commits": meta.get("git_commits", []),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "jax": jax.__version__, "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()]},
        "wall_time_s": round(meta.get("elapsed_s", 0.0), 1),
        "protocol": {"num_eval_envs": config.env.num_eval_envs, "max_episode_steps": config.env.max_episode_steps,
                     "eval_max_steps": config.env.eval_cap, "actions": "sampled at temperature 1",
                     "eval_return": "mean over the finished episodes (partial returns at the cap only if none finished)"},
        "config": to_dict(config),
        "seeds": per_seed,
        "random_agent": random_agent_summary([{"seed": seed, **r} for seed, r in zip(seeds, random_evals)]),
    }
    write_json(path, results)
    return results


def write_json(path: str, data) -> None:
    """Writes `data` as JSON to path atomically (temporary file + rename: a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def aggregate(values: list[float]) -> dict[str, float]:
    """Mean, std (population), median and IQM (stats.iqm) over seeds."""
    x = np.asarray(values, np.float64)
    return {"mean": float(x.mean()), "std": float(x.std()), "median": float(np.median(x)),
            "iqm": float(iqm(x)), "num_seeds": len(x)}


def random_agent_summary(per_seed: list[dict]) -> dict:
    """The random agent's entry: per seed its evaluation result; return_mean = mean of the per-seed means;
    return_std = std of every episode that counts in them (the finished ones, or all where none finished)."""
    counted = [np.asarray(r["returns"])[np.asarray(r["finished"]) | ~np.any(r["finished"])] for r in per_seed]
    return {"return_mean": float(np.mean([r["return_mean"] for r in per_seed])),
            "return_std": float(np.std(np.concatenate(counted))), "per_seed": per_seed}


def merge_results(parts: list[dict], command: str) -> dict:
    """One results dict from the results of runs of one game and config that differ only in their seeds: single-seed
    runs, or results files merged before (evidence.py adds new seeds to a game's file).

    Seeds, their random-agent evaluations, commits and wall times are concatenated (wall_time_s: the longest, as
    the parts ran side by side; wall_time_s_per_seed: each part's, one per single-seed run, or a process's share of
    a multi-process job). The configs may differ in `compute` alone (formulations of the same maths, as
    report.py compares them): config["compute"] is then the first part's and "compute_by_seed" gives each seed's.
    Raises ValueError (one line) on mismatched runs.
    """
    if not parts:
        raise ValueError("no results to merge")
    strip = lambda r: {**r["config"], "seed": None, "compute": None}
    for part in parts[1:]:
        if part["game"] != parts[0]["game"] or strip(part) != strip(parts[0]):
            raise ValueError(f"cannot merge runs of different games or configs ({parts[0]['game']}, seed "
                             f"{parts[0]['seeds'][0]['seed']} vs {part['game']}, seed {part['seeds'][0]['seed']})")
    seeds = [s for part in parts for s in part["seeds"]]
    if len({s["seed"] for s in seeds}) != len(seeds):
        raise ValueError(f"seed given twice: {sorted(s['seed'] for s in seeds)}")
    compute = {str(s["seed"]): part.get("compute_by_seed", {}).get(str(s["seed"]), part["config"].get("compute"))
               for part in parts for s in part["seeds"]}
    random_per_seed = [s for part in parts for s in part["random_agent"]["per_seed"]]
    merged = {**parts[0], "command": command,
              "git_commits": sorted({c for part in parts for c in part["git_commits"]}),
              "wall_time_s": max(part["wall_time_s"] for part in parts),
              "wall_time_s_per_seed": [t for part in parts for t in part.get("wall_time_s_per_seed",
                                                                              [part["wall_time_s"]])],
              "seeds": seeds,
              "random_agent": random_agent_summary(random_per_seed)}
    merged.pop("compute_by_seed", None)
    if len({json.dumps(c, sort_keys=True) for c in compute.values()}) > 1:
        merged["compute_by_seed"] = compute
    return merged
