"""Entry point of `python -m vkv_jax.generate` (the command's body is `vkv_jax.cli.generate`).

This module is only run, never imported: importing it would bind the package attribute
`vkv_jax.generate` to this module instead of the `generate` function.
"""

import sys

if __name__ != "__main__":
    raise ImportError("vkv_jax.generate is the command-line entry point (python -m vkv_jax.generate); the "
                      "function is `vkv_jax.generate`, the command's main is `vkv_jax.cli.generate.main`")

from vkv_jax.cli.generate import main  # noqa: E402

sys.exit(main())
