"""The command-line tools: a user error is one `error: ...` line on stderr and exit code 2, raised before
any model is loaded; every option's --help says what it means and its default; the no-argument
`python -m vkv_jax.generate` demo asks a question whose answer is read from the image and prints its KV
memory truthfully. In-process (`main([...])`) except for one `--help` run of the real entry point."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import numpy as np
import pytest

import vkv_jax
from vkv_jax import default_model
from vkv_jax.bench import latency, prefill
from vkv_jax.cli import common
from vkv_jax.cli import generate as gen
from vkv_jax.evaluation import harness
from vkv_jax.methods import available, build
from vkv_jax.testbed import synthetic, train


@pytest.fixture
def no_model_load(monkeypatch):
    """A CLI that gets as far as loading a model has not checked its arguments up front."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(vkv_jax, "load", refuse)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("not a folder")
    return str(path)


def run(main, argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of an in-process CLI run; argparse's own errors exit via SystemExit."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_user_error(rc: int, err: str, *needles: str) -> str:
    """Exit code 2, one `error: ...` line naming every needle, no traceback; returns the line."""
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- generate

BUDGET_MEANING = "a ratio in (0, 1] or an integer token count in 2..2147483647"


@pytest.mark.parametrize("argv, needles", [
    (["--method", "aircache", "--option", "exact_sum=yes"], ["exact_sum", "boolean", "'yes'"]),
    (["--method", "fastv", "--option", "k=abc"], ["fastv's k must be an integer", "'abc'"]),
    (["--method", "fastv", "--option", "depth=3"], ["no option 'depth'", "k"]),
    (["--method", "snapkv", "--option", "budget=0.2"], ["--budget"]),
    (["--option", "k=3"], ["--option needs --method"]),
    (["--budget", "abc"], ["--budget 'abc' is not a number", BUDGET_MEANING]),
    (["--method", "snapkv", "--budget", "2.5"], ["--budget '2.5' is out of range", BUDGET_MEANING]),
    (["--method", "snapkv", "--budget", "0"], ["--budget '0'", BUDGET_MEANING]),
    (["--seed", "-1"], ["--seed must be >= 0", "-1"]),
    (["--seed", str(2 ** 32)], ["--seed", "2**32", str(2 ** 32)]),
    (["--method", "full", "--budget", "0.1"], ["--budget 0.1 does not apply to --method full"]),
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--temperature", "inf"], ["--temperature", "inf"]),
    (["--temperature", "-0.5"], ["--temperature", "-0.5"]),
    (["--top-k", "-3"], ["--top-k must be an integer >= 0", "-3"]),
    (["--top-p", "0"], ["--top-p must be a number in (0, 1]", "0"]),
    (["--top-p", "1.5"], ["--top-p must be a number in (0, 1]", "1.5"]),
    (["--method", "nope"], ["unknown compression method 'nope'", "aircache"]),
    (["--method", "fastv", "--prefill-chunk", "64"], ["--prefill-chunk does not apply to --method fastv"]),
    (["--model", "/nonexistent/llava"], ["--model '/nonexistent/llava' does not exist", "checkpoint folder"]),
    (["--image", "/nonexistent/cat.png", "--prompt", "hi"], ["--image '/nonexistent/cat.png': no such file"]),
    (["--mesh", "4x4"], ["a 4 x 4 mesh needs 16 devices", "1 available"]),
])
def test_generate_user_errors(argv, needles, tmp_path, capsys, no_model_load):
    rc, err = run(gen.main, [*argv, "--out", str(tmp_path / "out")], capsys)
    assert_user_error(rc, err, *needles)


def test_generate_rejects_an_image_folder_and_an_out_file(tmp_path, a_file, capsys, no_model_load):
    rc, err = run(gen.main, ["--image", str(tmp_path), "--prompt", "hi"], capsys)
    assert_user_error(rc, err, f"--image '{tmp_path}' is a folder", "image file")
    rc, err = run(gen.main, ["--out", a_file], capsys)
    assert_user_error(rc, err, f"--out '{a_file}' is an existing file", "folder")


def test_generate_argparse_errors_exit_2(capsys):
    rc, err = run(gen.main, ["--max-new-tokens", "0"], capsys)
    assert rc == 2 and "--max-new-tokens" in err and ">= 1" in err and "Traceback" not in err
    rc, err = run(gen.main, ["--prefill-chunk", "0"], capsys)
    assert rc == 2 and "--prefill-chunk" in err and ">= 1" in err and "Traceback" not in err
    rc, err = run(gen.main, ["--mesh", "1y8"], capsys)
    assert rc == 2 and "--mesh" in err and "DATAxMODEL" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- option values

def test_options_take_the_type_of_the_method_field():
    assert common.parse_options(["exact_sum=1", "a_rel=1", "impl=auto"], "aircache") == \
        {"exact_sum": True, "a_rel": 1.0, "impl": "auto"}
    assert common.parse_options(["exact_sum=FALSE"], "aircache") == {"exact_sum": False}
    opts = common.parse_options(["query_rows=none", "head_shared=0", "p=0.02"], "vlcache")
    assert opts == {"query_rows": None, "head_shared": False, "p": 0.02}
    assert common.parse_options(["query_rows=8"], "vlcache") == {"query_rows": 8}
    assert isinstance(common.parse_options(["a_rel=1"], "aircache")["a_rel"], float)
    # tuple-valued options keep the "a-b-c" string the method itself parses
    lightkv = build(vkv_jax.Compression("lightkv", **common.parse_options(
        ["merge_layers=0-1", "merge_windows=2", "keep_original_positions=1"], "lightkv")))
    assert lightkv.merge_layers == (0, 1) and lightkv.keep_original_positions is True
    for bad in ("yes", "on", "2", ""):
        with pytest.raises(ValueError, match="exact_sum must be a boolean"):
            common.parse_options([f"exact_sum={bad}"], "aircache")
    with pytest.raises(ValueError, match="k must be an integer"):
        common.parse_options(["k=2.5"], "fastv")


def test_budget_parser():
    assert common.parse_budget("0.1") == 0.1 and common.parse_budget("1") == 1.0
    assert common.parse_budget("64") == 64 and isinstance(common.parse_budget("64.0"), int)
    for bad in ("abc", "-1", "0", "nan", "inf", "2.5", ""):
        with pytest.raises(ValueError, match=re.escape(BUDGET_MEANING)):
            common.parse_budget(bad, "--budgets")


# ----------------------------------------------------------------------------- evaluate

@pytest.mark.parametrize("argv, needles", [
    (["--methods", "csp", "--budgets", "0.01"],
     ["no method x budget cell can run", "csp@0.01", "recent_ratio"]),
    (["--budgets", "0.1,abc"], ["--budgets 'abc' is not a number", BUDGET_MEANING]),
    (["--methods", "full,bogus"], ["--methods: unknown 'bogus'", "snapkv"]),
    (["--ablations", "noise"], ["--ablations 'noise'", "blank"]),
    (["--data", "/nonexistent/b.jsonl"], ["--data '/nonexistent/b.jsonl': no such file"]),
])
def test_evaluate_user_errors(argv, needles, tmp_path, capsys, no_model_load):
    rc, err = run(harness.main, [*argv, "--out", str(tmp_path / "out")], capsys)
    assert_user_error(rc, err, *needles)


def test_evaluate_rejects_an_out_file_and_a_data_folder(tmp_path, a_file, capsys, no_model_load):
    rc, err = run(harness.main, ["--out", a_file], capsys)
    assert_user_error(rc, err, f"--out '{a_file}' is an existing file")
    rc, err = run(harness.main, ["--data", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert_user_error(rc, err, f"--data '{tmp_path}' is a folder")


def test_evaluate_argparse_errors_exit_2(capsys):
    for flag, value in (("--batch-size", "0"), ("--limit", "-1"), ("--suffix", "-1")):
        rc, err = run(harness.main, [flag, value], capsys)
        assert rc == 2 and flag in err and "Traceback" not in err


# ----------------------------------------------------------------------------- bench, bench_prefill

@pytest.mark.parametrize("argv, needles", [
    (["--config", "bogus"], ["--config 'bogus'", "cpu-156m", "smoke", "llava-1.5-7b"]),
    (["--methods", "snapkv,bogus"], ["--methods: unknown 'bogus'"]),
    (["--budgets", "x"], ["--budgets 'x' is not a number", BUDGET_MEANING]),
    (["--methods", "csp", "--budgets", "0.05"], ["--methods csp with --budgets 0.05", "recent_ratio"]),
    (["--dtype", "float16"], ["--dtype: unknown 'float16'", "bfloat16"]),
    (["--seed", "-2"], ["--seed must be >= 0"]),
    (["--config", "smoke", "--visual-tokens", "20"], ["--visual-tokens 20", "multiple"]),
])
def test_bench_user_errors(argv, needles, tmp_path, capsys):
    rc, err = run(latency.main, [*argv, "--out", str(tmp_path / "out")], capsys)
    assert_user_error(rc, err, *needles)
    assert not (tmp_path / "out").exists()  # nothing ran


def test_bench_rejects_an_out_file(a_file, capsys):
    rc, err = run(latency.main, ["--config", "smoke", "--out", a_file], capsys)
    assert_user_error(rc, err, f"--out '{a_file}' is an existing file")


@pytest.mark.parametrize("flag, value", [("--batch", "0"), ("--batch", "1,x"), ("--visual-tokens", "0"),
                                         ("--visual-tokens", "-64"), ("--new-tokens", "1"), ("--text-tokens", "1")])
def test_bench_argparse_errors_exit_2(flag, value, capsys):
    rc, err = run(latency.main, [flag, value], capsys)
    assert rc == 2 and f"argument {flag}" in err and value in err and "Traceback" not in err


def test_bench_prefill_user_errors(capsys):
    rc, err = run(prefill.main, ["--methods", "full,bogus"], capsys)
    assert_user_error(rc, err, "--methods: unknown 'bogus'", "lightkv")
    rc, err = run(prefill.main, ["--layers", "0"], capsys)
    assert rc == 2 and "argument --layers" in err and ">= 1" in err


def test_bench_prefill_methods_take_commas_and_spaces(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(prefill, "bench", lambda methods, *a, **k: calls.append(methods) or [])
    for argv in (["--methods", "full,fastv", "--json"], ["--methods", "full", "fastv", "--json"],
                 ["--methods", "full,", "fastv,full", "--json"]):
        assert prefill.main(argv) == 0
    assert calls == [["full", "fastv"]] * 3
    capsys.readouterr()


# ----------------------------------------------------------------------------- --help

PARSERS = {"generate": gen.build_parser, "evaluate": harness.build_parser, "bench": latency.build_parser,
           "bench_prefill": prefill.build_parser, "testbed.train": train.build_parser}


def _help_blocks(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{option string: its help text in `format_help()`}, whitespace removed (so wrapping is ignored)."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in parser.format_help().splitlines():
        if re.match(r"^  -", line):
            current = line.split()[0].rstrip(",")
            blocks[current] = [line]
        elif current is not None and line.startswith("   "):
            blocks[current].append(line)
        else:
            current = None
    return {k: re.sub(r"\s", "", " ".join(v)) for k, v in blocks.items()}


@pytest.mark.parametrize("tool", PARSERS)
def test_every_option_says_what_it_means_and_its_default(tool):
    parser = PARSERS[tool]()
    blocks = _help_blocks(parser)
    for action in parser._actions:  # noqa: SLF001 - the parser's own list of options
        if isinstance(action, argparse._HelpAction):  # noqa: SLF001
            continue
        name = action.option_strings[0]
        assert action.help, f"{tool} {name} has no help"
        block = blocks[name]
        if action.default not in (None, False):
            default = action.default
            shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
            said = block.partition("default:")[2]  # what the help says the default is
            assert re.sub(r"\s", "", shown) in said, (tool, name, default, block)
        elif action.nargs != 0:  # a value option without a default says what happens without it
            assert "default:" in block, (tool, name, block)
    first_paragraph = parser.description.strip().split("\n\n")[0]
    assert first_paragraph.endswith("."), first_paragraph  # not cut mid-sentence


def test_bench_description_is_not_cut():
    assert latency.build_parser().description.endswith("in one run.")


def test_generate_help_lists_every_method_with_its_budget():
    res = subprocess.run([sys.executable, "-m", "vkv_jax.generate", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line.startswith("  ") and
             line.split()[0] in available()}
    assert set(lines) == set(available())
    assert "visual tokens" in lines["aircache"] and "whole prompt" in lines["snapkv"]
    assert "after layer k" in lines["fastv"] and "base scorer" in lines["adakv"]
    assert "no budget" in lines["full"] and "merge" in lines["lightkv"]
    for name in available():
        default = getattr(build(vkv_jax.Compression(name)), "budget", None)
        if isinstance(default, (int, float)):
            assert f"(default {default})" in lines[name], lines[name]


# ----------------------------------------------------------------------------- the default demo

def test_demo_example_is_the_first_from_seed_that_is_read_from_the_image():
    config = synthetic.ShapesConfig(image_size=64)

    def asks_the_image(i):
        ex = synthetic.make_example(i, "test", config, with_image=False)
        return ex.qtype in ("colour_of_shape", "shape_at") and ex.answer not in ("none", "no", "0")

    for start in (0, 5, 100):
        index = gen.demo_example_index(start, config)
        assert index >= start and asks_the_image(index)
        assert not any(asks_the_image(i) for i in range(start, index))
    assert synthetic.make_example(0, "test", config, with_image=False).answer == "none"  # why the search
    assert gen.demo_example_index(0, config) > 0


@pytest.mark.skipif(not default_model.is_shipped(), reason="no trained model shipped")
def test_default_demo_end_to_end(tmp_path, capsys):
    assert gen.main(["--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    index = int(re.search(r"synthetic test example (\d+): the first from --seed 0", out).group(1))
    assert (tmp_path / f"example_{index}.png").exists()
    expected = re.search(r"^expected: (\S+)$", out, re.M).group(1)
    assert expected not in ("none", "no", "0")
    full = re.search(r"^\[full\] answer: '(.*)'$", out, re.M).group(1)
    assert full.split()[0] == expected  # the shipped model reads the image (99.6% exact match)
    assert re.search(r"^\[aircache @ 0\.1\] answer: '.*'$", out, re.M)
    assert f"note: {gen.POST_PREFILL_NOTE}" in out  # AirCache cannot change the first answer token
    heads = vkv_jax.load().config.text.num_kv_heads
    kept = re.findall(rf"kept tokens per layer, mean over the {heads} KV heads: text \[([^]]*)\] vision \[([^]]*)\]",
                      out)
    assert len(kept) == 2, out  # one line per run, saying what the numbers average
    assert all(re.fullmatch(r"\d+(\.\d\d)?", x) for text, vision in kept for x in (text + ", " + vision).split(", "))
    live = [(float(a), float(b)) for a, b in re.findall(r"KV live ([\d.]+) KiB \(\d+% of the full cache's "
                                                        r"([\d.]+) KiB\)", out)]
    allocated = [tuple(map(float, m)) for m in re.findall(
        r"KV allocated ([\d.]+) KiB: prompt pages ([\d.]+) KiB \(([\d.]+)x live\) \+ decode segment ([\d.]+) KiB "
        r"\((\d+) slots", out)]
    assert len(live) == len(allocated) == 2
    (full_live, full_full), (air_live, air_full) = live
    assert full_live == full_full == air_full and air_live < full_live
    cfg = vkv_jax.load().config.text
    for (kib, pages, _ratio, segment, slots), (live_kib, _) in zip(allocated, live):  # paged: pages follow live
        assert abs(kib - pages - segment) < 0.15 and live_kib <= pages <= 1.15 * live_kib + 0.1
        slot_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
        assert slots == 16 and abs(segment * 1024 - slot_bytes * slots) < 60


# ----------------------------------------------------------------------------- one error line, every tool

@pytest.fixture
def no_training(monkeypatch):
    """testbed.train that gets as far as building data or a model has not checked its arguments."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(train, "train", refuse)
    monkeypatch.setattr(train, "evaluate_checkpoint", refuse)


@pytest.mark.parametrize("argv, needles", [
    (["--evaluate", "/nonexistent/run/best"], ["--evaluate '/nonexistent/run/best' does not exist"]),
    (["--sizes", "{bad json"], ["--sizes '{bad json' is not valid JSON"]),
    (["--sizes", "[1, 2]"], ["--sizes '[1, 2]' must be a JSON object"]),
    (["--sizes", '{"depth": 3}'], ["--sizes: unknown size 'depth'", "num_layers"]),
    (["--sizes", '{"num_layers": 2.5}'], ["--sizes: num_layers must be a positive integer", "2.5"]),
    (["--sizes", '{"num_layers": 2}', "--ground-layer", "2"], ["--ground-layer 2 is out of range", "2-layer"]),
    (["--image-size", "60"], ["--image-size 60 must be a multiple of the 8-pixel patch"]),
    (["--stop-at", "3", "10"], ["--stop-at STAGE must be 1 or 2, got 3"]),
    (["--qtype-weights", "shape_at=x"], ["--qtype-weights item 'shape_at=x'"]),
    (["--qtype-weights", "bogus=2"], ["unknown question type 'bogus'"]),
    (["--ground-types", "shape_at,bogus"], ["--ground-types: unknown question type 'bogus'"]),
    (["--teacher", "/nonexistent/teacher"], ["--teacher '/nonexistent/teacher' does not exist"]),
])
def test_testbed_train_user_errors(argv, needles, tmp_path, capsys, no_training):
    rc, err = run(train.main, [*argv, "--out", str(tmp_path / "run")], capsys)
    assert_user_error(rc, err, *needles)
    assert not (tmp_path / "run").exists()  # nothing ran


def test_testbed_train_out_file(a_file, capsys, no_training):
    rc, err = run(train.main, ["--out", a_file], capsys)
    assert_user_error(rc, err, f"--out '{a_file}' is an existing file")


@pytest.mark.parametrize("tool, argv, needle", [
    (gen.main, ["--max-new-tokens", "0"], "argument --max-new-tokens"),
    (gen.main, ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (harness.main, ["--batch-size", "0"], "argument --batch-size"),
    (latency.main, ["--batch", "1,x"], "argument --batch"),
    (prefill.main, ["--layers", "0"], "argument --layers"),
    (train.main, ["--minutes", "-1"], "argument --minutes"),
    (train.main, ["--minutes", "nan"], "argument --minutes"),
    (train.main, ["--batch", "0"], "argument --batch"),
    (train.main, ["--s2-steps", "-5"], "argument --s2-steps"),
    (train.main, ["--lr", "0"], "argument --lr"),
    (train.main, ["--limit", "0", "--evaluate", "tiny-llava"], "argument --limit"),
    (train.main, ["--split", "dev", "--evaluate", "tiny-llava"], "argument --split"),
])
def test_argparse_errors_are_one_error_line(tool, argv, needle, capsys, no_training):
    rc, err = run(tool, argv, capsys)
    assert_user_error(rc, err, needle)


def test_a_type_error_is_one_error_line_not_a_traceback(capsys, no_model_load):
    # lightkv's schedules take any spelling ("0-1", a number), so a float reaches the method: a TypeError
    rc, err = run(gen.main, ["--method", "lightkv", "--option", "merge_windows=2.5"], capsys)
    assert_user_error(rc, err, "lightkv's merge_windows entry 2.5 (of 2.5) must be an integer >= 1")

    def body(_):
        raise TypeError("bad\nvalue")

    assert common.run_cli(body, None) == 2
    assert capsys.readouterr().err == "error: bad value\n"


def test_generate_video_that_is_a_pickle_names_the_flag(tmp_path, capsys, no_model_load):
    path = tmp_path / "frames.npy"
    np.save(path, np.array([{"frame": 0}], dtype=object), allow_pickle=True)
    rc, err = run(gen.main, ["--video", str(path), "--prompt", "what happens?"], capsys)
    assert_user_error(rc, err, f"--video '{path}' holds pickled Python objects", "uint8")
    path.write_bytes(b"\x93NUMPY garbage")
    rc, err = run(gen.main, ["--video", str(path), "--prompt", "what happens?"], capsys)
    assert_user_error(rc, err, f"--video '{path}' is not a readable .npy array of frames")


def test_help_examples_run_on_the_default_model():
    """Every `--method M --option K=V` example in generate's --help builds and schedules on the default model."""
    from vkv_jax.methods import reduction_schedule

    text = re.sub(r"\s+", " ", gen.build_parser().format_help())
    examples = re.findall(r"--method (\w+) --option (\w+=[\w.-]+)", text)
    assert {name for name, _ in examples} >= {"fastv", "lightkv"}, text
    cfg = vkv_jax.load().config
    for name, item in examples:
        method = build(vkv_jax.Compression(name, **common.parse_options([item], name)))
        schedule = reduction_schedule(method, cfg.text.num_layers, cfg.num_image_tokens)
        assert schedule is not None and schedule.stages, (name, item)  # it reduces something on this model
