"""The code the README and docs/usage.md show runs as written: the README's API example on the shipped
model (which answers its question), and the in-your-pipeline snippet on every model family, where its
greedy tokens are the ones `generate` returns (so the positions it continues from are right for Qwen's
M-RoPE too)."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
from hf_fixtures import make_llava_next, make_llava_onevision, make_qwen2_vl

import vkv_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_block(path: pathlib.Path, after: str) -> str:
    """The first ```python block after the heading line `after`."""
    text = path.read_text()
    start = text.index(after)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_api_example_runs_and_the_shipped_model_answers_it():
    scope: dict = {}
    code = python_block(ROOT / "README.md", "## Python API")
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].text[0] == scope["example"].answer
    assert scope["logits"].shape[:2] == scope["inputs"].input_ids.shape


FAMILIES = {
    "llava_next": lambda p: make_llava_next(p, head_scale=30.0),
    "llava_onevision": lambda p: make_llava_onevision(p, head_scale=30.0),
    "qwen2_vl": lambda p: make_qwen2_vl(p, version="2", head_scale=10.0),
    "qwen2_5_vl": lambda p: make_qwen2_vl(p, version="2.5", head_scale=10.0),
}


@pytest.fixture(params=["llava", *FAMILIES])
def family_model(request, shapes_model, tmp_path_factory):
    if request.param == "llava":
        return shapes_model
    path = tmp_path_factory.mktemp(request.param)
    FAMILIES[request.param](path)
    return vkv_jax.load(path)


def test_pipeline_snippet_decodes_what_generate_does_on_every_family(family_model):
    model = family_model
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), np.uint8), rng.integers(0, 256, (48, 48, 3), np.uint8)]
    batch = model.prepare(images=[[images[0]], [images[1]]], prompts=["What is here?", "Describe it briefly."])
    scope = {"model": model, "batch": batch}
    exec(compile(python_block(ROOT / "docs" / "usage.md", "## In your own JAX pipeline"), "docs/usage.md", "exec"),
         scope)
    want = vkv_jax.generate(model, batch, 8, vkv_jax.Compression("snapkv", budget=0.25)).tokens
    got = np.stack([np.asarray(t) for t in scope["answer"]], axis=1)
    eos = np.isin(want, list(model.tokenizer.eos_ids))
    upto = np.where(eos.any(1), eos.argmax(1) + 1, want.shape[1])  # generate pads after a row's EOS
    for b in range(want.shape[0]):
        np.testing.assert_array_equal(got[b, :upto[b]], want[b, :upto[b]])
