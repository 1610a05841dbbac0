"""Smoke test of `python -m vkv_jax.bench` on the tiny preset: it runs, and bench.json holds the documented
fields. No timed asserts (speed claims live in the benchmark's own output)."""

import json

import pytest

from vkv_jax import configs
from vkv_jax.bench import latency as bench


def test_presets_load_with_their_visual_token_counts():
    assert {"llava-1.5-7b", "llava-next-7b-mistral", "cpu-156m", "smoke"} <= set(configs.available())
    assert configs.load_preset("llava-1.5-7b").visual_tokens == 576
    nxt = configs.load_preset("llava-next-7b-mistral")
    assert nxt.visual_tokens == 2928 and nxt.config.text.num_kv_heads == 8  # 672x672: 576 + 48 x 49 (anyres)
    ov = configs.load_preset("llava-onevision-7b")
    assert ov.visual_tokens == 3699 and ov.config.vision.num_patches == 729  # 768x768: 729 + 54 x 55
    cpu = configs.load_preset("cpu-156m").config.text
    assert (cpu.num_layers, cpu.hidden_size, cpu.num_heads, cpu.num_kv_heads) == (8, 1024, 16, 4)
    with pytest.raises(FileNotFoundError, match="available"):
        configs.load_preset("no-such-preset")


def test_bench_tiny_writes_documented_json(tmp_path, recwarn):
    # 10 images x 16 tokens + 24 text: the full cache (256 slots) and SnapKV's (128) differ in allocation
    doc = bench.run(bench.parse_args(["--config", "smoke", "--methods", "snapkv", "--budgets", "0.25", "--batch",
                                      "1", "--visual-tokens", "160", "--new-tokens", "2", "--out", str(tmp_path)]))
    assert {"decode_latency.png", "kv_bytes.png"} == set(doc["plots"])
    assert not [str(w.message) for w in recwarn if "matplotlib" in w.filename or issubclass(w.category, UserWarning)]
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert on_disk["schema"] == bench.SCHEMA == doc["schema"]
    for key in ("machine", "preset", "params", "bandwidth", "grid", "results", "peers", "ratios", "targets"):
        assert key in on_disk
    assert on_disk["bandwidth"]["read_gbps"] > 0
    rows = on_disk["results"]
    assert [(r["method"], r["budget"]) for r in rows] == [("full", None), ("snapkv", 0.25)]
    for r in rows:
        assert "error" not in r, r.get("error")
        for key in ("prefill_s", "ttft_s", "prefill_compile_s", "tpot_s", "tpot_p90_s", "decode_compile_s",
                    "decode_tokens_per_s", "kv_bytes_full", "kv_bytes_live", "kv_bytes_allocated",
                    "kv_visual_bytes_full", "kv_visual_bytes_live", "scoring_compaction_s",
                    "scoring_compaction_share_of_prefill", "peak_device_bytes", "roofline"):
            assert key in r
        assert r["decode_steps"] == 1
        assert set(r["roofline"]) >= {"bound_s_live", "bound_s_dense", "fraction_of_bound_dense"}
    full, snap = rows
    assert snap["kv_bytes_live"] < full["kv_bytes_live"] == full["kv_bytes_full"]
    assert snap["kv_bytes_allocated"] < full["kv_bytes_allocated"]


def test_bench_rejects_visual_tokens_that_are_not_whole_images(tmp_path, capsys):
    with pytest.raises(ValueError, match="multiple"):
        bench.run(bench.parse_args(["--config", "smoke", "--visual-tokens", "20", "--out", str(tmp_path)]))
    assert bench.main(["--config", "smoke", "--visual-tokens", "20", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --visual-tokens 20 must be a positive multiple")
