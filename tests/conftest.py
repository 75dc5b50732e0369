"""Test-session settings: cheaper XLA compiles on CPU (the suite is compile-bound)."""
import os

import jax

# Partitionable threefry compiles several times slower on XLA:CPU; the non-partitionable variant is
# just as deterministic (and vmap-consistent). The driver makes the same choice (ComputeConfig).
jax.config.update("jax_threefry_partitionable", False)
# Reuse compiled programs across test processes and runs.
jax.config.update("jax_compilation_cache_dir", os.environ.get("DLWM_JAX_CACHE", os.path.expanduser("~/.cache/dlwm_jax/xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
