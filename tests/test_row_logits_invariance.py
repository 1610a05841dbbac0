"""A row's logits do not depend on the rest of its batch: for every registered method and both pool modes,
row 0's prefill logits and its logits over 8 teacher-forced decode steps equal those of row 0 run alone, in
a batch that also holds a text-only row, a two-image row and a long row (issue: a text-only row switched
FastV / LightKV off for the whole batch, and `random` drew one key for the batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import METHOD_OPTIONS as OPTIONS
from hf_fixtures import VOCAB

from vkv_jax import decode, paging, request
from vkv_jax.inputs import bind_visual_layout, device_images
from vkv_jax.methods import Compression, available, build, split_budget
from vkv_jax.testbed import synthetic

STEPS = 8
TOL = 1e-5


def test_every_method_is_listed():
    assert set(OPTIONS) == set(available())


@pytest.fixture(scope="module")
def batches(shapes_model):
    """Row 0 alone, and row 0 beside a text-only row, a two-image row and a row with a long question."""
    exs = synthetic.make_examples("test", 3, config=synthetic.ShapesConfig(image_size=64))
    first = ([exs[0].image], exs[0].question)
    others = [([], "say hello"), ([exs[1].image, exs[2].image], exs[1].question),
              ([exs[2].image], exs[2].question + " and tell me which colour the largest shape has, in one word")]
    alone = shapes_model.prepare([first[0]], [first[1]])
    mixed = shapes_model.prepare([first[0]] + [r[0] for r in others], [first[1]] + [r[1] for r in others])
    assert mixed.visual_tokens == [64, 0, 128, 64] and mixed.input_ids.shape[1] > alone.input_ids.shape[1]
    return alone, mixed


_feed = jax.jit(decode.feed, static_argnums=1)  # (params, cfg, cache, tokens [B, T], positions [B])


def _row0_logits(model, inputs, compression, kv_pool):
    """Row 0's logits [1 + STEPS, V]: the prefill's, then each forced decode step's."""
    method, budget = split_budget(bind_visual_layout(build(compression), model.config, inputs),
                                  inputs.input_ids.shape[1])
    done = request.prefill_request(model.params, model.config, method, jnp.asarray(inputs.input_ids),
                                   jnp.asarray(inputs.valid), device_images(inputs.pixel_values, model.dtype),
                                   budget, kv_pool=kv_pool)
    cache = paging.grow_jit(done.cache, paging.decode_capacity(STEPS))
    forced = np.tile(np.random.default_rng(0).integers(5, VOCAB - 1, STEPS), (inputs.batch_size, 1))
    logits, positions = [done.logits[0]], done.next_positions
    for t in range(STEPS):  # one forced token a call: every step's logits
        step, cache, positions = _feed(model.params, model.config, cache, jnp.asarray(forced[:, t:t + 1]), positions)
        logits.append(step[0])
    return np.stack([np.asarray(x) for x in logits])


@pytest.mark.parametrize("kv_pool", ["fitted", "static"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_row_logits_equal_the_row_alone(shapes_model, batches, name, kv_pool):
    alone, mixed = batches
    compression = Compression(name, **OPTIONS[name])
    want = _row0_logits(shapes_model, alone, compression, kv_pool)
    got = _row0_logits(shapes_model, mixed, compression, kv_pool)
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
