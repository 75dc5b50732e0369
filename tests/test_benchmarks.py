"""benchmarks/run.py refuses bad input with one line and a non-zero exit, before any timing."""
import os
import subprocess
import sys

import pytest

RUN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "run.py")


@pytest.mark.parametrize("args, message", [
    (["--set", "compute.vqvae_ynnpack=true"], "compute.vqvae_ynnpack must be"),
    (["--set", "compute.lstm_conv"], "--set takes FIELD=VALUE"),
    (["--game", "Nope"], "unknown game 'Nope'"),
    (["--num-seeds", "0"], "--num-seeds and --host-seeds must be >= 1"),
    (["--only", "vqvae,nope"], "--only takes a comma list of vqvae, dynamics"),
])
def test_run_rejects_bad_input_in_one_line(args, message):
    result = subprocess.run([sys.executable, RUN, "--json", "--no-envs", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_schedule_counts_reproduce_spec_8_4():
    sys.path.insert(0, os.path.dirname(RUN))
    from run import schedule_counts
    from dlwm_jax import config as config_lib
    paper = schedule_counts(config_lib.paper())
    assert paper["ppo_updates"] == 19_000 and paper["random_steps"] == 12_800 and paper["agent_steps"] == 89_600
    assert abs(paper["dynamics_steps"] / 241_096 - 1) < 2e-3 and abs(paper["vqvae_steps"] / 105_521 - 1) < 3e-3
    one = config_lib.override(config_lib.paper(), {"schedule.num_iterations": 1, "schedule.joint_epochs": "1",
                                                   "schedule.vq_update_intervals": "2", "schedule.ppo_updates": "5"})
    assert schedule_counts(one)["dynamics_steps"] == 291  # SPEC 8.4, iteration 1: 291 dynamics, 146 VQ-VAE steps
    assert schedule_counts(one)["vqvae_steps"] == 50 * 320 + 146


def test_host_loop_measures_every_phase_per_step():
    sys.path.insert(0, os.path.dirname(RUN))
    from run import measure_host_loop
    from dlwm_jax import config as config_lib
    figures = measure_host_loop(config_lib.get_preset("smoke"), 2, frames=400, updates=5)
    assert set(figures) == {"vqvae", "dynamics", "policy"}
    assert all(0 < v < 1e3 for v in figures.values()), figures  # ms per step


def test_projection_of_n_seeds_steps_every_seeds_envs_together():
    """With N seeds a loop step is one N-seed program call; collection steps N envs per agent step (the N-env
    rate) and evaluation N x 16 envs: with rates that scale perfectly with N only the step times differ."""
    sys.path.insert(0, os.path.dirname(RUN))
    from run import project_hours
    counts = {"vqvae_steps": 100, "dynamics_steps": 200, "ppo_updates": 10, "random_steps": 1_000,
              "agent_steps": 2_000, "evaluations": 2}
    steps = {"vqvae_step_ms": 10.0, "dynamics_step_ms": 20.0, "ppo_update_ms": 100.0, "host_vqvae_step_ms": 1.0,
             "host_dynamics_step_ms": 1.0, "host_policy_update_ms": 1.0, "act_batch1_ms": 2.0, "act_batch16_ms": 3.0}
    one = project_hours({**steps, "collector_steps_per_s": 500.0, "collector_steps_per_s_16_envs": 4_000.0},
                        counts, 16, 50)
    five = project_hours({**steps, "collector_steps_per_s": 2_500.0, "collector_steps_per_s_80_envs": 20_000.0},
                         counts, 16, 50, num_seeds=5)
    assert one["projected_hours_by_phase"] == five["projected_hours_by_phase"]
    collect_s = 1_000 / 500 + 2_000 * (1 / 500 + 2e-3)
    evaluate_s = 2 * 50 * (16 / 4_000 + 3e-3)
    total_s = 100 * 11e-3 + 200 * 21e-3 + 10 * 101e-3 + collect_s + evaluate_s
    assert one["projected_run_hours"] == round(total_s / 3600, 2)
    slower = project_hours({**steps, "collector_steps_per_s": 500.0, "collector_steps_per_s_80_envs": 4_000.0},
                           counts, 16, 50, num_seeds=5)  # envs that do not scale: 5x the env time
    assert slower["projected_hours_by_phase"]["collect"] > one["projected_hours_by_phase"]["collect"] * 4


def test_loop_phase_timer_reports_wall_host_share_and_work(tmp_path):
    """benchmarks/loop.py's PhaseTimer around phase steps, with clocks the steps advance (no real timing): wall
    time, the main thread's CPU share and the work read off the records the phase wrote (not the records an
    earlier process of a resumed run wrote)."""
    import json
    import types
    sys.path.insert(0, os.path.dirname(RUN))
    from loop import PhaseTimer, summarise
    from dlwm_jax import config as config_lib
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"phase": "dynamics", "iteration": 1, "steps": 7}) + "\n")  # a resumed run's
    now = {"wall": 100.0, "cpu": 5.0}
    timer = PhaseTimer(str(metrics), num_seeds=2, clocks=(lambda: now["wall"], lambda: now["cpu"]))
    run = types.SimpleNamespace(config=config_lib.get_preset("smoke"))

    def world_model(run_, iteration, first_unit):  # 2 s, 0.5 s of it on this thread: waits for the device
        now["wall"] += 2.0
        now["cpu"] += 0.5
        with open(metrics, "a") as f:
            for phase, steps in (("vqvae", 2), ("dynamics", 5), ("vqvae", 1), ("dynamics", 4)):
                f.write(json.dumps({"phase": phase, "iteration": iteration + 1, "steps": steps}) + "\n")

    def policy(run_, iteration, first_unit):  # host-bound
        now["wall"] += 1.0
        now["cpu"] += 1.0
    timer.wrap("world_model", world_model)(run, 1, 0)
    timer.wrap("policy", policy)(run, 1, 1)  # resumed after one update: ppo_updates[1] - 1 left, per seed
    waiting, busy = timer.figures
    assert waiting["iteration"] == 2 and waiting["phase"] == "world_model" and waiting["wall_s"] == 2.0
    assert waiting["host_share"] == 0.25 and busy["host_share"] == 1.0
    assert waiting["vqvae_steps"] == 6 and waiting["dynamics_steps"] == 18 and waiting["dynamics_steps_per_s"] == 9.0
    assert busy["ppo_updates"] == 2 * (run.config.schedule.ppo_updates[1] - 1)
    steady = summarise(timer.figures)["after_iteration_1"]
    assert set(steady) == {"world_model", "policy"} and steady["world_model"]["dynamics_steps"] == 18
    assert summarise(timer.figures)["all"]["world_model"]["host_share"] == 0.25


def test_loop_benchmark_stopped_by_sigterm_saves_a_checkpoint_and_says_so(tmp_path):
    """The device check's part limit (SIGTERM): loop.py saves a checkpoint at the run's next unit or phase end, so
    that loop_paper's next call resumes there, and exits 143 with one error line after the phases it timed."""
    import signal
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(RUN), "loop.py"), "--preset", "smoke",
                             "--game", "Pong", "--workdir", str(workdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("[loop] ") and '"phase": "warmup"' in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stderr.readlines()
    proc.wait(timeout=600)
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 143 and len(errors) == 1, "".join(lines[-30:])
    assert "stop requested: checkpoint" in errors[0] and "rerun the same command to resume" in errors[0]
    assert any(name.isdigit() for name in os.listdir(workdir / "checkpoints"))


@pytest.mark.slow
def test_loop_benchmark_runs_the_smoke_preset_end_to_end():
    result = subprocess.run([sys.executable, os.path.join(os.path.dirname(RUN), "loop.py"), "--preset", "smoke",
                             "--game", "Pong"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    import json
    report = json.loads(result.stdout)
    phases = [(f["iteration"], f["phase"]) for f in report["phases"]]
    assert phases == [(1, "collect"), (1, "warmup"), (1, "world_model"), (1, "policy"), (1, "evaluate"),
                      (2, "collect"), (2, "world_model"), (2, "policy"), (2, "evaluate"), (2, "finish")]
    assert report["by_phase"]["all"]["collect"]["real_steps"] == 144
    assert report["by_phase"]["all"]["world_model"]["dynamics_steps"] > 0
    assert all(0 <= f["host_share"] <= 1 for f in report["phases"])
    assert all(v["count"] > 0 and v["seconds"] >= 0 for v in report["compile_by_thread"].values())
    assert result.stderr.count("[loop] ") == len(phases)


@pytest.mark.slow
def test_flops_counts_a_paper_run():
    """benchmarks/flops.py end to end (it once broke unnoticed when run.py's constants went away)."""
    import json
    result = subprocess.run([sys.executable, os.path.join(os.path.dirname(RUN), "flops.py")], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert set(report["gflop"]) == {"vqvae_step", "dynamics_step", "dream", "ppo_epochs"}
    assert 10 < report["paper_run_pflop"] < 100 and report["matmul_2048_gflops"] > 0


def test_checkpoint_benchmark_times_both_modes_of_a_real_state():
    """benchmarks/checkpoint.py at smoke size: the state's size and, per mode, how long a save holds the caller."""
    import json
    script = os.path.join(os.path.dirname(RUN), "checkpoint.py")
    result = subprocess.run([sys.executable, script, "--preset", "smoke", "--saves", "2", "--gap-s", "0.1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)
    assert figures["state_mib"] > 0 and figures["saves"] == 2 and figures["gap_s"] == 0.1
    assert all(figures[mode]["save_call_s"] > 0 for mode in ("synchronous", "asynchronous"))


def test_collector_benchmark_steps_the_loops_actor():
    """benchmarks/collector.py (run.py's EnvPool figures) with the loop's random actor: it once broke unnoticed
    when the actor's programs took a seed axis."""
    import json
    script = os.path.join(os.path.dirname(RUN), "collector.py")
    result = subprocess.run([sys.executable, script, "--game", "Pong", "--steps", "32", "--repeats", "1",
                             "--num-envs", "1,4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)
    assert set(figures["by_num_envs"]) == {"1", "4"} and figures["num_envs"] == 4
    assert all(n["collector_steps_per_s"] > 0 and n["raw_envpool_steps_per_s"] > 0
               for n in figures["by_num_envs"].values())
