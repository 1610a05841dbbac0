"""Entry point of `python -m vkv_jax.bench_prefill` (the benchmark is `vkv_jax.bench.prefill`)."""

import sys

from vkv_jax.bench.prefill import main

if __name__ == "__main__":
    sys.exit(main())
