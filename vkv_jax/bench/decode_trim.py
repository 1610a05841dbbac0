"""`python -m vkv_jax.bench.decode_trim`: decode-phase compression on a long answer, measured.

Two requests on the same prompts, one with `DecodeTrim(budget, interval, window)` and one without, decode
`--new-tokens` tokens step by step (`decode.step_jit`), interleaved in blocks of `--block` steps so both
see the same machine. Reported: the time per output token (TPOT) of the last `--last` steps of each and
their ratio, the compile time apart, and the KV bytes (live and allocated, prompt pages + decode segment)
every `--block` steps. Prints a table and writes JSON (`--out`). Random weights of a preset (`configs`),
greedy decoding; the tokens are not compared (a trim changes what a random model says).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def build_parser() -> argparse.ArgumentParser:
    from vkv_jax.cli.common import ArgumentParser, HelpFormatter, at_least

    p = ArgumentParser(prog="python -m vkv_jax.bench.decode_trim", description=__doc__,
                       formatter_class=HelpFormatter)
    p.add_argument("--config", default="cpu-156m", help="model preset (configs/) or a preset .json")
    p.add_argument("--batch", type=at_least(1), default=4, help="rows")
    p.add_argument("--text-tokens", type=at_least(2), default=24, help="text tokens per prompt (plus the visual ones)")
    p.add_argument("--new-tokens", type=at_least(2), default=2048, help="tokens generated per row")
    p.add_argument("--budget", type=at_least(2), default=128, help="DecodeTrim budget (decode slots)")
    p.add_argument("--interval", type=at_least(0), default=0, help="DecodeTrim interval (0: its default)")
    p.add_argument("--window", type=at_least(0), default=0, help="DecodeTrim window (0: its default)")
    p.add_argument("--method", default="full", help="prompt compression (a registered method)")
    p.add_argument("--prompt-budget", type=float, default=None, help="its budget")
    p.add_argument("--block", type=at_least(1), default=64, help="steps per interleaved block")
    p.add_argument("--last", type=at_least(1), default=256, help="TPOT over the last this many steps")
    p.add_argument("--out", default="vkv_jax_out/decode_trim.json", help="JSON file written")
    return p


def main(argv=None) -> int:
    from vkv_jax.cli.common import run_cli

    return run_cli(_main, build_parser().parse_args(argv))


def _main(a) -> int:
    from tqdm.auto import tqdm

    import vkv_jax
    from vkv_jax import configs, decode, request
    from vkv_jax.methods import build, split_budget
    from vkv_jax.models import family, llama
    from vkv_jax.sampling import Sampling, row_keys

    if a.last > a.new_tokens - 1:
        raise ValueError(f"--last {a.last} must be below --new-tokens {a.new_tokens}")
    trim = vkv_jax.DecodeTrim(a.budget, a.interval, a.window)
    preset = configs.load_preset(a.config)
    cfg = preset.config
    fam = family.of(cfg)
    params = fam.random_params(cfg, 0, jnp.float32)
    if jax.default_backend() == "cpu":  # the layout `vkv_jax.load` uses on CPU (llama.scan_layers)
        params["lm"]["layers"] = llama.unstack_layers(params["lm"]["layers"])
    ids, pix = fam.synthetic_inputs(cfg, a.batch, preset.visual_tokens, a.text_tokens)
    options = {} if a.prompt_budget is None else {"budget": a.prompt_budget}
    method, budget = split_budget(build(vkv_jax.Compression(a.method, **options)), ids.shape[1])
    sampling, key = Sampling().as_arrays(), row_keys(0, a.batch)
    states, compile_s = {}, {}
    for name, t in (("trim", trim), ("none", None)):
        started = request.start_request(params, cfg, method, jnp.asarray(ids), jnp.ones(ids.shape, bool),
                                        jnp.asarray(pix) if not hasattr(pix, "pixel_values") else pix,
                                        budget=budget, key=key, sampling=sampling, eos_ids=(),
                                        max_new_tokens=a.new_tokens, grow=True, trim=t)
        start = time.perf_counter()
        step = decode.step_jit.lower(params, cfg, started.state, jnp.int32(1), key, sampling, (), 0).compile()
        compile_s[name] = time.perf_counter() - start
        states[name] = [started.state, step, [], []]  # state, executable, step seconds, KV samples
    from vkv_jax.bench.probes import bandwidth

    load, read_gbps = os.getloadavg(), [bandwidth()["read_gbps"]]  # the machine's drift, start and end
    bar = tqdm(total=2 * (a.new_tokens - 1), desc="decode", unit="step", file=sys.stderr)
    for first in range(1, a.new_tokens, a.block):
        for name in ("trim", "none"):  # interleaved block by block
            entry = states[name]
            state, step, seconds, samples = entry
            for index in range(first, min(first + a.block, a.new_tokens)):
                t0 = time.perf_counter()
                state = step(params, state, jnp.int32(index), key, sampling)
                jax.block_until_ready(state.tokens)
                seconds.append(time.perf_counter() - t0)
                bar.update(1)
            c = state.cache
            samples.append({"step": index, "decode_len": int(c.decode_len), "live_bytes": float(c.live_bytes()),
                            "allocated_bytes": c.allocated_bytes()})
            entry[0] = state
    bar.close()
    read_gbps.append(bandwidth()["read_gbps"])
    rows = {}
    for name, (_, _, seconds, samples) in states.items():
        last = np.asarray(seconds[-a.last:])
        rows[name] = {"tpot_last_ms": 1e3 * float(last.mean()), "tpot_last_median_ms": 1e3 * float(np.median(last)),
                      "tpot_all_ms": 1e3 * float(np.mean(seconds)), "compile_s": compile_s[name],
                      "allocated_bytes": samples[-1]["allocated_bytes"], "live_bytes_end": samples[-1]["live_bytes"],
                      "kv": samples}
    doc = {"command": "python -m vkv_jax.bench.decode_trim " + " ".join(sys.argv[1:]),
           "config": a.config, "batch": a.batch, "prompt_tokens": int(ids.shape[1]), "new_tokens": a.new_tokens,
           "method": a.method, "prompt_budget": a.prompt_budget,
           "decode_trim": {"budget": trim.budget, "interval": trim.interval, "window": trim.window},
           "last": a.last, "block": a.block, "load_average_start": load, "load_average_end": os.getloadavg(),
           "read_gbps_start_end": read_gbps,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "backend": jax.default_backend(),
                       "jax": jax.__version__},
           "rows": rows, "tpot_ratio_last": rows["trim"]["tpot_last_ms"] / rows["none"]["tpot_last_ms"]}
    print(f"{a.config}, b{a.batch}, prompt {ids.shape[1]} tokens ({a.method}), {a.new_tokens} new tokens; "
          f"load {load[0]:.2f} -> {os.getloadavg()[0]:.2f}; read bandwidth {read_gbps[0]:.1f} -> "
          f"{read_gbps[1]:.1f} GB/s")
    print(f"| decode | TPOT last {a.last} steps (mean / median) | TPOT all | KV allocated | KV live at the end | "
          "compile |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        label = f"DecodeTrim({trim.budget}, {trim.interval}, {trim.window})" if name == "trim" else "every token kept"
        print(f"| {label} | {r['tpot_last_ms']:.2f} / {r['tpot_last_median_ms']:.2f} ms | {r['tpot_all_ms']:.2f} ms | "
              f"{r['allocated_bytes'] / 2**20:.1f} MiB | {r['live_bytes_end'] / 2**20:.1f} MiB | "
              f"{r['compile_s']:.1f} s |")
    print(f"TPOT ratio (trim / none), last {a.last} steps: {doc['tpot_ratio_last']:.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
