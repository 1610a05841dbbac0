"""Test helpers: tiny left-padded batches and a driver that runs a method like the prefill scan does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax import cache as cache_lib
from vkv_jax import decode, prefill, request
from vkv_jax.methods import PrefillContext
from vkv_jax.models import family
from vkv_jax.selection import keep_mask

# The suite compiles with XLA:CPU's older emitters (tests/conftest.py: they compile ~2.5x faster). Two
# different programs that compute the same thing agree bit for bit only as far as the code generator emits
# the same arithmetic for both: the tests that claim bit-exactness across programs compile both with the
# default emitters, as a user's process does.
DEFAULT_CODEGEN = {"xla_cpu_use_fusion_emitters": True}


def compile_default(fn, *args):
    """`jax.jit(fn)` on args, compiled with XLA's default code generator (DEFAULT_CODEGEN), and run."""
    return jax.jit(fn).lower(*args).compile(compiler_options=DEFAULT_CODEGEN)(*args)


def random_paged_cache(rng, L=3, B=2, H=2, S=37, D=8, ps=4, kv_dtype=None, k_spread=1.0):
    """A random compacted DenseCache (ragged lengths, row 1 left-padded by 5) and the same slots paged with
    3 decode slots, quantized when `kv_dtype` is given: (dense, paged). k_spread scales the keys."""
    k = jnp.asarray(rng.normal(size=(L, B, H, S, D)) * k_spread, jnp.float32)
    v = jnp.asarray(rng.normal(size=(L, B, H, S, D)), jnp.float32)
    pos = np.tile(np.arange(S), (B, 1))
    pos[1, :5] = -1
    dense = cache_lib.compact(cache_lib.from_prefill(k, v, jnp.asarray(pos), jnp.zeros((B, S), jnp.int8), S), None, S)
    dense = dense.replace(length=jnp.asarray(rng.integers(0, S - 5, size=(L, B, H)), jnp.int32))
    dense = cache_lib.compact(dense, None, S)  # zero the slots past the new lengths
    pages = cache_lib.pool_pages(int(dense.length.sum()), L * B * H, ps)
    return dense, cache_lib.to_pages(dense, ps, pages, 3, kv_dtype=kv_dtype)


def assert_paged_paths_match(paged, reference, seed: int = 0) -> None:
    """In every layer, for random queries (3 per kv head), the page-table reference, the Pallas kernel (interpret
    mode off TPU) and the packed walk over `paged`'s pages (their scales too, when quantized) each give dense
    attention over the `reference` DenseCache within 1e-5, and its log-sum-exp where finite (-inf elsewhere: a
    head with no live slot)."""
    from vkv_jax.pallas_kernels import decode_attention_reference

    L, B, H = paged.prompt_len.shape
    q = jnp.asarray(np.random.default_rng(seed).normal(size=(B, 3 * H, paged.k_pages.shape[-1])), jnp.float32)
    for layer in range(L):
        want, want_lse = decode_attention_reference(q, reference.k[layer], reference.v[layer],
                                                    reference.live_mask()[layer], return_lse=True)
        _assert_layer_paths_match(q, paged, layer, want, want_lse)


def _assert_layer_paths_match(q, paged, layer: int, want, want_lse) -> None:
    from vkv_jax.pallas_kernels import packed_attention, paged_attention

    L, B, H = paged.prompt_len.shape
    scales = dict(k_scale=paged.k_scale, v_scale=paged.v_scale)
    finite = np.isfinite(np.asarray(want_lse))
    outs = [paged_attention(q, paged.k_pages, paged.v_pages, paged.page_table[layer], paged.prompt_len[layer],
                            return_lse=True, impl=impl, **scales) for impl in ("reference", "kernel")]
    outs.append(packed_attention(q, paged.k_pages, paged.v_pages, paged.page_pos, paged.page_owner,
                                 paged.layer_start[layer], paged.layer_start[layer + 1], layer * B * H,
                                 num_kv_heads=H, chunk_pages=3, **scales))
    for out, lse in outs:
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite], atol=1e-5, rtol=0)
        assert not np.isfinite(np.asarray(lse)[~finite]).any()


def make_ctx(S: int, pads, vis_spans, num_visual: int | None = None) -> PrefillContext:
    """Left-padded context. pads[b] padding slots; vis_spans[b] = (start, end) in *real positions*."""
    B = len(pads)
    tags = np.zeros((B, S), np.int8)
    valid = np.ones((B, S), bool)
    pos = np.full((B, S), -1, np.int32)
    for b in range(B):
        p = pads[b]
        valid[b, :p] = False
        pos[b, p:] = np.arange(S - p)
        s, e = vis_spans[b]
        tags[b, p + s:p + e] = 1
    return PrefillContext(jnp.asarray(tags), jnp.asarray(pos), jnp.asarray(valid), num_visual=num_visual)


def random_qk(L, B, Hq, Hkv, S, D, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(L, B, Hq, S, D)).astype(np.float32) * scale
    k = rng.normal(size=(L, B, Hkv, S, D)).astype(np.float32) * scale
    return q, k


def run_method(method, q, k, ctx):
    """stats per layer stacked on L (as the prefill scan does), then plan; all under one jit."""

    @jax.jit
    def go(q, k, ctx):
        stats = jax.lax.map(lambda qk: method.observe(qk[0], qk[1], ctx), (q, k))
        return stats, method.plan(stats, ctx)

    return go(jnp.asarray(q), jnp.asarray(k), ctx)


def kept_positions(plan, ctx, l, b, h):
    """Original positions kept by (layer, row, head), as a sorted list (duplicates preserved)."""
    idx = np.asarray(plan.indices[l, b, h])[: int(plan.count[l, b, h])]
    pos = np.asarray(ctx.positions[b])[idx]
    return list(pos)


def np_softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


def row_slice(q, k, ctx, b):
    """Row b without its padding: q [L,Hq,Sb,D], k [L,Hkv,Sb,D], tags [Sb]."""
    p = int((~np.asarray(ctx.valid[b])).sum())
    return q[:, b, :, p:], k[:, b, :, p:], np.asarray(ctx.tags[b, p:])


def compacted_vs_masked_decode(params, cfg, method, ids, valid, pix, steps: int):
    """The equivalence invariant's two sides, teacher-forced for `steps` decode steps (both caches see the
    same tokens): logits from the compacted cache and from the full cache with the evicted slots masked.
    Returns ([(compact logits [B, V], masked logits [B, V])] * steps, the compacted cache, keep [L, B, Hkv, S])."""
    @jax.jit
    def both(params, ids, valid, pix):
        S = ids.shape[1]
        p = prefill.run_prompt(params, cfg, method, ids, valid, pix)
        plan = method.plan(p.stats, p.ctx)
        compact = request.compress(p, method, steps)  # the paged layout decoding reads
        keep = keep_mask(plan.indices, plan.count, S)
        masked = cache_lib.from_prefill(p.k, p.v, p.ctx.positions, p.ctx.tags, S + steps)  # dense, masked
        masked = masked.replace(pos=jnp.where(jnp.pad(keep, [(0, 0)] * 3 + [(0, masked.capacity - S)]),
                                              masked.pos, -1))
        tokens = jnp.argmax(p.logits, -1).astype(jnp.int32)
        positions = family.next_positions(cfg, valid, pix)  # + Qwen2-VL's rope deltas

        def step(carry, _):  # one loop body, whatever `steps` (unrolled, compile time grew with them)
            compact, masked, tokens, positions = carry
            lc, compact = decode.decode_step(params, cfg, compact, tokens, positions)
            lm, masked = decode.decode_step(params, cfg, masked, tokens, positions)
            return (compact, masked, jnp.argmax(lm, -1).astype(jnp.int32), positions + 1), (lc, lm)

        (compact, _, _, _), (lcs, lms) = jax.lax.scan(step, (compact, masked, tokens, positions), None, steps)
        return (lcs, lms), compact, keep

    (lcs, lms), compact, keep = both(params, ids, valid, pix)
    return list(zip(lcs, lms)), compact, keep


def assert_bf16_argmax_agrees(truth, ref, got, mask) -> None:
    """The bf16 parity criterion: on positions whose f32 top-2 margin is decisive (> 2% of the logit
    scale; at least 80% of them), our bf16 argmax equals transformers' bf16 one (>= 99%; >= 97% overall),
    and ours is at least as often the f32 argmax as theirs. truth [B, S, V] f32 logits; ref, got [B, S]."""
    top2 = np.sort(truth, -1)[..., -2:]
    decisive = mask & (top2[..., 1] - top2[..., 0] > 0.02 * np.abs(truth[mask]).max())
    assert decisive.sum() >= 0.8 * mask.sum()
    assert (ref == got)[decisive].mean() >= 0.99
    assert (ref == got)[mask].mean() >= 0.97
    assert (got == truth.argmax(-1))[mask].mean() >= (ref == truth.argmax(-1))[mask].mean()


def assert_compaction_invariant(model, inputs, method, steps: int):
    """The equivalence invariant on a prepared batch: the method evicted something, compacted and masked
    decodes agree to 1e-5 for `steps` teacher-forced steps, and each (layer, row, head) holds exactly its
    kept prompt slots. Returns live_prompt [L, B, Hkv, S] (kept real prompt slots) for further checks."""
    from vkv_jax.inputs import device_images

    ids, valid = jnp.asarray(inputs.input_ids), jnp.asarray(inputs.valid)
    pix = device_images(inputs.pixel_values, jnp.float32)
    out, compact, keep = compacted_vs_masked_decode(model.params, model.config, method, ids, valid, pix, steps)
    live_prompt = np.asarray(keep) & np.asarray(valid)[None, :, None, :]
    assert live_prompt.sum() < np.asarray(valid).sum() * keep.shape[0] * keep.shape[2]
    for lc, lm in out:
        np.testing.assert_allclose(np.asarray(lc), np.asarray(lm), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(compact.length) - steps, live_prompt.sum(-1))
    return live_prompt


# ----------------------------------------------------------------------------- a user's JSONL benchmark

JSONL_ROWS = [  # one row per metric; the images (0.png, 1.png) are the test's
    {"image": "0.png", "question": "what color is the circle?", "answer": "Red", "qtype": "colour"},
    {"image": "1.png", "question": "is there a red square?", "answers": ["no"] * 2 + ["yes"] * 8, "metric": "vqa"},
    {"image": "0.png", "question": "what does the label say?", "answers": ["circle", "square"], "metric": "anls"},
    {"image": "1.png", "question": "which shape is it?", "choices": ["a circle", "a square"], "answer": "b"},
]


def write_jsonl(folder, rows=JSONL_ROWS, sizes=((50, 30), (80, 120))):
    """`rows` as folder/b.jsonl, with a grey PNG of each (width, height) of `sizes` as folder/<i>.png."""
    import json

    from PIL import Image

    for i, (w, h) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 90 + 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "b.jsonl"


def assert_scored_by_row_metrics(data) -> None:
    """Every run of an evaluate results.json is scored by its rows' metrics: each recorded score is the
    metric of the generated answer against the row's references, the accuracy their mean, the interval
    Wilson's with the summed scores for a soft metric."""
    from vkv_jax.evaluation import metrics
    from vkv_jax.evaluation.stats import wilson

    questions = data["questions"]
    names = "+".join(m for m in metrics.METRICS if m in {q["metric"] for q in questions})
    for r in data["results"] + list(data["ablations"].values()):
        assert r["metric"] == names and len(r["scores"]) == len(r["texts"]) == r["n"] == len(questions)
        want = [metrics.score(q["metric"], t, q["answers"], q.get("choices", ())) for q, t in
                zip(questions, r["texts"])]
        np.testing.assert_allclose(r["scores"], want)
        assert r["accuracy"] == np.mean(want)
        assert r["answers"] == [metrics.normalize_answer(t) for t in r["texts"]]
        k = sum(want) if not metrics.is_binary(names) else round(sum(want))
        np.testing.assert_allclose(r["ci95"], wilson(k, len(want)))


# Each registered method with options that make it act on a 2-layer LM of 64 visual tokens per image; a
# newly registered method fails test_row_logits_invariance.test_every_method_is_listed until it is added here.
METHOD_OPTIONS = {
    "full": {},
    "random": dict(budget=0.3, seed=3),
    "streamingllm": dict(budget=0.3, n_sink=2),
    "h2o": dict(budget=0.3),
    "snapkv": dict(budget=0.3, window=4),
    "pyramidkv": dict(budget=0.3, window=4),
    "adakv": dict(budget=0.3, base_options=(("window", 4),)),
    "vlcache": dict(budget=0.3),
    "aircache": dict(budget=0.2),
    "csp": dict(budget=0.3),
    "fastv": dict(budget=0.5, k=1),
    "lightkv": dict(merge_layers=(0,), merge_windows=(2,)),
}
