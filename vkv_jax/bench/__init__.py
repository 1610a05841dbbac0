"""Benchmarks: decode latency / memory against the full cache and peers (`latency`, run as
`python -m vkv_jax.bench`), in-prefill token reduction (`prefill`, `python -m vkv_jax.bench_prefill`),
the peer venv driver (`peers`) and kernel-vs-reference timings (`kernels`)."""
