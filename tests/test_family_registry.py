"""Model families behind one protocol, registered by `model_type`: a new family is its modules plus one
`register` call, and `load`, `prepare`, `generate` and the bench's inputs reach it by its config's type."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

import vkv_jax
from vkv_jax.bench.setting import make_inputs
from vkv_jax.families import LLAVA
from vkv_jax.model import LlavaModel
from vkv_jax.models import config, family


class AliasModel(LlavaModel):
    """The registered family's own model class (`load` must return it)."""


def _alias_config(raw: dict):
    """A LLaVA-1.5 config.json filed under model_type "alias_llava": parsed as LLaVA, typed as the alias."""
    return dataclasses.replace(config.llava_config_from_hf({**raw, "model_type": "llava"}), model_type="alias_llava")


@pytest.fixture
def alias_family():
    calls = {"embeddings": 0}

    def counted_embeddings(*args):
        calls["embeddings"] += 1
        return LLAVA.prompt_embeddings(*args)

    fam = family.register(dataclasses.replace(LLAVA, name="alias", model_types=("alias_llava",),
                                              config_from_hf=_alias_config, prompt_embeddings=counted_embeddings,
                                              model_class=AliasModel))
    yield fam, calls
    family.unregister("alias")


def test_a_registered_family_loads_prepares_and_generates_by_its_model_type(alias_family, shapes_llava, shapes_model,
                                                                          shapes_pair, tmp_path):
    _, calls = alias_family
    path = tmp_path / "alias"
    shutil.copytree(shapes_llava, path)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "model_type": "alias_llava"}))

    model = vkv_jax.load(path)
    assert type(model) is AliasModel and model.config.model_type == "alias_llava"
    exs, inputs = shapes_pair
    ours = model.prepare([e.image for e in exs], [e.question for e in exs])
    np.testing.assert_array_equal(ours.input_ids, inputs.input_ids)
    compression = vkv_jax.Compression("snapkv", budget=0.3)
    got = vkv_jax.generate(model, ours, max_new_tokens=6, compression=compression)
    assert calls["embeddings"] > 0  # the decode path took the family's own embeddings
    want = vkv_jax.generate(shapes_model, inputs, max_new_tokens=6, compression=compression)
    np.testing.assert_array_equal(got.tokens, want.tokens)

    ids, pix = make_inputs(model.config, 2, model.config.num_image_tokens, 4)
    assert ids.shape == (2, model.config.num_image_tokens + 4) and pix.shape[0] == 2


def test_model_types_are_unique_and_unknown_ones_name_the_supported(alias_family):
    with pytest.raises(ValueError, match="'llava' is already registered by family 'llava'"):
        family.register(dataclasses.replace(LLAVA, name="other"))
    with pytest.raises(ValueError, match=r"unsupported model_type 'idefics3'.*llava, .*alias_llava"):
        family.config_from_hf({"model_type": "idefics3"})
    with pytest.raises(KeyError, match="no model family named 'nope'"):
        family.unregister("nope")


def test_the_built_in_families_cover_their_model_types():
    types = family.supported_model_types()
    for model_type in ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"):
        assert model_type in types
        assert family.for_model_type(model_type).model_types == (config.SUPPORTED_MODEL_TYPES if "llava" in model_type
                                                                 else config.QWEN_VL_MODEL_TYPES)
