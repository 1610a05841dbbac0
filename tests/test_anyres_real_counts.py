"""Visual-token counts under the real LLaVA-NeXT (v1.6-mistral-7b: 336 px CLIP/14, 5 pinpoints) and
LLaVA-OneVision (384 px SigLIP/14, anyres_max_9, 1x1..6x6 pinpoints) geometries: our layout against
transformers' PIL processor + `get_image_features` on models with the real tower geometry (tiny widths)."""

import numpy as np
import pytest
import torch
from PIL import Image

from vkv_jax import configs
from vkv_jax.models import anyres
from vkv_jax.models.config import llava_config_from_hf

NEXT_PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
OV_PINS = [[a * 384, b * 384] for a in range(1, 7) for b in range(1, 7)]
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2)
# (width, height) -> tokens, as the closing note reports them; 2000x1900 is downsampled (anyres_max_9)
EXPECTED = {"llava_next": {(672, 672): 2928, (1000, 500): 1752, (336, 336): 1176},
            "llava_onevision": {(672, 672): 3699, (1000, 500): 4009, (336, 336): 1485, (2000, 1900): None}}


def _family(name):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    torch.manual_seed(0)
    if name == "llava_next":
        cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32,
                                                             intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=2),
                              text_config=LlamaConfig(**TEXT), image_grid_pinpoints=NEXT_PINS, image_token_index=63)
        proc = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                          image_grid_pinpoints=NEXT_PINS)
        return cfg, LlavaNextForConditionalGeneration(cfg).eval(), proc
    cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=32,
                                                                intermediate_size=64, num_hidden_layers=2,
                                                                num_attention_heads=2, vision_use_head=False),
                               text_config=Qwen2Config(**TEXT), image_grid_pinpoints=OV_PINS, image_token_index=63,
                               vision_aspect_ratio="anyres_max_9")
    proc = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=OV_PINS)
    return cfg, LlavaOnevisionForConditionalGeneration(cfg).eval(), proc


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_geometry_counts_equal_transformers(name):
    hf_cfg, model, proc = _family(name)
    ours = llava_config_from_hf(hf_cfg.to_dict())
    for (w, h), want in EXPECTED[name].items():
        out = proc([Image.fromarray(np.zeros((h, w, 3), np.uint8))], return_tensors="pt")
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=out["pixel_values"],
                                                   image_sizes=out["image_sizes"]).pooler_output
        lay = anyres.model_layout(ours, h, w)
        assert lay.num_tokens == feats[0].shape[0], (name, w, h)
        if want is not None:
            assert lay.num_tokens == want
        else:
            assert lay.source.shape[1] == 4  # bilinear downsampling taken


def test_presets_use_the_real_counts():
    assert configs.load_preset("llava-next-7b-mistral").visual_tokens == EXPECTED["llava_next"][(672, 672)]
    ov = configs.load_preset("llava-onevision-7b")
    assert ov.visual_tokens == anyres.model_layout(ov.config, 768, 768).num_tokens == 3699
