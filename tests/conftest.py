"""Shared pytest set-up: JAX's persistent compilation cache (CI re-runs compile far less), XLA's cheap
compiles, and the tiny random LLaVA the evaluation tests share."""

import os
import pathlib

# The suite's time is mostly XLA compiling tiny models on CPU: skip LLVM's expensive passes (measured 1.4x
# faster on test_equivalence + test_multiturn_room, same results). Set in the environment before jax is
# imported, so the subprocesses tests start (CLIs, notebooks, meshes) compile alike.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA:CPU's MLIR fusion emitters compile ~2.5x slower than its older IR emitters on these graphs (a tiny
# LLaVA's prefill: 3.4 s against 1.3 s); the tests check this library's numerics, not XLA's code generator.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()

import jax  # noqa: E402
import pytest

_CACHE = pathlib.Path(os.environ.get("VKV_JAX_TEST_CACHE",
                                     pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# ... and the same cache for every subprocess a test starts (CLIs, the compile-bounds script, notebooks' kernels)
os.environ.update(JAX_COMPILATION_CACHE_DIR=str(_CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="session")
def shapes_llava(tmp_path_factory):
    """A random tiny HF LLaVA with 64-px images (64 visual tokens, like the testbed), sharp logits."""
    from hf_fixtures import make_llava

    path = tmp_path_factory.mktemp("tiny") / "m"
    make_llava(path, image_size=64, num_heads=4, num_kv_heads=2, head_scale=30.0)
    return path


@pytest.fixture(scope="session")
def shapes_model(shapes_llava):
    import vkv_jax

    return vkv_jax.load(shapes_llava)


@pytest.fixture(scope="session")
def shapes_pair(shapes_model):
    """Two test-split questions with their images, prepared for `shapes_model`: (examples, inputs)."""
    from vkv_jax.testbed import synthetic

    exs = synthetic.make_examples("test", 2, config=synthetic.ShapesConfig(image_size=64))
    return exs, shapes_model.prepare([e.image for e in exs], [e.question for e in exs])


# ---- scheduling: heavy files first, whole files per worker ----
# Seconds per test file on 2 cores with a cold compilation cache (`python tests/conftest.py JUNIT.xml` prints
# this table from a run's `--junitxml`); files not listed count as cheap. Under pytest-xdist each worker
# gets a contiguous slice of the collection (`--dist worksteal` hands worker i the i-th equal share by
# count, then idle workers steal the tail of a busy one's queue): the order below deals the heavy files
# to the slices so that their times balance, whole (module fixtures built once), heaviest first, with the
# cheap files as filler at each slice's end, where stealing takes from.
FILE_SECONDS: dict[str, float] = {
    "test_compile_bounds.py": 582, "test_prefill_reduction_ragged.py": 353, "test_sharding.py": 319,
    "test_row_logits_invariance.py": 300, "test_methods_qwen2_vl.py": 286, "test_evaluate.py": 259,
    "test_chunked_prefill.py": 243, "test_methods_anyres.py": 243, "test_evaluate_families.py": 239,
    "test_paged_cache.py": 228, "test_fair_evaluation.py": 219, "test_notebooks.py": 210,
    "test_prefill_reduction.py": 193, "test_equivalence.py": 191, "test_shipped_model.py": 187,
    "test_generate.py": 165, "test_testbed_train.py": 118, "test_row_invariance.py": 85, "test_docs_snippets.py": 76,
    "test_attention.py": 69, "test_onevision_video.py": 69, "test_method_contract.py": 67,
    "test_hf_parity_qwen2_vl.py": 60, "test_kernels_window_scores.py": 60, "test_testbed_train_v3.py": 59,
    "test_anyres_inputs.py": 57, "test_selection.py": 47, "test_multiturn_room.py": 44, "test_bench.py": 39,
    "test_testbed_finegrained.py": 38, "test_cache_checkpoint.py": 37, "test_methods_baselines.py": 36,
    "test_hf_parity.py": 34, "test_observers_blocked.py": 34, "test_kernels_decode_attention.py": 32,
    "test_bench_prefill_attention.py": 32, "test_methods_csp.py": 29, "test_budgets.py": 28, "test_cli_errors.py": 28,
    "test_hf_parity_next.py": 24, "test_hf_parity_onevision.py": 20}


def _schedule(items, workers: int):
    """items reordered: `workers` contiguous slices of equal count, heavy files balanced over them."""
    by_file: dict[str, list] = {}
    for item in items:
        by_file.setdefault(item.path.name, []).append(item)
    heavy = sorted((f for f in by_file if FILE_SECONDS.get(f, 0) >= 20), key=lambda f: -FILE_SECONDS[f])
    cheap = [f for f in by_file if f not in heavy]
    sizes = [len(items) // workers + (i < len(items) % workers) for i in range(workers)]
    slices: list[list] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for f in heavy:  # longest first, onto the least loaded slice that still has room for the whole file
        fits = [i for i in range(workers) if len(slices[i]) + len(by_file[f]) <= sizes[i]] or range(workers)
        i = min(fits, key=lambda i: load[i])
        slices[i] += by_file[f]
        load[i] += FILE_SECONDS[f]
    rest = [item for f in cheap for item in by_file[f]]
    out = []
    for i in range(workers):  # fill each slice to its count with cheap tests
        take = max(0, sizes[i] - len(slices[i]))
        out += slices[i] + rest[:take]
        rest = rest[take:]
    return out + rest


def pytest_collection_modifyitems(config, items):
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    items[:] = _schedule(items, max(workers, 1))


if __name__ == "__main__":  # FILE_SECONDS from a junit XML: python tests/conftest.py run.xml
    import collections
    import sys
    import xml.etree.ElementTree as ET

    seconds = collections.Counter()
    for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
        seconds[case.attrib["classname"].split(".")[-1] + ".py"] += float(case.attrib["time"])
    print("FILE_SECONDS = {" + ", ".join(f'"{f}": {round(s)}' for f, s in seconds.most_common() if s >= 20) + "}")
