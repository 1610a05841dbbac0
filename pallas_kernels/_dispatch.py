"""Choosing between a Pallas kernel and its pure-jnp reference.

Every public kernel function takes `impl="auto"|"kernel"|"reference"` and `interpret=None`:
- "auto": the compiled kernel on the backends listed by the kernel module (TPU, and GPU where the
  kernel uses no TPU-only API), the reference everywhere else (CPU: the interpreter is slower than XLA).
- "kernel": always the kernel; on CPU it can only run in interpret mode.
- "reference": always the jnp reference.
`interpret=None` means "interpret iff the default backend is CPU" (Pallas refuses to compile there).
"""

from __future__ import annotations

import jax

IMPLS = ("auto", "kernel", "reference")


def use_kernel(impl: str, kernel_backends: tuple[str, ...]) -> bool:
    """True when the kernel (rather than the reference) should run."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        return jax.default_backend() in kernel_backends
    return impl == "kernel"


def resolve_interpret(interpret) -> bool:
    """`None` -> interpret mode iff running on CPU; anything else is passed through."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return interpret


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pick_block(n: int, block: int) -> int:
    """Block length along an axis of length n for a requested `block`.

    A 128-aligned n (cache capacities are) gets the largest multiple of 128 <= block that divides it,
    so the wrapper needs no padded copy of K/V. Otherwise min(block, n rounded up to 128) and the
    caller pads n up to a multiple of it.
    """
    if n % 128 == 0:
        for d in range(min(block, n) // 128 * 128, 0, -128):
            if n % d == 0:
                return d
    return min(block, round_up(n, 128))
