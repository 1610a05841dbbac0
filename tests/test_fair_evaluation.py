"""The fair comparison of methods: the equal-KV budget solver, the protocols, the reference rows, the
statistics (against known values), and the one recent-window rule of every method."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import make_ctx, random_qk, run_method

import vkv_jax
from vkv_jax.evaluation import harness, kv_grid, protocols, references, stats
from vkv_jax.methods import Compression, bind_budget, build, split_budget
from vkv_jax.testbed import synthetic


def _examples(n):
    return synthetic.make_examples("test", n, config=synthetic.ShapesConfig(image_size=64))


# ----------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("k,n,want", [(5, 10, (0.236593, 0.763407)), (0, 10, (0.0, 0.277533)),
                                      (10, 10, (0.722467, 1.0)), (81, 263, (0.2553, 0.3662))])
def test_wilson_interval_matches_published_values(k, n, want):
    # 5/10, 0/10, 10/10: Wilson's closed form; 81/263: Newcombe (1998), Stat. Med. 17, table I, method 3
    # (published to 4 decimals)
    np.testing.assert_allclose(stats.wilson(k, n), want, atol=6e-5 if n == 263 else 2e-6)


def test_wilson_interval_holds_the_observed_proportion_at_every_count():
    for n in (1, 7, 100, 200):
        for k in range(n + 1):
            low, high = stats.wilson(k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0
    assert stats.wilson(200, 200)[1] == 1.0 and stats.wilson(0, 200)[0] == 0.0


@pytest.mark.parametrize("a_only,b_only,want", [(1, 9, 22 / 1024), (3, 10, 2 * (1 + 13 + 78 + 286) / 8192),
                                                (5, 5, 1.0), (0, 0, 1.0), (0, 12, 2 / 4096)])
def test_exact_mcnemar_is_twice_the_binomial_tail_of_the_discordant_pairs(a_only, b_only, want):
    a = np.array([True] * a_only + [False] * b_only + [True] * 7 + [False] * 4)
    b = np.array([False] * a_only + [True] * b_only + [True] * 7 + [False] * 4)
    out = stats.mcnemar_exact(a, b)
    assert (out["a_only"], out["b_only"]) == (a_only, b_only)
    assert out["p"] == pytest.approx(want, rel=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    if a_only + b_only:
        assert out["p"] == pytest.approx(scipy_stats.binomtest(a_only, a_only + b_only, 0.5).pvalue, rel=1e-9)


# ----------------------------------------------------------------------------- the solver

def test_solver_hits_reachable_points_and_marks_the_floor_on_a_step_function():
    lengths = np.array([70, 73, 75, 78, 81])  # rows of different lengths: steps of about 1/75

    def share(b):  # SnapKV-like: max(1, floor(b * S)) kept of S per row, plus a 16% floor above 0.16
        return float(np.mean(np.maximum(1, np.floor(b * lengths + 1e-6)) / lengths))

    calls = []
    points = kv_grid.solve(lambda b: calls.append(b) or share(b), [0.05, 0.1, 0.2, 0.5], 0.005)
    for p in points:
        assert p.status == "hit" and abs(p.share - p.target) <= 0.005 and share(p.budget) == p.share
    assert len(calls) == len(set(calls)) <= 2 + 4 * 12  # memoised

    def floored(b):
        return 0.16 + 0.84 * b

    low, high = kv_grid.solve(floored, [0.05, 0.3], 0.005)
    assert low.status == "below floor" and low.share == pytest.approx(0.16 + 0.84 * 0.005)
    assert high.status == "hit" and abs(high.share - 0.3) <= 0.005


def test_solver_reports_a_point_that_falls_in_a_jump_as_missed_with_the_nearest_share():
    def coarse(b):  # shares 0, 0.25, 0.5, 0.75, 1 only
        return np.floor(b * 4) / 4

    (p,) = kv_grid.solve(coarse, [0.4], 0.005)
    assert p.status == "missed" and p.share == 0.5


def test_solver_hits_its_grid_points_on_hand_built_prompts(shapes_model):
    """On real left-padded prompts (questions of different lengths), the measured live KV share of SnapKV
    at the solved budget is within 0.5 points of each target; AirCache (all text kept) and text only sit at
    the text's share, so a lower target is below their floor."""
    model = shapes_model
    runner = harness.Runner(model, _examples(6), batch_size=3, max_new_tokens=1, protocol="template")
    for name in ("snapkv", "aircache"):
        runs = {}

        def measure(b, name=name, runs=runs):
            runs[b] = runner.run(build(Compression(name, budget=b)))
            return runs[b].share

        points = kv_grid.solve(measure, [0.05, 0.2, 0.4], harness.lowest_budget(name))
        for p in points:
            assert p.share == runs[p.budget].share
            if p.status == "hit":
                assert abs(p.share - p.target) <= kv_grid.TOLERANCE
        if name == "snapkv":
            assert [p.status for p in points] == ["hit"] * 3
        else:
            text = runner.run(references.reference_method("text only")).share
            assert points[0].status == "below floor" and points[0].share >= text
            assert [p.status for p in points[1:]] == ["hit", "hit"]


# ----------------------------------------------------------------------------- protocols

def test_template_protocol_with_the_full_cache_equals_plain_generation(shapes_model):
    """Prefill the whole prompt, drop the template's KV, re-feed it: with nothing evicted this is plain
    generation, and the KV share is 1 — so under a method only its eviction changes the answer."""
    model = shapes_model
    exs = _examples(3)
    inputs = model.prepare([e.image for e in exs], [e.question + " and more" * i for i, e in enumerate(exs)])
    assert (~inputs.valid).any()  # left padding is exercised
    plain = vkv_jax.generate(model, inputs, 3).text
    out = harness._answer(model, inputs, Compression("full"), 3, protocol="template")
    assert out.texts == plain and out.kv_bytes == out.kv_bytes_full
    logits = model.logits(inputs.input_ids, inputs.pixel_values, inputs.valid)[:, -1]
    import jax

    np.testing.assert_allclose(out.logprobs, np.asarray(jax.nn.log_softmax(logits)), atol=2e-4)


def test_template_protocol_drops_what_a_method_kept_of_the_template(shapes_model):
    model = shapes_model
    exs = _examples(3)
    inputs = model.prepare([e.image for e in exs], [e.question for e in exs])
    out = harness._answer(model, inputs, Compression("snapkv", budget=0.3), 2, protocol="template")
    n = inputs.valid.sum(1)
    pos, length = out.layout["pos"], out.layout["length"]
    live = (np.arange(pos.shape[-1]) < length[..., None]) & (pos >= 0)
    assert not (live & (pos >= (n - 2)[None, :, None, None])).any()  # no template slot survives compression
    assert 0.05 < out.kv_bytes / out.kv_bytes_full < 0.35


def test_multi_turn_follow_ups_are_what_the_chat_template_renders():
    """Turn 1's prompt + the fed follow-up = the shipped template's rendering of the whole dialogue."""
    from vkv_jax.testbed import train

    model = vkv_jax.load()
    size = model.config.vision.image_size
    exs = synthetic.make_examples("test", 2, config=synthetic.ShapesConfig(image_size=size))
    items = protocols.multi_turn_items(exs, 3, synthetic.ShapesConfig(image_size=size))
    assert [i.turn for i in items] == [2, 2, 3, 3] and items[2].question == exs[0].question
    inputs = model.prepare([i.image for i in items], [i.question for i in items])
    fed, alive = protocols.fed_tokens(model.tokenizer, items, None, "multi-turn")
    dialogue = [exs[0], *synthetic.more_questions(exs[0], 2, synthetic.ShapesConfig(image_size=size))]
    for b, k in ((0, 2), (2, 3)):
        ids, _ = train.conversation(model.tokenizer, [(q.question, q.answer) for q in dialogue[:k]],
                                    model.config.num_image_tokens)
        got = [*inputs.input_ids[b][inputs.valid[b]], *fed[b][alive[b]]]
        assert got == ids[:len(got)] and ids[len(got)] != model.tokenizer.token_to_id("assistant")
        assert items[b].answer == dialogue[k - 1].answer


def test_multi_turn_protocol_with_the_full_cache_equals_generating_from_the_whole_dialogue(shapes_model):
    model = shapes_model
    items = protocols.multi_turn_items(_examples(2), 3, synthetic.ShapesConfig(image_size=64))
    out = harness._answer(model, model.prepare([i.image for i in items], [i.question for i in items]),
                          Compression("full"), 2, protocol="multi-turn", items=items)
    whole = model.prepare([i.image for i in items], [i.question for i in items])
    fed, alive = protocols.fed_tokens(model.tokenizer, items, None, "multi-turn")
    for b in range(len(items)):  # one row at a time: the whole dialogue as one prompt
        ids = np.array([[*whole.input_ids[b][whole.valid[b]], *fed[b][alive[b]]]])
        one = vkv_jax.Inputs(input_ids=ids, valid=np.ones(ids.shape, bool), pixel_values=whole.pixel_values[b:b + 1],
                             prompt_lengths=[ids.shape[1]])
        assert vkv_jax.generate(model, one, 2).text[0] == out.texts[b]
    assert out.kv_bytes == out.kv_bytes_full


# ----------------------------------------------------------------------------- reference rows

def test_reference_rows_keep_the_text_and_a_budget_share_of_the_visual_tokens():
    ctx = make_ctx(40, [0, 5], [(2, 34), (2, 30)])
    q, k = random_qk(3, 2, 4, 2, 40, 8)
    text = np.asarray(ctx.valid & ~ctx.is_visual)
    n_vis = np.asarray(ctx.is_visual).sum(-1)
    _, plan = run_method(references.reference_method("text only"), q, k, ctx)
    assert (np.asarray(plan.count) == text.sum(-1)[None, :, None]).all()
    _, plan = run_method(references.reference_method("text + random visual", 0.25), q, k, ctx)
    kept_vis = np.asarray(plan.count) - text.sum(-1)[None, :, None]
    assert (np.abs(kept_vis - 0.25 * n_vis[None, :, None]) < 1).all()  # floor(r N_v + u), u in [0, 1)
    for b in range(2):  # every text token is kept
        idx = np.asarray(plan.indices)[0, b, 0, :int(plan.count[0, b, 0])]
        assert set(np.flatnonzero(text[b])) <= set(idx.tolist())
    recency = references.reference_method("recency only", 0.25)
    assert recency.n_sink == 0 and type(recency).__name__ == "StreamingLLM"


# ----------------------------------------------------------------------------- the recent-window rule

S_W, PADS_W = 48, [0, 7]


def _protected(name, **opts):
    """(protected [L, B, H] tail counts, counts [L, B, H], real lengths [B]) of a method's selection; the
    protected slots must be each row's last ones."""
    ctx = make_ctx(S_W, PADS_W, [(2, 34), (2, 30)], num_visual=None)
    q, k = random_qk(2, 2, 4, 2, S_W, 8, seed=3)
    m = build(Compression(name, **opts))
    stats_, _ = run_method(m, q, k, ctx)
    sel = m.selection(stats_, ctx)
    prot = np.asarray(sel.protected)
    n = prot.sum(-1)
    for idx in np.ndindex(*n.shape):  # a tail: exactly the last n slots
        assert prot[idx][S_W - n[idx]:].all()
    return n, np.asarray(sel.counts), S_W - np.array(PADS_W)


@pytest.mark.parametrize("name,opts,rule", [
    ("snapkv", {"budget": 40}, lambda C, S: np.minimum(32, C)),
    ("snapkv", {"budget": 10}, lambda C, S: np.minimum(32, C)),  # budget inside the window: recency
    ("snapkv", {"budget": 0.5, "window_ratio": 0.25}, lambda C, S: np.minimum(np.floor(0.25 * S + 1e-6), C)),
    ("pyramidkv", {"budget": 20, "window": 8}, lambda C, S: np.minimum(8, C)),
    ("adakv", {"budget": 20, "base_options": {"window": 6}}, lambda C, S: np.minimum(6, C)),
    ("h2o", {"budget": 0.5}, lambda C, S: np.floor(0.5 * C + 1e-6)),  # the H2O paper's 50/50
    ("h2o", {"budget": 0.5, "recent_fraction": 0.1}, lambda C, S: np.floor(0.1 * C + 1e-6)),  # VL-Cache's
    ("vlcache", {"budget": 0.3}, lambda C, S: np.floor(0.1 * C + 1e-6)),
])
def test_each_method_protects_the_recent_window_its_rule_gives(name, opts, rule):
    n, counts, lengths = _protected(name, **opts)
    if name == "adakv":  # AdaKV moves counts between heads; the window is the base's, per head
        counts = np.asarray(build(Compression("snapkv", budget=20, window=6)).counts(
            make_ctx(S_W, PADS_W, [(2, 34), (2, 30)]), *n.shape[:1], n.shape[2]))
    want = rule(counts, lengths[None, :, None])
    np.testing.assert_array_equal(n, want)


def test_recent_window_rule_is_never_more_than_the_budget_and_takes_one_size():
    from vkv_jax.methods._common import recent_window

    c = np.array([0, 3, 40])
    np.testing.assert_array_equal(recent_window(c, tokens=32), [0, 3, 32])
    np.testing.assert_array_equal(recent_window(c, of_budget=0.1), [0, 0, 4])
    np.testing.assert_array_equal(recent_window(c, of_prompt=0.1, prompt_len=30), [0, 3, 3])
    with pytest.raises(ValueError, match="exactly one"):
        recent_window(c, tokens=3, of_budget=0.5)


def test_snapkv_window_ratio_scores_each_row_over_its_own_window():
    """With window_ratio the observation rows of a shorter row are its own last floor(r * n) tokens: the
    batched scores equal each row scored alone with that fixed window."""
    from vkv_jax.methods.snapkv import snapkv_scores

    ctx = make_ctx(S_W, PADS_W, [(2, 34), (2, 30)])
    q, k = random_qk(1, 2, 4, 2, S_W, 8, seed=5)
    got = run_method(build(Compression("snapkv", budget=0.5, window_ratio=0.25)), q, k, ctx)[0][0]
    for b, pad in enumerate(PADS_W):
        n = S_W - pad
        w = int(np.floor(0.25 * n + 1e-6))
        alone = snapkv_scores(q[0, b:b + 1, :, pad:], k[0, b:b + 1, :, pad:], np.ones((1, n), bool), w, 7, "max")
        np.testing.assert_allclose(np.asarray(got[b])[:, pad:], np.asarray(alone[0]), rtol=1e-5, atol=1e-6)


def test_pyramidkv_rejects_a_window_ratio():
    with pytest.raises(ValueError, match="window_ratio"):
        build(Compression("pyramidkv", window_ratio=0.1))


# ----------------------------------------------------------------------------- the command line

def test_cli_writes_equal_kv_tables_with_intervals_per_protocol(shapes_llava, tmp_path):
    out = tmp_path / "out"
    rc = harness.main(["--model", str(shapes_llava), "--limit", "4", "--methods", "full,snapkv", "--kv-grid", "20,40",
                       "--protocols", "template,multi-turn", "--turns", "2", "--no-references", "--batch-size", "4",
                       "--max-new-tokens", "1", "--prior-questions", "0", "--ablations", "", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["kv_grid"] == [0.2, 0.4] and data["config"]["protocols"] == ["template", "multi-turn"]
    assert len(data["turn_questions"]) == 4 and {q["turn"] for q in data["turn_questions"]} == {2}
    runs = [(r["protocol"], r["method"], r["target"]) for r in data["results"]]
    assert runs == [("template", "full", None), ("template", "snapkv", 0.2), ("template", "snapkv", 0.4),
                    ("multi-turn", "full", None), ("multi-turn", "snapkv", 0.2), ("multi-turn", "snapkv", 0.4)]
    for r in data["results"]:
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        if r["target"] is not None and r["status"] == "hit":
            assert abs(r["kv_fraction"] - r["target"]) <= 0.005
    md = (out / "results.md").read_text()
    assert "## Protocol `template`" in md and "## Protocol `multi-turn`" in md and "20.0% KV" in md
    assert (out / "accuracy_vs_kv.png").stat().st_size > 1000 and not (out / "accuracy_vs_budget.png").exists()


@pytest.mark.parametrize("argv,match", [(["--kv-grid", "0"], "--kv-grid"), (["--protocols", "chat"], "--protocols"),
                                        (["--kv-grid", "x"], "--kv-grid")])
def test_cli_rejects_bad_grid_and_protocol_flags(argv, match, capsys):
    assert harness.main(argv) == 2
    assert match in capsys.readouterr().err


# ----------------------------------------------------------------------------- pooled and oracle rows

def _np_block_means(x, vis_start, side, pool):
    """numpy: {top-left visual ordinal: mean of its pool x pool block} for one [S, D] row of keys."""
    grid = x[vis_start:vis_start + side * side].reshape(side, side, -1)
    return {r * side + c: grid[r:r + pool, c:c + pool].reshape(-1, x.shape[-1]).mean(0)
            for r in range(0, side, pool) for c in range(0, side, pool)}


@pytest.mark.parametrize("pool", [2, 3])
def test_pooled_visual_keeps_the_text_and_each_block_mean_in_its_top_left_slot(pool):
    from vkv_jax import prefill

    side, pads, start = 5, [0, 3], 2  # a 5 x 5 grid: blocks at the right and bottom edges are partial
    S, L, H, D = 36, 2, 2, 4
    ctx = make_ctx(S, pads, [(start, start + side * side)] * 2, num_visual=side * side)
    rng = np.random.default_rng(0)
    k, v = (rng.normal(size=(L, 2, H, S, D)).astype(np.float32) for _ in range(2))
    method = references.reference_method(f"pooled visual {pool}x{pool}")
    stats = jnp.zeros((L, 2, H), jnp.int8)
    prompt = prefill.PromptPass(None, jnp.asarray(k), jnp.asarray(v), ctx, stats)
    cache = jax.jit(prefill.compact_prompt, static_argnums=1)(prompt, method)
    blocks = (-(-side // pool)) ** 2
    assert method.capacity(S, side * side) == S - side * side + blocks
    for b, pad in enumerate(pads):
        n_text = S - pad - side * side
        assert (np.asarray(cache.length)[:, b] == n_text + blocks).all()
        for x, got in ((k, cache.k), (v, cache.v)):
            want = _np_block_means(x[0, b, 1], pad + start, side, pool)
            pos = np.asarray(cache.pos)[0, b, 1]
            for slot in range(int(cache.length[0, b, 1])):
                ordinal = pos[slot] - start
                if 0 <= ordinal < side * side:  # a kept visual slot: its block's mean
                    np.testing.assert_allclose(np.asarray(got)[0, b, 1, slot], want[ordinal], atol=1e-6)
                else:  # a text slot, unchanged
                    np.testing.assert_array_equal(np.asarray(got)[0, b, 1, slot], x[0, b, 1, pad + pos[slot]])


def test_pooled_visual_refuses_a_visual_count_that_is_no_square_grid():
    ctx = make_ctx(40, [0], [(2, 32)], num_visual=30)
    with pytest.raises(ValueError, match="square grid"):
        references.PooledVisual(pool=2).plan(jnp.zeros((1, 1, 2), jnp.int8), ctx)


def test_oracle_evidence_keeps_every_evidence_token_then_random_visual_ones():
    ctx = make_ctx(40, [0, 5], [(2, 34), (2, 30)])
    q, k = random_qk(2, 2, 4, 2, 40, 8)
    evidence = references.evidence_mask([[0, 7, 31], [27]], 32)
    text = np.asarray(ctx.valid & ~ctx.is_visual)
    method = references.reference_method("oracle evidence", 0.25)
    with pytest.raises(ValueError, match="bind_evidence"):
        run_method(method, q, k, ctx)
    static, value = split_budget(method, 40)  # as the harness binds it: evidence beside the traced budget
    bound = bind_budget(static, references.bind_evidence(value, evidence))
    _, plan = run_method(bound, q, k, ctx)
    for b, (pad, ev) in enumerate([(0, [0, 7, 31]), (5, [27])]):
        for layer in range(2):
            for h in range(2):
                idx = set(np.asarray(plan.indices)[layer, b, h, :int(plan.count[layer, b, h])].tolist())
                assert {pad + 2 + o for o in ev} <= idx and set(np.flatnonzero(text[b])) <= idx
    n_vis = np.asarray(ctx.is_visual).sum(-1)
    kept_vis = np.asarray(plan.count) - text.sum(-1)[None, :, None]
    assert (np.abs(kept_vis - 0.25 * n_vis[None, :, None]) < 1).all()  # the budget's share, evidence included


def test_sensitive_subset_is_full_right_and_random_visual_wrong():
    from vkv_jax.evaluation.results import Result

    examples = _examples(6)
    gold = [e.answer for e in examples]

    def result(method, answers, target=None, status=None):
        return Result(method, None, 6, 0.0, {}, None, None, 1.0, 1.0, answers, target=target, status=status)

    wrong = ["zzz"] * 6
    full = result("full", gold[:4] + wrong[4:])
    rand = result("text + random visual", gold[:2] + wrong[2:], 0.1, "hit")
    other = result("snapkv", [gold[0], wrong[1], gold[2], wrong[3], gold[4], wrong[5]], 0.1, "hit")
    subset = harness.mark_sensitive([full, rand, other], examples)
    assert subset.tolist() == [False, False, True, True, False, False]
    assert full.sensitive == {"n": 2, "accuracy": 1.0} and rand.sensitive["accuracy"] == 0.0
    assert other.sensitive["accuracy"] == 0.5 and other.on_sensitive().n == 2
    assert harness.mark_sensitive([full, dataclasses.replace(rand, status="below floor")], examples) is None


def test_runner_oracle_and_pooled_rows_keep_what_they_promise(shapes_model):
    examples = [e for e in _examples(12) if e.answer_cells][:4]
    runner = harness.Runner(shapes_model, examples, batch_size=4, max_new_tokens=1, progress=False)
    assert harness.reference_rows(runner) == list(references.REFERENCES)
    oracle = runner.run(references.reference_method("oracle evidence", 0.3))
    assert np.allclose(oracle.recall, 1.0)  # every evidence token kept in every layer and head
    pooled = harness._result("pooled visual 4x4", None, examples,
                             runner.run(references.reference_method("pooled visual 4x4")), None)
    assert pooled.kept_vision == 4.0  # 64 visual tokens: an 8 x 8 grid, 2 x 2 blocks of 4 x 4
