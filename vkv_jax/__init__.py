"""vkv_jax: KV-cache compression for LLaVA-style vision-language models in JAX."""
