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
