"""`python -m vkv_jax.bench_prefill --attention` on the smoke preset: one subprocess per implementation,
rows with time, FLOP rates against the matmul rate, and peak host memory."""

from vkv_jax.bench import prefill


def test_attention_bench_rows_on_smoke_preset():
    rows = prefill.attention_bench(("dense", "blocked", "chunked"), config="smoke", batch=2, visual_tokens=32,
                                   text_tokens=8, repeats=1, chunk=16)
    assert [(r["impl"], r["chunk"]) for r in rows] == [("dense", None), ("blocked", None), ("chunked", 16)]
    for r in rows:
        assert r["prompt_tokens"] == 40 and r["layers"] == 2 and r["batch"] == 2
        assert r["prefill_s"] > 0 and r["matmul_gflops_per_s"] > 0
        assert r["lm_gflops_causal"] < r["lm_gflops_dense"]
        assert abs(r["fraction_of_matmul_dense"] - r["gflops_per_s_dense"] / r["matmul_gflops_per_s"]) < 1e-9
        assert r["peak_rss_mib"] is None or r["peak_rss_mib"] >= r["rss_before_mib"] > 0
