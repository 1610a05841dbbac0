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
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from vkv_jax import accounting, configs, kv_quant
from vkv_jax.bench.cells import run_setting
from vkv_jax.bench.probes import bandwidth, machine_info, matmul_flop_rate, now
from vkv_jax.bench.report import plot, print_kv_dtype_table, print_prefill_table, print_table
from vkv_jax.bench.setting import DTYPES, Setting, make_inputs
from vkv_jax.bench.targets import PEER_METHODS, add_flop_rates, add_roofline, kv_dtype_rows, ratios, targets
from vkv_jax.methods import Compression, available
from vkv_jax.models import family, llama

SCHEMA = "vkv_jax.bench/1"
PEER_FAMILIES = ("llava",)  # `models.family` names whose random checkpoints the peers can load


# ---------------------------------------------------------------- driver

def build_parser() -> argparse.ArgumentParser:
    from vkv_jax.cli.common import ArgumentParser, HelpFormatter, at_least, description, int_list

    ap = ArgumentParser(prog="python -m vkv_jax.bench", description=description(__doc__),
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
    ap.add_argument("--kv-dtype", default="", metavar="LIST",
                    help="comma list of quantized KV storages (int8, float8_e4m3fn) to run every cell in as well, "
                         "decoded interleaved with the cells in the weights' dtype and reported in their own table "
                         "(default: none)")
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
    a.kv_dtype = parse_names(a.kv_dtype, "--kv-dtype", kv_quant.QUANTIZED) if a.kv_dtype else []
    for kv_dtype in a.kv_dtype:
        kv_quant.check_platform(kv_dtype)


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

    check_args(a)
    if a.replot:
        return replot(pathlib.Path(a.replot))
    preset = configs.load_preset(a.config)
    cfg = preset.config
    fam = family.of(cfg)
    if a.peers and fam.name not in PEER_FAMILIES:
        raise ValueError(f"--peers runs presets of the {', '.join(PEER_FAMILIES)} family only (their checkpoints "
                         f"are written for HF by models.saving), not {preset.name} (a {fam.name} preset)")
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

    results, floors, params_info, quantized = [], [], {}, []
    inputs = {}
    bar = tqdm(total=len(settings) * len(cells) * (1 + len(a.kv_dtype)), desc="bench", unit="cell", file=sys.stderr)
    for dtype in a.dtype:
        params = fam.random_params(cfg, a.seed, DTYPES[dtype])
        if jax.default_backend() == "cpu":  # the layout `vkv_jax.load` uses on CPU (llama.scan_layers)
            params["lm"]["layers"] = llama.unstack_layers(params["lm"]["layers"])
        pbytes = accounting.param_bytes(params)
        params_info[dtype] = {"count": accounting.count_params(params),
                               "count_lm": accounting.count_params(params["lm"]), **pbytes}
        for s in (s for s in settings if s.dtype == dtype):
            ids, pix = make_inputs(cfg, s.batch, s.visual_tokens, s.text_tokens, a.seed)
            inputs[s.name] = (ids, pix)
            cell_rows, floor = run_setting(params, cfg, s, cells, ids, pix, a.new_tokens, pbytes, bar,
                                           kv_dtypes=(None, *a.kv_dtype))
            results += [r for r in cell_rows if r.get("kv_dtype") is None]
            quantized += [r for r in cell_rows if r.get("kv_dtype") is not None]
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
        "kv_dtypes": kv_dtype_rows(quantized, ok),
        "floors": floors,
        "peers": {"info": peer_info, "results": peer_rows},
        "ratios": rat,
        "targets": targets(ok, rat, [f for f in floors if "error" not in f]),
    }
    (out / "bench.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    print_table(ok, rat, peer_rows, floors)
    print_prefill_table(ok, rat, peer_rows, max(mm))
    if doc["kv_dtypes"]:
        print_kv_dtype_table(doc["kv_dtypes"])
    for r in results + quantized:
        if "error" in r:
            print(f"ERROR {r['setting']} {r['method']}@{r['budget']}{'/' + r['kv_dtype'] if r.get('kv_dtype') else ''}:"
                  f" {r['error'][:300]}")
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
    t = now()
    res = bench_peers.run(python, spec, work)
    info.update({k: v for k, v in res.items() if k != "results"}, wall_s=now() - t, dtype=dtype)
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
