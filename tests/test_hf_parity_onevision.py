"""LLaVA-OneVision (SigLIP tower, Qwen2 LM, anyres-max tiling with bilinear downsampling, several images
per prompt) against transformers on a tiny random checkpoint (no downloads)."""

import numpy as np
import pytest
import torch
from _helpers import assert_bf16_argmax_agrees
from hf_fixtures import EOS_ID, PAD_ID, make_llava_onevision
from PIL import Image

import vkv_jax
from vkv_jax.models import anyres

# (h, w): a grid small enough to keep, ones downsampled bilinearly (anyres_max_4), both orientations
SIZES = [(37, 53), (61, 29), (90, 95), (20, 100), (100, 33)]


def image(h, w, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    path = tmp_path_factory.mktemp("onevision")
    hf = make_llava_onevision(path, head_scale=30.0)
    return hf, vkv_jax.load(path), path


def hf_images(path, rows):
    """transformers' processor output for the batch (rows of images: a list per prompt)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    out = LlavaOnevisionImageProcessorPil.from_pretrained(path)(rows, return_tensors="np")
    return dict(pixel_values=torch.tensor(out["pixel_values"]), image_sizes=torch.tensor(out["image_sizes"]),
                batch_num_images=torch.tensor(out["batch_num_images"]))


def as_rows(images):
    return [im if isinstance(im, list) else [im] for im in images]


def test_token_counts_match_transformers(ov):
    hf, ours, path = ov
    cfg, downsampled = ours.config, 0
    for h, w in SIZES:
        kw = hf_images(path, [[image(h, w)]])
        with torch.no_grad():
            feats = hf.model.get_image_features(**kw).pooler_output
        lay = anyres.anyres_layout(h, w, 32, 4, cfg.image_grid_pinpoints, True, cfg.max_patches)
        assert lay.num_tokens == feats[0].shape[0], (h, w)
        downsampled += lay.source.shape[1] == 4
    assert downsampled >= 1  # the bilinear path is exercised


@pytest.mark.parametrize("rows", [
    [(90, 95)],                                   # batch 1, a downsampled grid
    [(61, 29), (20, 100)],                        # two rows, different aspect ratios -> different counts
    [[(64, 64), (100, 33)], (37, 53)],            # a row with two images (not tiled) beside a tiled one
], ids=["batch1", "two_aspects", "two_images_in_a_row"])
def test_logits_match_transformers_f32(ov, rows):
    hf, ours, path = ov
    images = [[image(*s, seed=i) for s in r] if isinstance(r, list) else image(*r, seed=9)
              for i, r in enumerate(rows)]
    inputs = ours.prepare(images, ["what colour is the circle?", "is there a red square?"][:len(rows)])
    if len(rows) > 1:
        assert len(set(inputs.visual_tokens)) > 1
    mask = inputs.valid
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(inputs.input_ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(np.where(mask, np.cumsum(mask, 1) - 1, 1)),
                 **hf_images(path, as_rows(images))).logits.float().numpy()
    got = np.asarray(ours.logits(inputs.input_ids, inputs.pixel_values, inputs.valid))
    err = np.abs(ref - got)[mask].max() / np.abs(ref[mask]).max()
    assert err <= 1e-4, f"max abs diff relative to the logit scale {err:.2e}"


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_matches_transformers(ov, batch):
    hf, ours, path = ov
    images = [image(90, 95, seed=1), image(20, 100, seed=2)][:batch]
    inputs = ours.prepare(images, ["what colour is the circle?", "is there a red square?"][:batch])
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(inputs.input_ids, dtype=torch.long),
                          attention_mask=torch.tensor(inputs.valid, dtype=torch.long), max_new_tokens=20,
                          do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                          **hf_images(path, as_rows(images)))[:, inputs.input_ids.shape[1]:].numpy()
    out = vkv_jax.generate(ours, inputs, max_new_tokens=20)
    np.testing.assert_array_equal(out.tokens[:, :ref.shape[1]], ref)


def test_bf16_argmax_agrees(tmp_path):
    """The bf16 criterion of tests/test_hf_parity.py (see there) on OneVision rows of different counts,
    one of them downsampled bilinearly and one holding two untiled images."""
    from transformers import LlavaOnevisionForConditionalGeneration

    make_llava_onevision(tmp_path, dtype="bfloat16", head_scale=30.0, seed=1)  # (seed 0: 78% decisive)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager",
                                                                dtype=torch.bfloat16).eval()
    hf32 = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = vkv_jax.load(tmp_path, dtype="bfloat16")
    rows = [image(90, 95, 1), [image(61, 29, 2), image(37, 53, 4)], image(20, 100, 3)]
    inputs = ours.prepare(rows, ["what colour is the circle? is there a red square? how many red objects are there?"]
                          * 3)
    mask = inputs.valid
    kw = dict(input_ids=torch.tensor(inputs.input_ids, dtype=torch.long),
              attention_mask=torch.tensor(mask, dtype=torch.long),
              position_ids=torch.tensor(np.where(mask, np.cumsum(mask, 1) - 1, 1)))
    images = hf_images(tmp_path, as_rows(rows))
    with torch.no_grad():
        truth = hf32(**kw, **images).logits.float().numpy()
        images["pixel_values"] = images["pixel_values"].to(torch.bfloat16)
        ref = hf(**kw, **images).logits.float().numpy().argmax(-1)
    got = np.asarray(ours.logits(inputs.input_ids, inputs.pixel_values, inputs.valid)).argmax(-1)
    assert_bf16_argmax_agrees(truth, ref, got, mask)
