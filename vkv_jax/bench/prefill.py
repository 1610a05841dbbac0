"""`python -m vkv_jax.bench_prefill`: prefill time, FLOPs and KV bytes of in-prefill token reduction.

Full model vs LightKV vs FastV (default options) on a tiny random LLaVA (the testbed architecture with a
192-pixel image of 8-pixel patches = 576 visual tokens, as LLaVA-1.5). `--layers 32` (default) gives the
LM the depth of LLaVA-1.5-7B so the published schedules apply unchanged (LightKV 12,18,24 / 4,2,1;
FastV K=2, R=50%). Random weights: numbers are about cost, not answers. `bench(...)` returns the rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax import decode
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
    full_flops = decode.prefill_flops(cfg, (S,) * layers, batch)
    runs = {}
    for name in methods:
        method = build(Compression(name))
        runs[name] = (method, decode.prefill_jit.lower(params, cfg, method, ids, valid, pix, max_new_tokens).compile())
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
        flops = decode.prefill_flops(cfg, decode.layer_lengths(method, cfg, S, n), batch)
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


def build_parser() -> argparse.ArgumentParser:
    from vkv_jax.cli.common import HelpFormatter, at_least, description

    p = argparse.ArgumentParser(prog="python -m vkv_jax.bench_prefill", description=description(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("--methods", nargs="+", default=["full,lightkv,fastv"], metavar="METHODS",
                   help="comma list of methods, each with its default options (space-separated names are "
                        "accepted too); available: " + ", ".join(available()) + " (default: full,lightkv,fastv)")
    p.add_argument("--layers", type=at_least(1), default=32, help="LM depth (32 = LLaVA-1.5-7B's)")
    p.add_argument("--batch", type=at_least(1), default=1, help="prompts per batch")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed runs per method (after one warm-up)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list (default: a table)")
    return p


def main(argv=None) -> int:
    from vkv_jax.cli.common import run_cli

    return run_cli(_main, build_parser().parse_args(argv))


def _main(args) -> int:
    from vkv_jax.cli.common import parse_names

    methods = parse_names(",".join(args.methods), "--methods", available())
    rows = bench(methods, args.layers, args.batch, repeats=args.repeats, dtype=args.dtype)
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

