"""The closed word-level vocabulary of the shapes testbed and its `tokenizers` tokenizer.

Ids are fixed by construction order (special tokens first, then chat-template words, template words,
answers, numbers), so a tokenizer built twice is identical and a saved `tokenizer.json` is stable.
The normaliser lowercases, the pre-tokenizer splits on whitespace and punctuation
(`"circle?"` → `circle`, `?`), special tokens are matched before both (so `<image>` stays one token),
and the post-processor prepends `<s>`.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from . import synthetic

BOS, EOS, PAD, UNK, IMAGE = "<s>", "</s>", "<pad>", "<unk>", "<image>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK, IMAGE)
# Words of a LLaVA-1.5-style chat template ("USER: <image>\n{question} ASSISTANT:"), lowercased.
CHAT_WORDS = ("user", "assistant", ":")


def _template_words(templates) -> list[str]:
    words = []
    for t in templates:
        words += re.findall(r"\w+|[^\w\s]", re.sub(r"\{\w+\}", " ", t))
    return words


def vocab_words(config=None) -> tuple[str, ...]:
    """All words, specials first, without duplicates, in a fixed order (default: the default shapes config).
    A testbed-v3 config (`finegrained.FineConfig`) has its own vocabulary: its template words, colours,
    item kinds (shapes, digits), label letters, answer words and the numbers 0..grid."""
    config = config or synthetic.ShapesConfig()
    if not isinstance(config, synthetic.ShapesConfig):
        from vkv_jax.testbed import finegrained as F

        words = (SPECIAL_TOKENS + CHAT_WORDS + tuple(_template_words(F.TEMPLATES.values())) + synthetic.COLOUR_NAMES
                 + F.answer_vocab(config))
        return tuple(dict.fromkeys(words))
    template_words = _template_words(synthetic.TEMPLATES.values())
    numbers = tuple(str(i) for i in range(max(config.grid, config.max_objects) + 1))
    words = (SPECIAL_TOKENS + CHAT_WORDS + tuple(template_words) + synthetic.SHAPES
             + synthetic.COLOUR_NAMES + synthetic.answer_vocab(config) + numbers)
    return tuple(dict.fromkeys(words))


def build_tokenizer(config: synthetic.ShapesConfig | None = None) -> Tokenizer:
    """Word-level tokenizer over `vocab_words(config)`; `.save("tokenizer.json")` to ship it."""
    words = vocab_words(config)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, words.index(BOS))])
    return tok
