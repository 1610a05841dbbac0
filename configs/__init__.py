"""Model shape and method presets (JSON), loaded with `vkv_jax.configs.load_preset`."""
