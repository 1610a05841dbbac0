"""A compressed cache saved with Orbax and restored continues generation with bit-identical tokens."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vkv_jax
from vkv_jax import decode, pipeline
from vkv_jax.methods import build
from vkv_jax.sampling import Sampling
from vkv_jax.testbed import synthetic

MAX_NEW = 8
GREEDY = Sampling(0.0, 0, 1.0)


@pytest.fixture(scope="module")
def setup():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random default model warns until the trained one ships
        model = vkv_jax.load()
    exs = synthetic.make_examples("test", 2)
    inputs = model.prepare([e.image for e in exs], [e.question for e in exs])
    method = build(vkv_jax.Compression("aircache", budget=0.1))
    logits, cache, nxt, _ = decode.prefill_jit(model.params, model.config, method, jnp.asarray(inputs.input_ids),
                                               jnp.asarray(inputs.valid), jnp.asarray(inputs.pixel_values), MAX_NEW)
    eos = tuple(sorted(model.tokenizer.eos_ids))
    first, done = decode.first_tokens_jit(logits, jax.random.key(0), GREEDY, eos)
    state = decode.DecodeState(cache=cache, tokens=first, positions=nxt, done=done)
    return model, state, eos


def _decode(model, state, eos, steps):
    fn = jax.jit(decode.scan_decode, static_argnums=(1, 4, 5, 6, 7))
    return fn(model.params, model.config, state, jax.random.key(0), steps, GREEDY, eos, model.tokenizer.pad_id)


def _bit_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("with_target", [True, False])
def test_restored_compressed_cache_is_bit_identical(setup, tmp_path, with_target):
    model, state, _ = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recommended Orbax calls run without warnings
        pipeline.save_state(tmp_path / "state", state)
        restored = pipeline.restore_state(tmp_path / "state", like=state if with_target else None)
    assert isinstance(restored, decode.DecodeState)
    # it is the compressed cache: far fewer live slots than the 268-token prompts
    assert int(np.asarray(restored.cache.length).max()) < 100
    assert _bit_equal(restored, state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype and a.shape == b.shape


def test_generation_continued_from_restored_cache_gives_identical_tokens(setup, tmp_path):
    model, state, eos = setup
    uninterrupted, _ = _decode(model, state, eos, MAX_NEW)
    # stop after 3 tokens, checkpoint the decode state, restore it, decode the rest
    head, mid = _decode(model, state, eos, 3)
    pipeline.save_state(tmp_path / "mid", mid)
    restored = pipeline.restore_state(tmp_path / "mid")
    tail, _ = _decode(model, restored, eos, MAX_NEW - 2)  # its first token is the last of `head`
    resumed = np.concatenate([np.asarray(head), np.asarray(tail)[:, 1:]], axis=1)
    np.testing.assert_array_equal(resumed, np.asarray(uninterrupted))


def test_follow_up_turn_from_restored_cache_matches_in_memory(setup, tmp_path):
    model, state, _ = setup
    pipeline.save_state(tmp_path / "s", state)
    restored = pipeline.restore_state(tmp_path / "s", like=state)
    follow = jnp.asarray(np.stack([model.tokenizer.encode(" USER: and the color? ASSISTANT:")[-4:]] * 2), jnp.int32)
    feed = jax.jit(pipeline.feed_tokens, static_argnums=1)
    a_logits, a_cache, a_pos = feed(model.params, model.config, state.cache, follow, state.positions)
    b_logits, b_cache, b_pos = feed(model.params, model.config, restored.cache, follow, restored.positions)
    np.testing.assert_array_equal(np.asarray(a_logits), np.asarray(b_logits))
    assert _bit_equal(a_cache, b_cache)
    np.testing.assert_array_equal(np.asarray(a_pos), np.asarray(state.positions) + 4)
    assert (np.asarray(a_cache.length) == np.asarray(state.cache.length) + 4).all()
