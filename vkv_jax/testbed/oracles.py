"""Idealised readers of testbed v3 that bound what a compressed visual KV can answer, computed on the data.

These are not models: each reader is handed an exact, generous summary of what a compression keeps and
answers as well as that summary allows (expected exact match per question, in closed form).

* `question_only`: the answer prior of `baselines.question_only_predictions` (no image).
* `random_visual(keep)`: a random `keep` share of the visual tokens survives, read exactly. A question is
  right when every evidence patch survives (probability C(P-m, K-m) / C(P, K) for m evidence patches), and
  otherwise gets the question-only guess. Text + random visual tokens at that share can do little better.
* `pooled(k)`: average pooling to k x k blocks, idealised as a reader that knows the exact contents of
  every block (which items, which label letters, how many items, where the label tags are) but not where
  inside its block each one sits. Real average pooling of keys and values mixes the contents too, so a
  model reading pooled KV should score below this reader.

`report(examples, train_questions)` gives all of them per question type (`python -m vkv_jax.testbed.oracles`).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import numpy as np

from vkv_jax.testbed import baselines
from vkv_jax.testbed import finegrained as F


def keep_probability(m: int, keep: int, total: int) -> float:
    """Probability that `m` given patches all survive when `keep` of `total` are kept uniformly at random."""
    if m > keep:
        return 0.0
    return math.prod((keep - i) / (total - i) for i in range(m))


def random_visual(examples: Sequence[F.FineExample], prior_hits: Sequence[bool], keep_share: float,
                  config: F.FineConfig = F.TESTBED_V3) -> list[float]:
    """Expected exact match per example with `keep_share` of the visual tokens kept at random (one
    token per cell): evidence all kept -> right, else the question-only guess (`prior_hits`)."""
    total = config.grid * config.grid
    keep = round(keep_share * total)
    out = []
    for e, prior in zip(examples, prior_hits, strict=True):
        p = keep_probability(len(set(e.answer_cells)), keep, total)
        out.append(p + (1 - p) * float(prior))
    return out


def _block(cell, k):
    return cell[0] // k, cell[1] // k


def _orderings(letters) -> int:
    """Distinct orders of a multiset of letters."""
    n = math.factorial(len(letters))
    for c in collections.Counter(letters).values():
        n //= math.factorial(c)
    return n


def _count_pmf(ns: Sequence[int], p: float) -> np.ndarray:
    """Distribution of a sum of Binomial(n, p) over `ns`."""
    pmf = np.ones(1)
    for n in ns:
        pmf = np.convolve(pmf, [math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(n + 1)])
    return pmf


def pooled_score(e: F.FineExample, k: int, config: F.FineConfig = F.TESTBED_V3) -> float:
    """Expected exact match of the k x k pooled-content reader on one example (see the module doc)."""
    g = config.grid
    label_cells = {c: lab for lab in e.labels for c in lab.cells()}
    by_block = collections.defaultdict(list)
    for o in e.objects:
        by_block[_block((o.row, o.col), k)].append(o)
    p = e.params
    if e.qtype == "item_at":
        cell = (p["row"], p["col"])
        b = _block(cell, k)
        cells_in_b = [(r, c) for r in range(b[0] * k, min(g, b[0] * k + k))
                      for c in range(b[1] * k, min(g, b[1] * k + k))]
        n_free = g * g - len(label_cells)
        # the generator asks an item's cell 3 times in 4, else any non-label cell: the posterior of each
        # answer among this block's contents
        w = collections.Counter()
        for o in by_block[b]:
            w[f"{o.colour} {o.shape}"] += 0.75 / len(e.objects) + 0.25 / n_free
        empty = sum(c not in label_cells for c in cells_in_b) - len(by_block[b])
        w[F.NONE] += empty * 0.25 / n_free
        best = max(w.values())
        top = [a for a, v in w.items() if v == best]
        return float(e.answer in top) / len(top)
    if e.qtype == "find_item":  # the block is known, the place inside it is not: one of its items
        (cell,) = e.answer_cells
        return 1.0 / len(by_block[_block(cell, k)])
    if e.qtype == "label_letter":  # the letters of this label in the asked letter's block, order unknown
        (cell,) = e.answer_cells
        lab = label_cells[cell]
        same = [lab.text[i] for i, c in enumerate(lab.cells()) if _block(c, k) == _block(cell, k)]
        return same.count(e.answer) / len(same)
    if e.qtype in ("read_label", "read_all"):  # each block's letters of a label known, their order not
        score = 1.0
        for lab in (e.labels if e.qtype == "read_all" else [label_cells[e.answer_cells[0]]]):
            parts = collections.defaultdict(list)
            for letter, c in zip(lab.text, lab.cells()):
                parts[_block(c, k)].append(letter)
            score /= math.prod(_orderings(v) for v in parts.values())
        return score
    if e.qtype == "count_in_row":
        # the band of k rows is known block by block (how many items each block holds), not each item's
        # row: the best guess is the mode of the count given the row holds at least one item
        row = p["row"]
        band = [len(v) for b, v in by_block.items() if b[0] == row // k]
        rows_in_band = min(g, (row // k) * k + k) - (row // k) * k
        pmf = _count_pmf(band, 1.0 / rows_in_band)
        pmf[0] = 0.0
        top = np.flatnonzero(pmf == pmf.max())
        return float(int(e.answer) in top) / len(top)
    if e.qtype == "relative_near":  # right when the two items' blocks differ along the asked axis
        a, b = e.answer_cells
        axis = 1 if p["axis"] == "lr" else 0
        return 1.0 if a[axis] // k != b[axis] // k else 0.5
    raise ValueError(f"unknown question type {e.qtype!r}")


def summary(examples, scores) -> dict[str, float]:
    by_type = collections.defaultdict(list)
    for e, s in zip(examples, scores, strict=True):
        by_type[e.qtype].append(s)
    return baselines.exact_match_summary(by_type)


def report(examples: Sequence[F.FineExample], train_questions: int = 20000, config: F.FineConfig = F.TESTBED_V3,
           seed: int = 0, keep_shares=(0.05, 0.1, 0.2), pools=(2, 3, 4)) -> dict[str, dict[str, float]]:
    """{reader: {qtype: expected exact match, "all": ...}} on `examples` (question-only prior counted over
    `train_questions` training questions)."""
    train = F.make_examples("train", train_questions, config=config, seed=seed, with_image=False)
    preds = baselines.question_only_predictions(baselines.question_columns(train), baselines.question_columns(examples))
    prior = [p == e.answer for p, e in zip(preds, examples)]
    out = {"question_only": summary(examples, [float(h) for h in prior])}
    for share in keep_shares:
        out[f"random_visual_{share:g}"] = summary(examples, random_visual(examples, prior, share, config))
    for k in pools:
        out[f"pooled_{k}x{k}"] = summary(examples, [pooled_score(e, k, config) for e in examples])
    return out


def main(argv=None):
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m vkv_jax.testbed.oracles", description=__doc__)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=1000, help="questions (examples 0..n-1 of --split)")
    ap.add_argument("--train-questions", type=int, default=20000, help="training questions for the prior")
    args = ap.parse_args(argv)
    exs = F.make_examples(args.split, args.n, with_image=False)
    r = report(exs, args.train_questions)
    for name, row in r.items():
        print(json.dumps({"reader": name, **row}))
    return r


if __name__ == "__main__":
    main()
