"""The evaluation harness: its metrics (recall, KL, kept tokens, attention on the asked cell), its data
(JSONL rows, image ablations), its outputs, and a re-run of a slice of the committed docs/evaluation."""

import json
import pathlib

import numpy as np
import pytest
from _helpers import JSONL_ROWS, assert_scored_by_row_metrics, write_jsonl

import vkv_jax
from vkv_jax.evaluation import data as eval_data
from vkv_jax.evaluation import harness as evaluate
from vkv_jax.evaluation import metrics, results, stats
from vkv_jax.evaluation import report as eval_report
from vkv_jax.testbed import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "evaluation" / "results.json"
COMMITTED_576 = ROOT / "docs" / "evaluation" / "v2" / "results.json"


@pytest.fixture(scope="module")
def tiny(shapes_llava):
    return shapes_llava


@pytest.fixture(scope="module")
def model(shapes_model):
    return shapes_model


def _examples(n):
    return synthetic.make_examples("test", n, config=synthetic.ShapesConfig(image_size=64))


# ----------------------------------------------------------------------------- pure pieces

def test_answer_patch_recall_averages_the_keep_map_over_each_rows_answer_patches():
    keep = np.zeros((2, 2, 6))  # [L, B, num_visual]
    keep[0, 0, [1, 3]] = [1.0, 0.5]
    keep[1, 0, 3] = 0.5
    keep[:, 1] = 1.0
    recall = evaluate.answer_patch_recall(keep, [[1, 3], []])
    np.testing.assert_allclose(recall[:, 0], [0.75, 0.25])
    assert np.isnan(recall[:, 1]).all()  # no answer patches: undefined, not 1


@pytest.mark.parametrize("text,want", [("Red.", "red"), ("  Red  circle ", "red circle"), ("", ""),
                                       ("3 objects.", "3 objects")])
def test_normalize_answer_keeps_every_word(text, want):
    assert metrics.normalize_answer(text) == want


def test_compression_grid_puts_full_first_once():
    grid = evaluate.compression_grid(["snapkv", "full"], [0.1, 0.5])
    assert [(c.name, c.budget) for c in grid] == [("full", None), ("snapkv", 0.1), ("snapkv", 0.5)]


def test_compression_grid_leaves_out_budgets_a_method_rejects_and_says_why():
    rejected = {}
    grid = evaluate.compression_grid(["csp"], [0.05, 0.2], rejected=rejected)
    assert [(c.name, c.budget) for c in grid] == [("csp", 0.2)]
    assert list(rejected) == ["csp@0.05"] and "recent_ratio" in rejected["csp@0.05"]
    with pytest.raises(ValueError, match="unknown compression method"):
        evaluate.compression_grid(["nope"], [0.1])


def test_kl_divergence_is_zero_on_itself_and_matches_the_formula():
    p, q = np.log([[0.5, 0.25, 0.25]]), np.log([[0.25, 0.25, 0.5]])
    np.testing.assert_allclose(evaluate.kl_divergence(p, p), [0.0])
    np.testing.assert_allclose(evaluate.kl_divergence(p, q), [0.5 * np.log(2) + 0.25 * np.log(0.5)])


def test_table_is_markdown_with_one_row_per_run_and_a_column_per_question_type():
    r = results.Result("snapkv", 0.1, 4, 0.25, {"count": 0.5, "shape_at": 0.0}, 1.0, 0.5, 1024.0, 2048.0, [],
                        kl_first_token=0.125, kept_text=3.0, kept_vision=6.5)
    head, rule, row = results.table([r]).splitlines()
    assert head.split(" | ")[4:6] == ["shape_at", "count"]  # QTYPES order, not alphabetical
    assert [c.strip() for c in row.strip("|").split("|")] == \
        ["snapkv", "0.1", "0.250", "0.05–0.70", "0.000", "0.500", "1.000", "0.1250", "0.500", "6.5", "3.0", "50.0%"]


def test_cell_attention_sums_the_asked_patches_of_the_image_tokens_in_order():
    img = 7
    ids = np.array([[0, 1, img, img, img, img, 2]])  # visual tokens 0..3 sit at slots 2..5
    attention = np.array([[0.0, 0.1, 0.05, 0.3, 0.15, 0.1, 0.3]])
    mass, uniform, visual = evaluate.cell_attention(attention, ids, img, [[1, 2]])
    np.testing.assert_allclose(mass, [0.45])
    np.testing.assert_allclose(uniform, [0.5])
    np.testing.assert_allclose(visual, [0.6])


def test_limit_has_the_deprecated_alias_n():
    assert evaluate.build_parser().parse_args(["--n", "3"]).limit == 3


# ----------------------------------------------------------------------------- data

def _png(path, size):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1] + (3,), 120, np.uint8)).save(path)


def test_load_jsonl_resolves_images_next_to_the_file_and_keeps_optional_qtype(tmp_path):
    _png(tmp_path / "img" / "a.png", (50, 30))
    rows = [{"image": "img/a.png", "question": "what is it?", "answer": "Cup", "qtype": "objects"},
            {"image": "img/a.png", "question": "colour?", "answer": "grey"}]
    (tmp_path / "b.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    items = eval_data.load_jsonl(tmp_path / "b.jsonl")
    assert [(i.question, i.answer, i.qtype, i.answer_cells) for i in items] == \
        [("what is it?", "Cup", "objects", ()), ("colour?", "grey", None, ())]
    assert items[0].image == str(tmp_path / "img" / "a.png")
    assert len(eval_data.load_jsonl(tmp_path / "b.jsonl", limit=1)) == 1


@pytest.mark.parametrize("line,error,match", [
    ("{not json", ValueError, r"b\.jsonl:2: not valid JSON"),
    ('["a", "b"]', ValueError, r"b\.jsonl:2: a row must be a JSON object"),
    ('{"image": "a.png", "question": "q?"}', ValueError, r"b\.jsonl:2: 'answer' must be a non-empty string"),
    ('{"image": "a.png", "question": "q?", "answer": "x", "qtype": 3}', ValueError, r"b\.jsonl:2: 'qtype'"),
    ('{"image": "gone.png", "question": "q?", "answer": "x"}', FileNotFoundError, r"b\.jsonl:2: image 'gone\.png'"),
    ('{"image": "bad.png", "question": "q?", "answer": "x"}', ValueError,
     r"b\.jsonl:2: image 'bad\.png' is not an image"),
    ('{"image": "a.png", "question": "q?", "answer": "x", "metric": "bleu"}', ValueError,
     r"b\.jsonl:2: unknown metric 'bleu'"),
    ('{"image": "a.png", "question": "q?", "answer": "x", "metric": 3}', ValueError, r"b\.jsonl:2: 'metric'"),
    ('{"image": "a.png", "question": "q?", "answers": "x"}', ValueError,
     r"b\.jsonl:2: 'answers' must be a list of at least 1 non-empty strings"),
    ('{"image": "a.png", "question": "q?", "answers": []}', ValueError, r"b\.jsonl:2: 'answers' must be a list"),
    ('{"image": "a.png", "question": "q?", "answers": ["x", 2]}', ValueError, r"b\.jsonl:2: 'answers' must be a list"),
    ('{"image": "a.png", "question": "q?", "answer": "x", "answers": ["x"]}', ValueError, r"b\.jsonl:2: .*not both"),
    ('{"image": "a.png", "question": "q?", "answer": "x", "choices": ["x"]}', ValueError,
     r"b\.jsonl:2: 'choices' must be a list of 2 to 26"),
    ('{"image": "a.png", "question": "q?", "answer": "E", "choices": ["x", "y"]}', ValueError,
     r"b\.jsonl:2: the multiple-choice answer 'E' must be one of A\.\.B or an option's text"),
    ('{"image": "a.png", "question": "q?", "answer": "cat", "metric": "choice"}', ValueError,
     r"b\.jsonl:2: the multiple-choice answer 'cat' must be a letter"),
    ('{"image": "a.png", "question": "q?", "answer": "x", "choices": ["x", "y"], "metric": "vqa"}', ValueError,
     r"b\.jsonl:2: a row with 'choices' is scored by the metric 'choice'"),
])
def test_load_jsonl_names_the_line_of_a_bad_row(tmp_path, line, error, match):
    _png(tmp_path / "a.png", (8, 8))
    (tmp_path / "bad.png").write_text("not a png")
    (tmp_path / "b.jsonl").write_text('{"image": "a.png", "question": "q?", "answer": "x"}\n' + line + "\n")
    with pytest.raises(error, match=match):
        eval_data.load_jsonl(tmp_path / "b.jsonl")
    with pytest.raises(error, match=match):  # also past --limit: nothing runs on a file with a bad line
        eval_data.load_jsonl(tmp_path / "b.jsonl", limit=1)


def test_load_jsonl_reads_references_choices_and_metrics(tmp_path):
    _png(tmp_path / "a.png", (8, 8))
    rows = [{"image": "a.png", "question": "colour?", "answers": ["red", "dark red"]},
            {"image": "a.png", "question": "what is shown?", "choices": ["a cat", "a dog"], "answer": "a dog"},
            {"image": "a.png", "question": "which? A. x B. y", "answer": "b", "metric": "choice", "qtype": "mc"},
            {"image": "a.png", "question": "total?", "answer": "$1,200", "metric": "anls"}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = eval_data.load_jsonl(tmp_path / "b.jsonl")
    assert [(i.metric, i.references) for i in items] == \
        [("exact", ("red", "dark red")), ("choice", ("B",)), ("choice", ("B",)), ("anls", ("$1,200",))]
    assert items[1].question == ("what is shown?\nA. a cat\nB. a dog\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert items[1].choices == ("a cat", "a dog") and items[2].question == rows[2]["question"]
    assert eval_data.metric_name(items) == "exact+anls+choice"
    # --metric is the default of rows that name none and have no choices
    assert [i.metric for i in eval_data.load_jsonl(tmp_path / "b.jsonl", metric="vqa")] == \
        ["vqa", "choice", "choice", "anls"]
    with pytest.raises(ValueError, match="--metric 'bleu' is unknown"):
        eval_data.load_jsonl(tmp_path / "b.jsonl", metric="bleu")
    ex = _examples(1)[0]  # the testbed's questions: exact match of their one answer
    assert eval_data.scoring(ex) == ("exact", (ex.answer,), ())


def test_load_jsonl_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        eval_data.load_jsonl(tmp_path / "nope.jsonl")


def test_ablated_images_blank_is_background_grey_and_shuffled_rolls_by_one():
    images = ["a", "b", "c"]
    assert synthetic.ablated_images(images, "shuffled", 16) == ["b", "c", "a"]
    blank = synthetic.ablated_images(images, "blank", 16)
    assert len(blank) == 3 and blank[0].shape == (16, 16, 3) and (blank[0] == synthetic.BACKGROUND).all()
    with pytest.raises(ValueError, match="unknown image ablation"):
        synthetic.ablated_images(images, "noise", 16)


def test_question_only_baseline_counts_training_questions_of_the_same_config():
    exs = _examples(6)
    base = evaluate.question_only(exs, synthetic.ShapesConfig(image_size=64), train_questions=300)
    assert base["train_questions"] == 300 and 0.0 <= base["accuracy"] <= 1.0
    assert set(base["accuracy_by_type"]) == {e.qtype for e in exs}


# ----------------------------------------------------------------------------- on a tiny random model

def test_suffix_protocol_with_the_full_cache_equals_plain_generation(model):
    """Feeding the prompt's last tokens through decode steps after a (non-)compression must give what a
    plain prefill of the whole prompt gives — so any difference under a method comes from its eviction."""
    exs = _examples(3)
    inputs = model.prepare([e.image for e in exs], [e.question for e in exs])
    plain = vkv_jax.generate(model, inputs, 3).text
    out = evaluate._answer(model, inputs, vkv_jax.Compression("full"), 3, suffix=2)
    assert out.texts == plain and out.kv_bytes == out.kv_bytes_full


def test_first_token_logprobs_are_the_full_prompts_next_token_distribution(model):
    import jax

    exs = _examples(3)
    inputs = model.prepare([e.image for e in exs], [e.question for e in exs])
    logits = model.logits(inputs.input_ids, inputs.pixel_values, inputs.valid)[:, -1]
    want = np.asarray(jax.nn.log_softmax(logits))
    for suffix in (0, 2):
        got = evaluate._answer(model, inputs, vkv_jax.Compression("full"), 2, suffix=suffix).logprobs
        np.testing.assert_allclose(got, want, atol=2e-4)


def test_kl_is_zero_for_full_and_positive_when_eviction_changes_the_distribution(model):
    full, snap = evaluate.evaluate(model, _examples(4), evaluate.compression_grid(["full", "snapkv"], [0.05]),
                                   batch_size=4, max_new_tokens=2, progress=False)
    assert full.kl_first_token == 0.0 and full.agreement_with_full == 1.0
    assert snap.kl_first_token > 1e-3


def test_kept_tokens_are_the_compressed_layouts_live_slots_by_tag(model):
    from vkv_jax import cache as cache_lib

    exs = _examples(4)
    inputs = model.prepare([e.image for e in exs], [e.question for e in exs])
    comp = vkv_jax.Compression("snapkv", budget=0.25)
    lay = evaluate._answer(model, inputs, comp, 2, suffix=2).layout
    live = (np.arange(lay["pos"].shape[-1]) < lay["length"][..., None]) & (lay["pos"] >= 0)  # [L, B, H, C]
    vision = (live & (lay["tag"] == cache_lib.VISION)).sum(-1).mean()
    text = (live & (lay["tag"] == cache_lib.TEXT)).sum(-1).mean()
    (r,) = evaluate.evaluate(model, exs, [comp], batch_size=4, max_new_tokens=2, progress=False)
    assert r.kept_vision == pytest.approx(vision) and r.kept_text == pytest.approx(text)
    assert 0 < r.kept_vision < 64


def test_layer_attention_matches_transformers_output_attentions(tiny, model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tiny), attn_implementation="eager").eval()
    exs = _examples(3)
    inputs = model.prepare([e.image for e in exs], [e.question + " and more words" * i for i, e in enumerate(exs)])
    ours = evaluate.layer_attention(model.params, model.config, inputs.input_ids, inputs.valid,
                                    inputs.pixel_values)
    valid = inputs.valid
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(inputs.input_ids, dtype=torch.long),
                 attention_mask=torch.tensor(valid, dtype=torch.long),
                 position_ids=torch.tensor(np.where(valid, np.cumsum(valid, 1) - 1, 1), dtype=torch.long),
                 pixel_values=torch.tensor(inputs.pixel_values), output_attentions=True)
    theirs = np.stack([a[:, :, -1].mean(1).numpy() for a in out.attentions])  # [L, B, S]
    assert (~valid).any()  # left padding is exercised
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5)


def test_cli_writes_results_table_and_plots_with_checks(tiny, tmp_path, recwarn):
    out = tmp_path / "out"
    rc = evaluate.main(["--model", str(tiny), "--limit", "4", "--methods", "full,snapkv", "--budgets", "0.25",
                        "--protocols", "pre-template", "--batch-size", "4", "--max-new-tokens", "2",
                        "--prior-questions", "100", "--out", str(out)])
    assert rc == 0
    assert not [str(w.message) for w in recwarn if "matplotlib" in w.filename or issubclass(w.category, UserWarning)]
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["limit"] == 4 and data["config"]["suffix"] == 2 and data["config"]["model"] == str(tiny)
    full, snap = data["results"]
    assert full["method"] == "full" and full["kv_bytes"] == pytest.approx(full["kv_bytes_full"])
    assert full["answer_patch_recall"] == pytest.approx(1.0) and full["agreement_with_full"] == 1.0
    assert full["kl_first_token"] == 0.0 and full["kept_vision"] == 64.0
    assert 0.1 < snap["kv_fraction"] < 0.4 and snap["answer_patch_recall"] < 1.0 and snap["kept_vision"] < 64
    assert full["n"] == 4 and len(snap["answers"]) == 4
    assert full["accuracy"] == np.mean([a == g for a, g in zip(full["answers"], data["gold"])])
    assert set(data["ablations"]) == {"blank", "shuffled"} and len(data["ablations"]["blank"]["answers"]) == 4
    assert data["question_only_baseline"]["train_questions"] == 100
    assert data["attention"]["questions"] == 2 and data["attention"]["uniform_mass"] == pytest.approx(1 / 64)
    by_layer = data["attention"]["times_uniform_by_layer"]
    assert len(by_layer) == 2 and by_layer[-1] == pytest.approx(data["attention"]["times_uniform"], abs=1e-3)
    md = (out / "results.md").read_text()
    assert "| snapkv | 0.25 |" in md and "blank" in md and "Question-only baseline" in md and "× uniform" in md
    for png in ("accuracy_vs_budget.png", "accuracy_vs_kv.png"):
        assert (out / png).stat().st_size > 1000


def test_cli_runs_a_jsonl_benchmark_of_odd_sized_images_with_every_metric(tiny, tmp_path):
    data_file = write_jsonl(tmp_path)
    out = tmp_path / "out"
    rc = evaluate.main(["--model", str(tiny), "--data", str(data_file), "--methods", "full",
                        "--protocols", "pre-template,template", "--no-references",
                        "--batch-size", "4", "--max-new-tokens", "2", "--ablations", "blank", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    full, full_template = data["results"]
    assert full["answers"] == full_template["answers"] and full_template["protocol"] == "template"
    assert full["answer_patch_recall"] is None and full["accuracy_by_type"].keys() == {"colour"}
    assert data["gold"] == ["red", "no", "circle", "b"] and list(data["ablations"]) == ["blank"]
    assert data["question_only_baseline"] is None and data["attention"] is None
    assert data["config"]["metric"] is None and full["metric"] == "exact+vqa+anls+choice"
    assert data["questions"][3]["choices"] == ["a circle", "a square"] and data["questions"][3]["answers"] == ["B"]
    assert data["questions"][3]["question"].startswith("which shape is it?\nA. a circle\nB. a square\n")
    assert_scored_by_row_metrics(data)
    md = (out / "results.md").read_text()
    assert "Accuracy is the mean over the questions of each row's own metric (exact match, VQAv2 soft " in md
    assert "McNemar tests count a question as right when it scores at least 0.5" in md


def test_cli_scores_the_shipped_models_answers_by_each_rows_metric(tmp_path):
    """The shipped tiny-llava answers testbed questions right; rows built from their gold answers score the
    hand-worked values: exact 1, VQA with 2 of 10 humans 0.6, ANLS against gold + "s" 1 - 1 / (len + 1),
    and a multiple-choice row 0 (with its options listed the tiny model answers nothing)."""
    from PIL import Image

    model = vkv_jax.load("tiny-llava")
    exs = eval_data.shapes("test", 6, evaluate.shapes_config(model))
    picked = [exs[1], exs[2], exs[4], exs[5]]
    for i, e in enumerate(picked):
        Image.fromarray(e.image).save(tmp_path / f"{i}.png")
    gold = [e.answer for e in picked]
    rows = [{"image": "0.png", "question": picked[0].question, "answer": gold[0], "metric": "exact"},
            {"image": "1.png", "question": picked[1].question, "answers": [gold[1]] * 2 + ["zzz"] * 8},  # --metric
            {"image": "2.png", "question": picked[2].question, "answers": [gold[2] + "s"], "metric": "anls"},
            {"image": "3.png", "question": picked[3].question, "choices": ["zzz", gold[3]], "answer": gold[3]}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = evaluate.main(["--model", "tiny-llava", "--data", str(tmp_path / "b.jsonl"), "--metric", "vqa",
                        "--methods", "full,snapkv", "--budgets", "0.5", "--protocols", "pre-template",
                        "--batch-size", "4", "--max-new-tokens", "2", "--ablations", "", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    full, snap = data["results"]
    assert full["texts"][:3] == gold[:3] and full["texts"][3] == ""
    want = [1.0, 0.6, 1 - 1 / (len(gold[2]) + 1), 0.0]
    np.testing.assert_allclose(full["scores"], want)
    assert full["accuracy"] == pytest.approx(np.mean(want)) and snap["method"] == "snapkv"
    assert data["config"]["metric"] == "vqa" and full["metric"] == "exact+vqa+anls+choice"
    assert_scored_by_row_metrics(data)


def test_soft_scores_count_as_right_for_paired_tests_from_one_half():
    rows = [eval_data.Item("a.png", "q", "yes", answers=("yes",) * 2 + ("no",) * 8, metric="vqa"),
            eval_data.Item("a.png", "q", "yes", answers=("yes",) + ("no",) * 9, metric="vqa"),
            eval_data.Item("a.png", "q", "abcd", metric="anls"), eval_data.Item("a.png", "q", "abcd", metric="anls")]
    texts = ["yes", "yes", "abcx", "abxy"]
    np.testing.assert_allclose(evaluate.question_scores(rows, texts), [0.6, 0.3, 0.75, 0.0])
    np.testing.assert_array_equal(evaluate.correct_answers(rows, texts), [True, False, True, False])
    soft = results.Result("full", None, 4, 0.4125, {}, 1.0, None, 1.0, 1.0, [], metric="vqa+anls")
    assert soft.ci95 == stats.wilson(1.65, 4) != stats.wilson(2, 4)


def test_cli_reports_bad_arguments_without_a_traceback(tmp_path, capsys):
    assert evaluate.main(["--data", str(tmp_path / "none.jsonl")]) == 2
    assert evaluate.main(["--ablations", "noise"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert evaluate.main(["--metric", "vqa"]) == 2  # the shapes testbed
    assert "--metric vqa needs --data FILE.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--data", str(write_jsonl(tmp_path)), "--metric", "bleu"])
    assert e.value.code == 2 and "argument --metric: invalid choice: 'bleu'" in capsys.readouterr().err


def test_cli_stops_on_a_bad_line_before_loading_the_model(tmp_path, capsys, monkeypatch):
    rows = [*JSONL_ROWS, {"image": "0.png", "question": "q?", "answer": "x", "metric": "bleu"}]
    monkeypatch.setattr(vkv_jax, "load", lambda *a, **k: pytest.fail("the model loaded before the file was checked"))
    assert evaluate.main(["--data", str(write_jsonl(tmp_path, rows)), "--limit", "1", "--out", str(tmp_path)]) == 2
    assert "b.jsonl:5: unknown metric 'bleu'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the committed figures

@pytest.mark.parametrize("committed", [COMMITTED, COMMITTED_576], ids=["tiny-llava", "tiny-llava-576"])
def test_committed_evaluation_reproduces_on_a_slice(committed):
    """docs/evaluation/results.json (and v2/ for the 576-token model) is what the code produces: the first 8
    questions under full, SnapKV and AirCache at their committed (solved) budgets give the committed
    answers, in two protocols."""
    from vkv_jax import default_model

    if not committed.exists():
        pytest.skip(f"no {committed.relative_to(ROOT)} committed")
    data = json.loads(committed.read_text())
    cfg = data["config"]
    name = default_model.DEFAULT.name if cfg["model"] == "default" else cfg["model"]
    if not default_model.is_shipped(name):
        pytest.skip(f"{committed.relative_to(ROOT)} was made with model {cfg['model']!r}, not a shipped one")
    if cfg["model_sha256"] != eval_report.weights_digest(default_model.SHIPPED_MODELS[name].directory):
        pytest.skip(f"{committed.relative_to(ROOT)} was made with other weights than the shipped model's: "
                    "regenerate it (command in docs/evaluation/README.md)")
    assert cfg["data"] == "shapes"
    n = 8
    model = vkv_jax.load(name)
    examples = eval_data.shapes(cfg["split"], n, evaluate.shapes_config(model))
    assert [e.question for e in examples] == [q["question"] for q in data["questions"][:n]]
    checked = 0
    for protocol in ("pre-template", "template"):
        runs = [r for r in data["results"] if r["protocol"] == protocol
                and r["method"] in ("full", "snapkv", "aircache") and r["target"] in (None, 0.2)]
        assert len(runs) == 3, f"expected full, snapkv and aircache at 20% under {protocol}"
        runner = evaluate.Runner(model, examples, batch_size=n, max_new_tokens=cfg["max_new_tokens"],
                                 protocol=protocol, suffix=cfg["suffix"], progress=False)
        for r in runs:
            got = runner.run(vkv_jax.Compression(r["method"], budget=r["budget"]))
            assert got.answers == r["answers"][:n], (protocol, r["method"], r["budget"])
            checked += 1
    assert checked == 6
