"""Decode-phase compression (`vkv_jax.decode_trim`): the trim keeps the newest window and the most attended
slots, the scores are the step's softmax weights, a budget that holds the answer changes no token, and the
live KV stays bounded over a long answer with no new executable per trim."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import METHOD_OPTIONS, np_softmax, random_paged_cache

import vkv_jax
from vkv_jax import decode_trim, paging
from vkv_jax.methods import available


@pytest.mark.parametrize("kwargs,error", [
    (dict(budget=1), ValueError), (dict(budget=8, interval=6, window=4), ValueError),
    (dict(budget=8.0), TypeError), (dict(budget=8, window=True), TypeError), (dict(budget=8, interval=-1), ValueError)])
def test_decode_trim_rejects_bad_settings(kwargs, error):
    with pytest.raises(error):
        vkv_jax.DecodeTrim(**kwargs)


def test_decode_trim_defaults_fit_the_budget():
    t = vkv_jax.DecodeTrim(64)
    assert (t.interval, t.window, t.kept) == (16, 16, 48)
    assert vkv_jax.DecodeTrim(2).kept == 1
    assert vkv_jax.DecodeTrim(np.int64(64), np.int32(8)) == vkv_jax.DecodeTrim(64, 8)  # integers by value


def _full_ring(rng, budget=8, kv_dtype=None):
    """A small paged cache made to trim, its decode ring filled with `budget` distinct slots and random
    scores (row 1's slot 2 dead: a finished row's padding)."""
    _, cache = random_paged_cache(rng, kv_dtype=kv_dtype)
    cache = paging.grow(decode_trim.attach(cache.replace(dk=cache.dk[..., :0, :], dv=cache.dv[..., :0, :],
                                                         dpos=cache.dpos[..., :0],
                                                         **({} if kv_dtype is None else
                                                            dict(dk_scale=cache.dk_scale[..., :0],
                                                                 dv_scale=cache.dv_scale[..., :0]))),
                                           vkv_jax.DecodeTrim(budget, interval=3, window=2)), 99)
    L, B, H, T, D = cache.dk.shape
    assert T == budget  # grow sizes the ring to the budget whatever is asked
    dpos = np.broadcast_to(100 + np.arange(T), (L, B, H, T)).copy()
    dpos[:, 1, :, 2] = -1
    return cache.replace(dk=jnp.asarray(rng.normal(size=cache.dk.shape), cache.dk.dtype),
                         dpos=jnp.asarray(dpos, jnp.int32), decode_len=jnp.int32(T),
                         dscore=jnp.asarray(rng.random((L, B, H, T)), jnp.float32))


def test_trim_keeps_the_newest_window_then_the_highest_scores_in_order():
    rng = np.random.default_rng(0)
    cache = _full_ring(rng)
    out = jax.jit(decode_trim.trim_if_full)(cache)
    T, kept, window = 8, 5, 2
    assert int(out.decode_len) == kept
    score, dpos = np.asarray(cache.dscore), np.asarray(cache.dpos)
    for idx in np.ndindex(*score.shape[:3]):
        older = [t for t in range(T - window) if dpos[idx][t] >= 0]
        best = sorted(sorted(older, key=lambda t: -score[idx][t])[:kept - window])
        want = best + list(range(T - window, T))
        np.testing.assert_array_equal(np.asarray(out.dpos)[idx][:kept], dpos[idx][want])
        np.testing.assert_array_equal(np.asarray(out.dk)[idx][:kept], np.asarray(cache.dk)[idx][want])
        np.testing.assert_array_equal(np.asarray(out.dscore)[idx][:kept], score[idx][want])
        assert (np.asarray(out.dpos)[idx][kept:] == -1).all()
    # not full: untouched
    short = cache.replace(decode_len=jnp.int32(T - 1))
    same = jax.jit(decode_trim.trim_if_full)(short)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(short)))


def test_trim_moves_the_scales_of_quantized_slots_with_them():
    rng = np.random.default_rng(1)
    cache = _full_ring(rng, kv_dtype="int8")
    cache = cache.replace(dk_scale=jnp.asarray(rng.random(cache.dk_scale.shape), jnp.float32))
    out = decode_trim.trim_if_full(cache)
    for name in ("dk_scale", "dpos"):
        a, b = np.asarray(getattr(out, name))[0, 0, 0, :5], np.asarray(getattr(cache, name))[0, 0, 0]
        assert all(x in b for x in a)
    kept = np.asarray(out.dpos)[0, 0, 0, :5] - 100
    np.testing.assert_array_equal(np.asarray(out.dk_scale)[0, 0, 0, :5], np.asarray(cache.dk_scale)[0, 0, 0, kept])


def test_scores_add_each_decode_slots_softmax_weight_over_prompt_and_decode():
    rng = np.random.default_rng(2)
    B, Hq, Hkv, T, D, P = 2, 4, 2, 6, 8, 5
    q = rng.normal(size=(B, Hq, D)).astype(np.float32)
    pk = rng.normal(size=(B, Hkv, P, D)).astype(np.float32)
    dk = rng.normal(size=(B, Hkv, T, D)).astype(np.float32)
    live = np.ones((B, Hkv, T), bool)
    live[:, :, 4:] = False
    live[1, 0, 1] = False
    g = Hq // Hkv
    logits = np.concatenate([np.einsum("bhd,bhpd->bhp", q, np.repeat(pk, g, 1)),
                             np.einsum("bhd,bhtd->bht", q, np.repeat(dk, g, 1))], -1) / np.sqrt(D)
    logits[..., P:] = np.where(np.repeat(live, g, 1), logits[..., P:], -np.inf)
    probs = np_softmax(logits)
    lse = np.log(np.exp(logits).sum(-1))
    cache = _full_ring(rng).replace(dscore=jnp.zeros((3, B, Hkv, T), jnp.float32))
    out = decode_trim.accumulate(cache, jnp.int32(1), jnp.asarray(q), jnp.asarray(dk), jnp.asarray(live),
                                 jnp.asarray(lse, jnp.float32))
    want = probs[..., P:].reshape(B, Hkv, g, T).sum(2)
    np.testing.assert_allclose(np.asarray(out.dscore)[1], want, rtol=1e-5, atol=1e-7)
    assert not np.asarray(out.dscore)[[0, 2]].any()


@pytest.mark.parametrize("method", sorted(available()))
def test_a_budget_that_holds_the_answer_changes_no_token(shapes_model, shapes_pair, method):
    _, inputs = shapes_pair
    c = vkv_jax.Compression(method, **METHOD_OPTIONS[method])
    plain = vkv_jax.generate(shapes_model, inputs, 10, c)
    trimmed = vkv_jax.generate(shapes_model, inputs, 10, c, decode_trim=vkv_jax.DecodeTrim(24, interval=4, window=4))
    np.testing.assert_array_equal(plain.tokens, trimmed.tokens)
    assert trimmed.stats["decode_budget"] == 24 and plain.stats["decode_budget"] is None
    assert trimmed.stats["kv_bytes_decode_segment"] == 24 / 16 * plain.stats["kv_bytes_decode_segment"]


@pytest.fixture(scope="module")
def smoke_request():
    """The smoke preset's random model, two 600-token prompts (SnapKV at 0.3), started under a decode budget
    of 64 (interval 16, window 8) for a 1024-token answer: (params, cfg, first state, sampling, step)."""
    from vkv_jax import configs, decode, request
    from vkv_jax.methods import build, split_budget
    from vkv_jax.models import family, llava
    from vkv_jax.sampling import Sampling, row_keys

    cfg = configs.load_preset("smoke").config
    params = family.of(cfg).random_params(cfg, 0, jnp.float32)
    ids, pix = llava.synthetic_inputs(cfg, 2, 16, 584)  # 600 prompt tokens a row
    method, budget = split_budget(build(vkv_jax.Compression("snapkv", budget=0.3)), ids.shape[1])
    sampling = Sampling().as_arrays()
    started = request.start_request(params, cfg, method, jnp.asarray(ids), jnp.ones(ids.shape, bool),
                                    jnp.asarray(pix), budget=budget, key=row_keys(0, 2), sampling=sampling,
                                    eos_ids=(), max_new_tokens=1024, grow=True,
                                    trim=vkv_jax.DecodeTrim(64, interval=16, window=8))
    step = jax.jit(decode.step, static_argnames=("cfg", "eos_ids", "pad_id"))

    def run(state, first, last):  # steps first..last-1: (state, tokens [B, n], decode_len after each)
        tokens, lens = [], []
        for index in range(first, last):
            state = step(params, cfg, state, jnp.int32(index), row_keys(0, 2), sampling, eos_ids=(), pad_id=0)
            tokens.append(np.asarray(state.tokens))
            lens.append(int(state.cache.decode_len))
        return state, np.stack(tokens, 1), lens

    return params, cfg, started.state, run, step


def test_a_long_answer_keeps_the_live_kv_bounded_with_one_step_executable(smoke_request):
    """The issue's case on the smoke preset: 1024 tokens from a 600-token prompt under a decode budget of 64
    (SnapKV at 0.3 on the prompt): every step's live KV stays within the kept prompt + 64 slots per (layer,
    row, kv head), the cache's arrays never change shape, and the step compiles once (the trim is a cond)."""
    _, _, state, run, step = smoke_request
    trim = state.cache.decode_trim
    L, B, H = state.cache.prompt_len.shape
    bound = (int(state.cache.prompt_len.sum()) + L * B * H * trim.budget) * state.cache.slot_bytes
    shapes = jax.tree.map(jnp.shape, state.cache)
    live = []
    lens = []
    for first in range(1, 1024, 64):  # live bytes read after every step
        for index in range(first, min(first + 64, 1024)):
            state, _, n = run(state, index, index + 1)
            live.append(float(state.cache.live_bytes()))
            lens += n
    assert max(live) <= bound and jax.tree.map(jnp.shape, state.cache) == shapes
    assert step._cache_size() == 1
    assert lens[:64] == list(range(1, 65))  # fills the ring, then every 16 steps back to 48
    assert lens[64] == 49 and min(lens[64:]) == 49 and max(lens) == 64
    assert sum(1 for a, b in zip(lens, lens[1:]) if b < a) == (1023 - 64) // 16 + ((1023 - 64) % 16 > 0)


def test_a_trimmed_state_saves_restores_and_continues_as_if_uninterrupted(smoke_request, tmp_path):
    from vkv_jax import pipeline

    params, cfg, state, run, _ = smoke_request
    _, whole, _ = run(state, 1, 121)
    mid, first, _ = run(state, 1, 81)  # trims happened (the ring filled at step 64)
    pipeline.save_state(tmp_path / "s", mid)
    back = pipeline.restore_state(tmp_path / "s")
    assert back.cache.decode_trim == mid.cache.decode_trim and back.cache.dscore is not None
    _, rest, _ = run(back, 81, 121)
    np.testing.assert_array_equal(np.concatenate([first, rest], 1), whole)
    # a follow-up turn through the full ring: fed and answered inside the budget, the arrays unchanged
    follow = jnp.asarray(np.full((2, 20), 7), jnp.int32)
    from vkv_jax.sampling import Sampling, row_keys

    tokens, after = pipeline.continue_conversation(params, cfg, back, follow, 30, Sampling().as_arrays(), (), 0,
                                                   row_keys(0, 2))
    assert tokens.shape == (2, 30) and int(after.cache.decode_len) <= 64
    assert jax.tree.map(jnp.shape, after.cache) == jax.tree.map(jnp.shape, back.cache)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_trimming_loops_agree_and_compose_with_quantized_pages(shapes_model, shapes_pair, kv_dtype):
    """With trims happening (40 tokens through a 16-slot ring), the bucketed while loop and the streaming loop
    give the same tokens, in float and in int8 pages (the trim moves the scales with their slots)."""
    _, inputs = shapes_pair
    c, trim = vkv_jax.Compression("snapkv", budget=0.3, window=4), vkv_jax.DecodeTrim(16, interval=4, window=4)
    loop = vkv_jax.generate(shapes_model, inputs, 40, c, decode_trim=trim, kv_dtype=kv_dtype)
    stream = vkv_jax.generate(shapes_model, inputs, 40, c, decode_trim=trim, kv_dtype=kv_dtype, stream=True)
    np.testing.assert_array_equal(loop.tokens, stream.tokens)
    assert loop.stats["kv_bytes_decode_segment"] == stream.stats["kv_bytes_decode_segment"]
