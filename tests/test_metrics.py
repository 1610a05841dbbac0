"""The per-question metrics of `vkv_jax.evaluation.metrics` against hand-worked values: exact match, VQAv2 soft
accuracy (the published partial credit of 1, 2, 3 of 10 humans), ANLS (its 0.5 threshold) and the
multiple-choice letter."""

import pytest

from vkv_jax.evaluation import metrics

# ----------------------------------------------------------------------------- exact


def test_exact_match_compares_normalised_answers_with_any_reference():
    assert metrics.exact_match("Red.", ["blue", "red"]) == 1.0
    assert metrics.exact_match(" Red  circle ", ["red circle"]) == 1.0
    assert metrics.exact_match("red", ["red circle"]) == 0.0


# ----------------------------------------------------------------------------- VQAv2

@pytest.mark.parametrize("matches,want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_of_m_matching_humans_of_ten_is_the_leave_one_out_mean(matches, want):
    # leave-one-out: m subsets drop a match (min(1, (m-1)/3)), 10 - m keep all (min(1, m/3)); 2 of 10 ->
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6, the VQA paper's example of partial credit
    refs = ["yes"] * matches + ["no"] * (10 - matches)
    assert metrics.vqa_accuracy("yes", refs) == pytest.approx(want)


def test_vqa_accuracy_with_fewer_than_ten_references_is_min_one_m_over_three():
    assert metrics.vqa_accuracy("cat", ["cat"]) == pytest.approx(1 / 3)
    assert metrics.vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)
    assert metrics.vqa_accuracy("cat", ["cat", "cat", "cat", "dog", "dog"]) == 1.0
    # OK-VQA's five answers, each given twice: one match of five scores as 2 of 10
    assert metrics.vqa_accuracy("cat", ["cat", "dog", "cow", "pig", "owl"] * 2) == pytest.approx(0.6)


@pytest.mark.parametrize("text,want", [
    ("Two.", "2"), ("None", "0"), ("a dog", "dog"), ("The Red Bus", "red bus"), ("dont", "don't"),
    ("yes!", "yes"), ("1,000", "1000"), ("3.5", "3.5"), ("black-and-white", "black and white"),
    ("left , right", "left right"), ("line\none", "line 1"),
])
def test_vqa_normalisation_follows_the_official_script(text, want):
    assert metrics.normalize_vqa(text) == want


def test_vqa_accuracy_matches_through_the_normalisation():
    assert metrics.vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert metrics.vqa_accuracy("a dog.", ["dog", "dog", "cat"]) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- ANLS

def test_levenshtein_counts_insertions_deletions_substitutions():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.levenshtein("", "abc") == metrics.levenshtein("abc", "") == 3
    assert metrics.levenshtein("flaw", "lawn") == 2
    assert metrics.levenshtein("same", "same") == 0


def test_anls_is_one_minus_the_normalised_distance_below_the_threshold_else_zero():
    assert metrics.anls("1,200.00", ["1,200.00"]) == 1.0
    assert metrics.anls(" Hello ", ["hello"]) == 1.0  # lower-cased, stripped
    assert metrics.anls("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)  # NL 0.43 < 0.5
    assert metrics.anls("abcd", ["abxy"]) == 0.0  # NL exactly 0.5: not below the threshold
    assert metrics.anls("abcd", ["abcx"]) == pytest.approx(0.75)
    assert metrics.anls("abc", ["xyz", "abd", "abc1"]) == pytest.approx(0.75)  # the best reference
    assert metrics.anls("", ["abc"]) == 0.0


# ----------------------------------------------------------------------------- multiple choice

@pytest.mark.parametrize("text,want", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("[c]", "C"), ("B. a dog", "B"), ("(b) a dog", "B"),
    ("C) two", "C"), ("The answer is B.", "B"), ("Answer: (c)", "C"), ("I pick option D", "D"),
    ("the answer is a cat", None), ("a cat", None), ("I think so", None), ("", None),
])
def test_extract_choice_reads_the_letter(text, want):
    assert metrics.extract_choice(text) == want


def test_extract_choice_falls_back_to_an_options_text():
    assert metrics.extract_choice("a dog", ["a cat", "a dog"]) == "B"
    assert metrics.extract_choice("dog", ["a cat", "a dog"]) is None  # not an option's whole text
    assert metrics.extract_choice("A. a dog", ["a cat", "a dog"]) == "A"  # a letter wins over the text


def test_choice_accuracy_compares_letters():
    assert metrics.choice_accuracy("The answer is B", ["B"]) == 1.0
    assert metrics.choice_accuracy("(a)", ["B"]) == 0.0
    assert metrics.choice_accuracy("a dog", ["B"], ["a cat", "a dog"]) == 1.0
    assert metrics.choice_accuracy("maybe", ["A"]) == 0.0


# ----------------------------------------------------------------------------- dispatch

def test_score_dispatches_by_name_and_rejects_an_unknown_metric():
    assert metrics.score("exact", "Cat", ["cat"]) == 1.0
    assert metrics.score("vqa", "cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)
    assert metrics.score("anls", "abcd", ["abcx"]) == pytest.approx(0.75)
    assert metrics.score("choice", "a dog", ["B"], ["a cat", "a dog"]) == 1.0
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        metrics.score("bleu", "x", ["x"])
    assert metrics.is_binary("exact") and metrics.is_binary("exact+choice") and not metrics.is_binary("exact+vqa")
