"""benchmarks/device_check.sh / device_check.py: the accelerator check, run here on the CPU at smoke sizes
(JAX_PLATFORMS=cpu, --tiny, --no-install), its progress-line parsing and the slim EnvPool wheel."""
import base64
import csv
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import device_check  # noqa: E402  (benchmarks/device_check.py)
from dlwm_jax import config as config_lib  # noqa: E402

BENCH_KEYS = ("vqvae_step_ms", "dynamics_step_ms", "imagination_rollout_ms", "ppo_update_ms", "compile_s",
              "projected_run_hours", "compute", "backend")
PHASES = {"collect", "warmup", "world_model", "policy", "evaluate"}


def _run(args, timeout, **env):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, **env})


def test_check_measures_what_auto_gives_an_accelerator_run_on_any_backend():
    """The bench and train parts' compute overrides resolve to the formulations `compute.target=auto` picks on a
    GPU/TPU, also where the check itself runs on the CPU (the tiny check here)."""
    overrides = dict(item.split("=", 1) for item in device_check.COMPUTE_OVERRIDES)
    on_gpu = config_lib.resolve_compute(config_lib.paper(), "gpu")
    for backend in ("cpu", "gpu", "tpu"):
        checked = config_lib.resolve_compute(config_lib.override(config_lib.paper(), overrides), backend)
        assert dataclasses.replace(checked.compute, target="auto") == on_gpu.compute
    assert on_gpu.compute.lstm_conv == "xla" and on_gpu.compute.dynamics_unroll == 1  # the plain formulations


def test_devices_part_alone_writes_its_keys(tmp_path):
    result = _run([str(tmp_path), "--tiny", "--no-install", "--parts", "devices"], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["mode"] == "tiny" and report["parts"] == ["devices"]
    info = report["devices"]["info"]
    assert info["backend"] == "cpu" and info["devices"] and info["bf16_matmul_ok"] is True
    for name in ("jax", "jaxlib", "flax", "optax", "envpool", "tensorboardX", "dlwm_jax"):
        assert not str(info[name]).startswith("missing"), (name, info[name])
    assert (tmp_path / "devices.log").exists()


def test_train_slice_is_a_short_paper_run():
    """The full check's training slice (run only on a device) is valid on the paper preset and keeps the paper's
    networks and batch sizes: only step counts change."""
    sys.path.insert(0, os.path.join(os.path.dirname(SCRIPT)))
    from run import schedule_counts
    paper = config_lib.paper()
    cut = config_lib.override(paper, dict(item.split("=", 1) for item in device_check.TRAIN_SLICE))
    assert (cut.vqvae, cut.dynamics, cut.policy) == (paper.vqvae, paper.dynamics, paper.policy)
    counts = schedule_counts(cut)
    assert counts["random_steps"] == 3_200 and counts["agent_steps"] == 1_600 and counts["ppo_updates"] == 50
    assert 0 < counts["dynamics_steps"] < 1_000 and cut.env.eval_max_steps == 200


def test_script_refuses_missing_wheels_and_unknown_parts(tmp_path):
    result = _run([str(tmp_path / "out"), "--wheels", str(tmp_path / "none")], timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: no wheels in")
    result = _run([str(tmp_path / "out"), "--no-install", "--parts", "devices,nope"], timeout=120)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == (
        "error: unknown part 'nope'; choose from devices, bench_float32, bench_5_seeds, train_1_seed, train_5_seeds, "
        "bench_bfloat16")


def test_script_installs_carried_wheels_without_network(tmp_path):
    """The install step: every wheel of --wheels into DEVICE_CHECK_SITE (pip --no-index), ahead on PYTHONPATH."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    dist = "carried_probe-1.0.dist-info"
    with zipfile.ZipFile(wheels / "carried_probe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("carried_probe.py", "VALUE = 42\n")
        z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: carried-probe\nVersion: 1.0\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    site = tmp_path / "site"
    result = _run([str(tmp_path / "out"), "--tiny", "--wheels", str(wheels), "--parts", "devices"], timeout=300,
                  DEVICE_CHECK_SITE=str(site))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "carried_probe.py").exists() and "[device_check] installed 1 wheels" in result.stdout
    assert (tmp_path / "out" / "install.log").exists()
    report = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert report["devices"]["info"]["dlwm_jax_path"].endswith("__init__.py")


def test_phase_throughput_from_progress_lines_and_metrics():
    lines = [(1.0, "[iter 1/2] collect     96/96  elapsed      1s  eta      0s  3 episodes finished"),
             (2.0, "something else"),
             (4.0, "[iter 1/2] warmup      1/1  elapsed      3s  eta      0s  recon_nll=1"),
             (9.0, "[iter 1/2] world_model 1/1  elapsed      5s  eta      0s  x"),
             (10.0, "[iter 1/2] policy      1/2  elapsed      1s  eta      1s"),
             (11.0, "[iter 1/2] policy      2/2  elapsed      2s  eta      0s"),
             (13.0, "[iter 2/2] collect     48/48  elapsed      1s  eta      0s")]
    records = [{"phase": "collect", "iteration": 1, "real_steps": 96},
               {"phase": "warmup", "iteration": 1, "steps": 12.0},
               {"phase": "vqvae", "iteration": 1, "steps": 3.0}, {"phase": "dynamics", "iteration": 1, "steps": 5.0},
               {"phase": "policy", "iteration": 1, "unit": 1}, {"phase": "policy", "iteration": 1, "unit": 2},
               {"phase": "collect", "iteration": 2, "real_steps": 144}]
    phases = device_check.phase_throughput(lines, records, num_seeds=5)
    assert [(p["iteration"], p["phase"]) for p in phases] == [(1, "collect"), (1, "warmup"), (1, "world_model"),
                                                              (1, "policy"), (2, "collect")]
    collect, warmup, world, policy, collect2 = phases
    assert collect["real_steps"] == 480 and collect["real_steps_per_s"] == 480.0
    assert warmup["wall_s"] == 3.0 and warmup["vqvae_steps"] == 60 and warmup["vqvae_steps_per_s"] == 20.0
    assert world["dynamics_steps"] == 25 and world["vqvae_steps"] == 15 and world["dynamics_steps_per_s"] == 5.0
    assert policy["done"] == 2 and policy["ppo_updates"] == 10 and policy["wall_s"] == 2.0
    assert collect2["real_steps"] == 240 and collect2["wall_s"] == 2.0


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_slim_envpool_keeps_atari_and_python_adds_roms_and_installs(tmp_path):
    """A stand-in wheel pair with the real layout: the top-level modules, envpool/python and envpool/atari stay,
    other families go, entry.py registers Atari alone, the ROMs move to envpool/atari/roms, RECORD matches, and
    pip installs it without network. (The real EnvPool 1.2.5 wheel, slimmed, made Breakout envs here.)"""
    dist = "envpool-9.9.9.dist-info"
    envpool_files = {"envpool/__init__.py": b"import envpool.entry\n",
                     "envpool/entry.py": b"import envpool.atari.registration\nimport envpool.mujoco.registration\n",
                     "envpool/registration.py": b"R = 1\n", "envpool/python/protocol.py": b"P = 1\n",
                     "envpool/atari/__init__.py": b"", "envpool/atari/registration.py": b"A = 1\n",
                     "envpool/atari/atari_envpool.so": b"\x7fELF atari", "envpool/mujoco/registration.py": b"M = 1\n",
                     "envpool/mujoco/mujoco_gym_envpool.so": b"\x7fELF mujoco" * 1000,
                     "envpool/mujoco/assets/model.xml": b"<mujoco/>", "envpool.libs/libz-1.so": b"\x7fELF libz",
                     f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: envpool\nVersion: 9.9.9\n",
                     f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n",
                     f"{dist}/RECORD": b""}
    wheel = tmp_path / "in" / "envpool-9.9.9-py3-none-any.whl"
    assets = tmp_path / "in" / "envpool_assets-0.3.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in envpool_files.items():
            z.writestr(name, data)
    with zipfile.ZipFile(assets, "w") as z:
        z.writestr("envpool_assets/atari/roms/breakout.bin", b"ROM" * 10)
        z.writestr("envpool_assets/atari/roms/pong.bin", b"PONG")
        z.writestr("envpool_assets/vizdoom/maps/a.wad", b"WAD" * 1000)

    slim = device_check.slim_envpool(str(wheel), str(assets), str(tmp_path / "wheels"))
    with zipfile.ZipFile(slim) as z:
        names = set(z.namelist())
        record = list(csv.reader(io.StringIO(z.read(f"{dist}/RECORD").decode())))
        for name, digest, size in record:
            if name != f"{dist}/RECORD":
                assert digest == _record_hash(z.read(name)) and int(size) == len(z.read(name))
    assert {"envpool/atari/atari_envpool.so", "envpool/registration.py", "envpool/python/protocol.py"} <= names
    assert not any(n.startswith("envpool/mujoco/") for n in names)
    assert {"envpool/atari/roms/breakout.bin", "envpool/atari/roms/pong.bin", "envpool.libs/libz-1.so"} <= names
    assert not any("vizdoom" in n for n in names)
    assert {r[0] for r in record} == names

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                              str(target), slim], capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr
    assert (target / "envpool" / "atari" / "roms" / "breakout.bin").read_bytes() == b"ROM" * 10
    entry = (target / "envpool" / "entry.py").read_text()
    assert "import envpool.atari.registration" in entry and "mujoco" not in entry


@pytest.mark.slow
def test_tiny_device_check_writes_every_part(tmp_path):
    """The whole check at smoke sizes on the CPU (~4-6 minutes on 2 busy cores): every part finishes in its
    limit and the JSON holds the figures the accelerator run is for."""
    result = _run([str(tmp_path), "--tiny", "--no-install"], timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert set(report) >= {"mode", "started_utc", "budget_s", "parts", "compute_overrides", "train_slice", "wall_s",
                           "devices", "bench_float32", "bench_5_seeds", "bench_bfloat16", "train_1_seed",
                           "train_5_seeds"}
    for part in ("devices", "bench_float32", "bench_5_seeds", "bench_bfloat16", "train_1_seed", "train_5_seeds"):
        assert report[part]["rc"] == 0 and not report[part]["timed_out"], (part, report[part])
        assert (tmp_path / f"{part}.log").exists()
    for part, dtype, seeds in (("bench_float32", "float32", 1), ("bench_5_seeds", "float32", 5),
                               ("bench_bfloat16", "bfloat16", 1)):
        figures = report[part]["result"]
        if dtype == "bfloat16":  # the three training steps only
            assert figures["only"] == ["vqvae", "dynamics", "ppo"] and "ppo_update_ms" in figures
            assert "projected_run_hours" not in figures and "imagination_rollout_ms" not in figures
        else:
            assert all(key in figures for key in BENCH_KEYS), (part, sorted(figures))
        assert figures["num_seeds"] == seeds and report[part]["num_seeds"] == seeds
        # every step time was also printed as it was measured (kept when a part is stopped at its limit)
        assert {"vqvae_step", "dynamics_step", "ppo_update"} <= set(report[part]["partial"])
        assert report[part]["partial"]["ppo_update"]["ms"] == pytest.approx(figures["ppo_update_ms"], abs=0.01)
        assert figures["compute"]["dtype"] == dtype and figures["compute"]["lstm_conv"] == "xla"
        assert figures["compute"]["upsample"] == "transpose" and figures["compute"]["target"] == "accelerator"
        plain = config_lib.COMPUTE_PRESETS["accelerator"]
        assert {k: figures["compute"][k] for k in plain} == plain
    for part, seeds in (("train_1_seed", 1), ("train_5_seeds", 5)):
        train = report[part]
        assert train["finished"] and train["num_seeds"] == seeds
        assert {p["phase"] for p in train["phases"]} == PHASES
        by_phase = {(p["iteration"], p["phase"]): p for p in train["phases"]}
        assert by_phase[(1, "collect")]["real_steps"] == 96 * seeds and by_phase[(2, "collect")]["real_steps"] == 48 * seeds
        assert by_phase[(1, "warmup")]["vqvae_steps"] > 0 and by_phase[(1, "world_model")]["dynamics_steps"] > 0
        assert by_phase[(2, "policy")]["ppo_updates"] == 3 * seeds
        assert all(p["wall_s"] >= 0 for p in train["phases"])
