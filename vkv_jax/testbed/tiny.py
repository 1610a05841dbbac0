"""The tiny LLaVA architecture of the testbed (the shipped default model's shapes) and the files that
turn its weights into a Hugging Face LLaVA directory: tokenizer, chat template, preprocessor config."""

from __future__ import annotations

import json
import os
import pathlib

from vkv_jax.models.config import LlavaConfig, RopeConfig, TextConfig, VisionConfig
from vkv_jax.testbed import vocab

# LLaVA-1.5's conversation format, as a jinja template over HF multimodal messages.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_config(vocab_size: int, image_token_id: int, image_size: int = 64, patch_size: int = 8, *,
                hidden_size: int = 64, intermediate_size: int = 172, num_layers: int = 4, num_heads: int = 4,
                num_kv_heads: int = 2, vision_hidden_size: int = 64, vision_intermediate_size: int = 256,
                vision_layers: int = 2, vision_heads: int = 4, head_dim: int | None = None,
                rope_theta: float = 10000.0) -> LlavaConfig:
    """The tiny LLaVA architecture of the testbed: CLIP-style ViT (patch 8, features of its last layer),
    2-layer GELU MLP projector, a Llama LM with GQA (4 query / 2 kv heads). 64-px images give one
    visual token per grid cell (64 tokens); ~0.3M parameters. `head_dim` defaults to
    hidden_size // num_heads."""
    text = TextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=head_dim or hidden_size // num_heads, rope=RopeConfig(theta=rope_theta),
                      max_position_embeddings=1024)
    vision = VisionConfig(hidden_size=vision_hidden_size, intermediate_size=vision_intermediate_size,
                          num_layers=vision_layers, num_heads=vision_heads, image_size=image_size,
                          patch_size=patch_size, hidden_act="gelu")
    return LlavaConfig(text=text, vision=vision, image_token_id=image_token_id, vision_feature_layer=-1)


def write_tokenizer_files(directory: str | os.PathLike, tokenizer, image_size: int) -> None:
    """tokenizer.json + special-token config + chat template + CLIP preprocessor config."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": vocab.BOS, "eos_token": vocab.EOS,
        "pad_token": vocab.PAD, "unk_token": vocab.UNK, "model_max_length": 1024}, indent=2))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_15_TEMPLATE}, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "resample": 3, "do_convert_rgb": True}, indent=2))
