"""The evaluation harness and the keep-map figures on every model family `vkv_jax.load` returns: tiny random
LLaVA-NeXT (anyres tiles, newline tokens), LLaVA-OneVision (SigLIP, Qwen2 LM) and Qwen2-VL (native
resolution, M-RoPE) checkpoints, each taking its images through `model.prepare`'s own inputs."""

import json

import matplotlib
import numpy as np
import pytest
from _helpers import assert_scored_by_row_metrics, write_jsonl
from hf_fixtures import make_llava_next, make_llava_onevision, make_qwen2_vl

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import vkv_jax  # noqa: E402
from vkv_jax import viz  # noqa: E402
from vkv_jax.evaluation import harness as evaluate  # noqa: E402
from vkv_jax.models import anyres  # noqa: E402
from vkv_jax.models.config import VisionConfig  # noqa: E402
from vkv_jax.testbed import synthetic  # noqa: E402

MAKERS = {"llava_next": make_llava_next, "llava_onevision": make_llava_onevision, "qwen2_vl": make_qwen2_vl}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def family_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    MAKERS[request.param](path, text_layers=3, head_scale=10.0)  # 3 layers: FastV's default k=2 fits
    return path


# ----------------------------------------------------------------------------- pure pieces

def test_grid_tokens_on_cells_is_cells_to_patches_on_a_plain_patch_grid():
    for size, patch in ((64, 8), (128, 8), (128, 16)):
        config = synthetic.ShapesConfig(image_size=size)
        side = size // patch
        for cells in ([(0, 0)], [(7, 7), (2, 5)], [(3, 0), (3, 1)]):
            assert evaluate.grid_tokens_on_cells(cells, config.grid, [(0, side, side, side)]) == \
                synthetic.cells_to_patches(cells, config, patch)


def test_grid_tokens_on_cells_covers_each_anyres_grid_skipping_newlines():
    # a 4 x 4 base crop (tokens 0..15), then an 8 x 8 tile grid whose rows are 9 apart (a newline ends each)
    regions = ((0, 4, 4, 4), (16, 8, 8, 9))
    assert evaluate.grid_tokens_on_cells([(0, 0)], 8, regions) == [0, 16]
    assert evaluate.grid_tokens_on_cells([(7, 7)], 8, regions) == [15, 16 + 7 * 9 + 7]
    # a cell grid finer than the base crop: cells (2, 2) and (3, 3) both fall in base token 5
    assert evaluate.grid_tokens_on_cells([(2, 2), (3, 3)], 8, regions) == [5, 16 + 2 * 9 + 2, 16 + 3 * 9 + 3]
    # a 3 x 3 grid over 8 cells: cell 2 ([2/8, 3/8)) overlaps grid cells 0 ([0, 1/3)) and 1 ([1/3, 2/3))
    assert evaluate.grid_tokens_on_cells([(2, 2)], 8, [(0, 3, 3, 3)]) == [0, 1, 3, 4]


def test_row_regions_shift_each_image_by_the_tokens_before_it():
    a = anyres.anyres_layout(40, 80, 32, 4, ((32, 64), (64, 32), (64, 64)))
    b = anyres.anyres_layout(40, 80, 32, 4, ((32, 64),), tile=False)
    regions = anyres.row_regions([a, b])
    assert regions[:2] == a.regions and regions[2] == (a.num_tokens, 4, 4, 4)
    np.testing.assert_array_equal(anyres.region_tokens((5, 2, 3, 4)), [[5, 6, 7], [9, 10, 11]])


def test_shapes_are_drawn_at_the_towers_size_or_the_smallest_multiple_the_testbed_allows():
    def cfg(size):
        return type("C", (), {"vision": VisionConfig(hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                                                     image_size=size, patch_size=8)})

    assert [evaluate.shapes_image_size(cfg(s)) for s in (32, 64, 336, 384, 20)] == [64, 64, 336, 384, 80]
    qwen = type("C", (), {"vision": object()})
    assert evaluate.shapes_image_size(qwen) == synthetic.ShapesConfig().image_size


# ----------------------------------------------------------------------------- on each family

def test_harness_runs_a_small_grid(family_dir, tmp_path):
    """The CLI over shapes questions: the full cache keeps every visual token (as many per question as
    `model.prepare` gives) and covers every answer patch; SnapKV at 25% holds about a quarter of the KV and
    fewer visual tokens; FastV runs inside the prefill."""
    out = tmp_path / "out"
    rc = evaluate.main(["--model", str(family_dir), "--limit", "4", "--methods", "full,snapkv,fastv",
                        "--budgets", "0.25", "--protocols", "pre-template", "--batch-size", "4",
                        "--max-new-tokens", "2", "--prior-questions", "0", "--ablations", "blank", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    model = vkv_jax.load(family_dir)
    examples = [synthetic.make_example(i, "test", synthetic.ShapesConfig(
        image_size=evaluate.shapes_image_size(model.config))) for i in range(4)]
    visual = model.prepare([e.image for e in examples], [e.question for e in examples]).visual_tokens
    full, snap, fastv = data["results"]
    assert (full["method"], snap["method"], fastv["method"]) == ("full", "snapkv", "fastv")
    assert full["kept_vision"] == pytest.approx(np.mean(visual)) and full["kv_fraction"] == pytest.approx(1.0)
    assert full["answer_patch_recall"] == pytest.approx(1.0)
    assert 0.15 < snap["kv_fraction"] < 0.4 and snap["kept_vision"] < full["kept_vision"]
    assert fastv["kept_vision"] < full["kept_vision"] and fastv["kept_text"] == pytest.approx(full["kept_text"])
    assert len(data["ablations"]["blank"]["answers"]) == 4
    if data["attention"] is not None:  # uniform attention over a row's visual tokens puts 1 / count on each
        assert data["attention"]["uniform_mass"] >= 1 / max(visual)


def test_harness_scores_a_user_jsonl_by_each_rows_metric(family_dir, tmp_path):
    """A JSONL file of odd-sized images with one row per metric (exact, vqa, anls, choice) runs through the
    CLI on the family's own `prepare`; every score is its row's metric of the generated answer."""
    out = tmp_path / "out"
    rc = evaluate.main(["--model", str(family_dir), "--data", str(write_jsonl(tmp_path)), "--methods", "full",
                        "--protocols", "pre-template", "--no-references", "--batch-size", "4",
                        "--max-new-tokens", "3", "--ablations", "", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    (full,) = data["results"]
    assert full["n"] == 4 and full["kv_fraction"] == pytest.approx(1.0) and full["answer_patch_recall"] is None
    assert_scored_by_row_metrics(data)


def test_keep_maps_and_heatmap_figure(family_dir, tmp_path):
    """keep_maps over each row's first grid agrees with the whole keep vector (`visual_keep_map`) read with
    each row's own grid, whose kept sum is generate's kept vision count; the heatmap figure is written."""
    model = vkv_jax.load(family_dir)
    size = evaluate.shapes_image_size(model.config)
    exs = synthetic.make_examples("test", 2, config=synthetic.ShapesConfig(image_size=size))
    inputs = model.prepare([e.image for e in exs], [e.question for e in exs])
    comps = {"full": vkv_jax.Compression("full"), "snapkv": vkv_jax.Compression("snapkv", budget=0.2)}
    maps = viz.keep_maps(model, inputs, comps, max_new_tokens=2)
    out = vkv_jax.generate(model, inputs, 2, comps["snapkv"], return_layout=True)
    keep = viz.visual_keep_map(out.layout, inputs.input_ids, inputs.valid, model.config.image_token_id,
                               max(inputs.visual_tokens))
    np.testing.assert_allclose(keep.sum(-1).mean(1), out.stats["kept_vision_per_layer"], rtol=1e-6)
    np.testing.assert_array_equal(maps["full"], 1.0)
    first = inputs.layouts[0][0].regions[0]  # (start, rows, cols, stride) of the first grid
    L, B, rows, cols = maps["snapkv"].shape
    assert (L, B, rows, cols) == (model.config.text.num_layers, 2, first[1], first[2])
    for b in range(B):  # the first grid is the first rows * cols visual tokens, row-major (no newline inside)
        np.testing.assert_array_equal(maps["snapkv"][:, b], keep[:, b, first[0]:first[0] + rows * cols].reshape(
            L, rows, cols))
    assert maps["snapkv"].sum() < maps["full"].sum()
    if model.config.anyres:  # the tile grid: its newline tokens (every cols + 1-th) are left out
        tiles = viz.keep_maps(model, inputs, {"snapkv": comps["snapkv"]}, max_new_tokens=2, grid=1)["snapkv"]
        start, rows, cols, stride = inputs.layouts[0][0].regions[1]
        assert stride == cols + 1
        span = keep[:, 0, start:start + rows * stride].reshape(L, rows, stride)
        np.testing.assert_array_equal(tiles[:, 0], span[..., :cols])
    fig = viz.plot_keep_heatmaps(exs[0].image, {k: v[:, 0] for k, v in maps.items()}, cells=exs[0].answer_cells,
                                 grid=synthetic.ShapesConfig().grid)
    fig.savefig(tmp_path / "keep.png")
    plt.close(fig)
    assert (tmp_path / "keep.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="grid must be an index"):
        viz.keep_maps(model, inputs, comps, grid=5)
