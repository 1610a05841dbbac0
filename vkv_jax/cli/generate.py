"""`python -m vkv_jax.generate`: answer a question about an image, with and without KV compression.

With no arguments it uses the default model, draws an example image from the synthetic testbed (the
first test example from --seed on whose answer must be read from the image; saved under --out), asks
that example's question, and prints the answer with the full cache and with a compressed cache
(AirCache, 10% of the visual tokens), with kept tokens per layer, KV bytes (live and allocated) and
timings.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from vkv_jax import kv_quant
from vkv_jax.cli.common import (
    ArgumentParser,
    HelpFormatter,
    at_least,
    check_input_file,
    check_model_dir,
    check_out_dir,
    check_sampling,
    check_seed,
    description,
    mesh_shape,
    model_help,
    parse_budget,
    parse_options,
    run_cli,
)

DEFAULT_COMPARE = ("aircache", 0.1)
# what a ratio budget is a fraction of, per built-in method (each method's docstring says so)
BUDGET_MEANING = {
    "full": "no budget: keeps every token",
    "aircache": "share of the visual tokens kept (the text is always kept)",
    "vlcache": "share of the whole prompt kept",
    "snapkv": "share of the whole prompt kept, per layer and KV head",
    "pyramidkv": "share of the whole prompt kept (mean over layers, pyramid-shaped)",
    "h2o": "share of the whole prompt kept",
    "streamingllm": "share of the whole prompt kept (sink + recent tokens)",
    "random": "share of the whole prompt kept",
    "csp": "share of the whole prompt kept (at least its recent_ratio, 0.1)",
    "adakv": "its base scorer's convention (base=snapkv: share of the whole prompt per layer)",
    "fastv": "share of the visual tokens kept after layer k (--option k=..., default 2)",
    "lightkv": "no budget: --option merge_layers / merge_windows / merge_ratios set the merge schedule",
}
# the demo asks a question whose answer is read from particular cells of the image: a question-only
# guess is right 14% (colour) / 46% (shape, mostly "none") of the time (vkv_jax/testbed/README.md)
DEMO_QTYPES = ("colour_of_shape", "shape_at")
UNINFORMATIVE_ANSWERS = ("none", "no", "0")
POST_PREFILL_NOTE = ("a post-prefill method compresses the cache after the full-attention prefill, which has "
                     "already picked the first answer token; the compressed cache serves the tokens after it "
                     "(python -m vkv_jax.evaluate compresses before the template's final 'ASSISTANT:', so that "
                     "one-word answers are read from the compressed cache)")


def methods_epilog() -> str:
    """One line per available method: its default budget and what a ratio budget is a fraction of."""
    import dataclasses

    from vkv_jax.methods import available, factory

    lines = ["methods (--method; --budget is a ratio in (0, 1] of what each line says, or an integer token "
             "count > 1):"]
    for name in available():
        cls = factory(name)
        meaning = BUDGET_MEANING.get(name) or ((cls.__doc__ or "").strip().splitlines() or ["(no description)"])[0]
        fields = {f.name: f.default for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        default = fields.get("budget")
        shown = f" (default {default})" if isinstance(default, (int, float)) else ""
        lines.append(f"  {name:<13}{meaning}{shown}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m vkv_jax.generate", description=description(__doc__),
                                epilog=methods_epilog(), formatter_class=HelpFormatter)
    p.add_argument("--model", help=model_help())
    p.add_argument("--image", action="append",
                   help="image file; repeat for several images in the prompt (in order; '<image>' in --prompt "
                        "places them) (default: a synthetic example, see --seed)")
    p.add_argument("--video", help="LLaVA-OneVision: a video as a folder of frame images (sorted by name) or a "
                                   ".npy file of [frames, H, W(, C)] uint8 frames; after any --image (default: none)")
    p.add_argument("--prompt", help="question about the image (default: the example's question; required "
                                    "with --image or --video)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=16, help="tokens to generate per answer")
    p.add_argument("--method", default=None,
                   help="compression method, one of the list below (default: full, then "
                        f"{DEFAULT_COMPARE[0]} at --budget or {DEFAULT_COMPARE[1]})")
    p.add_argument("--budget", default=None,
                   help="ratio in (0, 1] of what the method's line below says, or an integer token count > 1 "
                        "(default: the method's own)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable; the value takes the option's type, booleans are "
                        "true/false/1/0 (e.g. --method fastv --option k=3, --method lightkv --option "
                        "merge_layers=0-1-2; default: none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV dtype")
    p.add_argument("--mesh", type=mesh_shape, default=None,
                   help="split the model over a DATAxMODEL device mesh, e.g. 1x8 on a TPU v2-8: weights tensor-"
                        "parallel over MODEL, rows over DATA (default: one device)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed, and where the search for the default example starts (0 <= seed < 2**32)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature >= 0 (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = all)")
    p.add_argument("--prefill-chunk", type=at_least(1), default=None,
                   help="prefill the prompt this many slots at a time (activation memory follows the chunk; the "
                        "same answer); not with fastv / lightkv (default: the whole prompt at once)")
    p.add_argument("--kv-dtype", default=None, choices=kv_quant.QUANTIZED,
                   help="store the kept KV slots quantized, one float32 scale per slot and KV head (scores are "
                        "computed in full precision first; default: the model's dtype)")
    p.add_argument("--decode-budget", type=at_least(2), default=None,
                   help="decode-phase compression: at most this many generated tokens' KV per layer and KV head, the "
                        "least attended evicted as the answer grows (default: every generated token kept)")
    p.add_argument("--decode-interval", type=at_least(1), default=None,
                   help="with --decode-budget: slots each eviction frees, one eviction every that many steps "
                        "(default: a quarter of the budget)")
    p.add_argument("--decode-window", type=at_least(1), default=None,
                   help="with --decode-budget: the newest generated tokens never evicted (default: a quarter of the "
                        "budget, at most 16)")
    p.add_argument("--stream", action="store_true",
                   help="decode with the streaming loop of jitted steps (default: one lax.scan)")
    p.add_argument("--out", default="vkv_jax_out", help="folder where the default example image is saved")
    p.add_argument("--json", action="store_true", help="print one JSON object per run (default: text)")
    return p


def _example_config(args):
    """The shapes testbed config of the example: the model's own (its `testbed.json`), else the default
    testbed drawn at the vision tower's input size (so no resize blurs the cells; as drawn for a
    native-resolution tower such as Qwen2-VL's, or one too small for the 8x8 grid: the processor resizes)."""
    from vkv_jax import default_model
    from vkv_jax.models import loading
    from vkv_jax.testbed import synthetic

    path = default_model.resolve(args.model)
    size = getattr(loading.read_config(path)[1].vision, "image_size", None)
    try:
        return synthetic.config_for_model(path, size)
    except ValueError:
        return synthetic.ShapesConfig()


def demo_example_index(start: int, config, limit: int = 1000) -> int:
    """The first test-split index >= start whose question is one of DEMO_QTYPES and whose answer is
    not an absence ("none", "no", "0"): a question the model can only answer by reading the image.
    Deterministic (examples are pure functions of their index)."""
    from vkv_jax.testbed import synthetic

    for index in range(start, start + limit):
        ex = synthetic.make_example(index, "test", config, with_image=False)
        if ex.qtype in DEMO_QTYPES and ex.answer not in UNINFORMATIVE_ANSWERS:
            return index
    raise ValueError(f"no test example in {start}..{start + limit - 1} asks about the image")  # not reached


def _example_image(args) -> tuple[str, str, str, int]:
    """(image path, question, expected answer, example index) for the no-argument run."""
    from PIL import Image

    from vkv_jax.testbed import synthetic

    config = _example_config(args)
    index = demo_example_index(args.seed, config)
    ex = synthetic.make_example(index, "test", config)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"example_{index}.png")
    Image.fromarray(ex.image).save(path)
    return path, ex.question, ex.answer, index


def _runs(args) -> list[tuple[str, Any]]:
    from vkv_jax.methods import available, takes_budget

    budget = parse_budget(args.budget)
    if args.method is not None:
        if budget is not None and not takes_budget(args.method):  # the rule `Compression` applies too
            why = "the full cache keeps every token" if args.method == "full" else "it takes no budget"
            raise ValueError(f"--budget {args.budget} does not apply to --method {args.method} ({why}); drop "
                             "--budget or pick a compression method")
        return [(args.method, budget)]
    runs = [("full", None)]
    if DEFAULT_COMPARE[0] in available():
        runs.append((DEFAULT_COMPARE[0], budget or DEFAULT_COMPARE[1]))
    return runs


def check_args(args) -> None:
    """Every check that needs no model: raises ValueError / FileNotFoundError naming the flag."""
    check_seed(args.seed)
    check_sampling(args.temperature, args.top_k, args.top_p)
    check_model_dir(args.model)
    if args.video is not None:
        if os.path.isdir(args.video):
            pass
        elif not args.video.endswith(".npy"):
            raise ValueError(f"--video {args.video!r}: expected a folder of frame images or a .npy file of frames "
                             "(videos are read as frames; decode a video file to frames first)")
        else:
            check_input_file(args.video, "--video", "a .npy file of frames")
    if args.image is not None:
        for image in args.image:
            check_input_file(image, "--image", "an image file")
    if args.image is not None or args.video is not None:
        if args.prompt is None:
            raise ValueError(f"--prompt is required with {'--image' if args.image is not None else '--video'}")
    else:
        check_out_dir(args.out)
    if args.option and args.method is None:
        raise ValueError("--option needs --method")
    decode_trim(args)  # ValueError naming the flags


def decode_trim(args):
    """The `vkv_jax.DecodeTrim` of --decode-budget / --decode-interval / --decode-window, or None."""
    if args.decode_budget is None:
        for flag in ("decode_interval", "decode_window"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --decode-budget")
        return None
    from vkv_jax.decode_trim import DecodeTrim

    try:
        return DecodeTrim(args.decode_budget, args.decode_interval or 0, args.decode_window or 0)
    except ValueError as e:
        raise ValueError(f"--decode-budget / --decode-interval / --decode-window: {e}") from None


def kv_lines(stats: dict, cfg, batch: int = 1) -> list[str]:
    """The KV memory of one run: live bytes against the full prompt cache, and what the paged cache
    reserves (`stats["kv_bytes_allocated"]`, from the arrays' sizes): the prompt's pages and the decode
    segment; with quantized pages, their format (the bytes count the scales)."""
    t = cfg.text
    live, full, allocated = stats["kv_bytes"], stats["kv_bytes_full"], stats["kv_bytes_allocated"]
    segment = stats["kv_bytes_decode_segment"]
    pages = allocated - segment
    slots = int(segment // (t.num_layers * batch * t.num_kv_heads * stats["kv_slot_bytes"]))
    stored = f", stored as {stats['kv_dtype']} + a float32 scale per slot" if stats["kv_dtype"] else ""
    return [f"  KV live {live / 1024:.1f} KiB ({live / max(full, 1):.0%} of the full cache's {full / 1024:.1f} KiB"
            f"{stored})",
            f"  KV allocated {allocated / 1024:.1f} KiB: prompt pages {pages / 1024:.1f} KiB "
            f"({pages / max(live, 1):.2f}x live) + decode segment {segment / 1024:.1f} KiB ({slots} slots per "
            f"layer and KV head for {stats['new_tokens']} new tokens"
            + (", least attended evicted when full)" if stats["decode_budget"] else ")")]


def kept_line(stats: dict, num_kv_heads: int) -> str:
    """The kept prompt tokens per layer of a one-row run, text and vision. The stats hold means over the
    row's KV heads (a method may keep a different count per head): whole numbers print as integers, and the
    line says they are means whenever the model has more than one KV head."""
    def counts(values):
        return "[" + ", ".join(f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}" for v in values) + "]"

    over = f", mean over the {num_kv_heads} KV heads" if num_kv_heads > 1 else ""
    return (f"kept tokens per layer{over}: text {counts(stats['kept_text_per_layer'])} "
            f"vision {counts(stats['kept_vision_per_layer'])}")


def load_video(path: str):
    """--video as frames: a folder stays a path (`vkv_jax` reads its images); a .npy file is loaded here so
    that a file numpy cannot read as a plain array (pickled objects, a truncated file) is named as --video."""
    import numpy as np

    if os.path.isdir(path):
        return path
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ValueError(f"--video {path!r} holds pickled Python objects, not an array of frames; save the "
                             "frames as one uint8 array of [frames, H, W(, C)] (np.save)") from None
        raise ValueError(f"--video {path!r} is not a readable .npy array of frames: {e}") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"--video {path!r} is not a readable .npy array of frames: {e}") from None


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, build_parser().parse_args(argv))


def _main(args) -> int:

    import vkv_jax
    from vkv_jax.methods import Compression, build, reduction_schedule

    check_args(args)
    mesh = vkv_jax.make_mesh(*args.mesh) if args.mesh else None  # ValueError: more devices than there are
    runs = _runs(args)
    options = parse_options(args.option, args.method) if args.option else {}
    compressions = [Compression(name, budget=budget, **(options if name == args.method else {}))
                    for name, budget in runs]  # bad names and options fail here, before any work
    if args.prefill_chunk is not None and build(compressions[-1]).reduces_in_prefill:
        raise ValueError(f"--prefill-chunk does not apply to --method {args.method}: it shortens the sequence "
                         f"inside the prefill (an in-prefill reduction)")
    expected = example = None
    image, prompt = args.image, args.prompt
    video = None if args.video is None else load_video(args.video)
    if image is None and video is not None:
        image = []
    elif image is None:
        image, example_prompt, expected, example = _example_image(args)
        if prompt is None:
            prompt = example_prompt
        else:
            expected = None
        if not args.json:
            print(f"image: {image} (synthetic test example {example}: the first from --seed {args.seed} "
                  "whose answer must be read from the image)")
    model = vkv_jax.load(args.model, dtype=args.dtype, mesh=mesh)
    inputs = model.prepare([image if isinstance(image, list) else [image]], [prompt],
                           videos=None if video is None else [video])
    if not args.json:
        print(f"model: {model.path}\nquestion: {prompt}" + (f"\nexpected: {expected}" if expected else ""))
    for compression in compressions:
        out = vkv_jax.generate(model, inputs, args.max_new_tokens, compression, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=args.stream,
                               measure_overhead=True, prefill_chunk=args.prefill_chunk, kv_dtype=args.kv_dtype,
                               decode_trim=decode_trim(args))
        s = out.stats
        budget = build(compression).budget  # the method's default when none was given
        if args.json:
            # every stat of the run as generate measured it (row 0), the budget as the method resolved it
            print(json.dumps({"text": out.text[0], "tokens": out.tokens[0].tolist(), "stats": {
                **s.row(0), "budget": budget, "expected": expected, "example": example}}))
            continue
        label = s["method"] + (f" @ {budget}" if budget is not None else "") + \
            (" (its default budget)" if budget is not None and s["budget"] is None else "")
        print(f"\n[{label}] answer: {out.text[0]!r}")
        print(f"  prompt tokens {s['prompt_tokens'][0]} (visual {s['visual_tokens'][0]}); "
              f"{kept_line(s, model.config.text.num_kv_heads)}")
        print("\n".join(kv_lines(s, model.config)))
        overhead = "" if s["compression_s"] is None else \
            f" of which scoring + compaction {s['compression_s'] * 1e3:.1f} ms"
        print(f"  prefill {s['prefill_s'] * 1e3:.1f} ms{overhead} (+{s['prefill_compile_s']:.1f} s compile), "
              f"{s['prefill_flops'] / 1e9:.2f} GFLOP ({s['prefill_flops_saved']:.0%} saved), "
              f"decode {s['decode_tokens_per_s']:.1f} tokens/s")
    cfg = model.config
    if not args.json and any(c.name != "full" and reduction_schedule(build(c), cfg.text.num_layers,
                                                                      inputs.visual_tokens[0]) is None
                             for c in compressions):
        print(f"\nnote: {POST_PREFILL_NOTE}")
    return 0
