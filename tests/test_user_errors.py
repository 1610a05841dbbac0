"""Every mistake a user can make at the Python API, checkpoint or image level is a clear error.

Each bad input gets a ValueError / TypeError / FileNotFoundError naming the bad value and what is
expected, raised before anything compiles. Checkpoints are corrupted copies of the shipped tiny model
(1.4 MB, loads in well under a second; no torch needed).
"""

from __future__ import annotations

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import vkv_jax
from vkv_jax import accounting, checks, default_model
from vkv_jax.methods import Compression, build
from vkv_jax.models import safetensors_io

SHIPPED = default_model.SHIPPED


@pytest.fixture(scope="module")
def model():
    return vkv_jax.load()


def copy_model(tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(SHIPPED, dst)
    return dst


def edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, edit):
    st = safetensors_io.SafetensorsFile(path / "model.safetensors")
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    edit(tensors)
    safetensors_io.save(path / "model.safetensors", tensors)
    return tensors


def message(excinfo) -> str:
    return str(excinfo.value)


# ---------------------------------------------------------------- config.json / tokenizer.json


@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ('"llava"', "str"), ("3", "int")])
def test_config_that_is_not_an_object(tmp_path, text, kind):
    path = copy_model(tmp_path)
    (path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=f"config.json must hold a JSON object, got a {kind}") as e:
        vkv_jax.load(path)
    assert str(path / "config.json") in message(e)


def test_config_with_invalid_json_names_file_and_position(tmp_path):
    path = copy_model(tmp_path)
    (path / "config.json").write_text('{"model_type": "llava",\n  "text_config": }')
    with pytest.raises(ValueError, match=re.escape(f"{path / 'config.json'}: invalid JSON") + r".*line 2 column"):
        vkv_jax.load(path)


@pytest.mark.parametrize("section, field", [("text_config", "hidden_size"), ("text_config", "vocab_size"),
                                            ("text_config", "num_hidden_layers"), ("vision_config", "patch_size"),
                                            ("vision_config", "image_size")])
def test_config_missing_required_field_is_named(tmp_path, section, field):
    path = copy_model(tmp_path)
    edit_config(path, lambda c: c[section].pop(field))
    with pytest.raises(ValueError, match=f"{section} is missing the required field '{field}'"):
        vkv_jax.load(path)


@pytest.mark.parametrize("value, expected", [("big", "must be an int, got 'big'"), (0, "must be >= 1, got 0"),
                                             (64.5, "must be an int, got 64.5"), (True, "must be an int, got True")])
def test_config_field_of_wrong_type_or_range(tmp_path, value, expected):
    path = copy_model(tmp_path)
    edit_config(path, lambda c: c["text_config"].update(hidden_size=value))
    with pytest.raises(ValueError, match=re.escape(f"text_config.hidden_size {expected}")):
        vkv_jax.load(path)


def test_config_sections_must_be_objects_and_layers_in_range(tmp_path):
    path = copy_model(tmp_path)
    edit_config(path, lambda c: c.update(text_config=[64]))
    with pytest.raises(ValueError, match="text_config must be a JSON object, got list"):
        vkv_jax.load(path)
    edit_config(path, lambda c: c.pop("text_config"))
    with pytest.raises(ValueError, match="config.json has no 'text_config'"):
        vkv_jax.load(path)
    path = copy_model(tmp_path, "layer")
    edit_config(path, lambda c: c.update(vision_feature_layer=-9))  # a 2-layer tower: -3..2
    with pytest.raises(ValueError, match=r"vision_feature_layer -9 is out of range for a 2-layer vision tower: "
                                         r"use -3\.\.2"):
        vkv_jax.load(path)
    path = copy_model(tmp_path, "heads")
    edit_config(path, lambda c: c["text_config"].update(num_key_value_heads=3))
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        vkv_jax.load(path)


def test_tokenizer_json_that_is_not_json_names_the_file(tmp_path):
    path = copy_model(tmp_path)
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=re.escape(str(path / "tokenizer.json")) + ": not a valid tokenizer.json"):
        vkv_jax.load(path)


def test_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float32'\], got 'float16'"):
        vkv_jax.load(SHIPPED, dtype="float16")


# ---------------------------------------------------------------- tensors


@pytest.mark.parametrize("key", [
    "language_model.model.layers.0.self_attn.o_proj.weight",  # used to be reported as layer 1's
    "language_model.model.layers.3.self_attn.v_proj.weight",
    "language_model.model.layers.0.input_layernorm.weight",
    "language_model.lm_head.weight",  # used to load without a word
    "multi_modal_projector.linear_2.weight",  # used to load without a word
    "vision_tower.embeddings.patch_embedding.weight",
    "vision_tower.encoder.layers.1.mlp.fc1.bias",
])
def test_tensor_of_wrong_shape_is_named_with_both_shapes(tmp_path, key):
    path = copy_model(tmp_path)
    original = {}

    def shrink(t):
        original[key] = t[key].shape
        t[key] = np.ascontiguousarray(t[key][:-1])

    edit_tensors(path, shrink)
    found = (original[key][0] - 1,) + original[key][1:]
    with pytest.raises(ValueError) as e:
        vkv_jax.load(path)
    assert f"tensor {key!r} has shape {found}, but config.json implies {original[key]}" in message(e)


def test_integer_weights_are_named_with_their_dtype(tmp_path):
    path = copy_model(tmp_path)
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    edit_tensors(path, lambda t: t.update({key: (t[key] * 100).astype(np.int32)}))
    with pytest.raises(ValueError, match=re.escape(f"tensor {key!r} is stored as int32 (I32); weights must be "
                                                   "floating point")):
        vkv_jax.load(path)


@pytest.mark.parametrize("bad, counts", [(np.nan, "1 nan, 0 inf"), (-np.inf, "0 nan, 1 inf")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_finite_weights_are_named_unless_the_check_is_off(tmp_path, bad, counts, dtype):
    path = copy_model(tmp_path)
    key = "language_model.model.layers.2.mlp.up_proj.weight"

    def poison(t):
        t[key] = t[key].copy()
        t[key][5, 7] = bad

    tensors = edit_tensors(path, poison)
    with pytest.raises(ValueError, match=re.escape(f"tensor {key!r} holds non-finite values ({counts} of "
                                                   f"{tensors[key].size}")) as e:
        vkv_jax.load(path, dtype=dtype)
    assert "check_finite=False" in message(e)
    model = vkv_jax.load(path, dtype=dtype, check_finite=False)  # the opt-out loads it as stored
    up = np.asarray(model.params["lm"]["layers"][2]["up"], np.float32)  # [D, F]: the transpose of HF's
    assert not np.isfinite(up[7, 5]) and np.isfinite(np.delete(up.reshape(-1), 7 * up.shape[1] + 5)).all()


def test_weight_that_overflows_bfloat16_is_caught_after_the_cast(tmp_path):
    path = copy_model(tmp_path)
    key = "multi_modal_projector.linear_1.bias"
    edit_tensors(path, lambda t: t[key].__setitem__(0, 3.4e38))  # finite in float32, inf in bfloat16
    vkv_jax.load(path)
    with pytest.raises(ValueError, match=re.escape(f"tensor {key!r} holds non-finite values (0 nan, 1 inf of 64, "
                                                   "after the cast to bfloat16)")):
        vkv_jax.load(path, dtype="bfloat16")


def test_corrupt_shard_index_is_named(tmp_path):
    path = copy_model(tmp_path)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json: not a safetensors index.*weight_map"):
        vkv_jax.load(path)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "model.safetensors.index.json",
                                  "shard-1.safetensors"])
def test_checkpoint_file_that_is_a_folder_is_named(tmp_path, name):
    """A folder where a checkpoint file belongs is a ValueError naming its path, not IsADirectoryError."""
    path = copy_model(tmp_path)
    if name == "shard-1.safetensors":  # an index pointing at a shard that is a folder
        (path / "model.safetensors").unlink()
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": name}}))
    else:
        (path / name).unlink(missing_ok=True)
    (path / name).mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{path / name} is a folder")):
        vkv_jax.load(path)


# ---------------------------------------------------------------- images and prompts


def test_image_path_that_is_a_folder_or_missing(model, tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"image 0: image path {str(tmp_path)!r} is a directory")):
        model.prepare(images=[str(tmp_path)], prompts=["What is it?"])
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=re.escape(f"image 1: image file not found: {str(missing)!r}")):
        model.prepare(images=[np.zeros((8, 8, 3), np.uint8), missing], prompts=["a", "b"])


@pytest.mark.parametrize("limit", [1000, 100])  # PIL warns above the limit and refuses above twice it
def test_image_over_the_decompression_bomb_limit(model, tmp_path, monkeypatch, limit):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ValueError, match=re.escape(f"has 1600 pixels, over PIL's decompression-bomb limit of "
                                                   f"PIL.Image.MAX_IMAGE_PIXELS = {limit} pixels")) as e:
        model.prepare(images=[tmp_path / "big.png"], prompts=["What is it?"])
    assert "PIL.Image.MAX_IMAGE_PIXELS = <pixels>" in message(e)
    assert Image.MAX_IMAGE_PIXELS == limit  # the limit is not raised behind the user's back
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1600)
    model.prepare(images=[tmp_path / "big.png"], prompts=["What is it?"])  # at the limit: fine


def gradient16(h=64, w=64):
    return np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16)


def test_16_bit_png_matches_its_8_bit_version(model, tmp_path):
    g16 = gradient16()
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really stored as 16 bits
    Image.fromarray((g16 >> 8).astype(np.uint8)).save(tmp_path / "g8.png")
    p16 = model.prepare(images=[tmp_path / "g16.png"], prompts=["x"]).pixel_values
    p8 = model.prepare(images=[tmp_path / "g8.png"], prompts=["x"]).pixel_values
    one_level = 1 / 255 / min(model.processor.image_std)  # >> 8 and round(v / 257) differ by <= 1 level
    np.testing.assert_allclose(p16, p8, atol=1.01 * one_level)
    assert p8.max() - p8.min() > 0.9 * 255 * one_level  # a real gradient, not a saturated white image


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_pil_modes_scale_by_257(model, mode):
    g16 = gradient16()
    if mode == "I":
        image = Image.fromarray(g16.astype(np.int32), "I")
    else:
        order = ">" if mode == "I;16B" else "<"
        image = Image.frombytes(mode, (64, 64), g16.astype(order + "u2").tobytes())
    assert image.mode == mode
    expected = np.round(g16 / 257).astype(np.uint8)  # 0..65535 -> 0..255, independently
    np.testing.assert_array_equal(model.processor([image]), model.processor([expected]))


def test_high_bit_depth_arrays_and_float_images(model):
    g16 = gradient16()
    expected = model.processor([np.round(g16 / 257).astype(np.uint8)])
    np.testing.assert_array_equal(model.processor([g16]), expected)
    np.testing.assert_array_equal(model.processor([np.stack([g16] * 3, -1)]), expected)
    unit = g16 / 65535.0
    np.testing.assert_array_equal(model.processor([unit.astype(np.float32)]), expected)
    np.testing.assert_array_equal(model.processor([Image.fromarray(unit.astype(np.float32), "F")]), expected)
    with pytest.raises(ValueError, match=r"image 0: a float32 array holds values in \[0, 255\]; float images must "
                                         r"hold values in \[0, 1\]"):
        model.processor([(unit * 255).astype(np.float32)])
    with pytest.raises(ValueError, match="holds nan or inf"):
        model.processor([np.full((8, 8), np.nan)])
    with pytest.raises(ValueError, match=r"got dtype int64; if the values are 0\.\.255, pass arr.astype\(np.uint8\)"):
        model.processor([np.zeros((8, 8, 3), np.int64)])
    with pytest.raises(ValueError, match=r"mode 'I' PIL image is read as 16-bit \(0\.\.65535\) but holds values "
                                         r"-5\.\.70000"):
        model.processor([Image.fromarray(np.array([[-5, 70000]], np.int32), "I")])


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0), (0, 0, 3), ()])
def test_empty_image_arrays(model, shape):
    with pytest.raises(ValueError, match=re.escape(f"image 1: numpy images must be non-empty [H, W] or [H, W, C] "
                                                   f"arrays, got shape {shape}")):
        model.prepare(images=[np.zeros((8, 8, 3), np.uint8), np.zeros(shape, np.uint8)], prompts=["a", "b"])


def test_empty_pil_image(model):
    with pytest.raises(ValueError, match=r"image 0: image is empty"):
        model.prepare(images=[Image.new("RGB", (0, 4))], prompts=["a"])


def test_non_images_and_image_counts(model):
    ok = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(TypeError, match=r"image 1: unsupported image type int \(3\)"):
        model.prepare(images=[ok, 3], prompts=["a", "b"])
    with pytest.raises(TypeError, match="image 0 is None: a batch is all image prompts or all text prompts"):
        model.prepare(images=[None, ok], prompts=["a", "b"])
    with pytest.raises(ValueError, match=r"got 2 images for 1 prompts \(one image per prompt\)"):
        model.prepare(images=[ok, ok], prompts=["a"])


def test_prompts_that_are_not_strings(model):
    with pytest.raises(TypeError, match=r"prompt 1 has type int \(7\), expected a str"):
        model.prepare(images=None, prompts=["a", 7])
    with pytest.raises(TypeError, match="prompts must be a str or a list of str, got NoneType"):
        model.prepare(images=None, prompts=None)
    with pytest.raises(TypeError, match="prompt 0 has type bytes"):
        model.prepare(images=[np.zeros((8, 8, 3), np.uint8)], prompts=[b"a"])


# ---------------------------------------------------------------- model calls


@pytest.fixture(scope="module")
def batch(model):
    return model.prepare(images=[np.zeros((8, 8, 3), np.uint8)] * 2, prompts=["What colour?", "Which shape?"])


@pytest.mark.parametrize("bad", [51, -1, 10 ** 6])
@pytest.mark.parametrize("as_jax", [False, True])
def test_logits_token_ids_outside_the_vocabulary(model, batch, bad, as_jax):
    ids = batch.input_ids.copy()
    ids[1, -2] = bad
    ids = jnp.asarray(ids) if as_jax else ids
    col = batch.input_ids.shape[1] - 2
    with pytest.raises(ValueError, match=re.escape(f"input_ids[1, {col}] = {bad} is not a token id of this "
                                                   f"model: the vocabulary is [0, {model.config.text.vocab_size})")):
        model.logits(ids, batch.pixel_values, batch.valid)
    with pytest.raises(TypeError, match="input_ids must be integer token ids, got dtype float32"):
        model.logits(np.asarray(ids, np.float32), batch.pixel_values, batch.valid)


def test_logits_image_tokens_must_match_the_images(model, batch):
    n = model.config.num_image_tokens
    with pytest.raises(ValueError, match=f"input_ids hold {2 * n} image tokens \\(id 4\\) but no pixel_values"):
        model.logits(batch.input_ids, None, batch.valid)
    text = model.prepare(images=None, prompts=["a", "b"])
    with pytest.raises(ValueError, match=f"row 0 of input_ids holds 0 image tokens \\(id 4\\) but 2 image\\(s\\) for "
                                         f"2 row\\(s\\) need {n} per row"):
        model.logits(text.input_ids, batch.pixel_values, text.valid)
    ids = batch.input_ids.copy()
    ids[1, np.nonzero(ids[1] == model.config.image_token_id)[0][0]] = 7  # one image token short
    with pytest.raises(ValueError, match=f"row 1 of input_ids holds {n - 1} image tokens"):
        model.logits(ids, batch.pixel_values, batch.valid)
    with pytest.raises(ValueError, match=r"pixel_values holds 3 images for 2 rows"):
        model.logits(batch.input_ids, np.concatenate([batch.pixel_values] * 3)[:3], batch.valid)
    with pytest.raises(ValueError, match=r"pixel_values must be \[images, 3, 64, 64\], got shape \(2, 3, 32, 32\)"):
        model.logits(batch.input_ids, batch.pixel_values[..., :32, :32], batch.valid)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\)"):
        model.logits(batch.input_ids, batch.pixel_values, batch.valid[:, :5])


def test_check_request_catches_edited_inputs(model, batch):
    import dataclasses

    ids = batch.input_ids.copy()
    ids[0, -1] = 99
    with pytest.raises(ValueError, match=r"= 99 is not a token id of this model"):
        checks.check_request(model, dataclasses.replace(batch, input_ids=ids), 4)
    with pytest.raises(ValueError, match="but no pixel_values were given"):
        checks.check_request(model, dataclasses.replace(batch, pixel_values=None), 4)
    checks.check_request(model, batch, 4)  # the prepared batch itself is fine


# ---------------------------------------------------------------- method options


@pytest.mark.parametrize("budget, expected, error", [
    (2 ** 31, "budget=2147483648 is out of range", ValueError),
    (float("nan"), "budget=nan is not finite", ValueError),
    (float("inf"), "budget=inf is not finite", ValueError),
    (True, "got True (a bool)", TypeError),
])
def test_budgets_beyond_what_the_backend_represents(budget, expected, error):
    with pytest.raises(error, match=re.escape(expected)) as e:
        Compression("snapkv", budget=budget)
    assert "an integer token count in 2..2147483647" in message(e)


def test_largest_representable_budget_is_accepted():
    assert Compression("snapkv", budget=2 ** 31 - 1).budget == 2 ** 31 - 1


def lightkv_lengths(model, **options):
    method = build(Compression("lightkv", merge_windows=2, **options))
    return accounting.layer_lengths(method, model.config, 128, model.config.num_image_tokens)


@pytest.mark.parametrize("layers, expected", [
    ((1, 3), "merge_layers (1, 3): layer 3 is out of range for this 4-layer model: merge layers must be in 0..2"),
    ((7,), "merge_layers (7,): layer 7 is out of range for this 4-layer model: merge layers must be in 0..2"),
])
def test_lightkv_layer_beyond_the_model(model, layers, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        lightkv_lengths(model, merge_layers=layers)


@pytest.mark.parametrize("layers, expected", [
    ((1, 1), "merge_layers (1, 1): layer 1 appears twice"),
    ((2, 1), "merge_layers (2, 1): layer 1 comes after layer 2; merge layers must be strictly increasing "
             "(e.g. (1, 2))"),
    ((-1,), "merge_layers (-1,): layer -1 is negative"),
    ((), "merge_layers is empty"),
    ((1.5,), "1.5 is not an integer"),
    ("1-x", "'x' is not an integer"),
])
def test_lightkv_bad_layer_schedules(layers, expected):
    with pytest.raises((ValueError, TypeError), match=re.escape(expected)):
        Compression("lightkv", merge_layers=layers, merge_windows=2)


def test_lightkv_windows_per_stage_and_layer_zero(model):
    with pytest.raises(ValueError, match=re.escape("merge_layers (1,) gives 1 merge stage(s) but merge_windows has 3 "
                                                   "entries (4, 2, 1)")):
        Compression("lightkv", merge_layers=1)
    # layer 0 (merge after the first layer) is a valid schedule: 64 visual tokens -> 32 from layer 1 on
    n = model.config.num_image_tokens
    assert lightkv_lengths(model, merge_layers=0) == (128, 128 - n // 2, 128 - n // 2, 128 - n // 2)
