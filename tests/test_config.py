"""config.py: the compute target (`compute.target`, `resolve_compute`), old checkpoints' configs, typed overrides."""
import dataclasses
import json

import jax
import pytest

from dlwm_jax import config as config_lib
from dlwm_jax.config import resolve_compute

# The CPU formulations as ComputeConfig's defaults were before `target` existed (what old checkpoints hold), and
# with the fields added since.
OLD_CPU = dict(upsample="subpixel", dynamics_unroll=10, lstm_conv="im2col", dream_lstm_conv="rows", policy_conv="xla",
               imagination_unroll=5, ppo_unroll=True, vqvae_ynnpack="reduce", ppo_ynnpack="reduce",
               threefry_partitionable=False)
CPU = dict(OLD_CPU, epoch_chunk=0, vqvae_conv="xla", layer_norm="flax", batch_norm="two_pass", period_unroll=False,
           flat_optimizer=False)
# The GEMM formulations (benchmarks/kernels.py), and JAX's default PRNG.
PLAIN = dict(upsample="subpixel", vqvae_conv="gemm", layer_norm="fused", batch_norm="one_pass", dynamics_unroll=10,
             lstm_conv="gemm", dream_lstm_conv="gemm", policy_conv="gemm", imagination_unroll=50, ppo_unroll=True,
             vqvae_ynnpack="all", ppo_ynnpack="all", threefry_partitionable=True, epoch_chunk=12, period_unroll=True,
             flat_optimizer=True)


def formulations(config):
    return {name: getattr(config.compute, name) for name in CPU}


def test_defaults_leave_every_formulation_to_the_auto_target():
    compute = config_lib.paper().compute
    assert compute.target == "auto" and compute.dtype == "float32" and not compute.resolved
    assert formulations(config_lib.paper()) == dict.fromkeys(CPU)
    assert set(config_lib.COMPUTE_PRESETS["cpu"]) == set(CPU) == set(config_lib.COMPUTE_PRESETS["accelerator"])


@pytest.mark.parametrize("backend, expected", [("cpu", CPU), ("gpu", PLAIN), ("tpu", PLAIN), ("cuda", PLAIN)])
def test_auto_picks_the_cpu_formulations_only_on_the_cpu(backend, expected):
    resolved = resolve_compute(config_lib.smoke(), backend)
    assert formulations(resolved) == expected and resolved.compute.resolved
    assert resolved.compute.target == "auto" and resolved.compute.dtype == "float32"
    assert dataclasses.replace(resolved, compute=config_lib.smoke().compute) == config_lib.smoke()  # nothing else


@pytest.mark.parametrize("backend, expected", [("gpu", PLAIN), ("tpu", PLAIN), ("cpu", CPU)])
def test_auto_asks_jax_for_the_default_backend(monkeypatch, backend, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert formulations(resolve_compute(config_lib.paper())) == expected
    from dlwm_jax.networks import make_networks
    networks = make_networks(config_lib.smoke(), 4)
    assert networks.dynamics.conv_impl == expected["lstm_conv"]
    assert networks.dream_dynamics.conv_impl == expected["dream_lstm_conv"]
    assert networks.decoder.upsample == expected["upsample"]
    assert networks.actor_critic.conv_impl == expected["policy_conv"]


@pytest.mark.parametrize("target, expected", [("cpu", CPU), ("accelerator", PLAIN)])
def test_an_explicit_target_ignores_the_backend(target, expected):
    config = config_lib.override(config_lib.paper(), {"compute.target": target})
    for backend in ("cpu", "gpu", "tpu"):
        resolved = resolve_compute(config, backend)
        assert formulations(resolved) == expected and resolved.compute.target == target


def test_explicit_values_win_over_the_target():
    config = config_lib.override(config_lib.paper(), {"compute.lstm_conv": "rows", "compute.ppo_unroll": "true",
                                                      "compute.dynamics_unroll": "3", "compute.dtype": "bfloat16"})
    assert (config.compute.lstm_conv, config.compute.ppo_unroll, config.compute.dynamics_unroll) == ("rows", True, 3)
    for backend, preset in (("gpu", PLAIN), ("cpu", CPU)):
        resolved = formulations(resolve_compute(config, backend))
        assert resolved == {**preset, "lstm_conv": "rows", "ppo_unroll": True, "dynamics_unroll": 3}
    assert resolve_compute(config, "gpu").compute.dtype == "bfloat16"
    # an explicit value equal to the other target's choice is kept too (False is not None)
    cpu_threefry_on_gpu = config_lib.override(config_lib.paper(), {"compute.threefry_partitionable": "false"})
    assert resolve_compute(cpu_threefry_on_gpu, "gpu").compute.threefry_partitionable is False


def test_resolve_is_idempotent_and_keeps_a_resolved_config_on_any_backend():
    for first in ("cpu", "gpu"):
        resolved = resolve_compute(config_lib.smoke(), first)
        for second in ("cpu", "gpu", "tpu", None):
            assert resolve_compute(resolved, second) is resolved
        assert resolved.compute.resolve("tpu") is resolved.compute


def test_a_config_saved_before_the_target_existed_loads_as_the_resolved_cpu_config():
    """A checkpoint's meta["config"] from before this option: every formulation concrete, no `target` key."""
    saved = json.loads(json.dumps(dataclasses.asdict(config_lib.short())))
    saved["compute"] = {**OLD_CPU, "dtype": "float32"}
    restored = config_lib.from_dict(saved)
    assert restored == resolve_compute(config_lib.short(), "cpu")  # what a resumed run computes on the CPU
    assert restored.compute.target == "auto" and restored.compute.resolved
    assert resolve_compute(restored, "gpu") is restored  # it keeps the formulations it ran with
    assert restored != resolve_compute(config_lib.short(), "gpu")
    # fields added since hold what every run computed before them, on any backend (not the target's choice now)
    c = restored.compute
    assert (c.epoch_chunk, c.vqvae_conv, c.layer_norm, c.batch_norm, c.period_unroll, c.flat_optimizer) == (
        0, "xla", "flax", "two_pass", False, False)
    unresolved = config_lib.to_dict(config_lib.short())
    assert config_lib.from_dict(unresolved).compute.epoch_chunk is None  # an unresolved config stays unresolved


def test_unresolved_and_resolved_configs_round_trip_through_json():
    for config in (config_lib.smoke(), resolve_compute(config_lib.smoke(), "gpu"),
                   config_lib.override(config_lib.smoke(), {"compute.target": "accelerator",
                                                            "compute.upsample": "subpixel"})):
        assert config_lib.from_dict(config_lib.to_dict(config)) == config
    assert config_lib.to_dict(config_lib.smoke())["compute"]["lstm_conv"] is None


def test_validate_allows_none_only_where_the_target_fills_it():
    d = config_lib.to_dict(config_lib.smoke())
    with pytest.raises(ValueError, match="compute.target must be 'auto', 'cpu' or 'accelerator', got 'gpu'"):
        config_lib.override(config_lib.smoke(), {"compute.target": "gpu"})
    with pytest.raises(ValueError, match="compute.dtype"):
        config_lib.from_dict({**d, "compute": {**d["compute"], "dtype": None}})
    with pytest.raises(ValueError, match="compute.target"):
        config_lib.from_dict({**d, "compute": {**d["compute"], "target": None}})
    with pytest.raises(ValueError, match="env.num_eval_envs"):
        config_lib.from_dict({**d, "env": {**d["env"], "num_eval_envs": None}})
    with pytest.raises(ValueError, match="compute.dynamics_unroll"):  # typed even where None is allowed
        config_lib.from_dict({**d, "compute": {**d["compute"], "dynamics_unroll": "ten"}})
    with pytest.raises(ValueError, match="compute.ppo_unroll"):
        config_lib.from_dict({**d, "compute": {**d["compute"], "ppo_unroll": 1}})
    with pytest.raises(ValueError, match="compute.imagination_unroll must be >= 1, got 0"):
        config_lib.override(config_lib.smoke(), {"compute.imagination_unroll": "0"})
    with pytest.raises(ValueError, match="bad value for compute.ppo_unroll: expected a boolean"):
        config_lib.override(config_lib.smoke(), {"compute.ppo_unroll": "sometimes"})
    with pytest.raises(ValueError, match="compute.lstm_conv must be 'im2col', 'gemm', 'rows' or 'xla', got 'winograd'"):
        config_lib.override(config_lib.smoke(), {"compute.lstm_conv": "winograd"})
    with pytest.raises(ValueError, match="compute.vqvae_conv must be 'im2col', 'gemm' or 'xla', got 'rows'"):
        config_lib.override(config_lib.smoke(), {"compute.vqvae_conv": "rows"})
    with pytest.raises(ValueError, match="compute.vqvae_conv='gemm' needs compute.upsample='subpixel'"):
        config_lib.override(config_lib.smoke(), {"compute.vqvae_conv": "gemm", "compute.upsample": "transpose"})
    transpose = config_lib.override(config_lib.smoke(), {"compute.upsample": "transpose"})
    assert resolve_compute(transpose, "cpu").compute.vqvae_conv == "xla"
    with pytest.raises(ValueError, match="compute.vqvae_conv='gemm' needs compute.upsample='subpixel'"):
        resolve_compute(transpose, "gpu")  # the accelerator's VQ-VAE convolutions are GEMMs


def test_compiler_options_resolve_an_unresolved_config():
    """On this CPU: auto = the CPU formulations (YNNPACK reductions only); the accelerator target sends nothing."""
    assert jax.default_backend() == "cpu"
    reduce = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    for program in ("vqvae_step", "ppo_update"):
        assert config_lib.paper().compute.compiler_options(program) == reduce
        assert resolve_compute(config_lib.paper()).compute.compiler_options(program) == reduce
        accelerator = config_lib.override(config_lib.paper(), {"compute.target": "accelerator"})
        assert accelerator.compute.compiler_options(program) == {}
