"""Smoke test of `python -m vkv_jax.bench` on the tiny preset: it runs, and bench.json holds the documented
fields. No timed asserts (speed claims live in the benchmark's own output)."""

import json

import pytest

from vkv_jax import accounting, configs
from vkv_jax.bench import cells
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
                                      "1", "--visual-tokens", "160", "--new-tokens", "2", "--kv-dtype", "int8",
                                      "--out", str(tmp_path)]))
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
    # prefill FLOPs / time beside the matmul rate of the same run; the decoder FLOPs transcribed from the
    # preset's shapes: projections, SwiGLU MLP, attention over n x n (causal: minus its upper half)
    t = configs.load_preset("smoke").config.text
    n = rows[0]["prompt_tokens"]
    dense = t.num_layers * (2 * n * t.hidden_size * (2 * t.num_heads + 2 * t.num_kv_heads) * t.head_dim
                            + 6 * n * t.hidden_size * t.intermediate_size + 4 * n * n * t.num_heads * t.head_dim)
    causal = dense - t.num_layers * 2 * n * n * t.num_heads * t.head_dim
    matmul = on_disk["matmul"]["gflops_per_s"]
    assert matmul == max(on_disk["matmul"]["runs_gflops_per_s"]) > 0
    for r in rows:
        assert r["prefill_gflops"] == pytest.approx(dense / 1e9)
        assert r["prefill_gflops_causal"] == pytest.approx(causal / 1e9)
        assert r["prefill_gflops_per_s_causal"] == pytest.approx(causal / 1e9 / r["prefill_s"])
        assert r["prefill_fraction_of_matmul"] == pytest.approx(dense / 1e9 / r["prefill_s"] / matmul)
    full, snap = rows
    assert snap["kv_bytes_live"] < full["kv_bytes_live"] == full["kv_bytes_full"]
    assert snap["kv_bytes_allocated"] < full["kv_bytes_allocated"]
    # the floor: the same step over the 24 text tokens alone (no image), its KV exactly theirs
    (floor,) = on_disk["floors"]
    assert "error" not in floor, floor.get("error")
    assert floor["setting"] == full["setting"] and floor["prompt_tokens"] == 24
    assert floor["kv_bytes_live"] == 24 * t.num_layers * t.num_kv_heads * 2 * t.head_dim * 4
    assert floor["tpot_s"] > 0
    # every cell again with int8 pages, decoded interleaved: the same slots at 1 byte + a float32 scale each
    quant = on_disk["kv_dtypes"]
    assert [(r["method"], r["budget"], r["kv_dtype"]) for r in quant] == [("full", None, "int8"),
                                                                           ("snapkv", 0.25, "int8")]
    for r in quant:
        assert r["kv_live_ratio"] == pytest.approx((2 * t.head_dim + 8) / (8 * t.head_dim))
        assert r["tpot_s"] > 0 and r["tpot_ratio"] > 0


def test_tpot_ratio_targets_carry_the_floor_ratio():
    setting = "float32/b4/v2880/s2904"
    row = dict(setting=setting, visual_tokens=2880, budget=0.1, kv_visual_live_fraction=0.1,
               kv_bytes_allocated=2.0, kv_bytes_decode_segment=0.0, kv_bytes_live=2.0,
               scoring_compaction_share_of_prefill=0.01)
    results = [dict(row, method="full", budget=None, tpot_s=0.050,
                    roofline={"fraction_of_bound_dense": 0.4, "bound_s_dense": 0.020}),
               dict(row, method="snapkv", tpot_s=0.030)]
    hf = [{"setting": setting, "method": "full", "budget": None, "tokens_per_s_ratio": 1.6, "peer_tokens_per_s": 40.0}]
    out = bench.targets(results, hf, [{"setting": setting, "tpot_s": 0.025}])
    (snap,) = [t for t in out if t["target"].startswith("snapkv 10%: TPOT")]
    assert snap["value"] == pytest.approx(0.6) and snap["met"] is False and snap["reachable"] == pytest.approx(0.5)
    (bound,) = [t for t in out if "memory-read bound" in t["target"]]
    assert bound["value"] == 0.4 and bound["reachable"] == pytest.approx(0.020 / 0.025)
    (vs_hf,) = [t for t in out if "HF tokens/s" in t["target"]]
    assert vs_hf["value"] == 1.6 and vs_hf["reachable"] == pytest.approx(4 / 0.025 / 40.0)  # batch 4 at the floor
    (bare,) = [t for t in bench.targets(results, []) if t["target"].startswith("snapkv 10%: TPOT")]
    assert bare["reachable"] is None and bare["value"] == snap["value"]  # no floor measured: nothing claimed


def test_bench_rejects_visual_tokens_that_are_not_whole_images(tmp_path, capsys):
    with pytest.raises(ValueError, match="multiple"):
        bench.run(bench.parse_args(["--config", "smoke", "--visual-tokens", "20", "--out", str(tmp_path)]))
    assert bench.main(["--config", "smoke", "--visual-tokens", "20", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --visual-tokens 20 must be a positive multiple")


def test_qwen_presets_count_native_resolution_tokens():
    for name in ("qwen2-vl-7b", "qwen2.5-vl-7b"):
        p = configs.load_preset(name)
        assert p.visual_tokens == 256 and p.config.text.mrope_section == (16, 24, 24)  # 448x448: 16 x 16
    assert configs.load_preset("qwen2.5-vl-7b").config.vision.fullatt_blocks == (7, 15, 23, 31)


def test_bench_cell_on_a_tiny_qwen2_vl_preset(tmp_path):
    raw = json.loads((configs.HERE / "qwen2.5-vl-7b.json").read_text())
    raw["hf_config"]["text_config"].update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    raw["hf_config"]["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 3]
    raw["hf_config"]["vision_config"].update(depth=2, hidden_size=32, intermediate_size=48, num_heads=4,
                                             out_hidden_size=64, fullatt_block_indexes=[1])
    raw["hf_config"]["image_token_id"] = 500
    (tmp_path / "tiny.json").write_text(json.dumps(raw))
    from vkv_jax.methods import Compression
    from vkv_jax.models.qwen2_vl_loading import random_params

    cfg = configs.load_preset(str(tmp_path / "tiny.json")).config
    params = random_params(cfg)
    setting = bench.Setting("float32", 1, 24, 8)
    ids, pix = bench.make_inputs(cfg, 1, 24, 8)
    assert pix.grids == ((1, 8, 12),)  # 4 x 6 merged patches
    row = cells.run_cell(params, cfg, setting, Compression("snapkv", budget=0.25), ids, pix, 2,
                         accounting.param_bytes(params))
    assert "error" not in row and row["kv_bytes_live"] < row["kv_bytes_full"]


def test_decode_steps_are_timed_round_robin_over_the_cells():
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def advance(self, index):
            calls.append((index, self.name))

    cells.time_interleaved([Fake("full"), Fake("snapkv"), Fake("floor")], new_tokens=3)
    assert calls == [(1, "full"), (1, "snapkv"), (1, "floor"), (2, "full"), (2, "snapkv"), (2, "floor")]


def test_decode_trim_bench_reports_tpot_and_bounded_kv(tmp_path):
    from vkv_jax.bench import decode_trim

    out = tmp_path / "dt.json"
    assert decode_trim.main(["--config", "smoke", "--batch", "2", "--new-tokens", "60", "--budget", "16",
                             "--last", "20", "--block", "10", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    trim, none = doc["rows"]["trim"], doc["rows"]["none"]
    assert doc["decode_trim"] == {"budget": 16, "interval": 4, "window": 4} and doc["tpot_ratio_last"] > 0
    assert trim["allocated_bytes"] < none["allocated_bytes"]
    assert max(s["decode_len"] for s in trim["kv"]) <= 16 and none["kv"][-1]["decode_len"] == 59
    assert len({s["allocated_bytes"] for s in trim["kv"]}) == 1  # flat from the start: the ring never grows
