"""`python -m vkv_jax.bench`: latency, throughput and KV memory vs the full cache, vs HF transformers /
kvpress, and vs the memory-read bound of the device, in one run.

    python -m vkv_jax.bench --config cpu-156m --methods full,snapkv,streamingllm,aircache \
        --budgets 0.1,0.25 --batch 1,4 --visual-tokens 576,2880 --zip --new-tokens 32 --peers --out DIR

For every (dtype, batch, visual tokens) setting and every method x budget cell it measures, with the
library's own request path (`request.start_request` and `decode.step_jit`, the executables
`vkv_jax.generate(stream=True)` runs), compile time apart:
- prefill time (prefill + the method's scoring + compaction in one jit, then paging into a pool fitted to
  the kept slots) and TTFT (+ first sample);
- TPOT: each decode step timed on its own (median, p90), decode tokens/s = B * steps / their sum; a
  setting's cells (and its floor) are prefilled first, then decoded round-robin, one step of each in turn
  (`time_interleaved`), so their ratios are measured side by side;
- KV bytes: full prompt cache, live after compression, allocated, and the visual part live vs full;
- scoring + compaction on its own (the method's per-layer `observe`, `plan`, `cache.compact`) as a
  share of prefill. The library fuses these into prefill, so they are re-timed here in one jit over
  random q/k/v of the real shapes and the real modality layout (their cost does not depend on values);
- roofline: a read and a copy bandwidth benchmark in the same process, the bytes one decode step must
  read (decoder weights + lm_head + KV: live, and as the dense layout actually reads it) and the achieved
  fraction of that bound;
- floor: per setting, the same decode step over a cache of the prompt's text tokens only (`prefill_floor`):
  what the weights and the fixed per-step work cost here. Floor TPOT / full TPOT is the lowest TPOT ratio
  any compression can reach in this run; the TPOT ratio targets report it beside their value;
- prefill FLOP rate: the decoder's prefill matmul FLOPs (whole n x n attention, and its causal half) / the
  prefill time, beside a float32 matmul FLOP rate measured at the start and the end of the run (the best);
  with `--peers` the full cache's TTFT against HF transformers' in the same run (its own table and targets).
Peers (`--peers`): HF transformers `generate` (sdpa, full cache) and kvpress SnapKV / StreamingLLM at the
same kept fraction, on a checkpoint saved from the same random weights and the same inputs, in a venv
of their own (see `vkv_jax/bench/peers.py`). Output: a table, `bench.json`, `decode_latency.png`, `kv_bytes.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax import accounting, configs, decode, paging, prefill, request
from vkv_jax.compile_cache import compiled
from vkv_jax.inputs import device_images
from vkv_jax.methods import Compression, PrefillContext, available, build
from vkv_jax.models import anyres, family, llama, llava, qwen2_vl
from vkv_jax.models.config import LlavaConfig
from vkv_jax.request import start_request
from vkv_jax.sampling import Sampling

SCHEMA = "vkv_jax.bench/1"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PEER_METHODS = {"snapkv": "snapkv", "streamingllm": "streamingllm"}  # ours -> kvpress press


@dataclasses.dataclass(frozen=True)
class Setting:
    dtype: str
    batch: int
    visual_tokens: int
    text_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return self.visual_tokens + self.text_tokens

    @property
    def name(self) -> str:
        return f"{self.dtype}/b{self.batch}/v{self.visual_tokens}/s{self.prompt_tokens}"


# ---------------------------------------------------------------- inputs and byte counts

def make_inputs(cfg: LlavaConfig, batch: int, visual_tokens: int, text_tokens: int, seed: int = 0):
    """Random token ids with `visual_tokens` image tokens per row after a 5-token preamble (LLaVA's
    "USER: <image>\\n ..." layout), and random images. Returns input_ids [B, S] int32 and pixel_values
    [B * n_img, 3, H, W] float32 (n_img = visual_tokens / tokens per image); for LLaVA-NeXT / OneVision,
    `llava.VisualInputs` of one image per row whose anyres layout has exactly `visual_tokens` tokens."""
    if text_tokens < 2:
        raise ValueError(f"--text-tokens must be >= 2, got {text_tokens}")
    if family.is_qwen(cfg):
        return _qwen_inputs(cfg, batch, visual_tokens, text_tokens, seed)
    layout = _anyres_layout(cfg, visual_tokens) if cfg.anyres else None
    per_image = cfg.num_image_tokens
    if layout is None and (visual_tokens % per_image or visual_tokens <= 0):
        raise ValueError(f"--visual-tokens {visual_tokens} must be a positive multiple of the tower's "
                         f"{per_image} tokens per image")
    rng = np.random.default_rng(seed)
    hi = min(cfg.image_token_id, cfg.text.vocab_size)
    pre = min(5, text_tokens - 1)
    rows = []
    for _ in range(batch):
        text = rng.integers(3, hi, text_tokens)
        text[0] = 1  # BOS
        rows.append(np.concatenate([text[:pre], np.full(visual_tokens, cfg.image_token_id), text[pre:]]))
    ids = np.stack(rows).astype(np.int32)
    v = cfg.vision
    n_img = layout.num_crops if layout is not None else visual_tokens // per_image
    pix = rng.uniform(-1, 1, (batch * n_img, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    if layout is None:
        return ids, pix
    source, weight = anyres.pack_visual(ids, cfg.image_token_id, [[layout]] * batch, cfg.features_per_crop)
    return ids, anyres.VisualInputs(pix, source, weight, num_visual=visual_tokens)


def _qwen_inputs(cfg, batch: int, visual_tokens: int, text_tokens: int, seed: int):
    """Qwen2-VL: one image per row of the most nearly square merged-patch grid with `visual_tokens`
    tokens, random patches, the ids' M-RoPE positions."""
    if visual_tokens <= 0:
        raise ValueError(f"--visual-tokens must be positive, got {visual_tokens}")
    rows = max(d for d in range(1, int(visual_tokens ** 0.5) + 1) if visual_tokens % d == 0)
    m = cfg.vision.spatial_merge_size
    grid = (1, rows * m, visual_tokens // rows * m)
    rng = np.random.default_rng(seed)
    hi = min(cfg.image_token_id, cfg.text.vocab_size)
    pre = min(5, text_tokens - 1)
    text = rng.integers(3, hi, (batch, text_tokens))
    ids = np.concatenate([text[:, :pre], np.full((batch, visual_tokens), cfg.image_token_id), text[:, pre:]], 1)
    ids = ids.astype(np.int32)
    positions, _ = qwen2_vl.rope_index(ids, np.ones(ids.shape, bool), [[grid]] * batch, cfg.image_token_id, m)
    patches = rng.uniform(-1, 1, (batch * grid[1] * grid[2], cfg.vision.patch_dim)).astype(np.float32)
    return ids, qwen2_vl.QwenVisualInputs(patches, positions, (grid,) * batch, num_visual=visual_tokens)


def _anyres_layout(cfg: LlavaConfig, visual_tokens: int) -> anyres.ImageLayout:
    """The layout of an image whose anyres token count is `visual_tokens`: one of the sizes a benchmark can
    ask for (the crop and each grid pinpoint's own shape); ValueError names the achievable counts."""
    s = cfg.vision.image_size
    layouts = {}
    for h, w in sorted({(s, s), *cfg.image_grid_pinpoints}):
        layout = anyres.model_layout(cfg, h, w)
        layouts[layout.num_tokens] = (layout, (h, w))
    if visual_tokens not in layouts:
        sizes = dict(sorted((hw, n) for n, (_, hw) in layouts.items()))
        raise ValueError(f"--visual-tokens {visual_tokens}: a {cfg.model_type} image has a count set by its size; "
                         f"one image of a reference size gives {sizes} tokens (size (h, w): tokens)")
    return layouts[visual_tokens][0]


# ---------------------------------------------------------------- timing helpers

def _now() -> float:
    return time.perf_counter()


def bandwidth(nbytes: int = 1 << 28, reps: int = 5) -> dict[str, float]:
    """Device memory bandwidth from XLA itself: `read` = a sum over a large f32 array (bytes read per
    second); `copy` = x <- x + 1 in place (donated, so no fresh pages are touched; bytes read + written
    per second, STREAM's convention). Best and median of `reps`."""
    n = nbytes // 4
    x = jnp.arange(n, dtype=jnp.float32)
    y = jnp.zeros(n, jnp.float32)
    read = jax.jit(lambda a: jnp.sum(a)).lower(x).compile()
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0).lower(y).compile()
    jax.block_until_ready(read(x))
    y = jax.block_until_ready(copy(y))
    tr, tc = [], []
    for _ in range(reps):
        t = _now()
        jax.block_until_ready(read(x))
        tr.append(_now() - t)
        t = _now()
        y = jax.block_until_ready(copy(y))
        tc.append(_now() - t)
    del x, y
    return {"read_gbps": nbytes / min(tr) / 1e9, "copy_gbps": 2 * nbytes / min(tc) / 1e9,
            "read_gbps_median": nbytes / float(np.median(tr)) / 1e9,
            "copy_gbps_median": 2 * nbytes / float(np.median(tc)) / 1e9, "bytes": nbytes, "reps": reps}


def matmul_flop_rate(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an [n, n] x [n, n] jitted matmul (2 n^3 FLOPs) on the default device."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peak_device_memory() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


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
        s = _now()
        jax.block_until_ready(exe(**args))
        ts.append(_now() - s)
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
                 new_tokens: int, pbytes: dict[str, int]) -> tuple[dict[str, Any], decode.DecodeState]:
    """Prefill one cell (`method` = `build(compression)`) on the request path `generate(stream=True)` runs
    (`request.start_request`: prefill, fitted pool, first token, then the decode segment added) and count
    its bytes. Returns (its row, without the decode timings yet; the first DecodeState)."""
    B = setting.batch
    eos: tuple[int, ...] = ()  # no EOS: every row decodes all steps
    sampling = Sampling(0.0, 0, 1.0).as_arrays()
    dtype = DTYPES[setting.dtype]
    args = dict(input_ids=jnp.asarray(ids), valid=jnp.ones(ids.shape, bool), pixel_values=device_images(pix, dtype))
    key = jax.random.key(0)
    started = start_request(params, cfg, method, **args, budget=None, key=key, sampling=sampling, eos_ids=eos,
                            max_new_tokens=new_tokens, grow=True)
    done_prefill, state = started.prefilled, started.state
    logits, cache = done_prefill.logits, state.cache
    prefill_s, prefill_compile = done_prefill.seconds, done_prefill.compile_seconds
    flops = accounting.prefill_flop_counts(
        cfg, accounting.layer_lengths(method, cfg, ids.shape[1], setting.visual_tokens), B)
    start = _now()  # the first token again, compiled by now
    jax.block_until_ready(decode.first_tokens_jit(logits, key, sampling, eos))
    ttft_s = prefill_s + _now() - start

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
    per_token = 2 * t.head_dim * jnp.dtype(dtype).itemsize * t.num_layers * t.num_kv_heads * B
    kv_live_mean = kv_live + per_token * new_tokens / 2
    return {
        "setting": setting.name, "dtype": setting.dtype, "batch": B, "visual_tokens": setting.visual_tokens,
        "prompt_tokens": setting.prompt_tokens, "method": compression.name, "budget": compression.budget,
        "new_tokens": new_tokens,
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
                pbytes: dict[str, int], bar=None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every cell of one setting, and its floor: prefill each (holding every cache), decode them
    interleaved (`time_interleaved`), then time each method's scoring on its own. A cell that fails is
    reported with its error and the others go on. Returns (cell rows in `cells` order, floor row)."""
    def status(text):
        if bar is not None:
            bar.set_postfix_str(f"{setting.name} {text}")

    rows: list[dict[str, Any]] = []
    prepared: list[tuple[dict[str, Any], Decoder, Any]] = []  # (row, decoder, method; None: the floor)
    for c in cells:
        status(f"{c.name}@{c.budget} prefill")
        try:
            method = build(c)
            row, state = prefill_cell(params, cfg, setting, c, method, ids, pix, new_tokens, pbytes)
            prepared.append((row, Decoder.compile(params, cfg, state, new_tokens), method))
        except Exception as e:  # noqa: BLE001 - one failing cell is reported, the grid goes on
            row = {"setting": setting.name, "method": c.name, "budget": c.budget, "error": repr(e)[:2000]}
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
        bar.update(len(cells))
    return rows, floor


def _failed(row: dict[str, Any], message: str) -> None:
    """Turn a row into an error row in place (its setting, method and budget kept)."""
    keep = {k: row[k] for k in ("setting", "method", "budget") if k in row}
    row.clear()
    row.update(keep, error=message[:2000])


def add_flop_rates(results: list[dict], matmul_flops_per_s: float) -> None:
    """Prefill FLOPs / prefill time beside the matmul FLOP rate measured in the same run (its best)."""
    for r in results:
        if "error" in r:
            continue
        for kind, key in (("", "prefill_gflops"), ("_causal", "prefill_gflops_causal")):
            rate = r[key] * 1e9 / r["prefill_s"]
            r[f"prefill_gflops_per_s{kind}"] = rate / 1e9
            r[f"prefill_fraction_of_matmul{kind}"] = rate / matmul_flops_per_s


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

    def advance(self) -> None:
        start = _now()
        next(self.steps)  # one step; the tokens come back to the host, so the step has finished
        self.times.append(_now() - start)


def time_interleaved(decoders: list[Decoder], new_tokens: int) -> None:
    """Decode steps 1 .. new_tokens - 1 round-robin over the cells: step i of every cell before step i + 1
    of any. The machine's read bandwidth drifts by a third between minutes here (see `bandwidth` at the
    start and end of a run), so cells timed one after the other would carry the drift into their TPOT
    ratios; interleaved, every cell sees the same conditions."""
    for _ in range(1, new_tokens):
        for d in decoders:
            d.advance()


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


def add_roofline(results: list[dict], read_gbps: float) -> None:
    """Bound = bytes a step must read / measured read bandwidth; fraction = bound / measured TPOT.
    `live`: weights + live KV (what a ragged kernel must read); `dense`: weights + the whole allocated
    cache (what the dense layout reads)."""
    for r in results:
        if "error" in r:
            continue
        rf = r["roofline"]
        rf["read_gbps"] = read_gbps
        for kind in ("live", "dense"):
            bound = rf[f"bytes_per_step_{kind}"] / (read_gbps * 1e9)
            rf[f"bound_s_{kind}"] = bound
            rf[f"fraction_of_bound_{kind}"] = bound / r["tpot_s"]
        rf["achieved_read_gbps_dense"] = rf["bytes_per_step_dense"] / r["tpot_s"] / 1e9


# ---------------------------------------------------------------- ratios and targets

def _find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()) and "error" not in r:
            return r
    return None


def ratios(results: list[dict], peers: list[dict]) -> list[dict]:
    """ours / peer decode tokens/s (and TTFT) for matching (setting, method, kept fraction)."""
    out = []
    for r in results:
        if r["method"] == "full":
            p = _find(peers, case=r["setting"], peer="hf_full")
        elif r["method"] in PEER_METHODS and isinstance(r["budget"], float):
            p = _find(peers, case=r["setting"], peer=f"kvpress_{PEER_METHODS[r['method']]}",
                      kept_fraction=r["budget"])
        else:
            continue
        if p is None:
            continue
        out.append({"setting": r["setting"], "method": r["method"], "budget": r["budget"], "peer": p["peer"],
                    "ours_tokens_per_s": r["decode_tokens_per_s"], "peer_tokens_per_s": p["decode_tokens_per_s"],
                    "tokens_per_s_ratio": r["decode_tokens_per_s"] / p["decode_tokens_per_s"],
                    "ours_tpot_s": r["tpot_s"], "peer_tpot_s": p["tpot_s"],
                    "ttft_ratio": r["ttft_s"] / p["ttft_s"]})
    return out


def targets(results: list[dict], rat: list[dict], floors: list[dict] = ()) -> list[dict]:
    """The issue's targets, judged on whatever settings this run measured (nearest to each target). Where a
    floor was measured in the setting (`prefill_floor`: the step over a text-only cache), a decode target also
    carries `reachable`, its value for a step that cost only the floor: TPOT ratios floor / full (the
    lowest any cache reaches in this run), the read-bound fraction bound / floor, tokens/s against HF
    transformers' at the floor's TPOT."""
    out = []

    def floor_tpot(setting):
        f = _find(floors, setting=setting)
        return f["tpot_s"] if f else None

    def add(name, value, threshold, op, where, **extra):
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out.append({"target": name, "value": value, "threshold": f"{op} {threshold}", "met": met, "where": where,
                    **extra})

    def near(rows, batch, prompt):
        cand = [r for r in rows if r.get("batch", _batch(r)) == batch]
        if not cand:
            return []
        best = min(abs(_prompt(r) - prompt) for r in cand)
        return [r for r in cand if abs(_prompt(r) - prompt) == best]

    for batch, prompt, thr in ((1, 600, 1.2), (4, 3000, 2.0)):
        rows = [r for r in near(rat, batch, prompt) if r["method"] == "full"]
        for r in rows:
            fl = floor_tpot(r["setting"])
            add(f"full cache >= {thr}x HF tokens/s (batch {batch}, ~{prompt} tokens)",
                r["tokens_per_s_ratio"], thr, ">=", r["setting"],
                reachable=batch / fl / r["peer_tokens_per_s"] if fl else None)
    for r in near(rat, 4, 3000):
        if r["method"] == "full" and "ttft_ratio" in r:
            add("full cache prefill: TTFT <= 1.0x HF transformers' (batch 4, ~3000 tokens)", r["ttft_ratio"], 1.0,
                "<=", r["setting"])
    for r in near([r for r in results if r["method"] == "full"], 4, 3000):
        if "prefill_fraction_of_matmul_causal" in r:
            add("full cache prefill >= 50% of the matmul FLOP rate (causal FLOPs; batch 4, ~3000 tokens)",
                r["prefill_fraction_of_matmul_causal"], 0.5, ">=", r["setting"])
    for r in near(rat, 4, 3000):
        if r["method"] == "snapkv" and r["budget"] == 0.1:
            add("10% KV: >= 1.5x kvpress SnapKV tokens/s (batch 4, ~3000 tokens)", r["tokens_per_s_ratio"], 1.5,
                ">=", r["setting"])
    tpot_limit = {"aircache": 0.6, "vlcache": 0.5, "snapkv": 0.4}  # at 10% (AirCache: of the visual tokens)
    for r in results:
        if r["visual_tokens"] >= 2880 and r["budget"] == 0.1 and r["method"] in tpot_limit:
            full = _find(results, setting=r["setting"], method="full")
            if full:
                fl = floor_tpot(r["setting"])
                add(f"{r['method']} 10%: TPOT <= {tpot_limit[r['method']]}x full (>= 2880 visual)",
                    r["tpot_s"] / full["tpot_s"], tpot_limit[r["method"]], "<=", r["setting"],
                    reachable=fl / full["tpot_s"] if fl else None)
        if r["visual_tokens"] >= 2880 and r["budget"] == 0.1 and r["method"] in ("aircache", "vlcache", "csp"):
            add(f"{r['method']} 10% visual: live visual KV <= 0.15x full", r["kv_visual_live_fraction"], 0.15, "<=",
                r["setting"])
    for r in results:
        if r["method"] != "full":
            pages = r["kv_bytes_allocated"] - r["kv_bytes_decode_segment"]
            add(f"{r['method']}@{r['budget']}: allocated <= 1.15x live + decode segment", pages / r["kv_bytes_live"],
                1.15, "<=", r["setting"])
            add(f"{r['method']}@{r['budget']}: scoring + compaction <= 5% of prefill",
                r["scoring_compaction_share_of_prefill"], 0.05, "<=", r["setting"])
    for r in results:
        if r["method"] == "full":
            fl = floor_tpot(r["setting"])
            add("full cache decode >= 60% of the memory-read bound (dense bytes)",
                r["roofline"]["fraction_of_bound_dense"], 0.6, ">=", r["setting"],
                reachable=r["roofline"]["bound_s_dense"] / fl if fl and "bound_s_dense" in r["roofline"] else None)
    return out


def _batch(r):
    return int(r["setting"].split("/b")[1].split("/")[0])


def _prompt(r):
    return int(r["setting"].rsplit("/s", 1)[1])


# ---------------------------------------------------------------- output

def print_table(results: list[dict], rat: list[dict], peers: list[dict], floors: list[dict] = (),
                file=sys.stdout) -> None:
    hdr = (f"{'setting':<28} {'method':<13} {'budget':>6} {'prefill_s':>9} {'ttft_s':>7} {'tpot_ms':>8} "
           f"{'tok/s':>7} {'kv_live_MB':>10} {'kv_alloc_MB':>11} {'vis_kv':>6} {'score%':>6} "
           f"{'%bound':>6} {'vs_peer':>8}")
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for r in results:
        match = [x for x in rat if x["setting"] == r["setting"] and x["method"] == r["method"]
                 and x["budget"] == r["budget"]]
        vs = f"{match[0]['tokens_per_s_ratio']:.2f}x" if match else "-"
        vis = r["kv_visual_live_fraction"]
        share = r["scoring_compaction_share_of_prefill"]
        print(f"{r['setting']:<28} {r['method']:<13} {str(r['budget']):>6} {r['prefill_s']:9.3f} {r['ttft_s']:7.3f} "
              f"{1e3 * r['tpot_s']:8.2f} {r['decode_tokens_per_s']:7.1f} {r['kv_bytes_live'] / 1e6:10.2f} "
              f"{r['kv_bytes_allocated'] / 1e6:11.2f} {'-' if vis is None else f'{vis:.3f}':>6} "
              f"{100 * share:6.2f} {100 * r['roofline']['fraction_of_bound_dense']:6.1f} {vs:>8}", file=file)
    for f in floors:
        if "error" in f:
            print(f"{f['setting']:<28} {'floor':<13} ERROR {f['error'][:200]}", file=file)
        else:
            print(f"{f['setting']:<28} {'floor':<13} {'-':>6} {'':>9} {'':>7} {1e3 * f['tpot_s']:8.2f} {'':>7} "
                  f"{f['kv_bytes_live'] / 1e6:10.2f}   (text-only cache of {f['prompt_tokens']} tokens: weights "
                  f"streamed at {f['weights_read_gbps']:.1f} GB/s)", file=file)
    for p in peers:
        if "error" in p:
            print(f"{p['case']:<28} {p['peer']:<13} {p.get('kept_fraction', '')!s:>6} ERROR {p['error'][:200]}",
                  file=file)
        else:
            print(f"{p['case']:<28} {p['peer'][:13]:<13} {p['kept_fraction']!s:>6} {'':>9} {p['ttft_s']:7.3f} "
                  f"{1e3 * p['tpot_s']:8.2f} {p['decode_tokens_per_s']:7.1f} {p['kv_bytes_end'] / 1e6:10.2f}",
                  file=file)


def plot(results: list[dict], peers: list[dict], out: pathlib.Path, device: str, floors: list[dict] = ()) -> list[str]:
    """decode_latency.png (TPOT vs budget per method, one panel per setting, peers as markers, the full
    cache's read bound and the text-only floor as lines) and kv_bytes.png (live and allocated KV bytes vs
    budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results if r["method"] != "full"))
    files = []
    for fname, ylabel, fields in (("decode_latency.png", "time per output token (ms)", ("tpot_s",)),
                                  ("kv_bytes.png", "KV bytes (MB)", ("kv_bytes_live", "kv_bytes_allocated"))):
        fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.2), squeeze=False)
        for ax, s in zip(axes[0], settings):
            rows = [r for r in results if r["setting"] == s]
            scale = 1e3 if fields == ("tpot_s",) else 1e-6
            full = _find(rows, method="full")
            for i, m in enumerate(methods):
                pts = sorted((r["budget"], r) for r in rows if r["method"] == m and isinstance(r["budget"], float))
                if not pts:
                    continue
                for field, style in zip(fields, ("-o", "--x")):
                    ax.plot([b for b, _ in pts], [r[field] * scale for _, r in pts], style, color=f"C{i}",
                            label=f"{m}" + ("" if len(fields) == 1 else f" ({field.split('_')[-1]})"))
            if full:
                for field, ls in zip(fields, ("-", "--")):
                    ax.axhline(full[field] * scale, color="k", ls=ls, lw=1,
                               label="full cache" + ("" if len(fields) == 1 else f" ({field.split('_')[-1]})"))
            if fields == ("tpot_s",):
                if full:
                    ax.axhline(full["roofline"]["bound_s_dense"] * 1e3, color="grey", ls=":", lw=1,
                               label="read bound (full, dense)")
                floor = _find([f for f in floors if "error" not in f], setting=s)
                if floor:
                    ax.axhline(floor["tpot_s"] * 1e3, color="grey", ls="-.", lw=1, label="floor (text-only cache)")
                for p in peers:
                    if p.get("case") == s and "error" not in p:
                        marker = {"hf_full": "*", "kvpress_snapkv": "s",
                                  "kvpress_streamingllm": "^"}.get(p["peer"], "o")
                        x = p["kept_fraction"] if p["kept_fraction"] < 1 else 1.0
                        ax.plot([x], [p["tpot_s"] * 1e3], marker, color="grey", ms=9, mfc="none", label=p["peer"])
            ax.set_title(s, fontsize=9)
            ax.set_xlabel("budget (method's ratio)")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            h, lab = ax.get_legend_handles_labels()
            uniq = dict(zip(lab, h))
            if uniq:  # a panel whose cells all failed has nothing to label
                ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        fig.suptitle(f"vkv_jax.bench on {device}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    info = {"backend": jax.default_backend(), "device": str(getattr(dev, "device_kind", dev.platform)),
            "devices": len(jax.devices()), "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__}
    try:
        info["loadavg_start"] = os.getloadavg()
        info["mem_total_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (OSError, ValueError, AttributeError):
        pass
    return info


# ---------------------------------------------------------------- driver

def print_prefill_table(results: list[dict], rat: list[dict], peers: list[dict], matmul_flops_per_s: float,
                        file=sys.stdout) -> None:
    """The full cache's prefill per setting: time, FLOPs / time beside the run's matmul FLOP rate, and
    HF transformers' TTFT from the same run."""
    print(f"\nprefill (full cache) against the matmul rate of this run, {matmul_flops_per_s / 1e9:.1f} GFLOP/s, "
          f"and HF transformers' TTFT:", file=file)
    hdr = (f"{'setting':<28} {'prefill_s':>9} {'ttft_s':>7} {'GFLOP/s':>8} {'%mm':>5} {'causal':>7} {'%mm':>5} "
           f"{'HF_ttft_s':>9} {'ttft/HF':>7}")
    print(hdr, file=file)
    for r in (r for r in results if r["method"] == "full"):
        hf = _find(peers, case=r["setting"], peer="hf_full")
        ratio = _find(rat, setting=r["setting"], method="full")
        hf_ttft = "-" if hf is None else f"{hf['ttft_s']:.3f}"
        vs_hf = "-" if ratio is None else f"{ratio['ttft_ratio']:.2f}x"
        print(f"{r['setting']:<28} {r['prefill_s']:9.3f} {r['ttft_s']:7.3f} {r['prefill_gflops_per_s']:8.1f} "
              f"{100 * r['prefill_fraction_of_matmul']:5.1f} {r['prefill_gflops_per_s_causal']:7.1f} "
              f"{100 * r['prefill_fraction_of_matmul_causal']:5.1f} {hf_ttft:>9} {vs_hf:>7}", file=file)
    print("GFLOP/s: the decoder's prefill matmul FLOPs (attention over the whole n x n; 'causal': its lower "
          "triangle) / prefill time; vision tower left out of the FLOPs, in the time.", file=file)


def build_parser() -> argparse.ArgumentParser:
    from vkv_jax.cli.common import HelpFormatter, at_least, description, int_list

    ap = argparse.ArgumentParser(prog="python -m vkv_jax.bench", description=description(__doc__),
                                 formatter_class=HelpFormatter)
    ap.add_argument("--config", default="cpu-156m",
                    help="model preset (random weights) by name, one of " + ", ".join(configs.available())
                         + ", or a path to a preset .json")
    ap.add_argument("--methods", default="full,snapkv,streamingllm,aircache,vlcache",
                    help="comma list; 'full' is always added (the baseline); available: " + ", ".join(available()))
    ap.add_argument("--budgets", default="0.1,0.25,0.5",
                    help="comma list of budgets, each a ratio in (0, 1] (of what each method's budget is a fraction "
                         "of: see python -m vkv_jax.generate --help) or an integer token count > 1")
    ap.add_argument("--batch", default="1,4", type=int_list(1), help="comma list of batch sizes (>= 1)")
    ap.add_argument("--visual-tokens", default=None, type=int_list(1),
                    help="comma list of visual tokens per prompt (multiples of the tower's per-image count; "
                         "default: the preset's)")
    ap.add_argument("--text-tokens", default=24, type=at_least(2), help="text tokens per prompt besides the image")
    ap.add_argument("--zip", action="store_true",
                    help="pair --batch and --visual-tokens element-wise (default: every combination)")
    ap.add_argument("--new-tokens", default=128, type=at_least(2),
                    help="tokens generated per row: one from prefill, the rest are timed decode steps")
    ap.add_argument("--dtype", default="float32", help="comma list of float32, bfloat16")
    ap.add_argument("--peers", action="store_true",
                    help="also run HF transformers + kvpress in their own venv (default: off)")
    ap.add_argument("--peer-venv", default=None,
                    help="where the peer venv lives, created once (default: $VKV_JAX_CACHE/peer-venv, else "
                         "~/.cache/vkv_jax/peer-venv)")
    ap.add_argument("--peer-budgets", default=None, help="kept fractions for the kvpress presses (default: --budgets)")
    ap.add_argument("--seed", default=0, type=int, help="seed of the random weights and inputs")
    ap.add_argument("--out", default="bench_out", help="folder for bench.json and the plots (created if missing)")
    ap.add_argument("--no-plots", action="store_true", help="skip the plots (default: draw them)")
    ap.add_argument("--replot", default=None, metavar="BENCH_JSON",
                    help="only redraw the table and plots of an existing bench.json, into its folder (default: "
                         "run the benchmark)")
    return ap


def parse_args(argv=None):
    """The command line, parsed; `check_args` does the checks that need more than argparse."""
    a = build_parser().parse_args(argv)
    a.command = "python -m vkv_jax.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    return a


def check_args(a) -> None:
    """Every check that needs no compile (ValueError / FileNotFoundError naming the flag); turns the comma
    lists of --methods, --budgets, --peer-budgets and --dtype into lists."""
    from vkv_jax.cli.common import check_input_file, check_out_dir, check_seed, parse_budgets, parse_names

    if a.replot:
        check_input_file(a.replot, "--replot", "a bench.json")
        return
    path = pathlib.Path(a.config)
    if a.config not in configs.available() and not (path.suffix == ".json" and path.is_file()):
        raise ValueError(f"--config {a.config!r} is neither a preset ({', '.join(configs.available())}) "
                         "nor a preset .json file")
    check_seed(a.seed)
    check_out_dir(a.out)
    a.methods = list(dict.fromkeys(["full"] + parse_names(a.methods, "--methods", available())))
    a.budgets = parse_budgets(a.budgets)
    a.peer_budgets = a.budgets if a.peer_budgets is None else parse_budgets(a.peer_budgets, "--peer-budgets")
    if not a.budgets and len(a.methods) > 1:
        raise ValueError("--budgets is empty; expected a comma list of budgets, e.g. 0.1,0.25")
    a.dtype = parse_names(a.dtype, "--dtype", list(DTYPES))


def grid(a, preset) -> tuple[list[Setting], list[Compression]]:
    """The settings (dtype x batch x visual tokens, or --zip pairs) and the cells (full, then every
    method x budget). Raises ValueError on a --zip length mismatch or a budget a method rejects."""
    visual = a.visual_tokens or [preset.visual_tokens]
    if a.zip:
        if len(a.batch) != len(visual):
            raise ValueError(f"--zip needs as many --batch as --visual-tokens values, got {a.batch} and {visual}")
        pairs = list(zip(a.batch, visual))
    else:
        pairs = [(b, v) for b in a.batch for v in visual]
    settings = [Setting(d, b, v, a.text_tokens) for d in a.dtype for b, v in pairs]
    cells = [Compression("full")]
    for m in a.methods:
        if m == "full":
            continue
        for b in a.budgets:
            try:
                cells.append(Compression(m, budget=b))
            except ValueError as e:
                raise ValueError(f"--methods {m} with --budgets {b}: {e}") from None
    return settings, cells


def main(argv=None) -> int:
    """`python -m vkv_jax.bench`: 0 when the run completes, 2 (one `error:` line) on a user error."""
    from vkv_jax.cli.common import run_cli

    return run_cli(_main, parse_args(argv))


def _main(a) -> int:
    run(a)
    return 0


def run(a) -> dict:
    """Run the benchmark of parsed arguments (`parse_args`); returns the bench.json document."""
    from tqdm import tqdm

    from vkv_jax.models import loading, qwen2_vl_loading

    check_args(a)
    if a.replot:
        return replot(pathlib.Path(a.replot))
    preset = configs.load_preset(a.config)
    cfg = preset.config
    random_params = (qwen2_vl_loading if family.is_qwen(cfg) else loading).random_params
    if a.peers and family.is_qwen(cfg):
        raise ValueError(f"--peers runs LLaVA presets only, not {preset.name} (a Qwen2-VL preset)")
    settings, cells = grid(a, preset)
    for s in settings:
        make_inputs(cfg, 1, s.visual_tokens, s.text_tokens)  # validates before anything compiles
        if s.prompt_tokens + a.new_tokens > cfg.text.max_position_embeddings:
            raise ValueError(f"{s.prompt_tokens} prompt + {a.new_tokens} new tokens exceed the preset's context "
                             f"{cfg.text.max_position_embeddings}")
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    started = time.time()
    bw = [bandwidth()]
    mm = [matmul_flop_rate()]

    results, floors, params_info = [], [], {}
    inputs = {}
    bar = tqdm(total=len(settings) * len(cells), desc="bench", unit="cell", file=sys.stderr)
    for dtype in a.dtype:
        params = random_params(cfg, a.seed, DTYPES[dtype])
        if jax.default_backend() == "cpu":  # the layout `vkv_jax.load` uses on CPU (llama.scan_layers)
            params["lm"]["layers"] = llama.unstack_layers(params["lm"]["layers"])
        pbytes = accounting.param_bytes(params)
        params_info[dtype] = {"count": accounting.count_params(params),
                               "count_lm": accounting.count_params(params["lm"]), **pbytes}
        for s in (s for s in settings if s.dtype == dtype):
            ids, pix = make_inputs(cfg, s.batch, s.visual_tokens, s.text_tokens, a.seed)
            inputs[s.name] = (ids, pix)
            cell_rows, floor = run_setting(params, cfg, s, cells, ids, pix, a.new_tokens, pbytes, bar)
            results += cell_rows
            floors.append(floor)
        if a.peers:
            peer_params = params
        del params
    bar.close()

    peer_rows, peer_info = [], None
    if a.peers:
        peer_rows, peer_info = run_peers(a, cfg, settings, inputs, peer_params, out)
    bw.append(bandwidth())
    mm.append(matmul_flop_rate())
    # the bound must not flatter us: the best read bandwidth and matmul rate seen in this run (start or end)
    read_gbps = max(b["read_gbps"] for b in bw)
    add_roofline(results, read_gbps)
    add_flop_rates(results, max(mm))
    ok = [r for r in results if "error" not in r]
    rat = ratios(ok, peer_rows)
    doc = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": a.command,
        "wall_s": time.time() - started,
        "machine": {**machine, "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "preset": {"name": preset.name, "description": preset.description, **preset.raw},
        "params": params_info,
        "bandwidth": {"read_gbps": read_gbps, "runs": bw},
        "matmul": {"gflops_per_s": max(mm) / 1e9, "runs_gflops_per_s": [x / 1e9 for x in mm],
                   "what": "best float32 [2048, 2048] x [2048, 2048] jitted matmul (matmul_flop_rate)"},
        "grid": {"settings": [dataclasses.asdict(s) | {"name": s.name} for s in settings],
                 "methods": a.methods, "budgets": a.budgets, "new_tokens": a.new_tokens},
        "results": results,
        "floors": floors,
        "peers": {"info": peer_info, "results": peer_rows},
        "ratios": rat,
        "targets": targets(ok, rat, [f for f in floors if "error" not in f]),
    }
    (out / "bench.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    print_table(ok, rat, peer_rows, floors)
    print_prefill_table(ok, rat, peer_rows, max(mm))
    for r in results:
        if "error" in r:
            print(f"ERROR {r['setting']} {r['method']}@{r['budget']}: {r['error'][:300]}")
    print("\ntargets:")
    for t in doc["targets"]:
        v = t["value"]
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        reach = "" if t.get("reachable") is None else f"; at the text-only floor: {t['reachable']:.3f}"
        print(f"  [{verdict:>6}] {t['target']} [{t['where']}]: {'-' if v is None else f'{v:.3f}'} "
              f"({t['threshold']}{reach})")
    if not a.no_plots and ok:
        doc["plots"] = plot(ok, peer_rows, out, f"{machine['device']} ({machine['cpu']}, {machine['cpu_count']} cores)"
                            if machine["backend"] == "cpu" else machine["device"], floors)
        (out / "bench.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    print(f"\nwrote {out / 'bench.json'}" + (f" and {', '.join(doc.get('plots', []))}" if doc.get("plots") else ""))
    return doc


def replot(path: pathlib.Path) -> dict:
    doc = json.loads(path.read_text())
    ok = [r for r in doc["results"] if "error" not in r]
    peers = doc["peers"]["results"]
    print_table(ok, doc["ratios"], peers, doc.get("floors", []))
    m = doc["machine"]
    doc["plots"] = plot(ok, peers, path.parent, f"{m['device']} ({m['cpu']}, {m['cpu_count']} cores)"
                        if m["backend"] == "cpu" else m["device"], doc.get("floors", []))
    path.write_text(json.dumps(doc, indent=1, default=_json_default))
    return doc


def run_peers(a, cfg, settings, inputs, params, out: pathlib.Path):
    """Save the checkpoint + inputs, make sure the peer venv exists, run the peer script once."""
    from vkv_jax.bench import peers as bench_peers
    from vkv_jax.models.saving import save_checkpoint

    python, kvpress_error = bench_peers.ensure_venv(a.peer_venv, log=lambda m: print(m, file=sys.stderr))
    info: dict[str, Any] = {"pins": list(bench_peers.PEER_PINS), "install_error": kvpress_error}
    if python is None:
        return [], info
    work = pathlib.Path(tempfile.mkdtemp(prefix="vkv_bench_peers_"))
    dtype = a.dtype[-1]
    save_checkpoint(work / "ckpt", jax.tree.map(np.asarray, params), cfg)
    cases = []
    for s in settings:
        if s.dtype != dtype:
            continue
        ids, pix = inputs[s.name]
        path = work / f"in_{len(cases)}.npz"
        np.savez(path, input_ids=ids, pixel_values=pix)
        peers = [{"name": "hf_full"}]
        for m, press in PEER_METHODS.items():
            if m in a.methods:
                peers += [{"name": f"kvpress_{press}", "press": press, "kept_fraction": b}
                          for b in a.peer_budgets if isinstance(b, float) and b < 1]
        cases.append({"name": s.name, "inputs": str(path), "new_tokens": a.new_tokens, "peers": peers})
    spec = {"checkpoint": str(work / "ckpt"), "dtype": dtype, "cases": cases}
    t = _now()
    res = bench_peers.run(python, spec, work)
    info.update({k: v for k, v in res.items() if k != "results"}, wall_s=_now() - t, dtype=dtype)
    rows = res.get("results", [])
    for r in rows:
        r.setdefault("kept_fraction", 1.0)
    return rows, info


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)

