"""Facts about the synthetic shapes QA generator (vkv_jax.testbed.synthetic)."""

import hashlib
import re

import numpy as np
import pytest

from vkv_jax.testbed import synthetic as S

SMALL = S.ShapesConfig(image_size=64)  # one cell = one 8-px patch
ONE_WORD_TEST_DIGEST = "23595ce88a8069396a61d300775df84d6025ce2d"  # measured before object_at was added
CONFIGS = [S.ShapesConfig(), SMALL]


def _digest(ex):
    return hashlib.sha1(ex.image.tobytes() + ex.question.encode()).hexdigest()


@pytest.mark.parametrize("config", CONFIGS, ids=["128px", "64px"])
def test_same_seed_gives_identical_example(config):
    for i in (0, 7, 123):
        a, b = S.make_example(i, "validation", config, seed=3), S.make_example(i, "validation", config, seed=3)
        assert np.array_equal(a.image, b.image) and a.meta() == b.meta()
    assert _digest(S.make_example(0, "train", config, seed=0)) != _digest(S.make_example(0, "train", config, seed=1))


def test_splits_have_disjoint_seeds_and_examples():
    seeds = {s: {S.example_seed(s, i) for i in range(300)} for s in S.SPLITS}
    assert not (seeds["train"] & seeds["validation"] or seeds["train"] & seeds["test"]
                or seeds["validation"] & seeds["test"])
    digests = {s: {_digest(e) for e in S.make_examples(s, 300, config=SMALL)} for s in S.SPLITS}
    assert all(len(d) == 300 for d in digests.values())
    assert not (digests["train"] & digests["validation"] or digests["train"] & digests["test"]
                or digests["validation"] & digests["test"])


def _independent_answer(question, objects):
    """Answer recomputed from the question *text* and the object list only."""
    kinds = [(o.colour, o.shape) for o in objects]
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (o,) = [o for o in objects if o.shape == m[1]]
        return o.colour
    if m := re.fullmatch(r"what shape is at row (\d) column (\d)\?", question):
        cell = (int(m[1]) - 1, int(m[2]) - 1)
        return next((o.shape for o in objects if (o.row, o.col) == cell), "none")
    if m := re.fullmatch(r"what is at row (\d) column (\d)\?", question):
        cell = (int(m[1]) - 1, int(m[2]) - 1)
        return next((f"{o.colour} {o.shape}" for o in objects if (o.row, o.col) == cell), "none")
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(sum(o.colour == m[1] for o in objects))
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if (m[1], m[2]) in kinds else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) (left or right of|above or below) the (\w+) (\w+)\?", question):
        assert kinds.count((m[1], m[2])) == 1 and kinds.count((m[4], m[5])) == 1
        a, b = objects[kinds.index((m[1], m[2]))], objects[kinds.index((m[4], m[5]))]
        if m[3] == "left or right of":
            assert a.col != b.col
            return "left" if a.col < b.col else "right"
        assert a.row != b.row
        return "above" if a.row < b.row else "below"
    raise AssertionError(f"question matches no template: {question!r}")


def test_answers_match_independent_recomputation_from_metadata():
    examples = S.make_examples("train", 500, config=SMALL)
    for ex in examples:
        assert ex.answer == _independent_answer(ex.question, ex.objects), ex.meta()
        assert len({(o.row, o.col) for o in ex.objects}) == len(ex.objects)
        assert SMALL.min_objects <= len(ex.objects) <= SMALL.max_objects
        assert " " not in ex.answer and ex.answer in S.answer_vocab(SMALL)
    assert {ex.qtype for ex in examples} == set(S.ONE_WORD_QTYPES)  # the default config: no object_at


def test_testbed_v2_has_576_patches_two_word_answers_and_the_same_vocabulary():
    from vkv_jax.testbed import vocab

    v2 = S.TESTBED_V2
    assert (v2.image_size // 8) ** 2 == 576 and v2.cell == 24
    examples = S.make_examples("train", 400, config=v2, with_image=False)
    assert {ex.qtype for ex in examples} == set(S.QTYPES)
    two_words = 0
    for ex in examples:
        assert ex.answer == _independent_answer(ex.question, ex.objects), ex.meta()
        assert all(w in S.answer_vocab(v2) for w in ex.answer.split())
        two_words += len(ex.answer.split()) == 2
    assert two_words > 20
    assert vocab.vocab_words(v2) == vocab.vocab_words(SMALL)  # one tokenizer serves both testbeds
    # each answer cell of an object_at question is 3x3 patches of the 24x24 patch grid
    (cell,) = next(ex for ex in examples if ex.qtype == "object_at").answer_cells
    assert len(S.cells_to_patches([cell], v2, 8)) == 9


def test_adding_object_at_left_the_one_word_testbed_unchanged():
    # digest of the first five 64-px test examples before object_at existed (the shipped model's data)
    got = hashlib.sha1(b"".join(_digest(e).encode() for e in S.make_examples("test", 5, config=SMALL))).hexdigest()
    assert got == ONE_WORD_TEST_DIGEST


def test_config_for_model_reads_testbed_json_and_defaults_without_it(tmp_path):
    assert S.config_for_model(tmp_path, 64) == SMALL
    S.save_config(S.TESTBED_V2, tmp_path)
    assert S.config_for_model(tmp_path, 64) == S.TESTBED_V2


def _near(tile, rgb, tol=45.0):
    return np.linalg.norm(tile.astype(np.float32) - np.asarray(rgb, np.float32), axis=-1) < tol


@pytest.mark.parametrize("config", CONFIGS, ids=["128px", "64px"])
def test_answer_cells_show_the_objects_colour_and_empty_cells_show_none(config):
    c = config.cell
    checked_empty = 0
    for ex in S.make_examples("test", 150, config=config):
        at = {(o.row, o.col): o for o in ex.objects}
        for cell in ex.answer_cells:
            tile = ex.image[cell[0] * c:(cell[0] + 1) * c, cell[1] * c:(cell[1] + 1) * c]
            if cell not in at:  # "shape at r c" -> none
                assert not any(_near(tile, rgb).any() for rgb in S.COLOURS.values()), ex.meta()
                checked_empty += 1
                continue
            own = _near(tile, S.COLOURS[at[cell].colour]).mean()
            others = max(_near(tile, rgb).mean() for n, rgb in S.COLOURS.items() if n != at[cell].colour)
            assert own > 0.15 and others < 0.01, (ex.meta(), own, others)
    assert checked_empty > 0


def test_cells_to_patches_covers_each_cell_with_k_by_k_patches():
    assert S.cells_to_patches([(0, 0), (7, 7)], SMALL, 8) == [0, 63]
    big = S.ShapesConfig(image_size=128)
    assert S.cells_to_patches([(1, 2)], big, 8) == [2 * 16 + 4, 2 * 16 + 5, 3 * 16 + 4, 3 * 16 + 5]
    with pytest.raises(ValueError, match="patch_size"):
        S.cells_to_patches([(0, 0)], big, 5)


def test_bad_config_and_split_raise_value_error():
    with pytest.raises(ValueError, match="multiple of grid"):
        S.ShapesConfig(image_size=100)
    with pytest.raises(ValueError, match="unknown question types"):
        S.ShapesConfig(qtypes=("colour",))
    with pytest.raises(ValueError, match="unknown split"):
        S.make_example(0, "dev")


@pytest.mark.parametrize("config", CONFIGS, ids=["128px", "64px"])
def test_examples_without_images_ask_the_same_questions(config):
    """with_image=False makes the same random draws (only the painting is skipped), so the question,
    answer and metadata of every example are the ones of the example with its image."""
    bare = S.make_examples("train", 50, config=config, with_image=False)
    full = S.make_examples("train", 50, config=config)
    assert all(b.image is None for b in bare)
    assert [b.meta() for b in bare] == [f.meta() for f in full]
