"""Shared pytest set-up: JAX's persistent compilation cache (CI re-runs compile far less), XLA's cheap
compiles, and the tiny random LLaVA the evaluation tests share."""

import os
import pathlib

# The suite's time is mostly XLA compiling tiny models on CPU: skip LLVM's expensive passes (measured 1.4x
# faster on test_equivalence + test_multiturn_room, same results). Set in the environment before jax is
# imported, so the subprocesses tests start (CLIs, notebooks, meshes) compile alike.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest

_CACHE = pathlib.Path(os.environ.get("VKV_JAX_TEST_CACHE",
                                     pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
