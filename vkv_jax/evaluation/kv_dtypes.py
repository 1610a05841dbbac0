"""Quantized KV against the same cell unquantized: `python -m vkv_jax.evaluation.kv_dtypes`.

For every method x budget, the testbed questions are answered with the cache stored in the model's dtype
and in each quantized storage (`generate(..., kv_dtype=...)`, `vkv_jax.kv_quant`), on the same questions
under the same protocol (pre-template: the template is fed after compression, so the answer is read
from the compressed, quantized cache). Each quantized cell is reported as its exact-match accuracy minus
the unquantized cell's, with the exact McNemar p-value of the paired answers and the share of answers
that agree with the unquantized cell's. Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
from collections.abc import Sequence

from vkv_jax import kv_quant
from vkv_jax.evaluation import stats as eval_stats
from vkv_jax.kv_quant import QUANTIZED

DEFAULT_BUDGETS = (0.1, 0.25, 1.0)


def compare(model, examples, methods: Sequence[str], budgets: Sequence[float], kv_dtypes: Sequence[str], *,
            batch_size: int = 16, max_new_tokens: int = 4, progress: bool = True, on_cell=None) -> list[dict]:
    """One row per (method, budget, quantized kv dtype): accuracy of both cells, their difference, McNemar.
    on_cell(rows so far) runs after each method x budget (the CLI writes its files there, so a long run
    that stops keeps what it measured)."""
    from tqdm.auto import tqdm

    from vkv_jax.evaluation.harness import Runner, correct_answers
    from vkv_jax.methods import Compression

    base = Runner(model, examples, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False)
    # one Runner per storage, sharing the prepared batches (a shallow copy: only `kv_dtype` differs)
    runners = {None: base, **{d: copy.copy(base) for d in kv_dtypes}}
    for d in kv_dtypes:
        runners[d].kv_dtype = kv_quant.check_platform(d)
    cells = []
    for name in methods:
        try:
            cells += [Compression(name, budget=b) for b in budgets] if name != "full" else [Compression(name)]
        except ValueError:  # a method that takes no budget (LightKV's schedule): its own settings, once
            cells.append(Compression(name))
    rows = []
    for compression in tqdm(cells, desc="kv dtypes", disable=not progress):
        name, budget = compression.name, compression.budget
        runs = {d: r.run(compression) for d, r in runners.items()}
        base_right = correct_answers(examples, runs[None].texts)
        for d in kv_dtypes:
            right = correct_answers(examples, runs[d].texts)
            test = eval_stats.mcnemar_exact(right, base_right)
            agree = sum(a == b for a, b in zip(runs[d].answers, runs[None].answers, strict=True)) / len(examples)
            rows.append({"method": name, "budget": budget, "kv_dtype": d, "n": len(examples),
                         "accuracy": float(right.mean()), "accuracy_unquantized": float(base_right.mean()),
                         "difference": float(right.mean() - base_right.mean()), "mcnemar": test,
                         "agreement": agree, "kv_share": runs[d].share, "kv_share_unquantized": runs[None].share})
        if on_cell is not None:
            on_cell(rows)
    return rows


def markdown(rows: list[dict], config: dict) -> str:
    lines = [f"Model `{config['model']}`, {config['n']} testbed questions ({config['split']} split), protocol "
             "pre-template, greedy; each quantized cell against the same method and budget unquantized on the "
             "same questions. `diff` = accuracy(quantized) - accuracy(unquantized); `p` = exact McNemar test "
             "of the paired answers; `agree` = answers equal to the unquantized cell's; KV shares count the "
             "scales, against the unquantized full cache.", "",
             f"Command: `{config['command']}`", "",
             "| method | budget | kv dtype | accuracy | unquantized | diff | p | agree | KV share | unquantized KV |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {'-' if r['budget'] is None else r['budget']} | {r['kv_dtype']} | "
                     f"{r['accuracy']:.3f} | {r['accuracy_unquantized']:.3f} | {r['difference']:+.3f} | "
                     f"{r['mcnemar']['p']:.3f} | {r['agreement']:.3f} | {r['kv_share']:.3f} | "
                     f"{r['kv_share_unquantized']:.3f} |")
    worst = {d: max((abs(r["difference"]) for r in rows if r["kv_dtype"] == d), default=0.0)
             for d in dict.fromkeys(r["kv_dtype"] for r in rows)}
    lines += ["", "Largest |diff| per kv dtype: " + ", ".join(f"{d} {w:.3f}" for d, w in worst.items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    from vkv_jax.cli.common import at_least, model_help, parse_budgets, parse_names, run_cli
    from vkv_jax.evaluation.harness import DEFAULT_METHODS

    ap = argparse.ArgumentParser(prog="python -m vkv_jax.evaluation.kv_dtypes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help=model_help())
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)))
    ap.add_argument("--kv-dtypes", default=",".join(QUANTIZED))
    ap.add_argument("--split", default="test", choices=["validation", "test"])
    ap.add_argument("--n", type=at_least(1), default=200, help="testbed questions")
    ap.add_argument("--batch-size", type=at_least(1), default=16)
    ap.add_argument("--out", default="vkv_jax_out/kv_dtypes")
    a = ap.parse_args(argv)

    def run(a) -> int:
        import vkv_jax
        from vkv_jax.evaluation import data as eval_data
        from vkv_jax.evaluation.harness import shapes_config
        from vkv_jax.methods import available

        methods = parse_names(a.methods, "--methods", available())
        budgets = parse_budgets(a.budgets)
        kv_dtypes = parse_names(a.kv_dtypes, "--kv-dtypes", list(QUANTIZED))
        model = vkv_jax.load(a.model)
        examples = eval_data.shapes(a.split, a.n, shapes_config(model))
        config = {"command": "python -m vkv_jax.evaluation.kv_dtypes " + " ".join(argv if argv is not None
                                                                                  else sys.argv[1:]),
                  "model": a.model or "default", "model_name": os.path.basename(os.fspath(model.path)),
                  "split": a.split, "n": a.n, "loadavg_start": os.getloadavg()}
        out = pathlib.Path(a.out)
        out.mkdir(parents=True, exist_ok=True)

        def write(rows):
            (out / "results.json").write_text(json.dumps({"config": config, "rows": rows}, indent=1) + "\n")
            (out / "results.md").write_text("# Quantized KV against unquantized, cell by cell\n\n"
                                            + markdown(rows, config))

        rows = compare(model, examples, methods, budgets, kv_dtypes, batch_size=a.batch_size, on_cell=write)
        print(markdown(rows, config))
        print(f"wrote results.json, results.md to {out}")
        return 0

    return run_cli(run, a)


if __name__ == "__main__":
    raise SystemExit(main())
