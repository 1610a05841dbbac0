"""vkv_jax.models.tokenizer against transformers 5.x, on tiny tokenizers built offline."""

import json
import shutil

import numpy as np
import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawTokenizer

from vkv_jax.models.tokenizer import Tokenizer

WORDS = ("USER ASSISTANT SYSTEM : what is in the image ? a cat dog red blue , . describe it "
         "left of right there are two").split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_ID = 4 + len(WORDS)  # WordLevel: 4 specials + words, then <image> as an added token
TEXTS = ["what is in the image?", "USER: <image>\ndescribe it. ASSISTANT:", "a red cat , a blue dog",
         "unknownword and <s> inline", ""]

# llava-hf/llava-1.5-7b-hf's template (uses the {% generation %} tag).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# A template that emits BOS itself (Llama-3 / Mistral style), to check no second BOS is added.
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}")


def _wordlevel(bos_post_processor=True, decoder=True):
    vocab = {w: i for i, w in enumerate(SPECIALS[:4] + WORDS)}
    tok = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    if decoder:
        tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _bytelevel_bpe():
    tok = RawTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 4 + ["The cat is red. Two dogs, left and right!"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>")),
                                                                       ("</s>", tok.token_to_id("</s>"))])
    return tok


def _llama_like_bpe():
    """SentencePiece-style BPE like Llama's tokenizer.json: Metaspace "first", BOS post-processor."""
    tok = RawTokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS)
    tok.train_from_iterator([" ".join(WORDS)] * 4 + ["The cat is red.\nTwo dogs, left and right!"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def _save_hf(raw, path, **kwargs):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>", **kwargs)
    hf.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory, transformers):
    """name -> (directory, HF tokenizer reloaded from it)."""
    root = tmp_path_factory.mktemp("tok")
    out = {
        "wordlevel": _save_hf(_wordlevel(), root / "wordlevel"),
        "bpe": _save_hf(_bytelevel_bpe(), root / "bpe"),
        "llama": _save_hf(_llama_like_bpe(), root / "llama"),
        "no_bos": _save_hf(_wordlevel(bos_post_processor=False), root / "no_bos"),
        # No decoder: tokens are joined by spaces and transformers' clean_up_tokenization applies.
        "cleanup": _save_hf(_wordlevel(decoder=False), root / "cleanup", clean_up_tokenization_spaces=True),
    }
    return {k: (root / k, v) for k, v in out.items()}


def _edit_json(path, **updates):
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(updates)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name", ["wordlevel", "bpe", "llama", "no_bos", "cleanup"])
def test_encode_decode_equal_transformers(tok_dirs, name):
    path, hf = tok_dirs[name]
    tok = Tokenizer.from_dir(path)
    for text in TEXTS:
        for add in (True, False):
            ids = tok.encode(text, add_special_tokens=add)
            assert ids == hf(text, add_special_tokens=add)["input_ids"], (text, add)
        ids = hf(text)["input_ids"]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(np.asarray(ids)) == hf.decode(ids, skip_special_tokens=True)
    assert tok.vocab_size == len(hf)
    if name == "cleanup":
        assert tok.decode(tok.encode("a cat , a dog .")) == "a cat, a dog."


def test_bos_comes_from_post_processor(tok_dirs):
    with_bos = Tokenizer.from_dir(tok_dirs["wordlevel"][0])
    without = Tokenizer.from_dir(tok_dirs["no_bos"][0])
    assert with_bos.encode("a cat")[0] == with_bos.bos_id == 1
    assert without.encode("a cat") == without.encode("a cat", add_special_tokens=False)
    bpe = Tokenizer.from_dir(tok_dirs["bpe"][0])
    ids = bpe.encode("a cat")
    assert ids[0] == bpe.bos_id and ids[-1] in bpe.eos_ids


@pytest.mark.parametrize("name,add_bos,add_eos", [("wordlevel", False, False), ("no_bos", True, True)])
def test_add_bos_token_in_config_is_ignored_like_transformers(tok_dirs, tmp_path, transformers, name,
                                                             add_bos, add_eos):
    """transformers 5 drops add_bos/eos_token when tokenizer.json exists: its post-processor rules."""
    from transformers import PreTrainedTokenizerFast
    shutil.copytree(tok_dirs[name][0], tmp_path / "t")
    _edit_json(tmp_path / "t" / "tokenizer_config.json", add_bos_token=add_bos, add_eos_token=add_eos)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path / "t")
    ids = Tokenizer.from_dir(tmp_path / "t").encode("what is it")
    assert ids == hf("what is it")["input_ids"]
    assert ids == Tokenizer.from_dir(tok_dirs[name][0]).encode("what is it")
    assert (ids[0] == 1) == (name == "wordlevel") and ids[-1] != 2


def test_truncation_in_tokenizer_json_is_not_applied(tok_dirs, tmp_path, transformers):
    """Like transformers' default call (truncation=False), a saved truncation setting is ignored."""
    from transformers import PreTrainedTokenizerFast
    shutil.copytree(tok_dirs["wordlevel"][0], tmp_path / "t")
    _edit_json(tmp_path / "t" / "tokenizer.json",
               truncation={"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0})
    text = "a red cat , a blue dog"
    ids = Tokenizer.from_dir(tmp_path / "t").encode(text)
    assert len(ids) == 8 and ids == PreTrainedTokenizerFast.from_pretrained(tmp_path / "t")(text)["input_ids"]


def test_special_ids_and_eos_set(tok_dirs, tmp_path):
    shutil.copytree(tok_dirs["wordlevel"][0], tmp_path / "t")
    tok = Tokenizer.from_dir(tmp_path / "t")
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, {2}, 3)
    assert tok.token_to_id("<image>") == IMAGE_ID and tok.token_to_id("nope") is None
    # generation_config may list several stop ids; all of them end generation.
    _edit_json(tmp_path / "t" / "generation_config.json", eos_token_id=[2, 7], bos_token_id=1)
    assert Tokenizer.from_dir(tmp_path / "t").eos_ids == {2, 7}


def test_pad_falls_back_to_eos_then_zero(tok_dirs, tmp_path):
    shutil.copytree(tok_dirs["wordlevel"][0], tmp_path / "t")
    cfg = tmp_path / "t" / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("pad_token")
    cfg.write_text(json.dumps(data))
    assert Tokenizer.from_dir(tmp_path / "t").pad_id == 2
    data.pop("eos_token")
    cfg.write_text(json.dumps(data))
    tok = Tokenizer.from_dir(tmp_path / "t")
    assert tok.eos_ids == frozenset() and tok.pad_id == 0
    _edit_json(tmp_path / "t" / "config.json", text_config={"eos_token_id": 2, "pad_token_id": 3})
    tok = Tokenizer.from_dir(tmp_path / "t")
    assert tok.eos_ids == {2} and tok.pad_id == 3


def test_missing_tokenizer_json_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.from_dir(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def llava_processors(tok_dirs, tmp_path_factory, transformers):
    """tokenizer name -> (dir, HF LlavaProcessor): PIL CLIP processor, 32px crop, patch 8 -> 16 image
    tokens, llava-hf chat template, saved with save_pretrained."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    out = {}
    for name in ("wordlevel", "llama"):
        ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok_dirs[name][1], patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_TEMPLATE)
        path = tmp_path_factory.mktemp("proc_" + name)
        proc.save_pretrained(path)
        out[name] = (path, proc)
    return out


@pytest.fixture(scope="module")
def llava_processor(llava_processors):
    return llava_processors["wordlevel"]


def _messages(prompt, num_images=1):
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def _image(h, w, seed=0):
    from PIL import Image
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


# Multi-line, whitespace-sensitive template: checks trim_blocks/lstrip_blocks, loop controls, namespace
# and a tojson that does not HTML-escape, like transformers' environment.
MULTILINE_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for message in messages %}
    {{ message['role'] | upper }}:{% for c in message['content'] %}
        {% if c['type'] == 'image' %}
 <image>{% set ns.n = ns.n + 1 %}
        {% else %}
 {{ c['text'] | tojson }}
        {% endif %}
        {% if loop.index > 5 %}{% break %}{% endif %}
    {% endfor %}

{% endfor %}
{% if add_generation_prompt %}
[{{ ns.n }} images] ASSISTANT:
{% endif %}"""


@pytest.mark.parametrize("template", [None, MULTILINE_TEMPLATE])
def test_render_prompt_equals_apply_chat_template(llava_processor, tmp_path, template):
    path, proc = llava_processor
    if template is not None:
        shutil.copytree(path, tmp_path / "p")
        (tmp_path / "p" / "chat_template.jinja").write_text(template)
        path = tmp_path / "p"
    tok = Tokenizer.from_dir(path)
    # read from the chat_template.jinja transformers wrote
    assert tok.chat_template == (template or LLAVA_TEMPLATE)
    for prompt, n in [("what is in the image?", 1), ("describe <it> & 'that'", 2), ("a cat", 0)]:
        expected = proc.apply_chat_template(_messages(prompt, n), add_generation_prompt=True,
                                            chat_template=template)
        assert tok.render_prompt(prompt, num_images=n) == expected


@pytest.mark.parametrize("name", ["wordlevel", "llama"])
@pytest.mark.parametrize("num_images", [1, 2])
def test_encode_prompt_equals_llava_processor(llava_processors, name, num_images):
    path, proc = llava_processors[name]
    tok = Tokenizer.from_dir(path)
    prompt = "What is in the image? Two dogs, left."
    images = [_image(37, 53, 0), _image(61, 29, 1)][:num_images]
    rendered = tok.render_prompt(prompt, num_images=num_images)
    expected = proc(text=rendered, images=images)["input_ids"][0]
    ids = tok.encode_prompt(prompt, num_image_tokens=16, num_images=num_images)
    assert ids == list(expected)
    assert ids.count(tok.token_to_id("<image>")) == 16 * num_images


def test_template_with_bos_gets_no_second_bos(llava_processor, tmp_path):
    path, proc = llava_processor
    shutil.copytree(path, tmp_path / "p")
    (tmp_path / "p" / "chat_template.jinja").write_text(BOS_TEMPLATE)
    tok = Tokenizer.from_dir(tmp_path / "p")
    rendered = tok.render_prompt("describe it")
    assert rendered == "<s>[user]<image> describe it</s>[ASSISTANT]"
    expected = proc(text=rendered, images=[_image(40, 40)], add_special_tokens=False)["input_ids"][0]
    ids = tok.encode_prompt("describe it", num_image_tokens=16)
    assert ids == list(expected) and ids.count(1) == 1


def test_chat_template_search_order(tok_dirs, tmp_path):
    shutil.copytree(tok_dirs["wordlevel"][0], tmp_path / "t")
    d = tmp_path / "t"
    assert Tokenizer.from_dir(d).chat_template is None
    _edit_json(d / "tokenizer_config.json", chat_template="T{{ messages[0]['role'] }}")
    assert Tokenizer.from_dir(d).render_prompt("x", 0) == "Tuser"
    _edit_json(d / "processor_config.json", chat_template="P{{ messages[0]['role'] }}")
    assert Tokenizer.from_dir(d).render_prompt("x", 0) == "Puser"
    _edit_json(d / "chat_template.json", chat_template="J{{ messages[0]['role'] }}")
    assert Tokenizer.from_dir(d).render_prompt("x", 0) == "Juser"
    (d / "chat_template.jinja").write_text("{{ 'K' + eos_token }}")
    assert Tokenizer.from_dir(d).render_prompt("x", 0) == "K</s>"


def test_fallback_template_is_llava15(tok_dirs):
    tok = Tokenizer.from_dir(tok_dirs["wordlevel"][0])
    assert tok.chat_template is None
    assert tok.render_prompt("what is it?") == "USER: <image>\nwhat is it? ASSISTANT:"
    ids = tok.encode_prompt("what is it?", num_image_tokens=3)
    head = tok.encode("USER: ", add_special_tokens=True)
    assert ids[:len(head)] == head and ids[len(head):len(head) + 3] == [IMAGE_ID] * 3
    assert ids == tok.encode("USER: <image><image><image>\nwhat is it? ASSISTANT:")


def test_template_raise_exception_helper(tok_dirs, tmp_path):
    from jinja2.exceptions import TemplateError
    shutil.copytree(tok_dirs["wordlevel"][0], tmp_path / "t")
    (tmp_path / "t" / "chat_template.jinja").write_text("{{ raise_exception('only system prompts') }}")
    with pytest.raises(TemplateError, match="only system prompts"):
        Tokenizer.from_dir(tmp_path / "t").render_prompt("x")


def test_encode_prompt_errors(tok_dirs, tmp_path):
    tok = Tokenizer.from_dir(tok_dirs["wordlevel"][0])
    with pytest.raises(ValueError, match="2 '<image>' placeholders but num_images=1"):
        tok.encode_prompt("compare <image> with this", num_image_tokens=4)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tok.encode_prompt("x", num_image_tokens=4, image_token="<img>")
    with pytest.raises(ValueError, match="num_image_tokens"):
        tok.encode_prompt("x", num_image_tokens=0)
    # A template that drops images (text-only model) cannot be fed image features.
    shutil.copytree(tok_dirs["wordlevel"][0], tmp_path / "t")
    (tmp_path / "t" / "chat_template.jinja").write_text("USER: {{ messages[0]['content'][-1]['text'] }}")
    with pytest.raises(ValueError, match="0 '<image>' placeholders but num_images=1"):
        Tokenizer.from_dir(tmp_path / "t").encode_prompt("x", num_image_tokens=4)


def test_runtime_imports_neither_torch_nor_transformers():
    import subprocess
    import sys
    code = ("import sys, vkv_jax.models.tokenizer, vkv_jax.models.image_processor; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
