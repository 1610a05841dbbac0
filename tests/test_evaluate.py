"""The evaluation harness: recall of answer patches from a cache layout, and an end-to-end smoke run."""

import json

import numpy as np
import pytest

from vkv_jax import evaluate
from hf_fixtures import make_llava


def test_answer_patch_recall_averages_the_keep_map_over_each_rows_answer_patches():
    keep = np.zeros((2, 2, 6))  # [L, B, num_visual]
    keep[0, 0, [1, 3]] = [1.0, 0.5]
    keep[1, 0, 3] = 0.5
    keep[:, 1] = 1.0
    recall = evaluate.answer_patch_recall(keep, [[1, 3], []])
    np.testing.assert_allclose(recall[:, 0], [0.75, 0.25])
    assert np.isnan(recall[:, 1]).all()  # no answer patches: undefined, not 1


@pytest.mark.parametrize("text,want", [("Red.", "red"), ("  yes it is", "yes"), ("", ""), ("3 objects", "3")])
def test_normalize_answer_takes_the_first_word(text, want):
    assert evaluate.normalize_answer(text) == want


def test_compression_grid_puts_full_first_once():
    grid = evaluate.compression_grid(["snapkv", "full"], [0.1, 0.5])
    assert [(c.name, c.budget) for c in grid] == [("full", None), ("snapkv", 0.1), ("snapkv", 0.5)]


def test_table_lists_every_run():
    r = evaluate.Result("snapkv", 0.1, 4, 0.25, {}, 1.0, 0.5, 1024.0, 2048.0, [])
    lines = evaluate.table([r]).splitlines()
    assert len(lines) == 2 and lines[1].split() == ["snapkv", "0.1", "0.250", "1.000", "0.500", "50.0%"]


def test_cli_smoke_writes_json_and_plot(tmp_path):
    make_llava(tmp_path / "m", image_size=64, num_heads=4, num_kv_heads=2)
    out = tmp_path / "out"
    rc = evaluate.main(["--model", str(tmp_path / "m"), "--n", "4", "--methods", "full,snapkv",
                        "--budgets", "0.25", "--batch-size", "4", "--max-new-tokens", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "evaluation.json").read_text())
    full, snap = data["results"]
    assert full["method"] == "full" and full["kv_bytes"] == pytest.approx(full["kv_bytes_full"])
    assert full["answer_patch_recall"] == pytest.approx(1.0) and full["agreement_with_full"] == 1.0
    assert 0.1 < snap["kv_bytes"] / snap["kv_bytes_full"] < 0.4 and snap["answer_patch_recall"] < 1.0
    assert full["n"] == 4 and len(snap["answers"]) == 4
    assert full["accuracy"] == np.mean([a == g for a, g in zip(full["answers"], data["gold"])])
    assert (out / "accuracy_vs_kv.png").stat().st_size > 1000


def test_suffix_protocol_with_the_full_cache_equals_plain_generation(tmp_path):
    """Feeding the prompt's last tokens through decode steps after a (non-)compression must give what a
    plain prefill of the whole prompt gives — so any difference under a method comes from its eviction."""
    import vkv_jax
    from vkv_jax.testbed import synthetic

    make_llava(tmp_path / "m", image_size=64, num_heads=4, num_kv_heads=2, head_scale=30.0)
    model = vkv_jax.load(tmp_path / "m")
    exs = synthetic.make_examples("test", 3, config=synthetic.ShapesConfig(image_size=64))
    inputs = model.prepare([e.image for e in exs], [e.question for e in exs])
    plain = vkv_jax.generate(model, inputs, 3).text
    texts, _, kv, kv_full = evaluate._answer(model, inputs, vkv_jax.Compression("full"), 3, suffix=2)
    assert texts == plain and kv == kv_full
