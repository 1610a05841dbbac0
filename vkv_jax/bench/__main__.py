"""Entry point of `python -m vkv_jax.bench` (the benchmark is `vkv_jax.bench.latency`)."""

import sys

from vkv_jax.bench.latency import main

if __name__ == "__main__":
    sys.exit(main())
