"""Entry point of `python -m vkv_jax.bench` (the benchmark is `vkv_jax.bench.latency`)."""

from vkv_jax.bench.latency import main

main()
