"""Shared pytest set-up: JAX's persistent compilation cache (CI re-runs compile far less)."""

import os
import pathlib

import jax

_CACHE = pathlib.Path(os.environ.get("VKV_JAX_TEST_CACHE",
                                     pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
