"""A long-lived process compiles a bounded set of executables, and its memory stays flat.

Sampling settings and (for most methods) budgets are traced, the prefill does not depend on the answer
length, decode lengths are bucketed by powers of two, and the AOT cache is an LRU. A long-lived server
uses `kv_pool="static"` (the pool inside the prefill's executable); the fitted pool's compiles are tested
in tests/test_generate.py.
"""

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vkv_jax
from vkv_jax import budgets, compile_cache, decode, request
from vkv_jax.methods import Compression, build, split_budget
from vkv_jax.sampling import Sampling
from vkv_jax.testbed import synthetic

# ---- many requests in a fresh process: compiles and RSS ----

# 40 requests (it was 100), answer lengths spread over 1..100 and budgets over (0, 1): every decode bucket
# (16..128, asserted) and every count bucket that a hundred requests reach, the same compiles, fewer runs
CALLS = 40
MAX_LENGTH = 100
SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import vkv_jax
    from vkv_jax import compile_cache, decode, paging
    from vkv_jax.testbed import synthetic

    def rss_mib():  # the process's own resident set, from the kernel
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    method, calls, max_length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model = vkv_jax.load()
    ex = synthetic.make_example(0, "test", synthetic.ShapesConfig(image_size=model.config.vision.image_size))
    inputs = model.prepare([ex.image], [ex.question])
    rng = np.random.default_rng(0)
    lengths = rng.permutation(np.linspace(1, max_length, calls).round().astype(int))  # 1..max_length
    ratios = rng.permutation((np.arange(calls) + 0.5) / calls)    # budgets spread over (0, 1)
    temperatures = rng.permutation(np.linspace(0.0, 2.0, calls))  # 0 (greedy) .. 2
    top_ps = rng.permutation(np.linspace(0.05, 1.0, calls))
    rss, pools, decodes = {}, set(), set()
    for i in list(range(calls)) * 2:  # the second pass repeats the first: no compile, no memory growth
        out = vkv_jax.generate(model, inputs, int(lengths[i]), vkv_jax.Compression(method, budget=float(ratios[i])),
                               temperature=float(temperatures[i]), top_p=float(top_ps[i]), seed=i,
                               kv_pool="static")
        assert out.tokens.shape == (1, lengths[i])
        if i + 1 == calls:
            rss.setdefault("first_pass", rss_mib())
            rss["second_pass"] = rss_mib()
            rss.setdefault("compiles_first_pass", compile_cache.stats()["compiles"])
        pools.add((out.stats["kv_page_size"], out.stats["kv_pages"]))
        decodes.add((out.stats["kv_page_size"], out.stats["kv_pages"], paging.decode_bucket(int(lengths[i]))))
    print(json.dumps({"stats": compile_cache.stats(), "first_token_traces": decode.first_tokens_jit._cache_size(),
                      "prompt_len": int(inputs.input_ids.shape[1]), "rss": rss, "pools": sorted(pools),
                      "decodes": len(decodes), "buckets": sorted({d[2] for d in decodes})}))
""")


def prefill_keys(prompt_len: int, num_visual: int, method: str) -> int:
    """The prefill executables 100 budgets over (0, 1) can compile: one per static method (with a traced
    budget, its kind and, for count methods, its capacity bucket)."""
    keys = {split_budget(build(Compression(method, budget=i / 1001)), prompt_len)[0] for i in range(1, 1001)}
    return len(keys)


@pytest.mark.parametrize("method", ["snapkv", "vlcache"])
def test_many_requests_compile_a_bounded_set_and_memory_stays_flat(method):
    env = dict(os.environ, VKV_JAX_COMPILE_CACHE_SIZE="32")
    res = subprocess.run([sys.executable, "-c", SCRIPT, method, str(CALLS), str(MAX_LENGTH)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    model_cfg = vkv_jax.load().config
    S = out["prompt_len"]
    prefills = prefill_keys(S, model_cfg.num_image_tokens, method)
    pools = {tuple(p) for p in out["pools"]}
    # kv_pool="static": the pool is part of the prefill's executable, so one prefill per static key and one
    # decode per (pool, length bucket); on a 128-slot prompt snapkv has 4 keys (count buckets 16..128) and
    # vlcache 1: at most 4 + 4 x 4 = 20 and 1 + 4 = 5
    assert prefills == len(pools) == {"snapkv": 4, "vlcache": 1}[method]
    assert out["buckets"] == [16, 32, 64, 128]  # every decode bucket of 1..100 new tokens was served
    bound = prefills + out["decodes"]
    assert bound <= {"snapkv": 20, "vlcache": 5}[method]
    print(f"\n{method}: {CALLS} calls twice, compiles {out['stats']['compiles']} (bound {bound}), hits "
          f"{out['stats']['hits']}, evictions {out['stats']['evictions']}, first-token traces "
          f"{out['first_token_traces']}, RSS after the first pass {out['rss']['first_pass']:.0f} MiB, after the "
          f"second {out['rss']['second_pass']:.0f} MiB")
    assert out["stats"]["compiles"] == out["rss"]["compiles_first_pass"] <= bound  # the second pass hits only
    assert out["stats"]["compiles"] + out["stats"]["hits"] == 4 * CALLS  # one prefill + one decode per call
    assert out["first_token_traces"] == 1
    assert out["rss"]["second_pass"] - out["rss"]["first_pass"] < 50  # serving without compiling leaks nothing


# ---- the LRU ----

def test_the_lru_evicts_the_least_recently_used_and_counts():
    fn = jax.jit(lambda x: x * 2)
    old = compile_cache.capacity()
    compile_cache.clear()
    compile_cache.reset_stats()
    try:
        compile_cache.set_capacity(2)
        a = jnp.ones(1)
        b, c = jnp.ones(2), jnp.ones(3)
        compile_cache.compiled(fn, {}, x=a)
        compile_cache.compiled(fn, {}, x=b)
        compile_cache.compiled(fn, {}, x=a)  # a is now the most recent
        compile_cache.compiled(fn, {}, x=c)  # evicts b
        assert compile_cache.stats() == {"compiles": 3, "hits": 1, "evictions": 1, "size": 2, "capacity": 2,
                                         "compiles_by_function": {"<lambda>": 3}}
        _, seconds = compile_cache.compiled(fn, {}, x=a)
        assert seconds == 0.0
        _, seconds = compile_cache.compiled(fn, {}, x=b)  # compiled again
        assert seconds > 0 and compile_cache.stats()["compiles"] == 4
        compile_cache.set_capacity(1)
        assert compile_cache.stats()["size"] == 1
    finally:
        compile_cache.set_capacity(old)


def test_an_evicted_executable_is_freed():
    fn = jax.jit(lambda x: x + 1)
    old = compile_cache.capacity()
    try:
        compile_cache.set_capacity(1)
        exe, _ = compile_cache.compiled(fn, {}, x=jnp.ones(5))
        if not hasattr(exe, "_executable"):
            pytest.skip("this JAX's Compiled does not expose its executable")
        inner = weakref.ref(exe._executable)  # the backend executable, which JAX's caches could also hold
        del exe
        compile_cache.compiled(fn, {}, x=jnp.ones(6))  # evicts the first
        gc.collect()
        assert inner() is None
        kept, _ = compile_cache.compiled(fn, {}, x=jnp.ones(6))
        np.testing.assert_array_equal(np.asarray(kept(x=jnp.ones(6))), 2.0)  # the survivor still runs
    finally:
        compile_cache.set_capacity(old)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_bad_cache_capacity(bad):
    with pytest.raises(ValueError, match="capacity"):
        compile_cache.set_capacity(bad)


def test_the_cache_size_comes_from_the_environment():
    code = "from vkv_jax import compile_cache; print(compile_cache.capacity())"
    run = lambda value: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                       env=dict(os.environ, VKV_JAX_COMPILE_CACHE_SIZE=value), timeout=120)
    assert run("7").stdout.strip() == "7"
    assert run("").stdout.strip() == str(compile_cache.DEFAULT_CAPACITY)
    bad = run("zero")
    assert bad.returncode != 0 and "VKV_JAX_COMPILE_CACHE_SIZE" in bad.stderr


# ---- traced budgets give what static budgets give ----

@pytest.fixture(scope="module")
def shipped():
    model = vkv_jax.load()
    cfg = synthetic.ShapesConfig(image_size=model.config.vision.image_size)
    exs = [synthetic.make_example(i, "test", cfg) for i in (0, 1)]
    return model, model.prepare([e.image for e in exs], [e.question for e in exs])


def static_budget_run(model, inputs, compression, max_new_tokens):
    """The static-budget path: the method's exact budget in the jit key, today's cache sizes."""
    eos, pad = tuple(sorted(model.tokenizer.eos_ids)), int(model.tokenizer.pad_id)
    args = [jnp.asarray(a) for a in (inputs.input_ids, inputs.valid, inputs.pixel_values)]
    logits, cache, nxt, stats = request.prefill_jit(model.params, model.config, build(compression), *args,
                                                   max_new_tokens)
    key = jax.random.key(0)
    greedy = Sampling()
    first, done = decode.first_tokens_jit(logits, key, greedy, eos)
    layout = np.asarray(cache.pos), np.asarray(cache.length)
    state = decode.DecodeState(cache=cache, tokens=first, positions=nxt, done=done)
    tokens, _ = decode.scan_decode_jit(model.params, model.config, state, key, max_new_tokens, greedy, eos, pad)
    return np.asarray(tokens), layout, np.asarray(stats.kept_per_layer)


def kept_positions(pos, length):
    """Per (layer, row, kv head): the original positions of the live slots, in slot order."""
    L, B, H = length.shape
    return [[[tuple(int(p) for p in pos[l, b, h, :length[l, b, h]] if p >= 0) for h in range(H)]
             for b in range(B)] for l in range(L)]


CASES = [("snapkv", dict(window=8)), ("pyramidkv", dict(window=8)), ("h2o", {}), ("streamingllm", {}),
         ("random", {}), ("vlcache", {}), ("aircache", {}), ("adakv", {})]


@pytest.mark.parametrize("name,options", CASES)
def test_traced_budgets_keep_and_generate_what_static_budgets_do(shapes_model, shapes_pair, name, options):
    """On the suite's shared tiny LLaVA (2 LM layers: half the shipped model's compile time)."""
    model, (_, inputs) = shapes_model, shapes_pair
    for budget in (0.05, 0.6, 9):
        compression = Compression(name, budget=budget, **options)
        static, value = split_budget(build(compression), inputs.input_ids.shape[1])
        assert value is not None and isinstance(static.budget, budgets.TracedBudget)
        assert value.dtype == (jnp.float32 if isinstance(budget, float) else jnp.int32)
        want_tokens, (pos, length), want_kept = static_budget_run(model, inputs, compression, 6)
        out = vkv_jax.generate(model, inputs, 6, compression, return_layout=True)
        assert kept_positions(out.layout["pos"], out.layout["length"]) == kept_positions(pos, length), budget
        np.testing.assert_array_equal(out.tokens, want_tokens)
        np.testing.assert_array_equal(np.asarray(out.stats["kept_vision_per_layer"]), want_kept[:, 1])


def test_budgets_in_one_bucket_share_one_prefill(shipped):
    model, inputs = shipped
    S = inputs.input_ids.shape[1]
    compile_cache.clear()
    compile_cache.reset_stats()

    def prefills():
        return compile_cache.stats()["compiles_by_function"].get("prefill_compact", 0)

    vkv_jax.generate(model, inputs, 2, Compression("snapkv", budget=0.3))  # warm: bucket 64 of S = 128
    for budget in (0.26, 0.35, 0.49):
        assert budgets.count_bucket(budgets.static_count(budget, S), S) == 64
        vkv_jax.generate(model, inputs, 2, Compression("snapkv", budget=budget))
    assert prefills() == 1
    for budget in (40, 60):  # counts: the kind is static, so one more prefill for both
        assert budgets.count_bucket(budgets.static_count(budget, S), S) == 64
        vkv_jax.generate(model, inputs, 2, Compression("snapkv", budget=budget))
    assert prefills() == 2
    for budget in (0.01, 0.3, 0.9):
        vkv_jax.generate(model, inputs, 2, Compression("vlcache", budget=budget))
    assert prefills() == 3  # vlcache's one prefill (its capacity is the prompt, whatever the budget)


@pytest.mark.parametrize("name,budget", [("csp", 0.3), ("fastv", 0.5), ("full", None)])
def test_methods_whose_shapes_need_the_budget_keep_it_static(name, budget):
    method = build(Compression(name, budget=budget))
    assert split_budget(method, 128) == (method, None)


def test_count_buckets():
    assert [budgets.count_bucket(c, 128) for c in (1, 16, 17, 33, 64, 65, 128, 500)] == [16, 16, 32, 64, 64, 128,
                                                                                          128, 128]
    assert budgets.count_bucket(5, 10) == 10
