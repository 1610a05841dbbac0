"""`python -m vkv_jax.bench_prefill`: prefill time, FLOPs and KV bytes of in-prefill token reduction.

Full model vs LightKV vs FastV (default options) on a tiny random LLaVA (the testbed architecture with a
192-pixel image of 8-pixel patches = 576 visual tokens, as LLaVA-1.5). `--layers 32` (default) gives the
LM the depth of LLaVA-1.5-7B so the published schedules apply unchanged (LightKV 12,18,24 / 4,2,1;
FastV K=2, R=50%). Random weights: numbers are about cost, not answers. `bench(...)` returns the rows.

`--attention` instead compares the prefill attention implementations (`models/attention.py`: dense S x S
logits vs blocked online softmax) on a preset (default `cpu-156m`, 2880 visual + 24 text tokens;
`--batch 4` for the issue-15 setting): the whole model prefill (vision tower, LM, last-position logits)
of each implementation in a fresh subprocess, reporting its time, its FLOPs / time beside a float32
matmul FLOP rate measured in the same run, and the peak resident host memory of the prefill runs (VmHWM,
reset through /proc/self/clear_refs once compiled, beside the resident memory at that point: weights,
inputs, runtime). `--impls dense,blocked,chunked --chunk 512` adds the chunked prefill
(`llama.prefill_layers_chunked`): peak memory one-shot against chunked. `attention_bench(...)` returns the rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax import accounting, request
from vkv_jax.methods import Compression, available, build
from vkv_jax.models.loading import random_params
from vkv_jax.testbed.tiny import tiny_config

VOCAB, IMAGE_TOKEN = 512, 511


def bench(methods=("full", "lightkv", "fastv"), layers: int = 32, batch: int = 1, text_tokens: int = 64,
          repeats: int = 5, max_new_tokens: int = 16, dtype: str = "float32") -> list[dict]:
    """Median (and min) prefill wall time, compile and a warm-up run excluded, and cache/FLOP accounting."""
    cfg = tiny_config(VOCAB, IMAGE_TOKEN, image_size=192, patch_size=8)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=layers))
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    params = random_params(cfg, seed=0, dtype=dt)
    n = cfg.num_image_tokens
    rng = np.random.default_rng(0)
    before = 16
    row = np.concatenate([[1], rng.integers(2, IMAGE_TOKEN, before - 1), [IMAGE_TOKEN] * n,
                          rng.integers(2, IMAGE_TOKEN, text_tokens)]).astype(np.int32)
    ids = jnp.asarray(np.tile(row, (batch, 1)))
    valid = jnp.ones(ids.shape, bool)
    pix = jnp.asarray(rng.normal(size=(batch, 3, 192, 192)), dt)
    S = ids.shape[1]
    full_flops = accounting.prefill_flops(cfg, (S,) * layers, batch)
    runs = {}
    for name in methods:
        method = build(Compression(name))
        runs[name] = (method, request.prefill_jit.lower(params, cfg, method, ids, valid, pix, max_new_tokens).compile())
    times = {name: [] for name in methods}
    for _ in range(repeats + 1):  # round-robin, so that every method sees the same machine load
        for name, (_, run) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run(params, ids, valid, pix))
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, (method, run) in runs.items():
        _, cache, _, stats = run(params, ids, valid, pix)
        vision = np.asarray(stats.kept_per_layer)[:, 1]
        flops = accounting.prefill_flops(cfg, accounting.layer_lengths(method, cfg, S, n), batch)
        rows.append({
            "method": name, "layers": layers, "batch": batch, "prompt_tokens": S, "visual_tokens": n,
            "prefill_ms": 1e3 * statistics.median(times[name][1:]), "prefill_ms_min": 1e3 * min(times[name][1:]),
            "prefill_gflops": flops / 1e9, "prefill_flops_saved": 1 - flops / full_flops,
            "kv_bytes_live": float(cache.live_bytes()), "kv_bytes_full": float(stats.full_kv_bytes),
            "kv_bytes_allocated": cache.allocated_bytes(),
            "vision_kept_avg": float(vision.mean() / n),
            "vision_per_layer": sorted(set(int(v) for v in vision), reverse=True),
        })
    return rows


def _peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def attention_worker(impl: str, config: str, batch: int, visual_tokens: int, text_tokens: int,
                     layers: int | None, repeats: int, chunk: int = 512, layout: str = "stacked") -> dict:
    """One implementation's full prefill (vision tower + LM + last logits), timed in this process.
    impl: 'dense' / 'blocked' (the one-shot prefill's attention) or 'chunked' (`llama.prefill_layers_chunked`,
    `chunk` slots at a time, its attention as `auto` picks it). layout: the LM layer weights 'stacked'
    (one `lax.scan` over layers) or 'per-layer' (separate buffers, the loop unrolled: what `vkv_jax.load`
    keeps on CPU for decoding, and so what `generate` and `python -m vkv_jax.bench` prefill with)."""
    from vkv_jax import configs
    from vkv_jax.bench.setting import make_inputs
    from vkv_jax.inputs import device_images
    from vkv_jax.models import family, llama

    cfg = configs.load_preset(config).config
    if layers is not None:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=layers))
    params = family.of(cfg).random_params(cfg, 0, jnp.float32)
    if layout == "per-layer":
        params["lm"]["layers"] = llama.unstack_layers(params["lm"]["layers"])
    ids, pix = make_inputs(cfg, batch, visual_tokens, text_tokens)
    ids, pix = jnp.asarray(ids), device_images(pix, jnp.float32)
    valid = jnp.ones(ids.shape, bool)

    @jax.jit
    def prefill(params, ids, valid, pix):
        x, _, positions = family.prompt_embeddings(params, cfg, ids, valid, pix)
        if impl == "chunked":
            hidden, k, v, _, _ = llama.prefill_layers_chunked(params["lm"], cfg.text, x, positions, valid, chunk)
        else:
            hidden, k, v, _ = llama.prefill_layers(params["lm"], cfg.text, x, positions, valid, attn_impl=impl)
        return llama.unembed(params["lm"], hidden[:, -1]), k, v

    start = time.perf_counter()
    compiled = prefill.lower(params, ids, valid, pix).compile()
    compile_s = time.perf_counter() - start
    # Peak memory from here (compiled, nothing run): freed buffers stay mapped by the allocator, so a
    # reset after the warm-up would hide the prefill's temporaries.
    rss_before = _status_kib("VmRSS")
    reset = _peak_rss_reset()
    jax.block_until_ready(compiled(params, ids, valid, pix))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, ids, valid, pix))
        times.append(time.perf_counter() - start)
    n, t = ids.shape[1], cfg.text
    flops = accounting.prefill_flop_counts(cfg, (n,) * t.num_layers, batch)
    return {"impl": impl, "chunk": chunk if impl == "chunked" else None, "layout": layout, "config": config,
            "layers": t.num_layers,
            "batch": batch, "prompt_tokens": n,
            "prefill_s": statistics.median(times), "prefill_s_min": min(times), "compile_s": compile_s,
            "lm_gflops_dense": flops["dense"] / 1e9, "lm_gflops_causal": flops["causal"] / 1e9,
            "peak_rss_mib": _status_kib("VmHWM") / 1024 if reset else None,
            "rss_before_mib": rss_before / 1024,
            "peak_rss_since_start_mib": None if reset else _status_kib("VmHWM") / 1024}


def attention_bench(impls=("dense", "blocked"), config: str = "cpu-156m", batch: int = 4,
                    visual_tokens: int = 2880, text_tokens: int = 24, layers: int | None = None,
                    repeats: int = 2, chunk: int = 512, layouts=("stacked",), rounds: int = 1) -> list[dict]:
    """Each (implementation, weight layout)'s prefill in a fresh subprocess (clean peak memory), the
    whole list `rounds` times in turn (round-robin A/B on a shared machine), the matmul FLOP rate in this
    one, before and after; rows carry round, time, FLOP/s (dense-equivalent and causal LM FLOPs, i.e. the
    attention's n x n or its lower triangle) and their ratio to the matmul rate."""
    from vkv_jax.bench.latency import matmul_flop_rate

    rate = [matmul_flop_rate()]
    rows = []
    for round_ in range(rounds):
        for impl in impls:
            for layout in layouts:
                job = json.dumps([impl, config, batch, visual_tokens, text_tokens, layers, repeats, chunk, layout])
                code = ("import json, sys; from vkv_jax.bench.prefill import attention_worker; "
                        "print(json.dumps(attention_worker(*json.loads(sys.argv[1]))))")
                out = subprocess.run([sys.executable, "-c", code, job], check=True, capture_output=True, text=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]) | {"round": round_})
    rate.append(matmul_flop_rate())
    best = max(rate)
    for r in rows:
        r["matmul_gflops_per_s"] = best / 1e9
        r["load_average"] = os.getloadavg()[0]
        for kind in ("dense", "causal"):
            r[f"gflops_per_s_{kind}"] = r[f"lm_gflops_{kind}"] / r["prefill_s"]
            r[f"fraction_of_matmul_{kind}"] = r[f"gflops_per_s_{kind}"] * 1e9 / best
    return rows


def build_parser() -> argparse.ArgumentParser:
    from vkv_jax.cli.common import ArgumentParser, HelpFormatter, at_least, description

    p = ArgumentParser(prog="python -m vkv_jax.bench_prefill", description=description(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("--methods", nargs="+", default=["full,lightkv,fastv"], metavar="METHODS",
                   help="comma list of methods, each with its default options (space-separated names are "
                        "accepted too); available: " + ", ".join(available()) + " (default: full,lightkv,fastv)")
    p.add_argument("--layers", type=at_least(1), default=None,
                   help="LM depth (default: 32 = LLaVA-1.5-7B's; with --attention: the preset's)")
    p.add_argument("--batch", type=at_least(1), default=1, help="prompts per batch")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed runs per method (after one warm-up)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list (default: a table)")
    p.add_argument("--attention", action="store_true",
                   help="compare prefill attention implementations instead (dense vs blocked; see above)")
    p.add_argument("--impls", default="dense,blocked",
                   help="with --attention: comma list of dense, blocked (one-shot prefill) and chunked (--chunk "
                        "slots at a time) (default: dense,blocked)")
    p.add_argument("--layouts", default="stacked",
                   help="with --attention: comma list of LM weight layouts, stacked (lax.scan over layers) and "
                        "per-layer (separate buffers, what vkv_jax.load keeps on CPU) (default: stacked)")
    p.add_argument("--rounds", type=at_least(1), default=1,
                   help="with --attention: run the impl x layout list this many times in turn (default: 1)")
    p.add_argument("--chunk", type=at_least(1), default=512,
                   help="with --attention and the chunked impl: prefill chunk in slots (default: 512)")
    p.add_argument("--config", default="cpu-156m",
                   help="with --attention: model preset, random weights (default: cpu-156m)")
    p.add_argument("--visual-tokens", type=at_least(1), default=2880,
                   help="with --attention: visual tokens per prompt, a multiple of the tower's per image "
                        "(default: 2880)")
    p.add_argument("--text-tokens", type=at_least(2), default=24,
                   help="with --attention: text tokens per prompt (default: 24)")
    return p


def main(argv=None) -> int:
    from vkv_jax.cli.common import run_cli

    return run_cli(_main, build_parser().parse_args(argv))


def _main(args) -> int:
    from vkv_jax.cli.common import parse_names

    if args.attention:
        return _print_attention(args)
    methods = parse_names(",".join(args.methods), "--methods", available())
    rows = bench(methods, 32 if args.layers is None else args.layers, args.batch, repeats=args.repeats,
                 dtype=args.dtype)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"device {jax.devices()[0].platform}, {rows[0]['layers']} layers, batch {rows[0]['batch']}, "
          f"{rows[0]['prompt_tokens']} prompt tokens ({rows[0]['visual_tokens']} visual)")
    print(f"{'method':8} {'prefill ms':>10} {'min ms':>7} {'GFLOP':>7} {'saved':>6} {'KV live KiB':>11} {'of full':>7} "
          f"{'vision kept':>11}  visual tokens per stage")
    for r in rows:
        print(f"{r['method']:8} {r['prefill_ms']:10.1f} {r['prefill_ms_min']:7.1f} {r['prefill_gflops']:7.2f} "
              f"{r['prefill_flops_saved']:6.1%} "
              f"{r['kv_bytes_live'] / 1024:11.0f} {r['kv_bytes_live'] / r['kv_bytes_full']:7.1%} "
              f"{r['vision_kept_avg']:11.1%}  {r['vision_per_layer']}")
    return 0



def _print_attention(args) -> int:
    from vkv_jax.cli.common import parse_names

    impls = parse_names(args.impls, "--impls", ["dense", "blocked", "chunked"])
    layouts = parse_names(args.layouts, "--layouts", ["stacked", "per-layer"])
    rows = attention_bench(impls, args.config, args.batch, args.visual_tokens, args.text_tokens, args.layers,
                           args.repeats, args.chunk, layouts, args.rounds)
    if args.json:
        print(json.dumps(rows))
        return 0
    r0 = rows[0]
    print(f"device {jax.devices()[0].platform}, {r0['config']}, {r0['layers']} layers, batch {r0['batch']}, "
          f"{r0['prompt_tokens']} prompt tokens; matmul {r0['matmul_gflops_per_s']:.1f} GFLOP/s; "
          f"load average {r0['load_average']:.2f}")
    print(f"{'round':5} {'attention':9} {'layout':9} {'prefill s':>9} {'min s':>7} {'GFLOP/s':>8} {'of matmul':>9} "
          f"{'causal':>7} {'peak RSS MiB':>12} {'RSS before':>10} {'added':>7}")
    for r in rows:
        peak = r["peak_rss_mib"] if r["peak_rss_mib"] is not None else float("nan")
        name = r["impl"] if r.get("chunk") is None else f"chunk{r['chunk']}"
        print(f"{r['round']:5} {name:9} {r['layout']:9} {r['prefill_s']:9.2f} {r['prefill_s_min']:7.2f} "
              f"{r['gflops_per_s_dense']:8.1f} "
              f"{r['fraction_of_matmul_dense']:9.1%} {r['fraction_of_matmul_causal']:7.1%} {peak:12.0f} "
              f"{r['rss_before_mib']:10.0f} {peak - r['rss_before_mib']:7.0f}")
    print("GFLOP/s and 'of matmul': the LM's matmul FLOPs with the attention's full n x n (as the dense path "
          "computes); 'causal': with its lower triangle only (the work a causal prefill needs).")
    return 0
