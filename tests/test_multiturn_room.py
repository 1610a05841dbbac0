"""A follow-up turn never writes past the decode segment: `pipeline.continue_conversation` and
`feed_tokens` grow it when the room is short (issue: a full cache continued past its 16 slots answered
differently from the same conversation with room to spare)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vkv_jax import decode, inputs, paging, pipeline, request
from vkv_jax.methods import Compression, build
from vkv_jax.sampling import Sampling
from vkv_jax.testbed import synthetic

GREEDY = Sampling().as_arrays()


@pytest.fixture(scope="module")
def filled(shapes_model):
    """A two-row decode state whose 16-slot decode segment is full (15 generated tokens + the pending
    one's slot), and the same state with 128 slots."""
    model = shapes_model
    exs = synthetic.make_examples("test", 2, config=synthetic.ShapesConfig(image_size=64))
    batch = model.prepare([e.image for e in exs], [e.question for e in exs])
    eos = tuple(sorted(model.tokenizer.eos_ids))
    started = request.start_request(model.params, model.config, build(Compression("full")),
                                    jnp.asarray(batch.input_ids), jnp.asarray(batch.valid),
                                    inputs.device_images(batch.pixel_values, model.dtype), budget=None,
                                    key=jax.random.key(0), sampling=GREEDY, eos_ids=(), max_new_tokens=16, grow=True)
    assert started.state.cache.decode_capacity == 16
    roomy = started.state.replace(cache=paging.grow(started.state.cache, 128))
    run = jax.jit(decode.scan_decode, static_argnums=(1, 4, 6, 7))
    _, small = run(model.params, model.config, started.state, jax.random.key(0), 16, GREEDY, (), 0)
    _, large = run(model.params, model.config, roomy, jax.random.key(0), 16, GREEDY, (), 0)
    assert int(small.cache.decode_len) == 15  # one slot left: less than any follow-up needs
    follow = np.asarray(model.tokenizer.encode(" USER: and the colour? ASSISTANT:"), np.int32)
    return model, small, large, jnp.asarray(np.stack([follow] * 2)), eos


@pytest.mark.parametrize("jit", [False, True])
def test_continuation_past_the_room_answers_as_with_room_to_spare(filled, jit):
    model, small, large, follow, eos = filled
    go = pipeline.continue_conversation
    if jit:
        go = jax.jit(go, static_argnums=(1, 4, 6, 7))
    args = (follow, 6, GREEDY, eos, model.tokenizer.pad_id, jax.random.key(1))
    got, got_state = go(model.params, model.config, small, *args)
    want, want_state = go(model.params, model.config, large, *args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got_state.cache.decode_capacity >= int(got_state.cache.decode_len)
    if not jit:  # outside a jit: grown to the bucket of what the turn needs, no more
        need = 15 + 1 + follow.shape[1] + 6
        assert got_state.cache.decode_capacity == paging.decode_capacity(need)


def test_feed_tokens_grows_only_when_short(filled):
    model, small, large, follow, _ = filled
    logits, cache, pos = pipeline.feed_tokens(model.params, model.config, small.cache, follow, small.positions)
    want_logits, want_cache, _ = pipeline.feed_tokens(model.params, model.config, large.cache, follow,
                                                       large.positions)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
    assert cache.decode_capacity == paging.decode_capacity(15 + follow.shape[1])
    assert want_cache.decode_capacity == 128  # room enough: unchanged
    np.testing.assert_array_equal(np.asarray(pos), np.asarray(small.positions) + follow.shape[1])

