"""Prefill attention (causal LM and bidirectional vision tower) without an S x S logit matrix.

One function, `prefill_attention(q, k, v, valid, causal)`, returns the attention output and the
per-query log-sum-exp of the scaled logits, what an observer's column sums need without a row pass:
p[i, j] = exp(q_i . k_j * scale - lse_i) (None from cuDNN, see `cudnn_attention`). Implementations,
each beside `dense_attention` (the reference: the [B, Hkv, G, S, S] float32 logits the prefill always
built):

- "blocked" (jnp, any backend; CPU's choice for long prompts): query blocks x key blocks with an online
  softmax (flash attention's recurrence), key blocks above the diagonal never computed; `lax.scan`
  over query blocks, `lax.fori_loop` over the key blocks (skipped above the diagonal). Only
  [B, Hkv, G, block, block]
  float32 tiles exist at a time.
- "splash" (TPU): jax's Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`,
  MQA form per kv head so K/V are never repeated; left padding as segment ids; logsumexp from its
  residuals). Tested in Pallas interpret mode on CPU (`tests/test_attention.py`), never compiled on a
  TPU here.
- "cudnn" (GPU, bfloat16/float16 only): `jax.nn.dot_product_attention(implementation="cudnn")`; padding
  as a [B, 1, S, S] bool mask (cuDNN skips the non-causal blocks itself). Never run here (no GPU in
  the sessions that wrote it): the dispatch only picks it on GPU.

Dispatch (`impl="auto"`, `choose_impl`): TPU -> splash; GPU with a half dtype -> cudnn; otherwise
(CPU, GPU float32) dense below 256 slots (causal) or 1024 (bidirectional), blocked from there on with
`block_size(S)` (measurements in `choose_impl`). The vision tower (577 tokens, bidirectional) therefore
stays dense on CPU; a LLaVA prompt (>= 600 slots) runs blocked.

Masking contract: key slot j is visible to query slot i iff valid[b, j] (and j <= i when causal).
Rows with no visible key (left-padding query rows) get an unspecified but finite output and lse;
every caller ignores them (their K/V slots are dead, their logits unread).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vkv_jax.pallas_kernels.mesh import per_device, rows_heads, split_axes

# A large finite negative instead of -inf: fully masked rows (left padding) stay NaN-free, and in the
# online softmax exp(MASK_VALUE - real max) underflows to exactly 0, wiping what masked keys added.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

IMPLS = ("auto", "dense", "blocked", "splash", "cudnn")
# auto on CPU (measured, see `choose_impl`): dense below these many slots, blocked from there on
DENSE_MAX_LEN_CAUSAL = 256
DENSE_MAX_LEN_BIDIRECTIONAL = 1024  # no blocks to skip: blocked saves memory, not time


def _split_groups(q, k):
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {Hkv}")
    return q.reshape(B, Hkv, Hq // Hkv, S, D)


def _visibility(valid, T, C, causal):
    """[B, 1, T, C] bool (None = everything visible) for queries at the last T of C slots."""
    vis = None
    if causal:
        vis = (jnp.arange(C)[None, :] <= jnp.arange(C - T, C)[:, None])[None, None]
    if valid is not None:
        kv = valid.astype(bool)[:, None, None, :]
        vis = kv if vis is None else vis & kv
    return vis


def dense_attention(q, k, v, valid=None, *, causal=True, scale=None):
    """Reference: the full [B, Hkv, G, T, C] float32 logits, softmax, weighted values.

    q [B, Hq, T, D]; k, v [B, Hkv, C, D] (query head h reads kv head h // (Hq / Hkv)); valid [B, C]
    bool key validity or None; causal: query t is slot C - T + t. Returns (out [B, Hq, T, D] in q's
    dtype, lse [B, Hq, T] float32).
    """
    B, Hq, T, D = q.shape
    C = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qg = _split_groups(q, k)
    logits = jnp.einsum("bkgtd,bkcd->bkgtc", qg, k, preferred_element_type=jnp.float32) * scale
    vis = _visibility(valid, T, C, causal)
    if vis is not None:
        logits = jnp.where(vis[:, :, None], logits, MASK_VALUE)
    m = logits.max(-1, keepdims=True)  # softmax as jax.nn.softmax computes it, keeping its m and l
    e = jnp.exp(logits - m)
    l = e.sum(-1, keepdims=True)
    probs = (e / l).astype(v.dtype)
    lse = (m + jnp.log(l))[..., 0]
    out = jnp.einsum("bkgtc,bkcd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, Hq, T, D).astype(q.dtype), lse.reshape(B, Hq, T)


def _online_step(carry, s, vb):
    """One key block of the online softmax. carry (m, l [.., bq, 1], acc [.., bq, D]) f32; s the
    block's masked logits [.., bq, bk] f32; vb [B, Hkv, bk, D]."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l = l * alpha + p.sum(-1, keepdims=True)
    acc = acc * alpha + jnp.einsum("bkgqc,bkcd->bkgqd", p.astype(vb.dtype), vb,
                                   preferred_element_type=jnp.float32)
    return m_new, l, acc


def block_size(seq_len: int) -> int:
    """The blocked path's query = key block on CPU: 128 below 2048 slots, 256 from there on (measured
    in `choose_impl`: bigger blocks waste more of the diagonal, smaller ones loop more)."""
    return 128 if seq_len < 2048 else 256


def blocked_attention(q, k, v, valid=None, *, causal=True, scale=None, block: int | None = None):
    """`dense_attention` computed in [block x block] tiles with an online softmax.

    Queries and keys are padded at the front to multiples of `block` (pad keys invalid, pad queries
    dropped). Queries are the last T of the C key slots (T < C: a prefill chunk after earlier ones), so
    after the padding query block i sits on key block i + (nk - nq): the causal diagonal stays on
    block boundaries. Causal: key blocks before the diagonal need only the key-validity mask, the
    diagonal one the causal mask too, later ones are skipped; bidirectional: every key block. Same
    arguments and returns as `dense_attention`.
    """
    B, Hq, T, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    if T > C:
        raise ValueError(f"blocked_attention needs at most as many queries as keys, got {T} and {C}")
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    bs = min(block_size(C) if block is None else int(block), T)
    nq, nk = -(-T // bs), -(-C // bs)
    pad_q, pad_k = nq * bs - T, nk * bs - C
    off = nk - nq  # key block on query block i's diagonal: i + off
    kvalid = jnp.ones((B, C), bool) if valid is None else valid.astype(bool)
    front = lambda x, n: jnp.pad(x, [(0, 0), (0, 0), (n, 0), (0, 0)]) if n else x  # noqa: E731
    qg = _split_groups(front(q, pad_q), k) * jnp.asarray(scale, q.dtype)
    kvalid = jnp.pad(kvalid, ((0, 0), (pad_k, 0)))  # pad keys are invisible
    kb = front(k, pad_k).reshape(B, Hkv, nk, bs, D)
    vb = front(v, pad_k).reshape(B, Hkv, nk, bs, D)
    key_ok = kvalid.reshape(B, nk, bs)[:, :, None, None, None, :]  # [B, nk, 1, 1, 1, bs]
    diag = jnp.arange(bs)[None, :] <= jnp.arange(bs)[:, None]  # [bq, bk]

    def logits(qi, j):
        s = jnp.einsum("bkgqd,bkcd->bkgqc", qi, kb[:, :, j], preferred_element_type=jnp.float32)
        return jnp.where(key_ok[:, j], s, MASK_VALUE)

    def q_block(_, xs):
        i, qi = xs  # qi [B, Hkv, G, bs, D]
        init = (jnp.full((B, Hkv, G, bs, 1), MASK_VALUE, jnp.float32),
                jnp.zeros((B, Hkv, G, bs, 1), jnp.float32),
                jnp.zeros((B, Hkv, G, bs, D), jnp.float32))
        body = lambda j, c: _online_step(c, logits(qi, j), vb[:, :, j])  # noqa: E731
        if causal:
            # Before the diagonal no causal mask is needed; after it nothing runs: a static trip
            # count with a skip (not a traced one) keeps the loop reverse-differentiable (the testbed
            # trains through the prefill), and a skipped step costs no FLOPs.
            before = lambda j, c: lax.cond(j < i + off, body, lambda j, c: c, j, c)  # noqa: E731
            carry = lax.fori_loop(0, nk, before, init)
            carry = _online_step(carry, jnp.where(diag, logits(qi, i + off), MASK_VALUE), vb[:, :, i + off])
        else:
            carry = lax.fori_loop(0, nk, body, init)
        m, l, acc = carry
        out = (acc / l).astype(q.dtype)
        return None, (out, (m + jnp.log(l))[..., 0])

    qs = jnp.moveaxis(qg.reshape(B, Hkv, G, nq, bs, D), 3, 0)  # [nq, B, Hkv, G, bs, D]
    _, (out, lse) = lax.scan(q_block, None, (jnp.arange(nq), qs))
    out = jnp.moveaxis(out, 0, 3).reshape(B, Hq, nq * bs, D)[:, :, pad_q:]
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, Hq, nq * bs)[:, :, pad_q:]
    return out, lse


def splash_attention(q, k, v, valid=None, *, causal=True, scale=None, block: int = 128,
                     interpret: bool = False):
    """TPU: jax's Pallas splash attention (flash attention with block-sparse masks).

    Slots are padded at the front to a multiple of `block` (a multiple of 128); padding (given and
    added) is segment 0, real tokens segment 1, so real queries never see padding keys and no row is
    empty. One MQA kernel per (batch row, kv head) via vmap: the G query heads share K/V unrepeated.
    Same arguments and returns as `dense_attention`.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    Sp = -(-S // block) * block
    pad = Sp - S
    front = [(0, 0), (0, 0), (pad, 0), (0, 0)]
    qg = _split_groups(jnp.pad(q, front), k) * jnp.asarray(scale, q.dtype)  # [B, Hkv, G, Sp, D]
    kp, vp = jnp.pad(k, front), jnp.pad(v, front)
    seg = jnp.ones((B, S), jnp.int32) if valid is None else valid.astype(jnp.int32)
    seg = jnp.pad(seg, ((0, 0), (pad, 0)))
    one = masks.CausalMask((Sp, Sp)) if causal else masks.FullMask((Sp, Sp))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
    kernel = splash.make_splash_mqa_single_device(
        masks.MultiHeadMask([one] * G), block_sizes=sizes, save_residuals=True, interpret=interpret)

    def one_head(qh, kh, vh, sg):  # [G, Sp, D], [Sp, D], [Sp, D], [Sp]
        out, (lse,) = kernel(qh, kh, vh, splash.SegmentIds(q=sg, kv=sg))
        return out, lse

    per_head = jax.vmap(one_head, in_axes=(0, 0, 0, None))
    out, lse = jax.vmap(per_head)(qg, kp, vp, seg)
    return (out.reshape(B, Hq, Sp, D)[:, :, pad:].astype(q.dtype),
            lse.reshape(B, Hq, Sp)[:, :, pad:].astype(jnp.float32))


def cudnn_attention(q, k, v, valid=None, *, causal=True, scale=None):
    """GPU (bfloat16 / float16): `jax.nn.dot_product_attention(implementation="cudnn")`. Returns
    (out, None): jax hands cuDNN's logsumexp back in the output dtype, and a bf16 lse (~0.4% of |lse|)
    would put percent-level errors into exp(s - lse), so observers needing it compute their own.
    Left padding goes in as a boolean [B, 1, S, S] mask. Untested here (no GPU in the sessions that
    wrote it)."""
    B, Hq, S, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, H, S, D] -> [B, S, H, D]
    mask = None if valid is None else jnp.broadcast_to(valid.astype(bool)[:, None, None, :], (B, 1, S, S))
    out = jax.nn.dot_product_attention(t(q), t(k), t(v), mask=mask, scale=scale, is_causal=causal,
                                       implementation="cudnn")
    return t(out).astype(q.dtype), None


def choose_impl(seq_len: int, dtype, backend: str | None = None, causal: bool = True) -> str:
    """`impl="auto"`: which implementation runs for `seq_len` slots of `dtype` on `backend`.

    TPU: splash. GPU: cudnn for bfloat16 / float16 (cuDNN's flash kernels take no float32), else as
    CPU. CPU: dense below DENSE_MAX_LEN_CAUSAL / _BIDIRECTIONAL slots, blocked from there on.
    Measured on the shared 2-core CPU (load ~3), one jitted attention call, float32, cpu-156m's LM
    shapes B=4, Hq=16, Hkv=4, D=64 (time blocked / dense, by block): S=200: 1.26 (64), 1.9 (128);
    S=384: 0.49 (128), 1.2 (256); S=600: 0.43 (128), 0.81 (256); S=1024: 0.46 (128), 0.60 (256);
    S=1600: 0.31 (128), 0.43 (256); S=2904: dense 2.22 s, blocked 1.13 s (128), 0.78 s (256),
    0.87 s (512). B=1, S=600: 0.44 (128). Bidirectional, the
    vision tower's B=4, H=2, D=32, S=577: 1.2 (128), 0.88 (577 = one block): no gain to chase.
    """
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    limit = DENSE_MAX_LEN_CAUSAL if causal else DENSE_MAX_LEN_BIDIRECTIONAL
    return "dense" if seq_len < limit else "blocked"


@functools.partial(jax.named_call, name="prefill_attention")
def prefill_attention(q, k, v, valid=None, *, causal=True, scale=None, impl: str = "auto"):
    """Self-attention of a whole prompt (T == C). q [B, Hq, S, D]; k, v [B, Hkv, S, D]; valid [B, S]
    bool or None (all valid). Returns (out [B, Hq, S, D] in q's dtype, lse [B, Hq, S] float32, or None
    from 'cudnn', whose lse is only bf16-precise).
    impl: 'auto' (`choose_impl`) | 'dense' | 'blocked' | 'splash' (TPU; interpret mode on CPU) | 'cudnn'.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        impl = choose_impl(q.shape[2], q.dtype, causal=causal)
    if impl == "dense":
        return dense_attention(q, k, v, valid, causal=causal, scale=scale)
    if impl == "blocked":
        return blocked_attention(q, k, v, valid, causal=causal, scale=scale)
    if impl == "splash":  # a Pallas kernel: per device under a mesh (`pallas_kernels.mesh`)
        kernel = functools.partial(splash_attention, causal=causal, scale=scale,
                                   interpret=jax.default_backend() != "tpu")
        axes = split_axes(q.shape[0], k.shape[1])
        heads = rows_heads(axes)
        return per_device(kernel, axes, (heads, heads, heads, rows_heads(axes[:1])), heads)(q, k, v, valid)
    return cudnn_attention(q, k, v, valid, causal=causal, scale=scale)
