"""What the loop's programs launch on an NVIDIA GPU, counted on any host (no GPU needed): one JSON object on stdout.

    make kernels                       # installs jax's CUDA plugin into .cuda-aot/ (~180 MB download), runs this
    python benchmarks/kernels.py [--preset paper] [--target benchmarks/device/h100.pbtxt] [--graphs]
                                 [--variant NAME:section.field=value,... ...] [--programs world_model_chunk,...]
                                 [--by-op] [--by-source] [--scheduling CONCURRENT] [--ahead WORKERS]
                                 [--num-seeds N]

XLA's GPU compiler compiles the loop's programs (programs.lower_ahead, one seed or --num-seeds vmapped ones,
compute.target=accelerator) ahead of time for the GPU that --target describes, here on the host's CPU
("deviceless" compilation: jax's CUDA plugin without a GPU or a driver). Each compilation dumps the thunk sequence
the GPU runtime would execute, after XLA's thunk passes (command buffers formed), and this counts what one call
executes:

* `launches`: operations the host issues one by one: kernels, copies, cuDNN convolutions, GEMMs outside a command
  buffer, plus one per command buffer (CUDA graph) executed. Latency-bound programs (issue 22: the chip <1% busy)
  cost about launches x a few microseconds.
* `in_graphs`: the operations inside those command buffers (one launch each time for all of them).
* `critical_path`: the longest chain of operations one call runs one after another if, inside a command buffer,
  each waits only for the operations whose results it reads (XLA's
  `xla_gpu_command_buffer_scheduling_mode=CONCURRENT`; the default, LHS, runs a buffer's operations in one order);
  launches outside command buffers count one each. Against `in_graphs + launches` it bounds what running
  independent small kernels side by side could save in a latency-bound program. `critical_path_by_kind` (and with
  --by-op / --by-source, `critical_path_by_op` / `_by_source`): the operations on that chain.
* `loop_iterations`: iterations of while loops outside command buffers (the host runs each: its condition kernel,
  then the body; XLA's trip counts from the optimized HLO), `conditionals`: conditionals run by the host (their
  predicate is read back to the host first).
* `--ahead N`: no counts; when each program is ready if compiled as the loop compiles them ahead, N at a time.
* `--by-op`: by XLA's fusion name too (`input_reduce_fusion`, `gemm_fusion_dot`, ...); `--by-source`: and by the
  JAX operation and Flax module each comes from (`transpose(jvp())/Dynamics.recur/cell2/...`: a backward operation
  of the dynamics' second cell), XLA's op_name metadata (a fusion carries one of its parts' names).
* `launches_by_kind`, `in_graphs_by_kind`: the same by thunk kind (kCustomKernel: a kernel XLA generated;
  kConvolution: a cuDNN convolution (none was inside a command buffer here); kCopy; kGemm; kDynamicSliceFusion: a
  kernel on a slice of a buffer; ...).

The world-model chunk (about compute.epoch_chunk slots in one scan, programs.make_world_model_chunk) is a program
per slots.Period: `world_model_chunk/warmup` (a VQ-VAE step a slot), `world_model_chunk/joint_every_k` (a dynamics
step a slot, a VQ-VAE step every k-th); counted per call and per slot (the call's counts / its slots). The PPO
update is `dream` (encode 16 starts, imagine 50 steps) then `ppo_update`.

What it cannot show: times (no device), autotuning choices (none without a device: XLA's defaults), and whether the
device's driver lets XLA capture loops and conditionals in CUDA graphs (`--graphs` asks for it, but the
deviceless compiler keeps while loops out of command buffers even in a trivial program). The target file is XLA's
GpuTargetConfigProto of an H100 80GB; the counts come from this jaxlib's XLA, which may differ from the device's.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TARGET = os.path.join(HERE, "device", "h100.pbtxt")
GRAPHS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"  # device_check.py's formulations_graphs
# The accelerator preset, and the XLA convolutions in rolled scans (the preset before 2026-12-06; device_check.py's
# "xla" formulations).
XLA_CONVOLUTIONS = ("compute.dynamics_unroll=1,compute.lstm_conv=xla,compute.imagination_unroll=1,"
                    "compute.dream_lstm_conv=xla,compute.policy_conv=xla,compute.ppo_unroll=false,"
                    "compute.vqvae_conv=xla,"
                    "compute.upsample=transpose,compute.layer_norm=flax,compute.batch_norm=two_pass")
VARIANTS = ("preset:", f"xla:{XLA_CONVOLUTIONS}")


# ------------------------------------------------------------------------------------- the thunk sequence

class Thunk:
    """One line of XLA's thunk-sequence dump: its id, kind, name, and child sequences by section (a command
    buffer's or dynamic-slice fusion's "" children, a while's "condition" / "body", a conditional's branches)."""

    def __init__(self, indent: int, ident: int, kind: str, name: str):
        self.indent, self.id, self.kind, self.name = indent, ident, kind, name
        self.sections: dict[str, list[Thunk]] = {}
        self.section = ""
        self.source = ""  # with --by-source: where in the program the operation comes from (op_sources)
        self.instruction = ""  # the HLO instruction it runs (thunk_annotations; kernels XLA deduplicated share names)

    def children(self, section: str = "") -> list["Thunk"]:
        return self.sections.get(section, [])

    def __repr__(self) -> str:
        return f"Thunk({self.id}, {self.kind}, {self.name!r}, {list(self.sections)})"


_LINE = re.compile(r"^( *)(\d+): (k\w+)\s+\[[^\]]*\]\s*(\S*)")
_SECTION = re.compile(r"^( *)(condition|body|\w*branch\w*):\s*$")


def parse_thunks(text: str) -> list[Thunk]:
    """A `*.thunk_sequence_after_thunk_passes.txt` dump -> its top-level thunks (a tree by indentation)."""
    top: list[Thunk] = []
    stack: list[Thunk] = []
    last: Thunk | None = None
    for line in text.splitlines():
        section = _SECTION.match(line)
        if section:
            indent, name = len(section.group(1)), section.group(2)
            if name == "condition":  # printed unindented, right after its while
                owner = last
            else:
                while stack and stack[-1].indent >= indent:
                    stack.pop()
                owner = stack[-1] if stack else None
            if owner is None:
                raise ValueError(f"section {name!r} with no thunk to own it")
            owner.section = name
            owner.sections.setdefault(name, [])
            continue
        m = _LINE.match(line)
        if not m:
            continue
        thunk = Thunk(len(m.group(1)), int(m.group(2)), m.group(3), m.group(4))
        while stack and stack[-1].indent >= thunk.indent:
            stack.pop()
        (stack[-1].sections.setdefault(stack[-1].section, []) if stack else top).append(thunk)
        stack.append(thunk)
        last = thunk
    return top


def trip_counts(hlo: str, metadata: str) -> dict[int, int]:
    """thunk id -> known trip count of its while loop: the optimized HLO's `known_trip_count` of the instruction
    the thunk metadata dump names (profile_annotation)."""
    trips = {}
    for m in re.finditer(r"%([\w.\-]+) = [^\n]* while\([^\n]*\"known_trip_count\":\{\"n\":\"(\d+)\"", hlo):
        trips[m.group(1)] = int(m.group(2))
    return {ident: trips[name] for ident, name in thunk_annotations(metadata).items() if name in trips}


def thunk_annotations(metadata: str) -> dict[int, str]:
    """thunk id -> the HLO instruction it runs (its profile_annotation in the thunk metadata dump)."""
    by_id = {}
    for block in metadata.split("thunk_metadata {")[1:]:
        name = re.search(r'profile_annotation: "([^"]*)"', block)
        ident = re.search(r"thunk_id: (\d+)", block)
        if name and ident:
            by_id[int(ident.group(1))] = name.group(1)
    return by_id


Choice = Callable[[Thunk], int]  # a conditional -> the index of the branch it runs


def larger_branch(cond: Thunk) -> int:
    branches = list(cond.sections.values())
    return max(range(len(branches)), key=lambda i: size(branches[i]))


def size(thunks: list[Thunk]) -> int:
    return sum(1 + sum(size(c) for c in t.sections.values()) for t in thunks)


def count(thunks: list[Thunk], trips: dict[int, int], choose: Choice = larger_branch,
          in_graph: bool = False) -> collections.Counter:
    """What running `thunks` once executes (the module docstring's keys); `choose` picks each conditional's branch."""
    c: collections.Counter = collections.Counter()
    for t in thunks:
        if t.kind == "kCommandBuffer":
            if not in_graph:
                c["launches"] += 1
                c["graphs"] += 1
            c += count(t.children(), trips, choose, True)
        elif t.kind == "kWhile":
            if t.id not in trips:
                raise ValueError(f"while thunk {t.id} has no known trip count")
            once = count(t.children("condition"), trips, choose, in_graph) + count(t.children("body"), trips, choose,
                                                                                    in_graph)
            for key, value in once.items():
                c[key] += trips[t.id] * value
            c["loop_iterations" if not in_graph else "loop_iterations_in_graphs"] += trips[t.id]
        elif t.kind == "kConditional":
            c["conditionals" if not in_graph else "conditionals_in_graphs"] += 1
            c += count(list(t.sections.values())[choose(t)], trips, choose, in_graph)
        elif t.kind == "kSequential":
            c += count(t.children(), trips, choose, in_graph)
        else:  # one operation (a dynamic-slice fusion runs its embedded thunk with sliced buffers: one operation)
            c += _tally("in_graphs" if in_graph else "launches", t)
    return c


def _tally(group: str, t: Thunk) -> collections.Counter:
    """One operation under `group` ("launches", "in_graphs", "critical_path"): its total, and by kind, name and
    source."""
    c = collections.Counter({group: 1, f"{group}_by_kind.{t.kind}": 1, f"{group}_by_op.{op_name(t)}": 1})
    if t.source:
        c[f"{group}_by_source.{t.source}"] = 1
    return c


def hlo_operands(hlo: str) -> dict[str, tuple[str, list[str]]]:
    """Optimized HLO -> {instruction name: (opcode, operand names)} over all its computations (names are unique in
    a module)."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", hlo, re.M):
        rest = m.group(2)
        if rest.startswith("("):  # a tuple shape: skip it
            rest = rest[_closing(rest[1:]) + 2:]
        call = re.match(r"\s*\S*\s+([\w\-]+)\((.*)", rest)
        if call:
            args = call.group(2)
            out[m.group(1)] = (call.group(1), re.findall(r"%([\w.\-]+)", args[:_closing(args)]))
    return out


def _closing(text: str) -> int:
    """The index in `text` of the parenthesis that closes one opened just before it (len(text) if none)."""
    depth = 1
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i
    return len(text)


_PASS_THROUGH = {"bitcast", "get-tuple-element", "tuple", "parameter", "constant", "iota"}


def critical_path(thunks: list[Thunk], trips: dict[int, int], operands: dict[str, tuple[str, list[str]]],
                  choose: Choice = larger_branch) -> collections.Counter:
    """The longest chain of dependent operations that running `thunks` once executes ("critical_path"), and its
    operations by kind, name and source as count() has them ("critical_path_by_op.input_reduce_fusion", ...):
    launches one after another (one stream), and inside a command buffer (a CUDA graph) each operation after the
    operations of the same buffer whose results it reads (its HLO operands, through bitcasts and tuples). A graph
    whose nodes depend only on what they read (xla_gpu_command_buffer_scheduling_mode=CONCURRENT) can run at best
    this many operations one after another; in_graphs + launches is what a serialised one runs. An operation not
    found in the HLO waits for every earlier one of its buffer."""
    c: collections.Counter = collections.Counter()
    for t in thunks:
        if t.kind == "kCommandBuffer":
            for op in _graph_chain(t.children(), operands):
                c += _tally("critical_path", op)
        elif t.kind == "kWhile":
            once = (critical_path(t.children("condition"), trips, operands, choose)
                    + critical_path(t.children("body"), trips, operands, choose))
            for key, value in once.items():
                c[key] += trips[t.id] * value
        elif t.kind == "kConditional":
            c += critical_path(list(t.sections.values())[choose(t)], trips, operands, choose)
        elif t.kind == "kSequential":
            c += critical_path(t.children(), trips, operands, choose)
        else:
            c += _tally("critical_path", t)
    return c


def _graph_chain(thunks: list[Thunk], operands: dict[str, tuple[str, list[str]]]) -> list[Thunk]:
    """A longest chain of a command buffer's operations, each reading the one before it (critical_path)."""
    by_name = {_hlo_name(t, operands): t for t in thunks}
    depth: dict[str, int] = {}
    before: dict[str, str | None] = {}  # the operation each waits for last on the chain
    last: str | None = None  # the deepest so far: where an operation without known operands waits

    def producers(name: str, seen: set) -> set:  # the buffer's operations whose results `name` reads
        if name in seen:
            return set()
        seen.add(name)
        found = set()
        for a in operands.get(name, ("", []))[1]:
            if a in by_name:
                found.add(a)
            elif operands.get(a, ("",))[0] in _PASS_THROUGH:
                found |= producers(a, seen)
        return found

    for t in thunks:  # in execution order, a topological order of the dependencies
        name = _hlo_name(t, operands)
        if name not in operands or t.sections:
            previous = last
        else:
            previous = max((p for p in producers(name, set()) if p in depth), key=depth.__getitem__, default=None)
        depth[name], before[name] = 1 + (depth[previous] if previous else 0), previous
        if last is None or depth[name] > depth[last]:
            last = name
    chain = []
    while last is not None:
        chain.append(by_name[last])
        last = before[last]
    return chain[::-1]


def _hlo_name(thunk: Thunk, instructions: dict) -> str:
    """The HLO instruction a thunk runs: its annotation, else from its name as `instructions` (a dict by instruction
    name) has it (input_reduce_fusion_70 -> input_reduce_fusion.70)."""
    if thunk.instruction:
        return thunk.instruction
    return thunk.name if thunk.name in instructions else re.sub(r"_(\d+)$", r".\1", thunk.name)


def op_name(thunk: Thunk) -> str:
    """What an operation is, from its thunk's name without XLA's numbering: input_reduce_fusion_70 ->
    input_reduce_fusion (a reduction), gemm_fusion_dot_general.144 -> gemm_fusion_dot_general; the kind if unnamed."""
    m = re.match(r"[A-Za-z_]*[A-Za-z]", thunk.name)
    return m.group(0) if m else thunk.kind


def op_sources(hlo: str) -> dict[str, str]:
    """Optimized HLO -> {instruction name: its op_name metadata without the jit, while and closed_call frames}:
    the JAX operation (and Flax module path) XLA named the instruction after; a fusion carries one of its parts'
    (jvp(): forward under a gradient, transpose(jvp()): backward)."""
    frames = re.compile(r"^jit\([^)]*\)/|while/(?:body|cond)/|closed_call/")
    return {m.group(1): frames.sub("", m.group(2)) or "?"
            for m in re.finditer(r'^\s*%([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo, re.M)}


def summary(counter: collections.Counter, by_op: bool = False) -> dict[str, Any]:
    """The counts as JSON: the totals, then launches_by_kind, in_graphs_by_kind and critical_path_by_kind (and with
    `by_op`, *_by_op: by op_name; with sources read (--by-source), *_by_source)."""
    out: dict[str, Any] = {key: 0 for key in ("launches", "graphs", "in_graphs", "loop_iterations", "conditionals")}
    for key, value in sorted(counter.items()):
        group, by, name = key.partition("_by_")
        if not by:
            out[key] = value
        elif by_op or name.startswith("kind."):
            what, _, name = name.partition(".")
            out.setdefault(f"{group}_by_{what}", {})[name] = value
    return out


def _walk(thunks: list[Thunk]):
    for t in thunks:
        yield t
        for children in t.sections.values():
            yield from _walk(children)


def read_dump(directory: str, sources: bool = False) -> tuple[list[Thunk], dict[int, int], dict]:
    """The thunks, while trip counts and HLO operands (hlo_operands) of the one module compiled into `directory`
    (XLA's --xla_dump_to); with `sources`, each operation's `source` (op_sources of its instruction, _hlo_name)."""
    def one(pattern: str) -> str:
        paths = glob.glob(os.path.join(directory, pattern))
        if len(paths) != 1:
            raise ValueError(f"expected one {pattern} in {directory}, found {len(paths)}")
        with open(paths[0]) as f:
            return f.read()
    hlo = one("*gpu_after_optimizations.txt")
    # Without command buffers (xla_gpu_enable_command_buffer empty) XLA runs no thunk passes and dumps no such file.
    passes = glob.glob(os.path.join(directory, "*.thunk_sequence_after_thunk_passes.txt"))
    sequence = one("*.thunk_sequence_after_thunk_passes.txt" if passes else "*.thunk_sequence.txt")
    thunks = parse_thunks(sequence)
    metadata = one("*.thunk_metadata.txt")
    annotations = thunk_annotations(metadata)
    for t in _walk(thunks):
        t.instruction = annotations.get(t.id, "")
    if sources:
        names = op_sources(hlo)
        for t in _walk(thunks):
            t.source = names.get(_hlo_name(t, names), "")
    return thunks, trip_counts(hlo, metadata), hlo_operands(hlo)


# ------------------------------------------------------------------------------------------ compilation

def gpu_topology(target: str):
    """A one-device topology of the GPU that `target` (a GpuTargetConfigProto in text) describes, without a GPU."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver to check the CUDA versions with
    import jax
    from jax.experimental import topologies
    with open(target) as f:
        config = f.read()
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1")
    except (NotImplementedError, RuntimeError) as e:
        raise SystemExit(f"kernels.py: jax's CUDA plugin is not installed or failed to load ({e}); run `make kernels`")
    mesh = topologies.make_mesh(topology, (1,), ("gpu",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def lowered_programs(preset: str, overrides: list[str], placement, game: str = "BankHeist",
                     num_seeds: int = 1) -> tuple[Any, dict]:
    """(config, {name: jax.stages.Lowered}) of the loop's programs for `num_seeds` vmapped seeds at the preset's
    sizes, for arguments placed on `placement` (the GPU topology's device)."""
    import jax
    import jax.numpy as jnp
    from dlwm_jax import config as config_lib
    from dlwm_jax import envs
    from dlwm_jax import world_model as wm
    from dlwm_jax.programs import compile_programs, initial_state, lower_ahead

    config = config_lib.override(config_lib.get_preset(preset), dict(item.split("=", 1) for item in
                                                                     ["compute.target=accelerator", *overrides]))
    config = config_lib.resolve_compute(config, "gpu")
    num_actions = envs.num_actions(envs.check_game(game))
    on_gpu = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), tree)
    over_seeds = lambda x: jnp.broadcast_to(x[None], (num_seeds, *x.shape))
    per_seed = lambda fn: on_gpu(jax.eval_shape(lambda: jax.tree.map(over_seeds, fn())))
    world = per_seed(lambda: wm.init_world_model(config, num_actions, jax.random.key(0)))
    agent = per_seed(lambda: initial_state(config, num_actions, 0)[1])
    image = config.env.image_size
    frames = jax.ShapeDtypeStruct((num_seeds, config.total_real_steps, image, image), jnp.uint8, sharding=placement)
    keys = per_seed(lambda: jax.random.key(0))
    programs = compile_programs(config, num_actions, num_seeds, None)
    return config, lower_ahead(programs, config, world, agent, frames, keys, lambda tree: tree)


def variant_counts(args, name: str, overrides: list[str], placement) -> dict[str, Any]:
    """One variant: compile each selected program into its own dump folder and count it (a program XLA fails to
    compile: its error's first line, under "error")."""
    import jax
    from dlwm_jax.programs import epoch_periods
    config, lowered = lowered_programs(args.preset, overrides, placement, args.game, args.num_seeds)
    options = {"xla_gpu_enable_command_buffer": GRAPHS} if args.graphs else {}
    if args.scheduling:
        options["xla_gpu_command_buffer_scheduling_mode"] = args.scheduling
    out: dict[str, Any] = {"variant": name, "overrides": overrides, "compute": config.compute.__dict__, "programs": {}}
    for program, stage in lowered.items():
        if args.programs and program not in args.programs:
            continue
        with tempfile.TemporaryDirectory(prefix="dlwm_kernels_") as directory:
            start = time.perf_counter()
            try:
                stage.lowered.compile(compiler_options={**options, "xla_dump_to": directory})
            except jax.errors.JaxRuntimeError as e:  # XLA's GPU compiler refused it: recorded, the others go on
                out["programs"][program] = {"error": str(e).splitlines()[0][:400]}
                print(f"[kernels] {name} {program}: FAILED {out['programs'][program]['error']}", file=sys.stderr,
                      flush=True)
                continue
            compile_s = time.perf_counter() - start
            thunks, trips, operands = read_dump(directory, args.by_source)
        if program.startswith("world_model_chunk/"):  # a chunk of one repeated slots.Period: per call, per slot
            period = epoch_periods(config)[program.partition("/")[2]]
            counts = count(thunks, trips) + critical_path(thunks, trips, operands)
            per_call, n = summary(counts, args.by_op), period.slots(config.compute.epoch_chunk)
            figures = {"per_slot": {k: round(v / n, 2) for k, v in per_call.items() if not isinstance(v, dict)},
                       "per_call": per_call, "slots_per_call": n}
        else:
            figures = summary(count(thunks, trips) + critical_path(thunks, trips, operands), args.by_op)
        out["programs"][program] = {**figures, "compile_s": round(compile_s, 1)}
        print(f"[kernels] {name} {program}: {json.dumps(out['programs'][program])}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--game", default="BankHeist")
    parser.add_argument("--num-seeds", type=int, default=1,
                        help="the programs of N vmapped seeds on the one GPU (train.py --num_seeds)")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="GpuTargetConfigProto (text) of the GPU")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:overrides (comma-separated); default: " + " ".join(VARIANTS))
    parser.add_argument("--programs", default="", help="comma-separated program names (default: all)")
    parser.add_argument("--by-op", action="store_true",
                        help="count the operations by name too (launches_by_op, in_graphs_by_op: input_reduce_fusion, "
                             "gemm_fusion_dot, ...)")
    parser.add_argument("--graphs", action="store_true",
                        help=f"ask XLA for command buffers of {GRAPHS} (device_check's formulations_graphs)")
    parser.add_argument("--by-source", action="store_true",
                        help="and by where in the program each operation comes from (launches_by_source, "
                             "in_graphs_by_source: jvp()/Dynamics.recur/cell1/..., from XLA's op_name metadata)")
    parser.add_argument("--scheduling", choices=("LHS", "CONCURRENT", "SERIALIZE"), default="",
                        help="XLA's xla_gpu_command_buffer_scheduling_mode (default: XLA's, LHS): CONCURRENT lets a "
                             "command buffer's operations depend only on the buffers they use")
    parser.add_argument("--ahead", type=int, default=0, metavar="WORKERS",
                        help="count nothing: compile the programs as the loop compiles them ahead (programs.compile_"
                             "lowered, WORKERS at a time, lower_ahead's order) and give the seconds until each was ready")
    args = parser.parse_args()
    args.by_op = args.by_op or args.by_source
    args.programs = [p for p in args.programs.split(",") if p]
    if not os.path.isfile(args.target):
        raise SystemExit(f"kernels.py: no target file {args.target}")
    placement = gpu_topology(args.target)
    import jax
    from dlwm_jax.results import git_commit
    variants = []
    for item in args.variant or VARIANTS:
        name, _, extra = item.partition(":")
        overrides = [o for o in extra.split(",") if o]
        if args.ahead:
            from dlwm_jax.programs import compile_lowered
            start = time.perf_counter()
            _, lowered = lowered_programs(args.preset, overrides, placement, args.game, args.num_seeds)
            lower_s = round(time.perf_counter() - start, 1)
            variants.append({"variant": name, "overrides": overrides, "workers": args.ahead, "lower_s": lower_s,
                             "ready_s": compile_lowered(lowered, args.ahead)})
            continue
        variants.append(variant_counts(args, name, overrides, placement))
    print(json.dumps({"target": placement.mesh.devices.flat[0].device_kind, "deviceless": True,
                      "jax": jax.__version__, "commit": git_commit(), "graphs": args.graphs, "preset": args.preset,
                      "num_seeds": args.num_seeds,
                      "scheduling": args.scheduling or "default",
                      "variants": variants}))
    failed = [f"{v['variant']} {p}" for v in variants for p, c in v.get("programs", {}).items() if "error" in c]
    if failed:
        raise SystemExit(f"kernels.py: XLA's GPU compiler failed on {', '.join(failed)} (the JSON above has why)")


if __name__ == "__main__":
    main()
