"""When the evaluation compresses, which rows a method scores with, and what the answer is read from.

Three protocols, each answering one left-padded batch under one method (`answer_batch`, jitted):

* ``pre-template``: prefill the prompt up to the chat template's final `suffix` tokens ("ASSISTANT:"),
  compress, feed those tokens through decode steps, decode the answer. A method scores with the question's
  rows only.
* ``template``: prefill the whole prompt (the template's rows are among the scoring rows), compress, drop
  the template's KV from the compressed cache (whatever the method kept of it), re-feed the template
  tokens from the compressed cache, decode. With the full cache this is plain generation.
* ``multi-turn``: prefill turn 1's whole prompt, compress once; then a later turn's text (turn 1's gold
  answer, `</s>`, further questions and gold answers, the asked question and "ASSISTANT:") is fed from the
  compressed cache and its answer decoded: the question-agnostic case of a chat about one image.

In every protocol the fed tokens are ragged rows (`fed` [B, T] left padded, `fed_valid` [B, T]); padding
steps write dead slots. The KV share of a run is measured, not derived: `kv_live` = `cache.live_bytes()`
when the answer's first token is read, `kv_full` = the prefill's `full_kv_bytes` plus the bytes the fed
tokens added (for multi-turn: at compression, before any later turn's tokens, which every method holds
alike).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PROTOCOLS = ("pre-template", "template", "multi-turn")
TEMPLATE_TOKENS = 2  # "ASSISTANT" ":" of the LLaVA-1.5 template


def check_protocol(name: str) -> str:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
    return name


def answer_batch(params, cfg, method, budget, input_ids, valid, pixel_values, fed, fed_valid, *,
                 protocol: str, max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int,
                 kv_dtype: str | None = None):
    """One batch under one method and protocol.

    method: static; with `budget` (a traced scalar) it is `methods.split_budget`'s static half, with
    budget None the method as built.
    input_ids, valid [B, S] left padded: the whole prompt (pre-template: its last fed.shape[1] tokens are
    the template, not prefilled); fed, fed_valid [B, T]: the tokens fed after compression. kv_dtype: the
    compressed cache stored quantized (`kv_quant`; its live bytes count the scales), None: the model's dtype.
    Returns (tokens [B, max_new_tokens], first-token log-probs [B, V] f32, (pos, tag, length) of the cache
    as compressed (template dropped), kv_live, kv_full, kept [L, 2] prompt slots (text, vision)).
    """
    from vkv_jax import cache as cache_lib
    from vkv_jax import decode, paging, request
    from vkv_jax.models import family
    from vkv_jax.sampling import Sampling

    T = fed.shape[1]
    if protocol == "pre-template":
        input_ids, valid = input_ids[:, :input_ids.shape[1] - T], valid[:, :valid.shape[1] - T]
        pixel_values = family.prompt_prefix(pixel_values, input_ids.shape[1])
    logits, cache, pos, pstats = request.prefill(params, cfg, method, input_ids, valid, pixel_values,
                                                 max_new_tokens + T, budget, kv_dtype=kv_dtype)
    if protocol == "template":  # the template's slots are each row's last T original positions
        pos = pos - T
        cache = cache_lib.drop_positions_from(cache, valid.sum(axis=1).astype(jnp.int32) - T)
    layout, kept, before = (cache.pos, cache.tag, cache.length), paging.kept_by_modality(cache), cache.live_bytes()
    if T:
        logits, cache, pos = decode.feed(params, cfg, cache, fed, pos, alive=fed_valid)
    after = cache.live_bytes()
    kv_live, kv_full = after, pstats.full_kv_bytes  # template: the prefill held the template already
    if protocol == "pre-template":
        kv_full = pstats.full_kv_bytes + (after - before)
    elif protocol == "multi-turn":
        kv_live = before
    key = jax.random.key(0)
    first, done = decode.first_tokens(logits, key, Sampling(), eos_ids)
    state = decode.DecodeState(cache=cache, tokens=first, positions=pos, done=done)
    tokens, _ = decode.scan_decode(params, cfg, state, key, max_new_tokens, Sampling(), eos_ids, pad_id)
    return tokens, jax.nn.log_softmax(logits.astype(jnp.float32)), layout, kv_live, kv_full, kept


answer_batch_jit = jax.jit(answer_batch, static_argnames=("cfg", "method", "protocol", "max_new_tokens",
                                                          "eos_ids", "pad_id", "kv_dtype"))


# ----------------------------------------------------------------------------- multi-turn items

@dataclasses.dataclass(frozen=True)
class TurnItem:
    """One later turn of a dialogue about one image: turn 1's question is the compressed prompt; the
    asked question, answer, type and answer cells are turn `turn`'s (2..); `follow_up` is the text fed
    after turn 1's prompt (gold answers of the turns before)."""

    image: Any
    question: str  # turn 1's question (the prompt that is compressed)
    follow_up: str
    answer: str
    qtype: str | None
    answer_cells: tuple
    turn: int
    asked: str  # this turn's question


def follow_up_text(answers_before: Sequence[str], questions_after: Sequence[str]) -> str:
    """What the LLaVA-1.5 template renders after turn 1's "ASSISTANT:" up to turn k's "ASSISTANT:":
    for each earlier turn " {answer}</s>USER: {next question} ASSISTANT:"."""
    return "".join(f" {a}</s>USER: {q} ASSISTANT:" for a, q in zip(answers_before, questions_after, strict=True))


def multi_turn_items(examples: Sequence[Any], turns: int, config) -> list[TurnItem]:
    """Turns 2..turns of a dialogue per shapes example: `synthetic.more_questions` asks turns - 1 further
    questions (of `config`, the examples' `synthetic.ShapesConfig`) about the same image, each turn's
    history is the gold answers before it. Ordered by turn (all turn-2 items, then turn 3, ...)."""
    from vkv_jax.testbed import synthetic

    dialogues = [[e, *synthetic.more_questions(e, turns - 1, config)] for e in examples]
    items = []
    for k in range(1, turns):
        for d in dialogues:
            text = follow_up_text([q.answer for q in d[:k]], [q.question for q in d[1:k + 1]])
            q = d[k]
            items.append(TurnItem(image=d[0].image, question=d[0].question, follow_up=text, answer=q.answer,
                                  qtype=q.qtype, answer_cells=q.answer_cells, turn=k + 1, asked=q.question))
    return items


def fed_tokens(tokenizer, items: Sequence[Any], input_ids: np.ndarray | None, protocol: str,
               width: int | None = None, suffix: int = TEMPLATE_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """(fed [B, T] int32, fed_valid [B, T] bool), left padded: the last `suffix` tokens of input_ids
    (pre-template, template: the template's) or each item's `follow_up` tokenised (multi-turn), padded
    to `width` (default: the longest)."""
    if protocol != "multi-turn":
        ids = np.asarray(input_ids)
        fed = ids[:, ids.shape[1] - suffix:].astype(np.int32)
        return fed, np.ones(fed.shape, bool)
    rows = [tokenizer.encode(item.follow_up, add_special_tokens=False) for item in items]
    T = max(map(len, rows)) if width is None else width
    if any(len(r) > T for r in rows):
        raise ValueError(f"a follow-up holds {max(map(len, rows))} tokens, more than the width {T}")
    fed = np.full((len(rows), T), tokenizer.pad_id, np.int32)
    alive = np.zeros((len(rows), T), bool)
    for b, r in enumerate(rows):
        if r:
            fed[b, T - len(r):], alive[b, T - len(r):] = r, True
    return fed, alive
