"""experiments/evidence.py and dlwm_jax/results.py: seeds as processes, merged raw results, the workdir lock."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import CACHE, ROOT, shared_run

from dlwm_jax.results import merge_results


def part(seed, game="Pong", gamma=0.99, returns=(1.0, 3.0), compute="im2col"):
    return {"format": "dlwm-jax-results/1", "game": game, "preset": "short", "command": "x", "git_commits": [f"c{seed}"],
            "wall_time_s": 100.0 + seed,
            "config": {"seed": seed, "policy": {"gamma": gamma}, "compute": {"lstm_conv": compute}},
            "seeds": [{"seed": seed, "final_eval_return": 2.0 + seed, "iterations": []}],
            "random_agent": {"return_mean": float(sum(returns)) / 2, "return_std": 1.0,
                             "per_seed": [{"seed": seed, "return_mean": float(sum(returns)) / 2,
                                           "returns": list(returns), "finished": [True, True]}]}}


def test_merge_concatenates_seeds_and_random_baselines_and_rejects_mismatches():
    merged = merge_results([part(0), part(1, returns=(5.0, 7.0))], "cmd")
    assert [s["seed"] for s in merged["seeds"]] == [0, 1] and merged["command"] == "cmd"
    assert merged["random_agent"]["return_mean"] == 4.0 and merged["random_agent"]["return_std"] == pytest.approx(2.236, 1e-3)
    assert merged["wall_time_s"] == 101.0 and merged["wall_time_s_per_seed"] == [100.0, 101.0]
    assert merged["git_commits"] == ["c0", "c1"]
    for bad, needle in [([part(0), part(1, game="Seaquest")], "different games"), ([part(0), part(1, gamma=0.9)], "configs"),
                        ([part(0), part(0)], "seed given twice"), ([], "no results")]:
        with pytest.raises(ValueError, match=needle):
            merge_results(bad, "cmd")


def test_merge_adds_seeds_to_a_merged_file_and_records_each_seeds_formulations():
    """Runs that differ in `compute` alone (formulations of the same maths) merge, each seed's kept beside it."""
    earlier = merge_results([part(0), part(1)], "cmd")
    assert "compute_by_seed" not in earlier
    merged = merge_results([earlier, part(2, compute="rows")], "cmd2")
    assert [s["seed"] for s in merged["seeds"]] == [0, 1, 2] and merged["command"] == "cmd2"
    assert merged["wall_time_s_per_seed"] == [100.0, 101.0, 102.0] and merged["git_commits"] == ["c0", "c1", "c2"]
    assert merged["config"]["compute"] == {"lstm_conv": "im2col"}
    assert merged["compute_by_seed"] == {"0": {"lstm_conv": "im2col"}, "1": {"lstm_conv": "im2col"},
                                         "2": {"lstm_conv": "rows"}}
    assert merge_results([merged, part(3)], "cmd3")["compute_by_seed"]["2"] == {"lstm_conv": "rows"}
    assert len(merged["random_agent"]["per_seed"]) == 3


def run_evidence(tmp_path, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "evidence.py"), "--game=Pong",
                           "--preset=smoke", "--num_seeds=2", f"--runs_dir={tmp_path}/runs",
                           f"--results_dir={tmp_path}/results", "--progress_every_s=5",
                           f"--compilation_cache={CACHE}", *extra], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)


def test_evidence_runs_each_seed_once_and_merges_their_results(tmp_path, tmp_path_factory):
    """Seed 0 finished earlier (the suite's shared smoke run of seed 0, copied in): evidence.py leaves it and runs
    seed 1 (the same run as the shared seed-1 run: same flags, same results); then merges both."""
    single, _ = shared_run(tmp_path_factory, "single")
    shared_seed_1, _ = shared_run(tmp_path_factory, "seed_1")
    shutil.copytree(single, tmp_path / "runs" / "Pong-0", ignore=shutil.ignore_patterns(".lock"))
    proc = run_evidence(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "seed 0: finished earlier" in proc.stdout and "seed 1: running" in proc.stdout
    assert json.load(open(tmp_path / "runs" / "Pong-1" / "summary.json"))["hashes"] == \
        json.load(open(os.path.join(shared_seed_1, "summary.json")))["hashes"]
    results = json.load(open(tmp_path / "results" / "Pong.json"))
    assert [s["seed"] for s in results["seeds"]] == [0, 1] and results["preset"] == "smoke"
    for s in (0, 1):
        single = json.load(open(tmp_path / "runs" / f"Pong-{s}" / "results.json"))
        assert results["seeds"][s] == single["seeds"][0]
        assert results["random_agent"]["per_seed"][s] == single["random_agent"]["per_seed"][0]
    again = run_evidence(tmp_path)  # finished seeds are not rerun; the merge is the same
    assert again.returncode == 0 and again.stdout.count("finished earlier") == 2
    assert json.load(open(tmp_path / "results" / "Pong.json"))["seeds"] == results["seeds"]
    partial = run_evidence(tmp_path, "--num_seeds=3", "--merge_finished")  # seed 2 never ran: left out, not started
    assert partial.returncode == 0 and "seed 2: not finished, left out" in partial.stdout
    assert json.load(open(tmp_path / "results" / "Pong.json"))["seeds"] == results["seeds"]
    assert not os.path.exists(tmp_path / "runs" / "Pong-2")


def test_evidence_keeps_the_seeds_of_the_results_file_it_does_not_run(tmp_path, tmp_path_factory):
    """A file with seed 0 and a finished seed 1: seed 1 is added, seed 0 kept. A file holding some of the
    command's seeds is refused in one line before anything starts."""
    single, _ = shared_run(tmp_path_factory, "single")
    shared_seed_1, _ = shared_run(tmp_path_factory, "seed_1")
    (tmp_path / "results").mkdir()
    shutil.copy(os.path.join(single, "results.json"), tmp_path / "results" / "Pong.json")
    shutil.copytree(shared_seed_1, tmp_path / "runs" / "Pong-1", ignore=shutil.ignore_patterns(".lock"))
    proc = run_evidence(tmp_path, "--first_seed=1", "--num_seeds=1", "--merge_finished")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "keeping seeds [0] of" in proc.stdout
    results = json.load(open(tmp_path / "results" / "Pong.json"))
    assert [s["seed"] for s in results["seeds"]] == [0, 1] and len(results["wall_time_s_per_seed"]) == 2
    overlap = run_evidence(tmp_path, "--first_seed=1")  # seeds 1-3 against a file of seeds 0 and 1
    errors = [line for line in overlap.stderr.splitlines() if line.startswith("error:")]
    assert overlap.returncode == 1 and len(errors) == 1 and "holds seeds [0, 1], [1] of them" in errors[0]
    assert json.load(open(tmp_path / "results" / "Pong.json")) == results
    assert not os.path.exists(tmp_path / "runs" / "Pong-2")


def test_an_unknown_game_is_refused_in_one_line_before_anything_starts(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "evidence.py"), "--game=Pongg",
                           f"--runs_dir={tmp_path}/runs", f"--results_dir={tmp_path}/results"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "unknown game 'Pongg'; did you mean: Pong" in errors[0]
    assert "running" not in proc.stdout and os.listdir(tmp_path) == []  # no directory, log or process


def test_sigterm_stops_the_running_seed_at_a_checkpoint_and_then_the_command(tmp_path):
    """SIGTERM to evidence.py alone: it passes it on to the running seed, which saves a checkpoint and exits
    (train.py), waits for it (the workdir is free when the command ends) and ends in one line with 143."""
    from dlwm_jax.run_state import lock_workdir
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "evidence.py"), "--game=Pong",
                             "--preset=smoke", "--num_seeds=2", f"--runs_dir={tmp_path}/runs",
                             f"--results_dir={tmp_path}/results", f"--compilation_cache={CACHE}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log = tmp_path / "runs" / "Pong-0.log"
    deadline = time.time() + 600
    while not (log.exists() and "[iter 1/2] warmup" in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 143 and len(errors) == 1, stderr[-3000:]
    assert "stop requested: seeds [0] stopped at a checkpoint, seeds [1] not started" in errors[0]
    assert "seed 0: stopping at its next checkpoint" in stdout
    assert "error: stop requested: checkpoint" in log.read_text()
    lock_workdir(str(tmp_path / "runs" / "Pong-0")).close()  # no process holds it any more
    assert not os.path.exists(tmp_path / "runs" / "Pong-1") and not os.path.exists(tmp_path / "results" / "Pong.json")


def test_a_workdir_in_use_is_refused_in_one_line(tmp_path):
    from dlwm_jax.run_state import lock_workdir
    workdir = tmp_path / "w"
    workdir.mkdir()
    held = lock_workdir(str(workdir))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--game=Pong", "--preset=smoke",
                           f"--workdir={workdir}", f"--compilation_cache={CACHE}"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    held.close()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "in use by another running process" in errors[0]
    assert os.listdir(workdir) == [".lock"]  # nothing was written
