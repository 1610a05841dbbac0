"""vkv_jax: KV-cache compression for LLaVA-style vision-language models in JAX.

    model = vkv_jax.load(path)                     # local HF LLaVA dir; no argument = the default model
    inputs = model.prepare(images=[...], prompts=[...])
    out = vkv_jax.generate(model, inputs, max_new_tokens=32,
                           compression=vkv_jax.Compression("aircache", budget=0.1))
"""

from vkv_jax import families  # noqa: F401  (registers the built-in model families by model_type)
from vkv_jax.api import GenerateOutput, LlavaModel, generate, load
from vkv_jax.decode_trim import DecodeTrim
from vkv_jax.inputs import Inputs
from vkv_jax.methods import Compression
from vkv_jax.models.sharding import make_mesh
from vkv_jax.sampling import Sampling

__all__ = ["Compression", "DecodeTrim", "GenerateOutput", "Inputs", "LlavaModel", "Sampling", "generate", "load",
           "make_mesh"]
