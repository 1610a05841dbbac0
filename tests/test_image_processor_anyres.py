"""The anyres image processors (LLaVA-NeXT, LLaVA-OneVision) against transformers' PIL ones, and the
anyres layout helpers against transformers' own functions."""

import numpy as np
import pytest
from PIL import Image

from vkv_jax.models import anyres
from vkv_jax.models.image_processor import ImageProcessor

NEXT = {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32}, "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32],
                                                                           [32, 96]]}
ONEVISION = {"image_processor_type": "LlavaOnevisionImageProcessor", "size": {"height": 32, "width": 32},
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
             "image_grid_pinpoints": [[a * 32, b * 32] for a in range(1, 4) for b in range(1, 4)]}
SIZES = [(37, 53), (61, 29), (64, 64), (20, 100), (100, 20), (33, 97), (8, 9), (150, 120)]


def _image(h, w, seed=0, mode="RGB"):
    im = Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))
    return im.convert(mode)


def _hf(name, config):
    pytest.importorskip("transformers")
    if name == "next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil as cls
    else:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil as cls,
        )
    return cls(**{k: v for k, v in config.items() if k != "image_processor_type"})


@pytest.mark.parametrize("name,config", [("next", NEXT), ("onevision", ONEVISION)])
def test_crops_equal_transformers(name, config):
    ours, hf = ImageProcessor.from_config(config), _hf(name, config)
    for i, (h, w) in enumerate(SIZES):
        im = _image(h, w, seed=i, mode="L" if i == 2 else "RGB")
        got = ours.process_anyres(ours.load_rgb(im))
        ref = hf([im], return_tensors="np")
        assert tuple(ref["image_sizes"][0]) == (h, w)
        np.testing.assert_array_equal(got, ref["pixel_values"][0][:len(got)])
        assert not ref["pixel_values"][0][len(got):].any()  # HF's extra crops are batch padding only


def test_onevision_multi_image_prompt_is_not_tiled():
    ours, hf = ImageProcessor.from_config(ONEVISION), _hf("onevision", ONEVISION)
    ims = [_image(37, 53, 1), _image(61, 29, 2)]
    ref = hf([ims], return_tensors="np")["pixel_values"]  # [2 images, 1 crop, 3, 32, 32]
    for im, r in zip(ims, ref):
        np.testing.assert_array_equal(ours.process_anyres(ours.load_rgb(im), tile=False), r)


@pytest.mark.parametrize("h,w", SIZES + [(1, 500), (500, 1), (336, 336), (672, 672), (500, 1000)])
def test_layout_helpers_equal_transformers(h, w):
    import torch
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert anyres.select_best_resolution(h, w, pins) == tuple(select_best_resolution((h, w), pins))
    for rows, cols in [(24, 48), (48, 24), (48, 48), (27, 81)]:
        r0, r1, c0, c1 = anyres.unpadded_extent(rows, cols, h, w)
        grid = torch.arange(rows * cols).reshape(1, rows, cols)
        ref = unpad_image(grid, (h, w))[0].numpy()
        np.testing.assert_array_equal(np.arange(rows * cols).reshape(rows, cols)[r0:r1, c0:c1], ref)


def test_bilinear_taps_equal_torch_interpolate():
    import torch

    rng = np.random.default_rng(0)
    for h, w, oh, ow in [(48, 40, 20, 17), (30, 90, 13, 38), (9, 9, 4, 4)]:
        x = rng.normal(size=(h, w)).astype(np.float32)
        y0, y1, wy = anyres.bilinear_taps(h, oh)
        x0, x1, wx = anyres.bilinear_taps(w, ow)
        wy, wx = wy[:, None], wx[None, :]
        got = ((1 - wy) * (1 - wx) * x[y0][:, x0] + (1 - wy) * wx * x[y0][:, x1] + wy * (1 - wx) * x[y1][:, x0]
               + wy * wx * x[y1][:, x1])
        ref = torch.nn.functional.interpolate(torch.tensor(x)[None, None], [oh, ow], mode="bilinear")[0, 0].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_bad_pinpoints_and_processor_errors():
    with pytest.raises(ValueError, match=r"unsupported image_grid_pinpoints entry \[50, 64\]: both sides must be "
                                         r"multiples of the vision tower's image_size \(32\)"):
        anyres.check_pinpoints([[32, 64], [50, 64]], 32)
    with pytest.raises(ValueError, match="non-empty list"):
        anyres.check_pinpoints([], 32)
    with pytest.raises(ValueError, match="image_grid_pinpoints must be a list"):
        ImageProcessor.from_config({**NEXT, "image_grid_pinpoints": [32, 64]})
