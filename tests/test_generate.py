"""Generation engine and public API: loops agree, buckets do not recompile, bad input fails early."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from hf_fixtures import make_llava
from PIL import Image

import vkv_jax
from vkv_jax import decode, paging, request
from vkv_jax.methods import Compression

IMAGE = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_llava(path, num_heads=4, num_kv_heads=2, head_scale=30.0)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return vkv_jax.load(model_dir)


def test_prepare_left_pads_to_a_bucket_and_expands_the_image(model):
    inputs = model.prepare([IMAGE, IMAGE], ["what colour is the circle?", "is there a red square?"])
    n = model.config.num_image_tokens
    assert inputs.input_ids.shape[1] % 64 == 0
    assert ((inputs.input_ids == model.config.image_token_id).sum(1) == n).all()
    for row, valid, length in zip(inputs.input_ids, inputs.valid, inputs.prompt_lengths):
        assert valid.sum() == length and valid[-length:].all()  # left padding
        assert (row[~valid] == model.tokenizer.pad_id).all()
    assert inputs.pixel_values.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=20, top_p=0.9)])
def test_scan_and_streaming_loops_give_identical_tokens(model, sampling):
    inputs = model.prepare([IMAGE, IMAGE], ["what colour is the circle?", "how many red objects are there?"])
    scan = vkv_jax.generate(model, inputs, 12, seed=3, **sampling)
    stream = vkv_jax.generate(model, inputs, 12, seed=3, stream=True, **sampling)
    np.testing.assert_array_equal(scan.tokens, stream.tokens)
    assert scan.text == stream.text


def test_sampling_is_seeded(model):
    inputs = model.prepare([IMAGE], ["what colour is the circle?"])
    a = vkv_jax.generate(model, inputs, 12, temperature=1.0, seed=0).tokens
    b = vkv_jax.generate(model, inputs, 12, temperature=1.0, seed=0).tokens
    c = vkv_jax.generate(model, inputs, 12, temperature=1.0, seed=1).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_finished_rows_stop_changing(model):
    inputs = model.prepare([IMAGE], ["what colour is the circle?"])
    greedy = vkv_jax.generate(model, inputs, 8).tokens[0]
    # declare the 3rd greedy token an end-of-sequence token: everything after it must be padding
    eos = int(greedy[2])
    model.tokenizer._eos_override = None
    orig = type(model.tokenizer).eos_ids
    try:
        type(model.tokenizer).eos_ids = property(lambda self: frozenset({eos}))
        out = vkv_jax.generate(model, inputs, 8).tokens[0]
    finally:
        type(model.tokenizer).eos_ids = orig
    first = list(out).index(eos)
    np.testing.assert_array_equal(out[:first + 1], greedy[:first + 1])
    assert (out[first + 1:] == model.tokenizer.pad_id).all()


def test_prompts_in_one_bucket_share_the_prefill_executable(model):
    """Prompts padded to one bucket share the prefill's executable; the paging and decode ones are
    keyed by the fitted pool and compile again only when its size changes."""
    from vkv_jax import compile_cache

    compile_cache.clear()
    compile_cache.reset_stats()
    short = model.prepare([IMAGE], ["is there a red square?"])
    long = model.prepare([IMAGE], ["is the red circle above or below the blue square in the image?"])
    assert short.prompt_lengths != long.prompt_lengths
    assert short.input_ids.shape == long.input_ids.shape
    first = vkv_jax.generate(model, short, 4)
    after_first = compile_cache.stats()["compiles_by_function"]
    second = vkv_jax.generate(model, long, 4)
    by_function = compile_cache.stats()["compiles_by_function"]
    assert first.stats["prefill_compile_s"] > 0
    assert after_first == {"prefill_compact": 1, "page_prompt": 1, "bucket_decode_jit": 1}
    same_pool = (first.stats["kv_page_size"], first.stats["kv_pages"]) == (second.stats["kv_page_size"],
                                                                           second.stats["kv_pages"])
    new = 0 if same_pool else 1
    assert by_function == {"prefill_compact": 1, "page_prompt": 1 + new, "bucket_decode_jit": 1 + new}
    assert (second.stats["decode_compile_s"] == 0) == same_pool


def test_stats_report_tokens_bytes_and_times(model):
    inputs = model.prepare([IMAGE], ["what colour is the circle?"])
    s = vkv_jax.generate(model, inputs, 4).stats
    cfg = model.config.text
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert s["kv_bytes_full"] == s["kv_bytes"] == inputs.prompt_lengths[0] * per_token
    assert s["kept_vision_per_layer"] == [model.config.num_image_tokens] * cfg.num_layers
    assert s["kept_text_per_layer"] == [inputs.prompt_lengths[0] - model.config.num_image_tokens] * cfg.num_layers
    assert s["prefill_s"] > 0 and s["decode_tokens_per_s"] > 0


# ---- bad input: a clear error before any compile ----

def test_nonexistent_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vkv_jax.load("/nonexistent/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        vkv_jax.load(tmp_path)


def test_unsupported_model_type(tmp_path, model_dir):
    shutil.copytree(model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "idefics3"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'idefics3'.*qwen2_vl, qwen2_5_vl"):
        vkv_jax.load(tmp_path / "m")


def test_unsupported_dtype(model_dir):
    with pytest.raises(ValueError, match="dtype"):
        vkv_jax.load(model_dir, dtype="float16")


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(tmp_path, model_dir, damage):
    shutil.copytree(model_dir, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"\xff" * 64 + data[72:])
    with pytest.raises(ValueError, match="corrupt"):
        vkv_jax.load(tmp_path / "m")


def test_missing_image_file(model):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        model.prepare(["/tmp/nope.png"], ["what colour is the circle?"])


def test_unreadable_image_file(model, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        model.prepare([str(bad)], ["what colour is the circle?"])


def test_prompt_without_room_for_the_image(model):
    words = " ".join(["circle"] * (model.config.text.max_position_embeddings))
    with pytest.raises(ValueError, match="no room"):
        model.prepare([IMAGE], [words])


def test_prompt_plus_new_tokens_beyond_context(model):
    inputs = model.prepare([IMAGE], ["what colour is the circle?"])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        vkv_jax.generate(model, inputs, model.config.text.max_position_embeddings)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_max_new_tokens_below_one(model, bad):
    inputs = model.prepare([IMAGE], ["what colour is the circle?"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        vkv_jax.generate(model, inputs, bad)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown compression method 'nope'"):
        Compression("nope", budget=0.1)


def test_image_count_mismatch(model):
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        model.prepare([IMAGE, IMAGE], ["what colour is the circle?"])


# ---- the CLI ----

def run_cli(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "vkv_jax.generate", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_cli_json_on_a_checkpoint(model_dir, tmp_path):
    img = tmp_path / "img.png"
    Image.fromarray(IMAGE).save(img)
    res = run_cli("--model", str(model_dir), "--image", str(img), "--prompt", "what colour is the circle?",
                  "--max-new-tokens", "5", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["tokens"]) == 5 and isinstance(out["text"], str)
    for key in ("prompt_tokens", "visual_tokens", "kv_bytes", "prefill_s", "decode_tokens_per_s"):
        assert key in out["stats"]


def test_cli_reports_bad_input_without_traceback(model_dir):
    res = run_cli("--model", str(model_dir), "--image", "/tmp/missing.png", "--prompt", "hi")
    assert res.returncode == 2 and "missing.png" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("--model", str(model_dir), "--method", "nope", "--out", "/nonexistent/never-written")
    assert res.returncode == 2 and "unknown compression method" in res.stderr


def test_padding_after_eos_is_not_cached(model):
    """The EOS is cached like any token; the padding a finished row keeps emitting is written dead, so a
    follow-up turn never attends to it."""
    from vkv_jax.methods import build
    from vkv_jax.sampling import Sampling

    inputs = model.prepare([IMAGE], ["what colour is the circle?"])
    greedy = vkv_jax.generate(model, inputs, 8).tokens[0]
    eos = int(greedy[2])
    args = [jax.numpy.asarray(a) for a in (inputs.input_ids, inputs.valid, inputs.pixel_values)]
    logits, cache, nxt, _ = request.prefill_jit(model.params, model.config, build(Compression("full")), *args, 8)
    key = jax.random.key(0)
    first, done = decode.first_tokens_jit(logits, key, Sampling(), (eos,))
    state = decode.DecodeState(cache=cache, tokens=first, positions=nxt, done=done)
    tokens, final = decode.scan_decode_jit(model.params, model.config, state, key, 8, Sampling(), (eos,), 0)
    first_eos = list(np.asarray(tokens[0])).index(eos)
    generated = np.asarray(final.cache.tag[0, 0, 0]) == 2
    live_generated = generated & (np.asarray(final.cache.pos[0, 0, 0]) >= 0)
    # tokens 0..first_eos were fed (the last token is never fed); nothing after the EOS is live
    assert live_generated.sum() == first_eos + 1
    assert generated.sum() == 7


def test_stacked_and_per_layer_weights_give_the_same_generation(model):
    """`load` keeps per-layer weight buffers on CPU (faster decode); accelerators use the stacked layout
    under `lax.scan`. Both must compute the same thing."""
    import dataclasses

    from vkv_jax.models import llama

    assert isinstance(model.params["lm"]["layers"], list)  # CPU layout
    stacked = {**model.params, "lm": {**model.params["lm"], "layers": llama.stack_layers(model.params["lm"]["layers"])}}
    inputs = model.prepare([IMAGE, IMAGE], ["what colour is the circle?", "is there a red square?"])
    a = vkv_jax.generate(model, inputs, 6, Compression("snapkv", budget=0.5, window=4))
    b = vkv_jax.generate(dataclasses.replace(model, params=stacked), inputs, 6,
                         Compression("snapkv", budget=0.5, window=4))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(np.asarray(model.logits(inputs.input_ids, inputs.pixel_values, inputs.valid)),
                               np.asarray(dataclasses.replace(model, params=stacked).logits(
                                   inputs.input_ids, inputs.pixel_values, inputs.valid)), atol=1e-5)


# ---- sampling settings are traced; decode lengths are bucketed ----

def np_filtered(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Numpy transcription of temperature + top-k + top-p filtering, row by row: the logits a
    non-greedy draw samples from (dropped tokens at float32 min)."""
    neg = np.finfo(np.float32).min
    out = logits.astype(np.float32) / np.float32(temperature if temperature > 0 else 1.0)
    for row in out:
        if top_k:
            kth = np.sort(row)[::-1][min(top_k, row.size) - 1]
            row[row < kth] = neg
        if top_p < 1.0:
            order = np.argsort(-row, kind="stable")
            probs = np.exp(row[order].astype(np.float64) - row.max())
            probs /= probs.sum()
            before = np.cumsum(probs) - probs  # mass of the tokens ranked above
            keep = order[before < top_p]  # the smallest prefix reaching top_p; the first always
            dropped = np.ones(row.size, bool)
            dropped[keep] = False
            # ties with the last kept value survive too (the filter thresholds on the value)
            dropped &= row < row[keep].min()
            row[dropped] = neg
    return out


LOGITS = np.array([
    [2.0, 1.0, 1.0, 0.5, -1.0, 3.0, 0.0, -2.0],  # a tie at the 3rd/4th rank
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    [5.0, -5.0, 4.0, -4.0, 3.0, -3.0, 2.0, -2.0],
], np.float32)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.0, 0, 1.0), (0.0, 3, 0.5), (1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6), (0.5, 2, 0.9), (2.0, 5, 0.3),
    (1.0, 8, 1.0), (1.0, 1, 1.0), (1.0, 0, 0.01)])
def test_traced_sampler_matches_a_numpy_transcription(temperature, top_k, top_p):
    from vkv_jax.sampling import Sampling, filtered_logits, sample

    setting = Sampling(temperature, top_k, top_p).as_arrays()
    want = np_filtered(LOGITS, temperature, top_k, top_p)
    got = np.asarray(jax.jit(filtered_logits)(LOGITS, setting))
    np.testing.assert_array_equal(got == np.finfo(np.float32).min, want == np.finfo(np.float32).min)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    key = jax.random.key(7)
    tokens = np.asarray(jax.jit(sample)(LOGITS, key, setting))
    if temperature == 0:
        np.testing.assert_array_equal(tokens, LOGITS.argmax(-1))
    else:
        # every row draws from the key on its own (a row's token does not depend on the other rows)
        per_row = [int(jax.random.categorical(key, jax.numpy.asarray(row))) for row in want]
        np.testing.assert_array_equal(tokens, per_row)
        assert all(want[b, t] > np.finfo(np.float32).min for b, t in enumerate(tokens))


def test_one_executable_serves_every_sampling_setting():
    from vkv_jax.sampling import Sampling, sample

    fn = jax.jit(sample)
    for setting in [(0.0, 0, 1.0), (0.3, 2, 0.5), (1.7, 0, 0.9), (1.0, 5, 1.0)]:
        fn(LOGITS, jax.random.key(0), Sampling(*setting).as_arrays())
    assert fn._cache_size() == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-0.5), "temperature"), (dict(temperature=True), "temperature"),
    (dict(temperature="1.0"), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=2.0), "top_k"),
    (dict(top_k=True), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p=True), "top_p")])
def test_bad_sampling_settings_fail_before_compiling(model, kwargs, match):
    from vkv_jax import compile_cache

    inputs = model.prepare([IMAGE], ["what colour is the circle?"])
    before = compile_cache.stats()["compiles"]
    with pytest.raises(ValueError, match=match):
        vkv_jax.generate(model, inputs, 4, **kwargs)
    assert compile_cache.stats()["compiles"] == before


def test_top_k_above_the_vocabulary_warns_and_keeps_every_token(model):
    inputs = model.prepare([IMAGE], ["what colour is the circle?"])
    vocab = model.config.text.vocab_size
    with pytest.warns(UserWarning, match="top_k"):
        big = vkv_jax.generate(model, inputs, 6, temperature=1.0, top_k=vocab + 5, seed=2).tokens
    off = vkv_jax.generate(model, inputs, 6, temperature=1.0, top_k=0, seed=2).tokens
    np.testing.assert_array_equal(big, off)


def test_compression_given_as_a_string_is_a_type_error(model):
    inputs = model.prepare([IMAGE], ["what colour is the circle?"])
    with pytest.raises(TypeError, match=r"Compression\('snapkv'"):
        vkv_jax.generate(model, inputs, 4, compression="snapkv")


@pytest.mark.parametrize("seed,error", [(-1, ValueError), (2 ** 32, ValueError), (2 ** 70, ValueError),
                                        (True, TypeError), (1.5, TypeError), ("3", TypeError)])
def test_bad_seed(model, seed, error):
    inputs = model.prepare([IMAGE], ["what colour is the circle?"])
    with pytest.raises(error, match="seed"):
        vkv_jax.generate(model, inputs, 4, temperature=1.0, seed=seed)


def reference_generate(model, inputs, max_new_tokens, compression, sampling, seed):
    """Today's path before bucketing: prefill sized for max_new_tokens, an exact-length lax.scan."""
    from vkv_jax.methods import build

    eos, pad = tuple(sorted(model.tokenizer.eos_ids)), int(model.tokenizer.pad_id)
    args = [jax.numpy.asarray(a) for a in (inputs.input_ids, inputs.valid, inputs.pixel_values)]
    logits, cache, nxt, _ = request.prefill_jit(model.params, model.config, build(compression), *args,
                                               max_new_tokens)
    key = jax.random.key(seed)
    first, done = decode.first_tokens_jit(logits, key, sampling, eos)
    state = decode.DecodeState(cache=cache, tokens=first, positions=nxt, done=done)
    tokens, final = decode.scan_decode_jit(model.params, model.config, state, key, max_new_tokens, sampling, eos, pad)
    return np.asarray(tokens), final


@pytest.mark.parametrize("compression", [Compression("full"), Compression("snapkv", budget=0.3, window=4)])
def test_bucketed_decode_matches_the_exact_scan(model, compression):
    """Any max_new_tokens gives the tokens (and cache) of an exact-length scan over a cache sized for it."""
    from vkv_jax.sampling import Sampling

    inputs = model.prepare([IMAGE, IMAGE], ["what colour is the circle?", "how many red objects are there?"])
    for n, sampling in [(1, Sampling()), (5, Sampling()), (16, Sampling(0.8, 20, 0.9)), (17, Sampling()),
                        (23, Sampling(1.0, 0, 0.7))]:
        kwargs = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        out = vkv_jax.generate(model, inputs, n, compression, seed=4, **kwargs, return_layout=True)
        want, final = reference_generate(model, inputs, n, compression, sampling, seed=4)
        assert out.tokens.shape == (2, n)
        np.testing.assert_array_equal(out.tokens, want)
        # the same decode segment and kept prompt slots; the pool (fitted vs the static bound) may differ
        assert out.stats["kv_bytes_decode_segment"] == final.cache.decode_segment_bytes()
        np.testing.assert_array_equal(out.layout["length"], np.asarray(final.cache.prompt_len))


def test_answer_lengths_share_the_prefill_and_bucket_the_decode(model):
    from vkv_jax import compile_cache

    inputs = model.prepare([IMAGE], ["what colour is the circle?"])
    compile_cache.clear()
    vkv_jax.generate(model, inputs, 3, temperature=0.5)  # warm: prefill + the 16-token bucket
    before = compile_cache.stats()["compiles"]
    for n, temperature in [(1, 0.0), (9, 0.9), (16, 0.2), (17, 0.0), (30, 1.5), (32, 0.3)]:
        vkv_jax.generate(model, inputs, n, temperature=temperature, top_p=0.5 + n / 100)
    # one new decode executable for the 32 bucket; the prefill and the 16 bucket are reused
    assert compile_cache.stats()["compiles"] - before == 1
    assert paging.decode_bucket(1) == paging.decode_bucket(16) == 16 and paging.decode_bucket(17) == 32
