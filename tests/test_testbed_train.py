"""`vkv_jax.testbed.train` on a micro config: the losses fall, an interrupted run resumes from its orbax
checkpoint at the saved stage and step and ends where an uninterrupted run ends, and the export loads."""

import json

import numpy as np
import pytest

from vkv_jax.testbed import baselines
from vkv_jax.testbed import train as T

MICRO = json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                    "vision_hidden_size": 32, "vision_intermediate_size": 64, "vision_layers": 1, "vision_heads": 2})


def _args(out, *extra):
    return ["--out", str(out), "--sizes", MICRO, "--s1-steps", "12", "--s1-batch", "16", "--s2-steps", "8",
            "--batch", "8", "--turns", "2", "--train-pool", "64", "--val", "16", "--eval-every", "4",
            "--minutes", "0", "--quiet", "--focus", "shape_at", "--focus-steps", "2", "--focus-pool", "16",
            "--qtype-weights", "relative=2", "--ground-weight", "0.1", "--ground-layer", "0", *extra]


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    full = tmp_path_factory.mktemp("full")
    cut = tmp_path_factory.mktemp("cut")
    T.main(_args(full))
    T.main(_args(cut, "--stop-at", "2", "4"))  # interrupted in stage 2
    T.main(_args(cut))  # resumed
    return full, cut


def test_train_losses_decrease(runs):
    full, _ = runs
    log = _log(full)
    s1 = [r["loss"] for r in log if r["event"] == "stage1"]
    s2 = [r["loss"] for r in log if r["event"] == "stage2"]
    assert s1[-1] < s1[0] and s2[-1] < s2[0]
    assert all("val" in r and "baseline" in r for r in log if r["event"] == "stage2")


def test_train_resumes_at_saved_stage_and_step(runs):
    full, cut = runs
    log = _log(cut)
    box = [r for r in log if r["event"] == "time_box"]
    resume = [r for r in log if r["event"] == "resume"]
    assert box and box[0]["stage"] == 2 and box[0]["step"] == 4
    assert resume and resume[0]["stage"] == 2 and resume[0]["step"] == 4
    steps = [r["step"] for r in log if r["event"] == "stage2"]
    assert steps == [4, 8]  # continued at the saved step, not from 0
    # same batches (data position is part of the state) -> same final weights as the uninterrupted run
    from vkv_jax.models import safetensors_io

    a = dict(safetensors_io.iter_tensors([str(full / "final" / "model.safetensors")]))
    b = dict(safetensors_io.iter_tensors([str(cut / "final" / "model.safetensors")]))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_train_export_loads_with_vkv_jax(runs):
    import vkv_jax

    full, _ = runs
    model = vkv_jax.load(str(full / "final"))
    assert model.config.num_image_tokens == 64
    assert not any(k == "aux" for k in model.params)


def test_parse_qtype_weights_names_every_type_in_order():
    from vkv_jax.testbed import synthetic as S

    w = T.parse_qtype_weights("shape_at=3, relative=2")
    assert w == tuple(3.0 if q == "shape_at" else 2.0 if q == "relative" else 1.0 for q in S.ONE_WORD_QTYPES)
    assert len(T.parse_qtype_weights("object_at=2", S.QTYPES)) == len(S.QTYPES)
    assert T.parse_qtype_weights(None) is None
    with pytest.raises(ValueError, match="unknown question type"):
        T.parse_qtype_weights("colour=2")


def test_question_only_baseline_takes_the_majority_answer_by_question_then_skeleton_then_type():
    train = {"questions": ["what color is the circle?"] * 5 + ["what color is the square?"] * 2
             + ["how many red objects are there?", "how many blue objects are there?"],
             "qtype": ["colour_of_shape"] * 7 + [2, 2],  # a type name, or its index in QTYPES (as in a pool)
             "answers": ["red", "red", "red", "blue", "blue", "green", "green", "2", "0"]}
    val = {"questions": ["what color is the circle?",  # seen 5 times: its own majority, red
                         "what color is the square?",  # seen twice: the skeleton's majority (red), not green
                         "how many green objects are there?",  # unseen: skeleton "how many _ ...", first of a tie
                         "is there a red square?"],  # unseen skeleton and type: a miss
           "qtype": ["colour_of_shape", "colour_of_shape", "count", "exists"],
           "answers": ["red", "green", "2", "no"]}
    assert baselines.question_only_baseline(train, val) == {"colour_of_shape": 0.5, "count": 1.0, "exists": 0.0,
                                                    "all": 0.5}


def test_answer_slots_are_the_slots_before_each_answer():
    assert T.answer_slots([False, False, True, True, False, False, True]) == [1, 5]


def test_grounding_logmass_is_the_log_attention_mass_on_the_answer_tokens():
    rng = np.random.default_rng(0)
    B, Hq, Hkv, S, Dh, J = 2, 4, 2, 9, 8, 2
    q, k = rng.normal(size=(B, Hq, S, Dh)).astype(np.float32), rng.normal(size=(B, Hkv, S, Dh)).astype(np.float32)
    valid = np.ones((B, S), bool)
    valid[1, 7:] = False  # right padding
    slot = np.array([[4, 8], [3, 6]])
    ground = np.zeros((B, J, S), bool)
    ground[0, 0, [1, 2]] = ground[0, 1, 5] = ground[1, 0, 0] = ground[1, 1, [2, 6]] = True
    got = np.asarray(T.grounding_logmass(q, k, valid, slot, ground, head=3))
    for b in range(B):
        for j in range(J):
            seen = valid[b] & (np.arange(S) <= slot[b, j])
            logits = k[b, 1] @ q[b, 3, slot[b, j]] / np.sqrt(Dh)  # head 3 reads kv head 3 // 2
            p = np.where(seen, np.exp(logits - logits[seen].max()), 0.0)
            p /= p.sum()
            np.testing.assert_allclose(got[b, j], np.log(p[ground[b, j]].sum()), rtol=1e-5)


def test_make_batch_grounds_only_the_chosen_question_types():
    from vkv_jax.testbed import synthetic as S

    n, turns, P, T_ = 3, 2, 4, 40
    pool = {"images": np.zeros((n, 64, 64, 3), np.uint8), "ids": np.zeros((n, T_), np.int32),
            "valid": np.arange(T_) < 20 + np.zeros((n, 1)), "target": np.zeros((n, T_), bool),
            "answer_slot": np.full((n, turns), 5), "ground": np.ones((n, turns, P), bool),
            "turn_qtype": np.array([[S.QTYPES.index("count"), S.QTYPES.index("shape_at")]] * n)}
    b = T.make_batch(pool, np.arange(2), 2, ground_types=("shape_at",))
    assert b["ground"].shape == (2, turns, P) and b["ids"].shape == (2, 32)
    assert not b["ground"][:, 0].any() and b["ground"][:, 1].all()


def test_evaluate_pool_needs_every_answer_token_and_its_eos():
    """Teacher-forced whole-answer exact match: row 0's two-word answer and `</s>` are all predicted; row 1
    gets the first word right and the second wrong; row 2 answers right but does not stop (no `</s>`)."""
    from vkv_jax.testbed import synthetic as S

    ids = np.array([[5, 6, 7, 8, 1, 0], [5, 6, 7, 8, 1, 0], [5, 6, 7, 1, 0, 0]])
    target = np.array([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], bool)
    pred = np.roll(ids, -1, axis=1)  # the gold next token everywhere ...
    pred[1, 2] = 9  # ... but row 1's second answer word
    pred[2, 2] = 4  # ... and row 2's `</s>`
    pool = {"ids": ids, "valid": ids > 0, "target": target, "images": np.zeros((3, 8, 8, 3), np.uint8),
            "qtype": np.array([S.QTYPES.index("object_at")] * 3)}
    got = T.evaluate_pool(lambda params, i, v, px: pred[:len(i)], None, pool, batch=2)
    assert got == {"object_at": round(1 / 3, 4), "all": round(1 / 3, 4)}


def test_downsample_box_averages_and_cell_of_patch_names_each_patch_cell():
    from vkv_jax.testbed import synthetic as S

    img = np.arange(2 * 6 * 6 * 3, dtype=np.uint8).reshape(2, 6, 6, 3)
    got = T.downsample(img, 3)
    assert got.shape == (2, 2, 2, 3)
    assert got[1, 0, 1, 2] == round(img[1, 0:3, 3:6, 2].astype(float).mean())
    cells = T.cell_of_patch(S.TESTBED_V2)  # 24 x 24 patches, 3 x 3 per cell of the 8 x 8 grid
    assert cells.shape == (576,) and cells[5 * 24 + 7] == 1 * 8 + 2
    assert (np.bincount(cells) == 9).all()
    ex = S.make_example(0, "train", S.TESTBED_V2)
    lab = T.patch_labels(ex, S.TESTBED_V2)
    np.testing.assert_array_equal(lab[:, 2] * 8 + lab[:, 3], cells)


def test_teacher_warm_start_distils_the_tower_and_starts_stage_2_from_the_teacher_lm(runs, tmp_path):
    """A 128-px student (2 x 2 patches per cell) of the 64-px micro model: its stage-1 targets are the
    teacher's token of each patch's cell on the box-averaged image, the distance to them falls, and with
    no stage-2 step the exported LM is the teacher's."""
    import vkv_jax
    from vkv_jax.models import llava, safetensors_io
    from vkv_jax.testbed import synthetic as S

    teacher_dir = str(runs[0] / "final")
    student = tmp_path / "student"
    T.main(["--out", str(student), "--sizes", MICRO, "--image-size", "128", "--teacher", teacher_dir,
            "--s1-steps", "12", "--s1-batch", "8", "--s2-steps", "0", "--turns", "1", "--train-pool", "16",
            "--val", "8", "--eval-every", "4", "--minutes", "0", "--ground-layer", "0", "--quiet"])
    log = _log(student)
    distill = [r["distill_object"] for r in log if r["event"] == "stage1"]
    assert distill[-1] < distill[0]
    assert any(r["event"] == "stage2" and r["step"] == 0 and "val" in r for r in log)

    teacher = vkv_jax.load(teacher_dir)
    shapes = S.ShapesConfig(image_size=128)
    images = np.stack([e.image for e in S.make_examples("train", 2, config=shapes)])
    got = T.teacher_targets(teacher.params, teacher.config, shapes)(images)  # [2, 256, D]
    want = np.asarray(llava.image_features(teacher.params, teacher.config,
                                           T.pixel_values(T.downsample(images, 2))))  # [2, 64, D]
    np.testing.assert_allclose(got[:, 3 * 16 + 5], want[:, 1 * 8 + 2], rtol=1e-5, atol=1e-6)

    lm = {k: v for k, v in safetensors_io.iter_tensors([str(teacher_dir + "/model.safetensors")])
          if k.startswith("language_model")}
    out = dict(safetensors_io.iter_tensors([str(student / "final" / "model.safetensors")]))
    assert lm and all(np.array_equal(out[k], v) for k, v in lm.items())


def test_teacher_with_another_lm_is_refused():
    """An argument check: the shipped 64-px model (a tower that fits 128-px images, an LM of width 64) as
    the teacher of a width-48 student (it once needed the trained micro run, ~60 s, for nothing)."""
    from vkv_jax.testbed import synthetic as S
    from vkv_jax.testbed import tiny
    from vkv_jax.testbed import vocab as V

    tok = V.build_tokenizer(S.ShapesConfig())
    cfg = tiny.tiny_config(tok.get_vocab_size(), tok.token_to_id(V.IMAGE), image_size=128, hidden_size=48)
    with pytest.raises(ValueError, match="LM config differs"):
        T.load_teacher("tiny-llava", cfg, S.ShapesConfig(image_size=128))
