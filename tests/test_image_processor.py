"""vkv_jax.models.image_processor against transformers' PIL CLIP / LLaVA image processors."""

import json

import numpy as np
import pytest
from PIL import Image

from vkv_jax.models.image_processor import ImageProcessor

TINY = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}


def _rgb(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _pil(mode, h, w, seed=0):
    rs = np.random.RandomState(seed)
    if mode == "L":
        return Image.fromarray(rs.randint(0, 256, (h, w), dtype=np.uint8), mode="L")
    if mode == "RGBA":
        arr = rs.randint(0, 256, (h, w, 4), dtype=np.uint8)
        arr[: h // 2, :, 3] = 0  # fully transparent half: composited onto white, not kept as-is
        return Image.fromarray(arr, mode="RGBA")
    if mode == "P":  # palette image with a transparent index (the `transparency` info path)
        im = Image.fromarray(_rgb(h, w, seed)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        im.info["transparency"] = 3
        return im
    return Image.fromarray(_rgb(h, w, seed))


@pytest.fixture(scope="module")
def hf_pil():
    pytest.importorskip("transformers")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    return {"clip": CLIPImageProcessorPil, "llava": LlavaImageProcessorPil}


def _hf_pixels(proc, images):
    return np.asarray(proc(images, return_tensors="np")["pixel_values"])


CASES = [  # (mode, h, w): non-square both ways, odd sizes, smaller than the crop, non-RGB modes
    ("RGB", 37, 53), ("RGB", 61, 29), ("L", 45, 33), ("RGBA", 40, 41), ("P", 33, 97), ("RGB", 17, 23),
]


@pytest.mark.parametrize("mode,h,w", CASES)
def test_equals_clip_pil_processor(hf_pil, mode, h, w):
    image = _pil(mode, h, w)
    ours = ImageProcessor.from_config(TINY)([image])
    ref = _hf_pixels(hf_pil["clip"](**TINY), [image])
    assert ours.shape == (1, 3, 32, 32) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [
    {"size": {"shortest_edge": 30}, "crop_size": {"height": 24, "width": 28}, "resample": 2},
    {"size": 30, "crop_size": 24},                                     # legacy int sizes
    {"size": {"height": 20, "width": 36}, "do_center_crop": False, "resample": 1},
    {"do_resize": False, "crop_size": {"height": 48, "width": 40}},    # crop larger than image: zero pad
    {**TINY, "do_normalize": False, "image_mean": [0.5, 0.5, 0.5]},
    {**TINY, "do_rescale": False, "image_std": [0.5, 0.25, 0.125]},
])
def test_equals_clip_pil_processor_configs(hf_pil, config):
    images = [_pil("RGB", 37, 53, 1), _pil("RGBA", 45, 31, 2)]
    ours = ImageProcessor.from_config(config)(images)
    ref = _hf_pixels(hf_pil["clip"](**config), images)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_numpy_inputs_equal_transformers(hf_pil):
    rs = np.random.RandomState(3)
    arrays = [rs.randint(0, 256, (29, 51, c), dtype=np.uint8) for c in (3, 4, 1)]
    ours = ImageProcessor.from_config(TINY)(arrays)
    ref = _hf_pixels(hf_pil["clip"](**TINY), arrays)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    # A grey [H, W] array is the same picture as its 1-channel version.
    np.testing.assert_array_equal(ImageProcessor.from_config(TINY)(arrays[2][..., 0]), ours[2:])


def test_file_paths_equal_transformers(hf_pil, tmp_path):
    paths = []
    for i, (mode, h, w) in enumerate([("RGB", 37, 53), ("RGBA", 40, 30)]):
        paths.append(str(tmp_path / f"im{i}.png"))
        _pil(mode, h, w, i).save(paths[-1])
    # A JPEG whose EXIF says "rotate 90": transformers' load_image applies the orientation.
    exif = Image.Exif()
    exif[0x0112] = 6
    paths.append(str(tmp_path / "rotated.jpg"))
    _pil("RGB", 24, 40).save(paths[-1], exif=exif)
    ours = ImageProcessor.from_config(TINY)(paths)
    ref = _hf_pixels(hf_pil["clip"](**TINY), paths)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    upright = ImageProcessor.from_config({"do_resize": False, "do_center_crop": False})(paths[-1])
    assert upright.shape == (1, 3, 40, 24)


def test_llava_pad_to_square_equals_transformers(hf_pil):
    images = [_pil("RGB", 37, 53), _pil("RGB", 61, 29, 1)]
    cfg = {**TINY, "image_processor_type": "LlavaImageProcessor", "do_pad": True}
    ours = ImageProcessor.from_config(cfg)(images)
    ref = _hf_pixels(hf_pil["llava"](**TINY, do_pad=True), images)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    # Padding changes the picture (the unpadded centre crop differs).
    assert not np.allclose(ours, ImageProcessor.from_config(TINY)(images))


def test_from_dir_reads_what_transformers_saves(hf_pil, tmp_path):
    """preprocessor_config.json from the image processor, processor_config.json from a full processor."""
    config = {"size": {"shortest_edge": 30}, "crop_size": {"height": 24, "width": 28}, "resample": 2}
    hf = hf_pil["clip"](**config)
    hf.save_pretrained(tmp_path / "a")
    proc = ImageProcessor.from_dir(tmp_path / "a")
    assert proc.image_size == (24, 28) and proc.resample == 2
    image = _pil("RGB", 50, 40)
    np.testing.assert_allclose(proc([image]), _hf_pixels(hf, [image]), atol=1e-5, rtol=0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "processor_config.json").write_text(json.dumps(
        {"image_processor": json.loads((tmp_path / "a" / "preprocessor_config.json").read_text())}))
    assert ImageProcessor.from_dir(tmp_path / "b") == proc


def test_defaults_are_clip_224():
    proc = ImageProcessor.from_config({"image_processor_type": "CLIPImageProcessor"})
    assert proc.image_size == (224, 224) and proc.resample == Image.Resampling.BICUBIC
    out = proc(_rgb(300, 250))
    assert out.shape == (1, 3, 224, 224) and out.dtype == np.float32


def test_resize_uses_truncated_long_side():
    # 37x53 to shortest edge 32: long side int(32 * 53 / 37) = 45 (45.8 truncated, not rounded).
    proc = ImageProcessor.from_config({"size": {"shortest_edge": 32}, "do_center_crop": False})
    assert proc(_rgb(37, 53)).shape == (1, 3, 32, 45)
    assert proc(_rgb(53, 37)).shape == (1, 3, 45, 32)
    assert proc.image_size is None


def test_errors(tmp_path):
    proc = ImageProcessor.from_config(TINY)
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        proc([str(missing)])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        proc(bad)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        proc(np.full((8, 8, 3), 2.0, np.float32))  # floats must be in [0, 1]
    with pytest.raises(ValueError, match="shape"):
        proc(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="no images"):
        proc([])
    with pytest.raises(ValueError, match="Qwen2VLImageProcessor"):
        ImageProcessor.from_config({"image_processor_type": "Qwen2VLImageProcessor"})
    with pytest.raises(ValueError, match="process_anyres"):  # an anyres processor has no one-crop output
        ImageProcessor.from_config({"image_processor_type": "LlavaNextImageProcessor"})([_rgb(8, 8)])
    with pytest.raises(ValueError, match="size"):
        ImageProcessor.from_config({"size": {"longest_edge": 10}})
    with pytest.raises(ValueError, match="resample"):
        ImageProcessor.from_config({"resample": 9})
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_dir(tmp_path)
    with pytest.raises(ValueError, match="different shapes"):
        ImageProcessor.from_config({"size": {"shortest_edge": 16}, "do_center_crop": False})(
            [_rgb(16, 20), _rgb(16, 24)])
