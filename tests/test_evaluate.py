"""The evaluation harness: recall of answer patches from a cache layout, and an end-to-end smoke run."""

import json

import numpy as np
import pytest

from vkv_jax import evaluate
from hf_fixtures import make_llava


def test_image_start_positions_discount_left_padding():
    ids = np.array([[0, 0, 5, 9, 9, 7], [5, 6, 9, 9, 7, 7]])
    valid = ids != 0
    np.testing.assert_array_equal(evaluate.image_start_positions(ids, valid, 9), [1, 2])


def test_answer_patch_recall_counts_live_visual_answer_slots_per_layer():
    # one row, image starts at position 2, answer needs visual tokens 1 and 3 (positions 3 and 5)
    L, H, C = 2, 2, 6
    pos = np.full((L, 1, H, C), -1)
    tag = np.zeros((L, 1, H, C), np.int8)
    length = np.zeros((L, 1, H), np.int32)
    layer0 = [[0, 1, 3, 5], [0, 3, 4, 6]]  # head 0 keeps both answer tokens, head 1 keeps one
    layer1 = [[0, 6], [5, 6]]              # head 0 none, head 1 one
    for l, heads in enumerate((layer0, layer1)):
        for h, kept in enumerate(heads):
            pos[l, 0, h, :len(kept)] = kept
            tag[l, 0, h, :len(kept)] = [1 if 2 <= p < 8 else 0 for p in kept]
            length[l, 0, h] = len(kept)
    layout = {"pos": pos, "tag": tag, "length": length}
    recall = evaluate.answer_patch_recall(layout, np.array([2]), [[1, 3]])
    np.testing.assert_allclose(recall[:, 0], [(1.0 + 0.5) / 2, (0.0 + 0.5) / 2])
    # a dead slot (beyond length) does not count
    layout["length"] = np.array([[[3, 4]], [[2, 2]]])
    assert evaluate.answer_patch_recall(layout, np.array([2]), [[1, 3]])[0, 0] == pytest.approx((0.5 + 0.5) / 2)


def test_normalize_answer():
    assert evaluate.normalize_answer(" Red. blue") == "red"
    assert evaluate.normalize_answer("") == ""


def test_cli_smoke_writes_json_and_plot(tmp_path):
    make_llava(tmp_path / "m", image_size=64, num_heads=4, num_kv_heads=2)
    out = tmp_path / "out"
    rc = evaluate.main(["--model", str(tmp_path / "m"), "--n", "4", "--methods", "full,snapkv",
                        "--budgets", "0.25", "--batch-size", "4", "--max-new-tokens", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "evaluation.json").read_text())
    full, snap = data["results"]
    assert full["method"] == "full" and full["kv_fraction"] == pytest.approx(1.0)
    assert full["answer_patch_recall"] == pytest.approx(1.0) and full["agreement_with_full"] == 1.0
    assert 0.1 < snap["kv_fraction"] < 0.4 and snap["answer_patch_recall"] < 1.0
    assert (out / "accuracy_vs_kv.png").stat().st_size > 1000
