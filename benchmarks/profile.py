"""Where one world-model chunk (or a run of PPO updates) spends its time: one JSON object on stdout.

    python benchmarks/profile.py [--preset paper] [--kind dynamics|vqvae|policy] [--set section.field=value ...]
                                 [--num-seeds N] [--out DIR] [--variant NAME:section.field=value,... ...]

Compiles the loop's world_model_chunk (programs.py) at the preset's sizes, runs one chunk of `chunk_slots` slots
that each take a `--kind` step (benchmarks/run.py's slot_chunk: random frames and indices) to compile and warm
it, then runs one more under jax.profiler (a perfetto trace, kept in --out) and reads the trace: per profiled
process and thread (on a GPU the device's streams, whose events are its kernels and copies) the number of events
and the fraction of the chunk's wall time they cover (`busy_fraction`: the union of their intervals). With
compute.epoch_chunk=0 the chunk is a host loop of per-step programs; otherwise one scanned program. Kind
`policy` times POLICY_UPDATES PPO updates instead (programs.policy_update: a 50-step dream, then the update).

With --variant (repeatable; overrides on top of --set, none for the plain config) nothing is traced: each variant
compiles its chunk, runs it once more to warm it, then `--repeats` timed chunks, and prints `[variant] {...}` (the
first chunk's seconds, the median chunk's ms per step) as soon as it is done, so a run stopped at a time limit
keeps the variants it finished; the formulations of issue 22 step 3 (scan unroll, convolutions as GEMMs,
bfloat16) side by side on one device. A variant named KIND/name times that kind instead of --kind. A first
`[schedule] {...}` line gives the preset's step counts of a whole run (benchmarks/run.py's schedule_counts).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def covered(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def trace_summary(events: list[dict], window: str) -> dict:
    """Perfetto/Chrome trace events -> {"window_us", "threads": [{process, thread, events, busy_fraction}]}: the
    window is the complete ("X") event named `window` (a jax.profiler.TraceAnnotation); per thread with events in
    it, their number and the fraction of the window they cover, busiest first."""
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    marks = [e for e in events if e.get("ph") == "X" and e.get("name") == window]
    if not marks:
        raise ValueError(f"no event named {window!r} in the trace")
    begin = float(marks[0]["ts"])
    end = begin + float(marks[0]["dur"])
    spans: dict[tuple, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("ph") == "X" and e is not marks[0]:
            start, stop = max(float(e["ts"]), begin), min(float(e["ts"]) + float(e.get("dur", 0)), end)
            if stop > start:
                spans.setdefault((e["pid"], e.get("tid")), []).append((start, stop))
    rows = [{"process": processes.get(pid, str(pid)), "thread": threads.get((pid, tid), str(tid)), "events": len(v),
             "busy_fraction": round(covered(v) / max(end - begin, 1e-9), 4)} for (pid, tid), v in spans.items()]
    return {"window_us": round(end - begin, 1), "threads": sorted(rows, key=lambda r: -r["busy_fraction"])}


POLICY_UPDATES = 8  # the policy kind's "chunk"


def setup(args, overrides: list[str]):
    """(config, chunk(state) -> state, a state, steps per chunk) at the preset's sizes with `overrides`, on random
    frames and indices: kinds dynamics / vqvae, the loop's world_model_chunk (benchmarks/run.py's slot_chunk;
    state: the world); policy, POLICY_UPDATES of programs.policy_update (state: the agent)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from dlwm_jax import config as config_lib
    from dlwm_jax import envs
    from dlwm_jax import world_model as wm
    from dlwm_jax.programs import compile_programs
    from dlwm_jax.seed_axis import stack
    from run import kind_period, slot_chunk

    config = config_lib.resolve_compute(config_lib.override(config_lib.get_preset(args.preset),
                                                            dict(item.split("=", 1) for item in overrides)))
    num_actions, S, pool = envs.num_actions(envs.check_game(args.game)), args.num_seeds, 4_096
    rng = np.random.default_rng(0)
    programs = compile_programs(config, num_actions, S, None)
    world = stack([wm.init_world_model(config, num_actions, jax.random.key(0))] * S)
    frames = jnp.asarray(rng.integers(0, 256, (S, pool, config.env.image_size, config.env.image_size), np.uint8))
    keys = jnp.stack([jax.random.key(1)] * S)
    if args.kind == "policy":  # POLICY_UPDATES PPO updates, each a dream and an update (programs.policy_update)
        from dlwm_jax.programs import initial_state
        agent = stack([initial_state(config, num_actions, 0)[1]] * S)
        starts = jnp.asarray(rng.integers(0, pool, (S, config.policy.num_envs, config.env.frame_stack)), jnp.int32)

        def updates(agent):
            for _ in range(POLICY_UPDATES):
                agent, metrics = programs.policy_update(world, agent, frames, starts, keys)
            return jax.block_until_ready(agent)
        return config, updates, agent, POLICY_UPDATES
    period = kind_period(args.kind)
    n = programs.chunk_slots(period)
    slots, shared = slot_chunk(config, num_actions, S, args.kind, n, pool, rng)

    def chunk(world):
        world, vq, dyn = programs.world_model_chunk(world, frames, slots, shared, keys, jnp.float32(1.0), period)
        return jax.block_until_ready((world, vq, dyn))[0]
    return config, chunk, world, n


def time_variant(args, item: str) -> dict:
    """One --variant NAME:overrides: compile + warm chunks, then the median of args.repeats timed chunks."""
    import statistics
    name, _, extra = item.partition(":")
    kind = name.split("/")[0] if "/" in name else args.kind
    overrides = [*args.set, *(o for o in extra.split(",") if o)]
    args = argparse.Namespace(**{**vars(args), "kind": kind})
    _, chunk, state, chunk_slots = setup(args, overrides)
    start = time.perf_counter()
    state = chunk(state)
    first_s = time.perf_counter() - start
    state = chunk(state)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        state = chunk(state)
        times.append(time.perf_counter() - start)
    figure = {"variant": name, "kind": kind, "overrides": overrides, "chunk_slots": chunk_slots, "first_chunk_s": round(first_s, 2),
              "ms_per_step": round(statistics.median(times) * 1e3 / chunk_slots, 3)}
    print(f"[variant] {json.dumps(figure)}", flush=True)
    return figure


def _device() -> dict:
    import jax
    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--kind", choices=("dynamics", "vqvae", "policy"), default="dynamics")
    parser.add_argument("--set", action="append", default=[], help="config override section.field=value")
    parser.add_argument("--num-seeds", type=int, default=1)
    parser.add_argument("--game", default="BankHeist")
    parser.add_argument("--out", default=None, help="folder for the trace (default: a temporary one)")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:overrides (comma-separated), NAME = [KIND/]name; untraced")
    parser.add_argument("--repeats", type=int, default=3, help="timed chunks per variant")
    args = parser.parse_args()
    if args.variant:
        from dlwm_jax import config as config_lib
        from run import schedule_counts
        counts = schedule_counts(config_lib.get_preset(args.preset))  # what the ms per step multiply in a run
        print(f"[schedule] {json.dumps({'preset': args.preset, **counts})}", flush=True)
        print(json.dumps({"kind": args.kind, "variants": [time_variant(args, item) for item in args.variant],
                          "preset": args.preset, "overrides": args.set, "schedule_counts": counts, **_device()}))
        return

    import jax
    _, chunk, state, chunk_slots = setup(args, args.set)
    start = time.perf_counter()
    state = chunk(state)
    first_s = time.perf_counter() - start
    out = args.out or tempfile.mkdtemp(prefix="dlwm_profile_")
    with jax.profiler.trace(out, create_perfetto_trace=True):
        with jax.profiler.TraceAnnotation("world_model_chunk"):
            start = time.perf_counter()
            state = chunk(state)
            traced_s = time.perf_counter() - start
    path = sorted(glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    summary = trace_summary(trace["traceEvents"] if isinstance(trace, dict) else trace, "world_model_chunk")
    print(json.dumps({"kind": args.kind, "chunk_slots": chunk_slots, "num_seeds": args.num_seeds,
                      "first_chunk_s": round(first_s, 2), "traced_chunk_ms": round(traced_s * 1e3, 2),
                      "ms_per_step": round(traced_s * 1e3 / chunk_slots, 3), **summary, "trace": path,
                      "preset": args.preset, "overrides": args.set, **_device()}))


if __name__ == "__main__":
    main()
