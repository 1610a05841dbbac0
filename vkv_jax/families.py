"""The built-in model families, registered by `model_type` (`models.family.register`).

A new family adds its model modules (config parser, loader, embeddings, image processor, `prepare`'s
image step) and one `register` call here; `load`, `generate`, the checks, the evaluation and the bench
then reach it through `models.family.of(cfg)`.
"""

from __future__ import annotations

from vkv_jax.checks import check_llava_images, check_qwen_images
from vkv_jax.model import LlavaModel, QwenVLModel
from vkv_jax.models import anyres, config, llava, loading, qwen2_vl, qwen2_vl_loading
from vkv_jax.models.family import Family, register
from vkv_jax.models.image_processor import ImageProcessor
from vkv_jax.models.qwen2_vl_processor import QwenImageProcessor

LLAVA = register(Family(
    name="llava",
    model_types=config.SUPPORTED_MODEL_TYPES,  # LLaVA-1.5, LLaVA-NeXT (anyres), LLaVA-OneVision
    config_from_hf=config.llava_config_from_hf,
    load_params=loading.load_params,
    random_params=loading.random_params,
    processor_from_dir=ImageProcessor.from_dir,
    prompt_embeddings=llava.prompt_embeddings,
    next_positions=llava.next_positions,
    static_num_visual=llava.static_num_visual,
    check_images=check_llava_images,
    synthetic_inputs=llava.synthetic_inputs,
    visual_inputs_type=anyres.VisualInputs,
    model_class=LlavaModel,
))

QWEN2_VL = register(Family(
    name="qwen2_vl",
    model_types=config.QWEN_VL_MODEL_TYPES,  # Qwen2-VL, Qwen2.5-VL
    config_from_hf=config.qwen_vl_config_from_hf,
    load_params=qwen2_vl_loading.load_params,
    random_params=qwen2_vl_loading.random_params,
    processor_from_dir=QwenImageProcessor.from_dir,
    prompt_embeddings=qwen2_vl.prompt_embeddings,
    next_positions=qwen2_vl.next_positions,
    static_num_visual=qwen2_vl.static_num_visual,
    check_images=check_qwen_images,
    synthetic_inputs=qwen2_vl.synthetic_inputs,
    visual_inputs_type=qwen2_vl.QwenVisualInputs,
    model_class=QwenVLModel,
))
