"""Token sampling: greedy, temperature, top-k, top-p. Pure, jit-safe, seeded by an explicit key.

`Sampling` is a pytree of three scalars, so one compiled executable serves every temperature, top_k
and top_p: pass it as an ordinary (traced) jit argument. It stays hashable while its fields are Python
numbers, so code that passes it as a static argument keeps working (one compile per value then).
"""

from __future__ import annotations

import math
import numbers

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_NEG = jnp.finfo(jnp.float32).min


def _is_user_value(x) -> bool:
    """A value a user typed (a number or a string), as opposed to an array or a sentinel JAX puts in
    pytree slots while transforming."""
    return isinstance(x, (numbers.Number, np.generic, str))


@flax.struct.dataclass
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters.

    temperature: finite float >= 0; top_k: int >= 0 (above the vocabulary size it keeps every token);
    top_p: finite float in (0, 1]. Checked on construction from Python / numpy numbers (ValueError);
    traced or device values (inside jit) are not checked.
    """

    temperature: float | jax.Array = 0.0
    top_k: int | jax.Array = 0
    top_p: float | jax.Array = 1.0

    def __post_init__(self):
        if all(_is_user_value(x) for x in (self.temperature, self.top_k, self.top_p)):
            check_sampling(self.temperature, self.top_k, self.top_p)

    def as_arrays(self) -> Sampling:
        """The same settings as device scalars (float32, int32, float32): one executable for all values."""
        return Sampling(jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p))


def _real(x) -> bool:
    return isinstance(x, (numbers.Real, np.floating, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_sampling(temperature, top_k, top_p) -> None:
    """Raise ValueError for sampling settings that are not numbers in range (booleans are not numbers)."""
    if not _real(temperature) or not math.isfinite(float(temperature)) or float(temperature) < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not _real(top_k) or not isinstance(top_k, (numbers.Integral, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not _real(top_p) or not math.isfinite(float(top_p)) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r}")


def check_seed(seed, batch: int | None = None) -> None:
    """The PRNG seed must be an int the backend represents: 0 <= seed < 2**32 (jax.random.key and numpy's
    SeedSequence both take any uint32; booleans are not seeds). With `batch`, a sequence of `batch` such
    seeds (one per row) is accepted too. TypeError / ValueError otherwise."""
    if batch is not None and isinstance(seed, (list, tuple, np.ndarray)):
        if len(seed) != batch:
            raise ValueError(f"seed: {len(seed)} per-row seeds for a batch of {batch} rows")
        for s in seed:
            check_seed(s)
        return
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer >= 0 and < 2**32{' (or one per row)' if batch else ''}, "
                        f"got {seed!r}")
    if not 0 <= int(seed) < 2 ** 32:
        raise ValueError(f"seed must be >= 0 and < 2**32, got {seed!r}")


def row_keys(seed, batch: int) -> jax.Array:
    """[batch] PRNG keys, row b's from seed[b] (a sequence of per-row seeds) or from `seed` (an int: every
    row the same key). Sampling draws row b's tokens from its own key only, so a row samples the same
    tokens alone or in any batch, at any position in it (two identical rows with one seed sample alike:
    give them different seeds for independent draws)."""
    check_seed(seed, batch)
    if isinstance(seed, (list, tuple, np.ndarray)):
        return jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seed, np.uint32)))
    return jnp.broadcast_to(jax.random.key(int(seed)), (batch,))


def fold_in(key: jax.Array, data) -> jax.Array:
    """`jax.random.fold_in` of one key or of each of a [B] array of row keys."""
    if key.ndim:
        return jax.vmap(jax.random.fold_in, (0, None))(key, data)
    return jax.random.fold_in(key, data)


def filtered_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The distribution a non-greedy draw samples from: logits [B, V] / temperature, with tokens below
    the top-k-th value and outside the top-p nucleus set to float32 min. Returns float32 [B, V].

    One descending sort serves both filters: top-k thresholds at the k-th largest value (ties at it
    survive); top-p keeps the smallest prefix of the (top-k-filtered) sorted distribution whose mass
    reaches top_p (the first token always survives). Temperature 0 is treated as 1 here (greedy
    never reads these logits)."""
    V = logits.shape[-1]
    temperature = jnp.asarray(sampling.temperature, jnp.float32)
    top_k = jnp.minimum(jnp.asarray(sampling.top_k, jnp.int32), V)
    top_p = jnp.asarray(sampling.top_p, jnp.float32)
    logits = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)

    def filters(logits):
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
        kth = jax.lax.dynamic_slice_in_dim(ordered, jnp.maximum(top_k - 1, 0), 1, axis=-1)
        drop_k = (top_k > 0) & (logits < kth)
        logits = jnp.where(drop_k, _NEG, logits)
        # masking below kth only touches the sorted tail, so the sorted filtered row is this:
        ordered = jnp.where((top_k > 0) & (ordered < kth), _NEG, ordered)
        probs = jax.nn.softmax(ordered, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        cutoff_idx = jnp.sum(cum - probs < top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(ordered, cutoff_idx[:, None], axis=-1)
        return jnp.where((top_p < 1.0) & (logits < cutoff), _NEG, logits)

    # the sort is skipped at run time when neither filter is on
    return jax.lax.cond((top_k > 0) | (top_p < 1.0), filters, lambda x: x, logits)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B, V] float32 -> token ids [B] int32 (argmax when temperature == 0). key: [B] row keys
    (`row_keys`) or one key that every row uses; each row draws from its own key, so its token does not
    depend on the other rows."""
    keys = key if key.ndim else jnp.broadcast_to(key, logits.shape[:1])

    def drawn():
        filtered = filtered_logits(logits, sampling)
        return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, filtered).astype(jnp.int32)

    greedy = lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32)  # noqa: E731
    return jax.lax.cond(jnp.asarray(sampling.temperature, jnp.float32) == 0.0, greedy, drawn)
