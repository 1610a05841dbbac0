"""Text side of a LLaVA request: tokenizer, chat template and image-placeholder expansion.

Loads a Hugging Face checkpoint directory with the `tokenizers` library only (no torch/transformers at
run time) and reproduces what transformers 5.x does with the same files:

- ``encode`` follows ``tokenizer.json``: its post-processor decides BOS/EOS. transformers 5 drops
  ``add_bos_token`` / ``add_eos_token`` from tokenizer_config.json whenever tokenizer.json exists,
  so those keys are ignored here too;
- the chat template is rendered in a sandboxed jinja2 environment configured like transformers';
- ``encode_prompt`` expands each image placeholder into N image-token ids, as ``LlavaProcessor``
  does: the model replaces exactly N image tokens with N visual embeddings, so the ids must already
  hold N copies.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers

__all__ = ["Tokenizer", "LLAVA15_FALLBACK_TEMPLATE"]

# Used when a checkpoint ships no chat template (original LLaVA-1.5 "vicuna_v1"-style single turn).
LLAVA15_FALLBACK_TEMPLATE = "USER: {images}{prompt} ASSISTANT:"

# transformers' SPECIAL_TOKENS_ATTRIBUTES; checkpoints may add named "*_token" entries (e.g. image_token).
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not parse {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str | None:
    """A special token as saved by transformers: a plain string or a serialised AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _named_special_tokens(tcfg: dict, smap: dict) -> dict[str, str]:
    """Named special tokens as transformers 5 collects them: the standard names plus any other
    ``*_token`` string entry of tokenizer_config (``image_token`` ...) or of an ``extra_special_tokens``
    dict. The legacy special_tokens_map.json is merged over them only when tokenizer_config carries no
    ``added_tokens_decoder`` (the legacy format)."""
    def collect(cfg: dict) -> dict[str, str]:
        out = {}
        for key, value in cfg.items():
            if key in _SPECIAL_NAMES or key.endswith("_token"):
                tok = _token_str(value)
                if tok is not None:
                    out[key] = tok
        extra = cfg.get("extra_special_tokens")
        if isinstance(extra, dict):
            out.update({k: t for k, v in extra.items() if (t := _token_str(v)) is not None})
        return out

    special = collect(tcfg)
    if "added_tokens_decoder" not in tcfg:
        special.update(collect(smap))
    return special


def _id_list(value: Any) -> list[int]:
    """``eos_token_id`` in generation/model configs may be an int, a list of ints or null."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _pick_template(value: Any) -> str | None:
    """``chat_template`` may be a string or (older tokenizer_config) a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        tmpl = named.get("default")
        return tmpl if isinstance(tmpl, str) else None
    return None


def _find_chat_template(path: str, tokenizer_config: dict) -> str | None:
    """Search order of the brief / transformers: jinja file, legacy processor json, configs."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "processor_config.json"):
        tmpl = _pick_template(_read_json(os.path.join(path, name)).get("chat_template"))
        if tmpl is not None:
            return tmpl
    return _pick_template(tokenizer_config.get("chat_template"))


def _compile_template(source: str):
    """A jinja2 template compiled in an environment that matches transformers' chat-template one.

    Same options (trim_blocks, lstrip_blocks, loopcontrols), the same helpers (``raise_exception``,
    ``strftime_now``, a ``tojson`` that does not HTML-escape) and a ``{% generation %}`` tag that just
    renders its body (the llava-hf templates use it to mark assistant text for training masks).
    """
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class Tokenizer:
    """Tokenizer + chat template of one checkpoint. Plain Python; ids are lists of ints.

    Build with ``Tokenizer.from_dir(path)``. ``vocab_size`` counts every id the tokenizer can emit
    (base vocabulary plus added tokens, i.e. ``len(hf_tokenizer)``), which is what an embedding
    table must cover; transformers' ``.vocab_size`` attribute excludes added tokens.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: dict[str, str | None] | None = None,
                 extra_eos_ids: Iterable[int] = (), fallback_ids: dict[str, int] | None = None,
                 chat_template: str | None = None, image_token: str = "<image>",
                 clean_up_tokenization_spaces: bool = False, clean_up_bpe: bool = False):
        self._tok = backend
        self._special = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._fallback_ids = dict(fallback_ids or {})
        self.chat_template = chat_template
        self.image_token = image_token
        self._clean_up = clean_up_tokenization_spaces
        self._clean_up_bpe = clean_up_bpe
        self._template = _compile_template(chat_template) if chat_template is not None else None
        eos = set(int(i) for i in extra_eos_ids)
        tok_eos = self._special_id("eos_token")
        if tok_eos is not None:
            eos.add(tok_eos)
        self._eos_ids = frozenset(eos)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` and the special tokens / chat template saved beside it.

        Reads, when present: tokenizer_config.json, special_tokens_map.json, generation_config.json,
        config.json (and its text_config), chat_template.jinja, chat_template.json,
        processor_config.json. Raises FileNotFoundError when the directory or tokenizer.json is missing.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(
                f"{tok_file!r} not found: vkv_jax needs a fast-tokenizer file (tokenizer.json); "
                "a slow-only checkpoint (tokenizer.model) can be converted once with transformers' "
                "AutoTokenizer.from_pretrained(...).save_pretrained(...)")
        try:
            backend = tokenizers.Tokenizer.from_file(tok_file)
        except Exception as e:  # the Rust library raises a bare Exception on any parse error
            raise ValueError(f"{tok_file}: not a valid tokenizer.json (invalid JSON or not a `tokenizers` "
                             f"file): {e}") from None
        tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        smap = _read_json(os.path.join(path, "special_tokens_map.json"))
        gcfg = _read_json(os.path.join(path, "generation_config.json"))
        mcfg = _read_json(os.path.join(path, "config.json"))
        pcfg = _read_json(os.path.join(path, "processor_config.json"))
        text_cfg = mcfg.get("text_config") if isinstance(mcfg.get("text_config"), dict) else {}

        special = _named_special_tokens(tcfg, smap)
        extra = tcfg.get("extra_special_tokens") or tcfg.get("additional_special_tokens") or []
        if "added_tokens_decoder" not in tcfg:
            extra = extra or smap.get("extra_special_tokens") or smap.get("additional_special_tokens") or []
        extra_list = list(extra.values()) if isinstance(extra, dict) else list(extra)
        image_token = (pcfg.get("image_token") if isinstance(pcfg.get("image_token"), str) else None) \
            or special.get("image_token") or "<image>"

        # transformers adds any declared special token missing from the vocabulary as a new id.
        declared = [t for t in list(special.values()) + [_token_str(t) for t in extra_list] if t]
        missing = [t for t in dict.fromkeys(declared) if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                        for t in missing])

        # transformers never truncates or pads unless asked; a raw tokenizers object would.
        backend.no_truncation()
        backend.no_padding()

        extra_eos = _id_list(gcfg.get("eos_token_id")) + _id_list(mcfg.get("eos_token_id")) \
            + _id_list(text_cfg.get("eos_token_id"))
        fallback: dict[str, int] = {}
        for name in ("bos_token", "pad_token"):
            key = name + "_id"
            for src in (gcfg, mcfg, text_cfg):
                ids = _id_list(src.get(key))
                if ids:
                    fallback[name] = ids[0]
                    break
        return cls(backend, special_tokens=special, extra_eos_ids=extra_eos, fallback_ids=fallback,
                   chat_template=_find_chat_template(path, tcfg), image_token=image_token,
                   clean_up_tokenization_spaces=bool(tcfg.get("clean_up_tokenization_spaces", False)),
                   clean_up_bpe=bool(tcfg.get(
                       "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)))

    # ------------------------------------------------------------------ ids
    def _special_id(self, name: str) -> int | None:
        tok = self._special.get(name)
        return None if tok is None else self._tok.token_to_id(tok)

    @property
    def bos_token(self) -> str | None:
        return self._special.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special.get("eos_token")

    @property
    def bos_id(self) -> int | None:
        """BOS id from the tokenizer, else from generation_config/config; None if none is declared."""
        tok_id = self._special_id("bos_token")
        return tok_id if tok_id is not None else self._fallback_ids.get("bos_token")

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every id that ends generation: the tokenizer's EOS plus generation_config/config ``eos_token_id``
        (which may be a list, e.g. Llama-3 ``<|eot_id|>``)."""
        return self._eos_ids

    @property
    def pad_id(self) -> int:
        """PAD id; falls back to config ``pad_token_id``, then the smallest EOS id, then 0."""
        tok_id = self._special_id("pad_token")
        if tok_id is not None:
            return tok_id
        if "pad_token" in self._fallback_ids:
            return self._fallback_ids["pad_token"]
        return min(self._eos_ids) if self._eos_ids else 0

    @property
    def vocab_size(self) -> int:
        """Number of ids (base vocabulary + added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text`` -> ids ``[S]``; BOS/EOS come from the post-processor, as in transformers."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """ids ``[S]`` -> text. Accepts any int sequence (list, numpy/jax array)."""
        ids = [int(i) for i in ids]
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._clean_up and (type(self._tok.model).__name__ != "BPE" or self._clean_up_bpe):
            # transformers' clean_up_tokenization (a WordPiece-era fix, skipped for BPE like HF does).
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def decode_generated(self, ids: Sequence[int], eos_ids: Sequence[int]) -> str:
        """Generated ids ``[T]`` -> answer text: cut at the first EOS, special tokens dropped, stripped."""
        ids = [int(i) for i in ids]
        stop = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))
        return self.decode(ids[:stop], skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ prompts
    def render_prompt(self, prompt: str, num_images: int = 1) -> str:
        """One user turn with ``num_images`` images then ``prompt``, plus the generation prompt.

        Uses the checkpoint's chat template with the HF multimodal message format
        ``[{"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text": prompt}]}]``;
        without a template, LLaVA-1.5's ``"USER: <image>\\n{prompt} ASSISTANT:"``.
        """
        if not isinstance(num_images, int) or num_images < 0:
            raise ValueError(f"num_images must be an int >= 0, got {num_images!r}")
        if self._template is None:
            return LLAVA15_FALLBACK_TEMPLATE.format(images=(self.image_token + "\n") * num_images,
                                                    prompt=prompt)
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        # transformers passes its special_tokens_map (every named special token) as template variables.
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=True, **self._special)

    def encode_prompt(self, prompt: str, num_image_tokens: int | Sequence[int], image_token: str | None = None,
                      num_images: int = 1, images_in_prompt: bool = False) -> list[int]:
        """Rendered + tokenised prompt with each image placeholder expanded to ``num_image_tokens`` ids
        (one count for every image, or one per image in placeholder order). ``images_in_prompt``: the
        prompt text itself holds the ``num_images`` placeholders (none are added before it).

        Returns ids ``[S]`` with ``S = len(text ids) + num_images * (num_image_tokens - 1)``. Equals
        ``LlavaProcessor(text=render_prompt(...), images=...)["input_ids"]``; when the template already
        starts with the BOS string, no second BOS is added (as ``apply_chat_template(tokenize=True)``).
        ``image_token`` defaults to the checkpoint's (processor_config / tokenizer_config), else "<image>".
        """
        counts = [num_image_tokens] * num_images if isinstance(num_image_tokens, int) else list(num_image_tokens)
        if len(counts) != num_images or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
            raise ValueError(f"num_image_tokens must be an int >= 1 or {num_images} of them, got {num_image_tokens!r}")
        image_token = self.image_token if image_token is None else image_token
        image_id = self._tok.token_to_id(image_token)
        if image_id is None:
            raise ValueError(f"image token {image_token!r} is not in the tokenizer's vocabulary "
                             f"(vocab_size={self.vocab_size}); pass the checkpoint's image token")
        text = self.render_prompt(prompt, 0 if images_in_prompt else num_images)
        found = text.count(image_token)
        if found != num_images:
            raise ValueError(f"the rendered prompt has {found} {image_token!r} placeholders but "
                             f"num_images={num_images} (does the prompt itself contain {image_token!r}?): "
                             f"{text!r}")
        bos = self.bos_token
        ids = self.encode(text, add_special_tokens=not (bos and text.startswith(bos)))
        if ids.count(image_id) != num_images:
            raise ValueError(f"{image_token!r} is not tokenised as one id ({image_id}) per placeholder: "
                             f"found {ids.count(image_id)} ids for {num_images} placeholders")
        out: list[int] = []
        images = iter(counts)
        for i in ids:
            if i == image_id:
                out.extend([image_id] * next(images))
            else:
                out.append(i)
        return out

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={sorted(self.eos_ids)}, chat_template={'yes' if self._template else 'fallback'})")
