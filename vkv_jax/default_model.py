"""The default model of `vkv_jax.load()` and `python -m vkv_jax.generate`.

The trained tiny LVLM ships inside the package at `vkv_jax/testbed/assets/tiny-llava` (HF LLaVA
layout). Until it exists, a *random* checkpoint with the same architecture and the testbed's
tokenizer is written to a local cache directory, and a warning says plainly that its answers are
meaningless.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

SHIPPED = pathlib.Path(__file__).resolve().parent / "testbed" / "assets" / "tiny-llava"
RANDOM_NAME = "random-tiny-llava-v1"

# LLaVA-1.5's conversation format, as a jinja template over HF multimodal messages.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def cache_dir() -> pathlib.Path:
    root = os.environ.get("VKV_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vkv_jax")
    return pathlib.Path(root)


def is_trained() -> bool:
    return (SHIPPED / "config.json").exists()


def path() -> str:
    """Directory of the default checkpoint (the shipped trained model, else a cached random one)."""
    if is_trained():
        return str(SHIPPED)
    target = cache_dir() / RANDOM_NAME
    if not (target / "config.json").exists():
        write_random_checkpoint(target)
    warnings.warn(f"no trained default model is shipped yet: using a RANDOM tiny LLaVA checkpoint at {target} "
                  "(its answers are meaningless; pass a real checkpoint directory to use one)", stacklevel=3)
    return str(target)


def tiny_config(vocab_size: int, image_token_id: int, image_size: int = 128, patch_size: int = 8):
    """The tiny LLaVA architecture of the testbed: CLIP-style ViT (patch 8), 2-layer MLP projector,
    a 4-layer Llama LM with GQA (4 query / 2 kv heads)."""
    from vkv_jax.models.config import LlavaConfig, TextConfig, VisionConfig

    text = TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=1024)
    vision = VisionConfig(hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4,
                          image_size=image_size, patch_size=patch_size, hidden_act="gelu")
    return LlavaConfig(text=text, vision=vision, image_token_id=image_token_id, vision_feature_layer=-1)


def write_tokenizer_files(directory: str | os.PathLike, tokenizer, image_size: int) -> None:
    """tokenizer.json + special-token config + chat template + CLIP preprocessor config."""
    from vkv_jax.testbed import vocab

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


def write_random_checkpoint(directory: str | os.PathLike, seed: int = 0) -> None:
    from vkv_jax.models.loading import random_params
    from vkv_jax.models.saving import save_checkpoint
    from vkv_jax.testbed import vocab

    tok = vocab.build_tokenizer()
    cfg = tiny_config(tok.get_vocab_size(), tok.token_to_id(vocab.IMAGE))
    # written under a private name, then renamed: a half-written checkpoint is never picked up, and
    # two processes racing to create it both end with a complete one
    tmp = pathlib.Path(f"{directory}.tmp-{os.getpid()}")
    save_checkpoint(tmp, random_params(cfg, seed), cfg)
    write_tokenizer_files(tmp, tok, cfg.vision.image_size)
    try:
        os.rename(tmp, directory)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
