"""Every hyperparameter of the system, in one frozen dataclass tree.

Defaults are the paper's / reference implementation's values (../shared/SPEC.md, section numbers cited).
Presets: `paper` (the full 100K-interaction run), `demo` (a short real run on a laptop CPU) and
`smoke` (every phase once, tiny, for tests). Flags override fields through `override`.
Device-specific formulations (`ComputeConfig`) default to None, "the compute target's choice";
`resolve_compute(config)` fills them for the backend, and whatever builds programs from a config resolves it first.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Real Atari environments with the reference protocol (SPEC 1, Appendix A)."""
    game: str = "BankHeist"
    frame_stack: int = 4          # the paper's 4; 1 reproduces the released script (SPEC 1.4)
    frame_skip: int = 4
    image_size: int = 96
    noop_max: int = 30
    max_episode_steps: int = 27_000   # agent steps; 100_000 reproduces the reference's Gym limit
    repeat_action_probability: float = 0.0
    collect_temperature: float = 1.5  # policy temperature while collecting real data (SPEC 5)
    num_eval_envs: int = 32
    eval_max_steps: int = 0           # cap on agent steps of one evaluation pass; 0 = max_episode_steps

    @property
    def eval_cap(self) -> int:
        """The evaluation's step cap: eval_max_steps, or the episode cap (every episode can end) when it is 0."""
        return self.eval_max_steps or self.max_episode_steps


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Encoder / quantiser / decoder (SPEC 3)."""
    num_codes: int = 128
    code_dim: int = 32
    channels: tuple[int, ...] = (32, 64, 128, 256)  # encoder conv widths; decoder mirrors them
    commitment_cost: float = 0.25
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    ema_debias_counts: bool = False   # False = the reference's quirk (SPEC 3.5)
    exact_cb_normaliser: bool = False  # False = torch's clipped/Taylor log C (SPEC 3.6), the reference
    batch_size: int = 40
    learning_rate: float = 1e-4
    warmup_lr_multiplier: float = 10.0
    batch_norm_momentum: float = 0.9  # Flax convention (= PyTorch 0.1)
    batch_norm_epsilon: float = 1e-5


@dataclasses.dataclass(frozen=True)
class DynamicsConfig:
    """Two-cell ConvLSTM with action conditioning and two heads (SPEC 4)."""
    hidden_channels: int = 128
    kernel_size: int = 5
    forget_bias: float = 1.0
    reward_conv_channels: int = 32
    reward_hidden: int = 512
    num_reward_classes: int = 3
    learning_rate: float = 5e-4
    reward_learning_rate: float = 1e-3
    reward_loss_weight: float = 1e-6
    batch_size: int = 4
    sequence_length: int = 11
    context_length: int = 4
    max_offset: int = 10
    reference_terminal_mask: bool = True  # True = the reference's off-by-one mask (SPEC 11.2.1)
    layer_norm_epsilon: float = 1e-5


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Latent-space actor-critic (SPEC 5) and PPO in imagination (SPEC 6, 7)."""
    conv_channels: int = 64
    hidden: int = 512
    num_envs: int = 16
    horizon: int = 50
    epochs: int = 4
    minibatch_size: int = 256
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_epsilon: float = 0.1
    value_clip: float = 0.1
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5
    learning_rate: float = 2.5e-4
    bootstrap_at_horizon: bool = False  # False = the reference: the horizon is a true termination
    layer_norm_epsilon: float = 1e-5


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The outer loop (SPEC 8)."""
    num_iterations: int = 15
    initial_steps: int = 12_800
    steps_per_iteration: int = 6_400
    warmup_epochs: int = 50
    joint_epochs: tuple[int, ...] = (140, 32, 24, 20, 16, 14, 12, 11, 10, 9, 8, 8, 7, 7, 6)
    vq_update_intervals: tuple[int, ...] = (2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3)
    ppo_updates: tuple[int, ...] = (1000,) * 7 + (2000,) + (1000,) * 3 + (2000,) + (1000,) * 2 + (3000,)
    diagnostic_windows: int = 128  # real windows per iteration for the world-model diagnostics (0 = none)


# XLA:CPU's YNNPACK fusion types per ComputeConfig.*_ynnpack value ("" = none; "all" = XLA's default list).
_YNN_FUSION_TYPES = {"reduce": "LIBRARY_FUSION_TYPE_REDUCE", "none": ""}

COMPUTE_TARGETS = ("auto", "cpu", "accelerator")

# The formulations each compute target fills in for fields left None (benchmarks/README.md, ComputeConfig table).
# "cpu": measured fastest on XLA:CPU (the reasons are beside the fields below). "accelerator": the formulations a
# latency-bound GPU program launches least from its host (benchmarks/kernels.py, XLA's GPU compiler for an H100):
# every convolution as GEMMs (a cuDNN convolution runs outside XLA's command buffers, a GEMM inside; the VQ-VAE's
# upsampling in its sub-pixel form, a stride-1 convolution), the 10-step dynamics loss and the 50-step dream unrolled
# by 10; the PPO update's scans stay rolled (unrolled, with GEMM convolutions, XLA's compile for the H100 found no
# Triton tiling); layer norms with one reduction for both statistics. Host launches per joint-epoch slot 1,140 -> 8
# (an epoch's chunks scanned, slots.chunk), per VQ-VAE step 169 -> 4, per dream 1,434 -> 12, per env step 34 -> 1;
# operations in a joint slot's graphs 1,172 -> 1,090 with the fused layer norms, 763 -> 612 with a cell's two
# convolutions as one batched matmul and one variadic reduction per norm, 612 -> 561 with the encoder's batch
# variances in one pass, a chunk's metric sums as one vector and the steps' random draws made before the scans,
# 561 -> 507 (and 9.3 -> 3 launches) with a period's dynamics steps unrolled (benchmarks/README.md). The device
# check times them against the XLA convolutions and Flax's layer norms.
# threefry_partitionable is True there: it is JAX's default, and with it XLA can split a sharded draw (the seed
# axis over devices) across the devices instead of replicating the whole draw on each; its compile-time cost is an
# XLA:CPU problem. So one seed draws other random numbers on an accelerator than on the CPU, where float32
# rounding (TF32, other kernels) would make the runs diverge anyway.
COMPUTE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(upsample="subpixel", vqvae_conv="xla", layer_norm="flax", batch_norm="two_pass", dynamics_unroll=10,
                lstm_conv="im2col", dream_lstm_conv="rows", policy_conv="xla", imagination_unroll=5, ppo_unroll=True,
                vqvae_ynnpack="reduce", ppo_ynnpack="reduce", threefry_partitionable=False, epoch_chunk=0,
                period_unroll=False, flat_optimizer=False),
    "accelerator": dict(upsample="subpixel", vqvae_conv="gemm", layer_norm="fused", batch_norm="one_pass",
                        dynamics_unroll=10, lstm_conv="gemm", dream_lstm_conv="gemm", policy_conv="gemm",
                        imagination_unroll=50, ppo_unroll=True, vqvae_ynnpack="all", ppo_ynnpack="all",
                        threefry_partitionable=True, epoch_chunk=12, period_unroll=True, flat_optimizer=True),
}


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """Device-specific formulations; each keeps the paper's parameterisation and has an equivalence test.

    `target` picks a preset of formulations (COMPUTE_PRESETS): "cpu", "accelerator", or "auto" (the default:
    "cpu" when JAX's default backend is the CPU, "accelerator" on GPU/TPU). Every formulation field defaults to
    None, "the target's choice"; a value set explicitly (`--set compute.lstm_conv=xla`) wins over the target.
    `resolve_compute(config)` fills the None fields; `target` is kept as given (what the user asked for) and the
    filled fields record what ran, so a config saved before `target` existed (every field concrete, no `target`)
    loads as target "auto" with its own values and equals the resolved CPU config it was run with.
    Whatever reads a formulation field needs a resolved config: `networks.make_networks` and `compiler_options`
    resolve one themselves; the world model's state and the training loops hold the config that
    `resolve_compute` returned at their start (world_model.init_world_model, train.train_and_evaluate), and a
    checkpoint stores it resolved.
    `dtype` is not device-dependent: float32 on every target (mixed precision is a choice, not a formulation).
    """
    target: str = "auto"  # "auto" | "cpu" | "accelerator": fills the None fields below
    # Each field's comment: the CPU choice / the accelerator choice, and why the CPU differs (measured here).
    upsample: str | None = None         # "subpixel" (3x3 conv + depth-to-space, fast on XLA:CPU) / "subpixel"; or
                                        # "transpose" (XLA's transposed convolution)
    vqvae_conv: str | None = None       # the VQ-VAE's convs (encoder, decoder; the encoder wherever it runs): "xla"
                                        # (XLA:CPU's convs beat its matmuls here) / "gemm" (matmuls over patches,
                                        # strided ones folded to stride 1; needs upsample "subpixel"); or "im2col"
    layer_norm: str | None = None       # the dynamics' and the policy's layer norms: "flax" (Flax's LayerNorm) /
                                        # "fused" (layers.fused_layer_norm: both statistics, and both sums of its
                                        # gradient, as one reduction each: fewer GPU kernels)
    batch_norm: str | None = None       # the encoder's train-mode batch variance: "two_pass" (mean of (x - mean)^2,
                                        # PyTorch's) / "one_pass" (E[x^2] - E[x]^2: no reduction waits for another)
    dynamics_unroll: int | None = None  # 10 / 10: scan unroll of the 10-step dynamics loss (rolled grads slow on CPU)
    lstm_conv: str | None = None        # the dynamics' convs (5x5 cells, 1x1 heads) on the 6x6 grid: "im2col" (one
                                        # matmul) / "gemm" (im2col with a scatter-free, deterministic gradient, a
                                        # cell's two as one batched matmul); or "rows", or "xla" (cuDNN on a GPU)
    dream_lstm_conv: str | None = None  # the same in imagination (forward only): "rows" (skips all-padding kernel
                                        # rows) / "gemm"
    policy_conv: str | None = None      # actor-critic convs: "xla" / "gemm" ("im2col" wins on CPU only with YNNPACK in
                                        # PPO)
    imagination_unroll: int | None = None  # 5 / 50: scan unroll of the 50-step imagination (XLA:CPU shares work, ~4%;
                                           # written out, a GPU runs no loop: no launches or host syncs per iteration)
    ppo_unroll: bool | None = None      # True / True: unroll PPO's epochs x minibatches scans (conv grads in a rolled
                                        # scan are very slow on CPU; unrolled, a GPU runs an update as one graph)
    vqvae_ynnpack: str | None = None    # "reduce" / "all": which XLA:CPU ops the VQ-VAE step sends to YNNPACK:
                                        # "all" | "reduce" | "none" (no effect off CPU)
    ppo_ynnpack: str | None = None      # "reduce" / "all": the same for the PPO update ("reduce": Eigen dots/convs,
                                        # YNNPACK reductions)
    threefry_partitionable: bool | None = None  # False / True: the partitionable PRNG compiles several times slower
                                                # on XLA:CPU (why True elsewhere: COMPUTE_PRESETS)
    epoch_chunk: int | None = None  # 0 / 12: world-model epoch slots per compiled scan (0: a program per step
                                    # kind with its own XLA:CPU options, a host loop dispatching them; n: a
                                    # program per slots.Period of n slots rounded up to a multiple of the VQ-VAE
                                    # interval, no conditional, the steps past an epoch's end masked: 12 pads an
                                    # epoch by ~6 slots; slots.chunk, programs.py)
    period_unroll: bool | None = None  # False / True: in a scanned chunk (epoch_chunk > 0), a joint period's 2-3
                                       # dynamics steps written out instead of a nested scan (slots.chunk): no
                                       # loop iterations or launches per step, fewer operations; compiles longer
    flat_optimizer: bool | None = None  # False / True: each optimizer (VQ-VAE, the dynamics' two groups, the policy's
                                        # clip and Adam) updates one vector of all its parameters (optax.flatten):
                                        # one fusion per step instead of one per parameter, a shorter chain on a
                                        # GPU; flat optimizer state, the clip's norm summed in another order
    dtype: str = "float32"         # activations and matmuls: "float32" | "bfloat16" (parameters, optimizer state,
                                   # losses, norm statistics, recurrent state and codebook distances stay float32)

    @property
    def resolved(self) -> bool:
        """Whether every formulation field is set (no None left for the target to fill)."""
        return all(getattr(self, name) is not None for name in COMPUTE_PRESETS["cpu"])

    def resolve(self, backend: str | None = None) -> ComputeConfig:
        """This ComputeConfig with every None field set to the target's choice; `backend` ("cpu", "gpu", "tpu";
        default jax.default_backend()) decides what "auto" means. Idempotent; a resolved config comes back as is."""
        if self.resolved:
            return self
        target = self.target
        if target == "auto":
            if backend is None:
                import jax
                backend = jax.default_backend()
            target = "cpu" if backend == "cpu" else "accelerator"
        if target not in COMPUTE_PRESETS:
            raise ValueError(f"compute.target must be one of {', '.join(COMPUTE_TARGETS)}, got {self.target!r}")
        preset = COMPUTE_PRESETS[target]
        return dataclasses.replace(self, **{name: value for name, value in preset.items()
                                            if getattr(self, name) is None})

    def compiler_options(self, program: str) -> dict[str, str]:
        """XLA options for a jitted program: "vqvae_step" (also the dynamics step's encoder pass) or
        "ppo_update"; empty off CPU or with "all". An unresolved config is resolved for the current backend.

        XLA:CPU sends dots, convolutions, reductions and elementwise ops to YNNPACK fusions by default. For the
        VQ-VAE step (large spatial convolutions) and the PPO update (5x5 conv gradients at batch 256) its Eigen
        kernels are faster for dots and convolutions on the CPU measured here, while YNNPACK's reductions (batch
        norm statistics, bias gradients) are several times faster than Eigen's; the ConvLSTM programs (small
        matmuls at batch 4-16) are fastest with everything on YNNPACK.
        """
        import jax
        field = {"vqvae_step": "vqvae_ynnpack", "ppo_update": "ppo_ynnpack"}[program]
        choice = getattr(self.resolve(), field)
        if choice == "all" or jax.default_backend() != "cpu":
            return {}
        return {"xla_cpu_experimental_ynn_fusion_type": _YNN_FUSION_TYPES[choice]}


@dataclasses.dataclass(frozen=True)
class Config:
    env: EnvConfig = EnvConfig()
    vqvae: VQVAEConfig = VQVAEConfig()
    dynamics: DynamicsConfig = DynamicsConfig()
    policy: PolicyConfig = PolicyConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    compute: ComputeConfig = ComputeConfig()
    preset: str = "paper"  # the name of the preset these values started from (reports group runs by it)
    seed: int = 0
    checkpoint_every_s: float = 600.0  # inside long phases, save at the next unit boundary after this long

    @property
    def total_real_steps(self) -> int:
        s = self.schedule
        return s.initial_steps + s.steps_per_iteration * (s.num_iterations - 1)


def validate(config: Config) -> Config:
    """Raises ValueError (one line) on an inconsistent config; returns it unchanged otherwise.

    A compute formulation field may be None (unresolved: the target's choice, see ComputeConfig); every other
    field, compute.target and compute.dtype included, must be set."""
    s = config.schedule
    for name in ("joint_epochs", "vq_update_intervals", "ppo_updates"):
        if len(getattr(s, name)) != s.num_iterations:
            raise ValueError(f"schedule.{name} has {len(getattr(s, name))} entries, "
                             f"need num_iterations={s.num_iterations}")
    c = config.compute
    if c.target not in COMPUTE_TARGETS:
        raise ValueError(f"compute.target must be 'auto', 'cpu' or 'accelerator', got {c.target!r}")
    for name in ("lstm_conv", "dream_lstm_conv", "policy_conv"):
        if getattr(c, name) not in (None, "im2col", "gemm", "rows", "xla"):
            raise ValueError(f"compute.{name} must be 'im2col', 'gemm', 'rows' or 'xla', got {getattr(c, name)!r}")
    for name in ("vqvae_ynnpack", "ppo_ynnpack"):
        if getattr(c, name) not in (None, "all", *_YNN_FUSION_TYPES):
            raise ValueError(f"compute.{name} must be 'all', 'reduce' or 'none', got {getattr(c, name)!r}")
    if c.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"compute.dtype must be 'float32' or 'bfloat16', got {c.dtype!r}")
    if c.upsample not in (None, "subpixel", "transpose"):
        raise ValueError(f"compute.upsample must be 'subpixel' or 'transpose', got {c.upsample!r}")
    if c.layer_norm not in (None, "flax", "fused"):
        raise ValueError(f"compute.layer_norm must be 'flax' or 'fused', got {c.layer_norm!r}")
    if c.batch_norm not in (None, "two_pass", "one_pass"):
        raise ValueError(f"compute.batch_norm must be 'two_pass' or 'one_pass', got {c.batch_norm!r}")
    if c.vqvae_conv not in (None, "im2col", "gemm", "xla"):
        raise ValueError(f"compute.vqvae_conv must be 'im2col', 'gemm' or 'xla', got {c.vqvae_conv!r}")
    if c.vqvae_conv not in (None, "xla") and c.upsample == "transpose":
        raise ValueError(f"compute.vqvae_conv={c.vqvae_conv!r} needs compute.upsample='subpixel' (a 'transpose' "
                         "upsampling is XLA's own convolution)")
    for name in ("dynamics_unroll", "imagination_unroll"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise ValueError(f"compute.{name} must be >= 1, got {getattr(c, name)}")
    if c.epoch_chunk is not None and c.epoch_chunk < 0:
        raise ValueError(f"compute.epoch_chunk must be >= 0 (0 = a program per step kind), got {c.epoch_chunk}")
    positive = {"env.frame_stack": config.env.frame_stack, "env.num_eval_envs": config.env.num_eval_envs,
                "schedule.num_iterations": s.num_iterations, "schedule.initial_steps": s.initial_steps,
                "vqvae.batch_size": config.vqvae.batch_size, "dynamics.batch_size": config.dynamics.batch_size,
                "policy.num_envs": config.policy.num_envs, "policy.horizon": config.policy.horizon}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if config.env.eval_max_steps < 0:
        raise ValueError(f"env.eval_max_steps must be >= 0 (0 = env.max_episode_steps), got {config.env.eval_max_steps}")
    if not 0 < config.dynamics.context_length < config.dynamics.sequence_length:
        raise ValueError("dynamics.context_length must be in [1, sequence_length)")
    return config


def resolve_compute(config: Config, backend: str | None = None) -> Config:
    """`config` with every None field of `config.compute` set to its target's choice (ComputeConfig.resolve;
    `backend` defaults to jax.default_backend()). Idempotent: a resolved config comes back unchanged (and then
    without importing jax), so a config restored from a checkpoint keeps the formulations it ran with."""
    compute = config.compute.resolve(backend)
    return config if compute is config.compute else validate(dataclasses.replace(config, compute=compute))


def paper() -> Config:
    return Config()


def demo() -> Config:
    """A short real run: full-size networks, 2 iterations on 3,000 real steps, ~15 minutes on 2 CPU cores."""
    return override(Config(), {
        "preset": "demo", "env.num_eval_envs": 8, "env.eval_max_steps": 2_000,
        "schedule.num_iterations": 2, "schedule.initial_steps": 2_000, "schedule.steps_per_iteration": 1_000,
        "schedule.warmup_epochs": 4, "schedule.joint_epochs": (2, 2), "schedule.vq_update_intervals": (2, 2),
        "schedule.ppo_updates": (20, 20),
    })


def short() -> Config:
    """The paper's schedule shape scaled down to ~70 min per seed on 2 CPU cores (full-size networks).

    16,000 real steps over 4 iterations (6,400 random, then 3 x 3,200 with the agent), 5 warm-up epochs (800
    VQ-VAE steps at 10x lr), ~7,100 dynamics steps (the paper: ~241,000) and 700 PPO updates (19,000). The split
    favours the dynamics model: a first version with 4,300 dynamics steps (joint epochs 10/4/3/3, VQ-VAE every 2nd
    or 3rd step) left it below the "nothing moves" baseline with its loss still falling steeply (CrazyClimber,
    seed 0: open-loop code accuracy 0.70 at 1 step vs 0.91 for copying the last frame, +reward recall 6/31), and
    the reconstruction had converged, so the VQ-VAE now updates only every 4th (iteration 1) or 6th step. Episodes
    are capped at 10,000 agent steps so that an agent stuck without dying cannot make an evaluation run for
    hours; the random baseline in results/ uses the same cap.
    """
    return override(Config(), {
        "preset": "short", "env.num_eval_envs": 16, "env.max_episode_steps": 10_000, "env.eval_max_steps": 10_000,
        "schedule.num_iterations": 4, "schedule.initial_steps": 6_400, "schedule.steps_per_iteration": 3_200,
        "schedule.warmup_epochs": 5, "schedule.joint_epochs": (20, 6, 5, 4), "schedule.vq_update_intervals": (4, 6, 6, 6),
        "schedule.ppo_updates": (150, 150, 150, 250),
    })


def smoke() -> Config:
    """Every phase and output once, with narrow networks: for tests. 3 evaluation envs of 200 steps: Pong returns
    of about -3 .. -5 that differ per env (2 x 60 steps give -1 or 0 whatever the policy), so reproducing them
    means something."""
    return override(Config(), {
        "preset": "smoke", "env.num_eval_envs": 3, "env.eval_max_steps": 200, "schedule.diagnostic_windows": 3,
        "vqvae.channels": (4, 8, 8, 16), "vqvae.code_dim": 8, "vqvae.num_codes": 16, "vqvae.batch_size": 8,
        "dynamics.hidden_channels": 8, "dynamics.reward_hidden": 16, "dynamics.reward_conv_channels": 4,
        "policy.conv_channels": 8, "policy.hidden": 16, "policy.num_envs": 4, "policy.horizon": 8,
        "policy.minibatch_size": 16,
        "schedule.num_iterations": 2, "schedule.initial_steps": 96, "schedule.steps_per_iteration": 48,
        "schedule.warmup_epochs": 1, "schedule.joint_epochs": (1, 1), "schedule.vq_update_intervals": (2, 3),
        "schedule.ppo_updates": (2, 2),
    })


PRESETS = {"paper": paper, "short": short, "demo": demo, "smoke": smoke}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def _optional(hint: Any) -> tuple[Any, bool]:
    """(T, True) for a field typed `T | None`; (hint, False) otherwise."""
    import types
    import typing
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (base,) = [a for a in args if a is not type(None)]
        return base, True
    return hint, False


def _parse(value: Any, like: Any) -> Any:
    """Converts a flag string to the type of the field's current value."""
    if not isinstance(value, str):
        return value
    if isinstance(like, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(like, tuple):
        return tuple(_parse(v.strip(), like[0] if like else 0) for v in value.split(",") if v.strip())
    return type(like)(value)


def override(config: Config, updates: dict[str, Any]) -> Config:
    """Returns `config` with dotted fields replaced, e.g. {"schedule.num_iterations": 3, "seed": 1}.

    String values are parsed to the field's type (tuples from comma lists). Unknown fields raise ValueError.
    """
    for dotted, value in updates.items():
        path = dotted.split(".")
        nodes = [config]
        for name in path[:-1]:
            if not dataclasses.is_dataclass(nodes[-1]) or not hasattr(nodes[-1], name):
                raise ValueError(f"unknown config field {dotted!r}")
            nodes.append(getattr(nodes[-1], name))
        leaf = path[-1]
        if not dataclasses.is_dataclass(nodes[-1]) or leaf not in {f.name for f in dataclasses.fields(nodes[-1])}:
            raise ValueError(f"unknown config field {dotted!r}")
        like = getattr(nodes[-1], leaf)
        if like is None:  # an unresolved compute field: parse to its declared type (`str | None` -> str)
            import typing
            like = _optional(typing.get_type_hints(type(nodes[-1]))[leaf])[0]()
        try:
            new = _parse(value, like)
        except ValueError as e:
            raise ValueError(f"bad value for {dotted}: {e}") from None
        for node, name in zip(reversed(nodes), reversed(path)):
            new = dataclasses.replace(node, **{name: new})
        config = new
    return validate(config)


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain JSON data (tuples as lists), as checkpoints and results files store it."""
    import json
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(d: dict[str, Any]) -> Config:
    """The inverse of `dataclasses.asdict(config)`, also after a JSON round trip (lists become tuples again).

    Used to rebuild a run's config from its checkpoint (meta["config"]). A field missing from `d` keeps its
    default (a checkpoint written before the field existed; for a compute formulation field that is None, which
    `resolve_compute` fills, except in a resolved config, which gets what runs computed before the field existed:
    _BEFORE_FIELD_EXISTED); an unknown field or a value of the wrong kind raises ValueError (one line). The
    result is validated, not resolved.
    """
    compute = d.get("compute")
    if isinstance(compute, dict) and all(compute.get(name) is not None for name in COMPUTE_PRESETS["cpu"]
                                         if name not in _BEFORE_FIELD_EXISTED):  # resolved, maybe before a field
        d = {**d, "compute": {**_BEFORE_FIELD_EXISTED, **compute}}
    return validate(_dataclass_from_dict(Config, d, ""))


# What every run computed before these compute formulation fields existed: a resolved config saved before one
# existed keeps running that way on any backend, whatever the target's choice is now.
_BEFORE_FIELD_EXISTED = {"epoch_chunk": 0, "vqvae_conv": "xla", "layer_norm": "flax", "batch_norm": "two_pass",
                         "period_unroll": False, "flat_optimizer": False}


def _dataclass_from_dict(cls: type, d: Any, prefix: str) -> Any:
    import typing
    if not isinstance(d, dict):
        raise ValueError(f"config{' field ' + prefix[:-1] if prefix else ''} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config field {prefix + unknown[0]!r}")
    kwargs = {}
    for name, value in d.items():
        hint, optional = _optional(hints[name])
        if optional and value is None:  # an unresolved compute field
            kwargs[name] = None
        elif dataclasses.is_dataclass(hint):
            kwargs[name] = _dataclass_from_dict(hint, value, f"{prefix}{name}.")
        elif typing.get_origin(hint) is tuple:
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"config field {prefix + name!r} must be a list, got {value!r}")
            kwargs[name] = tuple(value)
        else:
            ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
            if hint is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                raise ValueError(f"config field {prefix + name!r} must be {hint.__name__}, got {value!r}")
            kwargs[name] = value
    return cls(**kwargs)
