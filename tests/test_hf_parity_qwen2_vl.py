"""Qwen2-VL and Qwen2.5-VL (native-resolution vision tower, 2 x 2 patch merger, M-RoPE, decoding from the
rope deltas) against transformers on tiny random checkpoints (no downloads)."""

import numpy as np
import pytest
import torch
from hf_fixtures import EOS_ID, IMAGE_TOKEN_ID, PAD_ID, make_qwen2_vl
from PIL import Image

import vkv_jax

# (h, w): below min_pixels (upsampled), above max_pixels (downsampled), both orientations, odd sizes
SIZES = [(37, 53), (61, 29), (100, 33), (9, 7), (120, 160), (16, 16)]


def image(h, w, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2_vl", "qwen2_5_vl"])
def qwen(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"qwen{request.param}")
    hf = make_qwen2_vl(path, version=request.param, head_scale=10.0)
    return hf, vkv_jax.load(path), path


def hf_processor(path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(path)


def hf_inputs(path, inputs, images):
    """transformers' forward arguments for our prepared batch (the same ids; its processor's pixels)."""
    out = hf_processor(path)(images, return_tensors="np")
    ids = torch.tensor(inputs.input_ids, dtype=torch.long)
    return dict(input_ids=ids, attention_mask=torch.tensor(inputs.valid, dtype=torch.long),
                pixel_values=torch.tensor(out["pixel_values"]), image_grid_thw=torch.tensor(out["image_grid_thw"]),
                mm_token_type_ids=(ids == IMAGE_TOKEN_ID).int())


def test_processor_equals_transformers(qwen):
    _, ours, path = qwen
    ref = hf_processor(path)
    for i, (h, w) in enumerate(SIZES):
        im = image(h, w, seed=i)
        out = ref(im, return_tensors="np")
        patches, grid = ours.processor.process(im)
        assert tuple(out["image_grid_thw"][0]) == grid, (h, w)
        np.testing.assert_array_equal(patches, out["pixel_values"])
        assert ours.processor.num_tokens(h, w) == ref.get_number_of_image_patches(h, w) // 4


def test_rope_positions_and_deltas_match_transformers(qwen):
    hf, ours, path = qwen
    images = [image(37, 53, 1), image(100, 33, 2)]
    inputs = ours.prepare(images, ["what colour is the circle?", "is there a red square?"])
    kw = hf_inputs(path, inputs, images)
    pos, deltas = hf.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], kw["image_grid_thw"],
                                          attention_mask=kw["attention_mask"])
    np.testing.assert_array_equal(np.asarray(inputs.pixel_values.positions), pos.numpy())
    from vkv_jax.models import qwen2_vl
    nxt = np.asarray(qwen2_vl.next_positions(np.asarray(inputs.valid), inputs.pixel_values))
    np.testing.assert_array_equal(nxt, inputs.valid.sum(1) + deltas[:, 0].numpy())
    assert (deltas < 0).all()  # an image's tokens span fewer positions than tokens


@pytest.mark.parametrize("rows", [[(61, 29)], [(37, 53), (120, 160)], [[(37, 53), (16, 16)], (100, 33)],
                                  [[(37, 53)], []]],
                         ids=["batch1", "two_sizes", "two_images_in_a_row", "a_row_without_images"])
def test_logits_match_transformers_f32(qwen, rows):
    hf, ours, path = qwen
    images = [[image(*s, seed=i) for s in r] if isinstance(r, list) else image(*r, seed=9 + i)
              for i, r in enumerate(rows)]
    inputs = ours.prepare(images, ["what colour is the circle?", "is there a red square?"][:len(rows)])
    if len(rows) > 1:
        assert len(set(inputs.visual_tokens)) > 1
    flat = [im for r in images for im in (r if isinstance(r, list) else [r])]
    with torch.no_grad():
        ref = hf(**hf_inputs(path, inputs, flat)).logits.float().numpy()
    got = np.asarray(ours.logits(inputs.input_ids, inputs.pixel_values, inputs.valid))
    mask = inputs.valid
    err = np.abs(ref - got)[mask].max() / np.abs(ref[mask]).max()
    assert err <= 1e-4, f"max abs diff relative to the logit scale {err:.2e}"


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_matches_transformers(qwen, batch):
    hf, ours, path = qwen
    images = [image(61, 29, seed=1), image(120, 160, seed=2)][:batch]
    inputs = ours.prepare(images, ["what colour is the circle?", "is there a red square?"][:batch])
    if batch == 2:
        assert len(set(inputs.visual_tokens)) == 2 and not inputs.valid.all()
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(path, inputs, images), max_new_tokens=20, do_sample=False,
                          eos_token_id=EOS_ID, pad_token_id=PAD_ID)[:, inputs.input_ids.shape[1]:].numpy()
    out = vkv_jax.generate(ours, inputs, max_new_tokens=20)
    assert ref.shape[1] >= 10  # the answers run long enough to exercise the decode positions
    np.testing.assert_array_equal(out.tokens[:, :ref.shape[1]], ref)


def test_tied_embeddings_checkpoint(tmp_path):
    """Qwen2-VL-2B ties lm_head to the embeddings (top-level tie_word_embeddings in transformers v5)."""
    hf = make_qwen2_vl(tmp_path, tie_word_embeddings=True, text_layers=1, vision_layers=1, seed=3)
    ours = vkv_jax.load(tmp_path)
    assert "lm_head" not in ours.params["lm"] and ours.config.text.tie_word_embeddings
    images = [image(37, 53, 1)]
    inputs = ours.prepare(images, ["what colour is the circle?"])
    with torch.no_grad():
        ref = hf(**hf_inputs(tmp_path, inputs, images)).logits.float().numpy()
    got = np.asarray(ours.logits(inputs.input_ids, inputs.pixel_values, inputs.valid))
    assert np.abs(ref - got)[inputs.valid].max() / np.abs(ref[inputs.valid]).max() <= 1e-4


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_bf16_argmax_agrees(tmp_path, version):
    """The bf16 criterion of tests/test_hf_parity.py (see there) on two rows of different visual counts."""
    from _helpers import assert_bf16_argmax_agrees
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2VLForConditionalGeneration if version == "2" else Qwen2_5_VLForConditionalGeneration
    make_qwen2_vl(tmp_path, version=version, dtype="bfloat16", head_scale=30.0)  # 93% / 95% decisive
    hf = cls.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.bfloat16).eval()
    hf32 = cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = vkv_jax.load(tmp_path, dtype="bfloat16")
    images = [image(61, 29, 1), image(120, 160, 2)]
    inputs = ours.prepare(images, ["what colour is the circle? is there a red square? how many red objects?"] * 2)
    kw = hf_inputs(tmp_path, inputs, images)
    with torch.no_grad():
        truth = hf32(**kw).logits.float().numpy()
        kw["pixel_values"] = kw["pixel_values"].to(torch.bfloat16)
        ref = hf(**kw).logits.float().numpy().argmax(-1)
    got = np.asarray(ours.logits(inputs.input_ids, inputs.pixel_values, inputs.valid)).argmax(-1)
    assert_bf16_argmax_agrees(truth, ref, got, inputs.valid)
