"""benchmarks/device_check.sh / device_check.py: the accelerator check, run here on the CPU at smoke sizes
(JAX_PLATFORMS=cpu, --tiny, --no-install), its progress-line parsing and the slim EnvPool wheel."""
import base64
import collections
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
    assert on_gpu.compute.lstm_conv == "gemm" and on_gpu.compute.dynamics_unroll == 10  # the accelerator's GEMMs


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


def test_projected_training_minutes_need_all_three_kinds_of_a_formulation():
    variant = lambda name, kind, ms: {"variant": name, "kind": kind, "ms_per_step": ms}
    variants = [variant("preset", "dynamics", 2.0), variant("xla", "dynamics", 10.0),
                variant("vqvae/preset", "vqvae", 1.0), variant("vqvae/xla", "vqvae", 6.0),
                variant("policy/preset", "policy", 30.0)]  # policy/xla stopped at its limit
    schedule = {"dynamics_steps": 240_000, "vqvae_steps": 105_000, "ppo_updates": 19_000}
    # (240,000 x 2 + 105,000 x 1 + 19,000 x 30) ms = 1,155 s
    assert device_check.projected_training_min(variants, schedule) == {"preset": 19.25}
    assert device_check.projected_training_min(variants, None) == {}


def test_script_refuses_missing_wheels_and_unknown_parts(tmp_path):
    result = _run([str(tmp_path / "out"), "--wheels", str(tmp_path / "none")], timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: no wheels in")
    result = _run([str(tmp_path / "out"), "--no-install", "--parts", "devices,nope"], timeout=120)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == (
        "error: unknown part 'nope'; choose from " + ", ".join(device_check.PART_LIMITS_S))


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
    """The whole check at smoke sizes on the CPU (every part, the on-request ones too):
    every part finishes in its limit and the JSON holds the figures the accelerator run is for; then loop_paper again,
    resumed (~15 minutes in all on 2 cores)."""
    parts = list(device_check.PART_LIMITS_S)
    runs = ["--runs-dir", str(tmp_path / "runs")]  # loop_paper's workdir, kept between calls
    result = _run([str(tmp_path), "--tiny", "--no-install", "--parts", ",".join(parts), *runs], timeout=2400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert set(report) >= {"mode", "started_utc", "budget_s", "parts", "compute_overrides", "train_slice", "wall_s",
                           *parts}
    for part in parts:
        assert report[part]["rc"] == 0 and not report[part]["timed_out"], (part, report[part])
        assert (tmp_path / f"{part}.log").exists()
    plain = config_lib.COMPUTE_PRESETS["accelerator"]
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
        assert {"vqvae_step (per step of a 12-slot chunk)", "ppo_update"} <= set(report[part]["partial"])
        assert report[part]["partial"]["ppo_update"]["ms"] == pytest.approx(figures["ppo_update_ms"], abs=0.01)
        assert figures["compute"]["dtype"] == dtype and figures["compute"]["target"] == "accelerator"
        assert {k: figures["compute"][k] for k in plain} == plain
    for part, (_, formulations) in device_check.FORMULATION_PARTS.items():  # every formulation ran (tiny: without
        variants = report[part]["variants"]                                  # the GPU-only XLA flags)
        assert [v["variant"] for v in variants] == [f.split(":")[0] for f in formulations]
        assert all(v["ms_per_step"] > 0 for v in variants)
        assert {(v["kind"], v["chunk_slots"]) for v in variants} == {("dynamics", 12), ("vqvae", 12), ("policy", 8)}
        assert report[part]["schedule_counts"]["dynamics_steps"] > 0  # the smoke preset's, tiny
        kinds = collections.defaultdict(set)  # formulation -> its kinds (policy/rolled: the policy's only)
        for f in formulations:
            kind, _, name = f.split(":")[0].rpartition("/")
            kinds[name].add(kind or "dynamics")
        assert set(report[part]["projected_training_min"]) == {n for n, k in kinds.items() if len(k) == 3}
    assert device_check.FORMULATION_PARTS["formulations"][1] == device_check.FORMULATIONS
    assert "compute.dtype=bfloat16" in report["formulations"]["variants"][-1]["overrides"]
    for part, chunk in (("profile_scan", 12), ("profile_per_step", 16)):
        profile = report[part]["result"]
        assert profile["chunk_slots"] == chunk and profile["ms_per_step"] > 0 and profile["threads"]
        assert all(0 <= t["busy_fraction"] <= 1 for t in profile["threads"])
    for part, seeds in (("loop_short", 1), ("loop_slice", 1), ("loop_slice_5_seeds", 5), ("loop_paper", 1)):
        loop = report[part]
        assert loop["num_seeds"] == seeds and loop["result"]["num_seeds"] == seeds
        assert loop["phases"] == loop["result"]["phases"]  # every phase's line was kept as it ended
        assert {p["phase"] for p in loop["phases"]} == PHASES | {"finish"}
        by_phase = {(p["iteration"], p["phase"]): p for p in loop["phases"]}
        assert by_phase[(1, "collect")]["real_steps"] == 96 * seeds and by_phase[(2, "collect")]["real_steps"] == 48 * seeds
        assert by_phase[(1, "warmup")]["vqvae_steps"] > 0 and by_phase[(1, "world_model")]["dynamics_steps"] > 0
        assert by_phase[(2, "policy")]["ppo_updates"] == 3 * seeds
        assert loop["result"]["compute"]["target"] == "accelerator"
    # the whole run's results file comes back with the check; the same command again resumes the run (here: from
    # its last checkpoint, after the end) and gives the same results
    paper = report["loop_paper"]
    assert paper["resumed"] is False and paper["results_file"] == "BankHeist.json"
    results = json.loads((tmp_path / "BankHeist.json").read_text())
    assert results["format"] == "dlwm-jax-results/1" and results["preset"] == "smoke" and results["game"] == "BankHeist"
    assert [s["final_eval_return"] for s in results["seeds"]] == paper["result"]["final_eval_return_per_seed"]
    assert "benchmarks/loop.py" in results["command"] and "--workdir" in results["command"]
    again = _run([str(tmp_path / "again"), "--tiny", "--no-install", "--parts", "loop_paper", *runs], timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = json.loads((tmp_path / "again" / "device_check.json").read_text())["loop_paper"]
    assert resumed["resumed"] is True and [p["phase"] for p in resumed["phases"]] == ["finish"]
    assert json.loads((tmp_path / "again" / "BankHeist.json").read_text())["seeds"] == results["seeds"]
