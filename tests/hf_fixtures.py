"""Tiny random Hugging Face LLaVA checkpoints built offline with transformers (no downloads)."""

from __future__ import annotations

import os

from vkv_jax.testbed import tiny
from vkv_jax.testbed import vocab as testbed_vocab

TOKENIZER = testbed_vocab.build_tokenizer()
VOCAB = TOKENIZER.get_vocab_size()
IMAGE_TOKEN_ID = TOKENIZER.token_to_id(testbed_vocab.IMAGE)
BOS_ID = TOKENIZER.token_to_id(testbed_vocab.BOS)
EOS_ID = TOKENIZER.token_to_id(testbed_vocab.EOS)
PAD_ID = TOKENIZER.token_to_id(testbed_vocab.PAD)


def make_llava(path: str | os.PathLike, *, num_kv_heads: int = 2, num_heads: int = 4, rope_parameters=None,
               vision_feature_layer=-2, select_strategy: str = "default", dtype: str = "float32",
               tie_word_embeddings: bool = False, seed: int = 0, image_size: int = 32, patch_size: int = 8,
               text_layers: int = 2, vision_layers: int = 3, hidden: int = 64, save_original_format: bool = True,
               attention_bias: bool = False, head_scale: float = 1.0):
    """Save a random LlavaForConditionalGeneration (+ the testbed tokenizer, chat template and a CLIP
    preprocessor config) to `path`; returns the torch model (eval mode)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=text_layers, num_attention_heads=num_heads,
                       num_key_value_heads=num_kv_heads, max_position_embeddings=512,
                       rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
                       tie_word_embeddings=tie_word_embeddings, attention_bias=attention_bias,
                       bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=vision_layers, num_attention_heads=4, projection_dim=32)
    n_img = (image_size // patch_size) ** 2 + (1 if select_strategy == "full" else 0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                      image_seq_length=n_img, vision_feature_layer=vision_feature_layer,
                      vision_feature_select_strategy=select_strategy, tie_word_embeddings=tie_word_embeddings)
    model = _perturbed(LlavaForConditionalGeneration(cfg).eval(), head_scale, dtype)
    model.save_pretrained(path, save_original_format=save_original_format)
    tiny.write_tokenizer_files(path, TOKENIZER, image_size)
    return model


def _perturbed(model, head_scale: float, dtype: str):
    """HF inits norms to 1 and biases to 0: perturb them so parity covers them; sharper logits (lm_head x
    head_scale) make greedy argmaxes well separated (bf16 parity, generation parity)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.lm_head.weight.mul_(head_scale)
    return model.to(torch.bfloat16) if dtype == "bfloat16" else model


NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def make_llava_next(path: str | os.PathLike, *, text_model: str = "llama", num_kv_heads: int = 2, num_heads: int = 4,
                    seed: int = 0, image_size: int = 32, patch_size: int = 8, text_layers: int = 2,
                    vision_layers: int = 2, hidden: int = 64, head_scale: float = 1.0, pinpoints=None,
                    save_original_format: bool = True, dtype: str = "float32"):
    """Save a random LlavaNextForConditionalGeneration (CLIP tower, Llama or Mistral LM; the testbed
    tokenizer; a LlavaNext preprocessor config with tiny pinpoints) to `path`; returns the torch model."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        MistralConfig,
    )

    torch.manual_seed(seed)
    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig}[text_model]
    extra = {"sliding_window": None} if text_model == "mistral" else {}
    text = text_cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=text_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                    max_position_embeddings=1024, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                    **extra)
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=vision_layers, num_attention_heads=4, projection_dim=32)
    pins = pinpoints or [[a * image_size // 32, b * image_size // 32] for a, b in NEXT_PINPOINTS]
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                          image_grid_pinpoints=pins, vision_feature_layer=-2,
                          vision_feature_select_strategy="default")
    model = _perturbed(LlavaNextForConditionalGeneration(cfg).eval(), head_scale, dtype)
    model.save_pretrained(path, save_original_format=save_original_format)
    tiny.write_tokenizer_files(path, TOKENIZER, image_size)
    import json
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": image_size},
                   "crop_size": {"height": image_size, "width": image_size}, "image_grid_pinpoints": pins,
                   "do_pad": True}, f)
    return model


ONEVISION_PINPOINTS = [[a * 32, b * 32] for a in range(1, 4) for b in range(1, 4)]


def make_llava_onevision(path: str | os.PathLike, *, num_kv_heads: int = 2, num_heads: int = 4, seed: int = 0,
                         text_layers: int = 2, vision_layers: int = 2, hidden: int = 64, head_scale: float = 1.0,
                         max_patches: int = 4, tie_word_embeddings: bool = False, dtype: str = "float32",
                         video_token_id: int | None = None):
    """Save a random LlavaOnevisionForConditionalGeneration (SigLIP tower, Qwen2 LM with q/k/v biases; the
    testbed tokenizer; a OneVision preprocessor config; anyres_max_`max_patches` so that large tile grids
    are downsampled) to `path`; returns the torch model. video_token_id: an id for video placeholders (the
    LM's vocabulary grows to hold it when it is past the tokenizer's); default transformers'."""
    import json

    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    vocab = VOCAB if video_token_id is None else max(VOCAB, video_token_id + 1)
    text = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=text_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       max_position_embeddings=1024, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                       tie_word_embeddings=tie_word_embeddings)
    vision = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=vision_layers, num_attention_heads=4, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                               image_grid_pinpoints=ONEVISION_PINPOINTS,
                               vision_aspect_ratio=f"anyres_max_{max_patches}", tie_word_embeddings=tie_word_embeddings,
                               **({} if video_token_id is None else {"video_token_index": video_token_id}))
    model = _perturbed(LlavaOnevisionForConditionalGeneration(cfg).eval(), head_scale, dtype)
    model.save_pretrained(path)
    tiny.write_tokenizer_files(path, TOKENIZER, 32)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "LlavaOnevisionImageProcessor", "size": {"height": 32, "width": 32},
                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                   "image_grid_pinpoints": ONEVISION_PINPOINTS, "do_pad": True}, f)
    return model


QWEN_PATCH = 4  # tiny patches: a merged patch (one LM token) is 8 x 8 pixels
QWEN_PIXELS = {"min_pixels": 8 * 8 * 4, "max_pixels": 8 * 8 * 48}


# Qwen's layout with the testbed's words: each image between a vision-start token (BOS here) and ":", so
# that two images never touch (transformers' get_rope_index groups touching image tokens as one image)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}user: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + testbed_vocab.BOS
    + testbed_vocab.IMAGE + ":{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% else %}assistant: {{ message['content'][0]['text'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_qwen2_vl(path: str | os.PathLike, *, version: str = "2", num_kv_heads: int = 2, num_heads: int = 4,
                  seed: int = 0, text_layers: int = 2, vision_layers: int = 3, hidden: int = 64,
                  head_scale: float = 1.0, mrope_section=(2, 3, 3), dtype: str = "float32", rope_parameters=None,
                  tie_word_embeddings: bool = False):
    """Save a random Qwen2VLForConditionalGeneration (version "2") or Qwen2_5_VLForConditionalGeneration
    ("2.5": windowed vision attention with full-attention block 1, RMSNorm / SwiGLU blocks) with 4-pixel
    patches (the testbed tokenizer, a Qwen2VLImageProcessor config) to `path`; returns the torch model."""
    import json

    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, max_position_embeddings=1024,
                rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": list(mrope_section)},
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=tie_word_embeddings)
    common = dict(depth=vision_layers, num_heads=4, in_channels=3, patch_size=QWEN_PATCH, spatial_merge_size=2,
                  temporal_patch_size=2)
    if version == "2":
        vision = dict(embed_dim=32, hidden_size=hidden, mlp_ratio=2, hidden_act="quick_gelu", **common)
        cls, cfg_cls = Qwen2VLForConditionalGeneration, Qwen2VLConfig
    else:  # 16-pixel windows: 2 x 2 merged patches each; block 1 attends over the whole image
        vision = dict(hidden_size=32, out_hidden_size=hidden, intermediate_size=48, hidden_act="silu",
                      window_size=16, fullatt_block_indexes=[1], **common)
        cls, cfg_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig
    cfg = cfg_cls(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID, video_token_id=PAD_ID,
                  vision_start_token_id=BOS_ID, tie_word_embeddings=tie_word_embeddings)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.lm_head.weight.mul_(head_scale)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(path)
    tiny.write_tokenizer_files(path, TOKENIZER, 32)
    with open(os.path.join(path, "chat_template.json"), "w") as f:
        json.dump({"chat_template": QWEN_TEMPLATE}, f)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", "patch_size": QWEN_PATCH, "merge_size": 2,
                   "temporal_patch_size": 2, **QWEN_PIXELS, "image_mean": [0.5, 0.4, 0.3],
                   "image_std": [0.2, 0.25, 0.3]}, f)
    return model
