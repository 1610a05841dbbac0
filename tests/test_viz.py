"""vkv_jax.viz: keep-set maps from the compacted cache, and the notebook figures."""

import io
import warnings

import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vkv_jax import cache as cache_lib  # noqa: E402
from vkv_jax import viz  # noqa: E402
from vkv_jax.methods import KeepPlan  # noqa: E402

IMG = 9  # image token id of the hand-made batches


def _batch():
    """Two left-padded rows: row 0 = [pad, pad, t, IMG x4, t], row 1 = [t, t, IMG x4, t, t]."""
    ids = np.array([[0, 0, 5, IMG, IMG, IMG, IMG, 6],
                    [5, 7, IMG, IMG, IMG, IMG, 6, 8]], np.int32)
    valid = ids != 0
    valid[1] = True
    return ids, valid


def test_visual_index_by_position_counts_image_tokens_in_raster_order_per_row():
    ids, valid = _batch()
    index = viz.visual_index_by_position(ids, valid, IMG)
    # row 0: positions 0..5 are t, IMG, IMG, IMG, IMG, t (padding holds no position)
    np.testing.assert_array_equal(index[0, :6], [-1, 0, 1, 2, 3, -1])
    np.testing.assert_array_equal(index[0, 6:], [-1, -1])
    np.testing.assert_array_equal(index[1], [-1, -1, 0, 1, 2, 3, -1, -1])


def _cache(ids, valid, L=2, H=2, D=4):
    S = ids.shape[1]
    pos = np.where(valid, np.cumsum(valid, axis=1) - 1, -1).astype(np.int32)
    tags = (ids == IMG).astype(np.int8)
    k = jnp.ones((L, ids.shape[0], H, S, D))
    return cache_lib.from_prefill(k, k, jnp.asarray(pos), jnp.asarray(tags), S)


def test_visual_keep_map_of_uncompressed_cache_is_all_ones():
    ids, valid = _batch()
    keep = viz.visual_keep_map(_cache(ids, valid), ids, valid, IMG, 4)
    assert keep.shape == (2, 2, 4)
    np.testing.assert_array_equal(keep, 1.0)


def test_visual_keep_map_reports_the_fraction_of_heads_keeping_each_visual_token():
    ids, valid = _batch()
    full = _cache(ids, valid)
    L, B, H, S = full.pos.shape
    # slots kept per (layer, row, head); row 0's visual slots are 3..6, row 1's are 2..5
    keep = {(0, 0, 0): [2, 3, 4], (0, 0, 1): [3, 7], (1, 0, 0): [6], (1, 0, 1): [6, 0],  # slot 0 is padding
            (0, 1, 0): [2, 5], (0, 1, 1): [5], (1, 1, 0): [0, 1], (1, 1, 1): [7]}
    idx = np.zeros((L, B, H, 3), np.int32)
    cnt = np.zeros((L, B, H), np.int32)
    for (l, b, h), slots in keep.items():
        idx[l, b, h, :len(slots)] = sorted(slots)
        cnt[l, b, h] = len(slots)
    compact = cache_lib.compact(full, KeepPlan(jnp.asarray(idx), jnp.asarray(cnt)), 4)
    got = viz.visual_keep_map(compact, ids, valid, IMG, 4)
    want = np.array([[[1.0, 0.5, 0, 0], [0.5, 0, 0, 1.0]],  # layer 0: row 0, row 1
                     [[0, 0, 0, 1.0], [0, 0, 0, 0]]])  # layer 1
    np.testing.assert_array_equal(got, want)


def test_to_grid_is_raster_order_and_rejects_non_square():
    np.testing.assert_array_equal(viz.to_grid(np.arange(4.0))[1], [2.0, 3.0])
    with pytest.raises(ValueError, match="square"):
        viz.to_grid(np.zeros(6))


def _png_bytes(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def test_keep_heatmaps_has_one_panel_per_method_and_layer_and_outlines_answer_cells():
    image = np.zeros((32, 32, 3), np.uint8)
    maps = {"full": np.ones((3, 4, 4)), "aircache": np.zeros((3, 4, 4))}
    fig = viz.plot_keep_heatmaps(image, maps, cells=[(1, 2)])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 * 3
    assert all(len(ax.patches) == 1 for ax in panels)  # one evidence cell outlined per panel
    assert panels[0].get_ylabel().startswith("full\n100%")
    assert panels[3].get_ylabel().startswith("aircache\n0%")
    assert len(_png_bytes(fig)) < 200_000


def _stats(vis, txt):
    return {"kept_vision_per_layer": vis, "kept_text_per_layer": txt}


def test_layer_budget_bars_stack_text_on_vision_per_method_and_layer():
    fig = viz.plot_layer_budgets({"a": _stats([4, 3], [1, 1]), "b": _stats([2, 2], [0, 5])})
    (ax,) = fig.axes
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    assert len(ax.patches) == 2 * 2 * 2  # methods × layers × (vision, text)
    assert heights == sorted([4, 3, 1, 1, 2, 2, 0, 5])
    assert _png_bytes(fig)


def _result(method, budget, accuracy, kv_bytes, kv_bytes_full):
    from vkv_jax.evaluation.results import Result

    return Result(method, budget, 4, accuracy, {}, None, None, kv_bytes, kv_bytes_full, [])


def test_budget_curves_draw_one_line_per_method_and_full_as_reference():
    recs = [_result("full", None, 0.5, 100.0, 100.0),
            _result("snapkv", 0.5, 0.25, 50.0, 100.0),
            _result("snapkv", 0.1, 0.0, 10.0, 100.0)]
    fig = viz.plot_accuracy_vs_budget(recs)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_array_equal(lines["snapkv"].get_xdata(), [0.1, 0.5])  # sorted by budget
    np.testing.assert_array_equal(lines["snapkv"].get_ydata(), [0.0, 0.25])
    np.testing.assert_array_equal(lines["full"].get_ydata(), [0.5, 0.5])
    plt.close(fig)
    fig = viz.plot_accuracy_vs_budget(recs, references={"question only": 0.4}, xscale="log")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    np.testing.assert_array_equal(lines["question only"].get_ydata(), [0.4, 0.4])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0.1", "0.5"]  # the budgets, not 10^k
    plt.close(fig)
    fig = viz.plot_kv_bytes_vs_budget(recs)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["snapkv"].get_ydata(), [10 / 1024, 50 / 1024])
    plt.close(fig)
    fig = viz.plot_decode_timing({"a": {"decode_tokens_per_s": 3.0}, "b": {"decode_tokens_per_s": 5.0}}, "cpu")
    assert [p.get_width() for p in fig.axes[0].patches] == [3.0, 5.0]
    plt.close(fig)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import vkv_jax

    # until the trained model ships, load() writes a random checkpoint into VKV_JAX_CACHE: a private
    # directory keeps parallel test workers from racing on the shared one
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setenv("VKV_JAX_CACHE", str(tmp_path_factory.mktemp("vkv_jax_cache")))
        warnings.simplefilter("ignore")  # the random default model warns until the trained one ships
        return vkv_jax.load()


def test_keep_maps_agree_with_generate_kept_vision_counts(model):
    import vkv_jax
    from vkv_jax.testbed import synthetic

    exs = synthetic.make_examples("test", 2)
    inputs = model.prepare([e.image for e in exs], [e.question for e in exs])
    comps = {"full": vkv_jax.Compression("full"), "snapkv": vkv_jax.Compression("snapkv", budget=0.1)}
    maps = viz.keep_maps(model, inputs, comps, max_new_tokens=2)
    g = model.config.vision.image_size // model.config.vision.patch_size
    assert maps["full"].shape == (model.config.text.num_layers, 2, g, g)
    np.testing.assert_array_equal(maps["full"], 1.0)
    out = vkv_jax.generate(model, inputs, 2, comps["snapkv"])
    # kept visual slots per layer (mean over rows and heads) = mean over rows of the map's sum
    np.testing.assert_allclose(maps["snapkv"].sum(axis=(2, 3)).mean(axis=1), out.stats["kept_vision_per_layer"])
    assert maps["snapkv"].sum() < maps["full"].sum() * 0.2


def test_tables_list_every_run():
    class Out:
        text = ["red"]
        stats = {"kept_text_per_layer": [3.0, 3.0], "kept_vision_per_layer": [10.0, 4.5],
                 "kv_bytes": 1024.0, "kv_bytes_full": 4096.0}

    assert viz.stats_table({"aircache": Out()}).splitlines()[1].split() == \
        ["aircache", "red", "3/3", "10/4.5", "1.0", "25%"]
    fig = viz.plot_image(np.zeros((16, 16, 3), np.uint8), "q?", cells=[(0, 0)], grid=2)
    assert len(fig.axes[0].patches) == 1
    plt.close(fig)
