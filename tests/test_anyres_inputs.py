"""Several images per prompt and the anyres input checks: placeholders, per-row counts, clear errors
before anything compiles."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from hf_fixtures import make_llava, make_llava_next
from PIL import Image

import vkv_jax
from vkv_jax.models import llava


def image(h, w, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("next_inputs")
    make_llava_next(path)
    return path


@pytest.fixture(scope="module")
def model(next_dir):
    return vkv_jax.load(next_dir)


def test_each_image_gets_its_own_count_and_rows_differ(model):
    a, b, c = image(37, 53, 1), image(61, 29, 2), image(64, 64, 3)
    inputs = model.prepare([[a, b], [c]], ["is there a red square?", "what colour is the circle?"])
    one = [model.prepare([im], ["what colour is the circle?"]).visual_tokens[0] for im in (a, b, c)]
    assert inputs.visual_tokens == [one[0] + one[1], one[2]]
    assert len(set(one)) == 3
    ids = inputs.input_ids
    assert [int(n) for n in (ids == model.config.image_token_id).sum(1)] == inputs.visual_tokens
    assert isinstance(inputs.pixel_values, llava.VisualInputs)
    assert inputs.pixel_values.num_visual == min(inputs.visual_tokens)
    # one image per prompt keeps working, as an image or a one-element list
    same = model.prepare([[c]], ["what colour is the circle?"])
    np.testing.assert_array_equal(same.input_ids, model.prepare([c], ["what colour is the circle?"]).input_ids)


def test_placeholders_in_the_prompt_are_filled_in_order(model):
    a, b = image(37, 53, 1), image(61, 29, 2)
    tok = model.image_token
    inputs = model.prepare([[a, b]], [f"is there {tok} a red square {tok} ?"])
    row = inputs.input_ids[0][inputs.valid[0]]
    is_img = (row == model.config.image_token_id).astype(int)
    runs = np.diff(np.concatenate([[0], is_img, [0]]))
    starts, stops = np.nonzero(runs == 1)[0], np.nonzero(runs == -1)[0]
    counts = [model.prepare([im], ["a"]).visual_tokens[0] for im in (a, b)]
    assert list(stops - starts) == counts  # two separate spans, the first image's first
    with pytest.raises(ValueError, match=r"prompt 0 holds 2 '<image>' placeholder\(s\) but 1 image\(s\) were given"):
        model.prepare([[a]], [f"is there {tok} a red square {tok} ?"])
    with pytest.raises(ValueError, match=r"prompt 0 holds 1 '<image>' placeholder\(s\) but 2 image\(s\)"):
        model.prepare([[a, b]], [f"is there {tok} a red square?"])


def test_too_many_image_tokens_for_the_context(model):
    small = dataclasses.replace(model, config=dataclasses.replace(
        model.config, text=dataclasses.replace(model.config.text, max_position_embeddings=120)))
    with pytest.raises(ValueError, match=r"prompt 0 is \d+ tokens \(\d+ of them for its 2 image\(s\): \[\d+, \d+\]\) "
                                         r"but the model's context is 120"):
        small.prepare([[image(64, 64), image(64, 64)]], ["is there a red square?"])


def test_image_too_small_for_the_tiling(model):
    with pytest.raises(ValueError, match=r"image 0 is 400x1 pixels: too small \(or too thin\) for llava_next's "
                                         r"tiling"):
        model.prepare([image(1, 400)], ["a"])


def test_unsupported_grid_pinpoints(next_dir, tmp_path):
    shutil.copytree(next_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["image_grid_pinpoints"] = [[32, 64], [40, 64]]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported image_grid_pinpoints entry \[40, 64\]"):
        vkv_jax.load(tmp_path / "m")


def test_visual_inputs_checked_before_tracing(model):
    inputs = model.prepare([[image(37, 53)], [image(64, 64)]], ["a", "b"])
    ids = inputs.input_ids.copy()
    ids[0, -1] = model.config.image_token_id  # one image token more than the images need
    with pytest.raises(ValueError, match="row 0 of input_ids holds image tokens that VisualInputs gives no features"):
        model.logits(ids, inputs.pixel_values, inputs.valid)
    with pytest.raises(ValueError, match="takes its images as llava.VisualInputs"):
        model.logits(inputs.input_ids, np.zeros((2, 3, 32, 32), np.float32), inputs.valid)


def test_in_prefill_methods_without_ragged_support_need_equal_visual_counts(model):
    """LightKV not bound to the batch's grids and counts plans every row from one static count."""
    from vkv_jax.inputs import visual_token_bound
    from vkv_jax.methods import build

    inputs = model.prepare([image(37, 53), image(64, 64)], ["a", "b"])
    with pytest.raises(ValueError, match=r"LightKV shortens every row's visual span by the same static amount.*got "
                                         r"\[\d+, \d+\]"):
        visual_token_bound(model.config, inputs, build(vkv_jax.Compression("lightkv")))


def test_llava15_several_images_per_prompt_match_transformers(tmp_path):
    """LLaVA-1.5 rows with 2 and 1 images: HF fills the image tokens with the images in order."""
    hf = make_llava(tmp_path, vision_layers=2)
    ours = vkv_jax.load(tmp_path)
    rows = [[image(40, 30, 1), image(30, 50, 2)], [image(32, 32, 3)]]
    inputs = ours.prepare(rows, ["is there a red square?", "what colour is the circle?"])
    assert inputs.visual_tokens == [2 * ours.config.num_image_tokens, ours.config.num_image_tokens]
    pix = np.concatenate([ours.processor([im]) for row in rows for im in row])
    mask = inputs.valid
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(inputs.input_ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(np.where(mask, np.cumsum(mask, 1) - 1, 1)),
                 pixel_values=torch.tensor(pix)).logits.numpy()
    got = np.asarray(ours.logits(inputs.input_ids, inputs.pixel_values, inputs.valid))
    assert np.abs(ref - got)[mask].max() / np.abs(ref[mask]).max() <= 1e-4


def test_generate_cli_with_two_images(next_dir, tmp_path, capsys):
    from vkv_jax.cli import generate as cli

    paths = []
    for i, (h, w) in enumerate([(37, 53), (61, 29)]):
        paths.append(str(tmp_path / f"{i}.png"))
        image(h, w, i).save(paths[-1])
    argv = ["--model", str(next_dir), "--image", paths[0], "--image", paths[1], "--prompt", "is there a red square?",
            "--method", "aircache", "--budget", "0.5", "--max-new-tokens", "3", "--json"]
    assert cli.main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    model = vkv_jax.load(next_dir)
    want = model.prepare([[image(37, 53, 0), image(61, 29, 1)]], ["is there a red square?"]).visual_tokens[0]
    assert [x["stats"]["visual_tokens"] for x in lines] == [want] * len(lines) and lines
    assert cli.main(argv[:4] + ["--image", str(tmp_path / "missing.png"), "--prompt", "a"]) == 2
    assert "--image" in capsys.readouterr().err


def test_bench_runs_an_anyres_preset_at_its_real_token_count(tmp_path):
    from vkv_jax import configs
    from vkv_jax.bench import latency as bench

    raw = json.loads((configs.HERE / "smoke.json").read_text())
    raw.pop("visual_tokens")
    raw.update(name="smoke-next", model_type="llava_next", image=[64, 64],
               image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    path = tmp_path / "smoke-next.json"
    path.write_text(json.dumps(raw))
    preset = configs.load_preset(path)
    assert preset.visual_tokens == 16 + 8 * 9  # base crop + 8 grid rows of 8 + newline
    doc = bench.run(bench.parse_args(["--config", str(path), "--methods", "aircache", "--budgets", "0.25",
                                      "--batch", "1", "--new-tokens", "2", "--out", str(tmp_path / "out")]))
    rows = doc["results"]
    assert [r["visual_tokens"] for r in rows] == [88, 88] and not any("error" in r for r in rows)
    with pytest.raises(ValueError, match=r"--visual-tokens 50: a llava_next image has a count set by its size"):
        bench.run(bench.parse_args(["--config", str(path), "--visual-tokens", "50", "--out", str(tmp_path)]))
