"""`vkv_jax.testbed.train` on testbed v3: per-patch labels read from the example, the grown (deeper) LM
computes what its source LM computed, and a micro v3 run exports a model that `--evaluate` can ask."""

import dataclasses
import json

import numpy as np
import pytest
import safetensors.numpy

from vkv_jax.testbed import finegrained as F
from vkv_jax.testbed import synthetic as S
from vkv_jax.testbed import train as T
from vkv_jax.testbed import vocab as V


def test_v3_patch_labels_name_each_items_colour_and_kind_and_each_label_letter():
    ex = F.make_example(5, "test")
    lab = T.patch_labels(ex, F.TESTBED_V3)
    assert lab.shape == (576, 4)
    for o in ex.objects:
        p = o.row * 24 + o.col
        assert tuple(lab[p]) == (1 + S.COLOUR_NAMES.index(o.colour), 1 + F.KINDS.index(o.shape), o.row, o.col)
    for label in ex.labels:
        for (r, c), letter in zip(label.cells(), label.text):
            assert lab[r * 24 + c, 0] == T.V3_COLOURS - 1
            assert F.LETTERS[lab[r * 24 + c, 1] - 1 - len(F.KINDS)] == letter
    assert (lab[:, 0] > 0).sum() == len(ex.objects) + sum(len(x.text) for x in ex.labels)
    assert T.aux_sizes(F.TESTBED_V3) == {"colour": 8, "shape": 41, "row": 24, "col": 24}
    assert T.aux_sizes(S.TESTBED_V2) == {"colour": 7, "shape": 5, "row": 8, "col": 8}  # v1/v2 heads unchanged


def test_grown_lm_computes_the_source_lms_logits_on_shared_words():
    """tiny-llava's 4-layer LM grown to 8 layers over the v3 vocabulary: on a prompt of words both
    vocabularies hold, the logits of those words are the source model's (the repeats start as identity)."""
    import jax

    import vkv_jax
    from vkv_jax.models import llava
    from vkv_jax.models.loading import random_params

    src = vkv_jax.load("tiny-llava", "float32")
    src_words = [src.tokenizer.id_to_token(i) for i in range(src.tokenizer.vocab_size)]
    dst_words = list(V.vocab_words(F.TESTBED_V3))
    text = dataclasses.replace(src.config.text, num_layers=8, vocab_size=len(dst_words))
    dst_cfg = dataclasses.replace(src.config, text=text, image_token_id=dst_words.index(V.IMAGE))
    grown = T.grow_lm(src.params["lm"], src_words, T.fan_in_init(random_params(dst_cfg, 1))["lm"], dst_words)
    assert len(grown["layers"]) == 8 and not np.any(grown["layers"][1]["o"]) and np.any(grown["layers"][2]["o"])

    words = ["<s>", "user", ":"] + ["<image>"] * 64 + "what is at row 3 column 5 ? assistant :".split()
    ex = S.make_example(0, "test", S.ShapesConfig(image_size=64))
    pixels = T.pixel_values(ex.image[None])
    src_ids = np.array([[src_words.index(w) for w in words]])
    dst_ids = np.array([[dst_words.index(w) for w in words]])
    valid = np.ones_like(src_ids, bool)
    ref = np.asarray(llava.logits(src.params, src.config, src_ids, pixels, valid))
    got = np.asarray(jax.jit(lambda p: llava.logits(p, dst_cfg, dst_ids, pixels, valid))({**src.params, "lm": grown}))
    shared = [w for w in dst_words if w in src_words]
    np.testing.assert_allclose(got[..., [dst_words.index(w) for w in shared]],
                               ref[..., [src_words.index(w) for w in shared]], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="hidden size"):
        T.grow_lm(src.params["lm"], src_words, {**grown, "embed": np.zeros((len(dst_words), 32))}, dst_words)


MICRO = json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                    "vision_hidden_size": 32, "vision_intermediate_size": 64, "vision_layers": 1, "vision_heads": 2})


def test_v3_micro_run_exports_a_v3_model_that_evaluate_asks_v3_questions(tmp_path, capsys):
    out = tmp_path / "run"
    T.main(["--testbed", "v3", "--out", str(out), "--sizes", MICRO, "--s1-steps", "4", "--s1-batch", "4",
            "--s2-steps", "2", "--batch", "2", "--turns", "2", "--train-pool", "8", "--val", "7", "--eval-every", "2",
            "--minutes", "0", "--quiet", "--ground-layer", "1"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    s1 = [r for r in log if r["event"] == "stage1"]
    assert s1 and all("val_acc_occupied" in r for r in s1)
    assert S.config_for_model(out / "final", 192) == F.TESTBED_V3
    r = T.evaluate_checkpoint(str(out / "final"), "test", 7, batch=7)
    assert r["n"] == 7 and len(r["predictions"]) == 7
    assert set(r["exact_match"]) <= set(F.QTYPES) | {"all"}
    # --init starts every weight from that export: with no steps, the run exports the same weights
    again = tmp_path / "again"
    T.main(["--testbed", "v3", "--out", str(again), "--sizes", MICRO, "--init", str(out / "final"), "--s1-steps", "0",
            "--s2-steps", "0", "--train-pool", "8", "--val", "7", "--minutes", "0", "--quiet", "--ground-layer", "1"])
    first, second = (safetensors.numpy.load_file(d / "final" / "model.safetensors") for d in (out, again))
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    capsys.readouterr()
    assert T.main(["--testbed", "v3", "--out", str(tmp_path / "other"), "--init", str(out / "final"), "--s1-steps", "0",
                   "--s2-steps", "0", "--train-pool", "8", "--val", "7", "--minutes", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--init" in err and "config differs" in err
