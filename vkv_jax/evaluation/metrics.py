"""How one generated answer is scored against its references: the field's per-question metrics, each a pure
function returning a score in [0, 1] (pure python, no dependency).

    exact   `exact_match`: the normalised answer equals a normalised reference (`normalize_answer`)
    vqa     `vqa_accuracy`: VQAv2 soft accuracy over several human answers (Antol et al. 2015 and the
            official evaluation script's answer normalisation)
    anls    `anls`: average normalised Levenshtein similarity, thresholded (DocVQA, ST-VQA)
    choice  `choice_accuracy`: the option letter read from the answer (`extract_choice`) is the reference's

`score(metric, prediction, references, choices)` dispatches by name. exact and choice score 0 or 1
(`BINARY`); vqa and anls give partial credit, which is why the harness reports a mean score and treats
intervals and paired tests of those two apart (`vkv_jax.evaluation.harness`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

METRICS = ("exact", "vqa", "anls", "choice")
BINARY = ("exact", "choice")
TEXT = {"exact": "exact match", "vqa": "VQAv2 soft accuracy", "anls": "ANLS",
        "choice": "multiple-choice letter accuracy"}
LETTERS = string.ascii_uppercase
ANLS_THRESHOLD = 0.5  # DocVQA's tau: a normalised distance at or above it scores 0


def normalize_answer(text: str) -> str:
    """The whole answer in lower case, words joined by one space, punctuation dropped ('Red.' -> 'red',
    ' Red  circle' -> 'red circle'); '' for an empty answer. Exact match compares these."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1 when `normalize_answer(prediction)` equals the normalised form of any reference, else 0."""
    answer = normalize_answer(prediction)
    return float(any(answer == normalize_answer(r) for r in references))


# ----------------------------------------------------------------------------- VQAv2

# The official VQA evaluation script's tables (github.com/GT-Vision-Lab/VQA, vqaEval.py): punctuation,
# number words, articles, and contractions written without their apostrophe. Contractions that are also
# words without it ("its", "ill", "were", "well", "id", "hell", "shell") are left out, as a reasonable
# subset of the script's list.
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!")
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = ("a", "an", "the")
_VQA_CONTRACTIONS = {c.replace("'", ""): c for c in (
    "aren't", "can't", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't", "hasn't", "haven't",
    "he'd", "he'll", "he's", "how'd", "how'll", "how's", "i'd've", "i'm", "i've", "isn't", "it'd", "it'll",
    "let's", "ma'am", "mightn't", "might've", "mustn't", "must've", "needn't", "o'clock", "shan't", "she'd",
    "she'll", "she's", "should've", "shouldn't", "somebody's", "someone's", "something's", "that's", "there's",
    "they'd", "they'll", "they're", "they've", "wasn't", "weren't", "what's", "when's", "where's", "who's",
    "why's", "won't", "would've", "wouldn't", "y'all", "you'd", "you'll", "you're", "you've")}
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # what the script's periodStrip removes: a period not before a digit


def normalize_vqa(text: str) -> str:
    """An answer as the VQA evaluation script compares it: newlines and tabs to spaces; each punctuation
    mark of its list deleted where it touches a space or the text has a digit-comma-digit ("1,000" -> "1000"),
    else replaced by a space; periods not before a digit deleted; lower case; number words to digits
    ("two" -> "2", "none" -> "0"); articles (a, an, the) dropped; contractions given their apostrophe
    ("dont" -> "don't")."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        if p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQAv2 soft accuracy of one answer against its human answers (all through `normalize_vqa`).

    With n >= 10 references (VQAv2, VizWiz and TextVQA give 10): the official script's average over the n
    subsets that leave one reference out of min(1, matches in the subset / 3), so m matches of 10 score
    0.3, 0.6, 0.9 for m = 1, 2, 3 and 1 from 4 on. With fewer than 10: the paper's formula on all of them,
    min(1, m / 3) (leaving one out of fewer than four would make a lone matching reference worth nothing);
    so a single reference scores at most 1/3: give several (OK-VQA's five answers each twice, as its
    official evaluation does) or use exact / anls.
    """
    answer = normalize_vqa(prediction)
    match = [normalize_vqa(r) == answer for r in references]
    m = sum(match)
    if len(match) < 10:
        return min(1.0, m / 3)
    return sum(min(1.0, (m - hit) / 3) for hit in match) / len(match)


# ----------------------------------------------------------------------------- ANLS

def levenshtein(a: str, b: str) -> int:
    """Edit distance: the fewest single-character insertions, deletions and substitutions that turn a
    into b (Wagner-Fischer, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one answer (Biten et al. 2019, DocVQA): the best over references of 1 - NL when NL < threshold,
    else 0, where NL(p, r) = levenshtein(p, r) / max(len(p), len(r)) on the lower-cased, stripped strings
    (two empty strings: NL = 0)."""
    p = prediction.strip().lower()
    best = 0.0
    for ref in references:
        r = ref.strip().lower()
        nl = levenshtein(p, r) / max(len(p), len(r)) if p or r else 0.0
        if nl < threshold:
            best = max(best, 1.0 - nl)
    return best


# ----------------------------------------------------------------------------- multiple choice

_ALONE = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:,]?")  # the whole answer: "B", "b", "(B)", "[b]", "B."
_LEADING = re.compile(r"(?:[(\[]([A-Za-z])[)\]]|([A-Z])[.):,])(?:\s|$)")  # "(b) a cat", "B. a cat", "B) ..."
_STATED = re.compile(r"\b(?i:answer|option|choice)\s*(?:(?i:is)\s*|:\s*)?(?:[(\[]([A-Za-z])[)\]]|([A-Z])\b)")


def extract_choice(text: str, choices: Sequence[str] = ()) -> str | None:
    """The option letter an answer chose (upper case), or None. Tried in order on the stripped text:

    1. the whole answer is one letter, optionally bracketed and followed by . : or , ("b", "(B)", "B.");
    2. it starts with a bracketed letter or a capital letter followed by . ) : or , and then a space or
       the end ("(b) cat", "B. cat", "C) cat");
    3. the first "answer", "option" or "choice" (any case), optionally followed by "is" or ":", then a
       bracketed letter or a capital letter standing alone ("The answer is B", "Answer: (c)", "option D");
    4. with `choices`: the answer is one option's text (compared by `normalize_answer`) -> its letter.
    A lone lower-case letter inside a sentence is never taken ("the answer is a cat" chooses nothing).
    """
    text = text.strip()
    for pattern, match in ((_ALONE, re.fullmatch), (_LEADING, re.match), (_STATED, re.search)):
        found = match(pattern, text)
        if found:
            return next(g for g in found.groups() if g).upper()
    answer = normalize_answer(text)
    named = [LETTERS[i] for i, c in enumerate(choices) if answer and normalize_answer(c) == answer]
    return named[0] if len(named) == 1 else None


def choice_accuracy(prediction: str, references: Sequence[str], choices: Sequence[str] = ()) -> float:
    """1 when the letter `extract_choice` reads from the prediction is one of the reference letters, else 0."""
    letter = extract_choice(prediction, choices)
    return float(letter is not None and letter in {r.strip().upper() for r in references})


# ----------------------------------------------------------------------------- dispatch

def score(metric: str, prediction: str, references: Sequence[str], choices: Sequence[str] = ()) -> float:
    """The `metric` score in [0, 1] of one prediction; ValueError for an unknown metric."""
    if metric == "exact":
        return exact_match(prediction, references)
    if metric == "vqa":
        return vqa_accuracy(prediction, references)
    if metric == "anls":
        return anls(prediction, references)
    if metric == "choice":
        return choice_accuracy(prediction, references, choices)
    raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")


def is_binary(name: str) -> bool:
    """Whether every question of a run scored by `name` (one metric, or several joined by "+") scores 0 or 1."""
    return all(m in BINARY for m in name.split("+"))


def describe(name: str) -> str:
    """A run's metric in words: one metric's name, or the metrics of a file whose rows differ."""
    names = name.split("+")
    if len(names) == 1:
        return TEXT.get(name, name)
    return "each row's own metric (" + ", ".join(TEXT.get(n, n) for n in names) + ")"
