"""Install vkv_jax into a notebook runtime without replacing the runtime's accelerator jax.

A Colab TPU or GPU runtime ships a jax built for its accelerator (jax + jaxlib + a plugin such as libtpu
or jax-cuda12-plugin). `pip install <vkv_jax>` would replace them with the CPU build that vkv_jax pins
(jax==0.10.2), and the notebook would then quietly run on CPU. `install(source)`:

- with an accelerator jax in the runtime (a jax plugin distribution, or a jaxlib built for CUDA / ROCm):
  installs vkv_jax itself with `--no-deps`, then its other requirements with a constraint file that pins
  every installed jax distribution to its installed version, so pip keeps them (or fails loudly when a
  requirement needs another jax; it never swaps one in);
- otherwise (a CPU runtime, or no jax yet): a plain `pip install <source>`, pins included.

Standard library only: the notebooks run it before vkv_jax or its requirements exist (docs/colab.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

# distributions that make up a jax installation: jax, jaxlib and the accelerator plugins
JAX_FAMILY = re.compile(r"^(jax|jaxlib|libtpu(-nightly)?|jax-(cuda\d+|rocm\d*)-(plugin|pjrt))$")
PLUGIN = re.compile(r"^(libtpu(-nightly)?|jax-(cuda\d+|rocm\d*)-(plugin|pjrt))$")
_LIST = ("import importlib.metadata as m, json; "
         "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))")
_REQUIRES = "import importlib.metadata as m, json, sys; print(json.dumps(m.requires(sys.argv[1]) or []))"


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(python: str = sys.executable) -> dict[str, str]:
    """{canonical name: version} of every distribution installed for interpreter `python`."""
    # -I: the environment's own distributions only, not a source tree's *.egg-info in the working directory
    out = subprocess.run([python, "-I", "-c", _LIST], capture_output=True, text=True, check=True).stdout
    return {canonical(name): version for name, version in json.loads(out).items()}


def accelerator_jax(dists: dict[str, str]) -> list[str]:
    """The installed distributions that say jax was built for an accelerator: a plugin (libtpu,
    jax-cuda12-plugin, ...) or a jaxlib whose local version names CUDA / ROCm (0.4.x+cuda12...)."""
    found = [name for name in dists if PLUGIN.match(name)]
    if re.search(r"\+(cuda|rocm)", dists.get("jaxlib", "")):
        found.append("jaxlib")
    return sorted(found)


def _requirement_name(requirement: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def install(source: str, python: str = sys.executable, pip_args: tuple[str, ...] = (), quiet: bool = True) -> str:
    """pip-install vkv_jax from `source` (a folder holding the repository, a wheel, or any pip location) into
    the environment of interpreter `python`, keeping an accelerator jax (module docstring). `pip_args` go
    to every pip call (e.g. --no-index --find-links DIR). Returns a one-line summary of what was done."""
    pip = [python, "-m", "pip", "install", *(["-q"] if quiet else []), *pip_args]
    dists = installed(python)
    accelerator = accelerator_jax(dists)
    if not accelerator:
        subprocess.run([*pip, source], check=True)
        return f"installed vkv_jax from {source} with its pinned requirements (no accelerator jax to keep)"
    keep = {name: version for name, version in dists.items() if JAX_FAMILY.match(name)}
    subprocess.run([*pip, "--no-deps", source], check=True)
    requires = json.loads(subprocess.run([python, "-I", "-c", _REQUIRES, "vkv_jax"], capture_output=True, text=True,
                                         check=True).stdout)
    requires = [r for r in requires if "extra ==" not in r.replace('"', "").replace("'", "")]
    others = [r for r in requires if _requirement_name(r) not in keep]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(f"{name}=={version}\n" for name, version in sorted(keep.items())))
    try:
        if others:
            subprocess.run([*pip, "-c", f.name, *others], check=True)
    finally:
        os.unlink(f.name)
    pinned = {_requirement_name(r): r for r in requires if _requirement_name(r) in keep}
    differs = [f"{pinned[n]} (runtime: {keep[n]})" for n in sorted(pinned) if not pinned[n].endswith(f"=={keep[n]}")]
    note = f"; vkv_jax is tested with {', '.join(differs)}" if differs else ""
    return (f"installed vkv_jax from {source}, keeping the runtime's jax {keep.get('jax', '?')} "
            f"({', '.join(accelerator)}){note}")

