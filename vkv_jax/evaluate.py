"""Entry point of `python -m vkv_jax.evaluate` (the harness is `vkv_jax.evaluation.harness`)."""

import sys

from vkv_jax.evaluation.harness import main

if __name__ == "__main__":
    sys.exit(main())
