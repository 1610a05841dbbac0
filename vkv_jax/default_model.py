"""The default model of `vkv_jax.load()` and `python -m vkv_jax.generate`.

The trained tiny LVLM ships inside the package at `vkv_jax/testbed/assets/tiny-llava` (HF LLaVA
layout), trained by `python -m vkv_jax.testbed.train` (see `vkv_jax/testbed/README.md`). Loading it
prints its measured test-split exact match once per process. Without the shipped directory (a broken
install), a *random* checkpoint with the same architecture and the testbed's tokenizer is written to a
local cache directory, and a warning says plainly that its answers are meaningless.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import warnings

SHIPPED = pathlib.Path(__file__).resolve().parent / "testbed" / "assets" / "tiny-llava"
RANDOM_NAME = "random-tiny-llava-v2"
# Greedy exact match of the shipped weights on test examples 0..999 (64-px shapes, seed 0), measured with
# `python -m vkv_jax.testbed.train --evaluate vkv_jax/testbed/assets/tiny-llava --split test --limit 1000`;
# tests/test_shipped_model.py fails if the shipped weights fall below it (minus a margin).
SHIPPED_TEST_EXACT_MATCH = 0.996
SHIPPED_QUESTION_ONLY_BASELINE = 0.42  # answering from the question alone (README)

# LLaVA-1.5's conversation format, as a jinja template over HF multimodal messages.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_ANNOUNCED = False


def cache_dir() -> pathlib.Path:
    root = os.environ.get("VKV_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vkv_jax")
    return pathlib.Path(root)


def is_trained() -> bool:
    return (SHIPPED / "config.json").exists()


def describe() -> str:
    """One line on what the shipped model is and how well it answers."""
    acc = "not measured" if SHIPPED_TEST_EXACT_MATCH is None else f"{SHIPPED_TEST_EXACT_MATCH:.1%}"
    note = ""
    if SHIPPED_TEST_EXACT_MATCH is not None and SHIPPED_TEST_EXACT_MATCH < 0.95:
        note = " (below the 95% target; see vkv_jax/testbed/README.md)"
    return (f"vkv_jax default model: the trained tiny LLaVA testbed model at {SHIPPED}; test-split exact match "
            f"{acc}{note}, vs {SHIPPED_QUESTION_ONLY_BASELINE:.0%} answering from the question alone")


def path() -> str:
    """Directory of the default checkpoint (the shipped trained model, else a cached random one)."""
    global _ANNOUNCED
    if is_trained():
        if not _ANNOUNCED:
            print(describe(), file=sys.stderr)
            _ANNOUNCED = True
        return str(SHIPPED)
    target = cache_dir() / RANDOM_NAME
    if not (target / "config.json").exists():
        write_random_checkpoint(target)
    warnings.warn(f"no trained default model is shipped (missing {SHIPPED}): using a RANDOM tiny LLaVA "
                  f"checkpoint at {target} (its answers are meaningless; pass a real checkpoint directory "
                  "to use one)", stacklevel=3)
    return str(target)


def tiny_config(vocab_size: int, image_token_id: int, image_size: int = 64, patch_size: int = 8, *,
                hidden_size: int = 64, intermediate_size: int = 172, num_layers: int = 4, num_heads: int = 4,
                num_kv_heads: int = 2, vision_hidden_size: int = 64, vision_intermediate_size: int = 256,
                vision_layers: int = 2, vision_heads: int = 4, head_dim: int | None = None,
                rope_theta: float = 10000.0):
    """The tiny LLaVA architecture of the testbed: CLIP-style ViT (patch 8, features of its last layer),
    2-layer GELU MLP projector, a Llama LM with GQA (4 query / 2 kv heads). 64-px images give one
    visual token per grid cell (64 tokens); the recipe study's sizes (~0.3M parameters). `head_dim`
    defaults to hidden_size // num_heads."""
    from vkv_jax.models.config import LlavaConfig, RopeConfig, TextConfig, VisionConfig

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
