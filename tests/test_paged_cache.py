"""The paged KV cache: allocated bytes follow live bytes on the shipped model, the paged attention paths
equal their reference, and the dense view round-trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_paged_paths_match, random_paged_cache

import vkv_jax
from vkv_jax import cache as cache_lib
from vkv_jax import paging, request
from vkv_jax.methods import Compression, build
from vkv_jax.pallas_kernels import decode_attention_reference, packed_attention, paged_attention
from vkv_jax.testbed import synthetic

POST_PREFILL = ["snapkv", "pyramidkv", "adakv", "vlcache", "aircache", "h2o", "streamingllm", "random", "csp"]


@pytest.fixture(scope="module")
def shipped():
    model = vkv_jax.load()
    ex = synthetic.make_example(0, "test", synthetic.ShapesConfig(image_size=model.config.vision.image_size))
    inputs = model.prepare([ex.image], [ex.question])
    return model, inputs


@pytest.mark.parametrize("budget", [0.1, 0.25])
@pytest.mark.parametrize("name", POST_PREFILL)
def test_generate_allocates_at_most_1_15_times_live_bytes_on_the_shipped_model(shipped, name, budget):
    """Through `vkv_jax.generate` (traced budget, pool fitted to the kept slots): the pages reserved for
    the prompt are <= 1.15 x its live bytes; the decode segment comes on top and is reported apart."""
    model, inputs = shipped
    stats = vkv_jax.generate(model, inputs, 4, Compression(name, budget=budget)).stats
    pages = stats["kv_bytes_allocated"] - stats["kv_bytes_decode_segment"]
    assert stats["kv_bytes"] < 0.5 * stats["kv_bytes_full"]  # it did compress
    assert stats["kv_bytes"] <= pages <= 1.15 * stats["kv_bytes"]
    assert sum(stats["kv_bytes_allocated_per_layer"]) <= stats["kv_bytes_allocated"]


@pytest.mark.parametrize("name", ["pyramidkv", "adakv", "vlcache", "aircache"])
def test_the_static_pool_holds_every_kept_slot(shipped, name):
    """Inside a user's jit the pool cannot be fitted: `static_pool` (the methods' total-budget bounds)
    must hold every slot the plan keeps, so no owner is cut short."""
    model, inputs = shipped
    args = (jnp.asarray(inputs.input_ids), jnp.asarray(inputs.valid), jnp.asarray(inputs.pixel_values))
    method = build(Compression(name, budget=0.1))
    _, cache, _, _ = request.prefill_jit(model.params, model.config, method, *args, 8)
    _, kept, _, _ = request.prefill_compact_jit(model.params, model.config, method, *args)
    np.testing.assert_array_equal(np.asarray(cache.prompt_len), np.asarray(kept.length))
    assert (-(-np.asarray(cache.prompt_len) // cache.page_size)).sum() <= cache.num_pages


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv", "vlcache", "aircache"])
def test_a_traced_budget_bounds_the_static_pool_at_least_as_the_static_one(shipped, name):
    """One executable per budget kind (`methods.split_budget`, the evaluation's budget search): the
    method with its budget traced still bounds the static pool (AdaKV through its base's capacity bucket;
    it used to raise), by at least the bound of the same budget held static."""
    from vkv_jax.methods import split_budget

    model, inputs = shipped
    S, Nv = inputs.input_ids.shape[1], model.config.num_image_tokens
    L, H = model.config.text.num_layers, model.config.text.num_kv_heads
    method = build(Compression(name, budget=0.1))
    traced, value = split_budget(method, S)
    assert value is not None
    assert (paging.prompt_slots_per_row(traced, S, Nv, L, H)
            >= paging.prompt_slots_per_row(method, S, Nv, L, H))


@pytest.mark.parametrize("need", [1, 15, 16, 17, 100, 1000, 4097])
def test_fitted_pool_rounds_up_by_at_most_one_sixteenth(need):
    lengths = np.ones((need,), np.int32)  # one slot an owner: page size 1, `need` pages
    page_size, pages = paging.fitted_pool(lengths)
    assert page_size == 1 and need <= pages <= need * (1 + 1 / 16)
    assert paging.fitted_pool(np.ones((need + 1,), np.int32))[1] >= pages  # monotone


@pytest.mark.parametrize("ps", [1, 4, 8])
def test_paged_attention_paths_equal_the_dense_reference(ps):
    rng = np.random.default_rng(ps)
    dense, paged = random_paged_cache(rng, ps=ps)
    assert_paged_paths_match(paged, dense, seed=ps)


def test_dense_view_round_trips_and_pool_holds_every_slot():
    dense, paged = random_paged_cache(np.random.default_rng(0))
    view = paged.dense()
    S = dense.capacity
    live = np.asarray(dense.live_mask())
    np.testing.assert_array_equal(np.asarray(view.live_mask())[..., :S], live)
    np.testing.assert_array_equal(np.asarray(view.k)[..., :S, :][live], np.asarray(dense.k)[live])
    np.testing.assert_array_equal(np.asarray(view.pos)[..., :S][live], np.asarray(dense.pos)[live])
    assert float(paged.live_bytes()) == float(dense.live_bytes())
    # layer-major, contiguous: each layer's page range holds exactly its owners' pages
    owner = np.asarray(paged.page_owner)
    start = np.asarray(paged.layer_start)
    B, H = dense.length.shape[1:]
    for layer in range(dense.length.shape[0]):
        own = owner[start[layer]:start[layer + 1]]
        assert ((own // (B * H)) == layer).all()
    assert jax.tree.structure(paged) is not None


def test_dropping_positions_from_a_cut_equals_compacting_without_them():
    """`drop_positions_from` (the evaluation's template drop) == paging the cache compacted without the
    slots at or past each row's cut: same live slots in the dense view, same attention on every path."""
    rng = np.random.default_rng(3)
    dense, paged = random_paged_cache(rng, ps=4)
    L, B, H = dense.length.shape
    cut = jnp.asarray([20, 9], jnp.int32)
    want = cache_lib.compact(dense.replace(pos=jnp.where(dense.pos >= cut[None, :, None, None], -1, dense.pos)),
                             None, dense.capacity)
    got = cache_lib.drop_positions_from(paged, cut)
    np.testing.assert_array_equal(np.asarray(got.prompt_len), np.asarray(want.length))
    assert int(np.asarray(want.length).sum()) < int(np.asarray(dense.length).sum())  # it dropped something
    view = got.dense()
    S = want.capacity
    np.testing.assert_array_equal(np.asarray(view.live_mask())[..., :S], np.asarray(want.live_mask()))
    np.testing.assert_array_equal(np.asarray(view.k)[..., :S, :], np.asarray(want.k))
    q = jnp.asarray(rng.normal(size=(B, 2 * H, 8)), jnp.float32)
    for layer in range(L):
        ref = decode_attention_reference(q, want.k[layer], want.v[layer], want.live_mask()[layer])
        kern = paged_attention(q, got.k_pages, got.v_pages, got.page_table[layer], got.prompt_len[layer],
                               impl="kernel")
        packed, _ = packed_attention(q, got.k_pages, got.v_pages, got.page_pos, got.page_owner,
                                     got.layer_start[layer], got.layer_start[layer + 1], layer * B * H, num_kv_heads=H)
        for out in (kern, packed):
            np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
