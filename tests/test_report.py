"""experiments/report.py and dlwm_jax/report.py: the Table-4 output for synthetic results files and workdirs (shaped
like the ones train.py writes), each one-line error, the PNG, the per-iteration diagnostics. The statistics:
test_stats.py."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dlwm_jax.report import diagnostics_rows, format_diagnostics, load_results_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "report.py")
_spec = importlib.util.spec_from_file_location("report", SCRIPT)
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

SMOKE_CONFIG = {"env": {"game": "Pong", "max_episode_steps": 27000}, "schedule": {"num_iterations": 2},
                "compute": {"upsample": "resize"}, "seed": 0}


# ------------------------------------------------------------------------------------------------ synthetic inputs

def write_results_file(folder, game, finals, preset="short", config=None, random_agent=True, name=None):
    """A dlwm-jax-results/1 file with one seed per final return, two evaluations each."""
    os.makedirs(folder, exist_ok=True)
    seeds = [{"seed": s, "final_eval_return": f, "final_eval_returns": [f - 1.0, f + 1.0],
              "iterations": [{"iteration": 1, "real_steps": 6400, "eval_return_mean": f / 2, "eval_return_std": 1.0,
                              "eval_num_finished": 16, "eval_num_envs": 16, "diagnostics": {}},
                             {"iteration": 2, "real_steps": 12800, "eval_return_mean": f, "eval_return_std": 1.0,
                              "eval_num_finished": 16, "eval_num_envs": 16, "diagnostics": {}}]}
             for s, f in enumerate(finals)]
    data = {"format": "dlwm-jax-results/1", "game": game, "preset": preset, "command": "python experiments/train.py",
            "git_commit": "0" * 40, "machine": {"cpu": "test"}, "config": config or {**SMOKE_CONFIG, "env": {"game": game, "max_episode_steps": 27000}},
            "wall_time_s": 12.0, "seeds": seeds}
    if random_agent:
        data["random_agent"] = {"return_mean": 70.0, "return_std": 30.0,
                                "per_seed": [{"seed": 0, "return_mean": 71.0, "returns": [41.0, 101.0]},
                                             {"seed": 1, "return_mean": 69.0, "returns": [39.0, 99.0]}]}
    path = os.path.join(folder, f"{name or game}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def write_seed_dir(run_dir, game, seed, eval_returns, finished=True):
    """metrics.jsonl (collect / warmup / evaluate lines as train.py writes them) and, if finished, summary.json."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for it, value in enumerate(eval_returns, 1):
            steps = 96 + 48 * (it - 1)
            f.write(json.dumps({"phase": "collect", "iteration": it, "real_steps": steps, "episodes": 0.0}) + "\n")
            f.write(json.dumps({"phase": "warmup", "iteration": it, "real_steps": steps, "unit": 0, "loss": -62.1}) + "\n")
            f.write(json.dumps({"phase": "evaluate", "iteration": it, "real_steps": steps, "eval_return_mean": value,
                                "eval_return_std": 0.5, "eval_return_min": value - 1, "eval_return_max": value + 1,
                                "eval_length_mean": 60.0, "eval_num_finished": 2.0, "eval_num_envs": 2.0}) + "\n")
        if not finished:
            f.write(json.dumps({"phase": "policy", "iteration": len(eval_returns) + 1, "real_steps": 999, "unit": 1}) + "\n")
    if finished:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({"game": game, "seed": seed, "real_steps": 96 + 48 * (len(eval_returns) - 1),
                       "final_eval_return_mean": eval_returns[-1], "hashes": {"policy": "ab"}}, f)


def write_multi_workdir(workdir, game, curves, finished=True, config=SMOKE_CONFIG):
    """seed_<s>/ per seed, aggregate.json when finished, and a checkpoint meta holding the config."""
    for s, curve in enumerate(curves):
        write_seed_dir(os.path.join(workdir, f"seed_{s}"), game, s, curve, finished)
    meta_dir = os.path.join(workdir, "checkpoints", "9", "meta")
    os.makedirs(meta_dir, exist_ok=True)
    with open(os.path.join(meta_dir, "metadata"), "w") as f:
        json.dump({"iteration": 2, "config": config}, f)
    if finished:
        finals = [c[-1] for c in curves]
        with open(os.path.join(workdir, "aggregate.json"), "w") as f:
            json.dump({"game": game, "seeds": list(range(len(curves))), "num_devices": 1,
                       "final_eval_return": {"mean": float(np.mean(finals))}, "final_eval_return_per_seed": finals}, f)
    return workdir


def run_main(capsys, *args):
    assert report.main(list(args)) == 0
    return capsys.readouterr().out


def run_cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def row(out, label, after=""):
    """The cells of the first table row starting with `label` (below the first line containing `after`)."""
    lines = out[out.index(after):].splitlines()
    line = next(l for l in lines if l.strip().startswith(label))
    return line.strip()[len(label):].split()


# ------------------------------------------------------------------------------------------------ table

def test_table_for_results_file(tmp_path, capsys):
    path = write_results_file(str(tmp_path / "short"), "Seaquest", [100.0, 200.0, 300.0, 500.0])
    out = run_main(capsys, path, f"--png={tmp_path / 'c.png'}")
    # mean 275, sample std sqrt(87500 / 3), median 250, best 500, 4 runs, (275 - 68.4) / (42054.7 - 68.4)
    assert row(out, "ours") == ["275.00", "170.78", "250.00", "500.00", "4", "0.005"]
    assert row(out, "random agent, our protocol") == ["70.00", "30.00", "-", "-", "2", "0.000"]
    assert row(out, "random (reference)")[0] == "68.4" and row(out, "human (reference)")[0] == "42,054.7"
    assert row(out, "SimPLe") == ["370.9", "128.2", "386.9", "497.2", "5", "0.007"]
    assert row(out, "DLWM paper") == ["458.1", "155.7", "472.5", "635.0", "5", "0.009"]
    assert "preset short" in out and "sample std over seeds (ddof=1)" in out
    assert "note: only one game (Seaquest)" in out
    assert row(out, "mean", after="Human-normalised")[:2] == ["0.005", "[0.002,"]  # bootstrap over 4 runs
    assert row(out, "IQM", after="Human-normalised")[0] == "0.004"  # mean(200, 300) = 250 -> 181.6 / 41986.3


def test_table_for_multi_seed_workdir_and_file_together(tmp_path, capsys):
    workdir = write_multi_workdir(str(tmp_path / "Pong-0x3"), "Pong", [[-21.0, -21.0], [-20.0, -19.0], [-18.0, -17.0]])
    results = write_results_file(str(tmp_path / "short"), "Seaquest", [100.0, 200.0, 300.0, 500.0])
    out = run_main(capsys, results, workdir, f"--png={tmp_path / 'c.png'}", "--json")
    data = json.loads(out)
    pong = next(g for g in data["games"] if g["game"] == "Pong")
    assert pong["seeds"] == [0, 1, 2] and pong["final_returns"] == [-21.0, -19.0, -17.0]
    assert pong["ours"] == {"mean": -19.0, "std": 2.0, "median": -19.0, "best": -17.0, "n": 3}
    assert pong["random_agent_ours"] is None and pong["preset"] is None
    aggregates = data["aggregates"]
    assert aggregates["num_games"] == 2 and aggregates["num_runs"] == 7
    pong_norm = (-19.0 + 20.7) / 35.3
    seaquest_norm = (275.0 - 68.4) / (42054.7 - 68.4)
    assert aggregates["ours"]["mean"]["value"] == pytest.approx((pong_norm + seaquest_norm) / 2)
    assert aggregates["ours"]["median"]["value"] == pytest.approx((pong_norm + seaquest_norm) / 2)
    low, high = aggregates["ours"]["mean"]["ci95"]
    assert low < (pong_norm + seaquest_norm) / 2 < high
    assert aggregates["dlwm_paper"]["mean"] == pytest.approx(((11.8 + 20.7) / 35.3 + (458.1 - 68.4) / 41986.3) / 2)
    assert data["notes"] == []
    # the same as a table
    out = run_main(capsys, results, workdir, f"--png={tmp_path / 'c.png'}")
    assert row(out, "ours")[:5] in (["-19.00", "2.00", "-19.00", "-17.00", "3"], ["275.00", "170.78", "250.00", "500.00", "4"])
    assert "Human-normalised score over 2 game(s) (Pong, Seaquest), 7 runs" in out


def test_single_seed_workdirs_pool_and_unknown_game_note(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_seed_dir(str(runs / "Pong-0"), "Pong", 0, [-21.0, -15.0])
    write_seed_dir(str(runs / "Pong-1"), "Pong", 1, [-20.0, -13.0])
    write_results_file(str(runs), "Alien", [500.0], random_agent=False)
    data = json.loads(run_main(capsys, str(runs), "--json"))
    pong = next(g for g in data["games"] if g["game"] == "Pong")
    assert pong["seeds"] == [0, 1] and pong["ours"]["mean"] == -14.0
    alien = next(g for g in data["games"] if g["game"] == "Alien")
    assert alien["reference"] is None and alien["ours"]["std"] is None  # one seed: no sample std
    assert data["notes"] == ["Alien has no reference scores; it is left out of the normalised aggregates"]
    assert data["aggregates"]["games"] == ["Pong"]
    assert data["png"] == os.path.join(str(runs), "report.png") and os.path.getsize(data["png"]) > 0


def test_png_written(tmp_path, capsys):
    workdir = write_multi_workdir(str(tmp_path / "wd"), "Pong", [[-21.0, -20.0], [-19.0, -18.0]])
    results = write_results_file(str(tmp_path / "short"), "Breakout", [2.0, 3.0])
    png = str(tmp_path / "curves.png")
    out = run_main(capsys, workdir, results, f"--png={png}")
    assert out.rstrip().endswith(f"learning curves: {png}")
    assert os.path.getsize(png) > 0
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 0  # two subplots side by side


# ------------------------------------------------------------------------------------------------ errors

def _errors(tmp_path):
    """(name, argv, text the error line must contain)."""
    t = str(tmp_path)
    os.makedirs(os.path.join(t, "empty"))
    write_seed_dir(os.path.join(t, "running"), "Pong", 0, [-21.0, -19.0], finished=False)
    write_multi_workdir(os.path.join(t, "running_multi"), "Pong", [[-21.0], [-20.0]], finished=False)
    write_seed_dir(os.path.join(t, "Pong-0"), "Pong", 0, [-1.0])
    wrong_name = write_results_file(os.path.join(t, "wrong"), "Breakout", [1.0], name="Pong")
    short = write_results_file(os.path.join(t, "short"), "Pong", [1.0])
    paper = write_results_file(os.path.join(t, "paper"), "Pong", [2.0], preset="paper")
    capped = write_results_file(os.path.join(t, "capped"), "Pong", [2.0],
                                config={**SMOKE_CONFIG, "env": {"game": "Pong", "max_episode_steps": 100000}})
    bad_json = os.path.join(t, "Freeway.json")
    with open(bad_json, "w") as f:
        f.write('{"format": "dlwm-jax-results/1", "game": ')
    no_seeds = os.path.join(t, "Seaquest.json")
    with open(no_seeds, "w") as f:
        json.dump({"format": "dlwm-jax-results/1", "game": "Seaquest"}, f)
    return [("missing path", [os.path.join(t, "nope")], "no such file or directory"),
            ("empty folder", [os.path.join(t, "empty")], "no runs found"),
            ("in progress", [os.path.join(t, "running")], "still in progress (no summary.json): last evaluated iteration 2 (144 real steps)"),
            ("multi in progress", [os.path.join(t, "running_multi")], "still in progress (no aggregate.json): last evaluated iteration 1 of 2"),
            ("file name", [wrong_name], "the file name says 'Pong' but its game is 'Breakout'"),
            ("presets", [short, paper], "Pong given twice with different presets"),
            ("configs", [short, capped], "env.max_episode_steps 27000 vs 100000"),
            ("seed twice", [short, os.path.join(t, "Pong-0")], "Pong seed 0 given twice"),
            ("bad json", [bad_json], "not valid JSON"),
            ("missing key", [no_seeds], "missing key 'seeds'")]


def test_each_error_is_one_line(tmp_path):
    for name, argv, expected in _errors(tmp_path):
        result = run_cli(*argv, f"--png={tmp_path / 'x.png'}")
        lines = result.stderr.splitlines()
        assert result.returncode == 1, (name, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
        assert expected in lines[0], (name, lines[0])
        assert result.stdout == "", name


def test_diagnostics_rows_average_over_seeds_and_pool_reward_counts(tmp_path):
    path = write_results_file(str(tmp_path), "Seaquest", [100.0, 300.0])
    data = json.load(open(path))
    for s, seed in enumerate(data["seeds"]):
        for i, it in enumerate(seed["iterations"]):
            it.update(imagined_return_mean=1.0 + s, real_return_per_horizon=0.5)
            it["diagnostics"] = {"model_iteration": max(i, 1), "latent_acc_1": 0.9 - s / 10, "copy_acc_1": 0.8,
                                 "latent_acc_5": 0.7, "copy_acc_5": 0.6, "latent_acc_10": 0.5, "copy_acc_10": 0.4,
                                 "reward_pos_as_pos": 1 + s, "reward_pos_as_zero": 3, "reward_pos_as_neg": 0,
                                 "reward_zero_as_pos": 2, "reward_zero_as_zero": 98, "reward_zero_as_neg": 0}
    json.dump(data, open(path, "w"))
    rows = diagnostics_rows(load_results_file(path))
    assert [r["iteration"] for r in rows] == [1, 2] and [r["model_iteration"] for r in rows] == [1, 1]
    assert rows[1]["eval_return"] == 200.0 and rows[0]["eval_return"] == 100.0
    assert rows[0]["latent_acc_1"] == pytest.approx(0.85) and rows[0]["copy_acc_10"] == pytest.approx(0.4)
    assert rows[0]["pos_recall"] == pytest.approx(3 / 9) and rows[0]["pos_count"] == 9  # (1 + 2) of (4 + 5)
    assert rows[0]["zero_as_pos"] == pytest.approx(4 / 200)
    assert rows[0]["imagined_return"] == 1.5 and rows[0]["real_return"] == 0.5
    text = format_diagnostics({"Seaquest": load_results_file(path)})
    assert "0.85/0.70/0.50" in text and "0.33 (9)" in text
