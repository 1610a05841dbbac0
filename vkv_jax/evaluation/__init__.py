"""Accuracy and fidelity of methods × budgets: the sweep (`harness`, run as `python -m vkv_jax.evaluate`),
its questions (`data`), per-cell numbers (`results`) and the files it writes (`report`)."""
