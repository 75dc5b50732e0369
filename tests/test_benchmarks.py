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
