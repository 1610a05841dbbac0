"""Run by tests/test_sharding.py in a subprocess with 8 host CPU devices (XLA_FLAGS must be set before jax is
imported, and the rest of the suite keeps one device). Prints one JSON object.

    python tests/sharded_run.py generate MODEL_DIR|default --meshes 1x8,2x4,8x1 --methods full,snapkv:0.1@int8,...
        greedy generation of every method (@ a quantized KV storage) on one device and on each mesh, the pool's
        split and bytes
    python tests/sharded_run.py load MODEL_DIR --mesh 1x8 [--dtype bfloat16]
        the weights' bytes on each device, and the largest block the loader held on the host at once
    python tests/sharded_run.py kernels - --mesh 2x4
        each Pallas kernel (interpret mode) run per device under the mesh against its jnp reference on one
        device: the largest difference of each, and the sharding of each kernel's output
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"


def load(args) -> dict:
    import jax
    import numpy as np

    import vkv_jax
    from vkv_jax.models import sharding

    largest = [0, 0]  # bytes of the largest block read at once, and of the largest whole tensor
    read = sharding.TensorSource.read

    def counting_read(self, index=(), dtype=np.float32, check_finite=False):
        out = read(self, index, dtype, check_finite)
        whole = self.transform(self.file.get(self.key))
        largest[0] = max(largest[0], out.nbytes)
        largest[1] = max(largest[1], whole.size * np.dtype(dtype).itemsize)
        return out

    sharding.TensorSource.read = counting_read
    data, model_axis = map(int, args.mesh.split("x"))
    model = vkv_jax.load(args.model, args.dtype, mesh=vkv_jax.make_mesh(data, model_axis))
    per_device = sharding.bytes_per_device(model.params)
    total = sum(int(x.nbytes) for x in jax.tree.leaves(model.params))
    by_part = {part: max(sharding.bytes_per_device(tree).values()) for part, tree in model.params.items()}
    return {"devices": jax.device_count(), "total_bytes": total, "bytes_per_device": per_device,
            "max_bytes_per_device_by_part": by_part,
            "largest_block_read": largest[0], "largest_tensor": largest[1], "replicated": model.replicated}


def kernels(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import vkv_jax
    from vkv_jax.models import attention
    from vkv_jax.pallas_kernels import compact_kv, decode_attention, window_scores

    B, Hq, H, S, D, W = 4, 8, 4, 256, 32, 16
    keys = iter(jax.random.split(jax.random.key(0), 8))
    q = jax.random.normal(next(keys), (B, Hq, S, D))
    k = jax.random.normal(next(keys), (B, H, S, D))
    v = jax.random.normal(next(keys), (B, H, S, D))
    valid = jnp.arange(S)[None] >= jnp.array([0, 17, 0, 100])[:, None]  # left padding
    live = valid[:, None, :] & (jax.random.uniform(next(keys), (B, H, S)) < 0.7)
    order = jnp.argsort(jax.random.uniform(next(keys), (2, B, H, S)), axis=-1)[..., :64].astype(jnp.int32)
    count = jax.random.randint(next(keys), (2, B, H), 0, 65)
    kk, vv = jnp.stack([k, k * 2]), jnp.stack([v, -v])
    q_slot = jnp.broadcast_to(jnp.arange(S - W, S, dtype=jnp.int32), (B, W))
    groups = (jnp.arange(S)[None] % 3 == 0).astype(jnp.int32) * jnp.ones((B, 1), jnp.int32)
    cases = {  # name: (fn(impl, *arrays), arrays): the arrays go in as jit arguments, not constants
        "decode_attention": (lambda impl, q, k, v, live: decode_attention(q, k, v, live, return_lse=True, impl=impl),
                             (q[:, :, -1], k, v, live)),
        "compact_kv": (lambda impl, k, v, i, n: compact_kv(k, v, i, n, 128, impl=impl), (kk, vv, order, count)),
        "window_scores": (lambda impl, q, k, slot, ok, qg, kg: window_scores(
            q, k, slot, ok, q_group=qg, key_group=kg, threshold_p=0.01, per_head=True, impl=impl),
            (q[:, :, S - W:], k, q_slot, valid, groups[:, S - W:], groups)),
        "splash_attention": (lambda impl, q, k, v, ok: attention.prefill_attention(
            q, k, v, ok, impl="splash" if impl == "kernel" else "dense"), (q, k, v, valid)),
    }
    data, model_axis = map(int, args.mesh.split("x"))
    mesh = vkv_jax.make_mesh(data, model_axis)
    out = {"devices": jax.device_count()}
    for name, (case, arrays) in cases.items():
        ref = jax.jit(case, static_argnums=0)("reference", *arrays)
        with jax.set_mesh(mesh):
            got = jax.jit(case, static_argnums=0)("kernel", *arrays)
        ref_leaves, got_leaves = jax.tree.leaves(ref), jax.tree.leaves(got)
        if name == "splash_attention":  # padding rows hold anything: compare real query rows only
            mask = np.asarray(valid)[:, None, :]
            ref_leaves = [np.where(mask[..., None] if r.ndim == 4 else mask, r, 0) for r in map(np.asarray, ref_leaves)]
            got_leaves = [np.where(mask[..., None] if g.ndim == 4 else mask, g, 0) for g in map(np.asarray, got_leaves)]
        diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                   for a, b in zip(ref_leaves, got_leaves))
        shards = {len(x.sharding.device_set) for x in jax.tree.leaves(got)}
        spec = str(jax.tree.leaves(got)[0].sharding.spec)
        out[name] = {"max_abs_diff": diff, "devices": sorted(shards), "spec": spec}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("generate", "load", "kernels"))
    parser.add_argument("model")
    parser.add_argument("--meshes", default="1x8,2x4,8x1")
    parser.add_argument("--mesh", default="1x8")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", default="full")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=4)
    args = parser.parse_args(argv)
    if args.mode == "load":
        return load(args)
    if args.mode == "kernels":
        return kernels(args)

    import jax
    import numpy as np
    import one_file_method  # the method contract on a mesh

    import vkv_jax
    from vkv_jax import inputs as inputs_lib
    from vkv_jax import methods, request
    from vkv_jax.models import sharding
    from vkv_jax.testbed import synthetic

    methods.register(one_file_method.NAME, one_file_method.KeyNorm)

    path = None if args.model == "default" else args.model
    single = vkv_jax.load(path)
    size = single.config.vision.image_size
    examples = synthetic.make_examples("test", args.rows, config=synthetic.ShapesConfig(image_size=size))
    inputs = single.prepare(images=[e.image for e in examples], prompts=[e.question for e in examples])
    compressions, kv_dtypes, trims, labels = [], [], [], []  # spec NAME[:BUDGET][@KV_DTYPE][~DECODE_BUDGET]
    for label in args.methods.split(","):
        spec, _, trim = label.partition("~")
        spec, _, kv_dtype = spec.partition("@")
        name, _, budget = spec.partition(":")
        compressions.append(vkv_jax.Compression(name, budget=float(budget)) if budget else vkv_jax.Compression(name))
        kv_dtypes.append(kv_dtype or None)
        trims.append(vkv_jax.DecodeTrim(int(trim), interval=2, window=2) if trim else None)
        labels.append(label)

    def run(model):
        out = {}
        for c, kv_dtype, trim, label in zip(compressions, kv_dtypes, trims, labels):
            got = vkv_jax.generate(model, inputs, max_new_tokens=args.new_tokens, compression=c, kv_dtype=kv_dtype,
                                   decode_trim=trim)
            out[label] = {
                "tokens": np.asarray(got.tokens).tolist(), "kv_bytes": got.stats["kv_bytes"],
                "kept_vision": got.stats["kept_vision_per_layer"]}
        return out

    result = {"devices": jax.device_count(), "one_device": run(single), "meshes": {}}
    for spec in args.meshes.split(","):
        data, model_axis = map(int, spec.split("x"))
        mesh = vkv_jax.make_mesh(data, model_axis)
        model = vkv_jax.load(path, mesh=mesh)
        per_device = sharding.bytes_per_device(model.params)
        with jax.set_mesh(mesh):  # the pool of one compressed batch: its axes and bytes on each device
            method = inputs_lib.bind_visual_layout(methods.build(compressions[-1]), model.config, inputs)
            ids, valid, pix = sharding.shard_rows((inputs.input_ids, inputs.valid,
                                                   inputs_lib.device_images(inputs.pixel_values, model.dtype)), mesh)
            cache = request.prefill_request(model.params, model.config, method, ids, valid, pix).cache
        result["meshes"][spec] = {
            "generate": run(model),
            "replicated": model.replicated,
            "param_bytes_per_device": sorted(per_device.values()),
            "pool_axes": list(cache.axes),
            "pool_bytes_per_device": sorted(sharding.bytes_per_device(cache.k_pages).values()),
            "pool_bytes": int(cache.k_pages.nbytes),
        }
    return result


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
