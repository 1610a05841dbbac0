"""The notebooks' install step (colab/colab_install.py) keeps a runtime's accelerator jax.

Run against a real venv (pip from ensurepip) whose jax is a *fake* distribution: wheels built here that hold
only metadata (jax 0.4.99, jaxlib, libtpu), as a Colab TPU runtime's jax would look to pip. The package
installed is a fake vkv_jax wheel with the real one's pins (jax==0.10.2, jaxlib==0.10.2) and a dependency
that needs jax; everything comes from a local --find-links folder, so the test is offline. A real accelerator
jax is hundreds of MB; pip decides from metadata only, which is what these wheels give it.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import venv
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


def load_module():
    spec = importlib.util.spec_from_file_location("colab_install", ROOT / "colab" / "colab_install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


colab_install = load_module()


def wheel(folder: pathlib.Path, name: str, version: str, requires: tuple[str, ...] = ()) -> pathlib.Path:
    """A metadata-only wheel of distribution `name` (what pip reads to resolve and install)."""
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    files = {f"{info}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(python of a fresh venv holding a fake TPU jax 0.4.99, --find-links folder, the fake vkv_jax wheel)."""
    root = tmp_path_factory.mktemp("colab")
    links = root / "wheels"
    links.mkdir()
    for name, version in (("jax", "0.4.99"), ("jaxlib", "0.4.99"), ("libtpu", "0.0.99"),
                          ("jax", "0.10.2"), ("jaxlib", "0.10.2")):
        wheel(links, name, version)
    wheel(links, "smalldep", "1.0", ("jax",))  # like flax / optax: needs some jax, not a particular one
    wheel(links, "newjaxdep", "1.0", ("jax>=0.5",))  # a requirement that cannot run on the runtime's jax
    source = wheel(links, "vkv_jax", "0.1.0", ("jax==0.10.2", "jaxlib==0.10.2", "smalldep>=1",
                                                'pytest>=8; extra == "test"'))
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    python = str(root / "venv" / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(links)]
    subprocess.run([*pip, "jax==0.4.99", "jaxlib==0.4.99", "libtpu==0.0.99"], check=True)
    return python, links, source


def test_accelerator_jax_is_recognised():
    assert colab_install.accelerator_jax({"jax": "0.4.30", "jaxlib": "0.4.30", "libtpu": "0.0.2"}) == ["libtpu"]
    assert colab_install.accelerator_jax({"jaxlib": "0.4.30+cuda12.cudnn89"}) == ["jaxlib"]
    assert colab_install.accelerator_jax({"jax": "0.6.0", "jax-cuda12-plugin": "0.6.0",
                                          "jax-cuda12-pjrt": "0.6.0"}) == ["jax-cuda12-pjrt", "jax-cuda12-plugin"]
    assert colab_install.accelerator_jax({"jax": "0.6.0", "jaxlib": "0.6.0", "numpy": "2.0"}) == []
    assert colab_install.canonical("Jax_CUDA12.Plugin") == "jax-cuda12-plugin"


def test_install_keeps_the_runtimes_jax_and_adds_the_rest(env):
    python, links, source = env
    args = ("--no-index", "--find-links", str(links))
    summary = colab_install.install(str(source), python, args)
    after = colab_install.installed(python)
    assert (after["jax"], after["jaxlib"], after["libtpu"]) == ("0.4.99", "0.4.99", "0.0.99")
    assert after["vkv-jax"] == "0.1.0" and after["smalldep"] == "1.0" and "pytest" not in after
    assert "keeping the runtime's jax 0.4.99 (libtpu)" in summary
    assert "tested with jax==0.10.2 (runtime: 0.4.99), jaxlib==0.10.2 (runtime: 0.4.99)" in summary
    # a requirement that needs another jax fails loudly; it never swaps the runtime's jax
    extra = wheel(links, "vkv_jax", "0.1.1", ("jax==0.10.2", "newjaxdep"))
    with pytest.raises(subprocess.CalledProcessError):
        colab_install.install(str(extra), python, args)
    assert colab_install.installed(python)["jax"] == "0.4.99"
    extra.unlink()


def test_without_an_accelerator_jax_the_pins_apply(env):
    # what a plain `pip install` does, and what the accelerator path above prevents: jax is replaced
    python, links, source = env
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "libtpu", "vkv_jax"], check=True)
    summary = colab_install.install(str(source), python, ("--no-index", "--find-links", str(links)))
    after = colab_install.installed(python)
    assert (after["jax"], after["jaxlib"], after["vkv-jax"]) == ("0.10.2", "0.10.2", "0.1.0")
    assert "no accelerator jax to keep" in summary


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_take_the_repository_as_a_parameter_and_install_through_the_module(path):
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    first = "".join(cells[0]["source"])
    assert first.splitlines()[2].startswith("REPO = ") and "# @param" in first.splitlines()[2]
    assert "colab_install.install(src)" in first
    runs_pip = ('"pip"', "'pip'", "!pip", "%pip")
    assert not any(p in "".join(c["source"]) for c in cells for p in runs_pip), "pip run outside colab_install"


def test_colab_doc_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/colab.md)" in readme
    doc = (ROOT / "docs" / "colab.md").read_text()
    assert "REPO" in doc and "colab_install" in doc


def test_module_imports_nothing_outside_the_standard_library():
    source = (ROOT / "colab" / "colab_install.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from ")) and "__future__" not in line}
    assert imports <= set(sys.stdlib_module_names), imports
