"""The bench's printed tables and plots."""

from __future__ import annotations

import pathlib
import sys

from vkv_jax.bench.targets import find_row

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


def print_kv_dtype_table(rows: list[dict], file=sys.stdout) -> None:
    """The quantized cells (`targets.kv_dtype_rows`): bytes and TPOT against the same cell unquantized."""
    hdr = (f"\n{'setting':<28} {'method':<13} {'budget':>6} {'kv_dtype':<14} {'kv_live_MB':>10} {'x live':>7} "
           f"{'kv_alloc_MB':>11} {'tpot_ms':>8} {'x tpot':>7}")
    print(hdr, file=file)
    print("-" * len(hdr.strip()), file=file)
    for r in rows:
        if "error" in r:
            continue
        live, tpot = (f"{r[key]:.3f}" if key in r else "-" for key in ("kv_live_ratio", "tpot_ratio"))
        print(f"{r['setting']:<28} {r['method']:<13} {str(r['budget']):>6} {r['kv_dtype']:<14} "
              f"{r['kv_bytes_live'] / 1e6:10.3f} {live:>7} {r['kv_bytes_allocated'] / 1e6:11.3f} "
              f"{1e3 * r['tpot_s']:8.2f} {tpot:>7}", file=file)


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
            full = find_row(rows, method="full")
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
                floor = find_row([f for f in floors if "error" not in f], setting=s)
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
        hf = find_row(peers, case=r["setting"], peer="hf_full")
        ratio = find_row(rat, setting=r["setting"], method="full")
        hf_ttft = "-" if hf is None else f"{hf['ttft_s']:.3f}"
        vs_hf = "-" if ratio is None else f"{ratio['ttft_ratio']:.2f}x"
        print(f"{r['setting']:<28} {r['prefill_s']:9.3f} {r['ttft_s']:7.3f} {r['prefill_gflops_per_s']:8.1f} "
              f"{100 * r['prefill_fraction_of_matmul']:5.1f} {r['prefill_gflops_per_s_causal']:7.1f} "
              f"{100 * r['prefill_fraction_of_matmul_causal']:5.1f} {hf_ttft:>9} {vs_hf:>7}", file=file)
    print("GFLOP/s: the decoder's prefill matmul FLOPs (attention over the whole n x n; 'causal': its lower "
          "triangle) / prefill time; vision tower left out of the FLOPs, in the time.", file=file)
