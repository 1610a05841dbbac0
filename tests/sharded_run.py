"""Run by tests/test_sharding.py in a subprocess with 8 host CPU devices (XLA_FLAGS must be set before jax is
imported, and the rest of the suite keeps one device). Prints one JSON object.

    python tests/sharded_run.py generate MODEL_DIR|default --meshes 1x8,2x4,8x1 --methods full,snapkv:0.1,...
        greedy generation of every method on one device and on each mesh, the pool's split and bytes
    python tests/sharded_run.py load MODEL_DIR --mesh 1x8 [--dtype bfloat16]
        the weights' bytes on each device, and the largest block the loader held on the host at once
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
    return {"devices": jax.device_count(), "total_bytes": total, "bytes_per_device": per_device,
            "largest_block_read": largest[0], "largest_tensor": largest[1], "replicated": model.replicated}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("generate", "load"))
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

    import jax
    import numpy as np

    import vkv_jax
    from vkv_jax import api, methods, request
    from vkv_jax.models import sharding
    from vkv_jax.testbed import synthetic

    path = None if args.model == "default" else args.model
    single = vkv_jax.load(path)
    size = single.config.vision.image_size
    examples = synthetic.make_examples("test", args.rows, config=synthetic.ShapesConfig(image_size=size))
    inputs = single.prepare(images=[e.image for e in examples], prompts=[e.question for e in examples])
    compressions = []
    for spec in args.methods.split(","):
        name, _, budget = spec.partition(":")
        compressions.append(vkv_jax.Compression(name, budget=float(budget)) if budget else vkv_jax.Compression(name))

    def run(model):
        out = {}
        for c in compressions:
            got = vkv_jax.generate(model, inputs, max_new_tokens=args.new_tokens, compression=c)
            out[c.name] = {"tokens": np.asarray(got.tokens).tolist(), "kv_bytes": got.stats["kv_bytes"],
                           "kept_vision": got.stats["kept_vision_per_layer"]}
        return out

    result = {"devices": jax.device_count(), "one_device": run(single), "meshes": {}}
    for spec in args.meshes.split(","):
        data, model_axis = map(int, spec.split("x"))
        mesh = vkv_jax.make_mesh(data, model_axis)
        model = vkv_jax.load(path, mesh=mesh)
        per_device = sharding.bytes_per_device(model.params)
        with jax.set_mesh(mesh):  # the pool of one compressed batch: its axes and bytes on each device
            method = api.bind_visual_layout(methods.build(compressions[-1]), model.config, inputs)
            ids, valid, pix = sharding.shard_rows((inputs.input_ids, inputs.valid,
                                                   api.device_images(inputs.pixel_values, model.dtype)), mesh)
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
