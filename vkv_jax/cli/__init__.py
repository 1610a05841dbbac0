"""The command-line tools' bodies; `python -m vkv_jax.generate` and friends are thin entry modules."""
