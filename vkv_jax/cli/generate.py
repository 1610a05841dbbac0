"""`python -m vkv_jax.generate`: answer a question about an image, with and without KV compression.

With no arguments it uses the default model, draws a seeded example image from the synthetic testbed
(saved next to the output), asks that example's question, and prints the answer with the full cache
and with a compressed cache, with kept-token and KV-memory stats.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from vkv_jax.cli.common import parse_budget, parse_options, run_cli

DEFAULT_COMPARE = ("aircache", 0.1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vkv_jax.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF LLaVA checkpoint directory (default: the shipped tiny model)")
    p.add_argument("--image", help="image file (default: a seeded synthetic example)")
    p.add_argument("--prompt", help="question about the image (default: the example's question)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--method", default=None, help="compression method (default: full, then aircache 0.1 "
                                                   "when no --method is given)")
    p.add_argument("--budget", default=None, help="ratio in (0, 1] or an absolute token count")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. --method fastv --option k=3, "
                        "--method lightkv --option merge_layers=12-18-24)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and example seed)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stream", action="store_true", help="decode with the streaming loop of jitted steps")
    p.add_argument("--out", default="vkv_jax_out", help="where the default example image is saved")
    p.add_argument("--json", action="store_true", help="print one JSON object per run")
    return p


def _model_image_size(args) -> int:
    """The vision tower's input size (the example is drawn at it, so no resize blurs the cells)."""
    from vkv_jax.models import loading

    path = args.model
    if path is None:
        from vkv_jax import default_model

        path = default_model.path()
    return loading.read_config(path)[1].vision.image_size


def _example_image(args) -> tuple[Any, str, str | None]:
    """(image, prompt, expected answer) for the no-argument run."""
    from PIL import Image

    from vkv_jax.testbed import synthetic

    try:
        config = synthetic.ShapesConfig(image_size=_model_image_size(args))
    except ValueError:  # a vision tower too small for the 8x8 grid: draw the default, the processor resizes
        config = synthetic.ShapesConfig()
    ex = synthetic.make_example(args.seed, "test", config)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"example_{args.seed}.png")
    Image.fromarray(ex.image).save(path)
    return path, ex.question, ex.answer


def _runs(args) -> list[tuple[str, Any]]:
    from vkv_jax.methods import available

    if args.method is not None:
        return [(args.method, parse_budget(args.budget))]
    runs = [("full", None)]
    if DEFAULT_COMPARE[0] in available():
        runs.append((DEFAULT_COMPARE[0], parse_budget(args.budget) or DEFAULT_COMPARE[1]))
    return runs


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, build_parser().parse_args(argv))


def _main(args) -> int:
    import vkv_jax
    from vkv_jax.methods import Compression

    runs = _runs(args)
    options = parse_options(args.option)
    if options and args.method is None:
        raise ValueError("--option needs --method")
    compressions = [Compression(name, budget=budget, **(options if name == args.method else {}))
                    for name, budget in runs]  # bad names and options fail here, before any work
    expected = None
    image, prompt = args.image, args.prompt
    if image is None:
        image, example_prompt, expected = _example_image(args)
        if prompt is None:
            prompt = example_prompt
        else:
            expected = None
        if not args.json:
            print(f"image: {image} (synthetic example, seed {args.seed})")
    elif not os.path.exists(image):
        raise FileNotFoundError(f"image file {image!r} does not exist")
    if prompt is None:
        raise ValueError("--prompt is required with --image")
    model = vkv_jax.load(args.model, dtype=args.dtype)
    inputs = model.prepare([image], [prompt])
    if not args.json:
        print(f"model: {model.path}\nquestion: {prompt}" + (f"\nexpected: {expected}" if expected else ""))
    for compression in compressions:
        out = vkv_jax.generate(model, inputs, args.max_new_tokens, compression, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=args.stream,
                               measure_overhead=True)
        s = out.stats
        if args.json:
            print(json.dumps({"text": out.text[0], "tokens": out.tokens[0].tolist(), "stats": {
                "method": s["method"], "budget": s["budget"], "prompt_tokens": s["prompt_tokens"][0],
                "visual_tokens": s["visual_tokens"][0], "kv_bytes_full": s["kv_bytes_full"],
                "kv_bytes": s["kv_bytes"], "kv_bytes_allocated": s["kv_bytes_allocated"],
                "kept_text_per_layer": s["kept_text_per_layer"], "kept_vision_per_layer": s["kept_vision_per_layer"],
                "prefill_flops": s["prefill_flops"], "prefill_flops_saved": s["prefill_flops_saved"],
                "prefill_s": s["prefill_s"], "prefill_compile_s": s["prefill_compile_s"],
                "compression_s": s["compression_s"],
                "decode_tokens_per_s": s["decode_tokens_per_s"], "expected": expected}}))
            continue
        label = s["method"] + (f" @ {s['budget']}" if s["budget"] is not None else "")
        print(f"\n[{label}] answer: {out.text[0]!r}")
        print(f"  prompt tokens {s['prompt_tokens'][0]} (visual {s['visual_tokens'][0]}); "
              f"kept per layer text {s['kept_text_per_layer']} vision {s['kept_vision_per_layer']}")
        print(f"  KV live {s['kv_bytes'] / 1024:.1f} KiB of {s['kv_bytes_full'] / 1024:.1f} KiB full "
              f"({s['kv_bytes'] / max(s['kv_bytes_full'], 1):.0%}); allocated {s['kv_bytes_allocated'] / 1024:.1f} KiB")
        overhead = "" if s["compression_s"] is None else \
            f" of which scoring + compaction {s['compression_s'] * 1e3:.1f} ms"
        print(f"  prefill {s['prefill_s'] * 1e3:.1f} ms{overhead} (+{s['prefill_compile_s']:.1f} s compile), "
              f"{s['prefill_flops'] / 1e9:.2f} GFLOP ({s['prefill_flops_saved']:.0%} saved), "
              f"decode {s['decode_tokens_per_s']:.1f} tokens/s")
    return 0
