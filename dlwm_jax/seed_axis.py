"""The seed axis: where jit, vmap, sharding and compiler options are chosen for the loop's programs.

The state of S seeds is one pytree with a leading axis [S, ...]; one seed is the S = 1 case (PureJaxRL's
`jit(vmap(train))` idea, applied per step because EnvPool and the replay live on the host).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEFAULT_COMPILATION_CACHE = os.path.expanduser("~/.cache/dlwm_jax/xla")


def use_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory`, for every program: the loop also runs ~120 small ones
    (keys, stacking, image decoding) that compile in under 0.5 s each, JAX's default threshold, and together cost
    a warm smoke run ~13 s of its ~40 s on 2 CPU cores."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def stack(trees: Sequence[Any]) -> Any:
    """Per-seed pytrees (same structure and static fields) -> one pytree with a leading seed axis [S, ...]."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, s: int) -> Any:
    """Seed s's slice of a stacked pytree."""
    return jax.tree.map(lambda x: x[s], tree)


def put_on_seeds(tree: Any, sharding: NamedSharding | None) -> Any:
    """A pytree with a leading seed axis placed on the seed sharding (returned as it is without one)."""
    return jax.device_put(tree, sharding) if sharding is not None else tree


def seed_sharding(num_seeds: int, devices: Sequence[jax.Device] | None = None) -> NamedSharding | None:
    """The seed axis over all (or the given) devices; None on one device or for one seed. Raises ValueError if
    S % devices."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) <= 1 or num_seeds == 1:
        return None
    if num_seeds % len(devices):
        raise ValueError(f"--num_seeds={num_seeds} is not a multiple of the {len(devices)} visible devices; "
                         "use a multiple, or --num_devices to use fewer")
    return NamedSharding(Mesh(np.asarray(devices), ("seed",)), PartitionSpec("seed"))


def over_seeds(fn: Callable, num_seeds: int, sharding: NamedSharding | None, in_axes: tuple,
               compiler_options: dict[str, str] | None = None, donate_argnums: tuple[int, ...] = ()) -> Callable:
    """fn compiled for all seeds: arguments with in_axes 0 carry a leading seed axis [S, ...] (None: shared),
    every output gets one. donate_argnums: arguments whose buffers the program may reuse (the caller drops them).

    S = 1: jit of fn on the squeezed axis, the program of a single run. S > 1: jit(vmap(fn)); with a sharding
    each device runs the vmapped fn on its own seeds (shard_map: no cross-seed communication exists, and XLA's
    SPMD partitioner is kept away from the vmapped (grouped) convolutions, whose gradients it fails to
    partition on XLA:CPU).
    """
    if num_seeds == 1:
        def single(*args):
            args = [jax.tree.map(lambda x: x[0], a) if axis == 0 else a for a, axis in zip(args, in_axes)]
            return jax.tree.map(lambda x: x[None], fn(*args))
        return jax.jit(single, compiler_options=compiler_options, donate_argnums=donate_argnums)
    vmapped = jax.vmap(fn, in_axes=in_axes)
    if sharding is None:
        return jax.jit(vmapped, compiler_options=compiler_options, donate_argnums=donate_argnums)
    seed, shared = PartitionSpec("seed"), PartitionSpec()
    in_specs = tuple(seed if axis == 0 else shared for axis in in_axes)
    # check_vma off: scans start from unvarying zeros (initial LSTM state) and there are no collectives.
    return jax.jit(jax.shard_map(vmapped, mesh=sharding.mesh, in_specs=in_specs, out_specs=seed, check_vma=False),
                   compiler_options=compiler_options, donate_argnums=donate_argnums)
