"""Layer / head budget allocation: pure jnp, jit-safe, exact-sum apportionment.

Every function here turns traced statistics into int32 kept-token counts. Budgets given by the user
are checked *statically* (`check_budget`, at method construction); everything else runs under jit.

Budget convention (shared by every method; each method's docstring says what a ratio is a fraction
of): a real number in (0, 1] is a ratio; an integer > 1 is an absolute token count. The type decides,
whatever its width: Python / numpy floats and 0-d float arrays are ratios, Python / numpy integers and
0-d integer arrays are counts (`number`; methods normalise their budget once, at construction). A value
out of range (<= 0, a float > 1) raises ValueError; a bool or a non-number TypeError. An absolute count
above what a row holds keeps the whole row.

Traced budgets: `TracedBudget` carries a budget's value as a traced scalar, its kind (ratio or count)
and a static bound on the kept count, so that one compiled prefill serves many budgets
(`vkv_jax.methods.split_budget`). Every function here accepts it wherever it accepts a budget.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

COUNT_BUCKET_MIN = 16


@flax.struct.dataclass
class TracedBudget:
    """A user budget whose value is traced (one executable for many budgets).

    value: float32 scalar (a ratio) or int32 scalar (a count); None in the static copy a method holds
           inside a jit key (`methods.bind_budget` puts the traced value in inside the trace).
    ratio: static, what the value means (the budget convention of the module docstring).
    bound: static upper bound of `static_count` for this prompt length (the capacity bucket,
           `count_bucket`), or None for a method whose capacity does not depend on the budget.
    """

    value: Any = None
    ratio: bool = flax.struct.field(pytree_node=False, default=True)
    bound: int | None = flax.struct.field(pytree_node=False, default=None)


def count_bucket(count: int, total: int) -> int:
    """Static capacity bucket of a kept count for rows of `total` tokens: the next power of two, at
    least `COUNT_BUCKET_MIN` (16), at most `total`. Budgets in one bucket share one executable."""
    return max(1, min(total, max(COUNT_BUCKET_MIN, 1 << (max(int(count), 1) - 1).bit_length())))


def budget_value(budget):
    """The budget as a number: float ratio, int count, or a `TracedBudget`'s traced value."""
    if isinstance(budget, TracedBudget):
        return budget.value
    return float(budget) if is_ratio(budget) else int(budget)


# --------------------------------------------------------------------------- static budget checks


MAX_TOKEN_BUDGET = 2 ** 31 - 1  # token counts live in int32 under jit
BUDGET_RULE = f"a ratio in (0, 1] or an integer token count in 2..{MAX_TOKEN_BUDGET}"


def number(value) -> int | float:
    """A user's number by value: an integer of any type (Python int, numpy integer scalar, 0-d integer array)
    -> int; a real of any other type (Python float, numpy floating scalar of any width, bfloat16, 0-d float
    array) -> float. TypeError for bool and everything else (strings, None, sequences, complex).

    A narrow float is read as the shortest decimal that its own width rounds to it (np.float32(0.1) -> 0.1,
    not 0.10000000149...): the value the user wrote, so it keeps the same tokens, compile key and results
    as the Python float."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{value!r} is a bool, not a number")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    dtype = getattr(value, "dtype", None)
    if dtype is None or getattr(value, "shape", None) != ():
        raise TypeError(f"{value!r} is not a number")
    x = np.asarray(value)
    if jnp.issubdtype(dtype, jnp.integer):
        return int(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{value!r} is not a real number")
    f = float(x)
    if dtype == np.float64 or not math.isfinite(f):
        return f
    for digits in range(1, 18):  # the shortest decimal that rounds back to the same narrow float
        short = float(f"{f:.{digits}g}")
        if np.asarray(short, dtype) == x:
            return short
    return f


def check_budget(budget, name: str = "budget") -> float | int:
    """Validate a user budget and return it normalised: float (a ratio in (0, 1]) or int (a count; 1 means
    everything), read by value from any numeric type (`number`). TypeError for a bool or a non-number,
    ValueError for an out-of-range value. A `TracedBudget` was checked before it was made and comes back
    unchanged."""
    if isinstance(budget, TracedBudget):
        return budget
    try:
        value = number(budget)
    except TypeError:
        kind = "a bool" if isinstance(budget, (bool, np.bool_)) else f"a {type(budget).__name__}"
        raise TypeError(f"{name} must be {BUDGET_RULE}, got {budget!r} ({kind})") from None
    if isinstance(value, int):
        if not 1 <= value <= MAX_TOKEN_BUDGET:
            raise ValueError(f"{name}={budget!r} is out of range: it must be {BUDGET_RULE}")
        return value
    if not math.isfinite(value):
        raise ValueError(f"{name}={budget!r} is not finite: it must be {BUDGET_RULE}")
    if value <= 0.0 or value > 1.0:
        raise ValueError(f"{name}={budget!r} is out of range: a float budget is a ratio in (0, 1]; "
                         "pass an int for an absolute token count")
    return value


def is_ratio(budget) -> bool:
    """Whether a (normalised, `check_budget`) budget is a ratio: a float, or the count 1 (everything)."""
    if isinstance(budget, TracedBudget):
        return budget.ratio
    return isinstance(budget, float) or budget == 1


def static_count(budget, total: int) -> int:
    """Static upper bound of `budget_count` for a row of `total` tokens (sizes caches)."""
    if total <= 0:
        return 0
    if isinstance(budget, TracedBudget):
        if budget.bound is None:
            raise ValueError("this traced budget has no static bound: the method's capacity must not need one")
        return max(1, min(total, int(budget.bound)))
    if is_ratio(budget):
        return max(1, min(total, int(math.floor(float(budget) * total + 1e-6))))
    return max(1, min(total, int(budget)))


def ratio_bound(budget, total: int) -> float:
    """Static upper bound of the budget as a share of `total` tokens (sizes page pools): a ratio is
    itself, a count is count / total, a traced budget the share its bucket `bound` allows (1.0 with none)."""
    if total <= 0:
        return 1.0
    if isinstance(budget, TracedBudget):
        return 1.0 if budget.bound is None else min(1.0, (int(budget.bound) + 1) / total)
    if is_ratio(budget):
        return min(1.0, float(budget))
    return min(1.0, int(budget) / total)


def budget_count(budget, total: jax.Array) -> jax.Array:
    """Kept tokens for rows holding `total` tokens: ratio -> max(1, floor(ratio * total)); count ->
    min(count, total). `total` [...] int (traced); returns int32 of the same shape (0 where total=0)."""
    total = jnp.asarray(total, jnp.int32)
    value = budget_value(budget)
    if is_ratio(budget):
        # +1e-6 keeps e.g. 0.1 * 30 = 2.9999999 from flooring to 2.
        c = jnp.floor(jnp.asarray(value, jnp.float32) * total.astype(jnp.float32) + 1e-6).astype(jnp.int32)
    else:
        c = jnp.broadcast_to(jnp.asarray(value, jnp.int32), total.shape)
    return jnp.where(total > 0, jnp.clip(c, 1, total), 0)


# --------------------------------------------------------------------------- apportionment helpers


def largest_remainder(weights: jax.Array, total: jax.Array) -> jax.Array:
    """Integers proportional to `weights` along the last axis that sum to `total` exactly.

    weights [..., N] >= 0 (float); total [...] int >= 0. Quotas q = w / sum(w) * total; every entry gets
    floor(q), the leftover units go to the largest fractional parts, ties to the lower index.
    All-zero weights split uniformly. Returns int32 [..., N].
    """
    w = jnp.asarray(weights, jnp.float32)
    n = w.shape[-1]
    total = jnp.asarray(total, jnp.int32)
    ws = w.sum(-1, keepdims=True)
    w = jnp.where(ws > 0, w, 1.0)
    ws = w.sum(-1, keepdims=True)
    q = w / ws * total[..., None].astype(jnp.float32)
    fl = jnp.floor(q)
    frac = q - fl
    fl = fl.astype(jnp.int32)
    r = total - fl.sum(-1)
    order = jnp.argsort(-frac, axis=-1, stable=True)  # largest fraction first, ties lower index
    rank = jnp.argsort(order, axis=-1, stable=True)
    # r is normally in [0, N); float drift may push it outside, which floor-division absorbs:
    # every entry gets r // N, the top (r mod N) fractions one more (r = -1: smallest fraction -1).
    rr = r[..., None]
    return fl + rr // n + (rank < rr % n).astype(jnp.int32)


def waterfill(weights: jax.Array, target: jax.Array, lo: float, hi: float, iters: int = 60) -> jax.Array:
    """x = clip(c * weights, lo, hi) along the last axis with sum(x) == target (bisection on c).

    weights [..., N] >= 0; target [...] (clipped to [N*lo, N*hi]). Used to renormalise budgets after
    clipping (VL-Cache `renormalize`, exact-sum modes). Returns float32 [..., N].
    """
    w = jnp.asarray(weights, jnp.float32)
    n = w.shape[-1]
    target = jnp.clip(jnp.asarray(target, jnp.float32), n * lo, n * hi)
    wpos = jnp.where(w > 0, w, jnp.inf).min(-1)
    c_hi = jnp.where(jnp.isfinite(wpos), hi / jnp.maximum(wpos, 1e-30), 1.0)
    c_lo = jnp.zeros_like(c_hi)

    def body(_, lohi):
        a, b = lohi
        mid = 0.5 * (a + b)
        s = jnp.clip(mid[..., None] * w, lo, hi).sum(-1)
        return jnp.where(s < target, mid, a), jnp.where(s < target, b, mid)

    a, b = jax.lax.fori_loop(0, iters, body, (c_lo, c_hi))
    return jnp.clip(b[..., None] * w, lo, hi)


def _bcast_heads(counts_lb: jax.Array, num_kv_heads: int) -> jax.Array:
    return jnp.broadcast_to(counts_lb[..., None], counts_lb.shape + (num_kv_heads,)).astype(jnp.int32)


# --------------------------------------------------------------------------- layer budgets


def uniform(budget, total: jax.Array, num_layers: int, num_kv_heads: int) -> jax.Array:
    """Same count in every layer and head. total [B] tokens per row -> int32 [L, B, Hkv]."""
    c = budget_count(budget, total)
    return jnp.broadcast_to(c[None, :, None], (num_layers, c.shape[0], num_kv_heads)).astype(jnp.int32)


def pyramid(budget, total: jax.Array, num_layers: int, num_kv_heads: int, window: int,
            beta: int = 20) -> jax.Array:
    """PyramidKV layer budgets (KVCache-Factory `PyramidKVCluster`, integer arithmetic).

    C = budget_count(budget, total) is the mean per-layer capacity *including* the window w;
    B = C - w. min_b = B // beta, max_b = 2B - min_b; if max_b >= S - w then max_b = S - w and
    min_b = 2B - max_b; steps = (max_b - min_b) // (L - 1); layer l keeps max_b - l*steps + w.
    S <= C keeps everything; S < 2B falls back to the uniform C (as the reference does).
    total [B] -> int32 [L, B, Hkv].
    """
    S = jnp.asarray(total, jnp.int32)
    C = budget_count(budget, S)
    w = jnp.minimum(window, C)
    Bbar = C - w
    min_b = Bbar // beta
    max_b = 2 * Bbar - min_b
    over = max_b >= S - w
    max_b = jnp.where(over, S - w, max_b)
    min_b = jnp.where(over, 2 * Bbar - max_b, min_b)
    steps = (max_b - min_b) // max(num_layers - 1, 1)
    layer = jnp.arange(num_layers, dtype=jnp.int32)[:, None]
    pyr = max_b[None] - layer * steps[None] + w[None]  # [L, B]
    uni = jnp.broadcast_to(C[None], pyr.shape)
    full = jnp.broadcast_to(S[None], pyr.shape)
    out = jnp.where((S <= C)[None], full, jnp.where((S < 2 * Bbar)[None], uni, pyr))
    return _bcast_heads(jnp.clip(out, jnp.minimum(1, S)[None], S[None]), num_kv_heads)


def pyramid_capacity(budget, prompt_len: int, window: int = 32, beta: int = 20) -> int:
    """Static bound on `pyramid` counts for prompts of at most `prompt_len` tokens."""
    C = static_count(budget, prompt_len)
    w = min(window, C)
    Bbar = C - w
    return min(prompt_len, max(C, 2 * Bbar - Bbar // beta + w))


def vlcache_ratios(density: jax.Array, alpha: float, lo: float = 0.01, hi: float = 1.0,
                   renormalize: bool = False) -> jax.Array:
    """VL-Cache Algorithm 1: beta[l] = clip(d[l] / sum_l d * alpha * L, lo, hi).

    density [L, B] (= 1 - sparsity); alpha float or [B]. With `renormalize` the clipped excess is redistributed
    proportionally to d so that sum_l beta == alpha * L (an option; the paper does not renormalise).
    Returns float32 [L, B] (fraction of each layer's prompt KV).
    """
    d = jnp.maximum(jnp.asarray(density, jnp.float32), 0.0)
    L = d.shape[0]
    dt = jnp.moveaxis(d, 0, -1)  # [B, L]
    z = dt.sum(-1, keepdims=True)
    dt = jnp.where(z > 0, dt, 1.0)
    z = dt.sum(-1, keepdims=True)
    a = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), dt.shape[:-1])  # float or per-row [B]
    if renormalize:
        beta = waterfill(dt, a * L, lo, hi)
    else:
        beta = jnp.clip(dt / z * (a[..., None] * L), lo, hi)
    return jnp.moveaxis(beta, -1, 0)


def vlcache(density: jax.Array, alpha: float, total: jax.Array, num_kv_heads: int,
            lo: float = 0.01, hi: float = 1.0, renormalize: bool = False,
            exact_sum: bool = False) -> jax.Array:
    """VL-Cache per-layer counts k[l] = max(1, floor(beta[l] * m)), m = total [B] prompt tokens.

    `exact_sum` (off by default; the paper leaves rounding open): apportion round(sum_l beta[l] * m) over
    layers by largest remainder (ties to the lower layer), so the realised total is exact (== round(alpha*L*m)
    when `renormalize` is also on). alpha >= 1 keeps every token (retention 1 is the identity).
    Returns int32 [L, B, Hkv].
    """
    beta = vlcache_ratios(density, alpha, lo, hi, renormalize)  # [L, B]
    m = jnp.asarray(total, jnp.int32)
    mf = m.astype(jnp.float32)[None]
    if exact_sum:
        quota = jnp.moveaxis(beta * mf, 0, -1)  # [B, L]
        tot = jnp.round(quota.sum(-1)).astype(jnp.int32)
        k = jnp.moveaxis(largest_remainder(quota, tot), -1, 0)
    else:
        k = jnp.floor(beta * mf + 1e-4).astype(jnp.int32)
    k = jnp.clip(jnp.maximum(k, 1), 0, m[None])
    # Retention alpha >= 1 is the identity, even where d/Z * alpha * L < 1 for a layer.
    k = jnp.where(jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), m.shape)[None] >= 1.0, m[None], k)
    return _bcast_heads(jnp.where(m[None] > 0, k, 0), num_kv_heads)


def aircache_ratios(strength: jax.Array, skewness: jax.Array, r: float, eps: float = 1e-6,
                    hi: float = 1.0, exact_sum: bool = False) -> jax.Array:
    """AirCache layer visual ratios r_hat[l] = clip(0.5 (s_t'[l] + s_k'[l]) * r, 0, hi).

    strength, skewness [L, B]; r float or [B]; s_x' = s_x / mean_l s_x (the paper only says "normalised across
    layers"; mean 1 is the normaliser that keeps the total budget); skewness is clipped below at eps first.
    With `exact_sum` clipped mass is redistributed (waterfill) so mean_l r_hat == r. Returns float32 [L, B].
    """
    st = jnp.asarray(strength, jnp.float32)
    sk = jnp.maximum(jnp.asarray(skewness, jnp.float32), eps)
    st = jnp.maximum(st, 0.0)
    st_mean = st.mean(0, keepdims=True)
    st_n = jnp.where(st_mean > 0, st / jnp.where(st_mean > 0, st_mean, 1.0), 1.0)
    sk_n = sk / sk.mean(0, keepdims=True)
    r = jnp.broadcast_to(jnp.asarray(r, jnp.float32), st.shape[1:])  # float or per-row [B]
    raw = 0.5 * (st_n + sk_n) * r[None]
    if exact_sum:
        L = raw.shape[0]
        rt = waterfill(jnp.moveaxis(raw, 0, -1), r * L, 0.0, hi)
        return jnp.moveaxis(rt, -1, 0)
    return jnp.clip(raw, 0.0, hi)


def aircache(strength: jax.Array, skewness: jax.Array, r: float, num_visual: jax.Array,
             num_kv_heads: int, eps: float = 1e-6, hi: float = 1.0,
             exact_sum: bool = False) -> jax.Array:
    """AirCache visual counts n_v[l] = clip(round(r_hat[l] * N_v), 1, N_v) -> int32 [L, B, Hkv].

    num_visual [B]. `exact_sum` (an option beyond the paper): waterfill + largest remainder so that
    sum_l n_v[l] == round(r * N_v * L) exactly (when that is reachable with n_v <= hi * N_v).
    r >= 1 keeps every visual token (retention 1 is the identity).
    """
    rh = aircache_ratios(strength, skewness, r, eps, hi, exact_sum)  # [L, B]
    nv = jnp.asarray(num_visual, jnp.int32)
    nvf = nv.astype(jnp.float32)[None]
    L = rh.shape[0]
    if exact_sum:
        quota = jnp.moveaxis(rh * nvf, 0, -1)
        tot = jnp.round(jnp.asarray(r, jnp.float32) * L * nv.astype(jnp.float32)).astype(jnp.int32)
        tot = jnp.minimum(tot, jnp.floor(hi * nv.astype(jnp.float32) + 1e-4).astype(jnp.int32) * L)
        n = jnp.moveaxis(largest_remainder(quota, tot), -1, 0)
    else:
        n = jnp.round(rh * nvf).astype(jnp.int32)
    n = jnp.clip(n, jnp.minimum(1, nv)[None], nv[None])
    # r >= 1 keeps every visual token (retention 1 is the identity).
    n = jnp.where(jnp.broadcast_to(jnp.asarray(r, jnp.float32), nv.shape)[None] >= 1.0, nv[None], n)
    return _bcast_heads(n, num_kv_heads)
