"""The method contract (`vkv_jax.methods.base.Method`): a method defined in one file that only gives its
scores (tests/one_file_method.py) runs on every path a built-in method does: `generate` with either pool,
chunked prefill, the evaluation harness and the bench (the mesh: tests/test_sharding.py runs it too); and
nothing outside the method base asks a method what it can do by probing it."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import one_file_method
import pytest

import vkv_jax
from vkv_jax import budgets, configs, prefill
from vkv_jax.bench import cells
from vkv_jax.bench import latency as bench
from vkv_jax.evaluation import harness
from vkv_jax.methods import AdaKV, SnapKV, build, register, unregister

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUDGET = 0.25


@pytest.fixture(scope="module", autouse=True)
def keynorm_registered():
    """"keynorm" exists for this module's tests only (the other tests assert the registry holds the built-ins)."""
    register(one_file_method.NAME, one_file_method.KeyNorm)
    yield
    unregister(one_file_method.NAME)


def _kept_positions(layout, l, b, h):
    n = layout["length"][l, b, h]
    return np.sort(layout["pos"][l, b, h, :n][layout["pos"][l, b, h, :n] >= 0])


def test_one_file_method_keeps_the_largest_key_norms_in_generate_with_either_pool(shapes_model, shapes_pair):
    _, inputs = shapes_pair
    model = shapes_model
    comp = vkv_jax.Compression("keynorm", budget=BUDGET)
    outs = {pool: vkv_jax.generate(model, inputs, 4, comp, kv_pool=pool, return_layout=True)
            for pool in ("fitted", "static")}
    np.testing.assert_array_equal(outs["fitted"].tokens, outs["static"].tokens)
    # the defining equation, from the prefill's own keys: top budget_count(0.25, row length) norms
    p = prefill.run_prompt(model.params, model.config, build(comp), jax.numpy.asarray(inputs.input_ids),
                           jax.numpy.asarray(inputs.valid), vkv_jax.inputs.device_images(inputs.pixel_values,
                                                                                            model.dtype))
    k, pos, valid = np.asarray(p.k, np.float32), np.asarray(p.ctx.positions), np.asarray(p.ctx.valid)
    norms = np.linalg.norm(k, axis=-1)  # [L, B, H, S]
    L, B, H, _ = norms.shape
    for b in range(B):
        count = budgets.static_count(BUDGET, int(valid[b].sum()))
        for l in range(L):
            for h in range(H):
                score = np.where(valid[b], norms[l, b, h], -np.inf)
                want = np.sort(pos[b][np.argsort(-score, kind="stable")[:count]])
                np.testing.assert_array_equal(_kept_positions(outs["fitted"].layout, l, b, h), want)


def test_one_file_method_runs_chunked_with_the_same_keep_sets(shapes_model, shapes_pair):
    _, inputs = shapes_pair
    comp = vkv_jax.Compression("keynorm", budget=BUDGET)
    one = vkv_jax.generate(shapes_model, inputs, 4, comp, return_layout=True)
    chunked = vkv_jax.generate(shapes_model, inputs, 4, comp, return_layout=True, prefill_chunk=32)
    np.testing.assert_array_equal(chunked.layout["length"], one.layout["length"])
    np.testing.assert_array_equal(chunked.layout["pos"], one.layout["pos"])


def test_one_file_method_runs_in_the_evaluation_harness(shapes_model, shapes_pair):
    exs, _ = shapes_pair
    full, ours = harness.evaluate(shapes_model, exs, [vkv_jax.Compression("full"),
                                                      vkv_jax.Compression("keynorm", budget=BUDGET)],
                                  batch_size=2, max_new_tokens=2, progress=False)
    assert 0 < ours.kv_bytes < full.kv_bytes and full.kv_fraction == pytest.approx(1.0)
    assert ours.kv_fraction < 0.5
    assert harness.lowest_budget("keynorm") == 0.005  # the contract's default answer


def test_one_file_method_runs_in_the_bench():
    preset = configs.load_preset("smoke")
    cfg = preset.config
    params = vkv_jax.models.loading.random_params(cfg, 0, jax.numpy.float32)
    setting = bench.Setting("float32", 1, 32, 24)
    ids, pix = bench.make_inputs(cfg, setting.batch, setting.visual_tokens, setting.text_tokens)
    pbytes = vkv_jax.accounting.param_bytes(params)
    (full, ours), floor = cells.run_setting(params, cfg, setting, [vkv_jax.Compression("full"),
                                                                   vkv_jax.Compression("keynorm", budget=BUDGET)],
                                            ids, pix, 3, pbytes)
    assert "error" not in ours, ours.get("error")
    assert ours["decode_steps"] == 2 and ours["kv_bytes_live"] < full["kv_bytes_live"]


def test_adakv_answers_the_contract_as_its_base():
    ada = AdaKV(budget=0.2, base=SnapKV(window=8))
    assert ada.protected_window() == 8 and ada.chunk_observer() == "rows" and ada.traced_budget == "count"
    assert AdaKV(budget=0.2, base="h2o").chunk_observer() == "chunk"
    with pytest.raises(ValueError, match="not a scorer"):
        AdaKV(budget=0.2, base=build(vkv_jax.Compression("fastv")))


def test_a_method_class_outside_the_contract_is_refused():
    class Bare:  # no Method base: every hook would have to be probed
        budget = 0.1

    with pytest.raises(TypeError, match="subclass"):
        register("bare", Bare)


def test_no_code_outside_the_method_base_probes_a_method():
    """`getattr(method, ...)`, `hasattr(method, ...)` and class-name checks on methods live only in
    vkv_jax/methods/base.py (the contract answers every question). Reading a declared dataclass field's value
    (`getattr(method, field.name)`, as the option rules do) asks nothing and is allowed."""
    probe = re.compile(r"(getattr|hasattr)\((self\.)?(method|base|base_method|m)\b(?!, field\.name\))"
                       r"|type\((self\.)?method\)\.__name__ (==|in)")
    bad = []
    for path in (ROOT / "vkv_jax").rglob("*.py"):
        if path.name == "base.py" and path.parent.name == "methods":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if probe.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
