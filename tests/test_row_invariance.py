"""A row's random draws come from the seed and the row itself, never from the rest of the batch: `random`
eviction keeps the same slots and a sampled row draws the same tokens alone, left-padded beside a longer
row, or at another index of the batch (issue: one key for the batch made both depend on the batch)."""

from __future__ import annotations

import numpy as np
import pytest

import vkv_jax
from vkv_jax.methods import Compression
from vkv_jax.testbed import synthetic

STEPS = 6


@pytest.fixture(scope="module")
def rows(shapes_model):
    """Two test images with questions; the second question is longer, so the first row is left-padded."""
    exs = synthetic.make_examples("test", 2, config=synthetic.ShapesConfig(image_size=64))
    questions = [exs[0].question, exs[1].question + " answer with one word please and be brief"]
    return shapes_model, [e.image for e in exs], questions


def _live(layout, b):
    """Row b's kept (position, tag) pairs per (layer, kv head)."""
    pos, length = layout["pos"][:, b], layout["length"][:, b]
    return [sorted(p for p in pos[layer, h, :length[layer, h]].tolist() if p >= 0)
            for layer in range(pos.shape[0]) for h in range(pos.shape[1])]


@pytest.mark.parametrize("kv_pool", ["fitted", "static"])
def test_random_eviction_keeps_a_rows_slots_whatever_the_batch(rows, kv_pool):
    model, images, questions = rows
    method = Compression("random", budget=0.3, seed=7)
    alone = vkv_jax.generate(model, model.prepare(images[:1], questions[:1]), STEPS, method, return_layout=True,
                             kv_pool=kv_pool)
    both = vkv_jax.generate(model, model.prepare(images[::-1], questions[::-1]), STEPS, method,
                            return_layout=True, kv_pool=kv_pool)
    assert _live(both.layout, 1) == _live(alone.layout, 0)  # at index 1, beside a longer row: the same slots
    np.testing.assert_array_equal(both.tokens[1], alone.tokens[0])
    kept = _live(alone.layout, 0)
    assert len({tuple(k) for k in kept}) > 1  # layers / heads draw differently: the scores are random


def test_a_sampled_row_draws_its_tokens_from_its_own_seed(rows):
    model, images, questions = rows
    hot = dict(temperature=1.5, top_k=0, top_p=1.0)
    one = model.prepare(images[:1], questions[:1])
    alone = [vkv_jax.generate(model, one, STEPS, seed=s, **hot).tokens[0] for s in (3, 4)]
    assert not np.array_equal(*alone)  # two seeds, two draws: the test can tell seeds apart
    pair = model.prepare([images[1], images[0]], [questions[1], questions[0]])
    np.testing.assert_array_equal(vkv_jax.generate(model, pair, STEPS, seed=3, **hot).tokens[1], alone[0])
    same = model.prepare([images[0]] * 2, [questions[0]] * 2)
    per_row = vkv_jax.generate(model, same, STEPS, seed=[4, 3], **hot).tokens  # one seed per row
    np.testing.assert_array_equal(per_row[0], alone[1])
    np.testing.assert_array_equal(per_row[1], alone[0])


@pytest.mark.parametrize("seed, error", [([1], ValueError), ([1, -2], ValueError), ([1, 2.5], TypeError),
                                         ("7", TypeError)])
def test_bad_per_row_seeds_are_refused(rows, seed, error):
    model, images, questions = rows
    with pytest.raises(error, match="seed"):
        vkv_jax.generate(model, model.prepare(images, questions), 2, seed=seed)
