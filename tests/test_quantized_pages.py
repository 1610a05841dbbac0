"""Quantized KV pages (`kv_quant`: int8 / float8_e4m3fn, one float32 scale per slot per kv head): the
format against a numpy transcription, every paged attention path against the dense attention over the
dequantized cache, and generate / feed / save-restore on the shared tiny LLaVA."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _helpers import assert_paged_paths_match, random_paged_cache

import vkv_jax
from vkv_jax import cache as cache_lib
from vkv_jax import decode, kv_quant, pipeline, request
from vkv_jax.methods import Compression, build, split_budget

FORMATS = ["int8", "float8_e4m3fn"]


def _numpy_quantize(x: np.ndarray, kv_dtype: str):
    """The format as written in kv_quant's docstring: s = max|x| / qmax, q = x / s (int8: rounded)."""
    qmax = {"int8": 127.0, "float8_e4m3fn": 448.0}[kv_dtype]
    s = np.abs(x).max(-1) / qmax
    y = x / np.where(s > 0, s, 1.0)[..., None]
    if kv_dtype == "int8":
        return np.clip(np.round(y), -127, 127).astype(np.int8), s
    return y.astype(ml_dtypes.float8_e4m3fn), s


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_quantize_equals_the_numpy_transcription_and_bounds_the_error(kv_dtype):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(5, 7, 16)) * rng.uniform(0.01, 50, size=(5, 7, 1))).astype(np.float32)
    x[0, 0] = 0.0  # an empty slot: scale 0, reads back as zeros
    q, s = kv_quant.quantize(jnp.asarray(x), kv_dtype)
    want_q, want_s = _numpy_quantize(x, kv_dtype)
    np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-6)
    assert q.dtype == want_q.dtype
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), want_q.astype(np.float32))
    back = np.asarray(kv_quant.dequantize(q, s))
    assert (back[0, 0] == 0).all()
    # int8: half a step of max|x| / 127; e4m3 (3 mantissa bits): 2^-4 of each value, or a subnormal step
    step = want_s[..., None]
    bound = step * 0.5 if kv_dtype == "int8" else np.maximum(np.abs(x) * 2.0 ** -4, step * 2.0 ** -9)
    assert (np.abs(back - x) <= bound * (1 + 1e-5) + 1e-12).all()


def test_a_bad_kv_dtype_is_refused():
    with pytest.raises(ValueError, match="kv_dtype must be None or one of 'int8', 'float8_e4m3fn', got 'int4'"):
        kv_quant.check_kv_dtype("int4")


@pytest.mark.parametrize("ps", [1, 4])
@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_paged_attention_paths_over_quantized_pages_equal_the_dequantized_reference(kv_dtype, ps):
    """Kernel (interpret mode off TPU), reference and packed walk all read q * scale: each equals dense
    attention over the dequantized view, and that view is within the format's error of the float pages."""
    rng = np.random.default_rng(ps)
    dense, paged = random_paged_cache(rng, ps=ps, kv_dtype=kv_dtype, k_spread=3)
    assert paged.quantized and paged.k_pages.dtype == jnp.dtype(kv_dtype) and paged.kv_dtype == kv_dtype
    view = paged.dense()
    live = np.asarray(dense.live_mask())
    S = dense.capacity
    err = np.abs(np.asarray(view.k)[..., :S, :][live] - np.asarray(dense.k)[live]).max()
    assert 0 < err <= (0.05 if kv_dtype == "int8" else 0.7)  # quantized, and only by rounding
    assert_paged_paths_match(paged, view, seed=ps)


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_bytes_count_the_scales_and_a_decode_token_is_stored_quantized(kv_dtype):
    dense, paged = random_paged_cache(np.random.default_rng(3), kv_dtype=kv_dtype, k_spread=3)
    D = dense.k.shape[-1]
    assert paged.slot_bytes == 2 * D + 8
    assert float(paged.live_bytes()) == float(dense.live_bytes()) * (2 * D + 8) / (2 * D * 4)
    L, B, H = dense.length.shape
    assert paged.allocated_bytes() == (paged.num_pages * paged.page_size + L * B * H * 3) * (2 * D + 8)
    new_k = jnp.asarray(np.random.default_rng(4).normal(size=(B, H, D)), jnp.float32)
    added = cache_lib.advance_decode(cache_lib.append_decode(paged, jnp.int32(1), new_k, -new_k,
                                                             jnp.arange(B, dtype=jnp.int32) + 100))
    want_q, want_s = _numpy_quantize(np.asarray(new_k), kv_dtype)
    assert added.dk.dtype == jnp.dtype(kv_dtype)
    np.testing.assert_array_equal(np.asarray(added.dk[1, :, :, 0]).astype(np.float32), want_q.astype(np.float32))
    np.testing.assert_allclose(np.asarray(added.dk_scale[1, :, :, 0]), want_s, rtol=1e-6)
    grown = cache_lib.grow(added, 8)
    assert grown.dk_scale.shape[-1] == 8 and float(grown.live_bytes()) == float(added.live_bytes())


def _prefill(model, inputs, kv_dtype, name="snapkv"):
    method, budget = split_budget(build(Compression(name, budget=0.3)), inputs.input_ids.shape[1])
    return request.prefill_request(model.params, model.config, method, jnp.asarray(inputs.input_ids),
                                   jnp.asarray(inputs.valid), jnp.asarray(inputs.pixel_values), budget,
                                   kv_dtype=kv_dtype)


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_quantized_decode_stays_near_the_float_cache_and_keeps_the_same_slots(shapes_model, shapes_pair, kv_dtype):
    """The same keep-set (scored in full precision), then teacher-forced decode logits within a small
    fraction of their spread of the float cache's; generate reports bytes with the scales counted."""
    _, inputs = shapes_pair
    base, quant = _prefill(shapes_model, inputs, None), _prefill(shapes_model, inputs, kv_dtype)
    np.testing.assert_array_equal(np.asarray(quant.cache.page_pos), np.asarray(base.cache.page_pos))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 40, size=(inputs.batch_size, 6)), jnp.int32)
    feed = jax.jit(decode.feed, static_argnums=1)
    logits = [feed(shapes_model.params, shapes_model.config, pipeline.grow(p.cache, 8), tokens, p.next_positions)[0]
              for p in (base, quant)]
    gap = float(jnp.abs(logits[0] - logits[1]).max())
    spread = float(logits[0].std())
    assert 0 < gap < (0.02 if kv_dtype == "int8" else 0.15) * spread, (gap, spread)

    D = shapes_model.config.text.head_dim
    stats = [vkv_jax.generate(shapes_model, inputs, 4, Compression("snapkv", budget=0.3), kv_dtype=d).stats
             for d in (None, kv_dtype)]
    assert stats[1]["kv_bytes"] == pytest.approx(stats[0]["kv_bytes"] * (2 * D + 8) / (2 * D * 4), rel=1e-6)


def test_a_quantized_state_saves_and_restores_bit_exact_and_continues_alike(shapes_model, shapes_pair, tmp_path):
    _, inputs = shapes_pair
    done = _prefill(shapes_model, inputs, "int8")
    first = jnp.argmax(done.logits, -1).astype(jnp.int32)
    state = decode.DecodeState(cache=pipeline.grow(done.cache, 16), tokens=first, positions=done.next_positions,
                               done=jnp.zeros(first.shape, bool))
    pipeline.save_state(tmp_path / "q", state)
    restored = pipeline.restore_state(tmp_path / "q")
    assert restored.cache.quantized and restored.cache.k_pages.dtype == jnp.int8
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    follow = jnp.asarray(np.full((inputs.batch_size, 3), 7), jnp.int32)
    tok = shapes_model.tokenizer
    run = jax.jit(pipeline.continue_conversation, static_argnums=(1, 4, 5, 6, 7))
    sampling = vkv_jax.Sampling(0.0, 0, 1.0)
    args = (5, sampling, tuple(tok.eos_ids), int(tok.pad_id), jax.random.key(0))
    a, after = run(shapes_model.params, shapes_model.config, state, follow, *args)
    b, _ = run(shapes_model.params, shapes_model.config, restored, follow, *args)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert after.cache.quantized and after.cache.dk.dtype == jnp.int8


def test_the_evaluation_counts_quantized_bytes_against_the_float_prompt_cache(shapes_model, shapes_pair):
    """Under the template protocol every slot the method keeps is quantized: the live bytes scale by
    exactly (2 D + 8) / (8 D) against the float run (same keep-sets), the full-cache bytes not at all."""
    from vkv_jax.evaluation import harness

    exs, _ = shapes_pair
    D = shapes_model.config.text.head_dim
    runs = [harness.evaluate(shapes_model, exs, [Compression("full"), Compression("snapkv", budget=0.3)],
                             batch_size=2, max_new_tokens=2, protocol="template", progress=False, kv_dtype=d)
            for d in (None, "int8")]
    for base, quant in zip(*runs, strict=True):
        assert quant.kv_bytes_full == pytest.approx(base.kv_bytes_full, rel=1e-6)
        assert quant.kv_bytes == pytest.approx(base.kv_bytes * (2 * D + 8) / (8 * D), rel=1e-6)
        assert quant.kept_vision == base.kept_vision


def test_chunked_prefill_and_in_prefill_reductions_compose_with_quantized_pages(shapes_model, shapes_pair):
    """Quantization happens after the prompt pass, whatever it was: a chunked prefill pages the same int8
    cache as the one-shot one (same tokens and bytes), and FastV / LightKV keep what they keep unquantized,
    at (2 D + 8) / (8 D) of the bytes."""
    _, inputs = shapes_pair
    D = shapes_model.config.text.head_dim
    snap = Compression("snapkv", budget=0.3)
    one_shot = vkv_jax.generate(shapes_model, inputs, 6, snap, kv_dtype="int8")
    chunked = vkv_jax.generate(shapes_model, inputs, 6, snap, kv_dtype="int8", prefill_chunk=32)
    np.testing.assert_array_equal(chunked.tokens, one_shot.tokens)
    assert chunked.stats["kv_bytes"] == one_shot.stats["kv_bytes"]
    reductions = [Compression("fastv", budget=0.5, k=1), Compression("lightkv", merge_layers=(0,), merge_windows=(2,))]
    for reduction in reductions:  # the shared LLaVA has two layers
        base, quant = (vkv_jax.generate(shapes_model, inputs, 4, reduction, kv_dtype=d).stats for d in (None, "int8"))
        assert quant["kept_vision_per_layer"] == base["kept_vision_per_layer"]
        assert quant["prefill_flops_saved"] == base["prefill_flops_saved"] > 0
        assert quant["kv_bytes"] == pytest.approx(base["kv_bytes"] * (2 * D + 8) / (8 * D), rel=1e-6)


def test_a_format_the_platform_cannot_store_is_refused_before_compiling(shapes_model, shapes_pair, monkeypatch):
    for kv_dtype in ("int8", "float8_e4m3fn"):  # CPU stores both formats
        assert kv_quant.check_platform(kv_dtype) == kv_dtype
    monkeypatch.setattr(kv_quant, "_round_trips", lambda backend, kv_dtype: kv_dtype != "float8_e4m3fn")
    _, inputs = shapes_pair
    with pytest.raises(ValueError, match=r"kv_dtype 'float8_e4m3fn': this platform \(cpu, .*\) cannot store "
                                         r"float8_e4m3fn arrays; use 'int8'"):
        vkv_jax.generate(shapes_model, inputs, 4, Compression("snapkv", budget=0.3), kv_dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match="kv_dtype must be None or one of"):
        vkv_jax.generate(shapes_model, inputs, 4, kv_dtype="fp8")
