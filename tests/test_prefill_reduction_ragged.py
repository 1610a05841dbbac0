"""FastV and LightKV (in-prefill reductions) on batches whose rows hold different numbers of visual tokens
(images of different aspect ratios, a row with two images, a text-only row): each row keeps exactly what it
keeps when run alone as a batch of one (the same kept positions and tags in every layer and kv head) and
decodes the same greedy tokens, on tiny LLaVA-NeXT, LLaVA-OneVision and Qwen2-VL checkpoints."""

import numpy as np
import pytest
from hf_fixtures import make_llava_next, make_llava_onevision, make_qwen2_vl
from PIL import Image

import vkv_jax
from vkv_jax.inputs import visual_token_bound
from vkv_jax.methods import Compression, build

MAKERS = {"llava_next": make_llava_next, "llava_onevision": make_llava_onevision, "qwen2_vl": make_qwen2_vl}
STEPS = 4
PROMPTS = ["is there a red square?", "what colour is the circle?", "how many shapes?", "say hello"]


def image(h, w, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=sorted(MAKERS))
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    MAKERS[request.param](path, num_heads=4, num_kv_heads=2, head_scale=10.0, text_layers=3)
    return vkv_jax.load(path)


def _rows(model):
    """Four rows of four different visual counts; the first holds two images, the last none (text only: the
    batch's fewest visual count is 0, which once switched the reduction off for every row)."""
    if model.config.model_type.startswith("qwen"):
        return [[image(48, 64, 1), image(40, 40, 4)], [image(64, 32, 2)], [image(56, 56, 3)], []]
    return [[image(37, 53, 1), image(20, 100, 4)], [image(61, 29, 2)], [image(64, 64, 3)], []]


def _kept(layout, b):
    """Row b's decode-start cache: per (layer, kv head) the sorted (position, tag) pairs of its live slots."""
    pos, tag, length = layout["pos"][:, b], layout["tag"][:, b], layout["length"][:, b]
    L, H, _ = pos.shape
    out = []
    for layer in range(L):
        for h in range(H):
            n = int(length[layer, h])
            live = pos[layer, h, :n] >= 0
            pairs = sorted(zip(pos[layer, h, :n][live].tolist(), tag[layer, h, :n][live].tolist()))
            out.append(pairs)
    return out


@pytest.mark.parametrize("compression", [Compression("fastv", budget=0.5, k=1),
                                         Compression("lightkv", merge_layers=(0, 1), merge_windows=(2, 1))],
                         ids=["fastv", "lightkv-2-stages"])
def test_each_row_reduces_and_decodes_as_it_does_alone(model, compression):
    rows = _rows(model)
    batch = model.prepare(rows, PROMPTS)
    assert len(set(batch.visual_tokens)) == 4 and batch.visual_tokens[-1] == 0  # four counts, one text-only row
    out = vkv_jax.generate(model, batch, STEPS, compression, return_layout=True)
    vision = []
    for b, (imgs, prompt) in enumerate(zip(rows, PROMPTS)):
        alone = model.prepare([imgs], [prompt])
        one = vkv_jax.generate(model, alone, STEPS, compression, return_layout=True)
        assert _kept(out.layout, b) == _kept(one.layout, 0), f"row {b}: keep-set differs from the row alone"
        np.testing.assert_array_equal(out.tokens[b], one.tokens[0])
        vision.append(one.stats["kept_vision_per_layer"])
    # the reduction took effect in every row with images, and the rows dropped different numbers of tokens
    # (dead filler in the batch)
    assert all(v[-1] < v[0] for v in vision[:-1]) and len({v[0] - v[-1] for v in vision}) > 2
    np.testing.assert_allclose(out.stats["kept_vision_per_layer"], np.mean(vision, axis=0))


def test_an_unbound_lightkv_still_needs_equal_counts(model):
    """LightKV without the batch's grids and counts (`inputs.bind_visual_layout` binds them) plans every row
    from the batch's static count, so rows of different counts are refused before compiling."""
    batch = model.prepare(_rows(model), PROMPTS)
    with pytest.raises(ValueError, match="same number of visual tokens"):
        visual_token_bound(model.config, batch, build(Compression("lightkv")))
