"""Chunked prefill (`prefill.chunked_prompt`, `llama.prefill_layers_chunked`) equals the one-shot prefill:
logits and K/V, every post-prefill method's scores and keep-sets, and greedy tokens through `generate`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vkv_jax
from vkv_jax import prefill, request
from vkv_jax.methods import Compression, Method, build
from vkv_jax.methods.snapkv import SnapKV
from vkv_jax.models import attention
from vkv_jax.models.loading import random_params
from vkv_jax.testbed import synthetic
from vkv_jax.testbed.tiny import tiny_config


@pytest.fixture(scope="module")
def model_and_batch():
    cfg = tiny_config(64, 63, image_size=32)  # 16 visual tokens
    params = random_params(cfg, seed=1)
    rng = np.random.default_rng(0)
    n = cfg.num_image_tokens
    row = np.concatenate([[1, 2, 3], [63] * n, rng.integers(4, 60, 11)]).astype(np.int32)  # 30 slots
    pad = 7
    ids = jnp.asarray(np.stack([row, np.concatenate([np.zeros(pad, np.int32), row[pad:]])]))
    ids = ids.at[1, pad:pad + 2].set(jnp.asarray([1, 2]))  # row 1: shorter text before the image
    valid = jnp.asarray(np.stack([np.ones(len(row), bool), np.arange(len(row)) >= pad]))
    pix = jnp.asarray(rng.normal(size=(2, 3, 32, 32)), jnp.float32)
    return cfg, params, ids, valid, pix


@pytest.mark.parametrize("chunk,blocked", [(1, False), (7, False), (11, False), (64, False), (11, True)])
def test_chunked_prefill_equals_one_shot(model_and_batch, chunk, blocked, monkeypatch):
    """A first chunk of padding only (row 1), a ragged last chunk, one chunk; and the blocked attention path
    (forced below its usual 256 slots, blocks of 4 misaligned with the chunks)."""
    if blocked:
        monkeypatch.setattr(attention, "DENSE_MAX_LEN_CAUSAL", 0)
        monkeypatch.setattr(attention, "block_size", lambda seq_len: 4)
    cfg, params, ids, valid, pix = model_and_batch
    full = build(Compression("full"))
    one = prefill.run_prompt(params, cfg, full, ids, valid, pix)
    chunked = prefill.chunked_prompt(params, cfg, full, ids, valid, pix, chunk)
    ref = np.asarray(one.logits)
    assert np.abs(np.asarray(chunked.logits) - ref).max() <= 1e-5 * np.abs(ref).max()
    live = np.broadcast_to(np.asarray(valid)[None, :, None, :], one.k.shape[:4])
    for a, r in ((chunked.k, one.k), (chunked.v, one.v)):
        a, r = np.asarray(a), np.asarray(r)
        assert a.shape == r.shape
        assert np.abs(a - r)[live].max() <= 1e-5 * np.abs(r).max()
    c_one, c_chunked = request.compress(one, full), request.compress(chunked, full)
    np.testing.assert_array_equal(c_chunked.pos, c_one.pos)
    np.testing.assert_array_equal(c_chunked.tag, c_one.tag)


def test_chunked_prefill_compiles_one_loop_body_whatever_the_number_of_chunks(model_and_batch):
    """prefill_chunk=1 once never finished compiling: the chunks were unrolled, so the program grew with
    their number. Now one loop body serves every chunk: the traced program is the same size for 15 chunks
    as for 3, for a window scorer (query rows kept across chunks) and H2O (stats summed over chunks).
    (Chunk 1 runs in `test_chunked_prefill_equals_one_shot`.)"""
    cfg, params, ids, valid, pix = model_and_batch
    for method in (build(Compression("snapkv", budget=0.5, window=8)), build(Compression("h2o", budget=0.4))):
        sizes = []
        for chunk in (2, 10):
            traced = jax.make_jaxpr(lambda p, c=chunk, m=method: prefill.chunked_prompt(p, cfg, m, ids, valid, pix, c))
            sizes.append(len(traced(params).eqns))
        assert sizes[0] == sizes[1], (type(method).__name__, sizes)


# Every post-prefill method. The fixture's 30 slots hold the image at 3..18 (row 1: 10..18 after 7 padding
# slots); chunks of 7 and 13 split the image and every observation window: SnapKV / PyramidKV / AdaKV's
# 8 rows (22..29), VL-Cache's and AirCache's 14 (16..29, W = S - 16 visual), CSP's 9 (21..29).
SCORERS = {
    "snapkv": ("snapkv", dict(budget=0.5, window=8)),
    "snapkv_ratio": ("snapkv", dict(budget=0.5, window_ratio=0.3)),
    "pyramidkv": ("pyramidkv", dict(budget=0.5, window=8, kernel=3, pooling="avg")),
    "adakv": ("adakv", dict(budget=0.4, base="snapkv", base_options={"window": 8})),
    "adakv_h2o": ("adakv", dict(budget=0.4, base="h2o")),
    "h2o": ("h2o", dict(budget=0.4)),
    "vlcache": ("vlcache", dict(budget=0.4)),
    "aircache": ("aircache", dict(budget=0.3)),
    "csp": ("csp", dict(budget=0.5, recent_ratio=0.3)),
    "streamingllm": ("streamingllm", dict(budget=0.4)),
    "random": ("random", dict(budget=0.4)),
}
# AirCache's skewness standardises importances that differ by ~1% here: an input's f32 rounding (1e-7 of
# it) moves the statistic ~1e-4 of its scale (the f32 skewness of one set of importances already differs
# from its float64 value by that much); its importances, strengths and the keep-sets are held to 1e-6.
TOLERANCE = {"skewness": 1e-3}

_one_shot = {}


def _run(fn, params, cfg, method, ids, valid, pix, *chunk):
    """(stats, keep-plan) of one prefill under one jit."""

    @jax.jit
    def go(params, ids, valid, pix):
        p = fn(params, cfg, method, ids, valid, pix, *chunk)
        return p.stats, method.plan(p.stats, p.ctx)

    return go(params, ids, valid, pix)


@pytest.mark.parametrize("chunk", [7, 13])
@pytest.mark.parametrize("case", sorted(SCORERS))
def test_chunked_scores_and_keep_sets_equal_one_shot(model_and_batch, case, chunk):
    """Left-padded batch (row 1's first chunk of 7 is padding only); stats <= 1e-6 of their scale, plans equal."""
    cfg, params, ids, valid, pix = model_and_batch
    name, options = SCORERS[case]
    method = build(Compression(name, **options))
    if case not in _one_shot:
        _one_shot[case] = _run(prefill.run_prompt, params, cfg, method, ids, valid, pix)
    s_ref, p_ref = _one_shot[case]
    s_chk, p_chk = _run(prefill.chunked_prompt, params, cfg, method, ids, valid, pix, chunk)
    paths = jax.tree_util.tree_flatten_with_path(s_ref)[0]
    assert len(paths) == len(jax.tree.leaves(s_chk))
    for (path, r), a in zip(paths, jax.tree.leaves(s_chk)):
        a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
        assert a.shape == r.shape
        tol = TOLERANCE.get(jax.tree_util.keystr(path).strip("[]'"), 1e-6)
        assert np.abs(a - r).max() <= tol * max(1.0, np.abs(r).max()), path
    np.testing.assert_array_equal(np.asarray(p_chk.count), np.asarray(p_ref.count))
    np.testing.assert_array_equal(np.asarray(p_chk.indices), np.asarray(p_ref.indices))
    if name not in ("streamingllm", "random"):  # scorers: something was scored
        assert np.abs(np.asarray(jax.tree.leaves(s_ref)[0], np.float64)).max() > 0.0


@pytest.fixture(scope="module")
def shipped_batch():
    """The shipped model on two questions of different lengths (row 0 or 1 left-padded)."""
    model = vkv_jax.load()
    shapes = synthetic.ShapesConfig(image_size=model.config.vision.image_size)
    examples = [synthetic.make_example(i, "test", shapes) for i in (0, 3)]
    questions = [examples[0].question, examples[1].question + " answer in one word please"]
    inputs = model.prepare([e.image for e in examples], questions)
    return model, inputs


@pytest.mark.parametrize("name", ["full", "snapkv", "pyramidkv", "adakv", "h2o", "vlcache", "aircache", "csp",
                                  "streamingllm", "random"])
def test_generate_with_prefill_chunk_gives_the_same_tokens_and_cache(shipped_batch, name):
    """`generate(prefill_chunk=40)`: chunk boundaries at 40, 80, 120 cut the 64-token image and the
    observation windows (the last 32 rows for SnapKV, the post-vision rows for VL-Cache / AirCache);
    greedy tokens and the kept slots of every layer, row and kv head equal the one-shot prefill's."""
    model, inputs = shipped_batch
    assert not np.asarray(inputs.valid).all()  # a left-padded row
    compression = Compression(name) if name == "full" else Compression(name, budget=0.25)
    one = vkv_jax.generate(model, inputs, 6, compression, return_layout=True)
    chunked = vkv_jax.generate(model, inputs, 6, compression, return_layout=True, prefill_chunk=40)
    np.testing.assert_array_equal(chunked.tokens, one.tokens)
    for field in ("length", "pos", "tag"):
        np.testing.assert_array_equal(chunked.layout[field], one.layout[field])


@dataclasses.dataclass(frozen=True)
class _NoChunkHooks(SnapKV):
    """A custom scorer that says nothing about chunks: the contract's default `observe_rows` (no window)."""

    observe_rows = Method.observe_rows


def test_chunked_prefill_rejects_in_prefill_methods_and_bad_chunks(model_and_batch, shipped_batch):
    """FastV / LightKV shorten a layer's whole sequence: a ValueError naming them, before anything
    compiles (also through `generate`); so are a scorer without chunk hooks and a chunk that is no
    positive int."""
    cfg, params, ids, valid, pix = model_and_batch
    with pytest.raises(ValueError, match="FastV"):
        prefill.chunked_prompt(params, cfg, build(Compression("fastv", k=1)), ids, valid, pix, 8)
    with pytest.raises(ValueError, match="_NoChunkHooks"):
        prefill.chunked_prompt(params, cfg, _NoChunkHooks(), ids, valid, pix, 8)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk"):
            prefill.chunked_prompt(params, cfg, build(Compression("full")), ids, valid, pix, bad)
    model, inputs = shipped_batch
    with pytest.raises(ValueError, match="FastV"):
        vkv_jax.generate(model, inputs, 4, Compression("fastv", budget=0.5, k=1), prefill_chunk=32)
    with pytest.raises(ValueError, match="LightKV"):
        vkv_jax.generate(model, inputs, 4, Compression("lightkv", merge_layers=(0,), merge_windows=(2,)),
                         prefill_chunk=32)
    with pytest.raises(ValueError, match="chunk"):
        vkv_jax.generate(model, inputs, 4, Compression("snapkv"), prefill_chunk=0)
