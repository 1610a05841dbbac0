"""A compressed cache saved with Orbax and restored continues generation with bit-identical tokens."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vkv_jax
from vkv_jax import decode, pipeline, request
from vkv_jax.methods import build
from vkv_jax.sampling import Sampling
from vkv_jax.testbed import synthetic

MAX_NEW = 8
ROOM = 40  # decode slots for the answer and a follow-up turn
GREEDY = Sampling(0.0, 0, 1.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # until the trained model ships, load() writes a random checkpoint into VKV_JAX_CACHE: a private
    # directory keeps parallel test workers from racing on the shared one
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setenv("VKV_JAX_CACHE", str(tmp_path_factory.mktemp("vkv_jax_cache")))
        warnings.simplefilter("ignore")  # the random default model warns until the trained one ships
        model = vkv_jax.load()
    exs = synthetic.make_examples("test", 2)
    inputs = model.prepare([e.image for e in exs], [e.question for e in exs])
    method = build(vkv_jax.Compression("aircache", budget=0.1))
    logits, cache, nxt, _ = request.prefill_jit(model.params, model.config, method, jnp.asarray(inputs.input_ids),
                                               jnp.asarray(inputs.valid), jnp.asarray(inputs.pixel_values), ROOM)
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
    model, state, eos = setup
    answer, after = _decode(model, state, eos, 3)
    pipeline.save_state(tmp_path / "s", after)
    restored = pipeline.restore_state(tmp_path / "s", like=after)
    follow = np.asarray(model.tokenizer.encode(" USER: and the color? ASSISTANT:"), np.int32)
    follow = jnp.asarray(np.stack([follow] * 2))
    T = follow.shape[1]
    go = jax.jit(pipeline.continue_conversation, static_argnums=(1, 4, 5, 6, 7))
    args = (4, GREEDY, eos, model.tokenizer.pad_id, jax.random.key(1))
    a_tokens, a_state = go(model.params, model.config, after, follow, *args)
    b_tokens, b_state = go(model.params, model.config, restored, follow, *args)
    np.testing.assert_array_equal(np.asarray(a_tokens), np.asarray(b_tokens))
    assert _bit_equal(a_state, b_state)
    # the pending token + the turn + 3 of the 4 new tokens were written; positions continue
    np.testing.assert_array_equal(np.asarray(a_state.positions), np.asarray(after.positions) + 1 + T + 3)
    assert (np.asarray(a_state.cache.length) == np.asarray(after.cache.length) + 1 + T + 3).all()
    assert int(np.asarray(a_state.cache.length).max()) <= a_state.cache.capacity


def test_restoring_a_checkpoint_of_another_pytree_names_what_it_found(tmp_path):
    """A checkpoint that is not a decode state (here a params-like tree) is a ValueError naming the path and
    its entries, not a KeyError from inside the rebuild."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "other", {"embed": np.zeros((4, 2), np.float32), "layers": {"w": np.ones(3, np.float32)}})
        ckpt.wait_until_finished()
    with pytest.raises(ValueError, match=r"other.*does not hold a decode state.*found \['embed', 'layers'\]"):
        pipeline.restore_state(tmp_path / "other")
