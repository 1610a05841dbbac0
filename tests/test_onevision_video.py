"""LLaVA-OneVision video frames against transformers on a tiny random checkpoint (no downloads, no
torchvision): the model side (video placeholders, per-frame SigLIP features, the 2x2 bilinear pooling, one
newline token after the frames) through `LlavaOnevisionForConditionalGeneration(pixel_values_videos=...)`
on the very tensor our processor made; the per-frame preprocessing against the PIL image processor's base
crop (the same resize + rescale + normalize); `prepare(videos=...)` inputs and errors."""

import numpy as np
import pytest
import torch
from hf_fixtures import EOS_ID, PAD_ID, VOCAB, make_llava_next, make_llava_onevision
from PIL import Image

import vkv_jax
from vkv_jax.models import anyres

VIDEO_ID = VOCAB  # past the tokenizer's ids: only the video placeholders hold it
PROMPTS = ["what colour is the circle?", "is there a red square? how many shapes?"]


def image(h, w, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def frames(n, h=40, w=56, seed=0):
    return [image(h, w, seed=100 * seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    path = tmp_path_factory.mktemp("onevision_video")
    hf = make_llava_onevision(path, head_scale=30.0, video_token_id=VIDEO_ID)
    return hf, vkv_jax.load(path), path


def hf_inputs(ours, inputs, images=None):
    """transformers' inputs for our prepared batch: its ids with each video's slots holding the video
    token, the videos' frames as `pixel_values_videos` [B, F, 3, s, s] (our processor's tensor), the images
    through transformers' PIL processor."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    ids = inputs.input_ids.copy()
    pix = inputs.pixel_values
    crops, videos = 0, []
    for b, lays in enumerate(inputs.layouts):
        slots = np.nonzero(ids[b] == ours.config.image_token_id)[0]
        at = 0
        for lay in lays:
            if lay.kind == "video":
                ids[b, slots[at:at + lay.num_tokens]] = VIDEO_ID
                videos.append(np.asarray(pix.pixels[crops:crops + lay.num_crops]))
            at += lay.num_tokens
            crops += lay.num_crops
    out = dict(input_ids=torch.tensor(ids, dtype=torch.long),
               attention_mask=torch.tensor(inputs.valid, dtype=torch.long))
    if videos:
        out["pixel_values_videos"] = torch.tensor(np.stack(videos))
    if images is not None:
        proc = LlavaOnevisionImageProcessorPil.from_pretrained(ours.path)(images, return_tensors="np")
        out.update(pixel_values=torch.tensor(proc["pixel_values"]), image_sizes=torch.tensor(proc["image_sizes"]),
                   batch_num_images=torch.tensor(proc["batch_num_images"]))
    return out


@pytest.mark.parametrize("num_frames", [1, 3])
def test_video_token_count_and_layout_match_transformers_features(ov, num_frames):
    """F frames of a 4 x 4 feature grid pool to F * 2 * 2 tokens + one newline; our layout's taps applied
    to transformers' per-frame projected features give its pooled video features."""
    hf, ours, _ = ov
    video = torch.randn(1, num_frames, 3, 32, 32)
    lay = anyres.video_layout(num_frames, 4)
    with torch.no_grad():
        pooled = hf.model.get_video_features(video).pooler_output[0].numpy()  # [F * 4 + 1, D]
        hidden = hf.model.vision_tower(video[0], output_hidden_states=True).hidden_states[-1]
        feats = hf.model.multi_modal_projector(hidden).numpy().reshape(-1, pooled.shape[-1])  # [F * 16, D]
    assert lay.num_tokens == pooled.shape[0] == num_frames * 4 + 1
    table = np.concatenate([feats, hf.model.image_newline.detach().numpy()[None]])
    src = np.where(lay.source == anyres.NEWLINE, len(table) - 1, lay.source)
    ours_pooled = (table[src] * lay.weight[..., None]).sum(1)
    np.testing.assert_allclose(ours_pooled, pooled, atol=1e-5)


@pytest.mark.parametrize("case", ["video", "two_rows", "image_and_video"])
def test_logits_match_transformers_f32(ov, case):
    hf, ours, path = ov
    images = None
    if case == "video":
        inputs = ours.prepare(None, PROMPTS[:1], videos=[frames(3)])
    elif case == "two_rows":  # transformers takes one frame count for the batch
        inputs = ours.prepare(None, PROMPTS, videos=[frames(2, seed=1), frames(2, 64, 30, seed=2)])
    else:  # the image is the prompt's only image, so it is tiled; the video follows it
        images = [[image(61, 29, 7)]]
        inputs = ours.prepare(images, PROMPTS[:1], videos=[frames(2, seed=3)])
        assert inputs.layouts[0][0].num_crops > 1
    kw = hf_inputs(ours, inputs, images)
    assert (kw["input_ids"] == VIDEO_ID).any()
    mask = inputs.valid
    with torch.no_grad():
        ref = hf(**kw, position_ids=torch.tensor(np.where(mask, np.cumsum(mask, 1) - 1, 1))).logits.float().numpy()
    got = np.asarray(ours.logits(inputs.input_ids, inputs.pixel_values, inputs.valid))
    err = np.abs(ref - got)[mask].max() / np.abs(ref[mask]).max()
    assert err <= 1e-4, f"max abs diff relative to the logit scale {err:.2e}"
    # transformers' own ids (video placeholders) give the same logits through our model
    got_hf_ids = np.asarray(ours.logits(kw["input_ids"].numpy(), inputs.pixel_values, inputs.valid))
    np.testing.assert_array_equal(got_hf_ids, got)


def test_greedy_generation_matches_transformers(ov):
    hf, ours, _ = ov
    inputs = ours.prepare(None, PROMPTS, videos=[frames(2, seed=4), frames(2, 30, 90, seed=5)])
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(ours, inputs), max_new_tokens=20, do_sample=False, eos_token_id=EOS_ID,
                          pad_token_id=PAD_ID)[:, inputs.input_ids.shape[1]:].numpy()
    out = vkv_jax.generate(ours, inputs, max_new_tokens=20)
    np.testing.assert_array_equal(out.tokens[:, :ref.shape[1]], ref)


def test_frames_are_processed_as_the_pil_image_processors_base_crop(ov):
    """A frame is resized to the tower's size (aspect not kept), rescaled and normalized: the first crop
    transformers' PIL OneVision image processor makes of the same image."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    _, ours, path = ov
    proc = LlavaOnevisionImageProcessorPil.from_pretrained(path)
    clip = frames(3, 45, 70) + [image(20, 100, 9), image(32, 32, 8)]
    got = ours.processor.process_video(clip)
    assert got.shape == (5, 3, 32, 32)
    for i, frame in enumerate(clip):
        ref = proc([[frame]], return_tensors="np")["pixel_values"][0, 0]
        np.testing.assert_allclose(got[i], ref, atol=1e-6, err_msg=f"frame {i}")


def test_video_inputs_from_a_folder_an_array_and_a_list_agree(ov, tmp_path):
    _, ours, _ = ov
    clip = frames(3)
    for i, frame in enumerate(clip):
        frame.save(tmp_path / f"f{i:02d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    arrays = np.stack([np.asarray(f) for f in clip])
    runs = [ours.prepare(None, PROMPTS[:1], videos=[v]) for v in (clip, arrays, str(tmp_path))]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.input_ids, runs[0].input_ids)
        np.testing.assert_array_equal(other.pixel_values.pixels, runs[0].pixel_values.pixels)
    assert runs[0].visual_tokens == [3 * 4 + 1]
    tags = np.asarray(ours.logits(runs[0].input_ids, runs[0].pixel_values, runs[0].valid)).shape
    assert tags[:2] == runs[0].input_ids.shape


def test_video_errors_name_the_problem(ov, tmp_path):
    _, ours, _ = ov
    with pytest.raises(ValueError, match="one entry .* per prompt"):
        ours.prepare(None, PROMPTS, videos=[frames(2)])
    with pytest.raises(FileNotFoundError, match="video 0: .* is not a folder of frame images"):
        ours.prepare(None, PROMPTS[:1], videos=[str(tmp_path / "clip.mp4")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="video 0: folder .* holds no frame images"):
        ours.prepare(None, PROMPTS[:1], videos=[str(tmp_path / "empty")])
    with pytest.raises(ValueError, match=r"video 0: a video array must be \[frames, H, W"):
        ours.prepare(None, PROMPTS[:1], videos=[np.zeros((2, 3), np.uint8)])
    with pytest.raises(TypeError, match="video 0: frame 1: unsupported image type"):
        ours.prepare(None, PROMPTS[:1], videos=[[image(30, 30), 5]])


def test_videos_need_a_onevision_model(tmp_path):
    make_llava_next(tmp_path)
    with pytest.raises(ValueError, match="videos need a llava_onevision model; this one is llava_next"):
        vkv_jax.load(tmp_path).prepare(None, PROMPTS[:1], videos=[frames(2)])


def test_generate_cli_takes_a_folder_or_a_npy_stack_of_frames(ov, tmp_path, capsys):
    import json

    from vkv_jax.cli import generate as cli

    _, ours, path = ov
    clip = frames(2)
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(clip):
        frame.save(folder / f"{i}.png")
    np.save(tmp_path / "clip.npy", np.stack([np.asarray(f) for f in clip]))
    texts = []
    for video in (folder, tmp_path / "clip.npy"):
        rc = cli.main(["--model", str(path), "--video", str(video), "--prompt", PROMPTS[0], "--method", "full",
                       "--max-new-tokens", "3", "--json"])
        assert rc == 0
        run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert run["stats"]["visual_tokens"] == 2 * 4 + 1
        texts.append(run["tokens"])
    assert texts[0] == texts[1]
    assert texts[0] == vkv_jax.generate(ours, ours.prepare(None, PROMPTS[:1], videos=[clip]), 3).tokens[0].tolist()
    assert cli.main(["--model", str(path), "--video", str(tmp_path / "clip.mp4"), "--prompt", "q"]) == 2
    assert "expected a folder of frame images or a .npy file" in capsys.readouterr().err
    assert cli.main(["--model", str(path), "--video", str(folder)]) == 2
    assert "--prompt is required with --video" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["aircache", "vlcache", "csp", "snapkv"])
def test_methods_keep_the_compaction_invariant_with_video_rows(ov, name):
    """Video tokens are visual (tags 1, what AirCache / VL-Cache / CSP treat apart): the equivalence
    invariant of tests/test_equivalence.py on a batch of a video row beside an image + video row."""
    from _helpers import assert_compaction_invariant
    from test_equivalence import METHODS

    from vkv_jax.methods import Compression, build

    _, ours, _ = ov
    inputs = ours.prepare([[], [image(61, 29, 7)]], PROMPTS, videos=[frames(3, seed=6), frames(1, seed=7)])
    video_slots = [lay.num_tokens for lay in inputs.layouts[0]]
    assert video_slots == [3 * 4 + 1] and len(set(inputs.visual_tokens)) == 2
    assert_compaction_invariant(ours, inputs, build(Compression(name.split("_")[0], **METHODS[name])), 2)
