"""One short, time-boxed check of this project on an accelerator machine (benchmarks/README.md, "Device check").

    python benchmarks/device_check.py check --out DIR [--tiny] [--budget-s 460] [--parts a,b] [--runs-dir D]
    python benchmarks/device_check.py slim-envpool ENVPOOL.whl ENVPOOL_ASSETS.whl --out wheels/

`check` runs these parts by default, in this order, each a subprocess with its own time limit inside one overall
budget, and writes DIR/device_check.json (one object, a key per part) and DIR/<part>.log (each part's output):
  devices           jax.devices(), the backend and the versions of jax, jaxlib, flax, optax and envpool
  formulations      benchmarks/profile.py --variant ...: a 12-slot chunk of dynamics steps, one of VQ-VAE steps and 8
                    PPO updates under each formulation of FORMULATIONS (the accelerator preset, the XLA
                    convolutions, bfloat16), ms per step each, and per formulation the minutes a paper run's
                    training steps would take at those figures
  formulations_concurrent  the preset's three (dynamics, VQ-VAE, policy) with a command buffer's operations
                    waiting only for what they read (CONCURRENT_FLAGS): whether independent small kernels side by
                    side save what benchmarks/kernels.py's critical_path bounds
  profile_scan      benchmarks/profile.py: one 12-slot chunk of paper-size dynamics steps as one scanned program,
                    traced: events (kernels) per device stream and the fraction of the chunk each is busy
  loop_short        benchmarks/loop.py --preset short end to end (compute.target=accelerator): per iteration and
                    phase the wall time, the host's share and the steps per second; the run's wall time
and on request (--parts): formulations_graphs (the formulations with XLA's command buffers extended to loops and
conditionals, COMMAND_BUFFER_FLAGS: whether a chunk captured whole runs faster), formulations_no_autotune (the
preset's three compiled without autotuning, NO_AUTOTUNE_FLAGS: compile time against step time), profile_per_step
(the traced chunk as a host loop of per-step programs, compute.epoch_chunk=0), loop_slice (a slice of the `paper`
run: paper networks and batch sizes, two short iterations), loop_slice_5_seeds (the slice with 5 vmapped seeds),
bench_float32 (benchmarks/run.py --json at paper sizes: step times, EnvPool, the projected paper run),
bench_5_seeds (run.py with 5 seeds), bench_bfloat16 (the three training steps with compute.dtype=bfloat16) and
loop_paper (the whole `paper` run of BankHeist seed 0: its workdir and compilation cache stay in --runs-dir, by
default the working tree's ignored runs/device_check/, which the device tool keeps between calls on a warm machine,
so the same command run again resumes the run from its last checkpoint; when the run has finished, DIR/BankHeist.json
holds its results file, results/paper/BankHeist.json's format).
A part that runs past its limit is stopped; what it printed until then is still parsed and kept. `--tiny` runs
every part at smoke sizes (a few seconds each; tests/test_device_check.py runs it with JAX_PLATFORMS=cpu).

`slim-envpool` repacks EnvPool's wheel for a machine without network whose working tree may carry 64 MiB:
only the Atari family stays (its compiled module and registration; the other families, whose packages import
their compiled modules, are dropped and `envpool/entry.py` registers Atari alone), and the Atari ROMs of the
assets wheel (~0.6 MB) move inside it (envpool/atari/roms, where EnvPool looks first), so the assets wheels are
not needed. A wheel zipped from this venv's EnvPool 1.2.5 (cp311) went from 52.7 MiB to 3.7 MiB, and the
slim install made and stepped Breakout envs with the ROMs from inside it.
"""
from __future__ import annotations

import argparse
import base64
import csv
import datetime
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The accelerator preset (config.COMPUTE_PRESETS): what `compute.target=auto` gives a run on a GPU/TPU, named
# explicitly so that the tiny check on the CPU (tests/test_device_check.py) runs the same formulations.
COMPUTE_OVERRIDES = ("compute.target=accelerator",)

# The `paper` run cut to two short iterations: the paper's networks, batch sizes, horizon and PPO epochs; fewer
# steps of every kind (3,200 random + 1,600 agent steps, 1 warm-up epoch, 1 joint epoch per iteration, 25 PPO
# updates per iteration, evaluation capped at 200 agent steps per env). On the first H100 check (2026-11-27) a
# slice with 6,400 random steps and a 400-step evaluation cap was stopped in iteration 2 (1 seed, 80 s) and 1
# (5 seeds, 100 s): iteration 1 pays for process start, env creation and loading or compiling every program.
TRAIN_SLICE = ("schedule.num_iterations=2", "schedule.initial_steps=3200", "schedule.steps_per_iteration=1600",
               "schedule.warmup_epochs=1", "schedule.joint_epochs=1,1", "schedule.vq_update_intervals=2,2",
               "schedule.ppo_updates=25,25", "env.eval_max_steps=200")
TINY_TRAIN_SLICE = ("schedule.ppo_updates=3,3",)  # on top of the smoke preset

# Seconds per part in a full check (the overall budget cuts the later ones if the earlier ran long); DEFAULT_PARTS
# run unless --parts names others. In this order: the loop as a user runs it first, bfloat16 last.
PART_LIMITS_S = {"devices": 20, "formulations": 200, "formulations_concurrent": 90, "profile_scan": 50,
                 "loop_short": 100, "formulations_graphs": 90, "formulations_no_autotune": 90, "profile_per_step": 50,
                 "loop_slice": 90, "bench_float32": 90, "loop_slice_5_seeds": 130, "bench_5_seeds": 90,
                 "bench_bfloat16": 50, "loop_paper": 590}
DEFAULT_PARTS = ("devices", "formulations", "formulations_concurrent", "profile_scan", "loop_short")
# The formulation parts: profile.py --variant NAME:overrides (on top of the accelerator preset), the largest terms
# of the paper run first: its 241k dynamics steps (ConvLSTM chain, 10-step loss, an encoder pass), its 105k VQ-VAE
# steps and its 19k PPO updates, bfloat16 last. Each times the accelerator preset (the GEMM formulations,
# benchmarks/kernels.py) against XLA's convolutions in rolled scans (the preset before 2026-12-06; kernels.py's
# XLA_CONVOLUTIONS); which the preset should take is what the figures decide.
# The former preset's VQ-VAE convolutions (the encoder's wherever it runs) and layer norms, in every "xla" variant.
XLA_VQVAE = "compute.vqvae_conv=xla,compute.upsample=transpose,compute.layer_norm=flax,compute.batch_norm=two_pass"
FORMULATIONS = ("preset:", f"xla:compute.dynamics_unroll=1,compute.lstm_conv=xla,{XLA_VQVAE}",
                # 6.7 ms a VQ-VAE step on the H100 of 2026-11-27 (cuDNN convolutions): 11.8 min of a paper run
                "vqvae/preset:", f"vqvae/xla:{XLA_VQVAE}",
                "policy/preset:",
                # the policy's loops before the twelfth session (2026-12-07): the dream 10 steps at a time, PPO rolled
                "policy/rolled:compute.imagination_unroll=10,compute.ppo_unroll=false",
                "policy/xla:compute.imagination_unroll=1,compute.dream_lstm_conv=xla,compute.policy_conv=xla,"
                f"compute.ppo_unroll=false,{XLA_VQVAE}",
                "preset_bf16:compute.dtype=bfloat16", "vqvae/preset_bf16:compute.dtype=bfloat16",
                "policy/preset_bf16:compute.dtype=bfloat16")
# XLA:GPU command buffers (CUDA graphs) for loops and conditionals too, so that a scanned chunk can be one graph.
COMMAND_BUFFER_FLAGS = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
# A command buffer's operations ordered by the buffers they read and write instead of one after another (XLA's
# default, LHS): a joint slot's 561 operations have a longest dependent chain of 346, a policy update's 2,773 (dream
# and PPO update) one of 1,997 (benchmarks/kernels.py's critical_path, deviceless, 2026-12-07).
CONCURRENT_FLAGS = "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT"
# XLA's default tile sizes and kernels, none timed on the device: a paper run's compilation (its first call) includes
# the autotuning; whether that buys faster steps than it costs (each variant's first_chunk_s holds its compilation).
NO_AUTOTUNE_FLAGS = "--xla_gpu_autotune_level=0"
PRESET_FORMULATIONS = ("preset:", "vqvae/preset:", "policy/preset:")
# name -> (extra XLA_FLAGS, the FORMULATIONS it times)
FORMULATION_PARTS = {"formulations": ("", FORMULATIONS),
                     "formulations_concurrent": (CONCURRENT_FLAGS, PRESET_FORMULATIONS),
                     "formulations_no_autotune": (NO_AUTOTUNE_FLAGS, PRESET_FORMULATIONS),
                     "formulations_graphs": (COMMAND_BUFFER_FLAGS, FORMULATIONS)}
# The bench parts: (compute.dtype, vmapped seeds, run.py --only); bench_bfloat16 times the three training steps only
# (host and EnvPool figures are float32's).
BENCH_PARTS = {"bench_float32": ("float32", 1, None), "bench_5_seeds": ("float32", 5, None),
               "bench_bfloat16": ("bfloat16", 1, "vqvae,dynamics,ppo")}
# The loop parts: (preset, seeds, overrides); tiny checks run the smoke preset with TINY_TRAIN_SLICE instead.
LOOP_PARTS = {"loop_short": ("short", 1, ()), "loop_slice": ("paper", 1, TRAIN_SLICE),
              "loop_slice_5_seeds": ("paper", 5, TRAIN_SLICE), "loop_paper": ("paper", 1, ())}
# The profile parts: overrides of the accelerator preset.
PROFILE_PARTS = {"profile_scan": (), "profile_per_step": ("compute.epoch_chunk=0",)}
TINY_PART_LIMITS_S = dict.fromkeys(PART_LIMITS_S, 240)
# Where loop_paper keeps its workdir and compilation cache between calls (--runs-dir): the working tree's ignored
# runs/, which the device tool keeps on a warm machine (a later call of the same command resumes the run).
RUNS_DIR = os.path.join(ROOT, "runs", "device_check")

DEVICES_SNIPPET = """
import json, platform, sys
import jax
info = {"devices": [str(d) for d in jax.devices()], "device_kinds": sorted({d.device_kind for d in jax.devices()}),
        "backend": jax.default_backend(), "python": sys.version.split()[0], "machine": platform.machine()}
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "numpy", "envpool", "tensorboardX", "dlwm_jax"):
    try:
        module = __import__(name, fromlist=["_"])
        info[name] = getattr(module, "__version__", "installed")
        if name in ("dlwm_jax", "envpool"):
            info[f"{name}_path"] = module.__file__
    except Exception as e:
        info[name] = f"missing: {type(e).__name__}: {e}"
import jax.numpy as jnp
x = jnp.ones((1024, 1024), jnp.bfloat16)
info["bf16_matmul_ok"] = bool(jnp.isfinite((x @ x).astype(jnp.float32)).all())
print("DEVICE_INFO " + json.dumps(info))
"""

BENCH_LINE = re.compile(r"^\[bench\] (.+) ([\d.]+) ms \(first call ([\d.]+) s\)$")  # benchmarks/run.py's _report


# ------------------------------------------------------------------------------------------ subprocesses

def run_part(argv: list[str], limit_s: float, log_path: str, env: dict[str, str]) -> dict:
    """Runs argv (in its own process group) for at most limit_s seconds; returns rc, wall_s, timed_out and the
    output lines with their arrival times (seconds since start). A reader thread collects the lines, so a
    part that hangs mid-line is still stopped on time."""
    start = time.monotonic()
    lines: list[tuple[float, str]] = []
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1, start_new_session=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv) + "\n")

        def read() -> None:
            for line in process.stdout:
                lines.append((round(time.monotonic() - start, 2), line.rstrip("\n")))
                log.write(line)
                log.flush()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            process.wait(timeout=limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(process)
        reader.join(timeout=10)
        if timed_out:
            log.write(f"\n[device_check] stopped after {limit_s:.0f} s\n")
    return {"rc": process.wait(), "wall_s": round(time.monotonic() - start, 2), "limit_s": round(limit_s, 1),
            "timed_out": timed_out, "lines": list(lines)}


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the part's own process group, SIGKILL after 10 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _outcome(run: dict) -> dict:
    """The keys every part reports of its subprocess (run_part's result)."""
    return {key: run[key] for key in ("rc", "wall_s", "limit_s", "timed_out")}


def _tail(lines: list[tuple[float, str]], n: int = 8) -> list[str]:
    return [text for _, text in lines[-n:]]


# ------------------------------------------------------------------------------------------------ parts

def devices_part(limit_s: float, out: str, env: dict[str, str]) -> dict:
    run = run_part([sys.executable, "-c", DEVICES_SNIPPET], limit_s, os.path.join(out, "devices.log"), env)
    info = next((json.loads(t[len("DEVICE_INFO "):]) for _, t in run["lines"] if t.startswith("DEVICE_INFO ")), None)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        smi = None
    return {**_outcome(run), "info": info, "nvidia_smi": smi, "tail": _tail(run["lines"])}


def bench_part(name: str, limit_s: float, out: str, env: dict[str, str], tiny: bool) -> dict:
    """benchmarks/run.py: `bench_float32` (with the EnvPool figures), `bench_5_seeds` (float32, the loop's programs
    for 5 vmapped seeds, EnvPool at 5 and 5 x num_eval_envs) or `bench_bfloat16` (compute.dtype=bfloat16, the
    three training steps only). `partial` holds the step times it printed, kept when stopped at its limit."""
    dtype, num_seeds, only = BENCH_PARTS[name]
    overrides = [*COMPUTE_OVERRIDES, f"compute.dtype={dtype}"]
    argv = [sys.executable, "benchmarks/run.py", "--json", "--preset", "smoke" if tiny else "paper",
            "--repeats", "1" if tiny else "3", "--num-seeds", str(num_seeds)]
    if tiny:
        argv.append("--no-envs")
    if only:
        argv += ["--only", only]
    for item in overrides:
        argv += ["--set", item]
    run = run_part(argv, limit_s, os.path.join(out, f"{name}.log"), env)
    partial = {}
    for _, text in run["lines"]:
        match = BENCH_LINE.match(text)
        if match:
            partial[match.group(1)] = {"ms": float(match.group(2)), "first_call_s": float(match.group(3))}
    result = _last_json(run["lines"])
    return {**_outcome(run), "num_seeds": num_seeds, "overrides": overrides, "result": result, "partial": partial,
            "tail": _tail(run["lines"])}


def _last_json(lines: list[tuple[float, str]]) -> dict | None:
    for _, text in reversed(lines):
        if text.startswith("{"):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                pass
    return None


def loop_part(name: str, limit_s: float, out: str, env: dict[str, str], tiny: bool, workroot: str,
              runs_dir: str) -> dict:
    """benchmarks/loop.py (LOOP_PARTS): `phases` holds the figure of every phase that ended (kept when the part is
    stopped at its limit), `result` the final JSON of a run that finished (of this call's share of a resumed run).

    loop_paper keeps its workdir (`<runs_dir>/loop_paper-<preset>`) and compilation cache (`<runs_dir>/xla`), so
    that the same command run again resumes it (`resumed`: a checkpoint of an earlier call was there); a finished
    run's results file (results.merge_results of its results.json) goes to out/BankHeist.json (`results_file`)."""
    preset, num_seeds, overrides = LOOP_PARTS[name]
    preset, overrides = ("smoke", TINY_TRAIN_SLICE) if tiny else (preset, overrides)
    overrides = [*COMPUTE_OVERRIDES, *overrides]
    keep = name == "loop_paper"
    workdir = os.path.join(runs_dir, f"{name}-{preset}") if keep else None
    argv = [sys.executable, "benchmarks/loop.py", "--preset", preset, "--game", "BankHeist", "--num-seeds",
            str(num_seeds), "--compilation-cache", os.path.join(runs_dir if keep else workroot, "xla")]
    argv += ["--workdir", workdir] if keep else []
    for item in overrides:
        argv += ["--set", item]
    checkpoints = os.path.join(workdir, "checkpoints") if keep else ""
    resumed = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))  # orbax's <step>/
    run = run_part(argv, limit_s, os.path.join(out, f"{name}.log"), env)
    phases = [json.loads(text[len("[loop] "):]) for _, text in run["lines"] if text.startswith("[loop] ")]
    report = {**_outcome(run), "preset": preset, "num_seeds": num_seeds, "overrides": overrides, "phases": phases,
              "result": _last_json(run["lines"]), "tail": _tail(run["lines"])}
    if keep:
        report.update(workdir=workdir, resumed=resumed, results_file=None)
        if os.path.exists(os.path.join(workdir, "results.json")):
            sys.path.insert(0, ROOT)
            from dlwm_jax.results import merge_results
            with open(os.path.join(workdir, "results.json")) as f:
                results = merge_results([json.load(f)], " ".join(["python", *argv[1:]]))
            with open(os.path.join(out, "BankHeist.json"), "w") as f:
                json.dump(results, f, indent=1)
            report["results_file"] = "BankHeist.json"
    return report


def profile_part(name: str, limit_s: float, out: str, env: dict[str, str], tiny: bool, workroot: str) -> dict:
    """benchmarks/profile.py (PROFILE_PARTS): a traced chunk of dynamics steps. The trace is read there and left in
    the temporary workroot: the device tool brings back 8 files, the JSON and the logs."""
    overrides = [*COMPUTE_OVERRIDES, *PROFILE_PARTS[name]]
    argv = [sys.executable, "benchmarks/profile.py", "--preset", "smoke" if tiny else "paper", "--kind", "dynamics",
            "--out", os.path.join(workroot, name)]
    for item in overrides:
        argv += ["--set", item]
    run = run_part(argv, limit_s, os.path.join(out, f"{name}.log"), env)
    return {**_outcome(run), "overrides": overrides, "result": _last_json(run["lines"]), "tail": _tail(run["lines"])}


def formulations_part(name: str, limit_s: float, out: str, env: dict[str, str], tiny: bool) -> dict:
    """benchmarks/profile.py --variant for each of the part's formulations (FORMULATION_PARTS: with extra XLA_FLAGS,
    GPU-only, left out of a tiny check); the variants it finished (`[variant]` lines) are kept when it is stopped."""
    flags, formulations = FORMULATION_PARTS[name]
    argv = [sys.executable, "benchmarks/profile.py", "--preset", "smoke" if tiny else "paper", "--kind", "dynamics",
            "--repeats", "1" if tiny else "3"]
    for item in COMPUTE_OVERRIDES:
        argv += ["--set", item]
    for variant in formulations:
        argv += ["--variant", variant]
    flags = "" if tiny else flags
    if flags:
        env = {**env, "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} {flags}".strip()}
    run = run_part(argv, limit_s, os.path.join(out, f"{name}.log"), env)
    tagged = lambda tag: [json.loads(text[len(tag) + 1:]) for _, text in run["lines"] if text.startswith(tag + " ")]
    variants, schedule = tagged("[variant]"), (tagged("[schedule]") or [None])[0]
    return {**_outcome(run), "xla_flags": flags, "variants": variants,
            "projected_training_min": projected_training_min(variants, schedule), "schedule_counts": schedule,
            "tail": _tail(run["lines"])}


def projected_training_min(variants: list[dict], schedule: dict | None) -> dict[str, float]:
    """Minutes of a whole run's training steps on this device, per formulation that all three kinds finished:
    dynamics steps x the dynamics chunk's ms per step + VQ-VAE steps x the VQ-VAE chunk's + PPO updates x the
    policy kind's (each a dream and an update). Device time of the chunked programs only: no collection, evaluation,
    compilation, host waits, or the joint slots' mix of both steps in one program."""
    if not schedule:
        return {}
    ms = {(v["kind"], v["variant"].split("/")[-1]): v["ms_per_step"] for v in variants}
    counts = {"dynamics": schedule["dynamics_steps"], "vqvae": schedule["vqvae_steps"],
              "policy": schedule["ppo_updates"]}
    names = dict.fromkeys(name for _, name in ms)
    return {name: round(sum(n * ms[(kind, name)] for kind, n in counts.items()) / 60e3, 2) for name in names
            if all((kind, name) in ms for kind in counts)}


def check(out: str, tiny: bool, budget_s: float, parts: list[str], part_limit_s: float | None = None,
          runs_dir: str = RUNS_DIR) -> dict:
    os.makedirs(out, exist_ok=True)
    limits = TINY_PART_LIMITS_S if tiny else PART_LIMITS_S
    if part_limit_s is not None:
        limits = dict.fromkeys(limits, part_limit_s)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started, start = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), time.monotonic()
    report = {"mode": "tiny" if tiny else "full", "started_utc": started, "budget_s": budget_s, "parts": parts,
              "compute_overrides": list(COMPUTE_OVERRIDES),
              "train_slice": list(TINY_TRAIN_SLICE if tiny else TRAIN_SLICE)}
    path = os.path.join(out, "device_check.json")

    def remaining(part: str) -> float:
        return max(0.0, min(limits[part], budget_s - (time.monotonic() - start)))

    with tempfile.TemporaryDirectory(prefix="device_check_") as workroot:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(workroot, "xla")  # shared by the bench and train parts
        for part in parts:
            limit = remaining(part)
            if limit < 5:
                report[part] = {"skipped": f"overall budget of {budget_s:.0f} s spent"}
            elif part == "devices":
                report[part] = devices_part(limit, out, env)
            elif part in BENCH_PARTS:
                report[part] = bench_part(part, limit, out, env, tiny)
            elif part in FORMULATION_PARTS:
                report[part] = formulations_part(part, limit, out, env, tiny)
            elif part in PROFILE_PARTS:
                report[part] = profile_part(part, limit, out, env, tiny, workroot)
            else:
                report[part] = loop_part(part, limit, out, env, tiny, workroot, runs_dir)
            report["wall_s"] = round(time.monotonic() - start, 1)
            with open(path, "w") as f:  # after every part: a stopped check still leaves what it measured
                json.dump(report, f, indent=1)
            print(f"[device_check] {part}: {_summary(report[part])}", flush=True)
    return report


def _summary(part: dict) -> str:
    if "skipped" in part:
        return part["skipped"]
    text = f"rc {part['rc']}, {part['wall_s']:.0f} s{' (stopped at its limit)' if part['timed_out'] else ''}"
    if part.get("variants"):
        text += "; " + ", ".join(f"{v['variant']} {v['ms_per_step']} ms per step" for v in part["variants"])
    if part.get("projected_training_min"):
        text += "; a run's training steps: " + ", ".join(f"{name} {minutes} min" for name, minutes
                                                          in part["projected_training_min"].items())
    if part.get("info"):
        text += f"; {part['info'].get('backend')} {part['info'].get('devices')}"
    if part.get("result") and "traced_chunk_ms" in part["result"]:
        r = part["result"]
        streams = ", ".join(f"{t['thread']} {t['events']} events {t['busy_fraction']:.0%} busy"
                            for t in r["threads"][:3])
        text += f"; {r['ms_per_step']} ms per step of a {r['chunk_slots']}-slot chunk; {streams}"
    elif part.get("result") and "run_wall_s" in part["result"]:
        text += f"; run {part['result']['run_wall_s']:.0f} s"
    elif part.get("result"):
        r = part["result"]
        text += (f"; vqvae {r.get('vqvae_step_ms')} ms, dynamics {r.get('dynamics_step_ms')} ms, "
                 f"ppo update {r.get('ppo_update_ms')} ms, projected {r.get('projected_run_hours')} h")
    elif part.get("partial"):
        text += "; " + ", ".join(f"{k} {v['ms']:.1f} ms" for k, v in part["partial"].items())
    if "phases" in part:
        text += "; " + ", ".join(f"{p['phase']}@{p['iteration']} {p['wall_s']:.0f}s" for p in part["phases"])
    if "resumed" in part:
        text += ("; resumed" if part["resumed"] else "; started") + f" in {part['workdir']}"
        text += f"; results: {part['results_file']}" if part["results_file"] else "; not finished: run it again"
    return text


# ------------------------------------------------------------------------------------------------ wheels

def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


SLIM_ENTRY = (b'"""EnvPool\'s entry point cut to Atari (dlwm-jax benchmarks/device_check.py slim-envpool)."""\n\n'
              b"import envpool.atari.registration  # noqa: F401\n")


def slim_envpool(envpool_wheel: str, assets_wheel: str, out_dir: str) -> str:
    """Writes out_dir/<envpool wheel name>: the EnvPool wheel's top-level modules, envpool/python, envpool/atari,
    the vendored libraries and the metadata, with entry.py registering Atari only; the assets wheel's Atari
    ROMs added under envpool/atari/roms; a RECORD that lists exactly these files. Returns the new wheel's path."""
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, os.path.basename(envpool_wheel))
    if os.path.abspath(target) == os.path.abspath(envpool_wheel):
        raise ValueError("--out must not be the folder of the input wheel")
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(envpool_wheel) as wheel:
        record_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
        for name in wheel.namelist():
            if name == record_name or name.endswith("/"):
                continue
            parts = name.split("/")
            keep = (parts[0].endswith((".dist-info", ".libs"))
                    or (parts[0] == "envpool" and (len(parts) == 2 or parts[1] in ("python", "atari"))))
            if keep:
                files[name] = SLIM_ENTRY if name == "envpool/entry.py" else wheel.read(name)
    with zipfile.ZipFile(assets_wheel) as assets:
        roms = [n for n in assets.namelist() if "/atari/roms/" in n and not n.endswith("/")]
        if not roms:
            raise ValueError(f"{assets_wheel} holds no atari/roms/ files")
        for name in roms:
            files["envpool/atari/roms/" + name.split("/atari/roms/", 1)[1]] = assets.read(name)
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in files.items():
        writer.writerow([name, _record_hash(data), len(data)])
    writer.writerow([record_name, "", ""])
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(record_name, record.getvalue())
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("check", help="run the device check, JSON and logs to --out")
    run.add_argument("--out", default=os.environ.get("OUT") or "device_check_out")
    run.add_argument("--tiny", action="store_true", help="smoke sizes, a few seconds per part (tests, CPU)")
    run.add_argument("--budget-s", type=float, default=None, help="overall seconds (default 460; tiny 900)")
    run.add_argument("--parts", default=",".join(DEFAULT_PARTS), help="comma list of " + ", ".join(PART_LIMITS_S))
    run.add_argument("--part-limit-s", type=float, default=None,
                     help="one time limit for every part instead of each part's own (e.g. one longer training part)")
    run.add_argument("--runs-dir", default=RUNS_DIR, help="loop_paper's workdir and compilation cache, kept between "
                                                          "calls: the same command again resumes the run")
    slim = commands.add_parser("slim-envpool", help="repack EnvPool's wheel with Atari only (ROMs inside)")
    slim.add_argument("envpool_wheel")
    slim.add_argument("assets_wheel")
    slim.add_argument("--out", required=True, help="folder for the slim wheel")
    args = parser.parse_args()
    if args.command == "slim-envpool":
        path = slim_envpool(args.envpool_wheel, args.assets_wheel, args.out)
        print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB")
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PART_LIMITS_S]
    if unknown:
        sys.exit(f"error: unknown part {unknown[0]!r}; choose from {', '.join(PART_LIMITS_S)}")
    budget = args.budget_s if args.budget_s is not None else (900.0 if args.tiny else 460.0)
    report = check(args.out, args.tiny, budget, parts, args.part_limit_s, args.runs_dir)
    failed = [p for p in parts if report[p].get("rc", 0) not in (0, None) and not report[p].get("timed_out")]
    print(f"[device_check] wrote {os.path.join(args.out, 'device_check.json')} in {report['wall_s']:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
