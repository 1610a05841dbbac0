"""The shipped tiny LLaVAs (`vkv_jax/testbed/assets/<name>`, `default_model.SHIPPED_MODELS`): the default
one is the default of `vkv_jax.load()`; each loads by name, cross-loads in transformers with the same
greedy answers, reads its image, and its exact match on a fixed test slice of its own testbed has not
regressed below the figure recorded in `default_model`."""

import pytest

import vkv_jax
from vkv_jax import default_model
from vkv_jax.testbed import synthetic as S
from vkv_jax.testbed import train as T

pytestmark = pytest.mark.skipif(not default_model.is_shipped(), reason="no trained model shipped")

SLICE = 300  # test examples 0..299
MARGIN = 0.03  # the slice is not the 1000 examples the figure was measured on


NAMES = [name for name in default_model.SHIPPED_MODELS if default_model.is_shipped(name)]


@pytest.fixture(scope="module", params=NAMES)
def shipped(request):
    """(the ShippedModel record, the model loaded by its name)."""
    return default_model.SHIPPED_MODELS[request.param], vkv_jax.load(request.param)


def test_default_load_is_the_shipped_model():
    model = vkv_jax.load()
    assert model.path == str(default_model.SHIPPED)
    assert model.config.num_image_tokens == 64
    assert default_model.SHIPPED_TEST_EXACT_MATCH is not None


def test_shipped_model_answers_like_transformers(shipped):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    record, model = shipped
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(record.directory)).eval()
    scfg = S.config_for_model(model.path, model.config.vision.image_size)
    exs = S.make_examples("test", 20, config=scfg)
    inputs = model.prepare(images=[e.image for e in exs], prompts=[e.question for e in exs])
    ours = vkv_jax.generate(model, inputs, max_new_tokens=4)
    tok = model.tokenizer
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(inputs.input_ids, dtype=torch.long),
                          attention_mask=torch.tensor(inputs.valid, dtype=torch.long),
                          pixel_values=torch.tensor(inputs.pixel_values), max_new_tokens=4, do_sample=False,
                          eos_token_id=sorted(tok.eos_ids), pad_token_id=tok.pad_id)
    theirs = [tok.decode([t for t in row if t not in tok.eos_ids and t != tok.pad_id]).strip()
              for row in out[:, inputs.input_ids.shape[1]:].numpy()]
    assert [t.strip() for t in ours.text] == theirs


def test_shipped_model_test_exact_match_has_not_regressed(shipped):
    record, _ = shipped
    r = T.evaluate_checkpoint(str(record.directory), "test", SLICE)
    em = r["exact_match"]["all"]
    assert em >= record.test_exact_match - MARGIN, r["exact_match"]
    assert em > record.question_only_baseline + 0.05


def test_shipped_model_reads_the_image(shipped):
    """Each question asked about another test image, or about a blank one: accuracy falls to about the
    question-only level, far below the real-image figure."""
    record, _ = shipped
    real = T.evaluate_checkpoint(str(record.directory), "test", 100)["exact_match"]["all"]
    for images in ("shuffled", "blank"):
        other = T.evaluate_checkpoint(str(record.directory), "test", 100, images=images)["exact_match"]["all"]
        assert other < real - 0.3 and other < record.question_only_baseline + 0.1, (images, other)


def test_shipped_models_load_by_name():
    from vkv_jax.cli.common import check_model_dir

    assert default_model.resolve(None) == default_model.resolve("tiny-llava") == str(default_model.SHIPPED)
    assert default_model.resolve("some/folder") == "some/folder"  # not a name: passed through as a path
    check_model_dir("tiny-llava")
    with pytest.raises(FileNotFoundError, match="shipped model's name"):
        check_model_dir("tiny-llava-nope")
    with pytest.raises(ValueError, match="no shipped model named"):
        default_model.path("tiny-llava-nope")
    assert vkv_jax.load("tiny-llava").path == str(default_model.SHIPPED)
