"""Small helpers for using vkv_jax from your own JAX code (see `colab/in_your_pipeline.ipynb`).

The functional core: `vkv_jax.prefill` (`run_prompt`: the prompt pass), `vkv_jax.request` (`prefill`:
prompt -> compressed, paged cache), `vkv_jax.decode` (`decode_step`, `feed`, `step`, the loops) and
`vkv_jax.cache` (`from_prefill`, `compact`); this module adds:

* `compress` — the post-prefill compression step on its own (method plan + compaction), and `grow` —
  room for more slots added to a compressed cache later (`paging.grow`);
* `feed_tokens` — teacher-force a follow-up turn's tokens into an existing (compressed) cache, so a
  conversation continues from a saved cache without re-running the prompt;
* `save_state` / `restore_state` — a `DecodeState` (compressed cache + last token + positions) to and
  from an Orbax checkpoint (StandardCheckpointer, orbax-checkpoint 0.12.8), bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from vkv_jax import cache as cache_lib
from vkv_jax import decode, paging, request
from vkv_jax.decode import DecodeState
from vkv_jax.decode_trim import DecodeTrim
from vkv_jax.sampling import fold_in

compress = request.compress  # the compression step on its own: (PromptPass, method, max_new_tokens=0) -> cache
grow = paging.grow  # (cache, capacity) -> the same cache with room for `capacity` slots (static)


def feed_tokens(params: dict[str, Any], cfg, cache: cache_lib.KVCache, tokens: jax.Array,
                positions: jax.Array) -> tuple[jax.Array, cache_lib.KVCache, jax.Array]:
    """Append `tokens` [B, T] (a follow-up turn, all rows the same length T) from original positions
    `positions` [B] (`decode.feed` with every token alive). Returns (logits [B, V] after the last token,
    cache, next positions [B]). The decode segment grows when it has fewer than T free slots
    (`paging.grow_for`). The new slots are tagged GENERATED (they are not prompt tokens of the compressed
    prefill)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return decode.feed(params, cfg, paging.grow_for(cache, tokens.shape[1]), tokens, positions)


def continue_conversation(params: dict[str, Any], cfg, state: DecodeState, follow_up: jax.Array,
                          max_new_tokens: int, sampling, eos_ids: tuple[int, ...], pad_id: int,
                          key: jax.Array) -> tuple[jax.Array, DecodeState]:
    """Answer a follow-up turn from a (restored) decode state without re-running the prompt.

    Feeds the state's pending last token and `follow_up` [B, T] (the next turn's token ids, e.g.
    " USER: ... ASSISTANT:") into the cache, then decodes `max_new_tokens` with `decode.scan_decode`.
    Returns (tokens [B, max_new_tokens], final state). Jit it with cfg, max_new_tokens, sampling,
    eos_ids, pad_id static; `sampling` may be traced). The decode segment grows when it has fewer than
    1 + T + max_new_tokens free slots (`paging.grow_for`: inside a jit by that many slots; outside, only when
    short, to a power-of-two bucket), so a turn never writes past it.
    """
    # the pending token is cached unless its row had already ended (then it is padding); the follow-up
    # starts at the position after it either way
    follow_up = jnp.asarray(follow_up, jnp.int32)
    cache = paging.grow_for(state.cache, 1 + follow_up.shape[1] + max_new_tokens)
    _, cache, _ = decode.feed(params, cfg, cache, state.tokens[:, None], state.positions, alive=~state.done[:, None])
    logits, cache, positions = decode.feed(params, cfg, cache, follow_up, state.positions + 1)
    first, done = decode.first_tokens(logits, fold_in(key, 1), sampling, eos_ids)
    new = DecodeState(cache=cache, tokens=first, positions=positions, done=done)
    return decode.scan_decode(params, cfg, new, key, max_new_tokens, sampling, eos_ids, pad_id)


def describe(tree: Any, max_lines: int = 40) -> str:
    """One line per leaf: key path, shape, dtype (the params or cache pytree at a glance)."""
    lines = []
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in leaves[:max_lines]:
        lines.append(f"{jax.tree_util.keystr(path):<48} {str(tuple(leaf.shape)):<22} {leaf.dtype}")
    if len(leaves) > max_lines:
        lines.append(f"... {len(leaves) - max_lines} more leaves")
    return "\n".join(lines)


def _as_state(tree: Any, path: Any = None) -> DecodeState:
    if isinstance(tree, DecodeState):
        return tree
    fields = ("cache", "tokens", "positions", "done")
    if not isinstance(tree, dict) or any(f not in tree for f in fields) or not isinstance(tree["cache"], dict):
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"{path or 'the checkpoint'} does not hold a decode state written by save_state: expected "
                         f"the entries {', '.join(fields)}, found {found}")
    try:
        cache = cache_lib.KVCache(**tree["cache"])
    except TypeError as e:
        raise ValueError(f"{path or 'the checkpoint'}: its cache entry is not a KVCache ({e})") from None
    return DecodeState(cache=cache, tokens=tree["tokens"], positions=tree["positions"], done=tree["done"])


def save_state(path: str | os.PathLike, state: DecodeState) -> None:
    """Write a DecodeState (cache pytree + tokens/positions/done) to the new directory `path` with
    Orbax. Blocks until written. Do it before passing `state` to a donating call (`scan_decode_jit`)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(os.fspath(path)), state)
        ckpt.wait_until_finished()
    trim = state.cache.decode_trim  # static settings are no arrays: kept beside them
    if trim is not None:
        with open(os.path.join(os.fspath(path), DECODE_TRIM_FILE), "w") as f:
            json.dump(dataclasses.asdict(trim), f)


def restore_state(path: str | os.PathLike, like: DecodeState | None = None) -> DecodeState:
    """Read a DecodeState written by `save_state`. With `like` (a state or its
    `jax.ShapeDtypeStruct`s) the restore is checked against its shapes/dtypes; without it the tree is
    rebuilt from the checkpoint's own metadata. Values are bit-identical to what was saved."""
    import orbax.checkpoint as ocp

    target = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(os.path.abspath(os.fspath(path)), target)
    state = _as_state(tree, path)
    trim_file = os.path.join(os.fspath(path), DECODE_TRIM_FILE)
    if os.path.exists(trim_file):  # a decode-trimmed cache: its settings come back with it
        with open(trim_file) as f:
            state = state.replace(cache=state.cache.replace(decode_trim=DecodeTrim(**json.load(f))))
    return state


DECODE_TRIM_FILE = "vkv_jax_decode_trim.json"
