"""The public API: `load`, `LlavaModel.prepare` (`vkv_jax.inputs`), `generate`, `LlavaModel.logits`
(`vkv_jax.model`).

Every error a user can cause is raised before anything is traced or compiled, as ValueError / TypeError /
FileNotFoundError naming the bad value (`vkv_jax.checks`, `vkv_jax.inputs`, the method's own checks).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vkv_jax import accounting, decode, kv_quant, paging, prefill, request
from vkv_jax.checks import check_request
from vkv_jax.compile_cache import compiled
from vkv_jax.decode_trim import DecodeTrim
from vkv_jax.generate_stats import GenerateStats
from vkv_jax.inputs import Inputs, bind_visual_layout, device_images, visual_per_row, visual_token_bound
from vkv_jax.methods import Compression, build, split_budget
from vkv_jax.model import LlavaModel, on_model_mesh
from vkv_jax.models import family, loading, sharding
from vkv_jax.models.tokenizer import Tokenizer
from vkv_jax.request import start_request
from vkv_jax.sampling import Sampling, check_sampling, check_seed, row_keys

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray  # [B, T] generated ids; after EOS, rows hold pad ids
    text: list[str]
    stats: GenerateStats  # reads like a dict: stats["kv_bytes"]
    # with generate(..., return_layout=True): the decode-start cache's slot layout on the host,
    # {"pos", "tag": [L, B, Hkv, C], "length": [L, B, Hkv]}: which prompt positions each layer kept
    layout: dict[str, np.ndarray] | None = None



def load(path: str | os.PathLike | None = None, dtype: str = "float32", *, mesh: Mesh | None = None,
         check_finite: bool = True) -> LlavaModel:
    """Load a local HF checkpoint directory (no network): `model_type` llava (LLaVA-1.5), llava_next (anyres
    tiling, CLIP tower; Vicuna / Mistral / Llama-3 LMs), llava_onevision (SigLIP tower, Qwen2 LM,
    anyres_max), or qwen2_vl / qwen2_5_vl (a `QwenVLModel`: native-resolution tower, M-RoPE). No path: the
    shipped default model.

    Every tensor is checked as it is read (shape against config.json, floating dtype, and with
    `check_finite` no nan / inf); errors name the tensor's checkpoint key.

    mesh: a ("data", "model") `jax.sharding.Mesh` (`vkv_jax.make_mesh`): every weight is read straight into
    its shards, tensor-parallel over `model` (`models.sharding`: heads, MLP features, vocabulary; an axis that
    does not divide `model` stays replicated, listed in `model.replicated`), and `generate` splits the
    batch's rows over `data`. Without it everything lives on the default device.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if mesh is not None:
        sharding.check_mesh(mesh)
    from vkv_jax import default_model

    path = default_model.resolve(path)
    _, cfg = loading.read_config(path)
    tokenizer = Tokenizer.from_dir(path)
    # on CPU, per-layer weight buffers decode ~3x faster than a scan over stacked ones (llama.scan_layers)
    per_layer = jax.default_backend() == "cpu"
    kwargs = dict(per_layer=per_layer, check_finite=check_finite, mesh=mesh)
    fam = family.of(cfg)
    processor = fam.processor_from_dir(path)
    params = fam.load_params(path, cfg, _DTYPES[dtype], **kwargs)
    return fam.model_class(params, cfg, tokenizer, processor, path, _DTYPES[dtype], mesh)



def _compression_seconds(params, cfg, method, ids, valid, pix, budget, prefill_s: float,
                         chunk: int | None = None) -> float:
    """Scoring + compaction time: the method's prefill minus a full-cache prefill of the same batch
    (chunked alike), timed side by side after a warm-up of each (the better of two for the method)."""
    ours = dict(params=params, input_ids=ids, valid=valid, pixel_values=pix, budget=budget)
    full = {**ours, "budget": None}
    prefill, _ = compiled(request.prefill_compact_jit, dict(cfg=cfg, method=method, chunk=chunk), **ours)
    baseline, _ = compiled(request.prefill_compact_jit, dict(cfg=cfg, method=build(Compression("full")), chunk=chunk),
                           **full)
    jax.block_until_ready(baseline(**full))  # warm
    start = time.perf_counter()
    jax.block_until_ready(prefill(**ours))
    prefill_s = min(prefill_s, time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(baseline(**full))
    return max(prefill_s - (time.perf_counter() - start), 0.0)


@on_model_mesh
def generate(model: LlavaModel, inputs: Inputs, max_new_tokens: int = 32,
             compression: Compression | None = None, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | Sequence[int] = 0, stream: bool = False,
             measure_overhead: bool = False, return_layout: bool = False, kv_pool: str = "fitted",
             prefill_chunk: int | None = None, kv_dtype: str | None = None,
             decode_trim: DecodeTrim | None = None) -> GenerateOutput:
    """Prefill (+ compression), then decode `max_new_tokens` with a `lax.while_loop` (or a streaming loop).

    Compiles a bounded set of executables however many requests a process serves: the sampling settings
    (temperature, top_k, top_p) are traced values; the prefill's executable does not depend on
    `max_new_tokens` (the decode executable adds the decode slots to the cache); the decode loop is
    compiled per power-of-two bucket of `max_new_tokens` (`paging.decode_bucket`, at least 16) and runs
    exactly `max_new_tokens - 1` steps. Executables live in `vkv_jax.compile_cache` (an LRU).

    kv_pool: "fitted" (default) sizes the prompt's page pool from the slots the method kept (<= ~1.13x
    the live bytes; its size keys the small paging and the decode executables, so a process serving many
    budgets or prompt lengths compiles one of each per pool size, 16 sizes an octave); "static" bounds it
    from the method's total budget in the prefill's executable (compiles per prompt and budget bucket
    only; for a traced VL-Cache / AirCache budget the bound is the whole prompt). See `request.prefill_request`.

    prefill_chunk: prefill the prompt that many slots at a time (None: at once), every layer of a chunk
    attending to the earlier chunks' K/V: activation memory follows the chunk, not the prompt, and the
    logits, scores and keep-sets are the one-shot prefill's up to float rounding (`prefill.chunked_prompt`).
    Every method but the in-prefill reductions (FastV, LightKV: ValueError) runs chunked.

    kv_dtype: store the kept prompt slots and the decode segment as "int8" or "float8_e4m3fn", one float32
    scale per slot per kv head (`vkv_jax.kv_quant`), None (default): in the model's dtype. Every method
    scores and compacts in full precision; only what is paged is quantized. The KV byte stats count the scales.

    decode_trim: decode-phase compression (`vkv_jax.DecodeTrim(budget, interval, window)`): the decode
    segment holds at most `budget` slots per (layer, row, kv head) however long the answer, its
    least-attended slots evicted every `interval` steps once full, the newest `window` always kept
    (`vkv_jax.decode_trim`). None (default): every generated token stays.

    The returned stats hold prompt/visual token counts, KV bytes before and after compression, kept
    tokens per layer (text / vision), decoder prefill FLOPs (from the shapes; in-prefill methods such as
    LightKV and FastV save some), and prefill / decode timings with compile time apart.
    seed: an int (every row samples from that seed) or one seed per row. Row b's tokens are drawn from its
    own seed only (`sampling.row_keys`), so a row samples the same tokens alone or in any batch; give
    identical rows different seeds for independent draws.
    `measure_overhead=True` also times a full-cache prefill of the same batch, side by side, and
    reports the difference as the time spent in scoring + compaction (`compression_s`).
    """
    if isinstance(compression, str):
        raise TypeError(f"compression must be a vkv_jax.Compression, got the string {compression!r}: "
                        f"use compression=vkv_jax.Compression({compression!r}, budget=...)")
    if compression is not None and not isinstance(compression, Compression):
        raise TypeError(f"compression must be a vkv_jax.Compression or None, got {type(compression).__name__}")
    compression = compression or Compression("full")
    method = bind_visual_layout(build(compression), model.config, inputs)
    # a traced budget where the method allows it: `method` then keys only the budget's kind / bucket
    method, budget = split_budget(method, inputs.input_ids.shape[1])
    check_sampling(temperature, top_k, top_p)  # ValueError on a bad setting
    sampling = Sampling(temperature, top_k, top_p)
    check_seed(seed, inputs.batch_size)
    paging.check_kv_pool(kv_pool)
    kv_quant.check_platform(kv_dtype)
    if decode_trim is not None and not isinstance(decode_trim, DecodeTrim):
        raise TypeError(f"decode_trim must be a vkv_jax.DecodeTrim or None, got {type(decode_trim).__name__}")
    check_request(model, inputs, max_new_tokens)
    cfg = model.config
    vocab = cfg.text.vocab_size
    if top_k > vocab:
        warnings.warn(f"top_k={top_k} exceeds the vocabulary ({vocab} tokens): keeping every token "
                      f"(as top_k=0)", stacklevel=2)
    eos = tuple(sorted(model.tokenizer.eos_ids))
    pad = int(model.tokenizer.pad_id)
    ids, valid, pix = sharding.shard_rows((jnp.asarray(inputs.input_ids), jnp.asarray(inputs.valid),
                                  device_images(inputs.pixel_values, model.dtype)), model.mesh)
    key = row_keys(seed, inputs.batch_size)  # [B]: each row samples from its own key
    traced = sampling.as_arrays()

    num_visual = visual_token_bound(cfg, inputs, method)  # the fewest of any row when rows differ
    images = inputs.pixel_values is not None
    lengths = accounting.layer_lengths(method, cfg, ids.shape[1], num_visual, images)  # checks the schedule
    prefill.check_prefill_chunk(method, cfg, prefill_chunk, num_visual, images)
    flops = accounting.prefill_flops(cfg, lengths, inputs.batch_size)
    flops_full = accounting.prefill_flops(cfg, (ids.shape[1],) * cfg.text.num_layers, inputs.batch_size)

    started = start_request(model.params, cfg, method, ids, valid, pix, budget=budget, key=key, sampling=traced,
                            eos_ids=eos, max_new_tokens=max_new_tokens, kv_pool=kv_pool, prefill_chunk=prefill_chunk,
                            grow=stream, kv_dtype=kv_dtype, trim=decode_trim)
    done_prefill, state, capacity = started.prefilled, started.state, started.decode_slots
    cache = done_prefill.cache  # the decode-start cache, before any decode slot
    prefill_s, prefill_compile = done_prefill.seconds, done_prefill.compile_seconds
    compression_s = None
    if measure_overhead and compression.name != "full" and flops == flops_full:  # (in-prefill methods save time)
        compression_s = _compression_seconds(model.params, cfg, method, ids, valid, pix, budget, prefill_s,
                                             prefill_chunk)
    kv_allocated = cache.allocated_bytes(capacity)  # what decoding holds: the pool + the grown decode segment
    kv_live = float(cache.live_bytes())
    layout = None
    if return_layout:  # the decode-start cache in the dense view (prompt slots, then empty decode slots)
        dense = paging.grow_jit(cache, capacity).dense()
        layout = {"pos": np.asarray(dense.pos), "tag": np.asarray(dense.tag), "length": np.asarray(dense.length)}

    start = time.perf_counter()
    if stream:  # the step compiled first, so decode_s times decoding only
        step_exe, decode_compile = compiled(decode.step_jit, dict(cfg=cfg, eos_ids=eos, pad_id=pad),
                                            params=model.params, state=state, index=jnp.int32(1), key=key,
                                            sampling=traced)
        start = time.perf_counter()
        steps = list(decode.stream_decode(model.params, cfg, state, key, max_new_tokens, traced, eos, pad, step_exe))
        tokens = np.full((inputs.batch_size, max_new_tokens), pad, np.int32)
        tokens[:, :len(steps)] = np.stack([np.asarray(s) for s in steps], axis=1)
    else:
        bucket = paging.decode_bucket(max_new_tokens)
        static = dict(cfg=cfg, bucket=bucket, capacity=capacity, eos_ids=eos, pad_id=pad)
        decode_args = dict(params=model.params, state=state, key=key, sampling=traced,
                           num_tokens=jnp.int32(max_new_tokens))
        run, decode_compile = compiled(decode.bucket_decode_jit, static, **decode_args)
        start = time.perf_counter()
        out, _ = run(**decode_args)
        tokens = np.asarray(jax.block_until_ready(out))[:, :max_new_tokens]
    decode_s = time.perf_counter() - start

    kept = np.asarray(paging.kept_by_modality_jit(cache))
    stats = GenerateStats(
        method=compression.name,
        budget=compression.budget,
        prompt_tokens=list(inputs.prompt_lengths),
        visual_tokens=visual_per_row(cfg, inputs),
        kv_bytes_full=done_prefill.full_kv_bytes,
        kv_bytes=kv_live,
        kv_bytes_allocated=kv_allocated,
        kv_bytes_decode_segment=float(cache.decode_segment_bytes(capacity)),
        kv_bytes_per_layer=np.asarray(cache.live_bytes_per_layer()).tolist(),
        kv_bytes_allocated_per_layer=np.asarray(cache.allocated_bytes_per_layer(capacity)).tolist(),
        kv_page_size=cache.page_size,
        kv_pages=cache.num_pages,
        kv_dtype=cache.kv_dtype,
        kv_slot_bytes=cache.slot_bytes,
        decode_budget=None if decode_trim is None else decode_trim.budget,
        kept_text_per_layer=kept[:, 0].tolist(),
        kept_vision_per_layer=kept[:, 1].tolist(),
        prefill_flops=flops,
        prefill_flops_full=flops_full,
        prefill_flops_saved=1.0 - flops / flops_full,
        prefill_s=prefill_s,
        prefill_compile_s=prefill_compile,
        compression_s=compression_s,
        decode_s=decode_s,
        decode_compile_s=decode_compile,
        decode_tokens_per_s=inputs.batch_size * max(max_new_tokens - 1, 1) / max(decode_s, 1e-9),
        new_tokens=max_new_tokens,
    )
    return GenerateOutput(tokens=tokens, text=[model.tokenizer.decode_generated(row, eos) for row in tokens],
                          stats=stats, layout=layout)
