"""How much each KV storage format moves the answer: `python -m vkv_jax.bench.quant_error`.

On a model (default: the shipped one) and testbed questions, each prompt but its last `--fed` tokens is
prefilled with the full cache; its keys and values are rounded through a storage format (quantized and read
back); the last tokens are then fed through decode over that cache, and the logits that predict the answer
are compared with the unrounded cache's: KL(float || format), top-1 agreement, the largest logit change,
and the relative error of the keys and values. Formats: int8 and float8_e4m3fn with one scale per (token,
kv head) (`vkv_jax.kv_quant`, what `kv_dtype` stores), and float8_e4m3fn / int8 with one scale per layer
and tensor (a per-tensor alternative). Only the prompt's slots are rounded, so the formats compare alike.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int8/token", "float8_e4m3fn/token", "int8/tensor", "float8_e4m3fn/tensor")


def round_trip(x: jax.Array, fmt: str) -> jax.Array:
    """x [L, B, Hkv, C, D] through storage format `fmt` ("DTYPE/token" or "DTYPE/tensor") and back, float32."""
    from vkv_jax import kv_quant

    dtype, per = fmt.split("/")
    if per == "token":
        return kv_quant.dequantize(*kv_quant.quantize(x, dtype))
    qmax = 127.0 if dtype == "int8" else 448.0
    scale = jnp.abs(x).max(axis=(1, 2, 3, 4), keepdims=True) / qmax  # one scale per layer
    y = x / jnp.where(scale > 0, scale, 1.0)
    y = jnp.clip(jnp.round(y), -qmax, qmax) if dtype == "int8" else y
    return y.astype(kv_quant.storage_dtype(dtype)).astype(jnp.float32) * scale


def measure(model, examples, fed: int, batch_size: int) -> dict[str, dict[str, float]]:
    from vkv_jax import decode, paging, request
    from vkv_jax.inputs import device_images
    from vkv_jax.methods import Compression, build
    from vkv_jax.models import family

    cfg, full = model.config, build(Compression("full"))
    feed = jax.jit(decode.feed, static_argnums=1)
    sums = {f: {"kl": [], "top1": [], "max_logit_change": [], "k_rel_err": [], "v_rel_err": []} for f in FORMATS}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        inputs = model.prepare([e.image for e in chunk], [e.question for e in chunk])
        ids, valid = jnp.asarray(inputs.input_ids), jnp.asarray(inputs.valid)
        S = ids.shape[1]
        pix = family.prompt_prefix(device_images(inputs.pixel_values, model.dtype), S - fed)
        _, kept, pos, _ = request.prefill_compact_jit(model.params, cfg, full, ids[:, :S - fed], valid[:, :S - fed],
                                                      pix)
        pool = paging.fitted_pool(np.asarray(kept.length))

        def answer_logits(dense, pool=pool, tokens=ids[:, S - fed:], pos=pos):
            cache = paging.grow(paging.page_prompt_jit(dense, pool=pool), paging.decode_capacity(fed))
            return feed(model.params, cfg, cache, tokens, pos)[0]

        ref = answer_logits(kept)
        live = np.asarray(kept.live_mask())
        for f in FORMATS:
            k, v = round_trip(kept.k, f), round_trip(kept.v, f)
            got = answer_logits(kept.replace(k=k, v=v))
            p = jax.nn.log_softmax(ref)
            kl = (jnp.exp(p) * (p - jax.nn.log_softmax(got))).sum(-1)
            s = sums[f]
            s["kl"] += np.asarray(kl).tolist()
            s["top1"] += np.asarray(ref.argmax(-1) == got.argmax(-1)).tolist()
            s["max_logit_change"].append(float(jnp.abs(ref - got).max()))
            for name, a, b in (("k_rel_err", k, kept.k), ("v_rel_err", v, kept.v)):
                a, b = np.asarray(a)[live], np.asarray(b)[live]
                s[name].append(float(np.linalg.norm(a - b) / np.linalg.norm(b)))
    return {f: {"kl_mean": float(np.mean(s["kl"])), "kl_max": float(np.max(s["kl"])),
                "top1_agreement": float(np.mean(s["top1"])), "max_logit_change": float(np.max(s["max_logit_change"])),
                "k_rel_err": float(np.mean(s["k_rel_err"])), "v_rel_err": float(np.mean(s["v_rel_err"]))}
            for f, s in sums.items()}


def main(argv=None) -> int:
    from vkv_jax.cli.common import at_least, model_help

    ap = argparse.ArgumentParser(prog="python -m vkv_jax.bench.quant_error", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help=model_help())
    ap.add_argument("--n", type=at_least(1), default=64, help="testbed test questions")
    ap.add_argument("--fed", type=at_least(1), default=4, help="last prompt tokens fed through decode")
    ap.add_argument("--batch-size", type=at_least(1), default=16)
    ap.add_argument("--out", default="benchmarks/cpu/kv_quant_error.json")
    a = ap.parse_args(argv)
    import vkv_jax
    from vkv_jax.evaluation import data as eval_data
    from vkv_jax.evaluation.harness import shapes_config

    model = vkv_jax.load(a.model)
    examples = eval_data.shapes("test", a.n, shapes_config(model))
    result = measure(model, examples, a.fed, a.batch_size)
    print(f"{'format':<22} {'KL mean':>9} {'KL max':>9} {'top-1':>6} {'max dlogit':>10} {'K rel err':>9} "
          f"{'V rel err':>9}")
    for f, r in result.items():
        print(f"{f:<22} {r['kl_mean']:9.2e} {r['kl_max']:9.2e} {r['top1_agreement']:6.3f} "
              f"{r['max_logit_change']:10.4f} {r['k_rel_err']:9.2e} {r['v_rel_err']:9.2e}")
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": "python -m vkv_jax.bench.quant_error " + " ".join(argv if argv is not None else sys.argv[1:]),
           "model": a.model or "default", "questions": a.n, "fed": a.fed,
           "loadavg": os.getloadavg(), "formats": result}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
