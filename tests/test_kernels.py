"""benchmarks/kernels.py: counting what a GPU program launches from XLA's thunk-sequence dump.

The dump below has the layout XLA 0.10's GPU compiler writes (`*.thunk_sequence_after_thunk_passes.txt`, cut down
from a real world-model chunk compiled for an H100): a command buffer, then a scan (while) whose body holds two
conditionals, the second with a nested while. Compiling for a GPU needs jax's CUDA plugin (`make kernels`), so
these tests check the reading and the counting, which need nothing but the text; the lowering the tool compiles
is the loop's own (programs.lower_ahead, exercised by every compile-ahead run).
"""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import kernels  # noqa: E402

DUMP = """\
000: kCommandBuffer [source       | next=075 (1)] 
    001: kCustomKernel [source | sink] loop_broadcast_fusion_35 grid: [1, 1, 1] threads: [64, 1, 1]  shared_memory: 0 bytes
    002: kCustomKernel [source | sink] wrapped_transpose_57 grid: [1840, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
    074: kCopy         [source | sink] kCopy
075: kWhile         [prev=000 (1) | next=000 (1)]   
condition:
    076: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
  body:
    077: kDynamicSliceFusion [source         | next=079 (1) ] params=1, results=1
        078: kCopy [source | sink] kCopy
    552: kConditional        [prev=083 (1)   | next=553 (1) ]       
      false_branch:
        085: kCustomKernel  [source        | next=086 (1) ] loop_transpose_fusion_2 grid: [2880, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
        086: kConvolution   [prev=085 (1)  | next=000 (1) ] kConvolution
        000: kCommandBuffer [prev=086 (1)  | next=094 (1) ] 
            087: kCustomKernel [source       | next=088 (1)] input_reduce_fusion_70 grid: [256, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
            088: kCustomKernel [prev=087 (1) | sink        ] input_reduce_fusion_122 grid: [1, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
      true_branch:
        000: kCommandBuffer [source | sink] 
            381: kCopy [source | sink] kCopy
            382: kCopy [source | sink] kCopy
            383: kCopy [source | sink] kCopy
    1213: kConditional        [prev=567 (1)   | next=000 (1) ]       
      false_branch:
        720: kCustomKernel [source        | sink         ] wrapped_iota grid: [1, 1, 1] threads: [10, 1, 1]  shared_memory: 0 bytes
        721: kWhile         [prev=000 (1) | next=000 (1)]           
condition:
            722: kCustomKernel [source | sink] loop_compare_fusion_1 grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
          body:
            723: kCustomKernel       [source        | next=724 (1) ] input_concatenate_fusion_4 grid: [36, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
            724: kConvolution        [prev=723 (1)  | next=725 (1) ] kConvolution
        730: kCopy [source | sink] kCopy
      true_branch:
        000: kCommandBuffer [source | sink] 
            1069: kCopy [source | sink] kCopy
            1070: kCopy [source | sink] kCopy
"""

HLO = """\
  %while.567 = (s32[], f32[32]{0}) while(%tuple.1), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"64"}}
  %while.9 = (s32[], f32[4,6,6,128]{3,2,1,0}) while(%tuple.2), condition=%c2, body=%b2, backend_config={"known_trip_count":{"n":"10"}}
  %while.567.0 = f32[32]{0} get-tuple-element(%while.567), index=1
"""

METADATA = """\
thunk_metadata {
  thunk_info {
    profile_annotation: "while.567"
    thunk_id: 75
  }
  thunk_kind: "kWhile"
}
thunk_metadata {
  thunk_info {
    profile_annotation: "while.9"
    thunk_id: 721
  }
  thunk_kind: "kWhile"
}
"""


def test_the_dump_parses_into_its_tree():
    top = kernels.parse_thunks(DUMP)
    assert [(t.id, t.kind) for t in top] == [(0, "kCommandBuffer"), (75, "kWhile")]
    assert [t.id for t in top[0].children()] == [1, 2, 74]
    scan = top[1]
    assert [t.id for t in scan.children("condition")] == [76]
    assert [t.kind for t in scan.children("body")] == ["kDynamicSliceFusion", "kConditional", "kConditional"]
    vq, dyn = scan.children("body")[1:]
    assert list(vq.sections) == ["false_branch", "true_branch"]
    assert [t.id for t in vq.sections["false_branch"]] == [85, 86, 0]
    inner = dyn.sections["false_branch"][1]
    assert inner.kind == "kWhile" and [t.id for t in inner.children("condition")] == [722]
    assert [t.id for t in inner.children("body")] == [723, 724]
    assert [t.id for t in dyn.sections["false_branch"]] == [720, 721, 730]  # after the nested while, back at its level


def test_trip_counts_map_thunks_to_the_hlo_loops():
    assert kernels.trip_counts(HLO, METADATA) == {75: 64, 721: 10}


def test_counts_follow_loops_branches_and_command_buffers():
    top, trips = kernels.parse_thunks(DUMP), {75: 64, 721: 10}
    first = lambda cond: 0  # every conditional runs its false branch (the steps, here)
    c = kernels.count(top, trips, first)
    # Per scan iteration: the condition kernel, the slice, branch 1 (kernel, conv, one graph of 2) and branch 2 (a
    # kernel, 10 x (condition, kernel, conv), a copy).
    per_iteration = 1 + 1 + (2 + 1) + (1 + 10 * 3 + 1)
    assert c["launches"] == 1 + 64 * per_iteration  # the first command buffer, then the loop
    assert c["graphs"] == 1 + 64
    assert c["in_graphs"] == 3 + 64 * 2
    assert c["loop_iterations"] == 64 + 64 * 10 and c["conditionals"] == 2 * 64
    assert c["launches_by_kind.kConvolution"] == 64 * 11
    assert c["in_graphs_by_op.input_reduce_fusion"] == 64 * 2 and c["in_graphs_by_op.kCopy"] == 1
    assert c["launches_by_op.loop_compare_fusion"] == 64 * 11  # the scan's condition, the inner loop's
    with_ops = kernels.summary(c, by_op=True)
    assert with_ops["in_graphs_by_op"]["input_reduce_fusion"] == 64 * 2 and "launches_by_op" in with_ops
    assert "in_graphs_by_op" not in kernels.summary(c) and kernels.summary(c)["in_graphs_by_kind"]["kCopy"] == 1
    skipped = kernels.count(top, trips, lambda cond: 1)
    assert skipped["launches"] == 1 + 64 * (1 + 1 + 1 + 1) and skipped["in_graphs"] == 3 + 64 * 5


def test_sources_name_each_operation_by_its_op_name_without_the_frames(tmp_path):
    hlo = """\
  %input_reduce_fusion.70 = f32[4,2,128]{2,1,0} fusion(%x), kind=kInput, calls=%fused_reduce.70, metadata={op_name="jit(single)/while/body/closed_call/jvp()/Dynamics.recur/cell1/jit(leaky_relu)/reduce_sum" stack_frame_id=3}
  %input_reduce_fusion.122 = f32[4,2]{1,0} fusion(%input_reduce_fusion.70), kind=kInput, calls=%fused_reduce.122, metadata={op_name="jit(single)/transpose(jvp())/Encoder/reduce_sum"}
  %param_0.1 = f32[4]{0} parameter(0)
"""
    sources = kernels.op_sources(hlo)
    assert sources == {"input_reduce_fusion.70": "jvp()/Dynamics.recur/cell1/jit(leaky_relu)/reduce_sum",
                       "input_reduce_fusion.122": "transpose(jvp())/Encoder/reduce_sum"}
    for name, text in (("m.sm_9.0a_gpu_after_optimizations.txt", hlo), ("m.thunk_metadata.txt", ""),
                       ("m.thunk_sequence_after_thunk_passes.txt", DUMP)):
        (tmp_path / name).write_text(text)
    top, _, _ = kernels.read_dump(str(tmp_path), sources=True)  # thunk input_reduce_fusion_70: instruction .70
    c = kernels.summary(kernels.count(top, {75: 64, 721: 10}, lambda cond: 0), by_op=True)
    assert c["in_graphs_by_source"] == {"jvp()/Dynamics.recur/cell1/jit(leaky_relu)/reduce_sum": 64,
                                        "transpose(jvp())/Encoder/reduce_sum": 64}


def test_a_deduplicated_kernels_operations_keep_their_own_sources(tmp_path):
    # XLA compiles two identical fusions once and names both thunks after the first; the thunk metadata says which
    # instruction each runs.
    dump = """\
000: kCommandBuffer [source | sink]
    001: kCustomKernel [source | sink] loop_x_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
    002: kCustomKernel [source | sink] loop_x_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
"""
    hlo = """\
  %loop_x_fusion = f32[4]{0} fusion(%p), kind=kLoop, calls=%f1, metadata={op_name="jit(f)/cell1/mul"}
  %loop_x_fusion.1 = f32[4]{0} fusion(%loop_x_fusion), kind=kLoop, calls=%f2, metadata={op_name="jit(f)/cell2/mul"}
"""
    metadata = "".join(f'thunk_metadata {{\n  thunk_info {{\n    profile_annotation: "{name}"\n    thunk_id: {i}\n  }}\n}}\n'
                       for i, name in ((1, "loop_x_fusion"), (2, "loop_x_fusion.1")))
    for name, text in (("m.sm_9.0a_gpu_after_optimizations.txt", hlo), ("m.thunk_metadata.txt", metadata),
                       ("m.thunk_sequence_after_thunk_passes.txt", dump)):
        (tmp_path / name).write_text(text)
    top, _, operands = kernels.read_dump(str(tmp_path), sources=True)
    assert [t.source for t in top[0].children()] == ["cell1/mul", "cell2/mul"]
    assert kernels.critical_path(top, {}, operands)["critical_path"] == 2  # the second reads the first


def test_critical_path_follows_what_each_graph_operation_reads():
    # A graph of five operations: a and b independent, c reads both (one through a bitcast and a tuple), d reads only
    # a parameter, e (a copy, not in the HLO) waits for all before it; then the loop runs 3 times a kernel and a
    # graph of a chain of two.
    dump = """\
000: kCommandBuffer [source | sink]
    001: kCustomKernel [source | sink] loop_a_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
    002: kCustomKernel [source | sink] loop_b_fusion_1 grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
    003: kCustomKernel [source | sink] gemm_fusion_c grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
    004: kCustomKernel [source | sink] loop_d_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
    005: kCopy [source | sink] kCopy
006: kWhile [source | sink]
condition:
    007: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
  body:
    008: kCommandBuffer [source | sink]
        009: kCustomKernel [source | sink] loop_f_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
        010: kCustomKernel [source | sink] loop_g_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
"""
    hlo = """\
  %p.1 = f32[4]{0} parameter(0)
  %loop_a_fusion = f32[4]{0} fusion(%p.1), kind=kLoop, calls=%fa
  %loop_b_fusion.1 = (f32[4]{0}, s32[]) fusion(%p.1), kind=kLoop, calls=%fb
  %bitcast.2 = f32[2,2]{1,0} bitcast(%loop_a_fusion)
  %tuple.3 = (f32[2,2]{1,0}, (f32[4]{0}, s32[])) tuple(%bitcast.2, %loop_b_fusion.1)
  %gemm_fusion_c = f32[4]{0} fusion(%tuple.3), kind=kCustom, calls=%fc, backend_config={"a":"(x)"}
  %loop_d_fusion = f32[4]{0} fusion(%p.1), kind=kLoop, calls=%fd
  %loop_f_fusion = f32[4]{0} fusion(%p.1), kind=kLoop, calls=%ff
  ROOT %loop_g_fusion = f32[4]{0} fusion(%loop_f_fusion, %p.1), kind=kLoop, calls=%fg
"""
    operands = kernels.hlo_operands(hlo)
    assert operands["loop_b_fusion.1"] == ("fusion", ["p.1"]) and operands["tuple.3"][1] == ["bitcast.2", "loop_b_fusion.1"]
    top = kernels.parse_thunks(dump)
    graph = kernels.critical_path(top[:1], {}, operands)
    assert graph["critical_path"] == 3  # a | b -> c, then the copy after all of them
    assert graph["critical_path_by_op.gemm_fusion_c"] == 1 and graph["critical_path_by_kind.kCopy"] == 1
    assert graph["critical_path_by_op.loop_d_fusion"] == 0  # off the chain
    whole = kernels.critical_path(top, {6: 3}, operands)
    assert whole["critical_path"] == 3 + 3 * (1 + 2) and whole["critical_path_by_op.loop_g_fusion"] == 3
    serial = kernels.count(top, {6: 3})
    assert serial["in_graphs"] + serial["launches"] - serial["graphs"] == 5 + 3 * 3


def test_a_loop_without_a_known_trip_count_is_an_error():
    with pytest.raises(ValueError, match="no known trip count"):
        kernels.count(kernels.parse_thunks(DUMP), {75: 64})


def test_without_the_cuda_plugin_it_says_how_to_get_it():
    script = os.path.join(os.path.dirname(kernels.__file__), "kernels.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, script, "--programs", "act_collect"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith("kernels.py: jax's CUDA plugin")


VMAPPED_GEMM_CONV_GRAD = """
import sys, jax, jax.numpy as jnp
sys.path.insert(0, "benchmarks")
import kernels
from dlwm_jax.networks.layers import conv2d
placement = kernels.gpu_topology(kernels.DEFAULT_TARGET)
spec = lambda *shape: jax.ShapeDtypeStruct((5, *shape), jnp.float32, sharding=placement)
grad = jax.vmap(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, 1, "gemm", stride=2))), (0, 1)))
jax.jit(grad).lower(spec(40, 12, 12, 128), spec(4, 4, 128, 256)).compile()
print("compiled")
"""


def test_the_gradient_of_a_vmapped_gemm_convolution_compiles_for_an_h100():
    """The encoder's last strided convolution at a VQ-VAE batch, vmapped over 5 seeds (train.py --num_seeds=5 on a
    GPU): without the barrier in layers._gemm_conv_bwd XLA's GPU compiler "couldn't find output tile sizes" for its
    kernel gradient, so every world-model chunk of 5 seeds failed to compile. Needs jax's CUDA plugin in .cuda-aot/
    (`make kernels`): skipped without it."""
    root = os.path.dirname(os.path.dirname(kernels.__file__))
    if not os.path.exists(os.path.join(root, ".cuda-aot", ".installed")):
        pytest.skip("jax's CUDA plugin is not in .cuda-aot/ (make kernels)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, ".cuda-aot")])}
    env.pop("JAX_PLATFORMS", None)
    result = subprocess.run([sys.executable, "-c", VMAPPED_GEMM_CONV_GRAD], capture_output=True, text=True,
                            timeout=300, env=env, cwd=root)
    assert result.returncode == 0 and result.stdout.strip() == "compiled", result.stderr[-1500:]
