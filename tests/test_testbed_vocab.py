"""Facts about the testbed's closed word-level vocabulary (vkv_jax.testbed.vocab)."""

from vkv_jax.testbed import synthetic, vocab


def test_no_unk_over_1000_sampled_questions_and_answers():
    tok = vocab.build_tokenizer()
    unk = tok.token_to_id(vocab.UNK)
    for ex in synthetic.make_examples("train", 1000, config=synthetic.ShapesConfig(image_size=64)):
        ids = tok.encode(f"USER: <image>\n{ex.question} ASSISTANT: {ex.answer}").ids
        assert unk not in ids, ex.question
        assert len(tok.encode(ex.answer, add_special_tokens=False).ids) == 1  # single-word answers


def test_tokenizer_lowercases_splits_punctuation_and_prepends_bos(tmp_path):
    tok = vocab.build_tokenizer()
    enc = tok.encode("USER: <image>\nWhat color is the CIRCLE?")
    assert enc.tokens == ["<s>", "user", ":", "<image>", "what", "color", "is", "the", "circle", "?"]
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    again = type(tok).from_file(str(path))
    assert again.encode("is there a red cross?").ids == tok.encode("is there a red cross?").ids
    assert tok.get_vocab() == vocab.build_tokenizer().get_vocab()  # ids are stable
