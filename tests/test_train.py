"""The driver end to end: the smoke preset through experiments/train.py, kill-and-resume, and bad input."""
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, SMOKE, shared_run

SCRIPT = os.path.join(ROOT, "experiments", "train.py")


def run(args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def error_lines(proc):
    """stderr lines that are ours (absl/XLA info lines are not)."""
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return shared_run(tmp_path_factory, "single")  # (workdir, stdout)


def test_smoke_run_writes_every_output(smoke_run):
    workdir, stdout = smoke_run
    files = os.listdir(workdir)
    for name in ("metrics.jsonl", "summary.json", "results.json", "learning_curve.png", "reconstructions_iter1.png",
                 "reconstructions_iter2.png", "dream_iter1.gif", "dream_iter2.gif", "checkpoints"):
        assert name in files, name
    assert any(f.startswith("events.out.tfevents") for f in files)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    phases = {r["phase"] for r in records}
    assert {"collect", "warmup", "vqvae", "dynamics", "policy", "evaluate"} <= phases
    for r in records:
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), (r["phase"], k, v)
    evals = [r for r in records if r["phase"] == "evaluate"]
    assert [r["iteration"] for r in evals] == [1, 2] and [r["real_steps"] for r in evals] == [96, 144]
    assert "eta" in stdout and "[iter 2/2] evaluate" in stdout
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["real_steps"] == 144 and set(summary["hashes"]) == {"encoder", "decoder", "codebook", "dynamics", "policy"}
    # Diagnostics: iteration 1 on held-back data after training, iteration 2 on the fresh chunk before training on it.
    diagnostics = [r for r in records if r["phase"] == "diagnostics"]
    assert [(r["iteration"], r["model_iteration"]) for r in diagnostics] == [(1, 1), (2, 1)]
    order = [r["phase"] for r in records if r["iteration"] == 2]
    assert order.index("diagnostics") < order.index("dynamics")
    for r in diagnostics:
        assert r["windows"] == 3 and sum(v for k, v in r.items() if k.startswith("reward_")) == 3 * 13
    assert all({"imagined_return_mean", "real_return_per_horizon", "wall_time_s"} <= set(r) for r in evals)
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["format"] == "dlwm-jax-results/1" and results["game"] == "Pong" and results["preset"] == "smoke"
    [seed] = results["seeds"]
    assert seed["final_eval_return"] == evals[-1]["eval_return_mean"] and len(seed["final_eval_returns"]) == 3
    assert [it["diagnostics"]["model_iteration"] for it in seed["iterations"]] == [1, 1]
    random_agent = results["random_agent"]["per_seed"][0]
    assert random_agent["num_envs"] == 3 and random_agent["lengths"] == [200] * 3  # the same cap as the agent's
    assert results["config"]["env"]["game"] == "Pong" and results["wall_time_s"] > 0 and results["git_commits"]


def test_killed_run_resumes_to_identical_parameters(smoke_run, tmp_path):
    assert_kill_and_resume_gives(smoke_run[0], SMOKE, tmp_path)


@pytest.mark.slow
def test_scanned_epochs_run_the_same_twice_and_resume_to_identical_parameters(tmp_path):
    """The accelerator's world-model programs (compute.epoch_chunk > 0: chunks of slots as one scan, the world
    donated) on the CPU: two runs give the same hashes, and a killed one resumes to them."""
    flags = [*SMOKE, "--set=compute.epoch_chunk=4"]
    first = run([*flags, f"--workdir={tmp_path / 'first'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = run([*flags, f"--workdir={tmp_path / 'second'}"])
    hashes = lambda name: json.load(open(tmp_path / name / "summary.json"))["hashes"]
    assert second.returncode == 0 and hashes("second") == hashes("first")
    assert_kill_and_resume_gives(str(tmp_path / "first"), flags, tmp_path)


def test_kill_while_an_evaluation_runs_off_the_path_redoes_it_on_resume(smoke_run, tmp_path):
    """Killed once iteration 2 has collected, before the checkpoint that joins iteration 1's evaluation (after
    iteration 2's world model), which may still run beside it (background.py): no checkpoint holds that
    evaluation, so the resumed run evaluates again, collects again and ends as the uninterrupted one (the same
    metric records, in the same order)."""
    assert_kill_and_resume_gives(smoke_run[0], SMOKE, tmp_path, kill_at=r"\[iter 2/2\] collect", wait_s=0.0)


def assert_kill_and_resume_gives(reference_dir, flags, tmp_path, kill_at=None, wait_s=None):
    """SIGKILL a run with `flags` at a random moment (or `wait_s` after the first progress line that the regex
    `kill_at` matches), rerun the command: same hashes, final return and metric records as the uninterrupted run in
    reference_dir."""
    workdir = str(tmp_path / "run")
    rng = random.Random()
    kill_after = rng.randint(1, 9)  # progress lines seen before SIGKILL: a random phase of a random iteration
    print(f"killing after {kill_at or f'{kill_after} progress lines'}")
    proc = subprocess.Popen([sys.executable, SCRIPT, *flags, f"--workdir={workdir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("[iter")
        if re.match(kill_at, line) if kill_at else seen >= kill_after:
            time.sleep(rng.uniform(0, 1.5) if wait_s is None else wait_s)  # land anywhere, also inside a save
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run([*flags, f"--workdir={workdir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(workdir, reference_dir)


def assert_same_run(workdir, reference_dir):
    """The same hashes and final return as the run in reference_dir, and metrics.jsonl holding each logged step
    exactly once, in its order."""
    expected = json.load(open(os.path.join(reference_dir, "summary.json")))
    got = json.load(open(os.path.join(workdir, "summary.json")))
    assert got["hashes"] == expected["hashes"] and got["final_eval_return_mean"] == expected["final_eval_return_mean"]
    strip = lambda path: [(r["phase"], r["iteration"], r.get("unit")) for r in map(json.loads, open(path))]
    assert strip(os.path.join(workdir, "metrics.jsonl")) == strip(os.path.join(reference_dir, "metrics.jsonl"))


def test_sigterm_saves_a_checkpoint_where_it_lands_and_exits_in_one_line(smoke_run, tmp_path):
    """SIGTERM (a batch system's preemption) once iteration 1's warm-up has reported: the run saves a checkpoint at
    its next unit boundary or phase end, not only at the one before the warm-up where a SIGKILL would leave it,
    exits 143 with one line, and the same command resumes it to the uninterrupted run."""
    workdir = str(tmp_path / "run")
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, SCRIPT, *SMOKE, f"--workdir={workdir}"], stdout=subprocess.PIPE,
                                stderr=stderr, text=True, cwd=ROOT)
        for line in proc.stdout:
            if line.startswith("[iter 1/2] warmup"):
                proc.send_signal(signal.SIGTERM)
                break
        proc.stdout.read()
        proc.wait(timeout=600)
    errors = [line for line in open(tmp_path / "stderr") if line.startswith("error:")]
    assert proc.returncode == 143 and len(errors) == 1, open(tmp_path / "stderr").read()[-3000:]
    assert "stop requested: checkpoint" in errors[0] and "rerun the same command to resume" in errors[0]
    resumed = run([*SMOKE, f"--workdir={workdir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resuming from checkpoint \d+: iteration 1, phase (warmup, unit 1|world_model, unit 0)\b",
                     resumed.stdout), resumed.stdout[:2000]
    assert_same_run(workdir, smoke_run[0])


def test_sigterm_only_sets_the_stop_event_and_a_waiting_share_stops(tmp_path):
    """SIGTERM, twice (a batch system's and a driver's), sets the stop event and ends nothing itself (the run ends at
    its next checkpoint). Process 0 of a multi-process job, waiting for the other shares' results, ends on a stop."""
    script = textwrap.dedent("""
        import os, signal, time
        from dlwm_jax.train import stop_on_sigterm
        stop = stop_on_sigterm()
        print("set" if stop.is_set() else "not set", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        print("set" if stop.is_set() else "not set", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout == "not set\nset\n", (proc.returncode, proc.stdout, proc.stderr)

    import threading
    from types import SimpleNamespace
    from dlwm_jax.finish import _wait_for_shares
    from dlwm_jax.run_state import Stopped
    (tmp_path / "results.process_0.json").write_text("{}")
    run_ = SimpleNamespace(workdir=str(tmp_path), stop=threading.Event(), echo=print)
    run_.stop.set()
    late = threading.Timer(5.0, (tmp_path / "results.process_1.json").write_text, ["{}"])  # no hang if it waits on
    late.start()
    with pytest.raises(Stopped, match=r"waiting for processes \[1\]: .* rerun the same command to merge"):
        _wait_for_shares(run_, 2, poll_s=0.01)
    late.cancel()


def test_unknown_game_fails_with_suggestion(tmp_path):
    proc = run(["--game=Bankheist", "--preset=smoke", f"--workdir={tmp_path}/w"])
    assert proc.returncode != 0
    assert len(error_lines(proc)) == 1 and "BankHeist" in error_lines(proc)[0]


@pytest.mark.parametrize("args,needle", [
    (["--game=Pong", "--seed=abc"], "seed"),
    (["--game=Pong", "--preset=huge"], "preset"),
    (["--game=Pong", "--set", "vqvae.not_a_field=3"], "not_a_field"),
    (["--game=Pong", "--set", "policy.gamma=abc"], "policy.gamma"),
    (["--preset=smoke"], "--game"),
    (["--game=Pong", "--process_id=0"], "--distributed"),
    (["--game=Pong", "--distributed"], "--process_id"),
    (["--game=Pong", "--distributed", "--num_processes=2", "--process_id=0", "--num_seeds=3"], "multiple of the 2"),
    (["--game=Pong", "--distributed", "--num_processes=2", "--process_id=2", "--num_seeds=4"], "--process_id=2"),
])
def test_bad_flags_fail_with_one_line(args, needle, tmp_path):
    proc = run([*args, f"--workdir={tmp_path}/w"])
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert not os.path.exists(f"{tmp_path}/w/checkpoints")


def test_unwritable_workdir_fails_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run([*SMOKE, f"--workdir={blocker}/run"])
    assert proc.returncode != 0 and len(error_lines(proc)) == 1 and "workdir" in error_lines(proc)[0]
    assert blocker.read_text() == "not a directory"


def _snapshot(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, directory)] = open(path, "rb").read()
    return out


def test_corrupt_checkpoint_fails_and_keeps_files(smoke_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(smoke_run[0], workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    latest = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    for root, _, files in os.walk(os.path.join(checkpoints, str(latest), "state")):
        for f in files:
            with open(os.path.join(root, f), "r+b") as handle:  # scramble every data file of the latest checkpoint
                data = handle.read()
                handle.seek(0)
                handle.write(bytes(b ^ 0x5A for b in data))
    before = _snapshot(workdir)
    proc = run([*SMOKE, f"--workdir={workdir}"])
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and "checkpoint" in lines[0], proc.stderr[-2000:]
    assert _snapshot(workdir) == before


def test_non_finite_loss_stops_with_one_line_and_keeps_checkpoints(tmp_path):
    workdir = str(tmp_path / "run")
    proc = run([*SMOKE, f"--workdir={workdir}", "--set", "vqvae.learning_rate=nan"])
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and "non-finite" in lines[0], proc.stderr[-2000:]
    # the collection's checkpoint, saved before the failure, is still there and complete
    checkpoints = os.path.join(workdir, "checkpoints")
    saved = [d for d in os.listdir(checkpoints) if d.isdigit()]
    assert saved and os.path.exists(os.path.join(checkpoints, "replay", "chunk_0.npz"))


def test_resume_accepts_a_config_saved_before_an_option_was_added_but_not_a_changed_value():
    import dataclasses
    from dlwm_jax import config as config_lib
    from dlwm_jax.run_state import same_config
    config = config_lib.override(config_lib.short(), {"env.game": "Pong", "seed": 2})
    saved = json.loads(json.dumps(dataclasses.asdict(config)))
    assert same_config(saved, config)
    del saved["compute"]["imagination_unroll"]  # saved by a version without this option: its default applies
    assert same_config(saved, config)
    saved["schedule"]["ppo_updates"] = [1, 2, 3, 4]
    assert not same_config(saved, config) and not same_config(None, config)
    assert not same_config({"not_a_field": 1}, config)


def test_evaluation_line_says_when_episodes_were_left_unfinished_at_the_cap():
    from dlwm_jax.phases import evaluation_line
    record = {"eval_return_mean": 5.0, "eval_return_std": 1.0, "eval_num_finished": 16.0, "eval_num_envs": 16.0,
              "imagined_return_mean": 0.5, "real_return_per_horizon": 0.25}
    assert "unfinished" not in evaluation_line(record, 50) and "(16/16 episodes finished)" in evaluation_line(record, 50)
    line = evaluation_line({**record, "eval_num_finished": 13.0}, 50)
    assert "3 episode(s) reached the evaluation cap unfinished" in line and "none finished" not in line
    assert "none finished" in evaluation_line({**record, "eval_num_finished": 0.0}, 50)


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_checkpoint(smoke_run, tmp_path):
    """SIGKILL at the last moment of a checkpoint write (all files written, orbax's commit rename of the temporary
    directory not yet done): the resumed run starts from the checkpoint before and ends identical."""
    reference_dir, _ = smoke_run
    workdir = str(tmp_path / "run")
    kill_at = 5  # the 5th checkpoint: after iteration 2's world model (none after iteration 2's collection, while
    # iteration 1's evaluation runs beside the loop: this one joins it)
    killer = textwrap.dedent(f"""
        import os, runpy, signal, sys
        from orbax.checkpoint._src.path import async_path
        rename = async_path.rename

        async def rename_or_die(src, dst):  # how orbax commits a checkpoint: <step>.orbax-checkpoint-tmp -> <step>
            if dst.name == "{kill_at}":
                os.kill(os.getpid(), signal.SIGKILL)
            return await rename(src, dst)

        async_path.rename = rename_or_die
        sys.path.insert(0, {os.path.dirname(SCRIPT)!r})
        sys.argv = [{SCRIPT!r}, *{[*SMOKE, f"--workdir={workdir}"]!r}]
        runpy.run_path({SCRIPT!r}, run_name="__main__")
    """)
    killed = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    leftovers = os.listdir(os.path.join(workdir, "checkpoints"))
    assert str(kill_at) not in leftovers and f"{kill_at}.orbax-checkpoint-tmp" in leftovers, leftovers
    resumed = run([*SMOKE, f"--workdir={workdir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint {kill_at - 1}:" in resumed.stdout
    assert_same_run(workdir, reference_dir)
