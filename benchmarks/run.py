"""Hot-path benchmarks of the real training code at `paper` sizes, and the projected wall time of a paper run.

Usage: python benchmarks/run.py [--json] [--repeats 5] [--game BankHeist] [--no-envs] [--set compute.lstm_conv=xla]
                                [--preset paper|short|demo] [--num-seeds N] [--only vqvae,dynamics,...]

Every figure is the median of `repeats` timed calls after one compiling call (compile time reported apart).
The functions timed are the ones train.py runs: world_model.vqvae_step (batch 40), world_model.dynamics_step
(4 windows x 11 steps, train-mode encoder pass included), imagination.imagine (16 envs x 50 steps, policy
sampling included), the policy update of train.py (encode 16 starts + imagine + ppo.ppo_update with 4 epochs),
the Collector (1 env, as in training) and raw EnvPool stepping; and the loop's host work per step for 1 and
`--host-seeds` seeds (`measure_host_loop`: the epochs' own code with the compiled programs stubbed). The
projected wall time of a whole run of the preset (`projected_run_hours`) multiplies them by the preset's step
counts (`schedule_counts`); the formula is in benchmarks/README.md. `--num-seeds N` times the programs of N
vmapped seeds and projects the run of all N; `--only` times some steps and nothing else.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np


def schedule_counts(config) -> dict[str, int]:
    """Expected step counts of a whole run of `config`'s schedule (SPEC 8.3 rules, as in SPEC 8.4's table).

    One collection chunk per iteration is one trajectory (1 env); an epoch's dynamics windows are
    floor((length - offset) / sequence_length) per trajectory, with the random offset at its mean (max_offset / 2);
    a joint epoch has ceil(windows / batch) dynamics steps and floor(D / interval) + 1 VQ-VAE steps (at most one
    pass over the frames). Paper: 241,151 dynamics and 105,708 VQ-VAE steps (SPEC 8.4: 241,096 and 105,521).
    """
    s, d, v = config.schedule, config.dynamics, config.vqvae
    chunks, dynamics, vqvae = [], 0, s.warmup_epochs * -(-s.initial_steps // v.batch_size)
    for it in range(s.num_iterations):
        chunks.append(s.initial_steps if it == 0 else s.steps_per_iteration)
        windows = sum((n - d.max_offset // 2) // d.sequence_length for n in chunks if n >= d.sequence_length)
        per_epoch = -(-windows // d.batch_size)
        dynamics += s.joint_epochs[it] * per_epoch
        vqvae += s.joint_epochs[it] * min(per_epoch // s.vq_update_intervals[it] + 1, -(-sum(chunks) // v.batch_size))
    return {"vqvae_steps": vqvae, "dynamics_steps": dynamics, "ppo_updates": sum(s.ppo_updates),
            "random_steps": s.initial_steps, "agent_steps": config.total_real_steps - s.initial_steps,
            "evaluations": s.num_iterations}


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(median seconds of `repeats` calls after the first, seconds of the first call incl. compilation)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


def _world_and_agent(config, num_actions: int):
    from dlwm_jax import world_model as wm
    from dlwm_jax.networks import make_networks
    from dlwm_jax.programs import policy_optimizer
    key_world, key_agent = jax.random.split(jax.random.key(0))
    world = wm.init_world_model(config, num_actions, key_world)
    networks = make_networks(config, num_actions)
    params = jax.jit(networks.actor_critic.init)(key_agent, jnp.zeros((1, 6, 6, config.vqvae.code_dim)))
    optimizer = policy_optimizer(world.config)  # the world model's config: resolved
    return world, networks, params, optimizer, optimizer.init(params)


def _report(name: str, ms: float, compile_s: float) -> None:
    """One line per figure as it is measured (stderr), so a run stopped part-way still leaves what it timed."""
    print(f"[bench] {name} {ms:.3f} ms (first call {compile_s:.1f} s)", file=sys.stderr, flush=True)


STEPS = ("vqvae", "dynamics", "imagination", "ppo", "act")  # --only


def measure_training_steps(config, num_actions: int, repeats: int, num_seeds: int = 1,
                           only: tuple[str, ...] = STEPS) -> dict:
    """Medians (ms) of the hot paths in `only` as the training loop compiles them (programs.compile_programs for
    `num_seeds` seeds: one step does every seed's work), plus their first-call (compile) seconds."""
    from dlwm_jax import world_model as wm
    from dlwm_jax.imagination import imagine
    from dlwm_jax.programs import AgentState, compile_programs
    from dlwm_jax.seed_axis import stack
    rng = np.random.default_rng(0)
    world, networks, params, optimizer, opt_state = _world_and_agent(config, num_actions)
    programs = compile_programs(config, num_actions, num_seeds, None)
    seed_axis = lambda tree: stack([tree] * num_seeds)  # the loop's arguments carry a seed axis
    worlds = seed_axis(world)
    frame = (config.env.image_size, config.env.image_size, config.env.frame_stack)
    v, d, p = config.vqvae, config.dynamics, config.policy
    out, compile_s = {}, {}

    def measure(name: str, fn, reps: int, label: str | None = None, per_call: int = 1) -> float:
        t, c = _timed(fn, reps)
        t /= per_call
        out[f"{name}_ms"], compile_s[name] = t * 1e3, c
        _report(label or name, t * 1e3, c)
        return t

    # The world model's steps as the loop runs them: a chunk of programs.chunk_slots slots (programs.world_model_chunk:
    # one scanned program, or a program per step on the CPU), batches gathered from frames on the device.
    pool = 4_096
    frames = seed_axis(jax.device_put(rng.integers(0, 256, (pool, *frame[:2]), dtype=np.uint8)))
    key = jax.random.key(1)
    keys = seed_axis(key)

    state = [worlds]

    def world_model_chunk(slots, shared, period):  # threads the world through: the scanned program donates it
        state[0], vq_sums, dyn_sums = programs.world_model_chunk(state[0], frames, slots, shared, keys, jnp.float32(1.0),
                                                                 period)
        return state[0], vq_sums, dyn_sums
    for kind in ("vqvae", "dynamics"):
        if kind in only:
            period = kind_period(kind)
            n = programs.chunk_slots(period)
            slots, shared = slot_chunk(config, num_actions, num_seeds, kind, n, pool, rng)
            measure(f"{kind}_step", lambda: world_model_chunk(slots, shared, period), repeats,
                    f"{kind}_step (per step of a {n}-slot chunk)", per_call=n)
    worlds = state[0]  # the scanned chunk donates its world: go on with the last one

    start_obs = jax.device_put(rng.integers(0, 256, (p.num_envs, *frame), dtype=np.uint8))
    if "imagination" in only:
        start_indices, _ = jax.jit(wm.encode)(world, start_obs)
        dream_fn = jax.jit(lambda params, key: imagine(
            networks.dream_dynamics, networks.actor_critic, {"params": world.dynamics_params}, params,
            world.codebook.embeddings, start_indices, key, p.horizon, p.bootstrap_at_horizon,
            unroll=config.compute.imagination_unroll))
        t = measure("imagination_rollout", lambda: dream_fn(params, key).actions, repeats,
                    "imagination_rollout (one seed)")
        out["simulated_steps_per_s"] = p.num_envs * p.horizon / t

    agents = seed_axis(AgentState(params, opt_state))
    start_stacks = seed_axis(rng.integers(0, pool, (p.num_envs, frame[2])).astype(np.int32))
    if "ppo" in only:
        measure("ppo_update", lambda: programs.policy_update(worlds, agents, frames, start_stacks, keys)[1],
                max(3, repeats // 2))

    for n in (1, config.env.num_eval_envs) if "act" in only else ():
        stacks = jax.device_put(rng.integers(0, 256, (num_seeds, n, *frame), dtype=np.uint8))
        newest = rng.integers(0, 256, (num_seeds, n, *frame[:2]), dtype=np.uint8)  # from the host, as EnvPool's
        measure(f"act_batch{n}", lambda: programs.act_collect(worlds, agents.params, stacks, newest,
                                                              np.zeros((num_seeds, n), bool), keys)[1], repeats * 4)
    out["compile_s"] = compile_s
    return out


def kind_period(kind: str):
    """The slots.Period a chunk of slot_chunk's `kind` repeats: a VQ-VAE step a slot, or a dynamics step a slot."""
    from dlwm_jax.slots import Period
    return Period(1, False) if kind == "vqvae" else Period(0, True)


def slot_chunk(config, num_actions: int, num_seeds: int, kind: str, n: int, pool: int, rng) -> tuple:
    """(Slots [S, n], SharedSlots [n]) of n slots that each take one `kind` step ("vqvae" or "dynamics") on random
    frame indices below `pool`, random actions, rewards and terminals (slots.py; kind_period(kind) runs them)."""
    from dlwm_jax.slots import SharedSlots, Slots
    v, d, C, T = config.vqvae, config.dynamics, config.env.frame_stack, config.dynamics.sequence_length
    on = np.full((num_seeds, n), True)
    index = lambda *shape: rng.integers(0, pool, (num_seeds, n, *shape)).astype(np.int32)
    vq, dyn = (on if kind == "vqvae" else ~on), (on if kind == "dynamics" else ~on)
    slots = Slots(vq, index(v.batch_size, C), np.ones((num_seeds, n, v.batch_size), bool), dyn,
                  index(T, d.batch_size, C), rng.integers(0, num_actions, (num_seeds, n, T, d.batch_size)).astype(np.int32),
                  rng.choice([-1.0, 0.0, 1.0], (num_seeds, n, T, d.batch_size)).astype(np.float32),
                  rng.random((num_seeds, n, T, d.batch_size)) < 0.05, np.ones((num_seeds, n, d.batch_size), bool))
    return slots, SharedSlots(np.arange(n, dtype=np.int32), vq[0], dyn[0])


def random_replays(config, num_seeds: int, frames: int = 12_800) -> list:
    """One Replay per seed of `frames` random frames (one trajectory, episodes of ~500 steps)."""
    from dlwm_jax.replay import Replay
    rng, size, replays = np.random.default_rng(0), config.env.image_size, []
    for _ in range(num_seeds):
        replay = Replay(frames, 1, (size, size), config.env.frame_stack)
        terminals = rng.random((1, frames)) < 0.002
        replay.add(rng.integers(0, 256, (1, frames, size, size), dtype=np.uint8),
                   rng.integers(0, 4, (1, frames)).astype(np.int32), np.zeros((1, frames), np.float32), terminals,
                   np.concatenate([[[True]], terminals[:, :-1]], 1))
        replays.append(replay)
    return replays


def stub_run(config, replays: list, work=jax.device_put):
    """A run_state.Run over `replays` (one per seed) whose compiled programs are stubs: each calls `work` on its
    inputs and hands its state through unchanged with constant metrics; loggers and checkpoints do nothing.
    The loop's epoch code (epochs.warmup_epoch, epochs.joint_epoch, phases.policy) runs on it as in training."""
    from dlwm_jax.programs import Programs
    from dlwm_jax.run_state import Run
    S, metrics = len(replays), {"loss": jnp.zeros(len(replays))}
    step = lambda state, *inputs: (work(inputs), state, metrics)[1:]
    sums = {"loss": jnp.zeros(S), "steps": jnp.ones(S)}

    def world_model_chunk(world, frames, slots, shared, steps_keys, lr_scale, period):
        work((slots, steps_keys))
        return world, [sums], [sums]
    programs = Programs(chunk_slots=lambda period: 2, world_model_chunk=world_model_chunk,
                        policy_update=lambda world, agent, frames, starts, keys: step(agent, starts, keys),
                        act_collect=None, act_eval=None, random_act=None, diagnostics=None)

    class Quiet:  # loggers
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    world = types.SimpleNamespace(config=config)  # all that the epochs read of a world model besides the programs
    return Run(config=config, workdir="", seeds=list(range(S)), seed_dirs=[""] * S, programs=programs,
                     networks=None, sharding=None, world=world, agent=None, replays=replays, frames=None,
                     collector=None,
                     checkpoints=None, meta={}, loggers=[Quiet()] * S, echo=print, lock=None, total_seeds=S,
                     share=(0, 1))


def measure_host_loop(config, num_seeds: int, frames: int = 12_800, updates: int = 200) -> dict:
    """Host time (ms) per step of the loop's own epoch code for `num_seeds` seeds: per VQ-VAE step of a warm-up
    epoch (epochs.warmup_epoch), per slot of a joint epoch with one VQ-VAE step (epochs.joint_epoch: D + 1 slots
    for D dynamics steps) and per policy update
    (phases.policy), on a `stub_run` whose programs only place their inputs on the device (not awaited). That is
    the work a device waits for if the loop is host-bound: drawing the batches' frame indices (replay plans),
    laying them out as slots over seeds, key derivation, transfers of the indices."""
    from dlwm_jax.epochs import joint_epoch, warmup_epoch
    from dlwm_jax.phases import policy
    from dlwm_jax.run_state import WARMUP
    run = stub_run(config, random_replays(config, num_seeds, frames))
    out, keys, steps = {}, run.keys(0, WARMUP), []
    start = time.perf_counter()
    warmup_epoch(run.programs, run.world, run.replays, run.frames, keys)
    out["vqvae"] = (time.perf_counter() - start) / run.replays[0].num_observation_batches(config.vqvae.batch_size)
    start = time.perf_counter()
    joint_epoch(run.programs, run.world, run.replays, run.frames, keys, 10**9,  # one VQ-VAE step in the epoch
                progress=lambda kind, i, m: steps.append(i + 1))
    out["dynamics"] = (time.perf_counter() - start) / steps[-1]
    run.config = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, ppo_updates=(updates,)))
    policy(run, 0, 0)  # compiles the phase's key programs
    start = time.perf_counter()
    policy(run, 0, 0)
    out["policy"] = (time.perf_counter() - start) / updates
    return {k: v * 1e3 for k, v in out.items()}


def measure_envs(game: str, collect_envs: int, eval_envs: int) -> dict:
    """Collector and raw EnvPool rates (env steps per second, all envs together) with `collect_envs` envs (one
    per seed, as in training) and `eval_envs` (every seed's evaluation envs)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import collector  # benchmarks/collector.py
    result = collector.measure(game, num_envs=tuple(sorted({collect_envs, eval_envs})), steps=1_024, repeats=3)
    by_n = result["by_num_envs"]
    return {"collect_envs": collect_envs,
            "collector_steps_per_s": by_n[str(collect_envs)]["collector_steps_per_s"],
            "raw_envpool_steps_per_s": by_n[str(collect_envs)]["raw_envpool_steps_per_s"],
            f"collector_steps_per_s_{eval_envs}_envs": by_n[str(eval_envs)]["collector_steps_per_s"],
            f"raw_envpool_steps_per_s_{eval_envs}_envs": by_n[str(eval_envs)]["raw_envpool_steps_per_s"]}


def project_hours(f: dict, counts: dict[str, int], num_eval_envs: int, eval_episode_steps: int,
                  num_seeds: int = 1) -> dict:
    """Wall time of a whole run with `counts` (schedule_counts, per seed) from the measured figures
    (benchmarks/README.md); with `num_seeds` the figures are the N-seed programs' and every seed's envs step
    together (N collection envs, N x num_eval_envs evaluation envs)."""
    n = num_seeds
    parts = {
        "vqvae": counts["vqvae_steps"] * (f["vqvae_step_ms"] + f["host_vqvae_step_ms"]) / 1e3,
        "dynamics": counts["dynamics_steps"] * (f["dynamics_step_ms"] + f["host_dynamics_step_ms"]) / 1e3,
        "policy": counts["ppo_updates"] * (f["ppo_update_ms"] + f["host_policy_update_ms"]) / 1e3,
    }
    if f.get("collector_steps_per_s"):
        per_env_step = n / f["collector_steps_per_s"]
        parts["collect"] = (counts["random_steps"] * per_env_step
                            + counts["agent_steps"] * (per_env_step + f["act_batch1_ms"] / 1e3))
        per_eval_step = (n * num_eval_envs / f[f"collector_steps_per_s_{n * num_eval_envs}_envs"]
                         + f[f"act_batch{num_eval_envs}_ms"] / 1e3)
        parts["evaluate"] = counts["evaluations"] * eval_episode_steps * per_eval_step
    hours = {k: round(v / 3600, 2) for k, v in parts.items()}
    return {"projected_run_hours": round(sum(parts.values()) / 3600, 2), "projected_hours_by_phase": hours,
            "schedule_counts": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--game", default="BankHeist")
    parser.add_argument("--preset", default="paper", help="config preset whose sizes are timed and whose whole run "
                        "is projected: paper | short | demo")
    parser.add_argument("--no-envs", action="store_true", help="skip the EnvPool figures (and collect/eval time)")
    parser.add_argument("--eval-episode-steps", type=int, default=5_000,
                        help="assumed agent steps until the last of the eval envs ends its first episode")
    parser.add_argument("--num-seeds", type=int, default=1,
                        help="time the loop's programs with this many vmapped seeds and project a run of them all")
    parser.add_argument("--only", default=None, metavar="STEP[,STEP]",
                        help=f"time only these of {', '.join(STEPS)} (no host, EnvPool or projection figures)")
    parser.add_argument("--host-seeds", type=int, default=5,
                        help="also time the loop's host work per step for this many seeds (besides 1)")
    parser.add_argument("--seeds", action="store_true",
                        help="also time 4 vmapped seeds vs 1 seed on the smoke preset (benchmarks/seeds.py; ~3 more minutes)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override, e.g. compute.lstm_conv=xla (repeatable)")
    args = parser.parse_args()

    from dlwm_jax import config as config_lib, envs
    bad = [s for s in args.set if "=" not in s]
    if bad:
        sys.exit(f"error: --set takes FIELD=VALUE, got {bad[0]!r}")
    only = STEPS if args.only is None else tuple(x.strip() for x in args.only.split(",") if x.strip())
    if not only or set(only) - set(STEPS):
        sys.exit(f"error: --only takes a comma list of {', '.join(STEPS)}, got {args.only!r}")
    if args.num_seeds < 1 or args.host_seeds < 1:
        sys.exit(f"error: --num-seeds and --host-seeds must be >= 1, got {args.num_seeds} and {args.host_seeds}")
    try:
        config = config_lib.override(config_lib.get_preset(args.preset), dict(s.split("=", 1) for s in args.set))
        config = config_lib.resolve_compute(config)  # the formulations a run on this backend gets (compute.target)
        num_actions = envs.num_actions(args.game)
    except ValueError as e:
        sys.exit(f"error: {e}")
    jax.config.update("jax_threefry_partitionable", config.compute.threefry_partitionable)
    load_start = os.getloadavg()
    start = time.perf_counter()

    n = args.num_seeds
    figures = measure_training_steps(config, num_actions, args.repeats, n, only)
    if args.only is None:  # the whole picture: host work, EnvPool and the projected run
        host = {k: measure_host_loop(config, k) for k in sorted({1, n, args.host_seeds})}
        figures.update(host_vqvae_step_ms=host[n]["vqvae"], host_dynamics_step_ms=host[n]["dynamics"],
                       host_policy_update_ms=host[n]["policy"])
        figures["host_ms_per_step_by_seeds"] = {str(k): {x: round(y, 2) for x, y in h.items()}
                                                for k, h in host.items()}
        if args.no_envs:
            figures.update({"collector_steps_per_s": None, "raw_envpool_steps_per_s": None,
                            "envs_skipped_reason": "--no-envs"})
        else:
            figures.update(measure_envs(args.game, n, n * config.env.num_eval_envs))
        figures.update(project_hours(figures, schedule_counts(config), config.env.num_eval_envs,
                                     min(args.eval_episode_steps, config.env.eval_cap), n))
    if args.seeds:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import seeds
        figures["seeds_smoke"] = seeds.measure(num_seeds=4, preset="smoke", game="Pong")
    result = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in figures.items()}
    result["compile_s"] = {k: round(v, 1) for k, v in figures["compile_s"].items()}
    result.update({
        "preset": args.preset, "game": args.game, "num_actions": num_actions, "repeats": args.repeats,
        "num_seeds": n, "only": list(only),
        "eval_episode_steps_assumed": args.eval_episode_steps, "overrides": args.set,
        "compute": {k: getattr(config.compute, k) for k in config.compute.__dataclass_fields__},
        "jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "benchmark_wall_s": round(time.perf_counter() - start, 1),
    })
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:40s} {v}")


if __name__ == "__main__":
    main()
