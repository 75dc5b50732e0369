"""experiments/evaluate.py on real smoke runs (one single-seed, one 2-seed), and config.from_dict."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import CACHE, ROOT, shared_run
from PIL import Image

from dlwm_jax import config as config_lib

EVALUATE = os.path.join(ROOT, "experiments", "evaluate.py")
FRAME, SEPARATOR, CAPTION, SCALE = 96, 2, 12, 3  # evaluate.py's layout; viz.save_gif scales by 3


def run(script, args, timeout=600):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def evaluate(*args):
    proc = run(EVALUATE, [f"--compilation_cache={CACHE}", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def snapshot(directory, skip=()):
    """Every path under `directory` with its size and mtime (directories included)."""
    found = {}
    for parent, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(parent, name)
            if name not in skip:
                st = os.stat(path)
                found[path] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    return shared_run(tmp_path_factory, "single")[0]  # evaluate.py writes only play.gif into it


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    return shared_run(tmp_path_factory, "two_seeds")[0]


@pytest.fixture(scope="module")
def fresh(single_run):
    """The default video and a fresh evaluation, twice, with the workdir's snapshot around the first call."""
    before = snapshot(single_run)
    first = evaluate(f"--workdir={single_run}", "--episodes=4", "--max_steps=120", "--video_steps=20")
    after = snapshot(single_run, skip=("play.gif",))
    second = evaluate(f"--workdir={single_run}", "--episodes=4", "--max_steps=120", "--video_steps=20")
    return first, second, before, after


def test_fresh_evaluation_reports_every_episode(single_run, fresh):
    result, _, _, _ = fresh
    assert result["game"] == "Pong" and result["policy"] == "agent" and result["protocol"] == "fresh"
    assert result["env_seed"] == 12345 and result["episodes"] == 4 and result["max_steps"] == 120
    assert len(result["returns"]) == len(result["lengths"]) == len(result["finished"]) == 4
    assert all(0 < n <= 120 for n in result["lengths"])
    assert math.isfinite(result["return_mean"]) and result["return_mean"] < 0  # Pong: a smoke agent loses points
    assert result["num_envs"] == 4 and result["num_finished"] == sum(result["finished"])
    picked = [r for r, f in zip(result["returns"], result["finished"]) if f] or result["returns"]
    assert result["return_mean"] == pytest.approx(sum(picked) / len(picked))
    assert result["return_min"] == min(picked) and result["return_max"] == max(picked)
    # the checkpoint: the last one of the 2-iteration run, its parameters bit-identical to the trained ones
    assert result["iterations_completed"] == 2 and result["next_phase"] == "collect" and result["real_steps"] == 144
    summary = json.load(open(os.path.join(single_run, "summary.json")))
    assert result["hashes"] == summary["hashes"]


def test_same_flags_give_the_same_json(fresh):
    first, second, _, _ = fresh
    assert first["returns"] == second["returns"] and first == second


def test_workdir_is_left_alone_except_the_video(fresh):
    _, _, before, after = fresh
    assert after == before


def test_video_of_another_env_from_a_later_step(single_run, tmp_path):
    path = str(tmp_path / "env1.gif")
    result = evaluate(f"--workdir={single_run}", "--episodes=4", "--max_steps=120", "--video_steps=100",
                      "--video_env=1", "--video_from=50", f"--video={path}")
    assert not any(result["finished"])  # smoke Pong: no episode ends in 120 steps
    assert result["video"]["env"] == 1 and result["video"]["from_step"] == 50
    assert result["video"]["frames"] == 70  # observations 50 .. 119 of env 1, each with the step taken from it
    with Image.open(path) as gif:
        assert gif.n_frames == 70
    assert "out of range" in errors(f"--workdir={single_run}", "--episodes=4", "--max_steps=10", "--video_env=4",
                                    f"--video={path}")
    assert "lasted 10 steps" in errors(f"--workdir={single_run}", "--episodes=2", "--max_steps=10",
                                       "--video_from=20", f"--video={path}")


def test_video_is_real_beside_dream(single_run, fresh):
    result, _, _, _ = fresh
    path = os.path.join(single_run, "play.gif")
    assert result["video"]["path"] == os.path.abspath(path) and result["video"]["frames"] == 20
    assert result["video"]["real_return"] in (-1.0, 0.0, 1.0)  # at most one Pong point in 20 agent steps
    with Image.open(path) as gif:
        assert gif.n_frames == 20  # the caption's step counter keeps Pillow from merging equal frames
        assert gif.size == ((2 * FRAME + SEPARATOR) * SCALE, (FRAME + CAPTION) * SCALE)


def test_last_eval_protocol_reproduces_the_runs_final_evaluation(single_run):
    result = evaluate(f"--workdir={single_run}", "--protocol=last_eval", "--video=")
    records = [json.loads(line) for line in open(os.path.join(single_run, "metrics.jsonl"))]
    last = [r for r in records if r["phase"] == "evaluate"][-1]
    assert last["iteration"] == result["evaluated_iteration"] == 2
    assert result["episodes"] == 3 and result["max_steps"] == 200 and result["env_seed"] != 12345
    for k in ("return_mean", "return_std", "return_min", "return_max", "length_mean", "num_finished"):
        assert result[k] == last[f"eval_{k}"], k
    assert result["run_return_mean"] == last["eval_return_mean"]
    assert len(set(result["returns"])) > 1  # envs differ: the equality above is not a coincidence of constants
    assert result["video"] is None and not os.path.exists(os.path.join(single_run, "play.gif.tmp"))


def test_random_policy_same_protocol_with_and_without_workdir(single_run):
    flags = ["--policy=random", "--episodes=2", "--max_steps=100"]
    with_run = evaluate(f"--workdir={single_run}", *flags)
    without = evaluate("--game=Pong", "--preset=smoke", *flags)
    assert len(with_run["returns"]) == 2 and math.isfinite(with_run["return_mean"])
    assert with_run["checkpoint_step"] is not None and "hashes" not in with_run and with_run["video"] is None
    assert "checkpoint_step" not in without and without["preset"] == "smoke"
    # same game, envs, seeds, caps and key: the random agent plays the same episodes either way
    assert without["returns"] == with_run["returns"] and without["lengths"] == with_run["lengths"]


def test_multi_seed_run_all_seeds_and_one(multi_run):
    every = evaluate(f"--workdir={multi_run}", "--seed_index=all", "--protocol=last_eval", "--video=")
    assert [r["seed"] for r in every["seeds"]] == [0, 1] and every["aggregate"]["num_seeds"] == 2
    for record in every["seeds"]:
        summary = json.load(open(os.path.join(multi_run, f"seed_{record['seed']}", "summary.json")))
        assert record["hashes"] == summary["hashes"]  # the right slice of the stacked state
        assert len(record["returns"]) == 3 and record["evaluated_iteration"] == 2
    assert every["seeds"][0]["env_seed"] != every["seeds"][1]["env_seed"]  # each seed's own evaluation envs
    one = evaluate(f"--workdir={multi_run}", "--seed_index=1", "--protocol=last_eval", "--video=")
    assert {k: v for k, v in one.items() if k in every["seeds"][1]} == every["seeds"][1]


def test_branch_probe_replays_the_env_and_plays_every_branch(single_run):
    result = evaluate(f"--workdir={single_run}", "--protocol=last_eval", "--video_env=1", "--branch_at=30",
                      "--branch_steps=12", "--branch_hold=12", "--branch_samples=2")
    names = [row["branch"] for row in result["branches"]]
    assert names == ["policy"] + [f"hold {a}{then}" for a in range(6) for then in ("", ", then policy")]  # Pong: 6
    rows = {row["branch"]: row for row in result["branches"]}
    assert len(rows["policy"]["real_returns"]) == 2 and len(rows["hold 3"]["real_returns"]) == 1
    for a in range(6):  # held for all 12 steps either way: the same deterministic copy of env 1, the same returns
        assert rows[f"hold {a}"]["real_returns"] == rows[f"hold {a}, then policy"]["real_returns"]
        assert rows[f"hold {a}"]["first_reward_step"][0] in range(-1, 12)
    assert all(abs(row["dream_clipped_mean"]) <= 12 for row in rows.values())
    assert result["env"] == 1 and result["branch_at"] == 30
    assert "not before the evaluation's step cap" in errors(f"--workdir={single_run}", "--protocol=last_eval",
                                                            "--branch_at=200")
    assert "one seed's agent" in errors(f"--workdir={single_run}", "--branch_at=5", "--policy=random")


def errors(*args):
    proc = run(EVALUATE, [f"--compilation_cache={CACHE}", *args])
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode in (1, 2) and len(ours) == 1 and proc.stdout == "", proc.stderr[-2000:]  # 2: a bad flag
    assert "Traceback" not in proc.stderr
    return ours[0]


def test_bad_input_is_one_line(single_run, tmp_path):
    assert "does not exist" in errors(f"--workdir={tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    assert "no checkpoint" in errors(f"--workdir={tmp_path / 'empty'}")
    assert os.listdir(tmp_path / "empty") == []
    assert "out of range" in errors(f"--workdir={single_run}", "--seed_index=1")
    assert "--episodes" in errors(f"--workdir={single_run}", "--episodes=0")
    assert "--episodes" in errors(f"--workdir={single_run}", "--episodes=many")
    assert "unknown game 'Pongg'" in errors("--policy=random", "--game=Pongg", "--preset=smoke")
    assert "--workdir is required" in errors("--game=Pong")
    damaged = str(tmp_path / "damaged")
    shutil.copytree(single_run, damaged)
    latest = max(int(d) for d in os.listdir(os.path.join(damaged, "checkpoints")) if d.isdigit())
    for parent, _, files in os.walk(os.path.join(damaged, "checkpoints", str(latest), "state")):
        for name in files:
            if os.path.basename(parent) == "d":  # the array data files
                open(os.path.join(parent, name), "wb").close()
    assert "unreadable" in errors(f"--workdir={damaged}", "--video=")


def test_from_dict_inverts_asdict_for_every_preset():
    for name, preset in config_lib.PRESETS.items():
        config = preset()
        restored = config_lib.from_dict(json.loads(json.dumps(dataclasses.asdict(config))))
        assert restored == config, name
        assert isinstance(restored.schedule.joint_epochs, tuple) and isinstance(restored.env, config_lib.EnvConfig)


def test_from_dict_rejects_unknown_and_mistyped_fields():
    d = json.loads(json.dumps(dataclasses.asdict(config_lib.smoke())))
    with pytest.raises(ValueError, match="policy.nonsense"):
        config_lib.from_dict({**d, "policy": {**d["policy"], "nonsense": 1}})
    with pytest.raises(ValueError, match="env.num_eval_envs"):
        config_lib.from_dict({**d, "env": {**d["env"], "num_eval_envs": "many"}})
    with pytest.raises(ValueError, match="joint_epochs"):  # validate(): one entry per iteration
        config_lib.from_dict({**d, "schedule": {**d["schedule"], "joint_epochs": [1]}})
    partial = {k: v for k, v in d.items() if k != "compute"}  # a field missing from an older checkpoint: default
    assert config_lib.from_dict(partial) == dataclasses.replace(config_lib.smoke(), compute=config_lib.ComputeConfig())
