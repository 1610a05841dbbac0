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
from vkv_jax import decode
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


def test_prompts_in_one_bucket_compile_once(model):
    decode.prefill_jit.clear_cache() if hasattr(decode.prefill_jit, "clear_cache") else None
    from vkv_jax import compile_cache

    compile_cache.clear()
    before = decode.prefill_jit._cache_size()
    short = model.prepare([IMAGE], ["is there a red square?"])
    long = model.prepare([IMAGE], ["is the red circle above or below the blue square in the image?"])
    assert short.prompt_lengths != long.prompt_lengths
    assert short.input_ids.shape == long.input_ids.shape
    first = vkv_jax.generate(model, short, 4)
    second = vkv_jax.generate(model, long, 4)
    assert first.stats["prefill_compile_s"] > 0
    assert second.stats["prefill_compile_s"] == 0 and second.stats["decode_compile_s"] == 0
    assert decode.prefill_jit._cache_size() - before <= 1


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
    cfg["model_type"] = "llava_next"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'llava_next'"):
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
    logits, cache, nxt, _ = decode.prefill_jit(model.params, model.config, build(Compression("full")), *args, 8)
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
