"""Qwen2-VL user errors, raised before anything compiles, and the generate command line on a saved tiny
checkpoint."""

import dataclasses
import json

import numpy as np
import pytest
from hf_fixtures import make_qwen2_vl
from PIL import Image

import vkv_jax
from vkv_jax.models.qwen2_vl_processor import QwenImageProcessor, smart_resize


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_err")
    make_qwen2_vl(path, text_layers=1, vision_layers=1)
    return path


def test_extreme_aspect_ratio_is_refused_like_transformers(saved):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    with pytest.raises(ValueError, match="aspect ratio"):
        hf_smart_resize(2, 500, 8, 256, 3072)
    model = vkv_jax.load(saved)
    with pytest.raises(ValueError, match=r"image 1: a 500x2 image has an aspect ratio of 250"):
        model.prepare([np.zeros((20, 20, 3), np.uint8), np.zeros((2, 500, 3), np.uint8)], ["a", "b"])


def test_images_below_min_pixels_are_upsampled_as_transformers_does():
    """transformers resizes a small image up to min_pixels (it never refuses one): so do we."""
    assert smart_resize(3, 4, 8, 256, 3072) == (16, 24)
    assert QwenImageProcessor(min_pixels=256, max_pixels=3072, patch_size=4).num_tokens(3, 4) == 6


@pytest.mark.parametrize("config,match", [
    ({"min_pixels": 5000, "max_pixels": 3000}, "min_pixels 5000 exceeds max_pixels 3000"),
    ({"min_pixels": 100, "max_pixels": 500, "patch_size": 14}, "below one merged patch"),
    ({"merge_size": 0}, "merge_size must be an int >= 1"),
])
def test_bad_processor_config(config, match):
    with pytest.raises(ValueError, match=match):
        QwenImageProcessor.from_config(config)


def test_more_visual_tokens_than_the_context(saved):
    model = vkv_jax.load(saved)
    model.processor = dataclasses.replace(model.processor, max_pixels=8 * 8 * 3000)
    big = np.zeros((400, 400, 3), np.uint8)  # 50 x 50 merged patches: 2500 tokens, context 1024
    with pytest.raises(ValueError, match=r"prompt 0 is \d+ tokens \(2500 of them for its 1 image.*context is 1024"):
        model.prepare([big], ["what is it?"])


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "yarn", "factor": 2.0}, "unsupported rope type 'yarn'"),
    ({"rope_type": "dynamic", "factor": 2.0}, "unsupported rope type 'dynamic'"),
    ({"rope_type": "default", "mrope_section": [2, 3]}, "mrope_section must be 3 non-negative ints"),
])
def test_unsupported_rope_scaling(saved, tmp_path, rope, match):
    import shutil

    shutil.copytree(saved, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["text_config"]["rope_parameters"] = {"rope_theta": 10000.0, "mrope_section": [2, 3, 3], **rope}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        vkv_jax.load(tmp_path / "m")


def test_v4_config_layout_with_rope_scaling_mrope_loads(saved, tmp_path):
    """The hub's Qwen2-VL-7B layout: text fields at the top level, rope_scaling {type: mrope}."""
    import shutil

    shutil.copytree(saved, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    text = cfg.pop("text_config")
    text.pop("rope_parameters")
    cfg.update(text, model_type="qwen2_vl", rope_theta=10000.0,
               rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert vkv_jax.load(tmp_path / "m").config == vkv_jax.load(saved).config


def test_generate_cli_on_a_saved_checkpoint(saved, tmp_path, capsys):
    from vkv_jax.cli.generate import main

    Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["--model", str(saved), "--image", str(tmp_path / "a.png"), "--prompt", "what colour?",
                 "--method", "snapkv", "--budget", "0.5", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["stats"]["visual_tokens"] == 35 and out["stats"]["method"] == "snapkv"
    assert len(out["tokens"]) == 3
