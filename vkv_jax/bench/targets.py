"""What the bench derives from its rows: roofline fractions, prefill FLOP rates, ratios against the full
cache and the peers, and the issue targets with the floor's reachable value beside each."""

from __future__ import annotations

PEER_METHODS = {"snapkv": "snapkv", "streamingllm": "streamingllm"}  # ours -> kvpress press


def add_flop_rates(results: list[dict], matmul_flops_per_s: float) -> None:
    """Prefill FLOPs / prefill time beside the matmul FLOP rate measured in the same run (its best)."""
    for r in results:
        if "error" in r:
            continue
        for kind, key in (("", "prefill_gflops"), ("_causal", "prefill_gflops_causal")):
            rate = r[key] * 1e9 / r["prefill_s"]
            r[f"prefill_gflops_per_s{kind}"] = rate / 1e9
            r[f"prefill_fraction_of_matmul{kind}"] = rate / matmul_flops_per_s


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

def find_row(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()) and "error" not in r:
            return r
    return None


def kv_dtype_rows(quantized: list[dict], results: list[dict]) -> list[dict]:
    """Each quantized cell against the same (setting, method, budget) stored in the weights' dtype, decoded
    interleaved with it: live / allocated KV bytes and TPOT, and their ratios (quantized / unquantized)."""
    out = []
    for q in quantized:
        if "error" in q:
            out.append(q)
            continue
        base = find_row(results, setting=q["setting"], method=q["method"], budget=q["budget"])
        row = {k: q[k] for k in ("setting", "method", "budget", "kv_dtype", "kv_bytes_live", "kv_bytes_allocated",
                                 "tpot_s", "tpot_p90_s", "decode_tokens_per_s")}
        if base is not None:
            row.update(kv_live_ratio=q["kv_bytes_live"] / base["kv_bytes_live"],
                       kv_allocated_ratio=q["kv_bytes_allocated"] / base["kv_bytes_allocated"],
                       tpot_ratio=q["tpot_s"] / base["tpot_s"], base_tpot_s=base["tpot_s"])
        out.append(row)
    return out


def ratios(results: list[dict], peers: list[dict]) -> list[dict]:
    """ours / peer decode tokens/s (and TTFT) for matching (setting, method, kept fraction)."""
    out = []
    for r in results:
        if r["method"] == "full":
            p = find_row(peers, case=r["setting"], peer="hf_full")
        elif r["method"] in PEER_METHODS and isinstance(r["budget"], float):
            p = find_row(peers, case=r["setting"], peer=f"kvpress_{PEER_METHODS[r['method']]}",
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
        f = find_row(floors, setting=setting)
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
            full = find_row(results, setting=r["setting"], method="full")
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
