"""Every method option is checked when the method is built, by the same rules the command line reads
`--option` with (`vkv_jax.methods.options`): a wrong type is a TypeError, a value out of range or an option
that does not apply a ValueError, each naming the value. Budgets of any real number type are read by value
(numpy floats of every width are ratios, numpy integers counts)."""

from __future__ import annotations

import dataclasses
import math
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import vkv_jax
from vkv_jax import budgets
from vkv_jax.cli import common
from vkv_jax.methods import Compression, available, build, factory, takes_budget
from vkv_jax.methods.options import rule_of

BUDGETED = [name for name in available() if takes_budget(name)]
# the five methods the bug report names (np.float32(0.1) kept 1 text token per layer instead of 7)
REPORTED = ["snapkv", "aircache", "vlcache", "h2o", "streamingllm"]


# ----------------------------------------------------------------------------- budgets by value

@pytest.mark.parametrize("name", BUDGETED)
@pytest.mark.parametrize("ratio", [np.float16(0.1), np.float32(0.1), np.float64(0.1), ml_dtypes.bfloat16(0.1),
                                   np.array(0.1, np.float32), np.array(0.1), jnp.asarray(0.1, jnp.float32),
                                   jnp.asarray(0.1, jnp.bfloat16)], ids=repr)
def test_a_float_budget_of_any_width_is_the_ratio_it_reads_as(name, ratio):
    method = build(Compression(name, budget=ratio))
    assert method == build(Compression(name, budget=0.1))
    assert type(method.budget) is float and method.budget == 0.1
    assert budgets.static_count(method.budget, 75) == 7  # floor(0.1 * 75); the count reading gave 1


@pytest.mark.parametrize("name", BUDGETED)
@pytest.mark.parametrize("count", [np.int8(24), np.uint16(24), np.int32(24), np.int64(24), np.array(24),
                                   jnp.asarray(24, jnp.int32)], ids=repr)
def test_an_integer_budget_of_any_type_is_a_token_count(name, count):
    method = build(Compression(name, budget=count))
    assert method == build(Compression(name, budget=24))
    assert type(method.budget) is int


def test_narrow_floats_are_read_as_the_decimal_they_round_to():
    # np.float32(0.3) is 0.30000001192...: read by value it is the ratio 0.3 (what numpy prints), so 0.3 * 10
    # floors to 3; numpy's own shortest round-trip repr is the independent reference
    assert budgets.number(np.float32(0.3)) == 0.3 and budgets.number(np.float16(0.7)) == 0.7
    assert budgets.static_count(budgets.check_budget(np.float32(0.3)), 10) == 3
    rng = np.random.default_rng(0)
    for dtype in (np.float16, np.float32):
        for x in rng.uniform(0, 1, 300).astype(dtype):
            assert budgets.number(x) == float(np.format_float_positional(x, unique=True)), x


def test_float32_budget_keeps_what_the_python_float_keeps(shapes_model):
    """End to end: the shipped bug kept 1 text token per layer for np.float32(0.1) (read as a count)."""
    import PIL.Image

    image = PIL.Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    inputs = shapes_model.prepare([[image]], ["what colour is the square in the top row?"])
    kept = {}
    for budget in (0.1, np.float32(0.1)):
        out = vkv_jax.generate(shapes_model, inputs, 2, Compression("snapkv", budget=budget))
        kept[type(budget).__name__] = out.stats["kept_text_per_layer"] + out.stats["kept_vision_per_layer"]
    expected = math.floor(0.1 * inputs.prompt_lengths[0] + 1e-6)
    assert kept["float32"] == kept["float"]
    assert kept["float"][0] + kept["float"][len(kept["float"]) // 2] == expected  # text + vision of layer 0


# ----------------------------------------------------------------------------- the reported cases

@pytest.mark.parametrize("name, options, error, needle", [
    ("full", {"budget": 0.5}, ValueError, "budget 0.5 does not apply to compression method 'full'"),
    ("lightkv", {"budget": 0.5}, ValueError, "budget 0.5 does not apply to compression method 'lightkv'"),
    ("pyramidkv", {"beta": -1}, ValueError, "pyramidkv's beta must be an integer >= 1, got -1"),
    ("pyramidkv", {"beta": 0}, ValueError, "pyramidkv's beta must be an integer >= 1, got 0"),
    ("pyramidkv", {"beta": 2.5}, TypeError, "pyramidkv's beta must be an integer >= 1, got 2.5"),
    ("vlcache", {"renormalize": "yes"}, TypeError, "vlcache's renormalize must be a boolean (True or False), "
                                                   "got 'yes'"),
    ("aircache", {"exact_sum": 3}, TypeError, "aircache's exact_sum must be a boolean (True or False), got 3"),
    ("snapkv", {"window": 32.0}, TypeError, "snapkv's window must be an integer >= 1, got 32.0"),
    ("snapkv", {"pooling": "mean"}, ValueError, "snapkv's pooling must be one of 'max', 'avg', got 'mean'"),
    ("h2o", {"block": 0}, ValueError, "h2o's block must be an integer >= 1, got 0"),
    ("h2o", {"recent_fraction": float("nan")}, ValueError, "h2o's recent_fraction must be a number in [0, 1]"),
    ("random", {"seed": -1}, ValueError, "random's seed must be an integer in [0, 4294967295], got -1"),
    ("streamingllm", {"n_sink": True}, TypeError, "streamingllm's n_sink must be an integer >= 0, got True"),
    ("vlcache", {"beta_min": 0.5, "beta_max": 0.2}, ValueError, "beta_min 0.5 must be <= beta_max 0.2"),
    ("aircache", {"eps": 0.0}, ValueError, "aircache's eps must be a number > 0, got 0.0"),
    ("csp", {"combine": 1}, TypeError, "csp's combine must be one of 'concat', 'union_dedup', 'and', got 1"),
    ("fastv", {"k": "2"}, TypeError, "fastv's k must be an integer >= 1, got '2'"),
    ("lightkv", {"xi_axis": "rows"}, ValueError, "lightkv's xi_axis must be one of 'query', 'key', got 'rows'"),
    ("lightkv", {"merge_windows": (2, 0)}, ValueError, "merge_windows entry 0 (of (2, 0)) must be an integer >= 1"),
    ("lightkv", {"merge_ratios": "0.5-x"}, TypeError, "merge_ratios entry 'x' (of '0.5-x') must be a number in [0, 1]"),
    ("lightkv", {"merge_layers": (1.5,)}, TypeError, "1.5 is not an integer"),
    ("adakv", {"alpha_safeguard": 2}, ValueError, "adakv's alpha_safeguard must be a number in [0, 1], got 2"),
    ("adakv", {"base": 3}, TypeError, "adakv base must be a scorer method's name or a method object, got 3"),
    ("snapkv", {"budget": True}, TypeError, "got True (a bool)"),
    ("snapkv", {"budget": "0.1"}, TypeError, "got '0.1' (a str)"),
    ("snapkv", {"no_such_option": 1}, ValueError, "compression method 'snapkv' has no option 'no_such_option'"),
])
def test_bad_options_are_refused_at_construction(name, options, error, needle):
    with pytest.raises(error, match=re.escape(needle)):
        Compression(name, **options)


# ----------------------------------------------------------------------------- every rule, both ways

def ruled_options() -> list[tuple[str, str]]:
    out = []
    for name in available():
        cls = factory(name)
        out += [(name, f.name) for f in dataclasses.fields(cls) if rule_of(f) is not None and f.name != "budget"]
    return out


# options that are not plain values: a base method, its options, LightKV's schedules (checked by
# `_layer_tuple` / `_as_tuple`, covered above) and the per-batch grids `vkv_jax.generate` binds
UNRULED = {"base", "base_options", "merge_layers", "merge_windows", "merge_ratios", "grids", "visual_tokens"}


def test_every_option_of_every_method_has_a_rule():
    for name in available():
        cls = factory(name)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.init and f.name not in UNRULED and rule_of(f) is None and f.name != "budget"]
        assert not missing, (name, missing)
        budget = {f.name: f for f in dataclasses.fields(cls)}["budget"]
        assert rule_of(budget) is not None or not takes_budget(name), name


def bad_values(rule) -> list[tuple[object, type]]:
    """A wrong type and an out-of-range value for a rule, each with the error it must raise."""
    if rule.kind == "bool":
        return [(1, TypeError), ("true", TypeError)]
    if rule.kind == "choice":
        return [(0, TypeError), ("no-such-choice", ValueError)]
    out = [("1", TypeError), (True, TypeError), (float("inf"), TypeError if rule.kind == "int" else ValueError)]
    if rule.kind == "int":
        out.append((1.0, TypeError))
    if rule.lo is not None:
        out.append((rule.lo if rule.lo_open else rule.lo - 1, ValueError))
    if rule.hi is not None:
        out.append((rule.hi if rule.hi_open else rule.hi + 1, ValueError))
    return out


@pytest.mark.parametrize("name, key", ruled_options())
def test_api_and_command_line_refuse_the_same_values(name, key):
    rule = rule_of({f.name: f for f in dataclasses.fields(factory(name))}[key])
    for value, error in bad_values(rule):
        with pytest.raises(error, match=re.escape(f"{name}'s {key} must be {rule.describe()}")):
            Compression(name, **{key: value})
        if isinstance(value, str) or error is TypeError:
            continue  # a type the command line cannot spell: its text reads as the rule's type
        text = "none" if value is None else str(value)
        with pytest.raises(ValueError, match=re.escape(f"--option '{key}={text}': {name}'s {key} must be")):
            common.parse_options([f"{key}={text}"], name)
    default = {f.name: f for f in dataclasses.fields(factory(name))}[key].default
    assert build(Compression(name, **{key: default})) == build(Compression(name))  # the default passes its rule
