"""In-prefill token reduction (LightKV, FastV) against plain transcriptions, the full model and batch-1 runs.

The numpy LightKV here follows the released code's merge (github.com/howtoosee/LightKV) with plain loops
(one window at a time, batch 1), independently of the vectorised JAX code.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import compile_default, make_ctx, np_softmax
from hf_fixtures import BOS_ID, IMAGE_TOKEN_ID, PAD_ID, VOCAB, make_llava

import vkv_jax
from vkv_jax import accounting, decode, prefill, request
from vkv_jax.methods import Compression, build, visual_per_layer
from vkv_jax.methods.base import Full
from vkv_jax.methods.lightkv import LightKV, eq9_kept_fraction, merge_image, prompt_guidance, window_plan
from vkv_jax.models import llama, llava

# ---------------------------------------------------------------- numpy transcription of LightKV's merge

def np_windows(n, w):
    s = math.isqrt(n)
    s = s if s * s == n else s + 1
    base, rem = divmod(s, w)
    edge = []  # window index of each grid row / column
    for i in range(w):
        edge += [i] * (base + (1 if i < rem else 0))
    label = [edge[i // s] * w + edge[i % s] for i in range(n)]  # padded cells (>= n) are dropped
    return [[i for i in range(n) if label[i] == lab] for lab in range(w * w)]


def np_merge(x, xi, w, rho):
    """One stage on one image: x [n, D], xi [n] -> the survivors [n_out, D] in raster order."""
    out = x.astype(np.float64).copy()
    survivors = []
    for win in np_windows(len(x), w):
        c = len(win)
        A, B = win[0::2], win[1::2]
        r = min(int(np.float32(rho) * np.float32(c)), c // 2)
        if not B:
            survivors += A
            continue
        cos = np.array([[x[a] @ x[b] / (np.linalg.norm(x[a]) * np.linalg.norm(x[b]) + 1e-8) for b in B] for a in A])
        best, partner = cos.max(1), cos.argmax(1)
        order = sorted(range(len(A)), key=lambda i: (-best[i], i))  # descending, stable
        merged = set(order[:r])
        for j, b in enumerate(B):
            members = [A[i] for i in sorted(merged) if partner[i] == j]
            if members:
                num = xi[b] * x[b] + sum(xi[a] * x[a] for a in members)
                out[b] = num / max(xi[b] + sum(xi[a] for a in members), 1e-8)
        survivors += [A[i] for i in range(len(A)) if i not in merged] + B
    return out[sorted(survivors)]


def np_xi(q, k, is_vis, axis="query"):
    """q [Hq, S, Dh], k [Hkv, S, Dh] (batch 1, no padding) -> xi [S]; pre-mask logits, K repeated to Hq."""
    q, k = q.astype(np.float64), np.repeat(k.astype(np.float64), q.shape[0] // k.shape[0], axis=0)
    logits = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])  # [H, S(query), S(key)]
    p = np_softmax(logits, axis=1 if axis == "query" else 2)
    return p[:, :, ~is_vis].sum(axis=(0, 2))


# ---------------------------------------------------------------- schedule and accounting (static)

def test_lightkv_default_schedule_gives_the_papers_token_counts_for_576_tokens():
    for L, layers in ((32, (12, 18, 24)), (40, (15, 23, 31))):
        red = LightKV().schedule(L, 576)
        assert [s.layer for s in red.stages] == list(layers)
        assert [s.num_visual for s in red.stages] == [288, 145, 73]
        assert red.reindex_positions  # the released code re-indexes positions
    assert list(window_plan(576, 4, 0.5).cnt) == [36] * 16
    assert list(window_plan(288, 2, 0.5).cnt) == [81, 72, 72, 63]
    assert [len(w) for w in np_windows(288, 2)] == [81, 72, 72, 63]


def test_lightkv_average_kept_fraction_matches_eq9_and_the_code_accounting():
    assert round(eq9_kept_fraction(32, (12, 18, 24), (0.5,) * 3), 3) == 0.547
    assert eq9_kept_fraction(40, (10, 20, 30), (0.5,) * 3) == pytest.approx(0.46875)  # the paper's example
    for L, code in ((32, 0.575), (40, 0.576)):  # code accounting: merge *after* layer lam keeps lam + 1 full layers
        counts = visual_per_layer(LightKV().schedule(L, 576), L, 576)
        assert round(sum(counts) / (L * 576), 3) == code


def test_lightkv_skips_a_stage_with_fewer_than_8_w2_tokens():
    red = LightKV(merge_layers=(0, 1), merge_windows=(4, 1)).schedule(3, 64)  # 64 < 8 * 16
    assert [(s.layer, s.num_visual) for s in red.stages] == [(1, 32)]


def test_cli_options_reach_the_method():
    from vkv_jax.cli.common import parse_options

    opts = parse_options(["merge_layers=0-1", "merge_windows=2", "keep_original_positions=true"])
    method = build(Compression("lightkv", **opts))
    assert method.stages(3) == ((0, 2, 0.5), (1, 2, 0.5))
    assert not method.schedule(3, 64).reindex_positions
    assert build(Compression("fastv", **parse_options(["k=3"]))).k == 3


def test_fastv_schedule_and_bad_options():
    red = build(Compression("fastv")).schedule(32, 576)
    assert [(s.layer, s.num_visual) for s in red.stages] == [(1, 288)] and not red.reindex_positions
    assert build(Compression("fastv", budget=0.25, k=3)).schedule(32, 576).stages[0].num_visual == 144
    with pytest.raises(ValueError, match="budget"):
        Compression("lightkv", budget=0.5)
    with pytest.raises(ValueError, match="merge_layers"):
        Compression("lightkv", merge_layers=(5, 3))
    with pytest.raises(ValueError, match="below the number of layers"):
        build(Compression("fastv", k=4)).schedule(4, 64)


# ---------------------------------------------------------------- one stage vs the transcription

def test_weighted_average_with_known_weights():
    # 8 tokens, one window: A = 0,2,4,6, B = 1,3,5,7; each A is parallel to the next B, so with
    # rho = 0.5 every A folds into it with weights xi (Eq. 8)
    e = np.eye(4, dtype=np.float32)
    x = np.stack([2 * e[0], e[0], 3 * e[1], e[1], 0.5 * e[2], e[2], e[3], 4 * e[3]])
    xi = np.array([1, 3, 2, 2, 0, 5, 1, 1], np.float32)
    plan = window_plan(8, 1, 0.5)
    out, survive = merge_image(jnp.asarray(x), jnp.asarray(xi), plan)
    out, survive = np.asarray(out), np.asarray(survive)
    assert survive.tolist() == [False, True] * 4
    np.testing.assert_allclose(out[survive], [(3 * 1 + 1 * 2) / 4 * e[0], (2 * 1 + 2 * 3) / 4 * e[1],
                                              1.0 * e[2], (1 * 4 + 1 * 1) / 2 * e[3]], rtol=1e-6)
    np.testing.assert_allclose(out[survive], np_merge(x, xi, 1, 0.5), rtol=1e-6)


@pytest.mark.parametrize("axis", ["query", "key"])
def test_lightkv_stages_equal_the_numpy_transcription(axis):
    rng = np.random.default_rng(1)
    Hq, Hkv, Dh, D = 4, 2, 8, 16
    before, n, after = 3, 64, 5
    method = LightKV(merge_layers=(0, 1), merge_windows=(2, 1), xi_axis=axis)
    stages = method.schedule(3, n).stages
    assert [s.num_visual for s in stages] == [32, 16]
    x = rng.normal(size=(before + n + after, D)).astype(np.float32)
    for stage in stages:
        S = x.shape[0]
        q = rng.normal(size=(Hq, S, Dh)).astype(np.float32)
        k = rng.normal(size=(Hkv, S, Dh)).astype(np.float32)
        ctx = make_ctx(S, [0], [(before, before + n)], num_visual=n)
        out, keep = method.reduce(stage, jnp.asarray(x[None]), jnp.asarray(q[None]), jnp.asarray(k[None]), ctx)
        got = np.asarray(out[0])[np.asarray(keep[0])]  # the decoder keeps the `keep` slots in order
        is_vis = np.asarray(ctx.is_visual[0])
        xi = np_xi(q, k, is_vis, axis)
        np.testing.assert_allclose(np.asarray(prompt_guidance(jnp.asarray(q[None]), jnp.asarray(k[None]), ctx,
                                                              axis))[0], xi, rtol=1e-5)
        w, rho = stage.arg
        want = np.concatenate([x[:before], np_merge(x[is_vis], xi[is_vis], w, rho), x[before + n:]])
        assert got.shape == want.shape == (S - n + stage.num_visual, D)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        x, n = want.astype(np.float32), stage.num_visual


# ---------------------------------------------------------------- through the decoder

STEPS = 3
LIGHTKV = dict(merge_layers=(0, 1), merge_windows=(2, 1))  # 64 -> 32 -> 16 visual tokens, 3 layers
FASTV = dict(k=2, budget=0.25)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("red")
    make_llava(path, num_heads=4, num_kv_heads=2, text_layers=3, image_size=64, head_scale=10.0)
    model = vkv_jax.load(path)
    rng = np.random.default_rng(0)
    n = model.config.num_image_tokens
    rows = [np.concatenate([[BOS_ID], rng.integers(5, VOCAB - 1, a), [IMAGE_TOKEN_ID] * n,
                            rng.integers(5, VOCAB - 1, c)]) for a, c in ((3, 9), (1, 5))]
    pix = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
    return model, rows, pix


def batch(rows, S=None):
    S = S or max(len(r) for r in rows)
    ids = np.full((len(rows), S), PAD_ID, np.int32)
    valid = np.zeros((len(rows), S), bool)
    for b, r in enumerate(rows):
        ids[b, S - len(r):], valid[b, S - len(r):] = r, True
    return jnp.asarray(ids), jnp.asarray(valid)


def prefill_and_decode(model, method, ids, valid, pix, default_codegen=False):
    """Prefill logits, the decode cache, and STEPS greedy decode logits, all in one jit (compiled with XLA's
    default code generator where bit-exactness is claimed: `_helpers.compile_default`)."""

    def go(params, ids, valid, pix):
        logits, cache, positions, stats = request.prefill(params, model.config, method, ids, valid, pix, STEPS)

        def step(carry, _):  # one loop body for every step (unrolled steps multiplied the compile time)
            logits, cache, positions = carry
            logits, cache = decode.decode_step(params, model.config, cache, jnp.argmax(logits, -1).astype(jnp.int32),
                                               positions)
            return (logits, cache, positions + 1), logits

        (_, cache, _), steps = jax.lax.scan(step, (logits, cache, positions), None, STEPS)
        return jnp.concatenate([logits[:, None], jnp.moveaxis(steps, 0, 1)], 1), cache, stats

    args = (model.params, ids, valid, jnp.asarray(pix))
    return compile_default(go, *args) if default_codegen else jax.jit(go)(*args)


def test_lightkv_with_ratio_zero_equals_the_full_model_exactly(setup):
    model, rows, pix = setup
    ids, valid = batch(rows)
    method = build(Compression("lightkv", merge_ratios=0.0, **LIGHTKV))
    assert len(method.schedule(3, 64).stages) == 2  # the segmented path really runs
    got, got_cache, _ = prefill_and_decode(model, method, ids, valid, pix, default_codegen=True)
    want, want_cache, _ = prefill_and_decode(model, Full(), ids, valid, pix, default_codegen=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name,options", [("lightkv", LIGHTKV), ("fastv", FASTV)])
def test_batched_rows_equal_their_batch_1_runs(setup, name, options):
    model, rows, pix = setup
    method = build(Compression(name, **options))
    ids, valid = batch(rows)
    got, cache, stats = prefill_and_decode(model, method, ids, valid, pix)
    n_vis = visual_per_layer(method.schedule(3, 64), 3, 64)
    np.testing.assert_array_equal(np.asarray(stats.kept_per_layer)[:, 1], n_vis)
    # every layer's cache: its own prompt length (+ the decoded tokens), the original positions
    lengths = np.asarray(cache.length)
    np.testing.assert_array_equal(lengths[:, 0, 0] - STEPS, [ids.shape[1] - 64 + v for v in n_vis])
    for b, row in enumerate(rows):
        one, one_cache, _ = prefill_and_decode(model, method, *batch([row]), pix[b:b + 1])
        np.testing.assert_allclose(np.asarray(got[b]), np.asarray(one[0]), atol=2e-5, rtol=0)
        for layer in range(3):  # same slots with the same original positions and keys
            live = np.asarray(cache.live_mask()[layer, b, 0])
            live1 = np.asarray(one_cache.live_mask()[layer, 0, 0])
            np.testing.assert_array_equal(np.asarray(cache.pos[layer, b, 0])[live],
                                          np.asarray(one_cache.pos[layer, 0, 0])[live1])
            np.testing.assert_allclose(np.asarray(cache.k[layer, b])[:, live],
                                       np.asarray(one_cache.k[layer, 0])[:, live1], atol=2e-5, rtol=0)


def test_lightkv_prefill_equals_layers_composed_with_the_numpy_merge(setup):
    model, rows, pix = setup
    cfg, lm = model.config, model.params["lm"]
    method = build(Compression("lightkv", **LIGHTKV))
    ids, valid = batch(rows[:1])
    p = jax.jit(lambda *a: prefill.run_prompt(model.params, cfg, method, *a))(ids, valid, jnp.asarray(pix[:1]))
    x, tags = llava.merge_embeddings(model.params, cfg, ids, jnp.asarray(pix[:1]))
    x, is_vis = np.asarray(x[0]), np.asarray(tags[0]) == 1
    bounds = [(0, 1, 2, 0.5), (1, 2, 1, 0.5), (2, 3, None, None)]
    for start, stop, w, rho in bounds:  # RoPE re-indexed 0..S'-1 after each merge (code choice)
        S = x.shape[0]
        layers = llama.slice_layers(lm["layers"], start, stop)
        h, k, _, _, q = llama.run_layers(layers, cfg.text, jnp.asarray(x[None]), jnp.arange(S)[None],
                                         jnp.ones((1, S), bool), return_last_q=True)
        if w is None:
            break
        h = np.asarray(h[0])
        xi = np_xi(np.asarray(q[0]), np.asarray(k[-1, 0]), is_vis)
        first = int(np.argmax(is_vis))
        merged = np_merge(h[is_vis], xi[is_vis], w, rho)
        x = np.concatenate([h[:first], merged, h[first + is_vis.sum():]]).astype(np.float32)
        is_vis = np.zeros(len(x), bool)
        is_vis[first:first + len(merged)] = True
    want = llama.unembed(lm, llama.rms_norm(h, lm["final_norm"], cfg.text.rms_norm_eps)[:, -1])
    np.testing.assert_allclose(np.asarray(p.logits), np.asarray(want), atol=1e-4, rtol=0)
    assert p.layer_len == (len(rows[0]), len(rows[0]) - 32, len(rows[0]) - 48)


def test_fastv_keeps_exactly_the_tokens_layer_k_attention_selects(setup):
    model, rows, pix = setup
    cfg, lm = model.config, model.params["lm"]
    method = build(Compression("fastv", **FASTV))
    ids, valid = batch(rows)
    _, cache, _ = prefill_and_decode(model, method, ids, valid, pix)
    # direct computation on the full model: layer K-1's attention from the last prompt token
    x, tags = llava.merge_embeddings(model.params, cfg, ids, jnp.asarray(pix))
    pos = llava.positions_from_mask(valid)
    layers = llama.slice_layers(lm["layers"], 0, FASTV["k"])
    _, k, _, _, q = llama.run_layers(layers, cfg.text, x, jnp.maximum(pos, 0), valid, return_last_q=True)
    q, k = np.asarray(q, np.float64), np.repeat(np.asarray(k[-1], np.float64), 2, axis=1)
    n_keep = round(64 * FASTV["budget"])
    for b in range(len(rows)):
        v, real = np.asarray(tags[b]) == 1, np.asarray(valid[b])
        logits = np.einsum("hd,hsd->hs", q[b, :, -1], k[b]) / math.sqrt(q.shape[-1])
        att = np_softmax(np.where(real, logits, -np.inf), axis=-1).mean(0)
        top = np.argsort(-np.where(v, att, -np.inf), kind="stable")[:n_keep]
        want = sorted(np.asarray(pos[b])[top].tolist())
        for layer in range(3):
            live = np.asarray(cache.live_mask()[layer, b, 0]) & (np.asarray(cache.tag[layer, b, 0]) == 1)
            got = np.asarray(cache.pos[layer, b, 0])[live].tolist()
            assert got == (want if layer >= FASTV["k"] else sorted(np.asarray(pos[b])[v].tolist()))


def test_generate_reports_visual_tokens_per_layer_and_flops_saved(setup):
    model, rows, pix = setup
    ids, valid = batch(rows, S=128)
    inputs = vkv_jax.Inputs(np.asarray(ids), np.asarray(valid), pix, [len(r) for r in rows])
    out = vkv_jax.generate(model, inputs, 2, Compression("fastv", **FASTV))
    s = out.stats
    assert s["kept_vision_per_layer"] == [64.0, 64.0, 16.0]
    assert s["kv_bytes"] < s["kv_bytes_full"]
    assert s["prefill_flops_full"] == accounting.prefill_flops(model.config, (128,) * 3, 2)
    assert s["prefill_flops"] == accounting.prefill_flops(model.config, (128, 128, 80), 2)
    assert 0 < s["prefill_flops_saved"] < 1
