"""One benchmark cell (setting x method x budget) on the library's request path: prefill as
`generate(stream=True)` runs it, decode steps timed one at a time (interleaved over a setting's cells and
its text-only floor), and the method's scoring + compaction timed on its own."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax import accounting, decode, paging, prefill, request
from vkv_jax.bench.probes import now, peak_device_memory
from vkv_jax.bench.setting import DTYPES, Setting
from vkv_jax.compile_cache import compiled
from vkv_jax.inputs import device_images
from vkv_jax.methods import Compression, PrefillContext, build
from vkv_jax.models import llava
from vkv_jax.models.config import LlavaConfig
from vkv_jax.request import start_request
from vkv_jax.sampling import Sampling

# ---------------------------------------------------------------- scoring + compaction on its own

def _score_and_compact(method, q, k, v, ctx: PrefillContext, max_new_tokens: int):
    """The compression part of `request.prefill` alone: per-layer observe, then `request.compress` (plan,
    compaction, paging into the static pool). q [L, B, Hq, S, D], k, v [L, B, Hkv, S, D]."""
    stats = jax.lax.map(lambda qk: method.observe(qk[0], qk[1], ctx), (q, k))
    return request.compress(prefill.PromptPass(None, k, v, ctx, stats), method, max_new_tokens)


_score_and_compact_jit = jax.jit(_score_and_compact, static_argnames=("method", "max_new_tokens"))


def time_scoring(cfg: LlavaConfig, method, ids: np.ndarray, dtype, num_visual: int, max_new_tokens: int,
                 reps: int = 3) -> tuple[float, float]:
    """(median seconds, compile seconds) of observe + plan + compact for this batch's shapes."""
    t = cfg.text
    L, (B, S) = t.num_layers, ids.shape
    key = jax.random.key(1)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (L, B, t.num_heads, S, t.head_dim), dtype)
    k = jax.random.normal(kk, (L, B, t.num_kv_heads, S, t.head_dim), dtype)
    v = jax.random.normal(kv, (L, B, t.num_kv_heads, S, t.head_dim), dtype)
    valid = jnp.ones((B, S), bool)
    ctx = PrefillContext(tags=jnp.asarray(ids == cfg.image_token_id).astype(jnp.int8),
                         positions=llava.positions_from_mask(valid), valid=valid, num_visual=num_visual)
    args = dict(q=q, k=k, v=v, ctx=ctx)
    exe, compile_s = compiled(_score_and_compact_jit, dict(method=method, max_new_tokens=max_new_tokens), **args)
    ts = []
    for _ in range(reps):
        s = now()
        jax.block_until_ready(exe(**args))
        ts.append(now() - s)
    return float(np.median(ts)), compile_s


# ---------------------------------------------------------------- one cell

def run_cell(params, cfg: LlavaConfig, setting: Setting, compression: Compression, ids, pix,
             new_tokens: int, pbytes: dict[str, int]) -> dict[str, Any]:
    """One (setting, method, budget) cell on its own (`run` interleaves a setting's cells instead:
    `prefill_cell`, `time_interleaved`, `finish_cell`). Roofline fractions are added later by `add_roofline`."""
    method = build(compression)
    row, state = prefill_cell(params, cfg, setting, compression, method, ids, pix, new_tokens, pbytes)
    decoder = Decoder.compile(params, cfg, state, new_tokens)
    time_interleaved([decoder], new_tokens)
    return finish_cell(row, decoder, cfg, method, ids)


def prefill_cell(params, cfg: LlavaConfig, setting: Setting, compression: Compression, method, ids, pix,
                 new_tokens: int, pbytes: dict[str, int],
                 kv_dtype: str | None = None) -> tuple[dict[str, Any], decode.DecodeState]:
    """Prefill one cell (`method` = `build(compression)`, its cache stored as `kv_dtype`) on the request path
    `generate(stream=True)` runs (`request.start_request`: prefill, fitted pool, first token, then the decode
    segment added) and count its bytes. Returns (its row, without the decode timings yet; the first
    DecodeState)."""
    B = setting.batch
    eos: tuple[int, ...] = ()  # no EOS: every row decodes all steps
    sampling = Sampling(0.0, 0, 1.0).as_arrays()
    dtype = DTYPES[setting.dtype]
    args = dict(input_ids=jnp.asarray(ids), valid=jnp.ones(ids.shape, bool), pixel_values=device_images(pix, dtype))
    key = jax.random.key(0)
    started = start_request(params, cfg, method, **args, budget=None, key=key, sampling=sampling, eos_ids=eos,
                            max_new_tokens=new_tokens, grow=True, kv_dtype=kv_dtype)
    done_prefill, state = started.prefilled, started.state
    logits, cache = done_prefill.logits, state.cache
    prefill_s, prefill_compile = done_prefill.seconds, done_prefill.compile_seconds
    flops = accounting.prefill_flop_counts(
        cfg, accounting.layer_lengths(method, cfg, ids.shape[1], setting.visual_tokens), B)
    start = now()  # the first token again, compiled by now
    jax.block_until_ready(decode.first_tokens_jit(logits, key, sampling, eos))
    ttft_s = prefill_s + now() - start

    kv_full = done_prefill.full_kv_bytes
    kv_live = float(cache.live_bytes())
    kv_alloc = cache.allocated_bytes()
    kv_read = accounting.kv_read_bytes(cache)
    vis_live = accounting.visual_live_bytes(cache)
    t = cfg.text
    vis_full = float(B * setting.visual_tokens * t.num_layers * t.num_kv_heads * 2 * t.head_dim
                     * jnp.dtype(dtype).itemsize)
    kept = np.asarray(paging.kept_by_modality_jit(cache))

    # the decode step reads the weights and, at the end of the run, `new_tokens` more slots per head;
    # `live` counts the cache as it is halfway through decoding (mean over the steps)
    per_token = cache.slot_bytes * t.num_layers * t.num_kv_heads * B
    kv_live_mean = kv_live + per_token * new_tokens / 2
    return {
        "setting": setting.name, "dtype": setting.dtype, "batch": B, "visual_tokens": setting.visual_tokens,
        "prompt_tokens": setting.prompt_tokens, "method": compression.name, "budget": compression.budget,
        "kv_dtype": kv_dtype, "new_tokens": new_tokens,
        "prefill_s": prefill_s, "ttft_s": ttft_s, "prefill_compile_s": prefill_compile,
        "prefill_gflops": flops["dense"] / 1e9, "prefill_gflops_causal": flops["causal"] / 1e9,
        "kv_bytes_full": kv_full, "kv_bytes_live": kv_live, "kv_bytes_allocated": kv_alloc,
        "kv_bytes_decode_segment": cache.decode_segment_bytes(), "kv_page_size": cache.page_size,
        "kv_pages": cache.num_pages,
        "kv_live_fraction": kv_live / kv_full if kv_full else None,
        "kv_visual_bytes_full": vis_full, "kv_visual_bytes_live": vis_live,
        "kv_visual_live_fraction": vis_live / vis_full if vis_full else None,
        "kept_text_per_layer": kept[:, 0].tolist(), "kept_vision_per_layer": kept[:, 1].tolist(),
        "roofline": {f"bytes_per_step_{kind}": accounting.decode_step_read_bytes(pbytes["decode_read"], kv)
                     for kind, kv in (("live", kv_live_mean), ("dense", kv_read["dense"]))},
    }, state


def finish_cell(row: dict[str, Any], decoder: Decoder, cfg: LlavaConfig, method, ids: np.ndarray) -> dict[str, Any]:
    """Add the decode timings and, for a compressing method, scoring + compaction timed on its own."""
    steps = np.asarray(decoder.times)
    B = row["batch"]
    row.update(tpot_s=float(np.median(steps)), tpot_p90_s=float(np.percentile(steps, 90)),
               tpot_mean_s=float(steps.mean()), decode_steps=int(len(steps)), decode_compile_s=decoder.compile_s,
               decode_tokens_per_s=B * len(steps) / float(steps.sum()))
    if row["method"] == "full":
        score_s, score_compile = 0.0, 0.0
    else:
        score_s, score_compile = time_scoring(cfg, method, ids, DTYPES[row["dtype"]], row["visual_tokens"],
                                              row["new_tokens"])
    row.update(scoring_compaction_s=score_s, scoring_compaction_compile_s=score_compile,
               scoring_compaction_share_of_prefill=score_s / row["prefill_s"] if row["prefill_s"] else None,
               peak_device_bytes=peak_device_memory())
    return row


def run_setting(params, cfg: LlavaConfig, setting: Setting, cells: list[Compression], ids, pix, new_tokens: int,
                pbytes: dict[str, int], bar=None,
                kv_dtypes: tuple[str | None, ...] = (None,)) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every cell of one setting (each compression in each KV storage of `kv_dtypes`), and its floor:
    prefill each (holding every cache), decode them interleaved (`time_interleaved`), then time each
    method's scoring on its own. A cell that fails is reported with its error and the others go on.
    Returns (cell rows, `cells` order within each KV dtype's, the KV dtypes in order; floor row)."""
    def status(text):
        if bar is not None:
            bar.set_postfix_str(f"{setting.name} {text}")

    rows: list[dict[str, Any]] = []
    prepared: list[tuple[dict[str, Any], Decoder, Any]] = []  # (row, decoder, method; None: the floor)
    for kv_dtype, c in ((d, c) for d in kv_dtypes for c in cells):
        status(f"{c.name}@{c.budget}{'' if kv_dtype is None else '/' + kv_dtype} prefill")
        try:
            method = build(c)
            row, state = prefill_cell(params, cfg, setting, c, method, ids, pix, new_tokens, pbytes, kv_dtype)
            prepared.append((row, Decoder.compile(params, cfg, state, new_tokens), method))
        except Exception as e:  # noqa: BLE001 - one failing cell is reported, the grid goes on
            row = {"setting": setting.name, "method": c.name, "budget": c.budget, "kv_dtype": kv_dtype,
                   "error": repr(e)[:2000]}
        rows.append(row)
    try:
        floor, state = prefill_floor(params, cfg, setting, ids, new_tokens)
        prepared.append((floor, Decoder.compile(params, cfg, state, new_tokens), None))
    except Exception as e:  # noqa: BLE001 - reported like a failing cell
        floor = {"setting": setting.name, "error": repr(e)[:2000]}
    status(f"decode, {len(prepared)} cells interleaved")
    try:
        time_interleaved([d for _, d, _ in prepared], new_tokens)
    except Exception as e:  # noqa: BLE001 - a decode failure voids this setting's timings, not the run
        for row, _, _ in prepared:
            _failed(row, f"interleaved decode failed: {e!r}")
        prepared = []
    for row, decoder, method in prepared:
        if row is floor:
            floor = finish_floor(row, decoder, pbytes["decode_read"])
            continue
        status(f"{row['method']}@{row['budget']} scoring")
        try:
            finish_cell(row, decoder, cfg, method, ids)
        except Exception as e:  # noqa: BLE001 - reported in the row
            _failed(row, repr(e))
    if bar is not None:
        bar.update(len(cells) * len(kv_dtypes))
    return rows, floor


def _failed(row: dict[str, Any], message: str) -> None:
    """Turn a row into an error row in place (its setting, method and budget kept)."""
    keep = {k: row[k] for k in ("setting", "method", "budget", "kv_dtype") if k in row}
    row.clear()
    row.update(keep, error=message[:2000])


@dataclasses.dataclass
class Decoder:
    """One cell's greedy decode through `decode.stream_decode` (the streaming loop of `generate`, its
    `decode.step_jit` compiled ahead; no EOS: every row decodes every step), one timed step at a time."""

    steps: Iterator[np.ndarray]  # the stream, its first token already taken
    compile_s: float
    times: list[float] = dataclasses.field(default_factory=list)

    @classmethod
    def compile(cls, params, cfg: LlavaConfig, state: decode.DecodeState, new_tokens: int) -> Decoder:
        args = dict(key=jax.random.key(0), sampling=Sampling(0.0, 0, 1.0).as_arrays())
        step, compile_s = compiled(decode.step_jit, dict(cfg=cfg, eos_ids=(), pad_id=0), params=params, state=state,
                                   index=jnp.int32(1), **args)
        steps = decode.stream_decode(params, cfg, state, max_new_tokens=new_tokens, eos_ids=(), pad_id=0,
                                     step_exe=step, **args)
        next(steps)  # the first token, sampled by the prefill's request path
        return cls(steps, compile_s)

    def advance(self, index: int) -> None:
        """Produce answer token `index` (1, 2, ... in order: the stream's next step)."""
        if index != len(self.times) + 1:
            raise ValueError(f"decode step {index} asked for, the stream is at step {len(self.times) + 1}")
        start = now()
        next(self.steps)  # one step; the tokens come back to the host, so the step has finished
        self.times.append(now() - start)


def time_interleaved(decoders: list[Decoder], new_tokens: int) -> None:
    """Decode steps 1 .. new_tokens - 1 round-robin over the cells: step i of every cell before step i + 1
    of any. The machine's read bandwidth drifts by a third between minutes here (see `bandwidth` at the
    start and end of a run), so cells timed one after the other would carry the drift into their TPOT
    ratios; interleaved, every cell sees the same conditions."""
    for index in range(1, new_tokens):
        for d in decoders:
            d.advance(index)


def prefill_floor(params, cfg: LlavaConfig, setting: Setting, ids: np.ndarray,
                  new_tokens: int) -> tuple[dict[str, Any], decode.DecodeState]:
    """The decode step's floor in this setting: the same model, batch and step executable over a cache of
    the prompt's text tokens only (full cache, no image), so it times the weights and the fixed per-step
    work with next to no KV. Its TPOT over the full cache's is the lowest TPOT ratio any compression
    can reach in this run. Returns (its row, without the decode timings yet; the first DecodeState)."""
    text = ids[:, ids[0] != cfg.image_token_id]
    started = start_request(params, cfg, build(Compression("full")), input_ids=jnp.asarray(text),
                            valid=jnp.ones(text.shape, bool), pixel_values=None, budget=None, key=jax.random.key(0),
                            sampling=Sampling(0.0, 0, 1.0).as_arrays(), eos_ids=(), max_new_tokens=new_tokens,
                            grow=True)
    kv_live = float(started.state.cache.live_bytes())
    return {"setting": setting.name, "prompt_tokens": int(text.shape[1]), "kv_bytes_live": kv_live}, started.state


def finish_floor(row: dict[str, Any], decoder: Decoder, weights_bytes: int) -> dict[str, Any]:
    """Add the floor's decode timings, and the rate at which its steps stream the weights."""
    steps = np.asarray(decoder.times)
    tpot = float(np.median(steps))
    return {**row, "tpot_s": tpot, "tpot_p90_s": float(np.percentile(steps, 90)),
            "weights_read_gbps": weights_bytes / tpot / 1e9}
